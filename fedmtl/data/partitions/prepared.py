"""The first stage, :func:`prepare` (source -> ``raw.parquet`` and ``schema.json``), and
:func:`load_prepared`, which reads its output back."""

from __future__ import annotations

import io
import json
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from fedmtl.config import DataConfig
from fedmtl.data.manifest import TaskSpec, atomic_write_bytes
from fedmtl.data.sources import DataError, RawData, load_source


RAW_FILE = "raw.parquet"
SCHEMA_FILE = "schema.json"


def _parquet_bytes(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return buffer.getvalue()


def prepare(cfg: DataConfig) -> Path:
    """Load ``cfg.source`` and write ``raw.parquet`` and ``schema.json``; return ``raw_dir``."""
    raw = load_source(cfg)
    raw_dir = Path(cfg.raw_dir)
    frame = raw.frame.reset_index(drop=True)
    schema = {
        "source": cfg.source,
        "features": raw.features,
        "tasks": [asdict(t) for t in raw.tasks],
        "feature_range": list(raw.feature_range) if raw.feature_range is not None else None,
        "input_shape": raw.input_shape,
        "has_clients": raw.has_clients,
        "true_groups": raw.true_groups,
        "fixed_split": raw.fixed_split,
    }
    try:
        schema_bytes = json.dumps(schema, indent=2).encode()
    except TypeError as exc:
        raise DataError(
            f"the label values of source '{cfg.source}' cannot be stored: {exc}"
        ) from None
    atomic_write_bytes(raw_dir / RAW_FILE, _parquet_bytes(frame))
    atomic_write_bytes(raw_dir / SCHEMA_FILE, schema_bytes)
    return raw_dir


def load_prepared(raw_dir: str | Path) -> tuple[RawData, str]:
    """The prepared raw data and the name of its source (read only)."""
    raw_dir = Path(raw_dir)
    raw_path, schema_path = raw_dir / RAW_FILE, raw_dir / SCHEMA_FILE
    for path in (raw_path, schema_path):
        if not path.exists():
            raise FileNotFoundError(
                f"no prepared data at '{raw_dir}' ('{path.name}' missing): "
                "run `fedmtl data prepare` first"
            )
    try:
        schema = json.loads(schema_path.read_text())
        frame = pd.read_parquet(raw_path)
    except Exception as exc:
        raise DataError(
            f"cannot read the prepared data at '{raw_dir}': {exc}; run `fedmtl data prepare` again"
        ) from exc
    raw = RawData(
        frame=frame,
        features=list(schema["features"]),
        tasks=[TaskSpec(**t) for t in schema["tasks"]],
        feature_range=tuple(schema["feature_range"]) if schema["feature_range"] else None,
        input_shape=schema["input_shape"],
        has_clients=bool(schema["has_clients"]),
        true_groups=bool(schema["true_groups"]),
        fixed_split=bool(schema.get("fixed_split", False)),  # absent before heart existed
    )
    expected = [*raw.features, *(t.name for t in raw.tasks)]
    if raw.has_clients:
        expected += ["client", "group"]
    if raw.fixed_split:
        expected.append("split")
    missing = [c for c in expected if c not in frame.columns]
    if missing:
        raise DataError(
            f"'{raw_path}' lacks columns {missing} named in '{schema_path}'; "
            "run `fedmtl data prepare` again"
        )
    return raw, str(schema["source"])
