"""The Great Expectations side: one ephemeral Data Context (:class:`_GxRun`) with the contract
and values suites, their runs, and the failures read back from GX's results. GX is imported
only when a run starts."""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedmtl.data.manifest import SPLITS, Manifest
from fedmtl.data.validation.expectations import (FINITE_MAX, FLOAT_TYPES, INT_TYPES,
                                                 _column_kinds, _generic_detail, _value_problem)
from fedmtl.data.validation.report import ClientValidation, _failure

if TYPE_CHECKING:
    import pandas as pd

    from fedmtl.config import ValidationConfig


_SITE = "fedmtl"
_DATASOURCE = "fedmtl-partitions"
_CONTRACT_SUITE = "fedmtl-partition-contract"
_VALUES_SUITE = "fedmtl-partition-values"
_VALUES_ASSET = "all-partitions"
_RUN_NAME = "fedmtl-data-validate"
_CLIENT_PARAM = "client_ids"
_EXAMPLES = 5
_DTYPE_CHECKS = ("expect_column_values_to_be_of_type", "expect_column_values_to_be_in_type_list")


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
        optional = {t.name for t in self.manifest.tasks if t.optional}  # labels may be missing
        exps: list[Any] = [
            gxe.ExpectColumnValuesToNotBeNull(column=c) for c in self.columns if c not in optional
        ]
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
