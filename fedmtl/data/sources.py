"""Data sources: the raw data set before it is split into client partitions.

Four sources, chosen by ``data.source``:

- ``digits``: scikit-learn's bundled 8x8 handwritten digits (no download); no clients yet,
  they are made by a partition scheme (:mod:`fedmtl.data.partitioners`).
- ``synthetic``: FedProx's Synthetic(alpha, beta) (Li et al. 2020), already one set per client;
  ``data.synthetic.n_tasks`` adds label functions (tasks) beside FedProx's one.
- ``table``: the user's own CSV or Parquet file with a column naming each row's client.
- ``har``: UCI HAPT smartphone recordings cut into windows of statistical features, one client
  per user, tasks ``activity`` and ``is_transition`` (:mod:`fedmtl.data.har`; needs
  ``pip install 'fedmtl[har]'``).

Each returns a :class:`RawData`: one frame with the feature columns (float32), one column per
task (label) and, for sources that have clients, the ``client`` and ``group`` columns (str).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedmtl.config import DataConfig, SyntheticConfig, TableConfig
from fedmtl.data.manifest import TaskSpec
from fedmtl.data.raw import DataError, DataWarning, RawData  # noqa: F401 - the sources' types, importable here

#: Columns of the partition contract that a table's features or labels may not be called.
RESERVED_COLUMNS = ("client", "group", "split", "row")
#: Largest number of rows one synthetic client gets (caps the heavy lognormal tail).
MAX_SYNTHETIC_CLIENT_ROWS = 20_000
#: Fewest rows one synthetic client gets (``size_scale`` may shrink the FedProx sizes).
MIN_SYNTHETIC_CLIENT_ROWS = 1
#: Largest magnitude a feature keeps when it is cast to float32 (beyond it: +-inf).
FLOAT32_MAX = float(np.finfo(np.float32).max)
#: Offending values a message quotes at most.
EXAMPLES = 3
#: The first bytes of every Parquet file.
PARQUET_MAGIC = b"PAR1"


def client_ids(n_clients: int) -> list[str]:
    """``c000``, ``c001``, ... zero-padded to width 3, or wider when there are more clients."""
    width = max(3, len(str(n_clients - 1)))
    return [f"c{i:0{width}d}" for i in range(n_clients)]


# --------------------------------------------------------------------------------------------
# digits


def load_digits() -> RawData:
    """scikit-learn's 1,797 8x8 digit images, pixels scaled from 0..16 to [0, 1]."""
    from sklearn.datasets import load_digits as _sk_load_digits

    bunch = _sk_load_digits()
    data = np.asarray(bunch.data, dtype=np.float32) / np.float32(16.0)
    features = [f"x{j}" for j in range(data.shape[1])]
    frame = pd.DataFrame(data, columns=features)
    frame["label"] = np.asarray(bunch.target, dtype=np.int64)
    return RawData(
        frame=frame,
        features=features,
        tasks=[TaskSpec("label", "classification", list(range(10)))],
        feature_range=(0.0, 1.0),
        input_shape=[1, 8, 8],
        has_clients=False,
        true_groups=False,
    )


# --------------------------------------------------------------------------------------------
# synthetic


def synthetic_task_name(task: int) -> str:
    """The label column of synthetic task ``task``: ``label``, ``label_1``, ``label_2``, ..."""
    return "label" if task == 0 else f"label_{task}"


def synthetic_task_classes(task: int, n_classes: int) -> list[int]:
    """Task 1 is binary; every other task has ``n_classes`` classes."""
    return [0, 1] if task == 1 else list(range(n_classes))


