"""SecAgg+ secure aggregation: Shamir sharing, fixed-point encoding, the protocol and its privacy.

Every test is a few milliseconds to a few tenths of a second (groups of ≤ 50 clients, ≤ 3,000
coordinates).
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pytest
import torch

from fedmtl.privacy import shamir
from fedmtl.privacy.fixedpoint import MIN_FRAC_BITS, FixedPoint, max_clip
from fedmtl.privacy.secagg import (
    MaskedInput,
    SecAggClient,
    SecAggError,
    SecAggParams,
    SecAggServer,
    UnmaskRequest,
    default_neighbours,
    harary_graph,
    resolve_threshold,
    secure_sum,
)

# --------------------------------------------------------------------------- helpers


def random_vectors(n: int, d: int, seed: int = 0, clip: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"client-{i:03d}": rng.uniform(-clip, clip, d) for i in range(n)}


def plain_sum(vectors: Mapping[str, Any], ids: Any) -> np.ndarray:
    return np.sum([np.asarray(vectors[u], dtype=np.float64) for u in ids], axis=0)


class Protocol:
    """Drives the rounds by hand: clients and a server that only see each other's messages."""

    def __init__(
        self,
        vectors: Mapping[str, np.ndarray],
        clip: float = 1.0,
        seed: int = 7,
        server_cls: type[SecAggServer] = SecAggServer,
        **kw: Any,
    ) -> None:
        self.vectors = vectors
        d = len(next(iter(vectors.values())))
        self.params = SecAggParams.create(
            list(vectors), d, clip=clip, session=bytes([seed]) * 16, **kw
        )
        self.clients = {
            u: SecAggClient(u, self.params, random.Random(f"{seed}/{u}"))
            for u in self.params.clients
        }
        self.server = server_cls(self.params)

    def share(self) -> None:
        for client in self.clients.values():
            self.server.receive_keys(client.advertise_keys())
        for u, client in self.clients.items():
            self.server.receive_shares(u, client.share_keys(self.server.keys_for(u)))

    def mask(self, ids: Any) -> dict[str, MaskedInput]:
        out = {}
        for u in ids:
            out[u] = self.clients[u].masked_input(self.vectors[u], self.server.shares_for(u))
            self.server.receive_masked(out[u])
        return out

    def unmask(self, ids: Any) -> None:
        for u in ids:
            self.server.receive_unmask(self.clients[u].unmask(self.server.unmask_request(u)))


