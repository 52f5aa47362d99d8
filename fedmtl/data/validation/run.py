"""Running a validation (:func:`validate_partitions`): reading each partition file once (its
digest taken from the very bytes validated), running the GX suites, writing ``report.json``
and the Data Docs in place of an earlier run's."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from fedmtl.data.manifest import (Manifest, PartitionDigest, UnsafeManifest, atomic_write_bytes,
                                  partition_path)
from fedmtl.data.validation.gx import _GxRun, _quiet
from fedmtl.data.validation.report import (DATA_DOCS, READ_CHECK, REPORT, ClientValidation,
                                           ValidationReport, _failure, manifest_digest)

if TYPE_CHECKING:
    import pandas as pd

    from fedmtl.config import ValidationConfig


_STALE_DOCS_PREFIX = f".{DATA_DOCS}."


def validate_partitions(
    partitions_dir: str | Path,
    manifest: Manifest,
    cfg: ValidationConfig,
    out_dir: str | Path,
) -> ValidationReport:
    """Validate every client's partition file; write ``report.json`` and Data Docs to ``out_dir``.

    A missing or unreadable file fails its client (the reason names the file); nothing raises
    for bad data. Files are never modified.
    """
    partitions_dir, out_dir = Path(partitions_dir), Path(out_dir)
    _remove_previous_outputs(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    results: dict[str, ClientValidation] = {}
    frames: dict[str, pd.DataFrame] = {}
    for entry in manifest.clients:
        path = partitions_dir / entry.file
        frame, error, digest = _read_partition(partitions_dir, entry.client, entry.file)
        results[entry.client] = ClientValidation(entry.client, str(path), passed=False)
        if digest is not None:
            results[entry.client].sha256, results[entry.client].size = digest
        if frame is None:
            results[entry.client].failures.append(_failure(READ_CHECK, None, error))
        else:
            frames[entry.client] = frame

    docs_tmp = out_dir / f"{_STALE_DOCS_PREFIX}building"  # swapped in once complete
    docs_tmp.mkdir()
    try:
        with _quiet():
            _GxRun(manifest, cfg, docs_tmp).validate(frames, results)
        docs = out_dir / DATA_DOCS
        shutil.rmtree(docs, ignore_errors=True)
        os.replace(docs_tmp, docs)
    finally:
        shutil.rmtree(docs_tmp, ignore_errors=True)

    for v in results.values():
        v.passed = not v.failures
    report = ValidationReport(clients=results, manifest_sha256=manifest_digest(manifest))
    payload = report.to_dict()
    payload["config"] = {"min_train_rows": cfg.min_train_rows, "min_test_rows": cfg.min_test_rows}
    payload["data_docs"] = f"{DATA_DOCS}/index.html"
    payload["great_expectations_version"] = _gx_version()
    atomic_write_bytes(out_dir / REPORT, (json.dumps(payload, indent=2) + "\n").encode())
    return report


def _read_partition(
    partitions_dir: Path, client: str, file: str
) -> tuple[pd.DataFrame | None, str, PartitionDigest | None]:
    """The partition as a dataframe, or None and why it could not be read; and the digest of
    the bytes read (the very bytes validated: the file is read once)."""
    import pandas as pd

    path = partitions_dir / file
    try:
        path = partition_path(partitions_dir, client, file)
    except (OSError, UnsafeManifest) as exc:  # a symbolic link leaving the folder
        return None, str(exc).removeprefix(f"client '{client}': "), None
    if not path.is_file():
        return None, f"partition file '{path}' does not exist", None
    try:
        raw = path.read_bytes()
    except OSError as exc:
        return None, f"partition file '{path}' cannot be read: {exc.strerror or exc}", None
    digest = PartitionDigest.of(raw)
    try:
        return pd.read_parquet(io.BytesIO(raw)), "", digest
    except Exception as exc:  # noqa: BLE001 - any read error quarantines the client
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return None, f"partition file '{path}' cannot be read as Parquet: {message}", digest


def _remove_previous_outputs(out_dir: Path) -> None:
    """Delete what an earlier run wrote (report, Data Docs, leftovers); nothing else."""
    if not out_dir.is_dir():
        return
    (out_dir / REPORT).unlink(missing_ok=True)
    shutil.rmtree(out_dir / DATA_DOCS, ignore_errors=True)
    for leftover in out_dir.glob(f"{_STALE_DOCS_PREFIX}*"):
        shutil.rmtree(leftover, ignore_errors=True)


def _gx_version() -> str:
    import great_expectations as gx

    return str(gx.__version__)
