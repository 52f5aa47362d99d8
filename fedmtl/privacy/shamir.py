"""Shamir t-of-n secret sharing of byte strings over the prime field GF(P), P = 2^31 − 1.

A secret of ``L`` bytes is cut into ``ceil(L / 3)`` chunks of at most 3 bytes; every chunk is a
field element (any 3-byte value is below 2^24 < P) and is shared with its own random polynomial f
of degree t − 1, f(0) = chunk. Share i holds x = i (1 ≤ i ≤ n) and the values f(x) of all the
chunk polynomials, plus the secret's length, so :func:`combine` returns the original bytes
exactly. A 32-byte secret (a key or a seed of :mod:`fedmtl.privacy.secagg`) is 11 chunks, and one
share of it is 8 + 11 · 4 = 52 bytes.

Security: any t − 1 shares are statistically independent of the secret (the t − 1 non-constant
coefficients of every chunk polynomial are independent and uniform in GF(P), drawn by rejection so
that they are exactly uniform), any t shares determine it. The coefficients come from ``rng``: by
default :class:`random.SystemRandom` (``os.urandom``); a seeded :class:`random.Random` makes the
shares reproducible and is for tests only. :func:`combine` interpolates at 0 with the first t
distinct shares; it raises :class:`ValueError` when fewer than t distinct shares are given, when
shares disagree on x or on the secret's shape, or when the result cannot be a chunk of the secret
(a chunk above 2^24: inconsistent shares pass this check with probability 2^−7 per chunk, so
2^−77 for a 32-byte secret).

Vectorised: with P < 2^31 every field element fits an int64 and so does a product of an element
and a 16-bit number. :func:`split` evaluates every chunk polynomial at every x in one matrix
product, the Vandermonde matrix (x^j mod P, cached per (n, t)) times the coefficient matrix, with
the coefficients split into 16-bit halves so that no int64 sum of products can overflow (at most
2^15 terms per partial sum, each below 2^47); :func:`combine` takes the Lagrange weights at 0
(cached per set of xs, their denominators inverted with one ``pow``) and the shares' values to
the secret in the same way. :func:`_evaluate` is the scalar Horner reference the tests compare
the vectorised shares with, for the same coefficients.

This is the only hand-written arithmetic of :mod:`fedmtl.privacy.secagg` apart from the
fixed-point code.
"""

from __future__ import annotations

import functools
import random
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

P = 2**31 - 1  # a Mersenne prime
CHUNK_BYTES = 3  # the largest whole number of bytes below P
ELEMENT_BYTES = 4  # one field element on the wire (big-endian)
_HEADER_BYTES = 8  # x (4 bytes) and the secret's length (4 bytes)
_HALF = 16  # elements split into 16-bit halves for overflow-free int64 products
_BLOCK = 1 << 15  # terms per partial sum: 2^15 · (2^31 · 2^16) < 2^63


@dataclass(frozen=True)
class Share:
    """One holder's share: x, the values f_j(x) of the chunk polynomials, the secret's length."""

    x: int
    ys: tuple[int, ...]
    length: int

    def to_bytes(self) -> bytes:
        return struct.pack(f">II{len(self.ys)}I", self.x, self.length, *self.ys)

    @classmethod
    def from_bytes(cls, data: bytes) -> Share:
        if len(data) < _HEADER_BYTES:
            raise ValueError(f"a share is at least {_HEADER_BYTES} bytes, got {len(data)}")
        x, length = struct.unpack_from(">II", data)
        n_chunks = _n_chunks(length)
        if len(data) != _HEADER_BYTES + n_chunks * ELEMENT_BYTES:
            raise ValueError(f"a share of a {length}-byte secret has {n_chunks} field elements")
        ys = struct.unpack_from(f">{n_chunks}I", data, _HEADER_BYTES)
        if any(y >= P for y in ys):
            raise ValueError(f"a share's values must be field elements below {P}")
        return cls(x=x, ys=ys, length=length)


