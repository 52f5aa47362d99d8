"""Homomorphic aggregation (CKKS, TenSEAL): another secure sum, simulated in-process.

The parties, as in :mod:`fedmtl.privacy.secagg` Python objects in one process that talk only through
the message types below:

* the **key holder** (:class:`KeyHolder`) makes a CKKS context (poly_modulus_degree 8192,
  coefficient moduli of 60, 40, 40 and 60 bits, global scale 2^40) and keeps its secret key;
  what it hands out is the context serialised *without* the secret key (nor Galois or
  relinearisation keys, which sums do not need): the public key and the parameters;
* each **client** (:class:`HEClient`) encrypts its vector under that public context, in chunks
  of at most 4096 values (the slot count, N/2) — one ``ts.CKKSVector`` per chunk — and sends the
  serialised ciphertexts (:class:`EncryptedInput`, which only :meth:`HEClient.encrypt` can make);
* the **server** (:class:`HEServer`) holds the public context only; its one way in for vectors,
  :meth:`HEServer.receive`, accepts nothing but an :class:`EncryptedInput` (a tensor, an array,
  raw bytes or a look-alike object is a TypeError), parses every chunk as a CKKS ciphertext of
  that context (bytes that do not parse, or a ciphertext of the wrong length, are refused with
  :class:`HEError`) and adds it homomorphically to the running sum; :meth:`HEServer.aggregate`
  returns the encrypted sum (:class:`EncryptedSum`, serialised ciphertexts);
* the key holder decrypts that sum (:meth:`KeyHolder.decrypt`), and only a sum: it never
  receives a client's ciphertext.

Trust model. Whoever holds the secret key can decrypt every client's ciphertext, so the
guarantee — the server learns only the sum (Σ over the clients whose input arrived, and who they
were) — holds while the key holder and the server do not collude and the key holder decrypts
nothing but the server's aggregate. In this simulation the key holder is a separate object from
the server (a fresh key per :func:`encrypted_sum` call unless one is passed in, e.g. one per
round in :mod:`fedmtl.privacy.aggregation`); in a deployment it would be a committee of clients
or a hardware security module that decrypts only the final sum. CKKS in TenSEAL has no threshold
(multi-party) decryption, so the key cannot be split among the clients in a dropout-tolerant
way as SecAgg+ splits its masks with Shamir shares; in exchange a client that drops out simply
contributes nothing (its ciphertext never arrives) and, unlike SecAgg+, no recovery round is
needed. The server sees ciphertexts only; CKKS ciphertexts are IND-CPA secure under RLWE (about
128-bit security for these parameters, the Homomorphic Encryption Standard's bound for N = 8192
is 218 bits of total modulus; these use 200). The token behind :class:`EncryptedInput` guards
against programming mistakes, not hostile code in the same process. No integrity: a malicious
client can send a well-formed ciphertext of anything (as with SecAgg+), and a malicious server
can hand the key holder a ciphertext that is not the sum (not defended against).

Approximation error. CKKS is approximate: encoding at scale 2^40 and the encryption noise add an
absolute error of about 1e-8 per encrypted value, whatever the value's magnitude (measured: max
1.3e-8 over 20 × 4096 values summed with one zero vector; 2.2e-8 for 10 clients at magnitudes
1e-3, 1 and 100 alike; 9.3e-8 for 100 clients × 5,000 values in [−1, 1], 4e-9 of the largest
|sum|). :data:`ERROR_PER_SUMMAND` (2e-8) times the number of clients is the bound
:class:`HESumResult` reports and tests/unit/test_he.py checks; the error grows more like √n.
The encryption randomness comes from SEAL, not a seed, so two runs agree only to that error, not
bit for bit. The plaintexts must stay well inside the modulus: the sum's coordinates at most
:data:`MAX_ABS_SUM` (2^19 = 2^(60−40−1)) in magnitude, checked against the public bound
n·``bound`` before anything is encrypted.

``tenseal`` is an optional dependency: ``pip install -e '.[he]'``; importing this module works
without it and the first use raises :class:`HEUnavailable` naming the extra.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np

from fedmtl.config import tenseal_installed

POLY_MODULUS_DEGREE = 8192
COEFF_MOD_BIT_SIZES = (60, 40, 40, 60)
SCALE_BITS = 40
SLOTS = POLY_MODULUS_DEGREE // 2
"""Values one CKKS ciphertext holds; longer vectors are split into chunks of this many."""
MAX_ABS_SUM = float(2 ** (COEFF_MOD_BIT_SIZES[0] - SCALE_BITS - 1))
"""The largest magnitude a summed coordinate may have (2^19): the plaintext must not wrap."""
ERROR_PER_SUMMAND = 2e-8
"""A bound on CKKS's absolute error per summed client and coordinate (measured ≤ 1.3e-8)."""
INSTALL_HINT = "pip install -e '.[he]'"
_MINT = object()  # the private token that only HEClient passes to EncryptedInput


