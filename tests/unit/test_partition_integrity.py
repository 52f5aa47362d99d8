"""Validation is bound to what trains (security review finding 8), written as the attacks.

Partition files changed after `fedmtl data validate` (emptied, string dtypes, values changed,
a NaN in the held-out rows, deleted), manifest entries that point outside the partitions folder,
and what training and evaluation do with such a client: it is named and sits out, the others go
on. One Great Expectations run for the module; each test tampers with its own copy of the data.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from fedmtl.client.data import (
    PartitionChanged,
    PartitionError,
    PartitionInvalid,
    PartitionUnavailable,
    load_client_data,
)
from fedmtl.client.store import ClientStore
from fedmtl.config import load_config
from fedmtl.data import partition, prepare
from fedmtl.data.manifest import (
    MANIFEST,
    PartitionDigest,
    UnsafeManifest,
    file_digest,
    partition_path,
    read_manifest,
)
from fedmtl.data.validation import (
    CHANGED_CHECK,
    ValidationReport,
    _read_partition,
    bind_partitions,
    manifest_digest,
    read_report,
    usable_clients,
    validate_partitions,
)
from fedmtl.faults import ClientTimeout, InjectedFailure
from fedmtl.federation import Federation, RejectedUpdate
from fedmtl.state import ClientFailure, FailureKind
from tests.conftest import tiny_overrides

VICTIM = "c005"


@pytest.fixture(scope="module")
def validated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 digits clients, partitioned and validated once (all pass)."""
    root = tmp_path_factory.mktemp("integrity")
    cfg = load_config(None, tiny_overrides(root))
    prepare(cfg.data)
    partition(cfg.data)
    report = validate_partitions(
        cfg.data.partitions_dir,
        read_manifest(cfg.data.partitions_dir),
        cfg.validation,
        cfg.data.validation_dir,
    )
    assert len(report.passed) == 8
    return root


@pytest.fixture
def copy(validated: Path, tmp_path: Path) -> dict[str, Any]:
    """This test's own copy of the validated data, its config and the victim's file."""
    shutil.copytree(validated / "data", tmp_path / "data")
    cfg = load_config(None, tiny_overrides(tmp_path))
    parts = Path(cfg.data.partitions_dir)
    manifest = read_manifest(parts)
    return {
        "cfg": cfg,
        "parts": parts,
        "manifest": manifest,
        "path": parts / manifest.entry(VICTIM).file,
        "report": read_report(cfg.data.validation_dir),
    }


def federation(
    copy: dict[str, Any], store: str, digests: dict[str, PartitionDigest] | None
) -> Federation:
    return Federation.from_config(
        copy["cfg"],
        copy["manifest"],
        ClientStore(copy["parts"].parent / store),
        partition_digests=digests,
    )


# ways to change a partition after validation: (how, the error a federation without a report
# raises: the contract checked on every read)
def _emptied(path: Path) -> None:
    pd.read_parquet(path).iloc[:0].to_parquet(path, index=False)


def _string_dtypes(path: Path) -> None:
    frame = pd.read_parquet(path)
    features = [c for c in frame.columns if c.startswith("x")]
    frame[features] = frame[features].astype(str)  # "0.25": parsed as a float without a check
    frame.to_parquet(path, index=False)


def _values_changed(path: Path) -> None:
    frame = pd.read_parquet(path)
    features = [c for c in frame.columns if c.startswith("x")]
    frame[features] = frame[features].to_numpy()[::-1]  # same shape, dtypes and value range
    frame.to_parquet(path, index=False)


def _nan_in_test_rows(path: Path) -> None:
    frame = pd.read_parquet(path)
    frame.loc[frame.index[frame["split"] == "test"][0], "x10"] = np.nan
    frame.to_parquet(path, index=False)


def _deleted(path: Path) -> None:
    path.unlink()


TAMPER = {
    "emptied": (_emptied, PartitionInvalid, "no train rows"),
    "string-dtypes": (_string_dtypes, PartitionInvalid, "not numeric"),
    "values-changed": (_values_changed, None, ""),  # only the hash can tell
    "nan-in-test-rows": (_nan_in_test_rows, PartitionInvalid, "NaN or infinite feature"),
    "deleted": (_deleted, PartitionUnavailable, "is missing"),
}


# --------------------------------------------------------------------------------------------
# what the report records


