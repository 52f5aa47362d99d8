"""The two data stages: ``prepare`` (source -> raw data) and ``partition`` (raw -> clients).

- :func:`prepare` loads ``data.source`` and writes ``<raw_dir>/raw.parquet`` (the rows, in
  order; a row's position is its ``row`` id) and ``<raw_dir>/schema.json`` (what the rows are).
- :func:`partition` reads them (never writes them), splits the rows into clients (the
  source's own clients, else ``data.partition.scheme``), splits each client's rows into
  ``train``/``test`` and writes one Parquet file per client plus ``manifest.json`` to
  ``partitions_dir`` (the contract of :mod:`fedmtl.data.manifest`).
- :func:`load_partition` reads one client's file back.

Every file is written atomically (temporary file, then rename); :func:`partition` makes every
file's bytes before it replaces any earlier partition, so a failure leaves the old set whole.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedmtl.config import DataConfig
from fedmtl.data import partitioners
from fedmtl.data.manifest import (
    MANIFEST,
    ClientEntry,
    Manifest,
    TaskSpec,
    atomic_write_bytes,
    check_entries,
    partition_path,
    read_manifest,
)
from fedmtl.data.sources import (
    DataError,
    DataWarning,
    RawData,
    client_ids,
    load_source,
    plain_value,
)

RAW_FILE = "raw.parquet"
SCHEMA_FILE = "schema.json"
#: The scheme recorded when the source already has clients (synthetic, table).
NATURAL = "natural"


def _seed(seed: int) -> int:
    """A seed numpy accepts (non-negative) that is the seed itself when it already is."""
    return seed % (1 << 64)


def _parquet_bytes(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------
# prepare


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
    }
    try:
        schema_bytes = json.dumps(schema, indent=2).encode()
    except TypeError as exc:
        raise DataError(f"the label values of source '{cfg.source}' cannot be stored: {exc}") from None
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
    )
    expected = [*raw.features, *(t.name for t in raw.tasks)]
    if raw.has_clients:
        expected += ["client", "group"]
    missing = [c for c in expected if c not in frame.columns]
    if missing:
        raise DataError(
            f"'{raw_path}' lacks columns {missing} named in '{schema_path}'; "
            "run `fedmtl data prepare` again"
        )
    return raw, str(schema["source"])


# --------------------------------------------------------------------------------------------
# partition


def partition_file_name(client: str) -> str:
    """A file name for ``client`` that is safe on every file system.

    Ids made of letters, digits, ``_``, ``-`` and ``.`` (not leading) are kept; any other
    id is sanitised and suffixed with a hash of the id so that different ids stay apart.
    """
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", client).lstrip(".")[:80]
    if stem != client or not stem:
        digest = hashlib.sha1(client.encode()).hexdigest()[:10]
        stem = f"{stem}-{digest}" if stem else digest
    return f"{stem}.parquet"


def _file_names(ids: list[str]) -> list[str]:
    """One file name per client, also distinct on case-insensitive file systems."""
    names = [partition_file_name(c) for c in ids]
    folded = pd.Series([n.casefold() for n in names])
    for i in np.flatnonzero(folded.duplicated(keep=False).to_numpy()):
        digest = hashlib.sha1(ids[i].encode()).hexdigest()[:10]
        names[i] = f"{names[i].removesuffix('.parquet')}-{digest}.parquet"
    return names


def _listed(items: list[str], limit: int = 5) -> str:
    more = f", ... ({len(items)} in all)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _warn_about_clients(
    ids: list[str], names: list[str], frames: list[pd.DataFrame], tasks: list[TaskSpec]
) -> None:
    """:class:`DataWarning` s about a source's own client ids and rows (nothing is changed):
    ids that only differ by case or surrounding spaces (kept apart: one client and one file
    each), ids that are not plain file names (their files get safe names inside the partitions
    directory), clients with a single class of a task."""
    file_of = dict(zip(ids, names))
    alike: dict[str, list[str]] = {}
    for client in ids:
        alike.setdefault(client.strip().casefold(), []).append(client)
    clashes = [
        " and ".join(f"'{c}' ('{file_of[c]}')" for c in group)
        for group in alike.values()
        if len(group) > 1
    ]
    if clashes:
        warnings.warn(
            DataWarning(
                f"client ids {_listed(clashes)} differ only by case or surrounding spaces: each is "
                "kept as a client of its own, in its own file; if they are one client, make the "
                "client column agree"
            ),
            stacklevel=3,
        )
    renamed = [
        f"'{c}' -> '{file_of[c]}'" for c in ids if partition_file_name(c) != f"{c}.parquet"
    ]
    if renamed:
        warnings.warn(
            DataWarning(
                f"client ids that are not plain file names are written under safe names inside "
                f"the partitions directory (the manifest keeps each exact id): {_listed(renamed)}"
            ),
            stacklevel=3,
        )
    for task in tasks:
        if task.kind != "classification":
            continue
        single = [
            f"'{c}' (all {plain_value(f[task.name].iloc[0])!r})"
            for c, f in zip(ids, frames)
            if len(f) > 1 and f[task.name].nunique() == 1
        ]
        if single:
            warnings.warn(
                DataWarning(
                    f"clients with a single class of task '{task.name}' (their held-out scores "
                    f"measure that class only): {_listed(single)}"
                ),
                stacklevel=3,
            )


def _class_index(frame: pd.DataFrame, task: TaskSpec) -> np.ndarray:
    """Each row's label as an index into ``task.classes``."""
    index = {c: i for i, c in enumerate(task.classes)}
    codes = frame[task.name].map(index)
    if codes.isna().any():
        bad = frame[task.name][codes.isna()].iloc[0]
        raise DataError(f"label {bad!r} of task '{task.name}' is not in its classes {task.classes}")
    return codes.to_numpy(dtype=np.int64)


