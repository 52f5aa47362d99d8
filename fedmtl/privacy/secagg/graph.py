"""SecAgg+'s public setup: the k-regular Harary graph of who shares with whom, its degree for a
tolerated dropout, the Shamir threshold, and the protocol's parameters."""

from __future__ import annotations

import functools
import math
import random
import secrets
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

from fedmtl.privacy.fixedpoint import FixedPoint, max_clip
from fedmtl.privacy.secagg.messages import SecAggError

# --------------------------------------------------------------------------- public setup


DEFAULT_MAX_DROPOUT = 0.1
"""The dropout the default graph degree is sized for: 6-10 % of devices drop out of a round
in production cross-device federations (Bonawitz et al., "Towards federated learning at
scale", 2019); set ``max_dropout`` (``privacy.secure_sum.max_dropout``) for flakier clients."""
LOSS_PROBABILITY = 1e-4
"""The default degree keeps the chance that a session loses its sum below this."""


@functools.lru_cache(maxsize=1024)
def default_neighbours(
    n: int, max_dropout: float = DEFAULT_MAX_DROPOUT, loss: float = LOSS_PROBABILITY
) -> int:
    """The graph degree: at least 2·⌈log2 n⌉ + 1, the O(log n) degree that keeps the graph connected
    (a sparser one, say a perfect matching, would give the server each pair's sum), and at least the
    smallest k such that, when up to D = ⌊max_dropout · n⌋ of the n clients drop out at random
    between sharing their keys and unmasking, the sum is lost with probability at most ``loss``.
    Capped at n − 1, the complete graph of the original SecAgg.

    The bound, exact but for one union bound: client u's secrets are lost when fewer than
    t = ⌊k/2⌋ + 1 of its k neighbours respond, i.e. when more than k − t of them dropped. The
    graph is a Harary graph on a uniformly random ring order, so u's k neighbours are a uniformly
    random k-subset of the other n − 1 clients, and for any set of D dropped clients chosen
    independently of that order (at random, not by someone who reads the graph) the number of
    u's neighbours among them is hypergeometric: k draws without replacement from n − 1 clients
    of which D (D − 1 when u itself dropped) are gone. So
    P(u's secrets lost) ≤ P[Hypergeom(n − 1, D, k) > k − t], which grows with D (fewer dropouts
    are covered too) and does not grow with an extra neighbour (the one client with k + 1); the
    union bound over the n clients must keep n · P ≤ ``loss``. This replaces the earlier
    stand-in Binomial(k, 1 − max_dropout) < t, a valid but loose bound for the same model: it
    samples with replacement, so it lets all k neighbours drop even when k > D, and at n = 100
    and 30 % it asked for k = 131, i.e. the complete graph, where the exact tail needs k = 53.
    The guarantee is for at most a fraction ``max_dropout`` of the clients going silent: when
    every device drops independently with probability p, size for a fraction above p (at
    n = 100, more than 30 % drop about half the time when p = 0.3).

    E.g. n = 100: k = 17 at 10 %, 31 at 20 %, 53 at 30 %; n = 1,000: 25, 57 and 133. Against
    the server alone privacy does not depend on k: a Harary graph H(k, n) is k-connected, so
    while fewer than k clients drop out (30 < 53 at n = 100) the survivors' graph stays connected
    and the server learns only their total, not sums of parts of it. Against a server colluding
    with clients the bar is t = ⌊k/2⌋ + 1 of one client's neighbours, so a smaller k lowers it
    (27 at k = 53, against 50 with the complete graph); k is sized for dropout only, not for a
    fraction of corrupt clients as in Bell et al., here as before. ``neighbours`` (or
    ``privacy.secure_sum.neighbours``) sets a larger k where more collusion must be tolerated."""
    if n < 2:
        raise ValueError(f"secure aggregation needs at least 2 clients, got {n}")
    if not 0.0 <= max_dropout < 0.5:
        raise ValueError(
            f"max_dropout must be in [0, 0.5): a majority of survivors is needed, got {max_dropout}"
        )
    from scipy.stats import (
        hypergeom,
    )  # scikit-learn's dependency; imported when a session is set up

    dropped = min(n - 1, math.floor(max_dropout * n + 1e-9))  # 1e-9: 0.57 · 100 is 56.99999…
    k = min(n - 1, 2 * math.ceil(math.log2(n)) + 1)
    while k < n - 1 and n * hypergeom.sf(k - (k // 2 + 1), n - 1, dropped, k) > loss:
        k += 1
    return k


def resolve_threshold(k: int, threshold: int | float | None = None) -> int:
    """t from ``threshold``: None → ⌊k/2⌋ + 1; an int → itself; a float f → ⌈f·k⌉; needs 2t > k."""
    if threshold is None:
        t = k // 2 + 1
    elif isinstance(threshold, bool):
        raise ValueError(f"threshold must be an int or a float fraction of k, got {threshold!r}")
    elif isinstance(threshold, int | np.integer):
        t = int(threshold)
    elif isinstance(threshold, float) and 0.0 < threshold <= 1.0:
        t = math.ceil(threshold * k - 1e-9)
    else:
        raise ValueError(f"threshold must be an int or a fraction in (0, 1], got {threshold!r}")
    if not (2 * t > k and t <= k):
        raise ValueError(
            f"threshold t={t} with k={k} neighbours: need k/2 < t <= k (t = {k // 2 + 1}..{k}), "
            "so that no client's b-share and s-share can both reach the server"
        )
    return t


def harary_graph(clients: Sequence[str], k: int, seed: bytes | int) -> dict[str, frozenset[str]]:
    """A random Harary graph H(k, n): the clients on a ring in a seeded random order, each linked
    to its ⌊k/2⌋ nearest on either side, plus the diameter for odd k. Every client has k
    neighbours (one has k + 1 when k and n are odd); k ≥ n − 1 gives the complete graph."""
    ids = sorted(set(clients))
    n = len(ids)
    if n != len(clients):
        raise ValueError("client ids must be distinct")
    if n < 2 or k < 1:
        raise ValueError(f"a communication graph needs n >= 2 and k >= 1, got n={n}, k={k}")
    if k >= n - 1:
        return {u: frozenset(v for v in ids if v != u) for u in ids}
    ring = list(ids)
    random.Random(seed).shuffle(ring)
    adjacent: dict[str, set[str]] = {u: set() for u in ids}

    def link(i: int, j: int) -> None:
        adjacent[ring[i]].add(ring[j % n])
        adjacent[ring[j % n]].add(ring[i])

    for i in range(n):
        for step in range(1, k // 2 + 1):
            link(i, i + step)
    if k % 2:
        for i in range((n + 1) // 2):
            link(i, i + n // 2)
    return {u: frozenset(vs) for u, vs in adjacent.items()}


@dataclass(frozen=True)
class SecAggParams:
    """The public parameters of one aggregation: clients, graph, k, t, d, encodings, session."""

    clients: tuple[str, ...]
    neighbours: Mapping[str, frozenset[str]]
    k: int
    t: int
    dim: int
    fixed_point: FixedPoint
    scalar_point: FixedPoint | None
    session: bytes

    @property
    def n_words(self) -> int:
        return self.dim + (1 if self.scalar_point is not None else 0)

    @classmethod
    def create(
        cls,
        clients: Collection[str],
        dim: int,
        *,
        clip: float,
        neighbours: int | None = None,
        max_dropout: float = DEFAULT_MAX_DROPOUT,
        threshold: int | float | None = None,
        scalar: bool = False,
        scalar_clip: float | None = None,
        session: bytes | None = None,
    ) -> SecAggParams:
        """Public parameters for ``clients`` and vectors of length ``dim`` (see the module doc);
        ``scalar`` adds one coordinate with its own range ``scalar_clip``; ``session`` seeds the
        graph and salts every key derivation (random when None)."""
        ids = tuple(sorted(clients))
        if any(not isinstance(u, str) or not u for u in ids):
            raise ValueError("client ids must be non-empty strings")
        if len(set(ids)) != len(ids):
            raise ValueError("client ids must be distinct")
        n = len(ids)
        if n < 2:
            raise SecAggError(f"secure aggregation needs at least 2 clients, got {n}")
        if dim < 1:
            raise ValueError(f"the vector length must be positive, got {dim}")
        k = (
            default_neighbours(n, max_dropout)
            if neighbours is None
            else min(int(neighbours), n - 1)
        )
        if k < 1:
            raise ValueError(f"neighbours must be at least 1, got {neighbours}")
        session = secrets.token_bytes(16) if session is None else bytes(session)
        scalar_point = None
        if scalar:
            scalar_point = FixedPoint(max_clip(n) if scalar_clip is None else scalar_clip, n)
        return cls(
            clients=ids,
            neighbours=MappingProxyType(harary_graph(ids, k, session)),
            k=k,
            t=resolve_threshold(k, threshold),
            dim=int(dim),
            fixed_point=FixedPoint(clip, n),
            scalar_point=scalar_point,
            session=session,
        )
