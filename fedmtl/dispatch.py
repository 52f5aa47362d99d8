"""Dispatch: which clients take part in a round, and which group each one belongs to."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def clients_for_round(clients: Sequence[str], per_round: float, seed: int, round_: int) -> list[str]:
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