def split(secret: bytes, n: int, t: int, rng: random.Random | None = None) -> list[Share]:
    """Shares x = 1..n of ``secret``; any ``t`` of them reconstruct it, ``t − 1`` reveal nothing."""
    if not isinstance(secret, bytes | bytearray) or not secret:
        raise ValueError("the secret must be a non-empty bytes object")
    if not 1 <= t <= n:
        raise ValueError(f"Shamir sharing needs 1 <= t <= n, got t={t}, n={n}")
    if n >= P:
        raise ValueError(f"too many shares: n={n}, the field has {P} elements")
    rng = rng if rng is not None else random.SystemRandom()
    chunks = _chunks(bytes(secret))
    coefficients = np.vstack([chunks[None, :], _random_elements(rng, (t - 1, len(chunks)))])
    values = _matmul_mod(_vandermonde(n, t), coefficients)  # (n, chunks): f_j(x) for x = 1..n
    length = len(secret)
    return [
        Share(x=x, ys=tuple(row), length=length) for x, row in enumerate(values.tolist(), start=1)
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
    weights = np.array(_lagrange_at_zero(tuple(s.x for s in chosen)), dtype=np.int64)
    values = np.array([s.ys for s in chosen], dtype=np.int64)
    if values.min() < 0 or values.max() >= P:
        raise ValueError(f"a share's values must be field elements below {P}")
    chunks = _matmul_mod(weights[None, :], values)[0]
    sizes = [min(CHUNK_BYTES, length - j) for j in range(0, length, CHUNK_BYTES)]
    if any(int(c) >= 1 << (8 * size) for c, size in zip(chunks, sizes, strict=True)):
        raise ValueError("the shares are inconsistent: the reconstructed chunk is out of range")
    return b"".join(int(c).to_bytes(size, "big") for c, size in zip(chunks, sizes, strict=True))


def _n_chunks(length: int) -> int:
    return -(-length // CHUNK_BYTES)


def _chunks(secret: bytes) -> np.ndarray:
    """The secret's chunks as field elements (int64), big-endian within each chunk."""
    return np.array(
        [
            int.from_bytes(secret[i : i + CHUNK_BYTES], "big")
            for i in range(0, len(secret), CHUNK_BYTES)
        ],
        dtype=np.int64,
    )


def _random_elements(rng: random.Random, shape: tuple[int, int]) -> np.ndarray:
    """Independent uniform elements of GF(P): 31 random bits each, redrawn while equal to P."""
    count = shape[0] * shape[1]
    words = np.frombuffer(rng.randbytes(4 * count), dtype="<u4") & np.uint32(P)
    out = words.astype(np.int64)
    for i in np.flatnonzero(out == P).tolist():  # 2^−31 per element: rejection keeps it uniform
        while out[i] == P:
            out[i] = int.from_bytes(rng.randbytes(4), "little") & P
    return out.reshape(shape)


@functools.lru_cache(maxsize=32)
def _vandermonde(n: int, t: int) -> np.ndarray:
    """The (n, t) matrix x^j mod P for x = 1..n and j = 0..t−1 (read-only int64)."""
    rows = np.empty((n, t), dtype=np.int64)
    rows[:, 0] = 1
    x = np.arange(1, n + 1, dtype=np.int64)
    for j in range(1, t):
        rows[:, j] = rows[:, j - 1] * x % P  # < 2^31 · 2^31: no overflow
    rows.flags.writeable = False
    return rows


def _matmul_mod(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b mod P for int64 matrices of field elements, without overflow: b is split into 16-bit
    halves and the inner dimension summed in blocks of at most 2^15 terms."""
    lo, hi = b & ((1 << _HALF) - 1), b >> _HALF
    out = np.zeros((a.shape[0], b.shape[1]), dtype=np.int64)
    for start in range(0, a.shape[1], _BLOCK):
        block = slice(start, start + _BLOCK)
        high = (a[:, block] @ hi[block]) % P
        low = (a[:, block] @ lo[block]) % P
        out = (out + ((high << _HALF) % P) + low) % P  # each term below 2^47: no overflow
    return out


def _evaluate(coefficients: Sequence[int], x: int) -> int:
    """f(x) mod P by Horner's rule; ``coefficients[0]`` is f(0) (the scalar reference of split)."""
    acc = 0
    for c in reversed(coefficients):
        acc = (acc * x + int(c)) % P
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


@functools.lru_cache(maxsize=1024)
def _lagrange_at_zero(xs: tuple[int, ...]) -> tuple[int, ...]:
    """λ_i = Π_{j≠i} x_j / (x_j − x_i) mod P, so that f(0) = Σ λ_i f(x_i) (distinct xs in 1..P−1).

    The numerators are prefix times suffix products; the denominators are inverted together with
    one ``pow`` (Montgomery's trick: invert their product, then peel the single inverses off with
    prefix products). The weights of a set of xs are cached: a server rebuilds many secrets from
    shares held at the same xs."""
    m = len(xs)
    dens = []
    for i, xi in enumerate(xs):
        den = 1
        for j, xj in enumerate(xs):
            if j != i:
                den = den * (xj - xi) % P
        dens.append(den)
    prefix = [1] * (m + 1)  # prefix[i] = Π_{j<i} dens[j]
    for i, den in enumerate(dens):
        prefix[i + 1] = prefix[i] * den % P
    inverse = pow(prefix[m], -1, P)  # Π dens ≠ 0 because the xs are distinct and below P
    inverses = [0] * m
    for i in range(m - 1, -1, -1):
        inverses[i] = inverse * prefix[i] % P  # 1 / dens[i]
        inverse = inverse * dens[i] % P  # 1 / Π_{j<i} dens[j]
    suffix = [1] * (m + 1)  # suffix[i] = Π_{j≥i} xs[j]
    for i in range(m - 1, -1, -1):
        suffix[i] = suffix[i + 1] * xs[i] % P
    weights, head = [], 1  # head = Π_{j<i} xs[j]
    for i in range(m):
        weights.append(head * suffix[i + 1] % P * inverses[i] % P)
        head = head * xs[i] % P
    return tuple(weights)
