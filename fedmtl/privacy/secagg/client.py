"""A SecAgg+ client: advertises keys, shares its seeds, sends its masked input, answers
unmasking."""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from fedmtl.privacy import shamir
from fedmtl.privacy.secagg.crypto import (
    _label,
    _nonce,
    _pair_seed,
    _prg,
    _public_raw,
    _self_mask_key,
    _share_key,
    _x25519_key,
)
from fedmtl.privacy.secagg.graph import SecAggParams
from fedmtl.privacy.secagg.messages import (
    _MINT,
    KEY_BYTES,
    SEED_BYTES,
    AdvertisedKeys,
    EncryptedShare,
    MaskedInput,
    SecAggError,
    UnmaskRequest,
    UnmaskResponse,
)

# --------------------------------------------------------------------------- client


class SecAggClient:
    """One client u of the protocol; it holds x_u only inside :meth:`masked_input`."""

    def __init__(self, client: str, params: SecAggParams, rng: random.Random | None = None):
        if client not in params.neighbours:
            raise ValueError(f"client {client!r} is not in this aggregation group")
        self.id = client
        self.params = params
        self._rng = rng if rng is not None else random.SystemRandom()
        self._neighbours = params.neighbours[client]
        self._c_sk: X25519PrivateKey | None = None
        self._s_sk: X25519PrivateKey | None = None
        self._b_u: bytes | None = None
        self._share_keys: dict[str, ChaCha20Poly1305] = {}  # keyed by HKDF(X25519(c_u, c_v))
        self._peer_s_pk: dict[str, bytes] = {}
        self._received: dict[str, bytes] = {}  # ciphertexts from neighbours in U2
        self._revealed_b: set[str] = set()
        self._revealed_s: set[str] = set()

    # round 0
    def advertise_keys(self) -> AdvertisedKeys:
        if self._c_sk is not None:
            raise SecAggError(f"client {self.id!r} already advertised its keys")
        self._c_sk, self._s_sk = _x25519_key(self._rng), _x25519_key(self._rng)
        return AdvertisedKeys(self.id, _public_raw(self._c_sk), _public_raw(self._s_sk))

    # round 1
    def share_keys(self, neighbour_keys: Mapping[str, AdvertisedKeys]) -> list[EncryptedShare]:
        """Shamir-share b_u and s_u^SK t-of-|holders| and encrypt each holder's pair for it."""
        if self._c_sk is None or self._s_sk is None:
            raise SecAggError(f"client {self.id!r} must advertise its keys first")
        if self._b_u is not None:
            raise SecAggError(f"client {self.id!r} already shared its keys")
        holders = self._check_keys(neighbour_keys)
        t = self.params.t
        self._b_u = self._rng.randbytes(SEED_BYTES)
        b_shares = shamir.split(self._b_u, len(holders), t, self._rng)
        s_shares = shamir.split(self._s_sk.private_bytes_raw(), len(holders), t, self._rng)
        out = []
        for v, b_share, s_share in zip(holders, b_shares, s_shares, strict=True):
            keys = neighbour_keys[v]
            aead = ChaCha20Poly1305(
                _share_key(self._c_sk, keys.c_pk, self.id, v, self.params.session)
            )
            self._share_keys[v] = aead
            self._peer_s_pk[v] = keys.s_pk
            plaintext = b_share.to_bytes() + s_share.to_bytes()
            ciphertext = aead.encrypt(_nonce(self.id, v), plaintext, _label(self.id, v))
            out.append(EncryptedShare(self.id, v, ciphertext))
        return out

    def _check_keys(self, neighbour_keys: Mapping[str, AdvertisedKeys]) -> list[str]:
        holders = sorted(neighbour_keys)
        strangers = set(holders) - self._neighbours
        if strangers:
            raise SecAggError(f"client {self.id!r} got keys of non-neighbours {sorted(strangers)}")
        seen = {_public_raw(self._c_sk), _public_raw(self._s_sk)}  # type: ignore[arg-type]
        for v in holders:
            keys = neighbour_keys[v]
            if not isinstance(keys, AdvertisedKeys) or keys.client != v:
                raise SecAggError(f"client {self.id!r} got a malformed key message for {v!r}")
            if len(keys.c_pk) != KEY_BYTES or len(keys.s_pk) != KEY_BYTES:
                raise SecAggError(f"client {self.id!r} got malformed keys of {v!r}")
            if keys.c_pk in seen or keys.s_pk in seen or keys.c_pk == keys.s_pk:
                raise SecAggError(f"client {self.id!r} got repeated public keys ({v!r})")
            seen.update((keys.c_pk, keys.s_pk))
        if len(holders) < self.params.t:
            raise SecAggError(
                f"client {self.id!r}: only {len(holders)} of its {len(self._neighbours)} "
                f"neighbours advertised keys, fewer than the threshold t={self.params.t}"
            )
        return holders

    # round 2
    def masked_input(
        self,
        vector: Any,
        ciphertexts: Sequence[EncryptedShare],
        scalar: float | None = None,
    ) -> MaskedInput:
        """y_u = x_u + PRG(b_u) + Σ_v ±PRG(s_uv) mod 2^32 over the neighbours whose shares came."""
        if self._b_u is None or self._s_sk is None:
            raise SecAggError(f"client {self.id!r} must share its keys first")
        if self._received:
            raise SecAggError(f"client {self.id!r} already sent its masked input")
        peers = self._store_ciphertexts(ciphertexts)
        session, n_words = self.params.session, self.params.n_words
        y = self._encode(vector, scalar)
        y += _prg(_self_mask_key(self._b_u, session), n_words)
        for v in peers:
            mask = _prg(_pair_seed(self._s_sk, self._peer_s_pk[v], self.id, v, session), n_words)
            if self.id < v:
                y += mask
            else:
                y -= mask
        return MaskedInput(self.id, y, _MINT)

    def _store_ciphertexts(self, ciphertexts: Sequence[EncryptedShare]) -> list[str]:
        received: dict[str, bytes] = {}
        for msg in ciphertexts:
            if not isinstance(msg, EncryptedShare) or msg.recipient != self.id:
                raise SecAggError(f"client {self.id!r} got a ciphertext addressed to someone else")
            if msg.sender not in self._share_keys or msg.sender in received:
                raise SecAggError(f"client {self.id!r} got an unexpected ciphertext {msg.sender!r}")
            received[msg.sender] = msg.ciphertext
        if len(received) < self.params.t:
            raise SecAggError(
                f"client {self.id!r}: only {len(received)} neighbours shared their keys, "
                f"fewer than the threshold t={self.params.t}"
            )
        self._received = received
        return sorted(received)

    def _encode(self, vector: Any, scalar: float | None) -> np.ndarray:
        words = self.params.fixed_point.encode(vector)
        if words.shape != (self.params.dim,):
            raise ValueError(
                f"client {self.id!r}: vector of length {words.shape[0]}, expected {self.params.dim}"
            )
        point = self.params.scalar_point
        if point is None:
            if scalar is not None:
                raise ValueError("this aggregation carries no scalar (set up without scalars)")
            return words
        if scalar is None or not math.isfinite(scalar) or abs(scalar) > point.clip:
            raise ValueError(
                f"client {self.id!r}: the scalar must be a finite number within ±{point.clip}, "
                f"got {scalar!r}"
            )
        return np.concatenate([words, point.encode(np.array([float(scalar)]))])

    # round 3
    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        """Shares of b_v for survivors, of s_v^SK for dropped neighbours; never both of one v."""
        if not isinstance(request, UnmaskRequest) or request.client != self.id:
            raise SecAggError(f"client {self.id!r} got an unmask request meant for someone else")
        if not self._received:
            raise SecAggError(f"client {self.id!r} never sent a masked input")
        survivors, dropped = set(request.survivors) - {self.id}, set(request.dropped)
        self._refuse_double_reveal(survivors, dropped)
        unknown = (survivors | dropped) - set(self._received)
        if unknown:
            raise SecAggError(f"client {self.id!r} holds no shares of {sorted(unknown)}")
        if self.id in dropped:
            raise SecAggError(f"client {self.id!r} is alive but listed as dropped")
        if len(survivors) < self.params.t:
            raise SecAggError(
                f"client {self.id!r} aborts: only {len(survivors)} of its "
                f"{len(self._neighbours)} neighbours survived, fewer than the threshold "
                f"t={self.params.t}"
            )
        self._revealed_b |= survivors
        self._revealed_s |= dropped
        b_shares = {v: self._decrypt(v, want_b=True) for v in sorted(survivors)}
        s_shares = {v: self._decrypt(v, want_b=False) for v in sorted(dropped)}
        return UnmaskResponse(self.id, MappingProxyType(b_shares), MappingProxyType(s_shares))

    def _refuse_double_reveal(self, survivors: set[str], dropped: set[str]) -> None:
        both = (survivors & dropped) | (survivors & self._revealed_s) | (dropped & self._revealed_b)
        if both:
            raise SecAggError(
                f"client {self.id!r} refuses to reveal both the b-share and the s-share of "
                f"{sorted(both)}: together they would expose that client's input"
            )

    def _decrypt(self, v: str, *, want_b: bool) -> shamir.Share:
        """v's share of b_v (``want_b``) or of s_v^SK, from the ciphertext v sent in round 1."""
        try:
            plaintext = self._share_keys[v].decrypt(
                _nonce(v, self.id), self._received[v], _label(v, self.id)
            )
        except InvalidTag as exc:
            raise SecAggError(
                f"client {self.id!r}: the shares from {v!r} fail authentication"
            ) from exc
        half = len(plaintext) // 2
        return shamir.Share.from_bytes(plaintext[:half] if want_b else plaintext[half:])