def _first_classification(tasks: list[TaskSpec]) -> TaskSpec | None:
    return next((t for t in tasks if t.kind == "classification"), None)


def _scheme_split(
    cfg: DataConfig, raw: RawData
) -> tuple[list[np.ndarray], list[str], list[pd.DataFrame]]:
    """Split the rows of a source without clients by ``cfg.partition``.

    Returns per client: its row indices, its group and its rows (with the group's transform
    applied: permuted labels or rotated images).
    """
    part = cfg.partition
    frame = raw.frame
    task = _first_classification(raw.tasks)
    if task is None and part.scheme in ("dirichlet", "shards", "label-permutation"):
        raise DataError(f"data.partition.scheme '{part.scheme}' needs a classification task")
    labels = _class_index(frame, task) if task else np.zeros(len(frame), dtype=np.int64)
    rng = np.random.default_rng(_seed(cfg.seed))
    n = part.n_clients

    grouped: partitioners.GroupedSplit | None = None
    if part.scheme == "iid":
        indices = partitioners.iid(labels, n, rng)
    elif part.scheme == "dirichlet":
        indices = partitioners.dirichlet(labels, n, rng, part.alpha)
    elif part.scheme == "shards":
        indices = partitioners.shards(labels, n, rng, part.shards_per_client)
    elif part.scheme == "label-permutation":
        assert task is not None
        grouped = partitioners.label_permutation(labels, n, rng, part.n_groups, len(task.classes))
        indices = grouped.indices
    elif part.scheme == "rotation":
        if not raw.input_shape:
            raise DataError("data.partition.scheme 'rotation' needs image data (an input_shape)")
        grouped = partitioners.rotation(labels, n, rng, part.n_groups)
        indices = grouped.indices
    else:
        raise DataError(f"data.partition.scheme = {part.scheme!r} is not known")

    groups = [str(g) for g in grouped.groups] if grouped else ["0"] * n
    frames = []
    for i, rows in enumerate(indices):
        rows_frame = frame.iloc[rows].copy()
        if grouped is not None:
            transform = grouped.transforms[grouped.groups[i]]
            if part.scheme == "label-permutation":
                assert task is not None
                new = partitioners.permute_labels(labels[rows], np.asarray(transform))
                values = np.asarray(task.classes)[new]
                rows_frame[task.name] = values.astype(frame[task.name].dtype)
            else:
                assert raw.input_shape is not None
                x = rows_frame[raw.features].to_numpy(dtype=np.float32)
                rotated = partitioners.rotate_images(x, int(transform), raw.input_shape)
                rows_frame[raw.features] = rotated
        frames.append(rows_frame)
    return indices, groups, frames


def train_test_rows(
    frame: pd.DataFrame, task: TaskSpec | None, test_fraction: float, seed: int
) -> np.ndarray:
    """A boolean mask of a client's test rows (``sklearn``'s ``train_test_split``).

    Stratified by ``task``'s label when every class has at least 2 rows (and the split can
    hold each class on both sides), else unstratified; with fewer than 2 rows, all train.
    """
    from sklearn.model_selection import train_test_split  # imported here: training never needs it

    n = len(frame)
    test = np.zeros(n, dtype=bool)
    if n < 2:
        return test
    positions = np.arange(n)
    stratify = None
    if task is not None and frame[task.name].value_counts().min() >= 2:
        stratify = frame[task.name].to_numpy()
    try:
        _, test_pos = train_test_split(
            positions, test_size=test_fraction, random_state=seed, stratify=stratify
        )
    except ValueError:
        if stratify is None:
            raise
        # too few rows for a test share of every class: split unstratified
        _, test_pos = train_test_split(positions, test_size=test_fraction, random_state=seed)
    test[test_pos] = True
    return test


def _split_seed(seed: int, client_index: int) -> int:
    return int(np.random.SeedSequence([_seed(seed), client_index]).generate_state(1)[0])


