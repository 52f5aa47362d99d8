"""The second stage, :func:`partition`: every client's Parquet file and ``manifest.json``,
made in memory first and then written over an earlier set; :func:`load_partition` reads one
client's file back."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedmtl.config import DataConfig
from fedmtl.data.manifest import (
    MANIFEST,
    ClientEntry,
    TaskSpec,
    Manifest,
    atomic_write_bytes,
    check_entries,
    partition_path,
    read_manifest,
)
from fedmtl.data.partitions.clients import (
    _file_names,
    _first_classification,
    _scheme_split,
    _split_seed,
    _warn_about_clients,
    given_test_rows,
    train_test_rows,
)
from fedmtl.data.partitions.prepared import _parquet_bytes, load_prepared
from fedmtl.data.sources import DataError, client_ids


#: The scheme recorded when the source already has clients (synthetic, table, har, heart).
NATURAL = "natural"


def _clear_partitions(directory: Path) -> None:
    """Remove what an earlier partitioning left: ``manifest.json`` and ``*.parquet`` only."""
    (directory / MANIFEST).unlink(missing_ok=True)
    for path in directory.glob("*.parquet"):
        if path.is_file():
            path.unlink()


def _missing_tasks(
    tasks: list[TaskSpec], clients: list[str], fraction: float, seed: int
) -> tuple[list[TaskSpec], dict[str, set[str]]]:
    """``data.partition.missing_tasks``: for each task after the first, the clients (a
    ``fraction`` of them, at least one when the fraction is above 0, never all) that hold none of
    its labels, drawn with ``seed``; those tasks become optional in the manifest."""
    if fraction <= 0 or len(tasks) < 2:
        return list(tasks), {}
    rng = np.random.default_rng([seed, 0x7A5C])
    n = len(clients)
    k = min(max(1, round(fraction * n)), n - 1)
    if k < 1:
        return list(tasks), {}
    without = {
        t.name: {clients[i] for i in rng.choice(n, size=k, replace=False)} for t in tasks[1:]
    }
    return [tasks[0], *(replace(t, optional=True) for t in tasks[1:])], without


def _label_column(values: pd.Series, optional: bool) -> pd.Series:
    """A label column as written: an optional task's numeric labels as float64, so that a
    missing one is a NaN whichever client lacks it (every partition has the same dtype; pandas'
    nullable integers are not a dtype the contract suite or every reader takes)."""
    if optional and values.dtype.kind in "iuf":  # numpy's and pandas' nullable numbers
        return values.astype("float64")
    return values


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
    tasks, without = _missing_tasks(raw.tasks, ids, cfg.partition.missing_tasks, cfg.seed)
    optional = {t.name: t.optional for t in tasks}
    names = _file_names(ids)
    if raw.has_clients and source == "table":  # the user's rows (generated ones are as designed)
        _warn_about_clients(ids, names, frames, raw.tasks)
    outputs: list[tuple[ClientEntry, bytes]] = []
    for i, (client, group, rows, rows_frame) in enumerate(zip(ids, groups, indices, frames)):
        if raw.fixed_split:  # the source's published split: test_fraction and seed do not apply
            test = given_test_rows(rows_frame, client)
        else:
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
            out[name] = _label_column(rows_frame[name].reset_index(drop=True), optional[name])
            if client in without.get(name, ()):  # this client holds none of the task's labels
                out[name] = out[name].where(pd.Series(False, index=out.index))
        out = out.sort_values("row", kind="stable").reset_index(drop=True)
        entry = ClientEntry(client, group, names[i], int((~test).sum()), int(test.sum()))
        outputs.append((entry, _parquet_bytes(out)))

    manifest = Manifest(
        source=source,
        scheme=scheme,
        features=raw.features,
        tasks=tasks,
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
