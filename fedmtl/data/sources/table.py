"""The ``table`` source: the user's own CSV or Parquet file, read and checked column by column
(every bad value reported with its row and client)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedmtl.config import TableConfig
from fedmtl.data.manifest import TaskSpec
from fedmtl.data.raw import DataError, DataWarning, RawData
from fedmtl.data.sources.common import plain_value


#: Columns of the partition contract that a table's features or labels may not be called.
RESERVED_COLUMNS = ("client", "group", "split", "row")
#: Largest magnitude a feature keeps when it is cast to float32 (beyond it: +-inf).
FLOAT32_MAX = float(np.finfo(np.float32).max)
#: Offending values a message quotes at most.
EXAMPLES = 3
#: The first bytes of every Parquet file.
PARQUET_MAGIC = b"PAR1"


def _read_table(path: Path) -> pd.DataFrame:
    if not path.is_file():
        what = "does not exist" if not path.exists() else "is not a file"
        raise DataError(f"data.table.path: '{path}' {what}")
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".parquet", ".pq"):
        raise DataError(
            f"data.table.path: file '{path}' has suffix '{path.suffix}'; "
            "expected .csv or .parquet"
        )
    with path.open("rb") as fh:
        head = fh.read(len(PARQUET_MAGIC))
    if not head:
        raise DataError(f"data.table.path: file '{path}' is empty (0 bytes)")
    kind = "CSV" if suffix == ".csv" else "Parquet"
    if kind == "CSV" and head == PARQUET_MAGIC:
        raise DataError(
            f"data.table.path: file '{path}' is named .csv but holds Parquet: rename it to .parquet"
        )
    try:
        table = pd.read_csv(path) if kind == "CSV" else pd.read_parquet(path)
    except Exception as exc:  # parser errors of pandas/pyarrow have no common base class
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        hint = " (a truncated or non-Parquet file?)" if kind == "Parquet" else ""
        raise DataError(f"data.table.path: cannot read '{path}' as {kind}{hint}: {first}") from exc
    if len(table) == 0:
        raise DataError(
            f"data.table.path: '{path}' has no rows (columns: {_column_list(table)})"
        )
    if any(name is not None for name in table.index.names):
        return table.reset_index()  # a named index (e.g. a Parquet file's) is a column too
    return table.reset_index(drop=True)


def _column_list(table: pd.DataFrame, limit: int = 20) -> str:
    names = [str(c) for c in table.columns]
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _require_column(table: pd.DataFrame, column: str, setting: str, path: Path) -> None:
    if column not in table.columns:
        raise DataError(
            f"{setting}: column '{column}' is not in '{path}' (columns: {_column_list(table)})"
        )


def _where(
    table: pd.DataFrame,
    mask: pd.Series | np.ndarray,
    column: str,
    client: str | None,
    values: bool = True,
) -> str:
    """How many rows ``mask`` marks, and the first few as ``value (row i, client 'c')``
    (``values=False``: as ``row i, client 'c'``)."""
    rows = np.flatnonzero(np.asarray(mask))
    shown = []
    for i in rows[:EXAMPLES]:
        owner = f", client '{table[client].iloc[i]}'" if client in table.columns else ""
        where = f"row {i}{owner}"
        shown.append(f"{plain_value(table[column].iloc[i])!r} ({where})" if values else where)
    more = ", ..." if len(rows) > EXAMPLES else ""
    return f"{len(rows)} row{'s' if len(rows) != 1 else ''}: {', '.join(shown)}{more}"


def _not_numbers(values: pd.Series) -> pd.Series:
    """A mask of the values that are present but not numbers (text in a numeric column)."""
    try:
        return values.notna() & pd.to_numeric(values, errors="coerce").isna()
    except (TypeError, ValueError):  # nested values (lists, dicts): none of them is a number
        return values.notna()


def _id_column(
    table: pd.DataFrame, column: str, setting: str, path: Path, client: str | None
) -> pd.Series:
    """A client or group column as str; missing or empty ids are an error."""
    _require_column(table, column, setting, path)
    values = table[column]
    missing = values.isna()
    if missing.any():
        raise DataError(
            f"{setting}: column '{column}' of '{path}' has missing values in "
            f"{_where(table, missing, column, client if client != column else None, values=False)}"
        )
    ids = values.astype(str).astype(object)
    empty = ids.str.strip() == ""
    if empty.any():
        raise DataError(
            f"{setting}: column '{column}' of '{path}' has empty ids in "
            f"{_where(table, empty, column, client if client != column else None)}"
        )
    return ids


def _classes(values: pd.Series, column: str, path: Path) -> list[Any]:
    try:
        return sorted(pd.unique(values).tolist())
    except TypeError:
        raise DataError(
            f"data.table.label_columns: column '{column}' of '{path}' mixes value types "
            "that cannot be sorted into classes"
        ) from None


def load_table(cfg: TableConfig) -> RawData:
    """The user's CSV or Parquet file (read only, never modified).

    The client column becomes ``client`` (str), the optional group column ``group`` (str, "0"
    when none is given). Features are ``cfg.feature_columns`` or, by default, every numeric
    column but the client, group and label columns and the reserved names
    :data:`RESERVED_COLUMNS`; they are cast to float32. Labels keep their values; each task is
    a classification (classes: the sorted distinct values) unless ``cfg.task_kinds`` says
    regression. A label column after the first may have missing values: that task is optional
    (clients or rows without its labels train and are scored on the tasks they have).
    """
    if not cfg.path:
        raise DataError("data.table.path must be set when data.source is 'table'")
    path = Path(cfg.path)
    table = _read_table(path)

    client_col = cfg.client_column
    client = _id_column(table, client_col, "data.table.client_column", path, client_col)
    if cfg.group_column is not None:
        group = _id_column(table, cfg.group_column, "data.table.group_column", path, client_col)
    else:
        group = pd.Series("0", index=table.index, dtype=object)

    labels = list(cfg.label_columns)
    if len(set(labels)) != len(labels):
        raise DataError(f"data.table.label_columns: {labels} names a column twice")
    for name in labels:
        _require_column(table, name, "data.table.label_columns", path)
        if name in RESERVED_COLUMNS or name in (cfg.client_column, cfg.group_column):
            raise DataError(
                f"data.table.label_columns: column '{name}' of '{path}' cannot be a label: "
                f"it is the client/group column or a reserved name {RESERVED_COLUMNS}"
            )
        if name == labels[0] and table[name].isna().any():
            raise DataError(
                f"data.table.label_columns: label column '{name}' of '{path}' has missing values "
                f"in {_where(table, table[name].isna(), name, client_col, values=False)}; the "
                "first label column must give every row's label (a later one may lack some: a "
                "task some clients do not have)"
            )
    unknown = sorted(set(cfg.task_kinds) - set(labels))
    if unknown:
        raise DataError(
            f"data.table.task_kinds: {unknown} are not label columns (label_columns: {labels})"
        )

    not_features = {cfg.client_column, cfg.group_column, *labels, *RESERVED_COLUMNS}
    if cfg.feature_columns is not None:
        features = list(cfg.feature_columns)
        for name in features:
            _require_column(table, name, "data.table.feature_columns", path)
            if name in not_features:
                raise DataError(
                    f"data.table.feature_columns: column '{name}' of '{path}' cannot be a "
                    f"feature: it is the client/group column, a label or a reserved name "
                    f"{RESERVED_COLUMNS}"
                )
            if not pd.api.types.is_numeric_dtype(table[name]):
                raise DataError(
                    f"data.table.feature_columns: feature column '{name}' of '{path}' is not "
                    f"numeric (dtype {table[name].dtype}): text in "
                    f"{_where(table, _not_numbers(table[name]), name, client_col)}"
                )
    else:
        features = []
        for name in table.columns:
            if name in not_features:
                continue
            if pd.api.types.is_numeric_dtype(table[name]):
                features.append(str(name))
                continue
            kind = pd.api.types
            if not (kind.is_object_dtype(table[name]) or kind.is_string_dtype(table[name])):
                continue  # dates, categories: not features
            text = _not_numbers(table[name])
            if text.any() and (table[name].notna() & ~text).any():  # a typo, not a text column
                raise DataError(
                    f"data.table.feature_columns: column '{name}' of '{path}' holds numbers and "
                    f"text; not a number in {_where(table, text, name, client_col)}. Fix those "
                    "values, or list the feature columns in data.table.feature_columns without it"
                )
    if not features:
        raise DataError(
            f"data.table.feature_columns: '{path}' has no numeric feature columns besides the "
            f"client, group and label columns"
        )

    tasks: list[TaskSpec] = []
    for name in labels:
        kind = cfg.task_kinds.get(name, "classification")
        optional = bool(table[name].isna().any())  # rows (or whole clients) without this task
        if kind == "regression":
            if not pd.api.types.is_numeric_dtype(table[name]):
                raise DataError(
                    f"data.table.task_kinds: regression label column '{name}' of '{path}' is "
                    f"not numeric (dtype {table[name].dtype}): text in "
                    f"{_where(table, _not_numbers(table[name]), name, client_col)}"
                )
            tasks.append(TaskSpec(name, "regression", [], optional=optional))
        else:
            classes = _classes(table[name].dropna(), name, path)
            tasks.append(TaskSpec(name, "classification", classes, optional=optional))

    groups_per_client = group.groupby(client).nunique()
    mixed = groups_per_client[groups_per_client > 1]
    if len(mixed):
        raise DataError(
            f"data.table.group_column: column '{cfg.group_column}' of '{path}' gives client "
            f"'{mixed.index[0]}' more than one group"
        )

    frame = pd.DataFrame({"client": client.to_numpy(), "group": group.to_numpy()})
    frame = frame.astype({"client": str, "group": str})
    _warn_float32_overflow(table, features, path, client_col)
    with np.errstate(over="ignore"):  # overflow was just reported, per column and client
        feats = table[features].to_numpy(dtype=np.float32)
    frame = pd.concat([frame, pd.DataFrame(feats, columns=features)], axis=1)
    for name in labels:
        frame[name] = table[name]
    return RawData(
        frame=frame,
        features=features,
        tasks=tasks,
        feature_range=None,
        input_shape=None,
        has_clients=True,
        true_groups=cfg.group_column is not None,
    )


def _warn_float32_overflow(
    table: pd.DataFrame, features: list[str], path: Path, client: str
) -> None:
    """A :class:`DataWarning` for finite feature values that float32 cannot hold (they become
    +-inf in the prepared data, so validation quarantines their clients)."""
    parts = []
    for name in features:
        values = table[name].to_numpy(dtype=np.float64)
        with np.errstate(invalid="ignore"):
            beyond = np.isfinite(values) & (np.abs(values) > FLOAT32_MAX)
        if beyond.any():
            parts.append(f"column '{name}': {_where(table, beyond, name, client)}")
    if parts:
        warnings.warn(
            DataWarning(
                f"data.table: '{path}' has feature values beyond float32's range "
                f"(+-{FLOAT32_MAX:.3g}); they become +-inf and validation will quarantine their "
                f"clients: {'; '.join(parts)}"
            ),
            stacklevel=3,
        )
