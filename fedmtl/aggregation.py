"""Hierarchical aggregation: within each group first, then across groups (FedAvg server).

``group_aggregate``: per group, the sample-weighted mean of the clients' Δθ and Δφ_g.
``global_merge``: Δθ = Σ_g w_g Δθ_g with w_g by samples, uniform or √samples; the server applies
θ ← θ + η·Δθ (η = ``server_lr``; η = 1 is FedAvg), φ_g ← φ_g + Δφ_g, and φ₀ ← mean of the φ_g.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

import torch

from fedmtl.state import ClientUpdate, GroupAggregate, ServerState, Vector

WEIGHTINGS = ("samples", "uniform", "sqrt")


def weighted_mean(vectors: Sequence[Vector], weights: Sequence[float]) -> Vector:
    """Σ w_i v_i / Σ w_i (the weights need not be normalised; they must be positive)."""
    if not vectors:
        raise ValueError("weighted_mean of no vectors")
    if len(vectors) != len(weights):
        raise ValueError(f"{len(vectors)} vectors but {len(weights)} weights")
    w = torch.as_tensor(weights, dtype=torch.float64)
    if (w < 0).any() or float(w.sum()) <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {list(weights)}")
    stacked = torch.stack([v.to(torch.float64) for v in vectors])
    return ((w / w.sum()) @ stacked).to(vectors[0].dtype)


def group_weight(n_samples: int, n_clients: int, weighting: str) -> float:
    if weighting == "samples":
        return float(n_samples)
    if weighting == "uniform":
        return 1.0
    if weighting == "sqrt":
        return math.sqrt(n_samples)
    raise ValueError(f"grouping.weighting '{weighting}' is not known; allowed values: {WEIGHTINGS}")


def group_aggregate(updates: Sequence[ClientUpdate]) -> dict[str, GroupAggregate]:
    """Per group, the sample-weighted mean of the members' updates (sorted by client id)."""
    by_group: dict[str, list[ClientUpdate]] = defaultdict(list)
    for u in sorted(updates, key=lambda u: u.client):
        by_group[u.group].append(u)
    out: dict[str, GroupAggregate] = {}
    for group, members in sorted(by_group.items()):
        weights = [max(u.n_samples, 0) for u in members]
        if sum(weights) == 0:
            weights = [1] * len(members)
        tasks = members[0].delta_heads.keys()
        out[group] = GroupAggregate(
            group=group,
            n_clients=len(members),
            n_samples=sum(u.n_samples for u in members),
            delta_base=weighted_mean([u.delta_base for u in members], weights),
            delta_heads={t: weighted_mean([u.delta_heads[t] for u in members], weights) for t in tasks},
            clients=[u.client for u in members],
        )
    return out


def global_merge(
    state: ServerState,
    groups: dict[str, GroupAggregate],
    weighting: str = "samples",
    server_lr: float = 1.0,
) -> ServerState:
    """The next server state from this round's group aggregates (the input state is unchanged)."""
    if not groups:
        raise ValueError(f"round {state.round}: no group aggregates to merge (no client updates)")
    ordered = [groups[g] for g in sorted(groups)]
    weights = [group_weight(a.n_samples, a.n_clients, weighting) for a in ordered]
    delta = weighted_mean([a.delta_base for a in ordered], weights)
    base = state.base + server_lr * delta
    group_heads = {g: {t: v.clone() for t, v in heads.items()} for g, heads in state.group_heads.items()}
    for agg in ordered:
        current = group_heads.setdefault(agg.group, {t: v.clone() for t, v in state.global_heads.items()})
        for task, d in agg.delta_heads.items():
            current[task] = current[task] + d
    tasks = state.global_heads.keys()
    global_heads = {
        t: weighted_mean([group_heads[g][t] for g in sorted(group_heads)], [1.0] * len(group_heads))
        for t in tasks
    }
    return ServerState(state.round + 1, base, group_heads, global_heads)