class HEError(ValueError):
    """A refused message (a ciphertext that does not parse, of the wrong shape) or bad inputs."""


class HEUnavailable(ImportError):
    """tenseal is not installed."""


def tenseal() -> Any:
    """The ``tenseal`` module, or :class:`HEUnavailable` naming the extra that installs it."""
    try:
        import tenseal as ts
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise HEUnavailable(
            f"homomorphic aggregation needs the optional 'tenseal' package: {INSTALL_HINT}"
        ) from exc
    return ts


def available() -> bool:
    """Whether tenseal can be imported (without importing it)."""
    return tenseal_installed()


def n_chunks(dim: int) -> int:
    return math.ceil(dim / SLOTS)


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True, eq=False)
class EncryptedInput:
    """A client's vector as serialised CKKS ciphertexts, one per chunk of ≤ SLOTS values.
    Only :meth:`HEClient.encrypt` makes one."""

    client: str
    chunks: tuple[bytes, ...]
    dim: int
    _token: object = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self._token is not _MINT:
            raise TypeError("an EncryptedInput is produced only by HEClient.encrypt")
        object.__setattr__(self, "_token", None)  # dataclasses.replace cannot forge another one
        if not all(isinstance(c, bytes) for c in self.chunks):
            raise TypeError("EncryptedInput chunks must be serialised ciphertexts (bytes)")
        object.__setattr__(self, "chunks", tuple(self.chunks))

    @property
    def nbytes(self) -> int:
        return len(self.client) + sum(len(c) for c in self.chunks)


@dataclass(frozen=True)
class EncryptedSum:
    """What the server hands the key holder: the encrypted sum and who is in it."""

    chunks: tuple[bytes, ...]
    dim: int
    included: tuple[str, ...]

    @property
    def nbytes(self) -> int:
        return sum(len(c) for c in self.chunks)


# --------------------------------------------------------------------------- parties


def _chunk_lengths(dim: int) -> list[int]:
    return [min(SLOTS, dim - i * SLOTS) for i in range(n_chunks(dim))]


class KeyHolder:
    """Makes the CKKS keys, hands out the public context, decrypts only aggregated sums."""

    def __init__(self, n_threads: int = 1) -> None:
        ts = tenseal()
        self._context = ts.context(
            ts.SCHEME_TYPE.CKKS,
            poly_modulus_degree=POLY_MODULUS_DEGREE,
            coeff_mod_bit_sizes=list(COEFF_MOD_BIT_SIZES),
            n_threads=n_threads,
        )
        self._context.global_scale = 2.0**SCALE_BITS
        self.public_context: bytes = self._context.serialize(
            save_public_key=True,
            save_secret_key=False,
            save_galois_keys=False,
            save_relin_keys=False,
        )

    def decrypt(self, total: EncryptedSum) -> np.ndarray:
        """The float64 sum from the server's :class:`EncryptedSum` (and nothing else)."""
        if not isinstance(total, EncryptedSum):
            raise TypeError(
                f"the key holder decrypts only an EncryptedSum, got {type(total).__name__}"
            )
        ts = tenseal()
        lengths = _chunk_lengths(total.dim)
        if len(total.chunks) != len(lengths):
            raise HEError(f"encrypted sum has {len(total.chunks)} chunks, expected {len(lengths)}")
        parts = []
        for blob, length in zip(total.chunks, lengths):
            vector = _parse(ts, self._context, blob, length, "the encrypted sum")
            parts.append(np.asarray(vector.decrypt(), dtype=np.float64))
        return np.concatenate(parts)[: total.dim] if parts else np.zeros(0)


