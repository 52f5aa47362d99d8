"""Validate partition files against the data contract with Great Expectations (GX Core 1.x).

Every client in the manifest is checked in one ephemeral GX Data Context:

- a **contract** suite, run once per partition (one dataframe asset and validation definition
  per client): the contract's columns and no others, each column's dtype, ``client`` equal to
  the file's client, and at least ``min_train_rows`` / ``min_test_rows`` rows per split;
- a **values** suite, run once over one batch holding every partition whose columns and dtypes
  passed: no nulls anywhere, features finite (inside ``Manifest.feature_range`` when declared),
  ``split`` in {train, test}, ``row`` >= 0, classification labels in the declared classes and
  regression labels finite. Each row of that batch is labelled ``<client>#<position>``, so every
  unexpected value GX reports is traced back to its client and file position.

Running the per-value checks once over all partitions instead of once per partition keeps
the whole validation to a few seconds: GX's cost is per expectation, not per row.

A client fails when its file is missing or unreadable (or a symbolic link leaving the
partitions folder) or when any expectation fails; failed clients are *quarantined*: recorded in
``report.json`` so that training skips them. Partition files are only read, never moved or
rewritten. ``<out_dir>/data_docs/`` holds GX's Data Docs site for the run.

Validation is bound to what trains: the report records the SHA-256 and size of every file it
read (of the very bytes it validated) and the SHA-256 of the manifest it validated against.
:func:`bind_partitions` (the training flow, before its first round) refuses a manifest changed
since, and quarantines every client whose file is no longer the one validated; the digests go
to :class:`fedmtl.federation.Federation`, whose every read of a partition checks them again
(:func:`fedmtl.client.data.load_client_data`), so a file changed mid-run is caught too.

Great Expectations is imported lazily (it takes seconds), so importing this module is cheap.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedmtl.data.manifest import (SPLITS, Manifest, PartitionDigest, TaskSpec, UnsafeManifest,
                                  atomic_write_bytes, file_digest, partition_path)

if TYPE_CHECKING:
    import pandas as pd

    from fedmtl.config import ValidationConfig

REPORT = "report.json"
DATA_DOCS = "data_docs"
READ_CHECK = "read_partition_file"  # the failure of a missing or unreadable file
CHANGED_CHECK = "partition_file_unchanged"  # a file changed after validation (bind_partitions)
STRING_COLUMNS = ("client", "group", "split")
INT_TYPES = ("int64", "int32", "int16", "int8", "uint64", "uint32", "uint16", "uint8")
FLOAT_TYPES = ("float32", "float64")
FINITE_MAX = sys.float_info.max  # |x| <= this  <=>  x is finite (NaN is caught as a null)

_SITE = "fedmtl"
_DATASOURCE = "fedmtl-partitions"
_CONTRACT_SUITE = "fedmtl-partition-contract"
_VALUES_SUITE = "fedmtl-partition-values"
_VALUES_ASSET = "all-partitions"
_RUN_NAME = "fedmtl-data-validate"
_CLIENT_PARAM = "client_ids"
_EXAMPLES = 5
_DTYPE_CHECKS = ("expect_column_values_to_be_of_type", "expect_column_values_to_be_in_type_list")
_STALE_DOCS_PREFIX = f".{DATA_DOCS}."


# ---------------------------------------------------------------------------------------------
# Report model


@dataclass
class ClientValidation:
    """The outcome for one client: its partition file and every failed check."""

    client: str
    file: str
    passed: bool
    failures: list[dict[str, Any]] = field(default_factory=list)
    # each failure: {"expectation": GX type name, "column": str | None, "detail": str}
    sha256: str | None = None  # of the bytes validated (None: the file could not be read)
    size: int | None = None

    @property
    def digest(self) -> PartitionDigest | None:
        return None if self.sha256 is None or self.size is None else PartitionDigest(self.sha256, self.size)

    @property
    def reasons(self) -> list[str]:
        """One line per failure naming the client, the expectation and the column."""
        out = []
        for f in self.failures:
            where = f" on column '{f['column']}'" if f.get("column") else ""
            out.append(f"client '{self.client}': {f['expectation']} failed{where}: {f['detail']}")
        return out


@dataclass
class ValidationReport:
    """Every validated client, in manifest order, and the manifest's SHA-256
    (:func:`manifest_digest`) it was validated against."""

    clients: dict[str, ClientValidation]
    manifest_sha256: str | None = None

    @property
    def passed(self) -> list[str]:
        return [c for c, v in self.clients.items() if v.passed]

    @property
    def quarantined(self) -> dict[str, list[str]]:
        """client -> reasons, for every client that failed validation."""
        return {c: v.reasons for c, v in self.clients.items() if not v.passed}

    @property
    def changed(self) -> dict[str, str]:
        """client -> why, for the clients quarantined by :func:`bind_partitions` (their files
        changed, or went missing, after validation)."""
        return {c: f["detail"] for c, v in self.clients.items() for f in v.failures
                if f.get("expectation") == CHANGED_CHECK}

    def to_dict(self) -> dict[str, Any]:
        return {
            "manifest_sha256": self.manifest_sha256,
            "summary": {
                "n_clients": len(self.clients),
                "n_passed": len(self.passed),
                "n_quarantined": len(self.clients) - len(self.passed),
                "passed": self.passed,
                "quarantined": self.quarantined,
            },
            "clients": {c: asdict(v) for c, v in self.clients.items()},
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ValidationReport:
        return cls(clients={c: ClientValidation(**v) for c, v in raw["clients"].items()},
                   manifest_sha256=raw.get("manifest_sha256"))


def _failure(expectation: str, column: str | None, detail: str) -> dict[str, Any]:
    return {"expectation": expectation, "column": column, "detail": detail}


# ---------------------------------------------------------------------------------------------
# Public API


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


def read_report(out_dir: str | Path) -> ValidationReport:
    """The report written by :func:`validate_partitions` into ``out_dir``."""
    path = Path(out_dir) / REPORT
    if not path.exists():
        raise FileNotFoundError(
            f"no validation report at '{path}': run `fedmtl data validate` first"
        )
    return ValidationReport.from_dict(json.loads(path.read_text()))


def manifest_digest(manifest: Manifest) -> str:
    """The SHA-256 of the manifest's canonical JSON (what validation checked the files against)."""
    return hashlib.sha256(manifest.to_json().encode()).hexdigest()


