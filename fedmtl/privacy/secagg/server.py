"""The SecAgg+ server: relays the messages, collects the masked inputs, unmasks only the sum."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedmtl.privacy import shamir
from fedmtl.privacy.secagg.crypto import _pair_seed, _prg, _public_raw, _self_mask_key
from fedmtl.privacy.secagg.graph import SecAggParams
from fedmtl.privacy.secagg.messages import (
    AdvertisedKeys,
    EncryptedShare,
    MaskedInput,
    SecAggError,
    UnmaskedSum,
    UnmaskRequest,
    UnmaskResponse,
)

# --------------------------------------------------------------------------- server


class SecAggServer:
    """The aggregator: relays keys and ciphertexts, sums masked inputs, removes the masks.

    Its rounds close in order, on the first call of the next round's method (``keys_for`` closes
    round 0, ``shares_for`` round 1, ``unmask_request`` round 2, ``aggregate`` round 3); a message
    of a closed round is rejected, as a real server rejects stragglers after its timeout.
    """

    def __init__(self, params: SecAggParams) -> None:
        self.params = params
        self._round = 0
        self._keys: dict[str, AdvertisedKeys] = {}  # U1
        self._inbox: dict[str, list[EncryptedShare]] = {u: [] for u in params.clients}
        self._shared: set[str] = set()  # U2
        self._masked_sum = np.zeros(params.n_words, dtype=np.uint32)
        self._masked: set[str] = set()  # U3
        self._asked: set[str] = set()
        self._b_shares: dict[str, list[shamir.Share]] = {}
        self._s_shares: dict[str, list[shamir.Share]] = {}
        self._responded: set[str] = set()

    # round 0
    def receive_keys(self, keys: AdvertisedKeys) -> None:
        self._expect_round(0, "advertised keys")
        if not isinstance(keys, AdvertisedKeys):
            raise TypeError(f"receive_keys expects AdvertisedKeys, got {type(keys).__name__}")
        self._expect_member(keys.client)
        if keys.client in self._keys:
            raise SecAggError(f"client {keys.client!r} advertised keys twice")
        self._keys[keys.client] = keys

    def keys_for(self, client: str) -> dict[str, AdvertisedKeys]:
        """The advertised keys of ``client``'s neighbours (closes round 0)."""
        self._advance(1)
        if client not in self._keys:
            raise SecAggError(f"client {client!r} did not advertise keys")
        return {v: self._keys[v] for v in sorted(self.params.neighbours[client]) if v in self._keys}

    # round 1
    def receive_shares(self, client: str, ciphertexts: Sequence[EncryptedShare]) -> None:
        self._expect_round(1, "encrypted shares")
        if client not in self._keys or client in self._shared:
            raise SecAggError(f"unexpected encrypted shares from {client!r}")
        allowed = self.params.neighbours[client] & set(self._keys)
        recipients = []
        for msg in ciphertexts:
            if not isinstance(msg, EncryptedShare):
                raise TypeError(f"receive_shares expects EncryptedShare, got {type(msg).__name__}")
            if msg.sender != client or msg.recipient not in allowed:
                raise SecAggError(f"client {client!r} sent a share to {msg.recipient!r}")
            recipients.append(msg.recipient)
        if len(set(recipients)) != len(recipients):
            raise SecAggError(f"client {client!r} sent two shares to one neighbour")
        for msg in ciphertexts:
            self._inbox[msg.recipient].append(msg)
        self._shared.add(client)

    def shares_for(self, client: str) -> list[EncryptedShare]:
        """The ciphertexts addressed to ``client`` by neighbours in U2 (closes round 1)."""
        self._advance(2)
        if client not in self._shared:
            raise SecAggError(f"client {client!r} did not share its keys")
        return [m for m in self._inbox[client] if m.sender in self._shared]

    # round 2
    def receive_masked(self, masked: MaskedInput) -> None:
        """Add one client's y_u to the running sum; anything but a MaskedInput is a TypeError."""
        if not isinstance(masked, MaskedInput):
            raise TypeError(
                "receive_masked accepts only MaskedInput objects made by SecAggClient, got "
                f"{type(masked).__module__}.{type(masked).__name__}"
            )
        self._expect_round(2, "masked inputs")
        if masked.client not in self._shared or masked.client in self._masked:
            raise SecAggError(f"unexpected masked input from {masked.client!r}")
        if masked.words.shape != (self.params.n_words,):
            raise SecAggError(
                f"masked input of {masked.client!r} has {masked.words.shape[0]} words, "
                f"expected {self.params.n_words}"
            )
        self._masked_sum += masked.words
        self._masked.add(masked.client)

    # round 3
    def unmask_request(self, client: str) -> UnmaskRequest:
        """Which of ``client``'s neighbours survived (U3) or dropped (U2 \\ U3); closes round 2."""
        self._advance(3)
        if client not in self._masked:
            raise SecAggError(f"client {client!r} sent no masked input")
        self._asked.add(client)
        mine = self.params.neighbours[client] & self._shared
        return UnmaskRequest(client, frozenset(mine & self._masked), frozenset(mine - self._masked))

    def receive_unmask(self, response: UnmaskResponse) -> None:
        self._expect_round(3, "unmask responses")
        if not isinstance(response, UnmaskResponse):
            raise TypeError(f"receive_unmask expects UnmaskResponse, got {type(response).__name__}")
        u = response.client
        if u not in self._asked or u in self._responded:
            raise SecAggError(f"unexpected unmask response from {u!r}")
        mine = self.params.neighbours[u] & self._shared
        if (
            not set(response.b_shares) <= mine & self._masked
            or not set(response.s_shares) <= mine - self._masked
        ):
            raise SecAggError(f"client {u!r} returned shares that were not asked for")
        for v, share in response.b_shares.items():
            self._b_shares.setdefault(v, []).append(share)
        for v, share in response.s_shares.items():
            self._s_shares.setdefault(v, []).append(share)
        self._responded.add(u)

    def aggregate(self) -> UnmaskedSum:
        """Remove self-masks of U3 and pairwise masks with U2 \\ U3, decode Σ_{u∈U3} x_u."""
        self._advance(4)
        total = self._masked_sum.copy()
        session, n_words = self.params.session, self.params.n_words
        for u in sorted(self._masked):
            b_u = self._reconstruct(u, self._b_shares, "b_u (self-mask seed)")
            total -= _prg(_self_mask_key(b_u, session), n_words)
        for u in sorted(self._shared - self._masked):
            s_u = X25519PrivateKey.from_private_bytes(
                self._reconstruct(u, self._s_shares, "s_u^SK (mask key)")
            )
            if _public_raw(s_u) != self._keys[u].s_pk:
                raise SecAggError(f"the reconstructed s_u^SK of {u!r} does not match its s_u^PK")
            for v in sorted(self.params.neighbours[u] & self._masked):
                mask = _prg(_pair_seed(s_u, self._keys[v].s_pk, u, v, session), n_words)
                if v < u:  # v added +PRG(s_uv)
                    total -= mask
                else:
                    total += mask
        return self._decode(total)

    def _reconstruct(self, u: str, shares: Mapping[str, list[shamir.Share]], what: str) -> bytes:
        got = shares.get(u, [])
        t = self.params.t
        if len(got) < t:
            holders = self.params.neighbours[u] & self._shared
            raise SecAggError(
                f"cannot reconstruct {what} of client {u!r}: {len(got)} shares from its "
                f"{len(holders)} neighbours ({len(holders & self._responded)} responded), "
                f"threshold t={t}"
            )
        return shamir.combine(got, t)

    def _decode(self, total: np.ndarray) -> UnmaskedSum:
        dim = self.params.dim
        vector = self.params.fixed_point.decode_sum(total[:dim])
        scalar = None
        if self.params.scalar_point is not None:
            scalar = float(self.params.scalar_point.decode_sum(total[dim:])[0])
        included = tuple(sorted(self._masked))
        dropped = tuple(u for u in self.params.clients if u not in self._masked)
        return UnmaskedSum(vector, scalar, included, dropped)

    def _expect_member(self, client: str) -> None:
        if client not in self.params.neighbours:
            raise SecAggError(f"{client!r} is not a member of this aggregation group")

    def _expect_round(self, expected: int, what: str) -> None:
        if self._round != expected:
            raise SecAggError(
                f"{what} belong to round {expected}, the server is in round {self._round}"
            )

    def _advance(self, target: int) -> None:
        """Close the rounds before ``target`` (idempotent within a round; never goes back)."""
        if self._round > target:
            raise SecAggError(f"the server is in round {self._round}, cannot go back to {target}")
        while self._round < target:
            if self._round == 2:
                self._check_survivors()
            self._round += 1

    def _check_survivors(self) -> None:
        need = max(2, self.params.t)
        if len(self._masked) < need:
            raise SecAggError(
                f"only {len(self._masked)} of {len(self.params.clients)} clients sent masked "
                f"inputs; secure aggregation needs at least max(2, t={self.params.t}) = {need} "
                "(a sum over fewer would expose individual updates)"
            )