class HEClient:
    """Encrypts its vector under the key holder's public context (it never sees a secret key)."""

    def __init__(self, client: str, public_context: bytes) -> None:
        ts = tenseal()
        self.client = client
        self._context = ts.context_from(public_context)
        if self._context.is_private():
            raise HEError("a client must be given the public context only (no secret key)")

    def encrypt(self, vector: Any) -> EncryptedInput:
        ts = tenseal()
        x = np.asarray(vector, dtype=np.float64).reshape(-1)
        if not np.all(np.isfinite(x)):
            raise HEError(f"client {self.client!r}: the vector has non-finite values")
        chunks = tuple(
            ts.ckks_vector(self._context, x[i * SLOTS : (i + 1) * SLOTS].tolist()).serialize()
            for i in range(n_chunks(len(x)))
        )
        return EncryptedInput(self.client, chunks, len(x), _MINT)


class HEServer:
    """Adds the clients' ciphertexts; holds the public context only, never a plaintext vector."""

    def __init__(self, public_context: bytes, dim: int, members: Collection[str]) -> None:
        ts = tenseal()
        self._context = ts.context_from(public_context)
        if self._context.is_private():
            raise HEError("the server must be given the public context only (no secret key)")
        self.dim = dim
        self.members = frozenset(members)
        self._lengths = _chunk_lengths(dim)
        self._sum: list[Any] | None = None
        self._received: list[str] = []

    def receive(self, encrypted: EncryptedInput) -> None:
        """Add one client's ciphertexts to the running sum; anything but an EncryptedInput is a
        TypeError, a ciphertext that does not parse or has the wrong length an HEError."""
        if not isinstance(encrypted, EncryptedInput):
            raise TypeError(
                "HEServer.receive accepts only EncryptedInput objects made by HEClient.encrypt, "
                f"got {type(encrypted).__module__}.{type(encrypted).__name__}"
            )
        if encrypted.client not in self.members or encrypted.client in self._received:
            raise HEError(f"unexpected encrypted input from {encrypted.client!r}")
        if encrypted.dim != self.dim or len(encrypted.chunks) != len(self._lengths):
            raise HEError(
                f"encrypted input of {encrypted.client!r} has {encrypted.dim} values in "
                f"{len(encrypted.chunks)} chunks, expected {self.dim} in {len(self._lengths)}"
            )
        ts = tenseal()
        parsed = [
            _parse(ts, self._context, blob, length, f"encrypted input of {encrypted.client!r}")
            for blob, length in zip(encrypted.chunks, self._lengths)
        ]
        if self._sum is None:
            self._sum = parsed
        else:
            for total, part in zip(self._sum, parsed):
                total.add_(part)
        self._received.append(encrypted.client)

    def aggregate(self) -> EncryptedSum:
        if self._sum is None:
            raise HEError("no encrypted input arrived")
        return EncryptedSum(
            tuple(v.serialize() for v in self._sum), self.dim, tuple(sorted(self._received))
        )


def _parse(ts: Any, context: Any, blob: Any, length: int, what: str) -> Any:
    if not isinstance(blob, bytes):
        raise HEError(f"{what}: a chunk is {type(blob).__name__}, not serialised ciphertext bytes")
    try:
        vector = ts.ckks_vector_from(context, blob)
    except (ValueError, RuntimeError, TypeError) as exc:
        raise HEError(f"{what} is not a CKKS ciphertext of this context ({exc})") from None
    if vector.size() != length:
        raise HEError(f"{what}: a chunk holds {vector.size()} values, expected {length}")
    return vector


# --------------------------------------------------------------------------- convenience


@dataclass(frozen=True)
class HESumResult:
    """The outcome of :func:`encrypted_sum`."""

    sum: np.ndarray  # float64 Σ_{u ∈ included} x_u (approximate, see the module docstring)
    scalar_sum: float | None
    included: tuple[str, ...]
    dropped: tuple[str, ...]
    error_bound: float  # len(included) · ERROR_PER_SUMMAND (absolute, any magnitude)
    seconds: Mapping[str, float]  # wall time per phase, all parties together
    bytes_sent: Mapping[str, int]  # per client
    server_bytes_sent: int  # the public context to every client, the sum to the key holder