def generate_synthetic(cfg: SyntheticConfig, seed: int) -> RawData:
    """FedProx's Synthetic(alpha, beta) (Li et al. 2020, ``generate_synthetic``).

    For client k: u_k ~ N(0, alpha), W_k ~ N(u_k, 1) (classes x features), b_k ~ N(u_k, 1);
    B_k ~ N(0, beta), v_k ~ N(B_k, 1) per feature; x ~ N(v_k, Sigma) with
    Sigma = diag(j^-1.2), j = 1..d; y = argmax(softmax(W_k x + b_k)). Sizes are
    ``int(lognormal(4, 2)) + 50`` times ``cfg.size_scale``, clipped to
    [:data:`MIN_SYNTHETIC_CLIENT_ROWS`, :data:`MAX_SYNTHETIC_CLIENT_ROWS`] (the lognormal tail
    would otherwise give a client millions of rows once in a while). Deterministic in ``seed``.

    ``cfg.n_tasks`` > 1 adds label functions of the same x, each with its own per-client
    weights drawn around the same u_k (so clients differ in the same way in every task):

    - task 1, column ``label_1``, binary (classes [0, 1]): y = 1 if w_k . (x - v_k) + c_k > 0,
      with w_k ~ N(u_k, 1) (features), c_k ~ N(u_k, 1): a random hyperplane through (near)
      the client's own data. It is centred on v_k because w_k . x alone is dominated by
      w_k . v_k, which would give most clients a single class; centred, both classes occur
      in nearly every client, each with its own balance (defaults, seeds 0..3: the minority
      class is 3-50 % of a client's rows, about a third at the median).
    - tasks 2 and 3, columns ``label_2``, ``label_3``: like task 0, y = argmax(W^t_k x + b^t_k)
      over ``n_classes`` classes, with fresh W^t_k ~ N(u_k, 1), b^t_k ~ N(u_k, 1).

    Task t's weights come from their own generator, ``default_rng([seed, t])``, so the data of
    task 0 (features, sizes, ``label``) is bit-identical whatever ``n_tasks`` is, and
    ``label_t`` does not depend on how many tasks follow it.
    """
    rng = np.random.default_rng(seed)
    k, d, c = cfg.n_clients, cfg.n_features, cfg.n_classes
    base_sizes = rng.lognormal(4.0, 2.0, k).astype(np.int64) + 50
    sizes = np.clip(
        (base_sizes * cfg.size_scale).astype(np.int64),
        MIN_SYNTHETIC_CLIENT_ROWS,
        MAX_SYNTHETIC_CLIENT_ROWS,
    )
    mean_w = rng.normal(0.0, cfg.alpha, k)  # u_k (mean of W_k and b_k)
    mean_v = rng.normal(0.0, cfg.beta, k)  # B_k
    v = rng.normal(mean_v[:, None], 1.0, (k, d))  # v_k, the mean of x
    sigma = np.arange(1, d + 1, dtype=np.float64) ** -1.2  # diagonal of Sigma
    extra = range(1, cfg.n_tasks)
    task_rngs = {t: np.random.default_rng([seed, t]) for t in extra}

    ids = client_ids(k)
    xs, ys = [], []
    extra_ys: dict[int, list[np.ndarray]] = {t: [] for t in extra}
    for i in range(k):
        w = rng.normal(mean_w[i], 1.0, (c, d))
        b = rng.normal(mean_w[i], 1.0, c)
        x = v[i] + rng.standard_normal((int(sizes[i]), d)) * np.sqrt(sigma)
        # softmax is monotone, so argmax(softmax(z)) == argmax(z)
        ys.append(np.argmax(x @ w.T + b, axis=1).astype(np.int64))
        xs.append(x.astype(np.float32))
        for t in extra:
            trng = task_rngs[t]
            if t == 1:
                w_t = trng.normal(mean_w[i], 1.0, d)
                c_t = trng.normal(mean_w[i], 1.0)
                extra_ys[t].append(((x - v[i]) @ w_t + c_t > 0).astype(np.int64))
            else:
                w_t = trng.normal(mean_w[i], 1.0, (c, d))
                b_t = trng.normal(mean_w[i], 1.0, c)
                extra_ys[t].append(np.argmax(x @ w_t.T + b_t, axis=1).astype(np.int64))

    features = [f"x{j}" for j in range(d)]
    frame = pd.DataFrame(np.concatenate(xs), columns=features)
    frame.insert(0, "client", pd.Series(np.repeat(ids, sizes), dtype=str))
    frame.insert(1, "group", "0")
    frame["label"] = np.concatenate(ys)
    for t in extra:
        frame[synthetic_task_name(t)] = np.concatenate(extra_ys[t])
    tasks = [
        TaskSpec(synthetic_task_name(t), "classification", synthetic_task_classes(t, c))
        for t in range(cfg.n_tasks)
    ]
    return RawData(
        frame=frame,
        features=features,
        tasks=tasks,
        feature_range=None,
        input_shape=None,
        has_clients=True,
        true_groups=False,
    )


# --------------------------------------------------------------------------------------------
# table


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


def plain_value(value: Any) -> Any:
    """A numpy scalar as the Python value it holds (for messages: ``1e+300``, not
    ``np.float64(1e+300)``)."""
    return value.item() if isinstance(value, np.generic) else value


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
    regression.
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
        if table[name].isna().any():
            raise DataError(
                f"data.table.label_columns: label column '{name}' of '{path}' has missing values "
                f"in {_where(table, table[name].isna(), name, client_col, values=False)}"
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
        if kind == "regression":
            if not pd.api.types.is_numeric_dtype(table[name]):
                raise DataError(
                    f"data.table.task_kinds: regression label column '{name}' of '{path}' is "
                    f"not numeric (dtype {table[name].dtype}): text in "
                    f"{_where(table, _not_numbers(table[name]), name, client_col)}"
                )
            tasks.append(TaskSpec(name, "regression", []))
        else:
            tasks.append(TaskSpec(name, "classification", _classes(table[name], name, path)))

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


def load_source(cfg: DataConfig) -> RawData:
    """Load ``cfg.source``: ``digits``, ``synthetic``, ``table`` or ``har``."""
    if cfg.source == "digits":
        return load_digits()
    if cfg.source == "synthetic":
        return generate_synthetic(cfg.synthetic, cfg.seed)
    if cfg.source == "table":
        return load_table(cfg.table)
    if cfg.source == "har":
        from fedmtl.data.har import load_har  # the har extra's reader: loaded only when used

        return load_har(cfg.har)
    raise DataError(
        f"data.source = {cfg.source!r}; allowed values: digits, synthetic, table, har"
    )
