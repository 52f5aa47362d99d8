"""Shamir t-of-n secret sharing of byte strings over the prime field GF(P), P = 2^256 + 297.

A secret of ``L`` bytes is cut into ``ceil(L / 32)`` chunks of at most 32 bytes; every chunk is a
field element (P is the smallest prime above 2^256, so any 32-byte value fits) and is shared with
its own random polynomial f of degree t − 1, f(0) = chunk. Share i holds x = i (1 ≤ i ≤ n) and the
values f(x) of all the chunk polynomials, plus the secret's length, so :func:`combine` returns the
original bytes exactly.

Security: any t − 1 shares are statistically independent of the secret (the t − 1 non-constant
coefficients are uniform in GF(P)), any t shares determine it. The coefficients come from ``rng``:
by default :class:`random.SystemRandom` (``os.urandom``); a seeded :class:`random.Random` makes the
shares reproducible and is for tests only. :func:`combine` interpolates at 0 with the first t
distinct shares; it raises :class:`ValueError` when fewer than t distinct shares are given, when
shares disagree on x or on the secret's shape, or when the result cannot be a chunk of the secret.

This is the only hand-written arithmetic of :mod:`fedmtl.secagg` apart from the fixed-point code;
it is plain Python integers (a SecAgg+ neighbourhood has tens of holders, so it is small).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

P = 2**256 + 297
CHUNK_BYTES = 32
ELEMENT_BYTES = 33  # ceil(log2(P) / 8)
_HEADER_BYTES = 8  # x (4 bytes) and the secret's length (4 bytes)


@dataclass(frozen=True)
class Share:
    """One holder's share: x, the values f_j(x) of the chunk polynomials, the secret's length."""

    x: int
    ys: tuple[int, ...]
    length: int

    def to_bytes(self) -> bytes:
        head = self.x.to_bytes(4, "big") + self.length.to_bytes(4, "big")
        return head + b"".join(y.to_bytes(ELEMENT_BYTES, "big") for y in self.ys)

    @classmethod
    def from_bytes(cls, data: bytes) -> Share:
        if len(data) < _HEADER_BYTES:
            raise ValueError(f"a share is at least {_HEADER_BYTES} bytes, got {len(data)}")
        x = int.from_bytes(data[:4], "big")
        length = int.from_bytes(data[4:8], "big")
        n_chunks = _n_chunks(length)
        if len(data) != _HEADER_BYTES + n_chunks * ELEMENT_BYTES:
            raise ValueError(f"a share of a {length}-byte secret has {n_chunks} field elements")
        body = data[_HEADER_BYTES:]
        ys = tuple(
            int.from_bytes(body[i * ELEMENT_BYTES : (i + 1) * ELEMENT_BYTES], "big")
            for i in range(n_chunks)
        )
        return cls(x=x, ys=ys, length=length)


def split(secret: bytes, n: int, t: int, rng: random.Random | None = None) -> list[Share]:
    """Shares x = 1..n of ``secret``; any ``t`` of them reconstruct it, ``t − 1`` reveal nothing."""
    if not isinstance(secret, bytes | bytearray) or not secret:
        raise ValueError("the secret must be a non-empty bytes object")
    if not 1 <= t <= n:
        raise ValueError(f"Shamir sharing needs 1 <= t <= n, got t={t}, n={n}")
    if n >= 2**32:
        raise ValueError(f"too many shares: n={n}")
    rng = rng if rng is not None else random.SystemRandom()
    chunks = [secret[i : i + CHUNK_BYTES] for i in range(0, len(secret), CHUNK_BYTES)]
    polys = [[int.from_bytes(c, "big")] + [rng.randrange(P) for _ in range(t - 1)] for c in chunks]
    return [
        Share(x=x, ys=tuple(_evaluate(poly, x) for poly in polys), length=len(secret))
        for x in range(1, n + 1)
    ]


def combine(shares: Sequence[Share], t: int) -> bytes:
    """The secret from at least ``t`` shares (ValueError when fewer distinct shares are given)."""
    if t < 1:
        raise ValueError(f"the threshold must be at least 1, got t={t}")
    distinct = _distinct(shares)
    if len(distinct) < t:
        raise ValueError(
            f"Shamir reconstruction needs at least t={t} distinct shares, got {len(distinct)}"
        )
    chosen = distinct[:t]
    length = chosen[0].length
    if any(s.length != length or len(s.ys) != _n_chunks(length) for s in chosen):
        raise ValueError("the shares belong to secrets of different lengths")
    weights = _lagrange_at_zero([s.x for s in chosen])
    out = bytearray()
    for j in range(_n_chunks(length)):
        value = sum(w * s.ys[j] for w, s in zip(weights, chosen, strict=True)) % P
        size = min(CHUNK_BYTES, length - j * CHUNK_BYTES)
        if value >= 1 << (8 * size):
            raise ValueError("the shares are inconsistent: the reconstructed chunk is out of range")
        out += value.to_bytes(size, "big")
    return bytes(out)


def _n_chunks(length: int) -> int:
    return -(-length // CHUNK_BYTES)


def _evaluate(coefficients: list[int], x: int) -> int:
    """f(x) mod P by Horner's rule; ``coefficients[0]`` is f(0)."""
    acc = 0
    for c in reversed(coefficients):
        acc = (acc * x + c) % P
    return acc


def _distinct(shares: Sequence[Share]) -> list[Share]:
    """The shares with distinct x in order of x; identical duplicates are dropped."""
    by_x: dict[int, Share] = {}
    for s in shares:
        if not isinstance(s, Share):
            raise TypeError(f"expected Share objects, got {type(s).__name__}")
        if not 0 < s.x < P:
            raise ValueError(f"a share's x must be in 1..P-1, got {s.x}")
        if s.x in by_x and by_x[s.x] != s:
            raise ValueError(f"two different shares have x={s.x}")
        by_x[s.x] = s
    return [by_x[x] for x in sorted(by_x)]


def _lagrange_at_zero(xs: Sequence[int]) -> list[int]:
    """λ_i = Π_{j≠i} x_j / (x_j − x_i) mod P, so that f(0) = Σ λ_i f(x_i)."""
    weights = []
    for i, xi in enumerate(xs):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                num = num * xj % P
                den = den * (xj - xi) % P
        weights.append(num * pow(den, -1, P) % P)
    return weights
