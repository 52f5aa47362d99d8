"""Splitting the prepared rows into clients (by ``data.partition.scheme`` when the source has
none) and each client's rows into train/test (or keeping the source's own split); the clients'
file names, and the warnings about a table's own client ids."""

from __future__ import annotations

import hashlib
import re
import warnings

import numpy as np
import pandas as pd

from fedmtl.config import DataConfig
from fedmtl.data import partitioners
from fedmtl.data.manifest import TaskSpec
from fedmtl.data.sources import DataError, DataWarning, RawData, plain_value


def _seed(seed: int) -> int:
    """A seed numpy accepts (non-negative) that is the seed itself when it already is."""
    return seed % (1 << 64)


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


def given_test_rows(frame: pd.DataFrame, client: str) -> np.ndarray:
    """A boolean mask of a client's test rows from the source's own ``split`` column (a
    benchmark's published split, :attr:`RawData.fixed_split`): every value ``train`` or
    ``test``."""
    split = frame["split"].astype(str).to_numpy()
    bad = sorted(set(split.tolist()) - {"train", "test"})
    if bad:
        raise DataError(
            f"client '{client}': split values {bad[:5]} are not 'train' or 'test'; "
            "run `fedmtl data prepare` again"
        )
    return split == "test"


def _split_seed(seed: int, client_index: int) -> int:
    return int(np.random.SeedSequence([_seed(seed), client_index]).generate_state(1)[0])
