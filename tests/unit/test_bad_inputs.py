"""A corpus of bad inputs, each run through the command line the way `dvc repro` runs it.

Every case builds its bad input in a temporary directory, hashes it, runs the stage
(`fedmtl data prepare | partition | validate`, or a command that must refuse its settings
before any flow starts) and checks four things:

- the exit code: 2 when nothing useful can go on (a file that is not a table, a bad setting),
  0 when the rest can go on (the bad client is quarantined by validation, or a warning names it);
- the message names the culprit: the file, column, client, setting key or option;
- the input is byte-identical afterwards;
- nothing is half-written: no outputs of a failed stage, no temporary files.

The cases where the rest goes on share one table (one prepare, partition and validate run:
Great Expectations is slow to start) with clean clients beside the bad ones.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from cli import app
from fedmtl.data.manifest import MANIFEST, read_manifest
from fedmtl.data.validation import REPORT, read_report
from tests.conftest import tiny_overrides

runner = CliRunner()

# --------------------------------------------------------------------------------------------
# helpers


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def hashes(directory: Path) -> dict[str, str]:
    return {p.name: sha(p) for p in sorted(directory.iterdir()) if p.is_file()}


def leftovers(root: Path) -> list[Path]:
    """Temporary files of atomic writes and unfinished Data Docs builds."""
    return [*root.rglob("*.tmp"), *root.rglob(".*.tmp"), *root.rglob(".data_docs.*")]


def block(client: str, n: int = 12, seed: int = 0, **columns: Any) -> pd.DataFrame:
    """``n`` clean rows of one client: features f1, f2 in [0, 1), labels 0/1 alternating."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {"client": client, "f1": rng.random(n), "f2": rng.random(n), "label": np.arange(n) % 2}
    )
    return frame.assign(**columns)


def table(*clients: str) -> pd.DataFrame:
    return pd.concat([block(c, seed=i) for i, c in enumerate(clients)], ignore_index=True)


def write_params(root: Path, path: Path, **table_settings: Any) -> Path:
    params = root / "params.yaml"
    data = {
        "source": "table",
        "table": {"path": str(path), **table_settings},
        "raw_dir": str(root / "raw"),
        "partitions_dir": str(root / "parts"),
        "validation_dir": str(root / "validation"),
    }
    params.write_text(yaml.safe_dump({"data": data}))
    return params


