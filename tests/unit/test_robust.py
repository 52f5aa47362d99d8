"""Byzantine-robust aggregation (fedmtl.server.robust) and the attacks it is tested against
(fedmtl.server.byzantine)."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import stats

from fedmtl.server.aggregation import global_merge, group_aggregate, weighted_mean
from fedmtl.server.byzantine import ATTACKS, attackers, corrupt_update, flip_labels
from fedmtl.server.robust import (
    RULES,
    RobustSpec,
    aggregate_updates,
    coordinate_median,
    default_byzantine,
    krum_scores,
    multi_krum,
    norm_bound,
    robust_aggregate,
    trimmed_mean,
)
from fedmtl.state import ClientUpdate, ServerState

D = 64
ROBUST = ("median", "trimmed_mean", "krum", "multi_krum", "norm_bound")


def rows(x: torch.Tensor) -> list[torch.Tensor]:
    return list(x.unbind(0))


def honest_cloud(n: int, seed: int, spread: float = 0.3) -> torch.Tensor:
    """n honest updates around a common direction μ (‖μ‖ = √D), per-coordinate noise ``spread``."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.ones(D) + 0.5 * torch.randn(D, generator=g)
    return mu + spread * torch.randn(n, D, generator=g)


def spread_of(x: torch.Tensor) -> float:
    """Root mean squared distance of the rows to their mean: the honest updates' own scale."""
    return float((x - x.mean(0)).norm(dim=1).square().mean().sqrt())