def bind_partitions(
    partitions_dir: str | Path, manifest: Manifest, report: ValidationReport
) -> tuple[ValidationReport, dict[str, PartitionDigest]]:
    """Bind training to what was validated. Refuses (``ValueError``) a manifest that is not the
    one validated, and a report that records no digests (written before they were recorded).
    Returns the report with every passed client whose file is no longer the one validated
    (missing, unreadable, or another SHA-256 or size) quarantined, its reason naming the client
    and the file, and the digests of the clients that still pass, for the federation to check
    on every read. Each file is hashed once per version (:func:`fedmtl.data.manifest.file_digest`)."""
    import dataclasses

    if report.manifest_sha256 is None:
        raise ValueError("the validation report records no partition hashes (written by an older "
                         "fedmtl): re-run `fedmtl data validate`")
    if report.manifest_sha256 != manifest_digest(manifest):
        raise ValueError(f"'{Path(partitions_dir) / 'manifest.json'}' changed after validation (its SHA-256 "
                         f"is not the validated {report.manifest_sha256[:12]}…): re-run `fedmtl data validate`")
    clients = dict(report.clients)
    digests: dict[str, PartitionDigest] = {}
    for entry in manifest.clients:
        v = clients.get(entry.client)
        if v is None or not v.passed:
            continue
        expected = v.digest
        if expected is None:
            problem = "the validation report records no hash of it: re-run `fedmtl data validate`"
        else:
            problem = _file_problem(partitions_dir, entry.client, entry.file, expected)
        if problem is None:
            digests[entry.client] = expected
        else:
            clients[entry.client] = dataclasses.replace(
                v, passed=False, failures=[*v.failures, _failure(CHANGED_CHECK, None, problem)])
    return dataclasses.replace(report, clients=clients), digests


