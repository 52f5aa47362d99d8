"""fedmtl.data.validation: real Great Expectations runs over small hand-written partitions."""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import pytest

from fedmtl.config import ValidationConfig
from fedmtl.data.manifest import ClientEntry, Manifest, TaskSpec, write_manifest
from fedmtl.data.validation import (
    READ_CHECK,
    REPORT,
    ClientValidation,
    ValidationReport,
    read_report,
    usable_clients,
    validate_partitions,
)

FEATURES = [f"f{i}" for i in range(4)]
CLASSES = [0, 1, 2]
N_TRAIN, N_TEST = 10, 4
CFG = ValidationConfig(min_train_rows=8, min_test_rows=3)


def clean_frame(client: str, seed: int = 0) -> pd.DataFrame:
    """A partition that satisfies the contract."""
    rng = np.random.default_rng(seed)
    n = N_TRAIN + N_TEST
    frame = pd.DataFrame(
        {
            "client": client,
            "group": "0",
            "split": ["train"] * N_TRAIN + ["test"] * N_TEST,
            "row": np.arange(seed * 100, seed * 100 + n, dtype="int64"),
        }
    )
    for f in FEATURES:
        frame[f] = rng.random(n).astype("float32")
    frame["label"] = rng.integers(0, len(CLASSES), n).astype("int64")
    return frame


def write_partitions(
    root: Path,
    frames: dict[str, pd.DataFrame | bytes | None],
    feature_range: tuple[float, float] | None = (0.0, 1.0),
) -> Manifest:
    """One Parquet file per client (raw bytes: written as is; None: no file) plus a manifest."""
    root.mkdir(parents=True, exist_ok=True)
    entries = []
    for client, frame in frames.items():
        name = f"{client}.parquet"
        if isinstance(frame, pd.DataFrame):
            frame.to_parquet(root / name, index=False)
        elif isinstance(frame, bytes):
            (root / name).write_bytes(frame)
        entries.append(ClientEntry(client, "0", name, n_train=N_TRAIN, n_test=N_TEST))
    manifest = Manifest(
        source="synthetic",
        scheme="iid",
        features=FEATURES,
        tasks=[TaskSpec(name="label", kind="classification", classes=CLASSES)],
        clients=entries,
        feature_range=feature_range,
    )
    write_manifest(root, manifest)
    return manifest


def _set(column: str, value: Any, at: int = 3) -> Callable[[pd.DataFrame], pd.DataFrame]:
    def apply(frame: pd.DataFrame) -> pd.DataFrame:
        frame.loc[at, column] = value
        return frame

    return apply


# client -> (how its partition is broken, the expectation and column its reason must name)
BROKEN: dict[str, tuple[Callable[[pd.DataFrame], Any], str, str | None]] = {
    "nan-feature": (_set("f2", np.nan), "expect_column_values_to_not_be_null", "f2"),
    "inf-feature": (_set("f1", np.inf), "expect_column_values_to_be_between", "f1"),
    "out-of-range": (_set("f0", 5.0), "expect_column_values_to_be_between", "f0"),
    "bad-label": (_set("label", 7), "expect_column_values_to_be_in_set", "label"),
    "missing-column": (
        lambda f: f.drop(columns=["f3"]),
        "expect_table_columns_to_match_set",
        "f3",
    ),
    "extra-column": (lambda f: f.assign(junk=1.0), "expect_table_columns_to_match_set", "junk"),
    "int-feature": (
        lambda f: f.assign(f1=f["f1"].round().astype("int64")),
        "expect_column_values_to_be_in_type_list",
        "f1",
    ),
    "few-test-rows": (
        lambda f: f.iloc[: N_TRAIN + 1].reset_index(drop=True),
        "expect_table_row_count_to_be_between",
        "split",
    ),
    "wrong-client": (_set("client", "someone-else"), "expect_column_values_to_be_in_set", "client"),
    "bad-split": (_set("split", "validation"), "expect_column_values_to_be_in_set", "split"),
    "missing-file": (lambda f: None, READ_CHECK, None),
    "unreadable-file": (lambda f: b"this is not parquet", READ_CHECK, None),
}
CLEAN = ["clean-a", "clean-b"]


