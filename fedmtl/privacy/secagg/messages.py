"""The messages of SecAgg+ (what parties send each other), its constants and its error."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from fedmtl.privacy import shamir

KEY_BYTES = 32
SEED_BYTES = 32
_CHACHA_NONCE = bytes(16)  # every ChaCha20 key expands exactly one mask
_MINT = object()  # the private token that only SecAggClient passes to MaskedInput


class SecAggError(ValueError):
    """A protocol abort: too few survivors or shares, a refused request, a malformed message."""


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class AdvertisedKeys:
    """Round 0: a client's public keys c_u^PK (share encryption) and s_u^PK (pairwise masks)."""

    client: str
    c_pk: bytes
    s_pk: bytes

    @property
    def nbytes(self) -> int:
        return len(self.client) + len(self.c_pk) + len(self.s_pk)


@dataclass(frozen=True)
class EncryptedShare:
    """Round 1: the sender's shares of b_u and s_u^SK for one recipient, encrypted for it."""

    sender: str
    recipient: str
    ciphertext: bytes

    @property
    def nbytes(self) -> int:
        return len(self.sender) + len(self.recipient) + len(self.ciphertext)


@dataclass(frozen=True, eq=False)
class MaskedInput:
    """Round 2: y_u, a client's masked vector (read-only uint32). Only clients can create one."""

    client: str
    words: np.ndarray
    _token: object = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self._token is not _MINT:
            raise TypeError("a MaskedInput is produced only by SecAggClient.masked_input")
        object.__setattr__(self, "_token", None)  # dataclasses.replace cannot forge another one
        words = np.array(self.words, dtype=np.uint32, copy=True)
        if words.ndim != 1:
            raise TypeError(f"MaskedInput words must be 1-D, got shape {words.shape}")
        words.flags.writeable = False
        object.__setattr__(self, "words", words)

    @property
    def nbytes(self) -> int:
        return len(self.client) + self.words.nbytes


@dataclass(frozen=True)
class UnmaskRequest:
    """Round 3: the server's view of a client's neighbours: who survived, who dropped."""

    client: str
    survivors: frozenset[str]
    dropped: frozenset[str]

    @property
    def nbytes(self) -> int:
        return len(self.client) + sum(len(v) for v in self.survivors | self.dropped)


@dataclass(frozen=True)
class UnmaskResponse:
    """Round 3: shares of b_v for surviving neighbours, of s_v^SK for dropped ones (never both)."""

    client: str
    b_shares: Mapping[str, shamir.Share]
    s_shares: Mapping[str, shamir.Share]

    @property
    def nbytes(self) -> int:
        items = list(self.b_shares.items()) + list(self.s_shares.items())
        return len(self.client) + sum(len(v) + len(s.to_bytes()) for v, s in items)


@dataclass(frozen=True)
class UnmaskedSum:
    """What the server learns: the decoded sum over ``included`` (U3), and who was left out."""

    vector: np.ndarray
    scalar: float | None
    included: tuple[str, ...]
    dropped: tuple[str, ...]
