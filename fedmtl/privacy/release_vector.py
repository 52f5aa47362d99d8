"""A client's release vector and how its release's sum is read back (the layout both sides of
a private sum agree on; :mod:`fedmtl.privacy.aggregation` runs the sums).

The vector is the client's base update, then its head updates in the release's task order
(none in a pooled, base-only release). Under DP it is clipped to L2 norm C; without DP it is
weighted by the client's train rows over a public scale and clipped coordinate-wise to
±``secure_sum.range``, and with optional tasks each head is weighted by its own labelled rows,
those weights following the vector (:func:`release_input`, :func:`per_task_mean`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedmtl.config.privacy import PrivacyConfig
from fedmtl.privacy import dp
from fedmtl.state import ClientUpdate, Heads, Vector


def release_input(
    u: ClientUpdate,
    spec: PrivacyConfig,
    clip: float,
    weight_scale: float,
    tasks: list[str],
    partial: bool = False,
) -> tuple[Vector, float]:
    """What a client puts into its release's sum: its vector (base update, then the ``tasks``'
    head updates) clipped to L2 norm C with its under-clip bit (DP), or weighted by its train
    rows over the public scale with its weight, each coordinate clipped to ±``secure_sum.range``.

    ``partial`` (optional tasks, without DP): each head is weighted by the client's rows that
    hold its label instead (at most its train rows), and those weights follow the vector, times
    ``secure_sum.range`` (within the sum's range), so that the sum also gives each head's total
    weight: a head is then the mean over the clients that hold its labels, as in the plain
    release. Under DP nothing changes: a client without a task's labels adds a zero head
    update, and each head is the release's sum over its expected number of clients."""
    v = vector(u, tasks)
    if spec.dp:
        v, norm = dp.clip_update(v, clip)
        return v, 1.0 if norm <= clip else 0.0  # the client's bit for adaptive clipping
    bound = spec.secure_sum.range
    rows = max(u.n_samples, 0)
    w = rows / weight_scale
    if not (partial and tasks):
        return (v * w).clamp(-bound, bound), w
    weights = [min(max(u.samples_for(t), 0), rows) / weight_scale for t in tasks]
    base = v.numel() - sum(u.delta_heads[t].numel() for t in tasks)
    scale = torch.cat(
        [torch.full((base,), w)]
        + [torch.full((u.delta_heads[t].numel(),), wt) for t, wt in zip(tasks, weights)]
    )
    return torch.cat([(v * scale).clamp(-bound, bound), torch.tensor(weights) * bound]), w


def layout(updates: Sequence[ClientUpdate], heads: bool) -> tuple[int, dict[str, int], list[str]]:
    first = updates[0]
    base = first.delta_base.numel() if first.delta_base is not None else -1
    tasks = sorted(first.delta_heads) if heads else []
    return base, {t: first.delta_heads[t].numel() for t in tasks}, tasks


def vector(u: ClientUpdate, tasks: list[str]) -> Vector:
    parts = ([u.delta_base.reshape(-1)] if u.delta_base is not None else []) + [
        u.delta_heads[t].reshape(-1) for t in tasks
    ]
    return torch.cat(parts).to(torch.float32) if parts else torch.zeros(0)


def split(
    total: Vector, base: int, sizes: dict[str, int], tasks: list[str]
) -> tuple[Vector | None, Heads]:
    offset = 0
    delta_base = None
    if base >= 0:
        delta_base, offset = total[:base].clone(), base
    heads = {}
    for t in tasks:
        heads[t] = total[offset : offset + sizes[t]].clone()
        offset += sizes[t]
    return delta_base, heads


def per_task_mean(
    total: torch.Tensor,
    weight_sum: float,
    base: int,
    sizes: dict[str, int],
    tasks: list[str],
    bound: float,
    weight_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``partial`` release's sum into its mean: the base over the members' weight sum, each
    head over its own (the trailing coordinates, over ``bound``; a head no member holds labels
    for: no change). Returns the mean's vector (without those coordinates) and the head weights
    (the sums of rows / ``weight_scale``)."""
    task_weights = total[-len(tasks) :] / bound
    divisor = torch.cat(
        [torch.full((max(base, 0),), weight_sum, dtype=total.dtype)]
        + [
            torch.full((sizes[t],), float(w), dtype=total.dtype)
            for t, w in zip(tasks, task_weights)
        ]
    )
    values = total[: -len(tasks)]
    # weights are whole rows over the scale: under half a row is the secure sum's rounding of 0
    some = divisor > 0.5 / weight_scale
    mean = torch.where(some, values / torch.where(some, divisor, 1.0), torch.zeros_like(values))
    return mean, torch.where(task_weights > 0.5 / weight_scale, task_weights, 0.0)
