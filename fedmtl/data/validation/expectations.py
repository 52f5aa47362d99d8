"""What the contract expects of a partition's columns (their dtype kinds, the finite range),
and how a failed expectation is told in words."""

from __future__ import annotations

import sys
from typing import Any

from fedmtl.data.manifest import Manifest, TaskSpec


STRING_COLUMNS = ("client", "group", "split")
INT_TYPES = ("int64", "int32", "int16", "int8", "uint64", "uint32", "uint16", "uint8")
FLOAT_TYPES = ("float32", "float64")
FINITE_MAX = sys.float_info.max  # |x| <= this  <=>  x is finite (NaN is caught as a null)


def _column_kinds(manifest: Manifest) -> dict[str, str | None]:
    """Every contract column -> its dtype kind: "str", "int", "float" or None (unchecked)."""
    kinds: dict[str, str | None] = {c: "str" for c in STRING_COLUMNS}
    kinds["row"] = "int"
    kinds.update({f: "float" for f in manifest.features})
    kinds.update({t.name: _label_kind(t) for t in manifest.tasks})
    # an optional task's integer classes are written as float64 (NaN: a missing label)
    kinds.update({t.name: "float" for t in manifest.tasks if t.optional and kinds[t.name] == "int"})
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