def _file_problem(partitions_dir: str | Path, client: str, file: str, expected: PartitionDigest) -> str | None:
    path = Path(partitions_dir) / file
    try:
        path = partition_path(partitions_dir, client, file)
        if path.stat().st_size != expected.size:
            now = f"{path.stat().st_size} bytes"
        else:
            digest = file_digest(path)
            if digest == expected:
                return None
            now = f"SHA-256 {digest.sha256[:12]}…"
    except FileNotFoundError:
        return f"partition file '{path}' is missing (it was validated)"
    except (OSError, UnsafeManifest) as exc:
        return f"partition file '{path}' cannot be read: {exc}"
    return (f"partition file '{path}' changed after validation ({now}; validated SHA-256 "
            f"{expected.sha256[:12]}…, {expected.size} bytes): re-run `fedmtl data validate`")


def usable_clients(manifest: Manifest, report: ValidationReport, min_clients: int) -> list[str]:
    """The clients that passed validation, in manifest order; at least ``min_clients`` of them.

    A manifest client missing from the report (a stale report) counts as not passed.
    """
    passed = set(report.passed)
    usable = [c for c in manifest.client_ids if c in passed]
    if len(usable) >= min_clients:
        return usable
    lines = []
    for client in manifest.client_ids:
        if client in passed:
            continue
        entry = report.clients.get(client)
        if entry is None:
            lines.append(f"client '{client}': not in the validation report (re-run validation)")
        else:
            reasons = entry.reasons or [f"client '{client}': failed validation"]
            more = f" (+{len(reasons) - 1} more)" if len(reasons) > 1 else ""
            lines.append(reasons[0] + more)
    raise ValueError(
        f"only {len(usable)} of {len(manifest.clients)} clients passed data validation, "
        f"fewer than training.min_clients={min_clients}; quarantined clients:\n  "
        + "\n  ".join(lines)
    )


# ---------------------------------------------------------------------------------------------
# Files and outputs


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


# ---------------------------------------------------------------------------------------------
# Great Expectations


@contextmanager
def _quiet() -> Iterator[None]:
    """No GX analytics, warnings or INFO logs while GX runs (progress bars are off in config)."""
    os.environ["GX_ANALYTICS_ENABLED"] = "false"
    logger = logging.getLogger("great_expectations")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _column_kinds(manifest: Manifest) -> dict[str, str | None]:
    """Every contract column -> its dtype kind: "str", "int", "float" or None (unchecked)."""
    kinds: dict[str, str | None] = {c: "str" for c in STRING_COLUMNS}
    kinds["row"] = "int"
    kinds.update({f: "float" for f in manifest.features})
    kinds.update({t.name: _label_kind(t) for t in manifest.tasks})
    return kinds


def _label_kind(task: TaskSpec) -> str | None:
    if task.kind != "classification":
        return "float"
    classes = task.classes
    if classes and all(isinstance(c, int) and not isinstance(c, bool) for c in classes):
        return "int"
    if classes and all(isinstance(c, str) for c in classes):
        return "str"
    if classes and all(isinstance(c, float) for c in classes):
        return "float"
    return None  # a mixed or empty class list: only the value set is checked


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text) or "_"