def encrypted_sum(
    vectors: Mapping[str, Any],
    *,
    bound: float = 1.0,
    scalars: Mapping[str, float] | None = None,
    scalar_bound: float | None = None,
    drop: Collection[str] = (),
    key_holder: KeyHolder | None = None,
    server_factory: Callable[[bytes, int, Collection[str]], HEServer] = HEServer,
) -> HESumResult:
    """Σ of the clients' vectors through CKKS: every client encrypts, the server adds, the key
    holder decrypts the sum. ``bound``: a public bound on every coordinate's magnitude (values
    beyond it are clipped, as SecAgg+ does); ``scalars`` (one per client, |s| ≤ ``scalar_bound``,
    default ``bound``; a scalar beyond it raises rather than being clipped) travel as one extra
    coordinate and come back as ``scalar_sum``; ``drop``: clients whose ciphertext never arrives
    (they are simply absent from the sum). Raises :class:`HEError` when fewer than
    2 clients' inputs arrive (a sum over one is that client's own) or the sum could overflow."""
    ids = sorted(vectors)
    if set(drop) - set(ids):
        raise ValueError(f"dropped clients {sorted(set(drop) - set(ids))} are not in the group")
    if scalars is not None and set(scalars) != set(ids):
        raise ValueError("scalars must have exactly one value per client in vectors")
    arrays = {u: np.asarray(vectors[u], dtype=np.float64).reshape(-1) for u in ids}
    dims = {len(a) for a in arrays.values()}
    if len(dims) > 1:
        raise ValueError(f"all vectors must have the same length, got {sorted(dims)}")
    senders = [u for u in ids if u not in set(drop)]
    if len(senders) < 2:
        raise HEError(f"a secure sum needs at least 2 clients' inputs, got {len(senders)}")
    scalar_bound = bound if scalar_bound is None else scalar_bound
    largest = max(bound, scalar_bound if scalars is not None else 0.0)
    if len(ids) * largest >= MAX_ABS_SUM:
        raise HEError(
            f"{len(ids)} clients × bound {largest:g} could exceed CKKS's plaintext range "
            f"({MAX_ABS_SUM:g}); scale the inputs down"
        )
    if scalars is not None:
        big = sorted(u for u, s in scalars.items() if not abs(s) <= scalar_bound)
        if big:
            raise HEError(f"scalars of {big} are outside ±{scalar_bound:g}")
    dim = dims.pop() if dims else 0
    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    holder = key_holder or KeyHolder()
    public = holder.public_context
    width = dim + (scalars is not None)
    server = server_factory(public, width, senders)
    clock = _lap(seconds, "setup", clock)

    sent = {u: 0 for u in ids}
    for u in senders:
        client = HEClient(u, public)
        x = np.clip(arrays[u], -bound, bound)
        if scalars is not None:
            x = np.append(x, float(scalars[u]))
        message = client.encrypt(x)
        sent[u] += message.nbytes
        server.receive(message)
    clock = _lap(seconds, "encrypt_and_add", clock)

    total = server.aggregate()
    clock = _lap(seconds, "aggregate", clock)
    plain = holder.decrypt(total)
    _lap(seconds, "decrypt", clock)
    seconds["total"] = sum(seconds.values())
    return HESumResult(
        sum=plain[:dim],
        scalar_sum=float(plain[dim]) if scalars is not None else None,
        included=total.included,
        dropped=tuple(u for u in ids if u not in total.included),
        error_bound=len(total.included) * ERROR_PER_SUMMAND,
        seconds=MappingProxyType(seconds),
        bytes_sent=MappingProxyType(sent),
        server_bytes_sent=len(public) * len(senders) + total.nbytes,
    )


def _lap(seconds: dict[str, float], phase: str, since: float) -> float:
    now = time.perf_counter()
    seconds[phase] = now - since
    return now


__all__ = [
    "COEFF_MOD_BIT_SIZES",
    "ERROR_PER_SUMMAND",
    "EncryptedInput",
    "EncryptedSum",
    "HEClient",
    "HEError",
    "HEServer",
    "HESumResult",
    "HEUnavailable",
    "KeyHolder",
    "MAX_ABS_SUM",
    "POLY_MODULUS_DEGREE",
    "SCALE_BITS",
    "SLOTS",
    "available",
    "encrypted_sum",
    "tenseal",
]