def _digest(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.iterdir())}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One validation of clean and broken clients (one GX run keeps the file fast)."""
    root = tmp_path_factory.mktemp("validation")
    frames: dict[str, pd.DataFrame | bytes | None] = {"clean-a": clean_frame("clean-a", 1)}
    for i, (client, (breaker, _, _)) in enumerate(BROKEN.items()):
        frames[client] = breaker(clean_frame(client, i + 2))
    frames["clean-b"] = clean_frame("clean-b", 99)
    manifest = write_partitions(root / "partitions", frames)
    out = root / "validation"
    (out / "data_docs").mkdir(parents=True)
    (out / "data_docs" / "stale.html").write_text("old")
    (out / "keep.txt").write_text("not ours")
    before = _digest(root / "partitions")
    report = validate_partitions(root / "partitions", manifest, CFG, out)
    return {
        "manifest": manifest,
        "report": report,
        "out": out,
        "root": root,
        "before": before,
        "after": _digest(root / "partitions"),
    }


def test_clean_clients_pass(run: dict[str, Any]) -> None:
    report: ValidationReport = run["report"]
    assert report.passed == CLEAN  # manifest order
    for client in CLEAN:
        assert report.clients[client].failures == []


@pytest.mark.parametrize("client", list(BROKEN))
def test_each_breakage_quarantines_only_its_client(run: dict[str, Any], client: str) -> None:
    report: ValidationReport = run["report"]
    _, expectation, column = BROKEN[client]
    assert set(report.quarantined) == set(BROKEN)
    failures = report.clients[client].failures
    named = [(f["expectation"], f["column"]) for f in failures]
    assert (expectation, column) in named, failures
    reasons = report.quarantined[client]
    hit = [r for r in reasons if expectation in r and (column is None or f"'{column}'" in r)]
    assert hit, reasons
    assert all(f"client '{client}'" in r for r in reasons)


def test_failure_details_name_the_observed_value(run: dict[str, Any]) -> None:
    report: ValidationReport = run["report"]

    def detail(client: str) -> str:
        return " | ".join(f["detail"] for f in report.clients[client].failures)

    assert "nan" in detail("nan-feature") and "null" in detail("nan-feature")
    assert "inf" in detail("inf-feature") and "[0.0, 1.0]" in detail("inf-feature")
    assert "5.0" in detail("out-of-range") and "position" in detail("out-of-range")
    assert "7" in detail("bad-label") and "[0, 1, 2]" in detail("bad-label")
    assert "column 'f3' is missing" in detail("missing-column")
    assert "1 test rows" in detail("few-test-rows")
    assert "min_test_rows=3" in detail("few-test-rows")
    assert "someone-else" in detail("wrong-client")
    assert "dtype is int64" in detail("int-feature")
    assert "missing-file.parquet" in detail("missing-file")
    assert "does not exist" in detail("missing-file")
    assert "unreadable-file.parquet" in detail("unreadable-file")


def test_partition_files_are_never_modified(run: dict[str, Any]) -> None:
    assert run["after"] == run["before"]


def test_report_json_round_trips(run: dict[str, Any]) -> None:
    out: Path = run["out"]
    raw = json.loads((out / REPORT).read_text())
    assert raw["summary"]["n_clients"] == len(BROKEN) + len(CLEAN)
    assert raw["summary"]["passed"] == CLEAN
    assert set(raw["summary"]["quarantined"]) == set(BROKEN)
    assert raw["config"] == {"min_train_rows": 8, "min_test_rows": 3}
    again = read_report(out)
    assert again == run["report"]
    assert again.quarantined == run["report"].quarantined


def test_data_docs_are_built_and_stale_outputs_removed(run: dict[str, Any]) -> None:
    out: Path = run["out"]
    index = out / "data_docs" / "index.html"
    assert index.is_file() and "partition-clean-a" in index.read_text()
    assert not (out / "data_docs" / "stale.html").exists()
    assert (out / "keep.txt").read_text() == "not ours"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp build left


def test_unbounded_features_must_be_finite_and_gx_stays_quiet(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    frames: dict[str, pd.DataFrame | bytes | None] = {
        "a": clean_frame("a", 1).assign(f0=lambda f: f["f0"] * 1e6),  # no declared range
        "b": _set("f3", -np.inf)(clean_frame("b", 2)),
    }
    manifest = write_partitions(tmp_path / "parts", frames, feature_range=None)
    report = validate_partitions(tmp_path / "parts", manifest, CFG, tmp_path / "out")
    assert report.passed == ["a"]
    (failure,) = report.clients["b"].failures
    assert failure["column"] == "f3" and "not finite" in failure["detail"]
    assert "-inf" in failure["detail"]
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""
    assert not [r for r in caplog.records if r.name.startswith("great_expectations")]


def test_read_report_without_a_run_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="fedmtl data validate"):
        read_report(tmp_path)


def _report(passed: dict[str, bool]) -> ValidationReport:
    clients = {}
    for client, ok in passed.items():
        failure = {
            "expectation": "expect_column_values_to_not_be_null",
            "column": "f1",
            "detail": "1 of 14 values are null",
        }
        failures = [] if ok else [failure]
        clients[client] = ClientValidation(client, f"{client}.parquet", ok, failures)
    return ValidationReport(clients)


def _manifest(clients: list[str]) -> Manifest:
    return Manifest(
        source="synthetic",
        scheme="iid",
        features=FEATURES,
        tasks=[TaskSpec(name="label", classes=CLASSES)],
        clients=[ClientEntry(c, "0", f"{c}.parquet", N_TRAIN, N_TEST) for c in clients],
    )


def test_usable_clients_returns_passed_ones_in_manifest_order() -> None:
    manifest = _manifest(["c2", "c0", "c1", "c3"])
    report = _report({"c0": True, "c1": False, "c2": True, "c3": True})
    assert usable_clients(manifest, report, min_clients=3) == ["c2", "c0", "c3"]


def test_usable_clients_raises_when_too_few_remain() -> None:
    manifest = _manifest(["c0", "c1", "c2", "c3"])
    report = _report({"c0": True, "c1": False, "c2": False})  # c3 was never validated
    with pytest.raises(ValueError) as err:
        usable_clients(manifest, report, min_clients=2)
    message = str(err.value)
    assert "only 1 of 4 clients passed" in message and "min_clients=2" in message
    assert "client 'c1': expect_column_values_to_not_be_null failed on column 'f1'" in message
    assert "client 'c2'" in message and "client 'c3'" in message


def test_importing_the_module_does_not_import_great_expectations() -> None:
    code = "import sys, fedmtl.data.validation; print('great_expectations' in sys.modules)"
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(root), "PATH": ""},
    )
    assert done.stdout.strip() == "False"