def walk(obj: Any, seen: set[int] | None = None) -> Iterator[Any]:
    """Every leaf (arrays, tensors, bytes, scalars) reachable from ``obj``."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, np.ndarray | torch.Tensor | bytes | bytearray | str | int | float):
        yield obj
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from walk(getattr(obj, f.name), seen)
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from walk(k, seen)
            yield from walk(v, seen)
    elif isinstance(obj, list | tuple | set | frozenset):
        for v in obj:
            yield from walk(v, seen)
    elif hasattr(obj, "__dict__"):
        yield from walk(vars(obj), seen)


# --------------------------------------------------------------------------- Shamir


def test_shamir_any_t_shares_reconstruct_and_t_minus_1_do_not():
    rng = random.Random(1)
    secret = bytes(rng.randrange(256) for _ in range(32))
    shares = shamir.split(secret, 6, 3, rng)
    assert [s.x for s in shares] == [1, 2, 3, 4, 5, 6]
    for subset in itertools.combinations(shares, 3):
        assert shamir.combine(list(subset), 3) == secret
    assert shamir.combine(shares, 3) == secret  # more than t is fine
    for subset in itertools.combinations(shares, 2):
        with pytest.raises(ValueError, match="at least t=3 distinct shares, got 2"):
            shamir.combine(list(subset), 3)
        with pytest.raises(ValueError, match="inconsistent"):  # a wrong threshold is caught
            shamir.combine(list(subset), 2)  # (11 chunks, each passes w.p. 2^-7: misses 2^-77)
    with pytest.raises(ValueError, match="got 2"):  # a duplicate is not a new share
        shamir.combine([shares[0], shares[0], shares[1]], 3)


@pytest.mark.parametrize("length", [1, 31, 32, 33, 100])
def test_shamir_secrets_of_any_length_and_serialisation(length):
    rng = random.Random(length)
    secret = rng.randbytes(length)
    shares = shamir.split(secret, 9, 5, rng)
    wire = [shamir.Share.from_bytes(s.to_bytes()) for s in shares]
    assert wire == shares
    picked = rng.sample(wire, 5)
    assert shamir.combine(picked, 5) == secret
    assert all(len(s.ys) == -(-length // shamir.CHUNK_BYTES) for s in shares)


def test_shamir_rejects_bad_arguments_and_inconsistent_shares():
    with pytest.raises(ValueError, match="1 <= t <= n"):
        shamir.split(b"x" * 32, 3, 4)
    with pytest.raises(ValueError, match="non-empty"):
        shamir.split(b"", 3, 2)
    a = shamir.split(b"a" * 32, 4, 2, random.Random(0))
    b = shamir.split(b"b" * 32, 4, 2, random.Random(1))
    with pytest.raises(ValueError, match="two different shares have x=1"):
        shamir.combine([a[0], b[0]], 2)
    assert shamir.split(b"k" * 32, 5, 3, random.Random(3)) == shamir.split(
        b"k" * 32, 5, 3, random.Random(3)
    )
    assert shamir.split(b"k" * 32, 5, 3) != shamir.split(b"k" * 32, 5, 3)  # os.urandom


def test_vectorised_shamir_equals_the_scalar_horner_path_for_the_same_coefficients():
    for n, t, length in [(1, 1, 1), (5, 3, 4), (9, 5, 70), (53, 27, 32), (120, 61, 32)]:
        secret = random.Random(n).randbytes(length)
        shares = shamir.split(secret, n, t, random.Random(t))
        rng = random.Random(t)  # the same randomness, drawn the way split draws it
        coefficients = shamir._random_elements(rng, (t - 1, shamir._n_chunks(length)))
        chunks = shamir._chunks(secret)
        for share in shares:
            assert share.ys == tuple(
                shamir._evaluate([chunks[j], *coefficients[:, j].tolist()], share.x)
                for j in range(len(chunks))
            )
        picked = random.Random(0).sample(shares, t)
        assert shamir.combine(picked, t) == secret


def test_shamir_with_many_holders_reconstructs_from_any_t():
    rng = random.Random(5)
    secret = rng.randbytes(32)
    shares = shamir.split(secret, 300, 151, rng)
    for _ in range(3):
        assert shamir.combine(rng.sample(shares, 151 + rng.randrange(20)), 151) == secret
    with pytest.raises(ValueError, match="at least t=151 distinct shares, got 150"):
        shamir.combine(shares[:150], 151)


def test_shamir_field_arithmetic_cannot_overflow():
    p = shamir.P
    worst = np.full((3, 40), p - 1, dtype=np.int64)
    wide = np.full((40, 5), p - 1, dtype=np.int64)
    assert (shamir._matmul_mod(worst, wide) == 40 * (p - 1) ** 2 % p).all()
    a = np.random.default_rng(0).integers(0, p, (2, (1 << 15) + 7))  # more than one block
    b = np.random.default_rng(1).integers(0, p, ((1 << 15) + 7, 3))
    exact = [
        [sum(int(x) * int(y) for x, y in zip(a[i], b[:, j])) % p for j in range(3)]
        for i in range(2)
    ]
    assert shamir._matmul_mod(a, b).tolist() == exact
    xs = tuple(random.Random(2).sample(range(1, 10_000), 40))
    weights = shamir._lagrange_at_zero(xs)
    for i, xi in enumerate(xs):  # the textbook λ_i, one inversion each
        num = den = 1
        for j, xj in enumerate(xs):
            if j != i:
                num, den = num * xj % p, den * (xj - xi) % p
        assert weights[i] == num * pow(den, -1, p) % p


def test_shamir_coefficients_are_redrawn_rather_than_reduced():
    class Draws(random.Random):  # 31 random bits equal to P first, then 5
        def __init__(self, words):
            super().__init__(0)
            self.words = list(words)

        def randbytes(self, n):
            return b"".join(
                w.to_bytes(4, "little") for w in (self.words.pop(0) for _ in range(n // 4))
            )

    got = shamir._random_elements(Draws([0xFFFFFFFF, 7, shamir.P, 5]), (1, 2))
    assert got.tolist() == [[5, 7]]  # 0xFFFFFFFF & P == P is redrawn (twice), not wrapped to 0
    with pytest.raises(ValueError, match="field elements"):
        shamir.Share.from_bytes(shamir.Share(1, (shamir.P,), 3).to_bytes())


# --------------------------------------------------------------------------- fixed point


def test_fixedpoint_bits_leave_no_room_for_wraparound():
    for clip, n in [(1.0, 100), (1.0, 500), (0.05, 3), (1000.0, 50)]:
        fp = FixedPoint(clip, n)
        assert n * clip * 2**fp.frac_bits < 2**31
        assert n * np.ceil(clip * 2 ** (fp.frac_bits + 1)) > 2**31 - 1  # the largest such f
        assert fp.precision == 2.0 ** -(fp.frac_bits + 1)
        for extreme in (clip, -clip):
            words = np.zeros(4, dtype=np.uint32)
            for _ in range(n):
                words += fp.encode(np.full(4, extreme))
            np.testing.assert_allclose(fp.decode_sum(words), n * extreme, atol=n * fp.precision)
            assert np.sign(fp.decode_sum(words)).tolist() == [np.sign(extreme)] * 4
    assert FixedPoint(1.0, 100).frac_bits == 24


def test_fixedpoint_twos_complement_negatives_clipping_and_precision():
    fp = FixedPoint(2.0, 10)
    step = 2.0**-fp.frac_bits
    words = fp.encode(np.array([-step, step, 0.0, -2.0, 2.0, -7.5, np.inf, -np.inf]))
    assert words.dtype == np.uint32
    assert words[0] == 0xFFFFFFFF and words[1] == 1 and words[2] == 0
    assert fp.decode_sum(words).tolist() == [-step, step, 0.0, -2.0, 2.0, -2.0, 2.0, -2.0]
    x = np.random.default_rng(0).uniform(-2, 2, 5000)
    err = np.abs(fp.decode_sum(fp.encode(x)) - x)
    assert err.max() <= fp.precision and err.max() > fp.precision / 2  # the bound is tight
    # negative partial sums wrap modulo 2^32 and still decode
    total = fp.encode(np.array([-1.5])) + fp.encode(np.array([-1.75])) + fp.encode(np.array([1.0]))
    assert fp.decode_sum(total)[0] == pytest.approx(-2.25, abs=3 * fp.precision)
    t = torch.tensor([0.5, -0.25], dtype=torch.float32)
    assert fp.decode_sum(fp.encode(t)).tolist() == [0.5, -0.25]


def test_fixedpoint_rejects_too_coarse_settings_and_nan():
    with pytest.raises(ValueError, match=r"clip=100000.0, n_summands=500"):
        FixedPoint(1e5, 500)
    assert FixedPoint(max_clip(500), 500).frac_bits == MIN_FRAC_BITS
    with pytest.raises(ValueError, match="n_summands"):
        FixedPoint(max_clip(500) * 1.01, 500)
    with pytest.raises(ValueError, match="positive"):
        FixedPoint(0.0, 5)
    with pytest.raises(ValueError, match="NaN"):
        FixedPoint(1.0, 5).encode(np.array([0.0, np.nan]))
    with pytest.raises(ValueError, match="1-D"):
        FixedPoint(1.0, 5).encode(np.zeros((2, 2)))
    with pytest.raises(TypeError, match="uint32"):
        FixedPoint(1.0, 5).decode_sum(np.zeros(3))


# --------------------------------------------------------------------------- graph and threshold


@pytest.mark.parametrize("n,k", [(20, 6), (20, 7), (21, 7), (21, 8), (9, 8), (30, 29), (5, 9)])
def test_harary_graph_degrees_symmetry_and_determinism(n, k):
    ids = [f"u{i}" for i in range(n)]
    g = harary_graph(ids, k, seed=b"public")
    assert harary_graph(list(reversed(ids)), k, seed=b"public") == g
    kk = min(k, n - 1)
    degrees = sorted(len(vs) for vs in g.values())
    if kk % 2 and n % 2:
        assert degrees == [kk] * (n - 1) + [kk + 1]
    else:
        assert degrees == [kk] * n
    for u, vs in g.items():
        assert u not in vs and all(u in g[v] for v in vs)
    if kk < n - 1:
        assert harary_graph(ids, k, seed=b"other") != g


def test_default_k_and_threshold():
    assert [default_neighbours(n) for n in (2, 10, 11, 100, 500)] == [1, 9, 9, 17, 23]
    assert [default_neighbours(100, d) for d in (0.0, 0.2, 0.3)] == [
        15,
        31,
        53,
    ]  # 15: the log floor
    assert [default_neighbours(1000, d) for d in (0.1, 0.2, 0.3)] == [25, 57, 133]
    with pytest.raises(ValueError, match="max_dropout"):
        default_neighbours(100, 0.5)
    assert resolve_threshold(15) == 8 and resolve_threshold(9) == 5 and resolve_threshold(1) == 1
    assert resolve_threshold(15, 0.8) == 12 and resolve_threshold(15, 10) == 10
    for bad in (7, 0.4, 16, 0):
        with pytest.raises(ValueError, match="k/2 < t <= k"):
            resolve_threshold(15, bad)


@pytest.mark.parametrize("n,dropout", [(100, 0.1), (100, 0.2), (100, 0.3), (500, 0.3)])
def test_default_k_is_the_smallest_degree_whose_loss_bound_holds(n, dropout):
    from scipy.stats import binom, hypergeom

    def loss(k):  # P(some client keeps fewer than t = k//2 + 1 surviving neighbours), union bound
        t = k // 2 + 1  # lost when more than k - t of its k neighbours are among the D dropped
        return n * hypergeom.sf(k - t, n - 1, int(dropout * n + 1e-9), k)

    k = default_neighbours(n, dropout)
    assert loss(k) <= 1e-4 < loss(k - 1)
    # the with-replacement (binomial) stand-in is looser: it never asks for fewer neighbours
    assert n * binom.cdf(k // 2, k, 1 - dropout) >= loss(k)


def test_neighbours_dropped_are_hypergeometric_as_the_degree_bound_assumes():
    """The bound behind default_neighbours assumes that a client's neighbours in the random
    Harary graph are a uniformly random k-subset of the others: check the count of a client's
    neighbours among D dropped clients against the hypergeometric law, over random graphs."""
    from scipy.stats import hypergeom

    n, k, dropped, trials = 30, 9, 9, 3000
    ids = [f"u{i:02d}" for i in range(n)]
    gone = set(ids[1 : 1 + dropped])  # u00 survives; any fixed set works as the order is random
    counts = np.zeros(k + 1)
    for trial in range(trials):
        counts[len(harary_graph(ids, k, seed=trial)["u00"] & gone)] += 1
    expected = hypergeom.pmf(np.arange(k + 1), n - 1, dropped, k) * trials
    chi2 = float(((counts - expected) ** 2 / np.maximum(expected, 1e-9))[expected > 5].sum())
    assert chi2 < 25.0  # 7 bins with > 5 expected, 6 degrees of freedom: p < 1e-3 at 25
    tail = counts[k - (k // 2 + 1) + 1 :].sum() / trials  # more than k - t of them dropped
    assert tail == pytest.approx(hypergeom.sf(k - (k // 2 + 1), n - 1, dropped, k), abs=0.015)


def test_a_graph_sized_for_30_percent_dropout_recovers_every_sum():
    rng = np.random.default_rng(30)
    vectors = random_vectors(200, 20, seed=30)
    k = default_neighbours(200, 0.3)
    assert k < 199  # not the complete graph
    for trial in range(2):
        late = rng.choice(sorted(vectors), size=60, replace=False).tolist()
        res = secure_sum(vectors, clip=1.0, max_dropout=0.3, drop_after_masking=late, seed=trial)
        assert res.k == k and len(res.included) == 200 and not res.dropped
        assert np.abs(res.sum - plain_sum(vectors, vectors)).max() <= res.error_bound


def test_the_30_percent_graph_at_100_clients_is_sparse_and_recovers_every_sum():
    vectors = random_vectors(100, 10, seed=31)
    rng = np.random.default_rng(31)
    for trial in range(2):
        late = rng.choice(sorted(vectors), size=30, replace=False).tolist()
        res = secure_sum(vectors, clip=1.0, max_dropout=0.3, drop_after_masking=late, seed=trial)
        assert (res.k, res.t) == (53, 27) and len(res.included) == 100
        assert np.abs(res.sum - plain_sum(vectors, vectors)).max() <= res.error_bound


# --------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("n,d", [(10, 3000), (50, 2000)])
def test_secure_sum_equals_plain_sum_within_fixed_point_precision(n, d):
    vectors = random_vectors(n, d, seed=n)
    vectors["client-000"] = torch.tensor(vectors["client-000"], dtype=torch.float32)
    res = secure_sum(vectors, clip=1.0, seed=3)
    expected = plain_sum(vectors, vectors)
    assert res.sum.dtype == np.float64 and res.sum.shape == (d,)
    assert res.error_bound == n * res.precision
    assert np.abs(res.sum - expected).max() <= res.error_bound
    assert res.included == tuple(sorted(vectors)) and res.dropped == ()
    assert (res.k, res.t) == (default_neighbours(n), default_neighbours(n) // 2 + 1)
    assert set(res.seconds) == {
        "setup",
        "advertise_keys",
        "share_keys",
        "masked_input",
        "unmask",
        "aggregate",
        "total",
    }
    assert all(res.bytes_sent[u] > 4 * d for u in vectors) and res.server_bytes_sent > 0


def test_values_beyond_clip_are_clipped_before_summing():
    vectors = {
        "a": np.array([5.0, -5.0, 0.5]),
        "b": np.array([0.25, 0.25, 0.25]),
        "c": np.array([0.0, 0.0, -3.0]),
    }
    res = secure_sum(vectors, clip=1.0, seed=0)
    np.testing.assert_allclose(res.sum, [1.25, -0.75, -0.25], atol=res.error_bound)


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.3])
def test_dropout_after_masking_keeps_their_input(fraction):
    vectors = random_vectors(20, 1500, seed=11)
    ids = sorted(vectors)
    late = ids[1 : 1 + round(fraction * len(ids))]
    res = secure_sum(vectors, clip=1.0, neighbours=15, drop_after_masking=late, seed=5)
    assert res.included == tuple(ids) and res.dropped == ()
    assert np.abs(res.sum - plain_sum(vectors, ids)).max() <= res.error_bound


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.3])
def test_dropout_before_masking_sums_the_survivors(fraction):
    vectors = random_vectors(20, 1500, seed=12)
    ids = sorted(vectors)
    gone = ids[::3][: round(fraction * len(ids))]
    res = secure_sum(vectors, clip=1.0, neighbours=15, drop_before_masking=gone, seed=6)
    survivors = [u for u in ids if u not in gone]
    assert res.included == tuple(survivors) and res.dropped == tuple(gone)
    assert np.abs(res.sum - plain_sum(vectors, survivors)).max() <= res.error_bound


def test_mixed_dropouts_with_the_default_graph():
    vectors = random_vectors(40, 1000, seed=13)
    ids = sorted(vectors)
    res = secure_sum(
        vectors, clip=1.0, drop_before_masking=ids[:3], drop_after_masking=ids[3:6], seed=8
    )
    assert res.k == default_neighbours(40) == 13 and res.t == 7
    assert res.dropped == tuple(ids[:3])
    assert np.abs(res.sum - plain_sum(vectors, ids[3:])).max() <= res.error_bound


def test_weighted_sum_with_secure_scalars():
    vectors = random_vectors(12, 500, seed=14, clip=0.1)
    counts = {u: float(30 + 7 * i) for i, u in enumerate(sorted(vectors))}
    weighted = {u: counts[u] * v / 200.0 for u, v in vectors.items()}  # w_i·Δ_i with w_i ≤ 1
    ids = sorted(vectors)
    res = secure_sum(weighted, clip=1.0, scalars=counts, drop_before_masking=ids[:2], seed=2)
    kept = ids[2:]
    assert res.scalar_sum == sum(counts[u] for u in kept)  # integers are exact
    mean = res.sum / (res.scalar_sum / 200.0)
    expected = sum(counts[u] * vectors[u] for u in kept) / sum(counts[u] for u in kept)
    np.testing.assert_allclose(mean, expected, atol=1e-5)
    assert secure_sum(vectors, clip=1.0, seed=2).scalar_sum is None
    with pytest.raises(ValueError, match="scalar must be a finite number within"):
        secure_sum(vectors, clip=1.0, scalars={u: 1e9 for u in vectors}, seed=2)
    with pytest.raises(ValueError, match="one value per client"):
        secure_sum(vectors, clip=1.0, scalars={"client-000": 1.0}, seed=2)


def test_seeded_runs_are_reproducible():
    vectors = random_vectors(15, 800, seed=15)
    a = secure_sum(vectors, clip=1.0, seed=42, drop_before_masking=["client-003"])
    b = secure_sum(vectors, clip=1.0, seed=42, drop_before_masking=["client-003"])
    assert np.array_equal(a.sum, b.sum) and a.bytes_sent == b.bytes_sent
    run1, run2, run3 = (Protocol(vectors, seed=s) for s in (1, 1, 2))
    for p in (run1, run2, run3):
        p.share()
    m1, m2, m3 = (p.mask(["client-000"])["client-000"].words for p in (run1, run2, run3))
    assert np.array_equal(m1, m2) and not np.array_equal(m1, m3)


# --------------------------------------------------------------------------- dropout limits


def test_too_many_dropouts_raise_clear_errors():
    vectors = random_vectors(10, 100, seed=16)
    ids = sorted(vectors)  # 10 clients: the complete graph, k=9, t=5
    with pytest.raises(SecAggError, match="only 1 of 10 clients sent masked inputs"):
        secure_sum(vectors, clip=1.0, drop_before_masking=ids[1:], seed=1)
    with pytest.raises(ValueError, match="aborts: only 4 of its 9 neighbours survived"):
        secure_sum(vectors, clip=1.0, drop_before_masking=ids[:5], seed=1)
    with pytest.raises(
        SecAggError,
        match=r"cannot reconstruct b_u .* of client '.*': 4 shares "
        r"from its 9 neighbours \(4 responded\), threshold t=5",
    ):
        secure_sum(vectors, clip=1.0, drop_after_masking=ids[:5], seed=1)
    with pytest.raises(SecAggError, match="at least 2 clients"):
        secure_sum({"solo": np.zeros(3)}, clip=1.0)
    two = {"a": np.ones(3), "b": np.ones(3)}
    with pytest.raises(SecAggError, match="only 1 of 2"):  # a sum over one client is its update
        secure_sum(two, clip=1.0, drop_before_masking=["a"], seed=1)
    np.testing.assert_allclose(secure_sum(two, clip=1.0, seed=1).sum, 2.0, atol=1e-6)


# --------------------------------------------------------------------------- privacy


def test_a_single_masked_input_looks_nothing_like_its_plaintext():
    vectors = random_vectors(10, 3000, seed=17)
    p = Protocol(vectors)
    p.share()
    masked = p.mask(sorted(vectors))
    fp = p.params.fixed_point
    for u, m in masked.items():
        alone = fp.decode_sum(np.array(m.words))
        assert abs(np.corrcoef(alone, vectors[u])[0, 1]) < 0.1
        assert np.mean(m.words == fp.encode(vectors[u])) < 0.01
        # uniform over the whole int32 range, not over [−clip, clip]
        assert np.abs(alone).mean() == pytest.approx(2**30 / fp.scale, rel=0.05)


def test_masked_input_cannot_be_forged_and_server_rejects_other_types():
    vectors = random_vectors(4, 50, seed=18)
    p = Protocol(vectors)
    p.share()
    genuine = p.mask(["client-000"])["client-000"]
    plain = p.params.fixed_point.encode(vectors["client-001"])
    with pytest.raises(TypeError, match="produced only by SecAggClient"):
        MaskedInput("client-001", plain)
    with pytest.raises(TypeError, match="produced only by SecAggClient"):
        dataclasses.replace(genuine, client="client-001", words=plain)
    fake = type("MaskedInput", (), {"client": "client-001", "words": plain})()
    for bad in (
        torch.tensor(vectors["client-001"]),
        vectors["client-001"],
        plain,
        fake,
        ("client-001", plain),
    ):
        with pytest.raises(TypeError, match="accepts only MaskedInput"):
            p.server.receive_masked(bad)
    with pytest.raises(ValueError, match="read-only"):
        genuine.words[0] = 0


class RecordingServer(SecAggServer):
    """Records every argument of every method call it receives."""

    def __init__(self, params: SecAggParams) -> None:
        super().__init__(params)
        self.received: list[tuple[str, tuple, dict]] = []

    def __getattribute__(self, name: str) -> Any:
        attr = super().__getattribute__(name)
        if callable(attr) and not name.startswith("__") and name != "received":

            def recorded(*args: Any, **kwargs: Any) -> Any:
                super(RecordingServer, self).__getattribute__("received").append(
                    (name, args, kwargs)
                )
                return attr(*args, **kwargs)

            return recorded
        return attr


def test_instrumented_server_never_receives_a_plaintext_vector():
    n, d = 16, 1000
    vectors = random_vectors(n, d, seed=19)
    ids = sorted(vectors)
    servers: list[RecordingServer] = []

    def factory(params: SecAggParams) -> RecordingServer:
        servers.append(RecordingServer(params))
        return servers[-1]

    res = secure_sum(
        vectors,
        clip=1.0,
        seed=4,
        drop_before_masking=ids[:2],
        drop_after_masking=ids[2:4],
        server_factory=factory,
    )
    assert np.abs(res.sum - plain_sum(vectors, ids[2:])).max() <= res.error_bound
    server = servers[0]
    called = {name for name, _, _ in server.received}
    assert {
        "receive_keys",
        "keys_for",
        "receive_shares",
        "shares_for",
        "receive_masked",
        "unmask_request",
        "receive_unmask",
        "aggregate",
    } <= called
    encodings = [FixedPoint(1.0, n).encode(v) for v in vectors.values()]
    floats = list(vectors.values())
    leaves = list(walk([(args, kwargs) for _, args, kwargs in server.received]))
    state = list(walk(vars(server)))
    arrays = [x for x in leaves + state if isinstance(x, np.ndarray) and x.size >= d]
    assert sum(x.dtype == np.uint32 for x in arrays) >= n - 2  # the masked inputs were seen
    assert not any(isinstance(x, torch.Tensor) for x in leaves + state)
    for x in arrays:
        assert x.dtype == np.uint32  # no float vector ever reached the server
        for enc in encodings:
            assert np.mean(x[:d] == enc) < 0.01
    blobs = [x for x in leaves + state if isinstance(x, bytes) and len(x) >= 64]
    for enc, f in zip(encodings, floats, strict=True):
        for needle in (enc[:16].tobytes(), f[:8].tobytes(), f[:16].astype(np.float32).tobytes()):
            assert not any(needle in blob for blob in blobs)


def test_client_refuses_to_reveal_both_shares_of_a_peer():
    vectors = random_vectors(8, 40, seed=20)
    p = Protocol(vectors)
    p.share()
    p.mask(sorted(vectors))
    me, others = "client-000", sorted(vectors)[1:]
    client = p.clients[me]
    both = UnmaskRequest(me, frozenset(others), frozenset(others[:1]))
    with pytest.raises(SecAggError, match=r"refuses to reveal both .*client-001"):
        client.unmask(both)
    first = client.unmask(UnmaskRequest(me, frozenset(others), frozenset()))
    assert set(first.b_shares) == set(others) and not first.s_shares
    flipped = UnmaskRequest(me, frozenset(others[1:]), frozenset(others[:1]))
    with pytest.raises(SecAggError, match=r"refuses to reveal both .*client-001"):
        client.unmask(flipped)


def test_late_masked_input_is_rejected_once_unmasking_started():
    vectors = random_vectors(8, 40, seed=21)
    ids = sorted(vectors)
    p = Protocol(vectors)
    p.share()
    p.mask(ids[1:])
    late = p.clients[ids[0]].masked_input(vectors[ids[0]], p.server.shares_for(ids[0]))
    request = p.server.unmask_request(ids[1])
    assert ids[0] in request.dropped  # its s-key shares are about to be revealed
    with pytest.raises(SecAggError, match="round 2"):
        p.server.receive_masked(late)
    p.server.receive_unmask(p.clients[ids[1]].unmask(request))
    p.unmask(ids[2:])
    result = p.server.aggregate()
    assert result.included == tuple(ids[1:])
    error = np.abs(result.vector - plain_sum(vectors, ids[1:])).max()
    assert error <= 7 * p.params.fixed_point.precision


def test_tampered_ciphertext_fails_authentication():
    class TamperingServer(SecAggServer):
        def shares_for(self, client):
            msgs = super().shares_for(client)
            bad = msgs[0]
            flipped = bytes([bad.ciphertext[0] ^ 1]) + bad.ciphertext[1:]
            return [dataclasses.replace(bad, ciphertext=flipped)] + msgs[1:]

    with pytest.raises(SecAggError, match="fail authentication"):
        secure_sum(random_vectors(6, 20, seed=22), clip=1.0, seed=1, server_factory=TamperingServer)
