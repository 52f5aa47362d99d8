"""The contract between the data pipeline and training: partition files and their manifest.

A partition is one Parquet file per client, ``<partitions_dir>/<file>``, with the columns

- ``client`` (str): the client id; ``group`` (str): its group ("0" when there is none);
- ``split`` (str): ``train`` or ``test`` (the client's own held-out rows);
- ``row`` (int64): the row's index in the prepared raw data, so any row can be traced back;
- the feature columns named in the manifest (float32), and one column per task (label).

``manifest.json`` beside them describes the whole set (:class:`Manifest`).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
SPLITS = ("train", "test")


@dataclass(frozen=True)
class TaskSpec:
    """One prediction target: a label column and how it is learned."""

    name: str
    kind: str = "classification"  # or "regression"
    classes: list[Any] = field(default_factory=list)  # the declared label set (classification)

    @property
    def n_outputs(self) -> int:
        return len(self.classes) if self.kind == "classification" else 1


@dataclass(frozen=True)
class ClientEntry:
    client: str
    group: str
    file: str
    n_train: int
    n_test: int


@dataclass(frozen=True)
class Manifest:
    source: str
    scheme: str
    features: list[str]
    tasks: list[TaskSpec]
    clients: list[ClientEntry]
    feature_range: tuple[float, float] | None = None  # declared [min, max] of every feature
    input_shape: list[int] | None = None  # e.g. [1, 8, 8] for images; None for flat vectors
    seed: int = 0
    true_groups: bool = False  # whether ``group`` is a known ground truth (e.g. rotation)

    @property
    def client_ids(self) -> list[str]:
        return [c.client for c in self.clients]

    def entry(self, client: str) -> ClientEntry:
        for c in self.clients:
            if c.client == client:
                return c
        raise KeyError(f"client '{client}' is not in the manifest")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Manifest":
        raw = dict(raw)
        raw["tasks"] = [TaskSpec(**t) for t in raw["tasks"]]
        raw["clients"] = [ClientEntry(**c) for c in raw["clients"]]
        if raw.get("feature_range") is not None:
            raw["feature_range"] = tuple(raw["feature_range"])
        return cls(**raw)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_manifest(directory: str | Path, manifest: Manifest) -> Path:
    path = Path(directory) / MANIFEST
    atomic_write_bytes(path, manifest.to_json().encode())
    return path


def read_manifest(directory: str | Path) -> Manifest:
    path = Path(directory) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(
            f"no partitions at '{directory}' ({MANIFEST} missing): run `fedmtl data partition` first"
        )
    return Manifest.from_dict(json.loads(path.read_text()))