# --- the rules against references ---------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 5, 6, 11])
def test_coordinate_median_equals_numpy(n):
    x = torch.randn(n, 37, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    np.testing.assert_allclose(
        coordinate_median(rows(x)).numpy(), np.median(x.numpy(), axis=0), rtol=0, atol=1e-12
    )


@pytest.mark.parametrize("n,beta", [(5, 0.2), (10, 0.2), (10, 0.25), (7, 0.0), (9, 0.45), (3, 0.4)])
def test_trimmed_mean_equals_scipy(n, beta):
    x = torch.randn(n, 23, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    expected = stats.trim_mean(x.numpy(), beta, axis=0)
    np.testing.assert_allclose(trimmed_mean(rows(x), beta).numpy(), expected, rtol=0, atol=1e-12)


def test_krum_scores_equal_brute_force():
    x = torch.randn(9, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    f = 2
    expected = []
    for i in range(9):
        d2 = sorted(float((x[i] - x[j]).square().sum()) for j in range(9) if j != i)
        expected.append(sum(d2[: 9 - f - 2]))
    np.testing.assert_allclose(krum_scores(rows(x), f).numpy(), expected, rtol=1e-10)


def test_krum_picks_an_honest_vector_against_far_away_attackers():
    x = honest_cloud(8, seed=1)
    far = x.mean(0) + 50.0  # two colluding attackers sending the same far-away vector
    vectors = rows(x[:4]) + [far, far.clone()] + rows(x[4:])
    agg, kept = multi_krum(vectors, n_byzantine=2, m=1)
    assert len(kept) == 1 and kept[0] not in (4, 5)
    torch.testing.assert_close(agg, vectors[kept[0]])


def test_multi_krum_on_honest_data_is_close_to_the_mean():
    x = honest_cloud(10, seed=2)
    agg, kept = multi_krum(rows(x), n_byzantine=2, m=8)
    assert len(kept) == 8 and kept == sorted(kept)
    torch.testing.assert_close(agg, x[kept].mean(0))
    # dropping the 2 most outlying of 10 honest vectors moves the mean by a small part of the spread
    assert float((agg - x.mean(0)).norm()) < 0.25 * spread_of(x)
    agg_all, kept_all = multi_krum(
        rows(x), n_byzantine=2, m=10, weights=[float(i + 1) for i in range(10)]
    )
    assert kept_all == list(range(10))
    torch.testing.assert_close(agg_all, weighted_mean(rows(x), [float(i + 1) for i in range(10)]))


def test_norm_bound_caps_norms_and_is_the_weighted_mean_under_the_bound():
    x = honest_cloud(6, seed=3)
    weights = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    big = float(x.norm(dim=1).max()) + 1.0
    torch.testing.assert_close(norm_bound(rows(x), weights, big), weighted_mean(rows(x), weights))
    # one vector at a time: the aggregate of a single vector is that vector, capped
    v = x[0] * 10
    capped = norm_bound([v], None, 2.0)
    assert abs(float(capped.norm()) - 2.0) < 1e-5
    torch.testing.assert_close(capped / capped.norm(), v / v.norm())
    # default bound: the median norm, so every clipped input has exactly that norm
    norms = x.norm(dim=1)
    median = float(np.median(norms.numpy()))
    expected = sum(
        w * r * min(1.0, median / float(r.norm())) for w, r in zip(weights, rows(x))
    ) / sum(weights)
    torch.testing.assert_close(norm_bound(rows(x), weights), expected)


def test_mean_rule_is_the_weighted_mean_and_dtype_is_kept():
    x = honest_cloud(7, seed=4)
    weights = [3.0, 1.0, 1.0, 2.0, 5.0, 1.0, 1.0]
    agg, kept = robust_aggregate(rows(x), weights, "mean")
    torch.testing.assert_close(agg, weighted_mean(rows(x), weights))
    assert kept == list(range(7))
    for rule in RULES:
        out, _ = robust_aggregate(rows(x), weights, rule)
        assert out.dtype == torch.float32 and out.shape == (D,), rule
        out64, _ = robust_aggregate(rows(x.double()), weights, rule)
        assert out64.dtype == torch.float64, rule


def test_default_byzantine_covers_twenty_percent_within_krums_limit():
    assert [default_byzantine(n) for n in (2, 3, 4, 5, 7, 10, 15, 20, 50)] == [
        0,
        0,
        0,
        1,
        2,
        2,
        3,
        4,
        10,
    ]
    for n in range(3, 200):
        f = default_byzantine(n)
        assert n > 2 * f + 2
        assert f >= min(len(attackers([str(i) for i in range(n)], 0.2, seed=0)), (n - 3) // 2)


# --- robustness: 20 % Byzantine inputs ----------------------------------------------------------


def byzantine_inputs(
    attack: str, n: int = 10, seed: int = 5
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """n inputs, 20 % of them Byzantine (at scattered positions); and the honest mean."""
    x = honest_cloud(n, seed=seed)
    bad = {1, 6}
    g = torch.Generator().manual_seed(seed + 100)
    vectors = []
    for i in range(n):
        if i not in bad:
            vectors.append(x[i])
        elif attack == "sign_flip":
            vectors.append(-10.0 * x[i])
        else:
            vectors.append(100.0 * torch.randn(D, generator=g))
    honest = torch.stack([x[i] for i in range(n) if i not in bad])
    return vectors, honest


@pytest.mark.parametrize("attack", ["sign_flip", "gaussian"])
@pytest.mark.parametrize("rule", ROBUST)
def test_robust_rules_resist_twenty_percent_byzantine_where_the_mean_breaks(rule, attack):
    vectors, honest = byzantine_inputs(attack)
    target, scale = honest.mean(0), spread_of(honest)
    plain, _ = robust_aggregate(vectors, None, "mean")
    assert float((plain - target).norm()) > 5 * scale  # FedAvg is dragged far off
    agg, kept = robust_aggregate(vectors, None, rule)
    error = float((agg - target).norm())
    if rule == "norm_bound":
        # no one is excluded, the damage is capped:
        # (1/n)·Σ_honest (‖v‖ − M)₊ + (f/n)·(M + ‖honest mean‖)
        n, f = len(vectors), 2
        m = float(np.median(torch.stack(vectors).norm(dim=1).numpy()))
        excess = float((honest.norm(dim=1) - m).clamp_min(0).sum()) / n
        assert error <= excess + f / n * (m + float(target.norm())) + 1e-4
        assert error < 0.25 * float((plain - target).norm())
    elif rule == "krum":  # one honest vector: within the honest cloud, not at its centre
        assert error <= float((honest - target).norm(dim=1).max()) + 1e-5
    else:
        assert error < 0.5 * scale, (rule, error, scale)
    if rule in ("krum", "multi_krum"):
        assert not {1, 6} & set(kept)
        assert len(kept) == (1 if rule == "krum" else 8)
    else:
        assert kept == list(range(10))


# --- errors -------------------------------------------------------------------------------------


def test_bad_settings_are_rejected_with_clear_errors():
    x = rows(honest_cloud(4, seed=6))
    with pytest.raises(
        ValueError, match=r"'geomedian' is not known; allowed values: .*'median'.*'multi_krum'"
    ):
        robust_aggregate(x, None, "geomedian")
    with pytest.raises(ValueError, match=r"'geomedian' is not known; allowed values"):
        RobustSpec(rule="geomedian")
    for beta in (0.5, 0.7, -0.1):
        with pytest.raises(ValueError, match=r"trim_fraction must be in \[0, 0.5\)"):
            trimmed_mean(x, beta)
        with pytest.raises(ValueError, match="trim_fraction"):
            RobustSpec(rule="trimmed_mean", trim_fraction=beta)
    with pytest.raises(ValueError, match=r"more than 2f \+ 2 = 4 vectors for f = 1 .*got n = 4"):
        krum_scores(x, 1)
    with pytest.raises(ValueError, match=r"more than 2f \+ 2 = 2 vectors for f = 0 .*got n = 2"):
        robust_aggregate(x[:2], None, "krum")
    with pytest.raises(ValueError, match=r"m must be in \[1, n = 4\], got 5"):
        multi_krum(x, 0, 5)
    with pytest.raises(ValueError, match="vector 2 has 5 values, vector 0 has 64"):
        robust_aggregate([x[0], x[1], torch.zeros(5)], None, "median")
    with pytest.raises(ValueError, match=r"4 vectors but 3 weights"):
        robust_aggregate(x, [1.0, 1.0, 1.0], "mean")
    with pytest.raises(ValueError, match="non-negative"):
        robust_aggregate(x, [1.0, -1.0, 1.0, 1.0], "norm_bound")
    with pytest.raises(ValueError, match="no vectors"):
        robust_aggregate([], None, "median")
    for bad in (float("nan"), float("inf")):
        poisoned = x[3].clone()
        poisoned[7] = bad
        for rule in RULES:
            with pytest.raises(ValueError, match="vector 3 is not finite"):
                robust_aggregate(x[:3] + [poisoned], None, rule)
    with pytest.raises(ValueError, match="max_norm"):
        RobustSpec(rule="norm_bound", max_norm=-1.0)


def test_spec_from_config_reads_attributes_with_defaults():
    assert RobustSpec.from_config(None) == RobustSpec()
    assert RobustSpec.from_config(SimpleNamespace(rule="krum", n_byzantine=1)) == RobustSpec(
        "krum", 0.2, 1, None
    )
    section = SimpleNamespace(
        rule="trimmed_mean", trim_fraction=0.1, n_byzantine=None, max_norm=3.0
    )
    assert RobustSpec.from_config(section) == RobustSpec("trimmed_mean", 0.1, None, 3.0)


# --- client updates -----------------------------------------------------------------------------


def make_updates(n: int = 10, seed: int = 7, with_base: bool = True) -> list[ClientUpdate]:
    g = torch.Generator().manual_seed(seed)
    mu_base, mu_a, mu_b = torch.ones(12), torch.ones(5), -torch.ones(3)
    return [
        ClientUpdate(
            client=f"c{i:02d}",
            group="g0",
            n_samples=10 + 5 * i,
            delta_base=mu_base + 0.1 * torch.randn(12, generator=g) if with_base else None,
            delta_heads={
                "b": mu_b + 0.1 * torch.randn(3, generator=g),
                "a": mu_a + 0.1 * torch.randn(5, generator=g),
            },
            metrics={"loss": 1.0},
        )
        for i in range(n)
    ]


def test_aggregate_updates_with_mean_equals_group_aggregate():
    updates = make_updates()
    expected = group_aggregate(list(reversed(updates)))["g0"]
    got = aggregate_updates(list(reversed(updates)), RobustSpec("mean"))
    assert (
        got.clients == expected.clients
        and got.n_samples == expected.n_samples
        and got.n_clients == 10
    )
    torch.testing.assert_close(got.delta_base, expected.delta_base)
    assert got.delta_heads.keys() == expected.delta_heads.keys()
    for t in expected.delta_heads:
        torch.testing.assert_close(got.delta_heads[t], expected.delta_heads[t])


@pytest.mark.parametrize("rule", ["krum", "multi_krum"])
def test_krum_keeps_or_drops_whole_clients(rule):
    updates = make_updates()
    # c03 and c08 send an honest-looking base but poisoned heads: per-part Krum would keep their
    # base; on the whole update they are excluded from base and heads alike
    for u in updates:
        if u.client in ("c03", "c08"):
            u.delta_heads = {t: -10 * v for t, v in u.delta_heads.items()}
    agg = aggregate_updates(updates, RobustSpec(rule, n_byzantine=2))
    kept = [u for u in updates if u.client in agg.clients]
    assert not {"c03", "c08"} & set(agg.clients)
    assert len(kept) == (1 if rule == "krum" else 8) == agg.n_clients
    assert agg.n_samples == sum(u.n_samples for u in kept)
    weights = [u.n_samples for u in kept]
    torch.testing.assert_close(agg.delta_base, weighted_mean([u.delta_base for u in kept], weights))
    for t in ("a", "b"):
        torch.testing.assert_close(
            agg.delta_heads[t], weighted_mean([u.delta_heads[t] for u in kept], weights)
        )
    assert agg.delta_heads["a"].shape == (5,) and agg.delta_heads["b"].shape == (3,)


def test_aggregate_updates_without_base_and_with_errors():
    updates = make_updates(with_base=False)
    agg = aggregate_updates(updates, RobustSpec("median"))
    assert agg.delta_base is None and agg.clients == sorted(u.client for u in updates)
    torch.testing.assert_close(
        agg.delta_heads["a"], coordinate_median([u.delta_heads["a"] for u in updates])
    )
    updates[4].delta_heads["a"] = updates[4].delta_heads["a"].clone()
    updates[4].delta_heads["a"][0] = float("nan")
    with pytest.raises(ValueError, match="client 'c04' released a non-finite update"):
        aggregate_updates(updates, RobustSpec("median"))
    mixed = make_updates()
    mixed[2].group = "g1"
    with pytest.raises(ValueError, match="client 'c02' is in group 'g1'"):
        aggregate_updates(mixed, RobustSpec("median"))
    with pytest.raises(ValueError, match=r"group 'g0': Krum needs more than 2f \+ 2 = 6"):
        aggregate_updates(make_updates(n=6), RobustSpec("krum", n_byzantine=2))


@pytest.mark.parametrize("rule", ["trimmed_mean", "multi_krum"])
def test_robust_base_step_outvotes_attackers_concentrated_in_one_group(rule):
    """4 groups of 5 clients; the 4 attackers (20 %) sit 2 and 2 in groups g0 and g1 (40 % of
    each). Within those groups a 20 % trimmed mean or multi-Krum with f = 1 is carried by them,
    and over the 4 group aggregates half are poisoned. Over all 20 clients' base updates the rule
    still sees 20 % and the base step stays near the honest mean; without the client updates it
    does not."""
    g = torch.Generator().manual_seed(5)
    mu = torch.ones(D)
    updates = []
    for i in range(20):
        client, group = f"c{i:02d}", f"g{i // 5}"
        delta = mu + 0.1 * torch.randn(D, generator=g)
        if client in ("c00", "c01", "c05", "c06"):
            delta = -10 * delta
        updates.append(
            ClientUpdate(
                client=client,
                group=group,
                n_samples=10,
                delta_base=delta,
                delta_heads={"y": torch.zeros(3)},
                metrics={},
            )
        )
    spec = RobustSpec(rule)
    groups = group_aggregate(updates, spec)
    state = ServerState(
        0, torch.zeros(D), {f"g{k}": {"y": torch.zeros(3)} for k in range(4)}, {"y": torch.zeros(3)}
    )
    honest = torch.stack(
        [u.delta_base for u in updates if u.client not in ("c00", "c01", "c05", "c06")]
    ).mean(0)
    flat = global_merge(state, groups, robust=spec, client_updates=updates).base
    hierarchical = global_merge(state, groups, robust=spec).base
    assert float((flat - honest).norm()) < 0.1 * float(honest.norm())
    assert float((hierarchical - honest).norm()) > float(honest.norm())  # what the group path gives
    # the mean rule ignores the client updates: the hierarchical FedAvg step, unchanged
    plain = global_merge(state, group_aggregate(updates), client_updates=updates).base
    torch.testing.assert_close(plain, torch.stack([u.delta_base for u in updates]).mean(0))


# --- byzantine ----------------------------------------------------------------------------------


def test_attackers_are_a_fixed_seeded_choice_of_the_right_size():
    clients = [f"c{i}" for i in range(10)]
    chosen = attackers(clients, 0.2, seed=3)
    assert len(chosen) == 2 and chosen <= set(clients)
    assert attackers(list(reversed(clients)), 0.2, seed=3) == chosen  # order-independent
    assert len({attackers(clients, 0.2, seed=s) for s in range(20)}) > 5  # the seed matters
    assert [len(attackers([str(i) for i in range(n)], 0.3, 0)) for n in (1, 5, 10)] == [
        0,
        2,
        3,
    ]  # 0.3, 1.5, 3
    assert attackers(clients, 0.0, 0) == frozenset() and attackers(clients, 1.0, 0) == frozenset(
        clients
    )
    with pytest.raises(ValueError, match="fraction"):
        attackers(clients, 1.5, 0)


def test_corrupt_update_sign_flip_exact_and_input_untouched():
    update = make_updates(n=1)[0]
    before = (
        update.delta_base.clone(),
        {t: v.clone() for t, v in update.delta_heads.items()},
        dict(update.metrics),
    )
    flipped = corrupt_update(update, "sign_flip", scale=10.0)
    assert torch.equal(flipped.delta_base, -10.0 * update.delta_base)
    for t in ("a", "b"):
        assert torch.equal(flipped.delta_heads[t], -10.0 * update.delta_heads[t])
    noisy = corrupt_update(update, "gaussian", generator=torch.Generator().manual_seed(0))
    for out in (flipped, noisy):
        assert out is not update and (out.client, out.group, out.n_samples) == (
            update.client,
            update.group,
            update.n_samples,
        )
        out.metrics["x"] = 1.0
    assert torch.equal(update.delta_base, before[0]) and update.metrics == before[2]
    for t, v in before[1].items():
        assert torch.equal(update.delta_heads[t], v)
    with pytest.raises(ValueError, match="flip_labels"):
        corrupt_update(update, "label_flip")
    with pytest.raises(
        ValueError, match=r"allowed values: \('sign_flip', 'gaussian', 'label_flip'\)"
    ):
        corrupt_update(update, "backdoor")
    assert ATTACKS == ("sign_flip", "gaussian", "label_flip")


def test_gaussian_attack_scale_and_reproducibility():
    big = ClientUpdate(
        "c", "g", 5, 0.01 * torch.randn(20_000, generator=torch.Generator().manual_seed(1)), {}
    )
    rms = float(big.delta_base.square().mean().sqrt())
    noisy = corrupt_update(big, "gaussian", scale=10.0, generator=torch.Generator().manual_seed(2))
    assert abs(float(noisy.delta_base.std()) / (10 * rms) - 1) < 0.03
    assert abs(float(noisy.delta_base.mean())) < 0.05 * 10 * rms
    again = corrupt_update(big, "gaussian", scale=10.0, generator=torch.Generator().manual_seed(2))
    assert torch.equal(noisy.delta_base, again.delta_base)
    fixed = corrupt_update(
        big, "gaussian", noise_std=200.0, generator=torch.Generator().manual_seed(2)
    )
    assert abs(float(fixed.delta_base.std()) / 200.0 - 1) < 0.03


@pytest.mark.parametrize("rule", ROBUST)
def test_end_to_end_twenty_percent_sign_flipped_clients(rule):
    updates = make_updates(n=10, seed=8)
    bad = attackers([u.client for u in updates], 0.2, seed=0)
    sent = [corrupt_update(u, "sign_flip") if u.client in bad else u for u in updates]
    honest = group_aggregate([u for u in updates if u.client not in bad])["g0"]
    plain = aggregate_updates(sent, RobustSpec("mean"))
    robust = aggregate_updates(sent, RobustSpec(rule))

    def dist(a, b):
        return float(
            torch.cat(
                [a.delta_base - b.delta_base] + [a.delta_heads[t] - b.delta_heads[t] for t in "ab"]
            ).norm()
        )

    assert (
        dist(plain, honest) > 10.0
    )  # the honest mean has norm √20 ≈ 4.5, its clients a spread ≈ 0.45
    if rule == "norm_bound":  # capped, not removed: the attackers hold 95 of the 325 samples here
        assert dist(robust, honest) < dist(plain, honest) / 4
    else:
        assert dist(robust, honest) < 1.0


def test_flip_labels_is_the_standard_involution():
    y = torch.tensor([0, 1, 2, 9, 5])
    torch.testing.assert_close(flip_labels(y, 10), torch.tensor([9, 8, 7, 0, 4]))
    for n_classes, label in itertools.product((2, 3, 10), range(10)):
        if label < n_classes:
            z = torch.tensor([label])
            assert torch.equal(flip_labels(flip_labels(z, n_classes), n_classes), z)
    assert flip_labels(y, 10).dtype == y.dtype and torch.equal(y, torch.tensor([0, 1, 2, 9, 5]))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 5\)"):
        flip_labels(y, 5)
    with pytest.raises(ValueError, match="integers"):
        flip_labels(y.float(), 10)
