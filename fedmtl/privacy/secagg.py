"""Secure aggregation (SecAgg+) of client updates, simulated in-process with real cryptography.

The protocol is Bonawitz et al. 2017 ("Practical Secure Aggregation for Privacy-Preserving
Machine Learning") restricted to a sparse communication graph as in Bell et al. 2020 ("Secure
Single-Server Aggregation with (Poly)Logarithmic Overhead", SecAgg+). Clients
(:class:`SecAggClient`) and the server (:class:`SecAggServer`) are Python objects in one process,
but they only talk through the message types below, and the server is never handed a client's
plaintext: its only way in for vectors, :meth:`SecAggServer.receive_masked`, accepts nothing but
a :class:`MaskedInput`, which only :meth:`SecAggClient.masked_input` can create.

Setup (public): the group's clients U (sorted ids), a random Harary graph in which every client u
has k neighbours N(u) (one client has k + 1 when k and n are both odd), built from a public
session seed, the threshold t, the vector length d and the fixed-point encoding.

* Round 0, advertise keys: u draws two X25519 key pairs, c_u (to encrypt shares) and s_u (for
  pairwise masks), and sends (c_u^PK, s_u^PK); the server relays them to the neighbours.
  U1 = clients that advertised.
* Round 1, share keys: u draws the self-mask seed b_u (32 random bytes) and Shamir-shares b_u and
  s_u^SK (32 raw bytes) t-of-|N(u) ∩ U1| among its neighbours (:mod:`fedmtl.privacy.shamir`). The share
  pair for v is encrypted with ChaCha20-Poly1305 under HKDF-SHA256(X25519(c_u^SK, c_v^PK)), with
  the direction u→v in the nonce and both ids as associated data; the server relays the
  ciphertexts only. U2 = clients that sent their ciphertexts.
* Round 2, masked input: u encodes its vector x_u (:class:`~fedmtl.privacy.fixedpoint.FixedPoint`) and
  sends y_u = x_u + PRG(b_u) + Σ_{v ∈ N(u) ∩ U2} ±PRG(s_uv) mod 2^32, with + when u < v and −
  when u > v, s_uv = HKDF-SHA256(X25519(s_u^SK, s_v^PK)) (the same for u and v). PRG(key) is the
  ChaCha20 keystream (fixed nonce; every key masks one vector) read as little-endian uint32
  words. U3 = clients whose masked input arrived; the server keeps only Σ_{u ∈ U3} y_u.
* Round 3, unmask: the server asks every client in U3 for the shares it holds: of b_v for its
  neighbours v ∈ U3 and of s_v^SK for its neighbours v ∈ U2 \\ U3 (they shared keys but their
  input never arrived). A client reveals at most one of the two shares of any neighbour, over all
  requests it ever gets (:meth:`SecAggClient.unmask` refuses otherwise), and aborts when fewer
  than t of its neighbours are listed as survivors. With ≥ t shares per client, the server
  rebuilds b_u for u ∈ U3 and s_u^SK for u ∈ U2 \\ U3, subtracts the self-masks and the pairwise
  masks that survivors shared with dropped neighbours, and decodes Σ_{u ∈ U3} x_u.

Threat model: an honest-but-curious server, possibly colluding with fewer than t clients of any
neighbourhood, learns only Σ_{u ∈ U3} x_u over the clients whose masked inputs it received, and
the set U3 (public metadata), and only when |U3| ≥ max(2, t): a single y_u is uniformly
distributed given x_u (the masks are ChaCha20 keystreams). A client that is merely late (its y_u
arrives after the server asked for its s_u^SK) stays private, because no honest neighbour
reveals both its b-share and its s-share. The server code path is built so that it never
receives or stores a plaintext vector; the token behind :class:`MaskedInput` guards against
programming mistakes, not against hostile code running in the same process. Integrity against
an actively malicious server (consistency checks, signatures of Bonawitz's active variant) is
not implemented.

Defaults: k sized so that a fraction ``max_dropout`` (default 10 %) of the clients can drop
out mid-protocol and the sum is still recovered except with probability 1e-4
(:func:`default_neighbours`, an exact hypergeometric tail and a union bound over the clients;
the complete graph when that needs k ≥ n − 1), and
t = ⌊k/2⌋ + 1, the smallest t with 2t > k; thresholds with 2t ≤ k are refused, since they would
let a lying server collect t b-shares and t s-shares of the same client from disjoint halves of
its neighbourhood. ``threshold`` may be an int (t itself) or a float fraction of k (⌈f·k⌉).
Dropout tolerance: client u's secrets are recoverable while at least t of its k neighbours
respond in round 3, i.e. up to k − t (about k/2 − 1) of its neighbours may drop. The cost grows
linearly in k (the 2·n·k X25519 agreements, about 30 µs each, are half of it or more), so
tolerating 30 % at n = 100 (k = 53) costs about 3× what 10 % does (k = 17). When more drop
than the graph allows,
:class:`SecAggError` (a :class:`ValueError`) names the client and the counts.

Fixed point: all arithmetic is modulo 2^32 on numpy uint32 (wrapping); ``clip`` bounds every
coordinate (larger values are clipped) and ``FixedPoint(clip, n)`` picks the fractional bits so
the sum of the n group members cannot wrap; the per-coordinate error of the decoded sum is at most
|U3| · precision with precision = 2^−(frac_bits+1).

Weighted sums: :func:`secure_sum` sums whatever it is given. For a weighted mean the callers pass
w_i·Δ_i as the vectors (``clip`` must bound the weighted values) and w_i as ``scalars``; the
scalars travel as one extra masked coordinate with their own fixed-point range (``scalar_clip``,
by default the largest range that keeps 8 fractional bits: integers such as sample counts are
exact) and are returned separately as ``scalar_sum``. A scalar outside ±scalar_clip raises
instead of being clipped, since a clipped weight would silently bias the mean.

Seeds: ``seed`` makes the key material, masks and graph reproducible (for tests and benchmarks,
never for deployment); without it all secrets come from ``os.urandom``.
"""

