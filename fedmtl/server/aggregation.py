"""Hierarchical aggregation: within each group first, then across groups (FedAvg server).

``group_aggregate``: per group, the sample-weighted mean of the clients' Δθ and Δφ_g.
``global_merge``: Δθ = Σ_g w_g Δθ_g with w_g by samples, uniform or √samples; the server
optimiser steps θ with Δθ (FedAvg θ ← θ + η·Δθ, or FedAdam/FedYogi,
:mod:`fedmtl.server.optimizers`); group heads φ_g ← φ_g + Δφ_g, and φ₀ ← mean of the φ_g.
Methods with one global head instead step φ₀ like θ. With samples weighting the two levels
compose to plain FedAvg over clients.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedmtl.server.dispatch import clients_for_round
from fedmtl.server.optimizers import ServerOptimizer
from fedmtl.server.robust import RobustSpec, aggregate_updates, robust_aggregate
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


@dataclass(frozen=True)
class PlainRelease:
    """The server's steps without a privacy mechanism: a fixed-size sample of the clients
    (seeded by the round), the per-group (robust) means of their updates, nothing after the
    merge. :class:`fedmtl.privacy.release.PrivateRelease` takes its place under
    ``privacy.dp_fedavg`` or ``privacy.secure_sum``."""

    robust: RobustSpec | None = None
    seed: int = 0

    #: the server sees each update: the bounded-influence screen by norm applies
    screens_norms = True

    def participants(self, clients: list[str], per_round: float, round_: int) -> list[str]:
        return clients_for_round(clients, per_round, self.seed, round_)

    def aggregate(self, updates, state, clients, per_round, release_group, rows):
        return group_aggregate(updates, self.robust), None

    def after_merge(self, state: ServerState, merged: ServerState, report) -> None:
        pass


def group_aggregate(
    updates: Sequence[ClientUpdate], robust: RobustSpec | None = None
) -> dict[str, GroupAggregate]:
    """Per group, the sample-weighted mean of the members' updates (sorted by client id), or,
    with a ``robust`` rule other than the mean, that rule over each member's whole update
    (:func:`fedmtl.server.robust.aggregate_updates`). Parts a method keeps local
    (``delta_base`` None, no heads) stay absent."""
    by_group: dict[str, list[ClientUpdate]] = defaultdict(list)
    for u in sorted(updates, key=lambda u: u.client):
        by_group[u.group].append(u)
    out: dict[str, GroupAggregate] = {}
    if robust is not None and robust.rule != "mean":
        return {
            group: aggregate_updates(members, robust) for group, members in sorted(by_group.items())
        }
    for group, members in sorted(by_group.items()):
        weights = [max(u.n_samples, 0) for u in members]
        if sum(weights) == 0:
            weights = [1] * len(members)
        shares_base = members[0].delta_base is not None
        if any((u.delta_base is not None) != shares_base for u in members):
            raise ValueError(
                f"group '{group}': some clients released a base update and some did not"
            )
        tasks = members[0].delta_heads.keys()
        partial = any(u.task_samples is not None for u in members)
        task_samples = {t: sum(u.samples_for(t) for u in members) for t in tasks}
        out[group] = GroupAggregate(
            group=group,
            n_clients=len(members),
            n_samples=sum(u.n_samples for u in members),
            delta_base=weighted_mean([u.delta_base for u in members], weights)
            if shares_base
            else None,
            delta_heads={t: head_mean(members, t, weights, partial) for t in tasks},
            clients=[u.client for u in members],
            task_samples=task_samples if partial else None,
        )
    return out


def head_mean(
    members: Sequence[ClientUpdate], task: str, weights: list[int], partial: bool
) -> Vector:
    """The members' mean update of ``task``'s head: weighted by their rows holding its label when
    some lack it (a client without the task's labels does not pull its head towards no change;
    no member with them: no change)."""
    if not partial:
        return weighted_mean([u.delta_heads[task] for u in members], weights)
    counts = [u.samples_for(task) for u in members]
    if sum(counts) == 0:
        return torch.zeros_like(members[0].delta_heads[task])
    return weighted_mean([u.delta_heads[task] for u in members], counts)


def global_merge(
    state: ServerState,
    groups: dict[str, GroupAggregate],
    weighting: str = "samples",
    optimizer: ServerOptimizer | None = None,
    head_scope: str = "group",
    robust: RobustSpec | None = None,
    client_updates: Sequence[ClientUpdate] | None = None,
) -> ServerState:
    """The next server state from this round's group aggregates (the input state is unchanged).

    ``head_scope``: ``group`` (fedmtl, IFCA: φ_g ← φ_g + Δφ_g, φ₀ = mean of the φ_g) or
    ``global`` (FedAvg-like methods: one head φ₀ stepped by the server optimiser like θ).
    The members of each aggregate are recorded in the state's client → group assignment.
    ``robust``: a rule other than the mean also steps the shared base robustly. Given the round's
    ``client_updates``, the rule runs over every client's Δθ at once rather than over the group
    aggregates: attackers need not spread evenly over the groups, and two of five in one group
    (40 %) carry that group's trimmed mean or Krum choice, after which a rule over a handful of
    group aggregates has nothing left to outvote; over all the clients they stay the 20 % they
    are. Without them, the rule combines the groups' base updates when there are at least 3.
    Group heads are only ever aggregated within their group.
    """
    if not groups:
        raise ValueError(f"round {state.round}: no group aggregates to merge (no client updates)")
    optimizer = optimizer or ServerOptimizer()
    moments = dict(state.optimizer)
    ordered = [groups[g] for g in sorted(groups)]
    weights = [
        a.weight if a.weight is not None else group_weight(a.n_samples, a.n_clients, weighting)
        for a in ordered
    ]

    base = state.base
    with_base = [(a, w) for a, w in zip(ordered, weights) if a.delta_base is not None]
    if with_base:
        deltas, ws = [a.delta_base for a, _ in with_base], [w for _, w in with_base]
        flat = [
            u
            for u in sorted(client_updates or (), key=lambda u: u.client)
            if u.delta_base is not None
        ]
        if robust is not None and robust.rule != "mean" and len(flat) >= 3:
            deltas, ws = [u.delta_base for u in flat], [float(max(u.n_samples, 1)) for u in flat]
        if robust is not None and robust.rule != "mean" and len(deltas) >= 3:
            step, _ = robust_aggregate(
                deltas,
                ws,
                robust.rule,
                trim_fraction=robust.trim_fraction,
                n_byzantine=robust.n_byzantine,
                max_norm=robust.max_norm,
            )
        else:
            step = weighted_mean(deltas, ws)
        base = optimizer.step("base", state.base, step, moments)

    group_heads = {
        g: {t: v.clone() for t, v in heads.items()} for g, heads in state.group_heads.items()
    }
    global_heads = {t: v.clone() for t, v in state.global_heads.items()}
    headed = [(a, w) for a, w in zip(ordered, weights) if not a.pooled]
    ordered_heads = [a for a, _ in headed]
    tasks = [t for t in state.global_heads if ordered_heads and t in ordered_heads[0].delta_heads]
    if head_scope == "group":
        for agg in ordered_heads:
            current = group_heads.setdefault(
                agg.group, {t: v.clone() for t, v in state.global_heads.items()}
            )
            for task, d in agg.delta_heads.items():
                current[task] = current[task] + d
        if group_heads:
            global_heads = {
                t: weighted_mean(
                    [group_heads[g][t] for g in sorted(group_heads)], [1.0] * len(group_heads)
                )
                for t in state.global_heads
            }
    elif head_scope == "global":
        for t in tasks:
            # groups without a row of the task's labels leave its head out of the mean
            having = [(a, w) for a, w in headed if a.task_samples is None or a.task_samples[t]]
            if not having:
                continue
            delta = weighted_mean([a.delta_heads[t] for a, _ in having], [w for _, w in having])
            global_heads[t] = optimizer.step(f"head/{t}", state.global_heads[t], delta, moments)
    else:
        raise ValueError(
            f"head_scope '{head_scope}' is not known; allowed values: 'group', 'global'"
        )
    assignment = dict(state.assignment)
    for agg in ordered_heads:
        assignment.update({c: agg.group for c in agg.clients})
    return ServerState(
        state.round + 1, base, group_heads, global_heads, assignment, moments, dict(state.privacy)
    )