def _clear_partitions(directory: Path) -> None:
    """Remove what an earlier partitioning left: ``manifest.json`` and ``*.parquet`` only."""
    (directory / MANIFEST).unlink(missing_ok=True)
    for path in directory.glob("*.parquet"):
        if path.is_file():
            path.unlink()


def partition(cfg: DataConfig) -> Manifest:
    """Split the prepared raw data into client partitions and write them with their manifest."""
    raw_dir, out_dir = Path(cfg.raw_dir), Path(cfg.partitions_dir)
    if out_dir.resolve() == raw_dir.resolve():
        raise DataError(
            f"data.partitions_dir and data.raw_dir are both '{out_dir}': they must differ"
        )
    raw, source = load_prepared(raw_dir)
    frame = raw.frame

    if raw.has_clients:
        scheme = NATURAL
        by_client: dict[Any, np.ndarray] = frame.groupby("client", sort=True).indices
        ids = [str(c) for c in by_client]
        indices = [np.asarray(by_client[c]) for c in by_client]
        frames = [frame.iloc[rows].copy() for rows in indices]
        groups = [str(f["group"].iloc[0]) for f in frames]
        true_groups = raw.true_groups
    else:
        scheme = cfg.partition.scheme
        indices, groups, frames = _scheme_split(cfg, raw)
        ids = client_ids(len(indices))
        true_groups = raw.true_groups or scheme in ("label-permutation", "rotation")

    task = _first_classification(raw.tasks)
    label_columns = [t.name for t in raw.tasks]
    names = _file_names(ids)
    if raw.has_clients and source == "table":  # the user's rows (generated ones are as designed)
        _warn_about_clients(ids, names, frames, raw.tasks)
    outputs: list[tuple[ClientEntry, bytes]] = []
    for i, (client, group, rows, rows_frame) in enumerate(zip(ids, groups, indices, frames)):
        test = train_test_rows(rows_frame, task, cfg.test_fraction, _split_seed(cfg.seed, i))
        out = pd.DataFrame(
            {
                "client": pd.Series([client] * len(rows), dtype=str),
                "group": pd.Series([group] * len(rows), dtype=str),
                "split": pd.Series(np.where(test, "test", "train"), dtype=str),
                "row": np.asarray(rows, dtype=np.int64),
            }
        )
        features = rows_frame[raw.features].to_numpy(dtype=np.float32)
        out = pd.concat([out, pd.DataFrame(features, columns=raw.features)], axis=1)
        for name in label_columns:
            out[name] = rows_frame[name].reset_index(drop=True)
        out = out.sort_values("row", kind="stable").reset_index(drop=True)
        entry = ClientEntry(client, group, names[i], int((~test).sum()), int(test.sum()))
        outputs.append((entry, _parquet_bytes(out)))

    manifest = Manifest(
        source=source,
        scheme=scheme,
        features=raw.features,
        tasks=raw.tasks,
        clients=[entry for entry, _ in outputs],
        feature_range=raw.feature_range,
        input_shape=raw.input_shape,
        seed=cfg.seed,
        true_groups=true_groups,
    )
    manifest_json = manifest.to_json()  # every byte is made before the old set is replaced
    for entry, _ in outputs:  # partition_file_name keeps every id inside out_dir; make sure
        if Path(entry.file).name != entry.file or entry.file.startswith("."):
            raise DataError(
                f"client '{entry.client}': file name '{entry.file}' would leave '{out_dir}'"
            )
    try:  # what read_manifest will refuse, refused before anything is written
        check_entries(manifest.clients)
    except ValueError as exc:
        raise DataError(str(exc)) from None
    out_dir.mkdir(parents=True, exist_ok=True)
    _clear_partitions(out_dir)
    for entry, data in outputs:
        atomic_write_bytes(out_dir / entry.file, data)
    atomic_write_bytes(out_dir / MANIFEST, manifest_json.encode())
    return manifest


def load_partition(partitions_dir: str | Path, client: str) -> pd.DataFrame:
    """One client's partition file, found through the manifest."""
    directory = Path(partitions_dir)
    manifest = read_manifest(directory)
    try:
        entry = manifest.entry(client)
    except KeyError:
        raise DataError(
            f"client '{client}' is not in the manifest at '{directory / MANIFEST}'"
        ) from None
    try:
        path = partition_path(directory, client, entry.file)  # a link must stay inside the folder
    except PermissionError as exc:
        raise DataError(str(exc)) from None
    if not path.exists():
        raise FileNotFoundError(
            f"client '{client}': partition file '{path}' is missing; "
            "run `fedmtl data partition` again"
        )
    try:
        return pd.read_parquet(path)
    except Exception as exc:
        raise DataError(f"client '{client}': cannot read partition file '{path}': {exc}") from exc