from __future__ import annotations

import functools
import hashlib
import math
import random
import secrets
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedmtl.privacy import shamir
from fedmtl.privacy.fixedpoint import FixedPoint, max_clip

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


# --------------------------------------------------------------------------- public setup


DEFAULT_MAX_DROPOUT = 0.1
"""The dropout the default graph degree is sized for: 6-10 % of devices drop out of a round
in production cross-device federations (Bonawitz et al., "Towards federated learning at
scale", 2019); set ``max_dropout`` (``privacy.secagg_max_dropout``) for flakier clients."""
LOSS_PROBABILITY = 1e-4
"""The default degree keeps the chance that a session loses its sum below this."""


@functools.lru_cache(maxsize=1024)
def default_neighbours(n: int, max_dropout: float = DEFAULT_MAX_DROPOUT, loss: float = LOSS_PROBABILITY) -> int:
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
    ``privacy.secagg_neighbours``) sets a larger k where more collusion must be tolerated."""
    if n < 2:
        raise ValueError(f"secure aggregation needs at least 2 clients, got {n}")
    if not 0.0 <= max_dropout < 0.5:
        raise ValueError(f"max_dropout must be in [0, 0.5): a majority of survivors is needed, got {max_dropout}")
    from scipy.stats import hypergeom  # scikit-learn's dependency; imported when a session is set up

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
        k = default_neighbours(n, max_dropout) if neighbours is None else min(int(neighbours), n - 1)
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


# --------------------------------------------------------------------------- crypto helpers


def _label(u: str, v: str) -> bytes:
    """An unambiguous encoding of two client ids (length-prefixed UTF-8)."""
    return _id_label(u) + _id_label(v)


def _pair_label(u: str, v: str) -> bytes:
    """The label of the unordered pair {u, v}: the same for both ends."""
    return _id_label(u) + _id_label(v) if u < v else _id_label(v) + _id_label(u)


@functools.lru_cache(maxsize=65536)
def _id_label(u: str) -> bytes:
    raw = u.encode()
    return len(raw).to_bytes(4, "big") + raw


def _hkdf(secret: bytes, info: bytes, salt: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=salt, info=info).derive(secret)


def _share_key(own_c: X25519PrivateKey, peer_c_pk: bytes, u: str, v: str, session: bytes) -> bytes:
    shared = own_c.exchange(X25519PublicKey.from_public_bytes(peer_c_pk))
    return _hkdf(shared, b"fedmtl-secagg/share-encryption" + _pair_label(u, v), session)


def _pair_seed(own_s: X25519PrivateKey, peer_s_pk: bytes, u: str, v: str, session: bytes) -> bytes:
    shared = own_s.exchange(X25519PublicKey.from_public_bytes(peer_s_pk))
    return _hkdf(shared, b"fedmtl-secagg/pairwise-mask" + _pair_label(u, v), session)


def _self_mask_key(b_u: bytes, session: bytes) -> bytes:
    return _hkdf(b_u, b"fedmtl-secagg/self-mask", session)


def _prg(key: bytes, n_words: int) -> np.ndarray:
    """The ChaCha20 keystream of ``key`` as ``n_words`` little-endian uint32 words (read-only)."""
    stream = Cipher(algorithms.ChaCha20(key, _CHACHA_NONCE), mode=None).encryptor()
    return np.frombuffer(stream.update(_zeros(4 * n_words)), dtype="<u4")


@functools.lru_cache(maxsize=8)
def _zeros(n_bytes: int) -> bytes:
    """The all-zero plaintext whose ChaCha20 encryption is the keystream (immutable, shared)."""
    return bytes(n_bytes)


def _nonce(sender: str, recipient: str) -> bytes:
    """Both directions of a pair share the AEAD key; the direction keeps the nonces distinct."""
    return bytes(11) + (b"\x00" if sender < recipient else b"\x01")


def _x25519_key(rng: random.Random) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(rng.randbytes(KEY_BYTES))


def _public_raw(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


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
            aead = ChaCha20Poly1305(_share_key(self._c_sk, keys.c_pk, self.id, v, self.params.session))
            self._share_keys[v] = aead
            self._peer_s_pk[v] = keys.s_pk
            plaintext = b_share.to_bytes() + s_share.to_bytes()
            ciphertext = aead.encrypt(
                _nonce(self.id, v), plaintext, _label(self.id, v)
            )
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
        return UnmaskRequest(
            client, frozenset(mine & self._masked), frozenset(mine - self._masked)
        )

    def receive_unmask(self, response: UnmaskResponse) -> None:
        self._expect_round(3, "unmask responses")
        if not isinstance(response, UnmaskResponse):
            raise TypeError(f"receive_unmask expects UnmaskResponse, got {type(response).__name__}")
        u = response.client
        if u not in self._asked or u in self._responded:
            raise SecAggError(f"unexpected unmask response from {u!r}")
        mine = self.params.neighbours[u] & self._shared
        if not set(response.b_shares) <= mine & self._masked or not set(
            response.s_shares
        ) <= mine - self._masked:
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


# --------------------------------------------------------------------------- convenience


@dataclass(frozen=True)
class SecureSumResult:
    """The outcome of :func:`secure_sum` for one aggregation group."""

    sum: np.ndarray  # float64 Σ_{u ∈ included} clip(x_u)
    scalar_sum: float | None  # Σ_{u ∈ included} scalar_u, when scalars were given
    included: tuple[str, ...]  # U3: clients whose masked input was received
    dropped: tuple[str, ...]  # clients left out of the sum
    precision: float  # per-summand fixed-point error bound, 2^−(frac_bits+1)
    error_bound: float  # per-coordinate bound on |sum − exact sum|: len(included) · precision
    frac_bits: int
    k: int
    t: int
    seconds: Mapping[str, float]  # wall time per phase, all clients and the server together
    bytes_sent: Mapping[str, int]  # per client, all rounds
    server_bytes_sent: int  # everything the server relayed or sent


def secure_sum(
    vectors: Mapping[str, Any],
    *,
    clip: float,
    neighbours: int | None = None,
    max_dropout: float = DEFAULT_MAX_DROPOUT,
    threshold: int | float | None = None,
    drop_after_masking: Collection[str] = (),
    drop_before_masking: Collection[str] = (),
    seed: int | None = None,
    scalars: Mapping[str, float] | None = None,
    scalar_clip: float | None = None,
    server_factory: Callable[[SecAggParams], SecAggServer] = SecAggServer,
) -> SecureSumResult:
    """Run SecAgg+ over one group and return Σ of the clipped vectors of the included clients.

    ``drop_before_masking``: clients that shared their keys (round 1) but whose masked input never
    arrives; they are excluded and their pairwise masks are removed. ``drop_after_masking``:
    clients whose masked input arrived but that go silent in the unmasking round; their input is
    included and their self-mask is rebuilt from their neighbours' shares. ``scalars`` (one float
    per client, e.g. a weight or sample count) are summed securely as one extra coordinate and
    returned as ``scalar_sum``. Raises :class:`SecAggError` (a ValueError) when fewer than
    max(2, t) clients remain or some client's secrets cannot be rebuilt.
    """
    ids, dim = _check_inputs(vectors, scalars, drop_after_masking, drop_before_masking)
    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    params = SecAggParams.create(
        ids,
        dim,
        clip=clip,
        neighbours=neighbours,
        max_dropout=max_dropout,
        threshold=threshold,
        scalar=scalars is not None,
        scalar_clip=scalar_clip,
        session=None if seed is None else _seeded_bytes(seed, "session", 16),
    )
    clients = {u: SecAggClient(u, params, _client_rng(seed, u)) for u in ids}
    server = server_factory(params)
    sent = {u: 0 for u in ids}
    relayed = 0
    clock = _lap(seconds, "setup", clock)

    for u, client in clients.items():
        msg = client.advertise_keys()
        sent[u] += msg.nbytes
        server.receive_keys(msg)
    clock = _lap(seconds, "advertise_keys", clock)

    for u, client in clients.items():
        keys = server.keys_for(u)
        relayed += sum(m.nbytes for m in keys.values())
        ciphertexts = client.share_keys(keys)
        sent[u] += sum(m.nbytes for m in ciphertexts)
        server.receive_shares(u, ciphertexts)
    clock = _lap(seconds, "share_keys", clock)

    before = set(drop_before_masking)
    for u, client in clients.items():
        if u in before:
            continue
        inbox = server.shares_for(u)
        relayed += sum(m.nbytes for m in inbox)
        scalar = None if scalars is None else float(scalars[u])
        masked = client.masked_input(vectors[u], inbox, scalar)
        sent[u] += masked.nbytes
        server.receive_masked(masked)
    clock = _lap(seconds, "masked_input", clock)

    after = set(drop_after_masking)
    for u, client in clients.items():
        if u in before or u in after:
            continue
        request = server.unmask_request(u)
        relayed += request.nbytes
        response = client.unmask(request)
        sent[u] += response.nbytes
        server.receive_unmask(response)
    clock = _lap(seconds, "unmask", clock)

    result = server.aggregate()
    _lap(seconds, "aggregate", clock)
    seconds["total"] = sum(seconds.values())
    point = params.fixed_point
    return SecureSumResult(
        sum=result.vector,
        scalar_sum=result.scalar,
        included=result.included,
        dropped=result.dropped,
        precision=point.precision,
        error_bound=point.sum_error_bound(len(result.included)),
        frac_bits=point.frac_bits,
        k=params.k,
        t=params.t,
        seconds=MappingProxyType(seconds),
        bytes_sent=MappingProxyType(sent),
        server_bytes_sent=relayed,
    )


def _check_inputs(
    vectors: Mapping[str, Any],
    scalars: Mapping[str, float] | None,
    drop_after: Collection[str],
    drop_before: Collection[str],
) -> tuple[list[str], int]:
    ids = sorted(vectors)
    if len(ids) < 2:
        raise SecAggError(f"secure aggregation needs at least 2 clients, got {len(ids)}")
    dims = {u: int(np.prod(getattr(vectors[u], "shape", (len(vectors[u]),)))) for u in ids}
    if len(set(dims.values())) != 1:
        raise ValueError(f"all vectors must have the same length, got {sorted(set(dims.values()))}")
    unknown = (set(drop_after) | set(drop_before)) - set(ids)
    if unknown:
        raise ValueError(f"dropped clients {sorted(unknown)} are not in the group")
    both = set(drop_after) & set(drop_before)
    if both:
        raise ValueError(f"clients {sorted(both)} cannot drop both before and after masking")
    if scalars is not None and set(scalars) != set(ids):
        raise ValueError("scalars must have exactly one value per client in vectors")
    return ids, dims[ids[0]]


def _seeded_bytes(seed: int, purpose: str, n: int) -> bytes:
    return hashlib.sha256(f"fedmtl-secagg/{purpose}/{seed}".encode()).digest()[:n]


def _client_rng(seed: int | None, client: str) -> random.Random:
    if seed is None:
        return random.SystemRandom()
    return random.Random(_seeded_bytes(seed, f"client/{client}", 32))


def _lap(seconds: dict[str, float], phase: str, since: float) -> float:
    now = time.perf_counter()
    seconds[phase] = now - since
    return now


__all__ = [
    "AdvertisedKeys",
    "EncryptedShare",
    "MaskedInput",
    "SecAggClient",
    "SecAggError",
    "SecAggParams",
    "SecAggServer",
    "SecureSumResult",
    "UnmaskRequest",
    "UnmaskResponse",
    "UnmaskedSum",
    "default_neighbours",
    "harary_graph",
    "resolve_threshold",
    "secure_sum",
]