class _GxRun:
    """One ephemeral GX Data Context validating one manifest's partitions."""

    def __init__(self, manifest: Manifest, cfg: ValidationConfig, docs_dir: Path) -> None:
        import great_expectations as gx
        import great_expectations.expectations as gxe
        from great_expectations.core.run_identifier import RunIdentifier
        from great_expectations.data_context.types.base import (
            DataContextConfig,
            InMemoryStoreBackendDefaults,
            ProgressBarsConfig,
        )

        self.gx, self.gxe = gx, gxe
        self.manifest, self.cfg = manifest, cfg
        self.kinds = _column_kinds(manifest)
        self.columns = list(self.kinds)
        site = {
            "class_name": "SiteBuilder",
            "show_how_to_buttons": False,
            "store_backend": {
                "class_name": "TupleFilesystemStoreBackend",
                "base_directory": str(docs_dir.resolve()),
            },
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        }
        project = DataContextConfig(
            store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
            analytics_enabled=False,
            progress_bars=ProgressBarsConfig(globally=False, metric_calculations=False),
            data_docs_sites={_SITE: site},
        )
        self.context = gx.get_context(mode="ephemeral", project_config=project)
        self.datasource = self.context.data_sources.add_pandas(_DATASOURCE)
        self.run_id = RunIdentifier(run_name=_RUN_NAME, run_time=datetime.now(timezone.utc))

    # -- suites --------------------------------------------------------------------------------

    def _dtype_expectation(self, column: str, kind: str) -> Any:
        gxe, meta = self.gxe, {"column": column}
        if kind == "str":  # pandas 3 "str" dtype (and object columns holding str values)
            return gxe.ExpectColumnValuesToBeOfType(column=column, type_="str", meta=meta)
        types = list(INT_TYPES if kind == "int" else FLOAT_TYPES)
        return gxe.ExpectColumnValuesToBeInTypeList(column=column, type_list=types, meta=meta)

    def contract_suite(self) -> Any:
        """Per-partition checks: columns, dtypes, client identity, rows per split."""
        gxe = self.gxe
        from great_expectations.expectations.row_conditions import Column

        exps: list[Any] = [
            gxe.ExpectTableColumnsToMatchSet(column_set=self.columns, exact_match=True)
        ]
        exps += [self._dtype_expectation(c, k) for c, k in self.kinds.items() if k is not None]
        exps.append(
            gxe.ExpectColumnValuesToBeInSet(
                column="client",
                value_set={"$PARAMETER": _CLIENT_PARAM},
                meta={"column": "client"},
            )
        )
        minimum = {"train": self.cfg.min_train_rows, "test": self.cfg.min_test_rows}
        for split in SPLITS:
            exps.append(
                gxe.ExpectTableRowCountToBeBetween(
                    min_value=minimum[split],
                    row_condition=Column("split") == split,
                    meta={"column": "split", "split": split},
                )
            )
        return self._suite(_CONTRACT_SUITE, exps)

    def values_suite(self) -> Any:
        """Per-value checks, run once over every partition that passed its column/dtype checks."""
        gxe = self.gxe
        exps: list[Any] = [gxe.ExpectColumnValuesToNotBeNull(column=c) for c in self.columns]
        exps.append(gxe.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS)))
        exps.append(gxe.ExpectColumnValuesToBeBetween(column="row", min_value=0))
        lo, hi = self.manifest.feature_range or (-FINITE_MAX, FINITE_MAX)
        exps += [
            gxe.ExpectColumnValuesToBeBetween(column=f, min_value=float(lo), max_value=float(hi))
            for f in self.manifest.features
        ]
        for task in self.manifest.tasks:
            if task.kind == "classification":
                exps.append(
                    gxe.ExpectColumnValuesToBeInSet(column=task.name, value_set=list(task.classes))
                )
            else:
                exps.append(
                    gxe.ExpectColumnValuesToBeBetween(
                        column=task.name, min_value=-FINITE_MAX, max_value=FINITE_MAX
                    )
                )
        return self._suite(_VALUES_SUITE, exps)

    def _suite(self, name: str, expectations: list[Any]) -> Any:
        return self.context.suites.add(
            self.gx.ExpectationSuite(name=name, expectations=expectations)
        )

    def _run(self, name: str, asset: str, suite: Any, frame: pd.DataFrame, **kwargs: Any) -> Any:
        batch = self.datasource.add_dataframe_asset(asset).add_batch_definition_whole_dataframe(
            "whole"
        )
        vd = self.context.validation_definitions.add(
            self.gx.ValidationDefinition(name=name, data=batch, suite=suite)
        )
        return vd.run(batch_parameters={"dataframe": frame}, run_id=self.run_id, **kwargs)

    # -- the run -------------------------------------------------------------------------------

    def validate(
        self, frames: dict[str, pd.DataFrame], results: dict[str, ClientValidation]
    ) -> None:
        """Run both suites, add every failure to ``results``, build the Data Docs site."""
        import pandas as pd

        contract = self.contract_suite()
        well_formed: list[str] = []
        used_assets: set[str] = set()
        for client, frame in frames.items():
            asset = _safe_name(f"partition-{client}")
            while asset in used_assets:
                asset += "_"
            used_assets.add(asset)
            outcome = self._run(
                f"contract:{asset}",
                asset,
                contract,
                frame,
                expectation_parameters={_CLIENT_PARAM: [client]},
                result_format="SUMMARY",
            )
            failures, ok = self._contract_failures(outcome)
            results[client].failures.extend(failures)
            if ok:
                well_formed.append(client)

        if well_formed:
            owner: dict[str, tuple[str, int]] = {}
            parts = []
            for client in well_formed:
                frame = frames[client][self.columns]
                labels = [f"{client}#{i}" for i in range(len(frame))]
                owner.update({label: (client, i) for i, label in enumerate(labels)})
                parts.append(frame.set_axis(labels, axis=0))
            batch = pd.concat(parts)
            outcome = self._run(
                "values:all-partitions",
                _VALUES_ASSET,
                self.values_suite(),
                batch,
                result_format={"result_format": "COMPLETE", "include_unexpected_rows": False},
            )
            sizes = {c: len(frames[c]) for c in well_formed}
            for client, failure in self._value_failures(outcome, batch, owner, sizes):
                results[client].failures.append(failure)

        self.context.build_data_docs(site_names=[_SITE])

    # -- reading GX results --------------------------------------------------------------------

    def _contract_failures(self, outcome: Any) -> tuple[list[dict[str, Any]], bool]:
        """Failures of one partition's contract run, and whether its values can be checked."""
        missing: set[str] = set()
        failures: list[dict[str, Any]] = []
        ok = True
        for er in outcome.results:
            if er.success:
                continue
            config = er.expectation_config
            kind, kwargs, meta = config.type, config.kwargs, config.meta or {}
            result = er.result or {}
            column = meta.get("column", kwargs.get("column"))
            if kind == "expect_table_columns_to_match_set":
                mismatch = (result.get("details") or {}).get("mismatched") or {}
                missing = set(mismatch.get("missing") or [])
                ok = ok and not missing and bool(mismatch)  # extra columns are left out later
                for c in mismatch.get("missing") or []:
                    failures.append(_failure(kind, c, f"column '{c}' is missing"))
                for c in mismatch.get("unexpected") or []:
                    detail = f"unexpected column '{c}' (not in the contract)"
                    failures.append(_failure(kind, c, detail))
                if not mismatch:
                    failures.append(_failure(kind, None, _generic_detail(er)))
                continue
            if column in missing:
                continue  # already reported as a missing column
            if kind in _DTYPE_CHECKS:
                ok = False
                expected = kwargs.get("type_") or kwargs.get("type_list")
                observed = result.get("observed_value")
                detail = (
                    f"dtype is {observed}, expected {expected}"
                    if observed is not None
                    else _generic_detail(er)
                )
                failures.append(_failure(kind, column, detail))
            elif kind == "expect_table_row_count_to_be_between":
                split = meta.get("split")
                observed = result.get("observed_value")
                detail = (
                    f"{observed} {split} rows, fewer than validation.min_{split}_rows="
                    f"{kwargs.get('min_value')}"
                    if observed is not None
                    else _generic_detail(er)
                )
                failures.append(_failure(kind, column, detail))
            elif kind == "expect_column_values_to_be_in_set" and column == "client":
                if "unexpected_count" in result:
                    seen = sorted({str(v) for v in result.get("partial_unexpected_list") or []})
                    detail = (
                        f"{result['unexpected_count']} of {result.get('element_count')} rows "
                        f"name another client: {seen[:_EXAMPLES]}, "
                        f"expected {kwargs.get('value_set')}"
                    )
                else:
                    detail = _generic_detail(er)
                failures.append(_failure(kind, column, detail))
            else:
                failures.append(_failure(kind, column, _generic_detail(er)))
        return failures, ok

    def _value_failures(
        self,
        outcome: Any,
        batch: pd.DataFrame,
        owner: dict[str, tuple[str, int]],
        sizes: dict[str, int],
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """(client, failure) for every client with unexpected values, traced by row label."""
        for er in outcome.results:
            if er.success:
                continue
            config = er.expectation_config
            kind, kwargs = config.type, config.kwargs
            column = kwargs.get("column")
            labels = (er.result or {}).get("unexpected_index_list")
            if not labels:  # the check itself broke: every partition in the batch fails it
                for client in sizes:
                    yield client, _failure(kind, column, _generic_detail(er))
                continue
            by_client: dict[str, list[str]] = {}
            for label in labels:
                by_client.setdefault(owner[str(label)][0], []).append(str(label))
            for client, mine in by_client.items():
                values = batch.loc[mine[:_EXAMPLES], column].tolist()
                positions = [owner[label][1] for label in mine[:_EXAMPLES]]
                what = _value_problem(kind, kwargs)
                more = ", ..." if len(mine) > _EXAMPLES else ""
                rows = ""
                if column != "row":  # the rows' ids in the prepared data (a table's: its rows)
                    ids = batch.loc[mine[:_EXAMPLES], "row"].tolist()
                    many = "rows" if len(mine) > 1 else "row"
                    rows = f"; {many} {', '.join(map(str, ids))}{more} of the prepared data"
                detail = (
                    f"{len(mine)} of {sizes[client]} values {what}: "
                    f"{', '.join(repr(v) for v in values)}{more} "
                    f"(file positions {', '.join(map(str, positions))}{more}{rows})"
                )
                yield client, _failure(kind, column, detail)


def _value_problem(kind: str, kwargs: dict[str, Any]) -> str:
    if kind == "expect_column_values_to_not_be_null":
        return "are null"
    if kind == "expect_column_values_to_be_in_set":
        return f"are not in the declared set {list(kwargs.get('value_set') or [])}"
    if kind == "expect_column_values_to_be_between":
        lo, hi = kwargs.get("min_value"), kwargs.get("max_value")
        if lo == -FINITE_MAX and hi == FINITE_MAX:
            return "are not finite"
        if hi is None:
            return f"are below {lo}"
        return f"are outside [{lo}, {hi}]"
    return "are unexpected"


def _generic_detail(er: Any) -> str:
    """The observed value of a failed expectation, or the error it raised."""
    info = er.exception_info or {}
    if not info.get("raised_exception") and info:
        # several metric errors are keyed by metric id
        nested = [v for v in info.values() if isinstance(v, dict) and v.get("raised_exception")]
        info = nested[0] if nested else info
    if info.get("raised_exception"):
        message = str(info.get("exception_message") or "unknown error").strip().splitlines()[0]
        return f"the check raised an error: {message}"
    observed = (er.result or {}).get("observed_value")
    if observed is not None:
        return f"observed {observed!r}"
    return f"failed with result {er.result!r}"
