"""Dispatch: which clients take part in a round, which group each one belongs to, and how a
round's clients are split into training tasks (:func:`shards`)."""

from __future__ import annotations

import heapq
import math
import os
from collections.abc import Mapping, Sequence

import numpy as np


def clients_for_round(
    clients: Sequence[str], per_round: float, seed: int, round_: int
) -> list[str]:
    """Sample clients without replacement: ``per_round`` <= 1 is a fraction, > 1 a count.
    Seeded by (seed, round); the result keeps the input order."""
    n = len(clients)
    if n == 0:
        return []
    k = math.ceil(per_round * n) if per_round <= 1 else int(per_round)
    k = min(max(k, 1), n)
    if k == n:
        return list(clients)
    rng = np.random.default_rng([seed, round_])
    chosen = set(rng.choice(n, size=k, replace=False).tolist())
    return [c for i, c in enumerate(clients) if i in chosen]


def sample_rate(per_round: float, n_clients: int) -> float:
    """``training.clients_per_round`` as a rate: a fraction as is, a count over the clients."""
    if n_clients <= 0:
        return 1.0
    return min(1.0, per_round if per_round <= 1 else per_round / n_clients)


#: Fewest clients an automatically sized shard holds (smaller shards would not amortise the
#: batched step's per-step cost, see fedmtl/client/batched.py).
MIN_CLIENTS_PER_TASK = 8


def default_workers() -> int:
    """The workers that train shards side by side: the machine's CPU count."""
    return max(os.cpu_count() or 1, 1)


def shards(
    clients: Sequence[str],
    clients_per_task: int | None = None,
    workers: int | None = None,
    rows: Mapping[str, int] | None = None,
) -> list[list[str]]:
    """Split a round's clients into shards, one training task each; every shard keeps the
    clients in their input order.

    ``clients_per_task`` given: contiguous shards of that many clients, the last one smaller.
    None (``training.clients_per_task: null``): one shard per worker (each task costs ~20-30 ms
    of Prefect overhead, and a batched shard trains at about the cost of its largest client),
    but none smaller than :data:`MIN_CLIENTS_PER_TASK` clients: ``max(1, min(workers,
    n // MIN_CLIENTS_PER_TASK))`` shards. Without ``rows`` they are contiguous and their sizes
    differ by at most one. With ``rows`` (each client's training rows) the shards are balanced
    by rows, as workers running side by side finish with their heaviest shard: the clients,
    largest first, each join the shard with the fewest rows so far (longest-processing-time
    first; ties: the earlier shard), e.g. HAR's 30 users on 2 workers: 4,092 and 4,095 rows
    instead of 3,750 and 4,437. ``workers`` defaults to :func:`default_workers`."""
    clients = list(clients)
    n = len(clients)
    if n == 0:
        return []
    if clients_per_task is not None:
        if clients_per_task < 1:
            raise ValueError(
                f"training.clients_per_task must be at least 1, got {clients_per_task}"
            )
        return [clients[i : i + clients_per_task] for i in range(0, n, clients_per_task)]
    workers = default_workers() if workers is None else max(int(workers), 1)
    count = max(1, min(workers, n // MIN_CLIENTS_PER_TASK))
    if rows is not None and count > 1:
        loads = [(0, i) for i in range(count)]  # (rows so far, shard): a heap
        member = [0] * n
        for pos in sorted(range(n), key=lambda p: (-int(rows.get(clients[p], 0)), p)):
            load, shard = heapq.heappop(loads)
            member[pos] = shard
            heapq.heappush(loads, (load + int(rows.get(clients[pos], 0)), shard))
        return [[c for c, m in zip(clients, member) if m == i] for i in range(count)]
    small, extra = divmod(n, count)  # the first `extra` shards get one client more
    out, start = [], 0
    for i in range(count):
        end = start + small + (1 if i < extra else 0)
        out.append(clients[start:end])
        start = end
    return out
