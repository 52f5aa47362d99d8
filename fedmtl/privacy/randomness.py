"""Secret randomness: where every random draw that a privacy guarantee rests on comes from.

DP's guarantee holds only if nobody can reproduce the noise or the sample of clients. A
generator seeded from ``training.seed`` (logged as an MLflow parameter) can be replayed: the
noise subtracted from a released sum gives the true sum back, and the round's participants are
known in advance (which voids the amplification by sampling the accountant counts on). Even a
*secret* seed does not help with ``torch.Generator``: its Mersenne Twister keeps only the low
32 bits of the seed (``manual_seed(s)`` and ``manual_seed(s + 2**32)`` draw the same numbers),
so a seed can be found by trying all 2³² of them.

So the draws that privacy depends on (DP-FedAvg's noise on every released sum, the adaptive
clip's count noise, the pooled evaluation's noise, the Poisson sample of clients, DP-SGD's
noise and batch sampling) come from :class:`SecretRandom`: a 256-bit key drawn with
:func:`secrets.token_bytes` once per run, and, for each purpose (e.g. ``("server", 7,
"dp-noise")``), a ChaCha20 key stream (``cryptography``) under the key HMAC-SHA256(run key,
purpose). The streams are unpredictable without the key and reproducible with it, so a run
resumed from its checkpoint draws exactly the noise the uninterrupted run would have drawn: the
coordinator keeps the key in the run's directory (``server.key``, mode 0600, never logged;
:meth:`SecretRandom.load_or_create`).

``privacy.insecure_seeded_noise`` (tests only) derives the key from ``training.seed`` instead:
the run's ε is then void, and the run and its model versions are tagged so.

Gaussians are drawn by the Box-Muller transform from 53-bit uniforms in float64. (Floating-point
attacks on the Gaussian mechanism, Mironov 2012, are not addressed.)
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

KEY_BYTES = 32
#: the file, in a training run's directory, that holds the run's key (mode 0600)
KEY_FILE = "server.key"
_NONCE = bytes(16)  # each stream has its own key, so one fixed nonce is safe


class SecretStream:
    """One purpose's stream of random numbers: a ChaCha20 key stream, read in order."""

    __slots__ = ("_encryptor",)

    def __init__(self, key: bytes) -> None:
        self._encryptor = Cipher(algorithms.ChaCha20(key, _NONCE), mode=None).encryptor()

    def __repr__(self) -> str:
        return "SecretStream(<secret>)"

    def bytes(self, n: int) -> bytes:
        return self._encryptor.update(bytes(n))

    def uniform(self, n: int) -> np.ndarray:
        """``n`` floats uniform in [0, 1), 53 random bits each."""
        words = np.frombuffer(self.bytes(8 * int(n)), dtype="<u8")
        return (words >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))

    def standard_normal(self, shape: Sequence[int] | torch.Size) -> torch.Tensor:
        """N(0, 1) draws of ``shape``, float64 (Box-Muller)."""
        shape = tuple(int(s) for s in shape)
        n = math.prod(shape)
        pairs = (n + 1) // 2
        u = self.uniform(2 * pairs)
        radius = np.sqrt(-2.0 * np.log1p(-u[:pairs]))  # 1 - u in (0, 1]: log is finite
        angle = 2.0 * math.pi * u[pairs:]
        z = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:n]
        return torch.from_numpy(z.reshape(shape))

    def normal(self, shape: Sequence[int] | torch.Size, std: float) -> torch.Tensor:
        return self.standard_normal(shape) * float(std)


@dataclass(frozen=True)
class SecretRandom:
    """A run's secret key and the streams derived from it (see the module docstring).
    ``seeded``: the key was derived from a public seed (tests only: ε is void)."""

    key: bytes = field(repr=False)
    seeded: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.key, bytes) or len(self.key) != KEY_BYTES:
            raise ValueError(f"a secret key is {KEY_BYTES} bytes")

    def __repr__(self) -> str:
        return f"SecretRandom(<secret>, seeded={self.seeded})"

    @classmethod
    def fresh(cls) -> "SecretRandom":
        """A new key from the operating system's CSPRNG."""
        return cls(secrets.token_bytes(KEY_BYTES))

    @classmethod
    def insecure_from_seed(cls, seed: int) -> "SecretRandom":
        """A key anyone who knows ``seed`` can rebuild: for tests that compare two runs only."""
        return cls(
            hashlib.sha256(f"fedmtl/insecure-seeded-noise/{int(seed)}".encode()).digest(),
            seeded=True,
        )

    def stream(self, *purpose: object) -> SecretStream:
        """The stream of one purpose, e.g. ``stream("server", round, "dp-noise")``: the same
        purpose always gives the same stream under the same key."""
        label = "/".join(str(p) for p in purpose).encode()
        return SecretStream(hmac.new(self.key, label, hashlib.sha256).digest())

    @classmethod
    def load_or_create(cls, directory: str | Path) -> "SecretRandom":
        """The key kept in ``directory`` (a run's directory), made there on first use: written
        with mode 0600 before it is used, so a resumed run draws what the first one would have.
        The directory is made owner-only (0700)."""
        path = Path(directory) / KEY_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(
            path.parent, 0o700
        )  # the run's directory: its key, checkpoints and client stores, owner only
        if path.exists():
            key = path.read_bytes()
            if len(key) != KEY_BYTES:
                raise ValueError(
                    f"{path}: a run's secret key is {KEY_BYTES} bytes, found {len(key)}; "
                    "the file is damaged (a new run makes a new one)"
                )
            return cls(key)
        fresh = cls.fresh()
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, fresh.key)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        return fresh
