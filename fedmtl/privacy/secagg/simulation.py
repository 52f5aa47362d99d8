"""SecAgg+ run in one process (every client and the server), with real cryptography: the
secure sum the aggregation calls."""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np

from fedmtl.privacy.secagg.client import SecAggClient
from fedmtl.privacy.secagg.graph import (
    DEFAULT_MAX_DROPOUT,
    SecAggParams,
    default_neighbours,
    harary_graph,
    resolve_threshold,
)
from fedmtl.privacy.secagg.messages import (
    AdvertisedKeys,
    EncryptedShare,
    MaskedInput,
    SecAggError,
    UnmaskedSum,
    UnmaskRequest,
    UnmaskResponse,
)
from fedmtl.privacy.secagg.server import SecAggServer

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