def fedmtl(*args: str) -> Any:
    result = runner.invoke(app, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a crash, not an answer
    return result


# --------------------------------------------------------------------------------------------
# tables nothing can be made of: `fedmtl data prepare` exits 2 and writes nothing


def _csv(frame: pd.DataFrame) -> Callable[[Path], Path]:
    def build(root: Path) -> Path:
        frame.to_csv(root / "shops.csv", index=False)
        return root / "shops.csv"

    return build


def _parquet(frame: pd.DataFrame, name: str = "shops.parquet") -> Callable[[Path], Path]:
    def build(root: Path) -> Path:
        frame.to_parquet(root / name, index=False)
        return root / name

    return build


def _bytes(name: str, data: bytes) -> Callable[[Path], Path]:
    def build(root: Path) -> Path:
        (root / name).write_bytes(data)
        return root / name

    return build


def _truncated_parquet(root: Path) -> Path:
    path = root / "shops.parquet"
    table("a", "b").to_parquet(path, index=False)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _with(frame: pd.DataFrame, row: int, column: str, value: Any) -> pd.DataFrame:
    frame = frame.copy()
    if not isinstance(value, (int, float)):
        frame[column] = frame[column].astype(object)
    frame.loc[row, column] = value
    return frame


GOOD = table("a", "b", "c")
RANDOM = np.random.default_rng(7).bytes(4096)

# id -> (builder, table settings, phrases the message must hold; {path} is the table's path)
FATAL: dict[str, tuple[Callable[[Path], Path], dict[str, Any], list[str]]] = {
    "missing-client-column": (
        _csv(GOOD.rename(columns={"client": "shop"})),
        {},
        ["data.table.client_column", "column 'client' is not in '{path}'", "shop"],
    ),
    "text-in-numeric-column": (
        _csv(_with(GOOD, 15, "f2", "abc")),
        {},
        ["column 'f2' of '{path}'", "numbers and text", "'abc' (row 15, client 'b')"],
    ),
    "text-in-declared-feature": (
        _csv(_with(GOOD, 30, "f1", "1,5")),
        {"feature_columns": ["f1", "f2"]},
        ["feature column 'f1' of '{path}' is not numeric", "'1,5' (row 30, client 'c')"],
    ),
    "missing-label": (
        _csv(_with(GOOD, 26, "label", np.nan)),
        {},
        ["label column 'label' of '{path}' has missing values", "row 26, client 'c'"],
    ),
    "missing-client-id": (
        _csv(_with(GOOD, 3, "client", np.nan)),
        {},
        ["data.table.client_column", "column 'client' of '{path}' has missing values", "row 3"],
    ),
    "empty-client-id": (
        _parquet(_with(GOOD, 4, "client", "")),
        {},
        ["column 'client' of '{path}' has empty ids", "row 4"],
    ),
    "empty-file": (_bytes("shops.csv", b""), {}, ["'{path}' is empty (0 bytes)"]),
    "header-only-csv": (
        _bytes("shops.csv", b"client,f1,f2,label\n"),
        {},
        ["'{path}' has no rows", "client, f1, f2, label"],
    ),
    "zero-row-parquet": (_parquet(GOOD.iloc[:0]), {}, ["'{path}' has no rows"]),
    "not-a-table-suffix": (
        _bytes("shops.txt", GOOD.to_csv(index=False).encode()),
        {},
        ["'{path}' has suffix '.txt'", "expected .csv or .parquet"],
    ),
    "random-bytes-csv": (_bytes("shops.csv", RANDOM), {}, ["cannot read '{path}' as CSV"]),
    "random-bytes-parquet": (
        _bytes("shops.parquet", RANDOM),
        {},
        ["cannot read '{path}' as Parquet", "truncated or non-Parquet"],
    ),
    "parquet-named-csv": (
        _parquet(GOOD, "shops.csv"),
        {},
        ["'{path}' is named .csv but holds Parquet"],
    ),
    "truncated-parquet": (
        _truncated_parquet,
        {},
        ["cannot read '{path}' as Parquet", "truncated"],
    ),
    "missing-file": (lambda root: root / "nowhere.csv", {}, ["'{path}' does not exist"]),
}


@pytest.mark.parametrize("case", list(FATAL))
def test_a_table_nothing_can_be_made_of_stops_prepare(tmp_path: Path, case: str) -> None:
    build, settings, phrases = FATAL[case]
    path = build(tmp_path)
    before = sha(path) if path.exists() else None
    params = write_params(tmp_path, path, **settings)

    result = fedmtl("data", "prepare", "--params", str(params))

    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    message = " ".join(result.output.split())  # one line, whatever the terminal width
    for phrase in phrases:
        assert phrase.format(path=path) in message, message
    assert (sha(path) if path.exists() else None) == before
    assert not (tmp_path / "raw").exists() and not (tmp_path / "parts").exists()
    assert not leftovers(tmp_path)


# --------------------------------------------------------------------------------------------
# one table, clean clients beside bad ones: every stage exits 0, the bad clients are
# quarantined by validation (or named by a warning) and the clean ones go on


CLEAN = ["c1", "c2", "c3"]
PATH_IDS = ["../x", "/abs/evil", "..\\y", "a/../../b"]


def _mixed_table() -> pd.DataFrame:
    blocks = [block(c, seed=i) for i, c in enumerate(CLEAN)]
    blocks += [
        _with(block("nan-client", seed=11), 2, "f2", np.nan),
        _with(block("inf-client", seed=12), 4, "f1", np.inf),
        _with(block("huge-client", seed=13), 5, "f1", 1e300),
        block("solo", n=1, seed=14),
        block("mono", seed=15, label=0),
        block("Bob", seed=16),
        block("bob", seed=17),
        block("relabelled", seed=18),
        block("emptied", seed=19),
        block("garbled", seed=20),
    ]
    blocks += [block(c, seed=30 + i) for i, c in enumerate(PATH_IDS)]
    return pd.concat(blocks, ignore_index=True)


def _tamper(parts: Path) -> None:
    """Partition files broken between partition and validate (edited, emptied, overwritten)."""
    manifest = read_manifest(parts)
    path = parts / manifest.entry("relabelled").file
    frame = pd.read_parquet(path)
    frame.loc[2, "label"] = 9  # not in the declared classes [0, 1]
    frame.to_parquet(path, index=False)
    path = parts / manifest.entry("emptied").file
    pd.read_parquet(path).iloc[:0].to_parquet(path, index=False)
    (parts / manifest.entry("garbled").file).write_bytes(RANDOM[:100])


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("mixed")
    path = root / "shops.csv"
    _mixed_table().to_csv(path, index=False)
    raw_hash = sha(path)
    params = write_params(root, path)
    out: dict[str, Any] = {"root": root, "path": path, "params": params}
    for stage in ("prepare", "partition"):
        result = fedmtl("data", stage, "--params", str(params))
        out[stage] = result
        assert result.exit_code == 0, result.output
    out["partitioned"] = read_manifest(root / "parts")
    _tamper(root / "parts")
    out["parts_before"] = hashes(root / "parts")
    out["validate"] = fedmtl("data", "validate", "--params", str(params))
    out["parts_after"] = hashes(root / "parts")
    out["raw_hash"] = (raw_hash, sha(path))
    out["report"] = read_report(root / "validation")
    return out


# id -> (client, stage whose output names it, phrases in that output, quarantined?, phrases
#        in the client's validation reasons)
SURVIVABLE: dict[str, tuple[str, str, list[str], bool, list[str]]] = {
    "nan-feature": (
        "nan-client",
        "validate",
        ["quarantined nan-client"],
        True,
        ["client 'nan-client'", "column 'f2'", "are null"],
    ),
    "infinite-feature": (
        "inf-client",
        "validate",
        ["quarantined inf-client"],
        True,
        ["client 'inf-client'", "column 'f1'", "not finite: inf"],
    ),
    "absurdly-large-value": (
        "huge-client",
        "prepare",
        ["beyond float32's range", "column 'f1'", "1e+300", "client 'huge-client'"],
        True,
        ["column 'f1'", "not finite"],
    ),
    "one-row-client": (
        "solo",
        "validate",
        ["quarantined solo"],
        True,
        ["client 'solo'", "1 train rows", "validation.min_train_rows=8"],
    ),
    "single-class-client": (
        "mono",
        "partition",
        ["single class of task 'label'", "'mono' (all 0)"],
        False,
        [],
    ),
    "ids-differing-by-case": (
        "bob",
        "partition",
        ["'Bob' (", "'bob' (", "differ only by case"],
        False,
        [],
    ),
    "path-separator-id": (
        "../x",
        "partition",
        ["not plain file names", "'../x' -> '_x-", "'a/../../b' -> "],
        False,
        [],
    ),
    "label-outside-declared-set": (
        "relabelled",
        "validate",
        ["quarantined relabelled"],
        True,
        ["client 'relabelled'", "column 'label'", "not in the declared set [0, 1]: 9"],
    ),
    "empty-partition": (
        "emptied",
        "validate",
        ["quarantined emptied"],
        True,
        ["client 'emptied'", "0 train rows"],
    ),
    "unreadable-partition-file": (
        "garbled",
        "validate",
        ["quarantined garbled"],
        True,
        ["client 'garbled'", "cannot be read as Parquet"],
    ),
}


@pytest.mark.parametrize("case", list(SURVIVABLE))
def test_a_bad_client_is_named_and_the_others_go_on(mixed: dict[str, Any], case: str) -> None:
    client, stage, phrases, quarantined, reasons = SURVIVABLE[case]
    for step in ("prepare", "partition", "validate"):
        assert mixed[step].exit_code == 0, mixed[step].output
    output = " ".join(mixed[stage].output.split())
    for phrase in phrases:
        assert phrase in output, output
    report = mixed["report"]
    assert client in report.clients
    assert (client in report.quarantined) == quarantined
    text = " | ".join(report.quarantined.get(client, []))
    for phrase in reasons:
        assert phrase in text, text
    assert set(CLEAN) <= set(report.passed)  # the clean clients go on
    raw_before, raw_after = mixed["raw_hash"]
    assert raw_after == raw_before  # the user's table
    assert mixed["parts_after"] == mixed["parts_before"]  # validation never rewrites partitions
    assert not leftovers(mixed["root"])


def test_quarantine_is_exactly_the_bad_clients(mixed: dict[str, Any]) -> None:
    bad = {client for client, _, _, quarantined, _ in SURVIVABLE.values() if quarantined}
    assert set(mixed["report"].quarantined) == bad
    assert set(mixed["report"].passed) == set(mixed["partitioned"].client_ids) - bad
    assert (mixed["root"] / "validation" / REPORT).is_file()


def test_client_ids_never_leave_the_partitions_directory(mixed: dict[str, Any]) -> None:
    root, parts = mixed["root"], mixed["root"] / "parts"
    manifest = mixed["partitioned"]
    files = [parts / entry.file for entry in manifest.clients]
    assert len({f.name.casefold() for f in files}) == len(files)  # apart on any file system
    for f in files:
        assert f.resolve().parent == parts.resolve() and not f.name.startswith(".")
    assert sorted(p.name for p in parts.iterdir()) == sorted([MANIFEST, *(f.name for f in files)])
    assert not (root / "x.parquet").exists() and not (root / "b.parquet").exists()
    assert not Path("/abs/evil.parquet").exists()
    assert set(PATH_IDS) | {"Bob", "bob"} <= set(manifest.client_ids)  # exact ids kept
    for client in [*PATH_IDS, "Bob", "bob"]:
        assert mixed["report"].clients[client].passed, mixed["report"].quarantined.get(client)


# --------------------------------------------------------------------------------------------
# a stage that fails leaves the previous outputs whole


def test_unreadable_prepared_data_leaves_the_old_partitions(tmp_path: Path) -> None:
    path = tmp_path / "shops.csv"
    table("a", "b").to_csv(path, index=False)
    params = write_params(tmp_path, path)
    for stage in ("prepare", "partition"):
        assert fedmtl("data", stage, "--params", str(params)).exit_code == 0
    parts = hashes(tmp_path / "parts")
    raw = tmp_path / "raw" / "raw.parquet"
    raw.write_bytes(raw.read_bytes()[:200])  # a truncated prepared file
    before = sha(raw)

    result = fedmtl("data", "partition", "--params", str(params))

    assert result.exit_code == 2
    message = " ".join(result.output.split())
    assert f"cannot read the prepared data at '{tmp_path / 'raw'}'" in message
    assert sha(raw) == before and hashes(tmp_path / "parts") == parts
    assert not leftovers(tmp_path)


def test_corrupt_manifest_stops_validation(tmp_path: Path) -> None:
    path = tmp_path / "shops.csv"
    table("a", "b").to_csv(path, index=False)
    params = write_params(tmp_path, path)
    for stage in ("prepare", "partition"):
        assert fedmtl("data", stage, "--params", str(params)).exit_code == 0
    manifest = tmp_path / "parts" / MANIFEST
    manifest.write_text(manifest.read_text()[:60])  # cut short
    before = hashes(tmp_path / "parts")

    result = fedmtl("data", "validate", "--params", str(params))

    assert result.exit_code == 2
    message = " ".join(result.output.split())
    assert f"'{manifest}' is not a valid manifest" in message and "fedmtl data partition" in message
    assert hashes(tmp_path / "parts") == before
    assert not (tmp_path / "validation" / REPORT).exists()
    assert not leftovers(tmp_path)


# --------------------------------------------------------------------------------------------
# settings: refused before any flow starts (no Prefect API, nothing written)


@pytest.fixture
def no_prefect(monkeypatch: pytest.MonkeyPatch) -> None:
    """A command that gets as far as starting Prefect's API fails the test instead."""

    class Refused:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise AssertionError("the command went on to start Prefect with bad settings")

    monkeypatch.setattr("flows.startup.ApiStart", Refused)


# id -> (params.yaml, extra arguments after the command, command, phrases)
SETTINGS: dict[str, tuple[str, list[str], str, list[str]]] = {
    "typo-section": (
        "trainig:\n  rounds: 5\n",
        [],
        "train",
        [
            "unknown setting 'trainig'",
            "did you mean 'training'?",
            "allowed sections:",
            "validation",
        ],
    ),
    "typo-key": (
        "training:\n  round: 5\n",
        [],
        "train",
        [
            "unknown setting 'training.round'",
            "did you mean 'training.rounds'?",
            "allowed keys in 'training':",
            "local_epochs",
        ],
    ),
    "typo-override": (
        "",
        ["--set", "data.table.paht=shops.csv"],
        "train",
        ["unknown setting 'data.table.paht'", "did you mean 'data.table.path'?"],
    ),
    "negative-learning-rate": (
        "training:\n  lr: -0.1\n",
        [],
        "train",
        ["setting 'training.lr' = -0.1", "greater than 0"],
    ),
    "zero-rounds": (
        "",
        ["--set", "training.rounds=0"],
        "run",
        ["setting 'training.rounds' = 0", "greater than or equal to 1"],
    ),
    "params-not-yaml": (
        "training: [rounds: 5\n",
        [],
        "train",
        ["parameter file '{params}' is not valid YAML"],
    ),
    "invalid-cron": (
        "",
        ["--cron", "61 * * * *"],
        "schedule",
        ["--cron '61 * * * *' is not a valid schedule"],
    ),
    "invalid-cron-fields": (
        "",
        ["--cron", "0 2 * *"],
        "schedule",
        ["--cron '0 2 * *'", "Invalid cron string"],
    ),
    "invalid-timezone": (
        "",
        ["--cron", "0 2 * * *", "--timezone", "Mars/Olympus"],
        "schedule",
        ["--timezone 'Mars/Olympus' is not a valid schedule"],
    ),
    "unreachable-tracking-uri": (
        "",
        ["--set", "tracking.tracking_uri=http://127.0.0.1:9/"],
        "train",
        ["tracking.tracking_uri = 'http://127.0.0.1:9/'", "cannot be reached", "127.0.0.1:9"],
    ),
    "unreachable-tracking-uri-run": (
        "",
        ["--set", "tracking.tracking_uri=http://127.0.0.1:9"],
        "run",
        ["tracking.tracking_uri = 'http://127.0.0.1:9'", "cannot be reached"],
    ),
}


@pytest.mark.parametrize("case", list(SETTINGS))
def test_bad_settings_stop_before_anything_runs(
    tmp_path: Path, no_prefect: None, case: str
) -> None:
    text, extra, command, phrases = SETTINGS[case]
    work = tmp_path / "work"
    work.mkdir()
    params = tmp_path / "params.yaml"
    params.write_text(text)
    before = sha(params)
    # every path a run would write to lies in `work` (it must stay empty); the case's own
    # arguments come last and win
    args = [a for o in tiny_overrides(work) for a in ("--set", o)]
    started = time.monotonic()
    result = fedmtl(command, "--params", str(params), *args, *extra)
    elapsed = time.monotonic() - started

    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    for phrase in phrases:
        assert phrase.format(params=params) in message, message
    assert elapsed < 15  # fails fast: no MLflow retries, no Prefect server
    assert sha(params) == before
    assert os.listdir(work) == []
    assert not leftovers(tmp_path)
