"""Fixed-point encoding of float vectors into Z/2^32 for secure aggregation, and back.

Secure aggregation adds vectors modulo 2^32 (numpy ``uint32`` wraps), so the floats are first
mapped to integers: x ↦ q = round(clip(x, −clip, clip) · 2^f) mod 2^32, a two's-complement int32.
A sum of n such values is decoded by reading the uint32 sum as int32 and dividing by 2^f.

Range: ``FixedPoint(clip, n_summands)`` picks the largest number of fractional bits f with
n · ceil(clip · 2^f) ≤ 2^31 − 1, so a sum of up to ``n_summands`` encoded values cannot wrap
(every |q| ≤ ceil(clip · 2^f), since rounding never goes past ceil). Fewer than
:data:`MIN_FRAC_BITS` fractional bits raise :class:`ValueError` naming clip and n_summands:
the grid would be too coarse to be of use (the caller should lower the clip or the group size).

Precision: for |x| ≤ clip the encoding error is at most ``precision = 2^−(f+1)`` (round to
nearest), so a decoded sum of n values is within n · precision of the exact float sum of the
(clipped) inputs, plus float64 round-off.

Clipping: values outside [−clip, clip] (±inf included) are clipped to ±clip *before* encoding,
silently, as in DP-style update clipping; ``clip`` must bound what the caller puts in (for
weighted sums, the weighted values). NaN raises :class:`ValueError`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

MODULUS_BITS = 32
MIN_FRAC_BITS = 8
_INT32_MAX = 2**31 - 1


class FixedPoint:
    """Encoder of floats in [−clip, clip] into uint32 with ``frac_bits`` fractional bits."""

    def __init__(self, clip: float, n_summands: int) -> None:
        clip = float(clip)
        if not (math.isfinite(clip) and clip > 0):
            raise ValueError(f"FixedPoint clip must be a positive finite number, got {clip}")
        if isinstance(n_summands, bool) or not isinstance(n_summands, int | np.integer):
            raise ValueError(f"FixedPoint n_summands must be an integer, got {n_summands!r}")
        if n_summands < 1:
            raise ValueError(f"FixedPoint n_summands must be at least 1, got {n_summands}")
        self.clip = clip
        self.n_summands = int(n_summands)
        self.frac_bits = _largest_frac_bits(clip, self.n_summands)
        if self.frac_bits < MIN_FRAC_BITS:
            raise ValueError(
                f"FixedPoint(clip={clip}, n_summands={n_summands}) leaves {self.frac_bits} "
                f"fractional bits in a {MODULUS_BITS}-bit sum, fewer than {MIN_FRAC_BITS}: "
                f"lower the clip or the number of summands (clip·n must stay below "
                f"{max_clip(1, MIN_FRAC_BITS):.0f})"
            )
        self.scale = float(2**self.frac_bits)
        self.max_word = math.ceil(clip * self.scale)

    @property
    def precision(self) -> float:
        """The largest encoding error of one value in [−clip, clip]: 2^−(frac_bits+1)."""
        return 0.5 / self.scale

    def sum_error_bound(self, n: int | None = None) -> float:
        """The largest error of a decoded sum of ``n`` (default ``n_summands``) encoded values."""
        return (self.n_summands if n is None else n) * self.precision

    def encode(self, x: Any) -> np.ndarray:
        """A 1-D float vector (numpy, torch or a sequence) as uint32 words, clipped to ±clip."""
        v = _as_float64_vector(x)
        if np.isnan(v).any():
            raise ValueError("FixedPoint.encode: the vector contains NaN")
        q = np.rint(np.clip(v, -self.clip, self.clip) * self.scale)
        return q.astype(np.int64).astype(np.int32).view(np.uint32)

    def decode_sum(self, words: np.ndarray) -> np.ndarray:
        """The float64 values of a (sum of) encoded vectors: two's complement / 2^frac_bits."""
        if not isinstance(words, np.ndarray) or words.dtype != np.uint32:
            raise TypeError(f"decode_sum expects a numpy uint32 array, got {_describe(words)}")
        return words.view(np.int32).astype(np.float64) / self.scale

    def __repr__(self) -> str:
        return (
            f"FixedPoint(clip={self.clip}, n_summands={self.n_summands}, "
            f"frac_bits={self.frac_bits})"
        )


def max_clip(n_summands: int, frac_bits: int = MIN_FRAC_BITS) -> float:
    """The largest clip such that ``n_summands`` values keep ``frac_bits`` fractional bits."""
    if n_summands < 1 or frac_bits < 0:
        raise ValueError(f"need n_summands >= 1 and frac_bits >= 0, got {n_summands}, {frac_bits}")
    return (_INT32_MAX // n_summands) / 2**frac_bits


def _largest_frac_bits(clip: float, n: int) -> int:
    """max f with n · ceil(clip · 2^f) ≤ 2^31 − 1 (may be negative when clip · n is huge)."""
    f = math.floor(math.log2(_INT32_MAX / (n * clip)))
    while f > -1100 and n * math.ceil(clip * 2.0**f) > _INT32_MAX:
        f -= 1
    while f < 1000 and n * math.ceil(clip * 2.0 ** (f + 1)) <= _INT32_MAX:
        f += 1
    return f


def _as_float64_vector(x: Any) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor, without importing torch
        x = x.detach().cpu().double().numpy()
    v = np.asarray(x, dtype=np.float64)
    if v.ndim != 1:
        raise ValueError(f"FixedPoint.encode expects a 1-D vector, got shape {v.shape}")
    return v


def _describe(x: Any) -> str:
    if isinstance(x, np.ndarray):
        return f"ndarray of {x.dtype}"
    return type(x).__name__