def test_the_report_records_each_validated_files_sha256_and_the_manifests(
    copy: dict[str, Any],
) -> None:
    report, parts = copy["report"], copy["parts"]
    assert report.manifest_sha256 == manifest_digest(copy["manifest"])
    for entry in copy["manifest"].clients:
        data = (parts / entry.file).read_bytes()
        v = report.clients[entry.client]
        assert (v.sha256, v.size) == (hashlib.sha256(data).hexdigest(), len(data))
    raw = json.loads((Path(copy["cfg"].data.validation_dir) / "report.json").read_text())
    assert raw["manifest_sha256"] == report.manifest_sha256
    assert raw["clients"][VICTIM]["sha256"] == report.clients[VICTIM].sha256


def test_unchanged_files_bind_with_every_client(copy: dict[str, Any]) -> None:
    report, digests = bind_partitions(copy["parts"], copy["manifest"], copy["report"])
    assert report.changed == {} and sorted(digests) == copy["manifest"].client_ids
    assert usable_clients(copy["manifest"], report, 8) == copy["manifest"].client_ids


# --------------------------------------------------------------------------------------------
# a partition changed after validation: quarantined before training, named


@pytest.mark.parametrize("case", list(TAMPER))
def test_a_partition_changed_after_validation_is_quarantined_and_named(
    copy: dict[str, Any], case: str
) -> None:
    TAMPER[case][0](copy["path"])
    report, digests = bind_partitions(copy["parts"], copy["manifest"], copy["report"])
    assert list(report.changed) == [VICTIM] and VICTIM not in digests
    why = report.changed[VICTIM]
    assert str(copy["path"]) in why
    assert ("is missing" if case == "deleted" else "changed after validation") in why
    assert VICTIM in report.quarantined and f"client '{VICTIM}'" in report.quarantined[VICTIM][-1]
    assert CHANGED_CHECK in report.quarantined[VICTIM][-1]
    others = [c for c in copy["manifest"].client_ids if c != VICTIM]
    assert usable_clients(copy["manifest"], report, 2) == others
    assert (
        read_report(copy["cfg"].data.validation_dir).passed == copy["manifest"].client_ids
    )  # file untouched


def test_too_few_unchanged_partitions_fail_naming_every_changed_client(
    copy: dict[str, Any],
) -> None:
    manifest = copy["manifest"]
    for entry in manifest.clients[1:]:
        _values_changed(copy["parts"] / entry.file)
    report, _ = bind_partitions(copy["parts"], manifest, copy["report"])
    with pytest.raises(ValueError) as failure:
        usable_clients(manifest, report, 2)
    message = str(failure.value)
    assert "only 1 of 8 clients passed" in message
    for entry in manifest.clients[1:]:
        assert (
            f"client '{entry.client}': {CHANGED_CHECK} failed" in message and entry.file in message
        )


def test_a_manifest_changed_after_validation_or_a_report_without_hashes_is_refused(
    copy: dict[str, Any],
) -> None:
    manifest = copy["manifest"]
    moved = json.loads((copy["parts"] / MANIFEST).read_text())
    moved["clients"][0]["n_train"] += 1
    (copy["parts"] / MANIFEST).write_text(json.dumps(moved))
    with pytest.raises(
        ValueError, match=r"manifest.json' changed after validation.*fedmtl data validate"
    ):
        bind_partitions(copy["parts"], read_manifest(copy["parts"]), copy["report"])
    old = ValidationReport({c: v for c, v in copy["report"].clients.items()})  # no manifest hash
    with pytest.raises(
        ValueError, match="records no partition hashes.*re-run `fedmtl data validate`"
    ):
        bind_partitions(copy["parts"], manifest, old)


# --------------------------------------------------------------------------------------------
# a partition changed mid-run: every read checks the validated digest


