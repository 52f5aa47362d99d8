"""What every data source returns (:class:`RawData`) and how it reports bad data
(:class:`DataError`, :class:`DataWarning`): the types a source module needs, so that sources
(:mod:`fedmtl.data.sources`, :mod:`fedmtl.data.har`) depend on this module, not on each other."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from fedmtl.data.manifest import TaskSpec


class DataError(ValueError):
    """Data that cannot be used as configured; the message names the file and the column."""


class DataWarning(UserWarning):
    """Data that is used, but that its owner should look at (a client that validation will
    quarantine, ids that only differ by case); the message names the column and the clients.
    ``fedmtl data`` commands print these as ``warning:`` lines."""


@dataclass
class RawData:
    """A loaded source: the rows plus what training needs to know about them."""

    frame: pd.DataFrame
    features: list[str]
    tasks: list[TaskSpec]
    feature_range: tuple[float, float] | None  # declared [min, max] of every feature
    input_shape: list[int] | None  # e.g. [1, 8, 8] for images
    has_clients: bool  # whether ``frame`` already has ``client`` and ``group`` columns
    true_groups: bool  # whether ``group`` is a known ground truth
    #: whether ``frame`` has a ``split`` column (``train``/``test``) that the partition step
    #: keeps instead of drawing its own: a benchmark's published split (``heart``: FLamby's)
    fixed_split: bool = False
