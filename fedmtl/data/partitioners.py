"""Partition schemes: split a data set's rows into clients (pure numpy).

Every scheme takes the label of each row and a ``numpy.random.Generator`` and returns one
array of row indices per client. The label-skew schemes are the standard ones of the
federated-learning literature:

- :func:`iid`: a uniform random split into equal sizes;
- :func:`dirichlet`: per class, client proportions ~ Dir(alpha) (Hsu et al. 2019; the scheme
  of NIID-Bench, Li et al. 2022, and FedLab), small alpha = strong label skew;
- :func:`shards`: McMahan et al. (2017)'s pathological split, a few label-sorted shards each.

The concept-shift schemes put clients into groups that differ in ``p(y | x)`` or ``p(x)``
on top of an iid split; client i is in group ``i % n_groups``:

- :func:`label_permutation`: group g > 0 sees the classes renamed by a fixed permutation;
- :func:`rotation`: group g sees every image turned by g x 90 degrees (rotated MNIST).

They return a :class:`GroupedSplit`; :func:`permute_labels` and :func:`rotate_images` apply
a group's transform to its rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class GroupedSplit:
    """An iid split plus a group per client and one transform per group."""

    indices: list[np.ndarray]  # row indices, one array per client
    groups: list[int]  # the group of each client
    transforms: list[np.ndarray] | list[int]  # per group: a class permutation or quarter turns


def _check(labels: np.ndarray, n_clients: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {labels.shape}")
    if n_clients < 1:
        raise ValueError(f"n_clients must be at least 1, got {n_clients}")
    if len(labels) < n_clients:
        raise ValueError(f"cannot split {len(labels)} rows into {n_clients} non-empty clients")
    return labels


def iid(labels: np.ndarray, n_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """A uniform random split; client sizes differ by at most one row."""
    labels = _check(labels, n_clients)
    return [np.sort(part) for part in np.array_split(rng.permutation(len(labels)), n_clients)]


def dirichlet(
    labels: np.ndarray,
    n_clients: int,
    rng: np.random.Generator,
    alpha: float,
    min_size: int = 10,
    max_retries: int = 1000,
) -> list[np.ndarray]:
    """Label skew by a Dirichlet prior (NIID-Bench's ``noniid-labeldir``).

    For each class, the class's rows are dealt to the clients in proportions drawn from
    Dir(alpha, ..., alpha); clients already holding more than their even share get no more.
    The draw is repeated until every client has at least ``min_size`` rows (at most
    ``max_retries`` times).
    """
    labels = _check(labels, n_clients)
    if alpha <= 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    n = len(labels)
    if min_size * n_clients > n:
        raise ValueError(
            f"cannot give each of {n_clients} clients at least {min_size} of {n} rows "
            "(use fewer clients)"
        )
    classes = np.unique(labels)
    by_class = [np.flatnonzero(labels == c) for c in classes]
    for _ in range(max_retries):
        batches: list[list[np.ndarray]] = [[] for _ in range(n_clients)]
        sizes = np.zeros(n_clients, dtype=np.int64)
        for rows in by_class:
            rows = rng.permutation(rows)
            p = rng.dirichlet(np.full(n_clients, alpha))
            p = p * (sizes < n / n_clients)  # no more for clients above an even share
            if not p.sum() > 0:  # every eligible client drew 0 (tiny alpha): deal evenly
                p = (sizes < n / n_clients).astype(np.float64)
            p = p / p.sum()
            cuts = (np.cumsum(p) * len(rows)).astype(np.int64)[:-1]
            for client, part in enumerate(np.split(rows, cuts)):
                batches[client].append(part)
                sizes[client] += len(part)
        if sizes.min() >= min_size:
            return [np.sort(np.concatenate(b)) for b in batches]
    raise ValueError(
        f"dirichlet partition: no draw in {max_retries} gave every one of {n_clients} clients "
        f"at least {min_size} rows (alpha={alpha}); use a larger alpha or fewer clients"
    )


def shards(
    labels: np.ndarray, n_clients: int, rng: np.random.Generator, shards_per_client: int
) -> list[np.ndarray]:
    """McMahan et al. (2017)'s pathological non-iid split.

    Sort the rows by label (ties in random order), cut them into
    ``n_clients * shards_per_client`` shards of (near) equal size and give each client
    ``shards_per_client`` random shards, so each sees about ``shards_per_client`` classes
    (a shard straddling two classes adds one).
    """
    labels = _check(labels, n_clients)
    n_shards = n_clients * shards_per_client
    if shards_per_client < 1 or n_shards > len(labels):
        raise ValueError(
            f"cannot cut {len(labels)} rows into {n_clients} x {shards_per_client} shards"
        )
    shuffled = rng.permutation(len(labels))
    order = shuffled[np.argsort(labels[shuffled], kind="stable")]
    pieces = np.array_split(order, n_shards)
    dealt = rng.permutation(n_shards).reshape(n_clients, shards_per_client)
    return [np.sort(np.concatenate([pieces[s] for s in row])) for row in dealt]


def _groups(n_clients: int, n_groups: int) -> list[int]:
    if n_groups < 1:
        raise ValueError(f"n_groups must be at least 1, got {n_groups}")
    return [i % n_groups for i in range(n_clients)]


def label_permutation(
    labels: np.ndarray,
    n_clients: int,
    rng: np.random.Generator,
    n_groups: int,
    n_classes: int,
) -> GroupedSplit:
    """An iid split where group g > 0 sees the classes renamed by its own fixed permutation.

    ``transforms[g][k]`` is the class index that class index k becomes in group g; group 0
    keeps the identity, the other groups get distinct non-identity permutations.
    """
    if n_classes < 2:
        raise ValueError(f"label permutation needs at least 2 classes, got {n_classes}")
    if n_groups > math.factorial(n_classes):
        raise ValueError(
            f"{n_classes} classes have only {math.factorial(n_classes)} permutations; "
            f"cannot make {n_groups} distinct groups"
        )
    indices = iid(labels, n_clients, rng)
    perms = [np.arange(n_classes)]
    seen = {tuple(perms[0])}
    while len(perms) < n_groups:
        perm = rng.permutation(n_classes)
        if tuple(perm) not in seen:
            seen.add(tuple(perm))
            perms.append(perm)
    return GroupedSplit(indices, _groups(n_clients, n_groups), perms)


def rotation(
    labels: np.ndarray,
    n_clients: int,
    rng: np.random.Generator,
    n_groups: int,
) -> GroupedSplit:
    """An iid split where group g sees every image turned by g x 90 degrees (g = 0..3).

    ``transforms[g]`` is the number of quarter turns, for :func:`rotate_images`.
    """
    if not 1 <= n_groups <= 4:
        raise ValueError(f"rotation supports 1..4 groups (0, 90, 180, 270 degrees), got {n_groups}")
    indices = iid(labels, n_clients, rng)
    return GroupedSplit(indices, _groups(n_clients, n_groups), list(range(n_groups)))


def permute_labels(class_index: np.ndarray, permutation: np.ndarray) -> np.ndarray:
    """Class indices after a group's permutation: ``permutation[class_index]``."""
    return np.asarray(permutation)[np.asarray(class_index)]


def rotate_images(x: np.ndarray, quarter_turns: int, input_shape: list[int]) -> np.ndarray:
    """Rows of flattened images of ``input_shape`` (e.g. [1, 8, 8]) turned by k x 90 degrees.

    ``np.rot90`` over the last two (height, width) axes; the result is flattened again.
    """
    x = np.asarray(x)
    shape = tuple(int(s) for s in input_shape)
    if len(shape) < 2 or math.prod(shape) != x.shape[1]:
        raise ValueError(
            f"rotation needs images: input_shape {list(shape)} does not fit {x.shape[1]} features"
        )
    if quarter_turns % 2 and shape[-1] != shape[-2]:
        raise ValueError(f"cannot turn non-square images {list(shape)} by 90 degrees")
    images = x.reshape((len(x), *shape))
    return np.rot90(images, k=quarter_turns, axes=(-2, -1)).reshape(len(x), -1)