@pytest.mark.parametrize("case", list(TAMPER))
def test_a_client_whose_partition_changed_sits_out_and_the_others_train_as_without_it(
    copy: dict[str, Any], case: str
) -> None:
    _, digests = bind_partitions(copy["parts"], copy["manifest"], copy["report"])
    fed = federation(copy, "checked", digests)
    clients = copy["manifest"].client_ids
    state = fed.initial_state()
    TAMPER[case][0](copy["path"])  # after the run bound itself to the validated files

    failed: dict[str, ClientFailure] = {}
    updates = fed.train_clients(clients, state, failed)
    assert list(failed) == [VICTIM]
    kind = PartitionUnavailable if case == "deleted" else PartitionChanged
    assert str(failed[VICTIM]).startswith(
        f"{kind.__name__}: client '{VICTIM}': partition file '{copy['path']}'"
    )
    assert failed[VICTIM].kind is FailureKind.PARTITION
    assert not failed[VICTIM].retryable  # the flow does not retry it: it sits out
    with pytest.raises(kind, match=VICTIM):
        fed.data(VICTIM)

    alone = federation(copy, "without", None)  # the same round without the client
    expected = alone.train_clients([c for c in clients if c != VICTIM], state)
    assert [u.client for u in updates] == [u.client for u in expected]
    for got, want in zip(updates, expected):
        assert torch.equal(got.delta_base, want.delta_base)
        assert all(torch.equal(got.delta_heads[t], want.delta_heads[t]) for t in want.delta_heads)
    merged = fed.merge(state, fed.aggregate(updates, state, clients)[0], updates)
    assert torch.isfinite(merged.base).all() and not torch.equal(merged.base, state.base)

    skipped: dict[str, ClientFailure] = {}
    records = pd.DataFrame(fed.evaluate_clients(clients, merged, skipped))
    assert list(skipped) == [VICTIM] and f"client '{VICTIM}'" in str(skipped[VICTIM])
    assert set(records["client"]) == set(clients) - {VICTIM}
    assert np.isfinite(records["accuracy"]).all()
    pooled: dict[str, ClientFailure] = {}
    fed.evaluate_pooled(clients, merged, pooled)
    assert list(pooled) == [VICTIM]


def test_the_hash_is_checked_not_only_the_size(copy: dict[str, Any]) -> None:
    size = copy["path"].stat().st_size
    fed = federation(copy, "s", {VICTIM: PartitionDigest("0" * 64, size)})
    with pytest.raises(
        PartitionChanged,
        match=rf"client '{VICTIM}'.*changed after validation.*fedmtl data validate",
    ):
        fed.data(VICTIM)
    with pytest.raises(
        PartitionChanged, match="did not pass validation"
    ):  # a client without a digest
        fed.data("c000")
    good = file_digest(copy["path"])
    assert federation(copy, "t", {VICTIM: good}).data(VICTIM).n_train > 0


@pytest.mark.parametrize("case", [c for c, (_, kind, _) in TAMPER.items() if kind is not None])
def test_without_a_report_the_contract_is_still_checked_at_load(
    copy: dict[str, Any], case: str
) -> None:
    """A federation built without a validation report (tests, benchmarks): no hashes, but data
    that would train silently or crash evaluation is refused, naming the client and file."""
    tamper, kind, phrase = TAMPER[case]
    tamper(copy["path"])
    fed = federation(copy, "plain", None)
    with pytest.raises(
        kind, match=rf"client '{VICTIM}': partition file '{copy['path']}'.*{phrase}"
    ):
        fed.data(VICTIM)
    state = fed.initial_state()
    with pytest.raises(kind):  # unasked, evaluation raises the client's own error (no overflow)
        fed.evaluate_clients([VICTIM], state)
    skipped: dict[str, ClientFailure] = {}
    assert fed.evaluate_clients(["c000", VICTIM], state, skipped)
    assert list(skipped) == [VICTIM] and phrase in str(skipped[VICTIM])


def test_a_partition_error_is_a_value_error_and_a_missing_one_a_file_not_found_error() -> None:
    assert issubclass(PartitionChanged, PartitionError) and issubclass(PartitionError, ValueError)
    assert issubclass(PartitionUnavailable, FileNotFoundError)
    for kind in (PartitionChanged, PartitionUnavailable, PartitionInvalid):
        failure = ClientFailure.of(kind("client 'x': partition file 'x.parquet' ..."))
        assert failure.kind is FailureKind.PARTITION and not failure.retryable
        assert str(failure) == f"{kind.__name__}: client 'x': partition file 'x.parquet' ..."
    assert ClientFailure.of(InjectedFailure("client 'x' failed")).retryable
    assert ClientFailure.of(ValueError("anything else")).kind is FailureKind.ERROR
    assert ClientFailure.of(ClientTimeout("late")).kind is FailureKind.TIMEOUT
    assert (
        ClientFailure.of(RejectedUpdate("nan"), " (tried 2 more times)").message
        == "nan (tried 2 more times)"
    )


# --------------------------------------------------------------------------------------------
# manifest entries that point outside the partitions folder


