"""Comparing training runs side by side (``fedmtl compare``): which settings differ and which
run's final metric is better. Pure logic over plain values; the MLflow side is tasks/runs.py."""

from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass, field
from typing import Sequence

HIGHER, LOWER, NEUTRAL = 1, -1, 0
# tokens of a metric name (split at '/', '_' and '.') that say which way is better
HIGHER_TOKENS = frozenset({"accuracy", "precision", "recall", "f1", "gain", "ari", "r2"})
LOWER_TOKENS = frozenset({"loss", "mae", "rmse", "mse", "error"})
# tags worth a row when they differ between runs (the settings are params, these are not)
COMPARED_TAGS = (
    "dataset",
    "partition_scheme",
    "privacy",
    "data_version",
    "git_commit",
    "quarantined_clients",
)
# the order of metric groups in the table; anything else (e.g. further tasks' metrics) follows
METRIC_ORDER = (
    "personal/",
    "group/",
    "global/",
    "personalisation_gain/",
    "grouping/",
    "train/",
    "clients/",
    "time/",
)
BEST_MARK = "✓"
MISSING = "—"


@dataclass(frozen=True)
class RunRecord:
    """What a comparison needs of one run: its settings, tags and final metric values."""

    run_id: str
    name: str
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    status: str = ""


@dataclass(frozen=True)
class Row:
    """One line of the comparison: a key, one value per run and the indices of the best runs."""

    key: str
    values: tuple
    best: frozenset[int] = frozenset()
    direction: int = NEUTRAL

    def cells(self) -> list[str]:
        return [
            format_value(v) + (f" {BEST_MARK}" if i in self.best else "")
            for i, v in enumerate(self.values)
        ]


@dataclass(frozen=True)
class Comparison:
    runs: tuple[RunRecord, ...]
    params: tuple[Row, ...]
    tags: tuple[Row, ...]
    metrics: tuple[Row, ...]


def direction(metric: str) -> int:
    """HIGHER when a larger value is better (accuracy, precision, recall, F1, personalisation
    gain, ARI), LOWER for losses, errors and ``time/*``, NEUTRAL otherwise (counts)."""
    key = metric.lower()
    if key.startswith("time/"):
        return LOWER
    tokens = set(re.split(r"[/_.\-]", key))
    if "gain" in tokens:  # personalisation_gain/<m> is oriented so that larger is better
        return HIGHER
    if tokens & LOWER_TOKENS:
        return LOWER
    if tokens & HIGHER_TOKENS:
        return HIGHER
    return NEUTRAL


def best_indices(values: Sequence[float | None], way: int) -> frozenset[int]:
    """The indices holding the best value (all of them on a tie); none when the metric is
    neutral, fewer than two runs have a value, or all values are equal."""
    present = [(i, float(v)) for i, v in enumerate(values) if _is_number(v)]
    if way == NEUTRAL or len(present) < 2:
        return frozenset()
    numbers = [v for _, v in present]
    target = max(numbers) if way == HIGHER else min(numbers)
    if all(_same(v, target) for v in numbers):
        return frozenset()
    return frozenset(i for i, v in present if _same(v, target))


def param_rows(runs: Sequence[RunRecord], all_params: bool = False) -> list[Row]:
    """A row per parameter whose value differs between runs (every parameter with
    ``all_params``); a parameter a run lacks counts as different."""
    keys = sorted(set().union(*(r.params for r in runs))) if runs else []
    rows = []
    for key in keys:
        values = tuple(r.params.get(key) for r in runs)
        if all_params or len(set(values)) > 1:
            rows.append(Row(key, values))
    return rows


def tag_rows(
    runs: Sequence[RunRecord], keys: Sequence[str] = COMPARED_TAGS, all_tags: bool = False
) -> list[Row]:
    """Rows ``tags.<key>`` for the provenance tags that differ (or all of ``keys``)."""
    rows = []
    for key in keys:
        values = tuple(r.tags.get(key) for r in runs)
        if all(v is None for v in values):
            continue
        if all_tags or len(set(values)) > 1:
            rows.append(Row(f"tags.{key}", values))
    return rows


def metric_matches(key: str, patterns: Sequence[str] | None) -> bool:
    """No patterns: every metric. A pattern with ``*``, ``?`` or ``[`` is a glob over the
    whole name (``personal/*``), any other pattern a substring (``accuracy``)."""
    if not patterns:
        return True
    for pattern in patterns:
        if any(ch in pattern for ch in "*?["):
            if fnmatch.fnmatchcase(key, pattern):
                return True
        elif pattern in key:
            return True
    return False


def metric_sort_key(key: str) -> tuple[int, str]:
    for rank, prefix in enumerate(METRIC_ORDER):
        if key.startswith(prefix):
            return rank, key
    return len(METRIC_ORDER), key


def metric_rows(runs: Sequence[RunRecord], patterns: Sequence[str] | None = None) -> list[Row]:
    """A row per final metric of any run (filtered by ``patterns``), best value marked."""
    keys = set().union(*(r.metrics for r in runs)) if runs else set()
    rows = []
    for key in sorted((k for k in keys if metric_matches(k, patterns)), key=metric_sort_key):
        values = tuple(r.metrics.get(key) for r in runs)
        way = direction(key)
        rows.append(Row(key, values, best_indices(values, way), way))
    return rows


def compare(
    runs: Sequence[RunRecord], all_params: bool = False, patterns: Sequence[str] | None = None
) -> Comparison:
    return Comparison(
        tuple(runs),
        tuple(param_rows(runs, all_params)),
        tuple(tag_rows(runs, all_tags=all_params)),
        tuple(metric_rows(runs, patterns)),
    )


def format_value(value) -> str:
    """Numbers compactly (integers as integers, else 4 decimals), text as is, missing as —."""
    if value is None:
        return MISSING
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if math.isnan(value) or math.isinf(value):
        return str(value)
    if float(value).is_integer() and abs(value) < 1e9:
        return str(int(value))
    if value != 0 and abs(value) < 1e-3:
        return f"{value:.3g}"
    return f"{value:.4f}"


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _same(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
