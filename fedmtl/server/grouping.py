"""Which group a client belongs to: given by a column, or learned.

``grouping.method``:

- ``column``: the partition's ``group`` column (e.g. the known deployment or region);
- ``ifca``: every round each client picks the group head with the lowest loss on its train
  split (Ghosh et al. 2020); the server starts k = ``grouping.n_groups`` distinct heads;
- ``cluster``: all clients train one group for ``grouping.warmup_rounds`` rounds; then the
  server clusters them by the cosine similarity of their head updates (agglomerative,
  average linkage) and picks the number of groups in 2..``n_groups`` with the best silhouette
  (one group if no split reaches ``min_silhouette``). Each new group head starts from the old
  head plus its members' mean update. A client first seen later picks its group by loss.

Where the data has true groups, :func:`adjusted_rand` scores an assignment against them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedmtl.client.data import ClientData
from fedmtl.client.training import train_loss
from fedmtl.data.manifest import TaskSpec
from fedmtl.server.aggregation import head_mean, weighted_mean
from fedmtl.state import ClientUpdate, ServerState

METHODS = ("column", "ifca", "cluster")
#: the single group every client trains in before clustering
WARMUP_GROUP = "0"


@dataclass(frozen=True)
class GroupingSpec:
    method: str = "column"
    n_groups: int = 4
    warmup_rounds: int = 3
    min_silhouette: float = 0.1

    @classmethod
    def from_config(cls, grouping) -> "GroupingSpec":  # a fedmtl.config.GroupingConfig
        return cls(
            grouping.method, grouping.n_groups, grouping.warmup_rounds, grouping.min_silhouette
        )


def choose_group(
    model: nn.Module, state: ServerState, data: ClientData, tasks: Sequence[TaskSpec]
) -> str:
    """IFCA's rule: the group whose head has the lowest loss on the client's train split
    (ties go to the first group in sorted order)."""
    if not state.group_heads:
        raise ValueError("no group heads to choose from")
    losses = {
        g: train_loss(model, state.base, state.group_heads[g], data, tasks)
        for g in sorted(state.group_heads)
    }
    return lowest_loss(losses)


def lowest_loss(losses: dict[str, float]) -> str:
    """The group with the lowest loss (NaN counts as +inf; ties go to the first group in
    sorted order): the rule of :func:`choose_group` and of a cold start
    (fedmtl/lifecycle/coldstart.py)."""
    if not losses:
        raise ValueError("no group heads to choose from")
    return min(sorted(losses), key=lambda g: (math.inf if math.isnan(losses[g]) else losses[g], g))


def cluster_vectors(
    vectors: np.ndarray, max_groups: int, min_silhouette: float = 0.1
) -> tuple[np.ndarray, float]:
    """Cluster rows by cosine similarity; returns labels 0..k−1 and the chosen silhouette
    (k chosen in 2..max_groups by silhouette; all zeros when no split is good enough)."""
    from sklearn.cluster import AgglomerativeClustering
    from sklearn.metrics import silhouette_score

    n = vectors.shape[0]
    best_labels, best_score = np.zeros(n, dtype=int), -1.0
    for k in range(2, min(max_groups, n - 1) + 1):
        labels = AgglomerativeClustering(
            n_clusters=k, metric="cosine", linkage="average"
        ).fit_predict(vectors)
        if len(set(labels.tolist())) < 2:
            continue
        score = float(silhouette_score(vectors, labels, metric="cosine"))
        if score > best_score + 1e-9:
            best_labels, best_score = labels, score
    if best_score < min_silhouette:
        return np.zeros(n, dtype=int), best_score
    return _canonical(best_labels), best_score


def _canonical(labels: np.ndarray) -> np.ndarray:
    """Relabel so groups are numbered in order of first appearance (stable names)."""
    mapping: dict[int, int] = {}
    return np.array([mapping.setdefault(int(x), len(mapping)) for x in labels])


def regroup(
    before: ServerState, after: ServerState, updates: Sequence[ClientUpdate], spec: GroupingSpec
) -> tuple[ServerState, float]:
    """Split the warm-up group by the clients' head updates (see the module docstring).
    ``before`` is the state the clients trained from, ``after`` the merged one. Returns the
    regrouped state and the silhouette of the split."""
    ordered = sorted(updates, key=lambda u: u.client)
    tasks = list(before.global_heads)
    # clustered on the heads every client trained: a client without a task's labels has an
    # unmoved head there, which would look like a group of its own
    shared = [t for t in tasks if all(u.samples_for(t) > 0 for u in ordered)] or tasks
    vectors = np.stack([torch.cat([u.delta_heads[t] for t in shared]).numpy() for u in ordered])
    labels, score = cluster_vectors(vectors, spec.n_groups, spec.min_silhouette)
    names = [f"g{int(x)}" for x in labels]
    group_heads = {}
    for name in sorted(set(names)):
        members = [u for u, n in zip(ordered, names) if n == name]
        weights = [max(u.n_samples, 1) for u in members]
        partial = any(u.task_samples is not None for u in members)
        start = before.heads_for(members[0].group)
        group_heads[name] = {t: start[t] + head_mean(members, t, weights, partial) for t in tasks}
    assignment = {u.client: n for u, n in zip(ordered, names)}
    global_heads = {
        t: weighted_mean([group_heads[g][t] for g in sorted(group_heads)], [1.0] * len(group_heads))
        for t in tasks
    }
    state = ServerState(
        after.round,
        after.base,
        group_heads,
        global_heads,
        assignment,
        dict(after.optimizer),
        dict(after.privacy),
    )
    return state, score


def adjusted_rand(assignment: dict[str, str], truth: dict[str, str]) -> float | None:
    """ARI of the learned assignment against the true groups, over the clients both know."""
    from sklearn.metrics import adjusted_rand_score

    common = sorted(set(assignment) & set(truth))
    if len(common) < 2:
        return None
    return float(adjusted_rand_score([truth[c] for c in common], [assignment[c] for c in common]))