def _manifest_with(parts: Path, client: str, file: str) -> None:
    raw = json.loads((parts / MANIFEST).read_text())
    raw["clients"][5].update(client=client, file=file)
    (parts / MANIFEST).write_text(json.dumps(raw))


@pytest.mark.parametrize(
    "file",
    [
        "../x.parquet",
        "/etc/passwd",
        "sub/x.parquet",
        "..",
        ".hidden.parquet",
        "sub\\x.parquet",
        MANIFEST,
        "",
    ],
)
def test_a_file_entry_outside_the_partitions_folder_is_refused(
    copy: dict[str, Any], file: str
) -> None:
    _manifest_with(copy["parts"], VICTIM, file)
    with pytest.raises(UnsafeManifest) as refused:
        read_manifest(copy["parts"])
    assert f"client '{VICTIM}': file entry {file!r}" in str(refused.value)
    with pytest.raises(UnsafeManifest, match=VICTIM):
        partition_path(copy["parts"], VICTIM, file)


def test_validate_refuses_an_unsafe_manifest_naming_the_entry(copy: dict[str, Any]) -> None:
    from typer.testing import CliRunner

    from cli import app

    _manifest_with(copy["parts"], VICTIM, "../../secret.parquet")
    root = copy["parts"].parents[1]
    (root / "params.yaml").write_text("")
    args = [a for o in tiny_overrides(root) for a in ("--set", o)]
    result = CliRunner().invoke(
        app, ["data", "validate", "--params", str(root / "params.yaml"), *args]
    )
    message = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert "is not a valid manifest" in message and f"client '{VICTIM}'" in message
    assert "'../../secret.parquet' has a directory part" in message


def test_client_ids_that_are_empty_or_twice_are_refused_and_path_like_ids_stay_inside(
    copy: dict[str, Any],
) -> None:
    raw = json.loads((copy["parts"] / MANIFEST).read_text())
    for bad, phrase in (
        ("", "client id '' is not a non-empty string"),
        ("c000", "client 'c000' is listed twice"),
    ):
        changed = json.loads(json.dumps(raw))
        changed["clients"][5]["client"] = bad
        (copy["parts"] / MANIFEST).write_text(json.dumps(changed))
        with pytest.raises(UnsafeManifest, match=phrase):
            read_manifest(copy["parts"])
    # an id like "../evil" is an id, not a path: it names no file and no folder of its own
    _manifest_with(copy["parts"], "../evil", "../evil.parquet")
    with pytest.raises(UnsafeManifest, match=r"client '../evil': file entry '../evil.parquet'"):
        read_manifest(copy["parts"])
    _manifest_with(copy["parts"], "../evil", copy["path"].name)
    manifest = read_manifest(copy["parts"])
    assert load_client_data(copy["parts"], manifest, "../evil").n_train > 0
    store = ClientStore(copy["parts"].parent / "stores")
    fed = Federation.from_config(copy["cfg"], manifest, store)
    state = fed.initial_state()
    (update,) = fed.train_clients(["../evil"], state)
    assert fed.evaluate_clients(
        ["../evil"], state
    )  # personalises: keeps a head in the client's store
    folders = [p for p in store.root.iterdir()]
    assert len(folders) == 1 and folders[0].parent == store.root and ".." not in folders[0].name
    assert store.clients() == ["../evil"] and not (copy["parts"].parent / "evil").exists()


def test_a_symbolic_link_leaving_the_partitions_folder_is_not_read(
    copy: dict[str, Any], tmp_path: Path
) -> None:
    outside = tmp_path / "outside.parquet"
    shutil.copy(copy["path"], outside)
    copy["path"].unlink()
    copy["path"].symlink_to(outside)
    with pytest.raises(
        PartitionUnavailable, match=rf"client '{VICTIM}'.*symbolic link.*outside the partitions"
    ):
        load_client_data(copy["parts"], copy["manifest"], VICTIM)
    frame, error, digest = _read_partition(
        copy["parts"], VICTIM, copy["path"].name
    )  # validation's read
    assert frame is None and digest is None and "symbolic link" in error
    inside = copy["parts"] / "inside.parquet"  # a link that stays inside is a file like another
    shutil.move(outside, inside)
    copy["path"].unlink()
    copy["path"].symlink_to(inside)
    assert load_client_data(copy["parts"], copy["manifest"], VICTIM).n_train > 0
