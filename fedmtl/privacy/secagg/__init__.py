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
  s_u^SK (32 raw bytes) t-of-|N(u) ∩ U1| among its neighbours (:mod:`fedmtl.privacy.shamir`). The
  share pair for v is encrypted with ChaCha20-Poly1305 under HKDF-SHA256(X25519(c_u^SK, c_v^PK)),
  with the direction u→v in the nonce and both ids as associated data; the server relays the
  ciphertexts only. U2 = clients that sent their ciphertexts.
* Round 2, masked input: u encodes its vector x_u
  (:class:`~fedmtl.privacy.fixedpoint.FixedPoint`) and sends
  y_u = x_u + PRG(b_u) + Σ_{v ∈ N(u) ∩ U2} ±PRG(s_uv) mod 2^32, with + when u < v and − when
  u > v, s_uv = HKDF-SHA256(X25519(s_u^SK, s_v^PK)) (the same for u and v). PRG(key) is the
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

from fedmtl.privacy.secagg.client import SecAggClient
from fedmtl.privacy.secagg.graph import (
    DEFAULT_MAX_DROPOUT,
    LOSS_PROBABILITY,
    SecAggParams,
    default_neighbours,
    harary_graph,
    resolve_threshold,
)
from fedmtl.privacy.secagg.messages import (
    KEY_BYTES,
    SEED_BYTES,
    AdvertisedKeys,
    EncryptedShare,
    MaskedInput,
    SecAggError,
    UnmaskedSum,
    UnmaskRequest,
    UnmaskResponse,
)
from fedmtl.privacy.secagg.server import SecAggServer
from fedmtl.privacy.secagg.simulation import SecureSumResult, secure_sum

__all__ = [
    "AdvertisedKeys",
    "EncryptedShare",
    "MaskedInput",
    "UnmaskRequest",
    "UnmaskResponse",
    "UnmaskedSum",
    "SecAggError",
    "KEY_BYTES",
    "SEED_BYTES",
    "DEFAULT_MAX_DROPOUT",
    "LOSS_PROBABILITY",
    "default_neighbours",
    "resolve_threshold",
    "harary_graph",
    "SecAggParams",
    "SecAggClient",
    "SecAggServer",
    "SecureSumResult",
    "secure_sum",
]
