"""Client-level DP-FedAvg: clipping, noise, adaptive clipping and the (ε, δ) accountant."""

from __future__ import annotations

import math

import pytest
import torch

from fedmtl.privacy import accounting as acc
from fedmtl.privacy import budget
from fedmtl.privacy.dp import (
    AdaptiveClip,
    clip_update,
    gaussian_noise,
    noised_sum,
    update_noise_multiplier,
)

DELTA = 1e-5


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- mechanism ---------------------------------------------------------------------------------


def test_clip_leaves_short_vectors_unchanged():
    v = torch.tensor([0.3, -0.4])  # norm 0.5
    clipped, norm = clip_update(v, 1.0)
    assert torch.equal(clipped, v)
    assert norm == pytest.approx(0.5)
    clipped[0] = 9.0
    assert v[0] == pytest.approx(0.3)  # a copy, not the caller's tensor


def test_clip_scales_long_vectors_to_exactly_c():
    v = torch.tensor([3.0, -4.0, 12.0])  # norm 13
    clipped, norm = clip_update(v, 2.0)
    assert norm == pytest.approx(13.0)
    assert float(torch.linalg.vector_norm(clipped)) == pytest.approx(2.0, rel=1e-6)
    assert torch.allclose(clipped, v * (2.0 / 13.0))  # same direction
    assert clipped.dtype == torch.float32


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_clip_must_be_positive(bad):
    with pytest.raises(ValueError, match="privacy.dp_fedavg.clip_norm"):
        clip_update(torch.ones(3), bad)


def test_noised_sum_has_std_zc_around_the_sum():
    clip, z, dim, draws = 0.5, 1.3, 4000, 25
    updates = [clip_update(torch.full((dim,), float(i)), clip)[0] for i in range(1, 4)]
    exact = torch.stack(updates).sum(0).double()
    g = gen(7)
    noise = torch.stack([noised_sum(updates, clip, z, g).double() - exact for _ in range(draws)])
    # 100k samples: the std's relative standard error is ~0.2 %, the mean's ~0.003·zC
    assert float(noise.std()) == pytest.approx(z * clip, rel=0.02)
    assert abs(float(noise.mean())) < 0.02 * z * clip
    assert noised_sum(updates, clip, z, gen(3)).dtype == torch.float32


def test_noised_sum_is_reproducible_and_zero_noise_is_the_plain_sum():
    updates = [torch.tensor([0.1, 0.2]), torch.tensor([-0.3, 0.0])]
    assert torch.equal(noised_sum(updates, 1.0, 1.0, gen(1)), noised_sum(updates, 1.0, 1.0, gen(1)))
    assert torch.allclose(noised_sum(updates, 1.0, 0.0, gen(1)), torch.tensor([-0.2, 0.2]))


def test_noised_sum_refuses_unclipped_updates_and_noises_an_empty_group():
    with pytest.raises(ValueError, match="privacy.dp_fedavg.clip_norm"):
        noised_sum([torch.tensor([3.0, 4.0])], 1.0, 1.0, gen())
    with pytest.raises(ValueError, match="like"):
        noised_sum([], 1.0, 1.0, gen())
    empty = noised_sum([], 1.0, 2.0, gen(), like=torch.zeros(10_000))
    assert empty.shape == (10_000,)
    assert float(empty.std()) == pytest.approx(2.0, rel=0.05)


def test_gaussian_noise_takes_a_shape_or_a_tensor():
    assert gaussian_noise((3, 2), 1.0, gen()).shape == (3, 2)
    like = torch.zeros(4, dtype=torch.float64)
    assert gaussian_noise(like, 1.0, gen()).dtype == torch.float64
    with pytest.raises(ValueError):
        gaussian_noise((2,), -1.0, gen())


def _track(start: float, quantile: float, rounds: int = 150, m: int = 100) -> list[float]:
    """Adaptive clipping on norms ~ Uniform(0, 10), m clients a round, σ_b = m/20."""
    state = AdaptiveClip(clip=start, expected_clients=m, target_quantile=quantile)
    g = gen(11)
    clips = []
    for _ in range(rounds):
        norms = (torch.rand(m, generator=g, dtype=torch.float64) * 10).tolist()
        state = state.update(norms, g)
        clips.append(state.clip)
    return clips


@pytest.mark.parametrize("start", [0.1, 50.0])
def test_adaptive_clip_tracks_the_median_norm(start):
    clips = _track(start, 0.5)
    tail = clips[-40:]
    assert sum(tail) / len(tail) == pytest.approx(5.0, abs=0.5)
    assert all(3.5 < c < 6.5 for c in tail)


def test_adaptive_clip_tracks_another_quantile():
    tail = _track(1.0, 0.9)[-40:]
    assert sum(tail) / len(tail) == pytest.approx(9.0, abs=0.6)


def test_adaptive_clip_step_is_geometric():
    state = AdaptiveClip(clip=2.0, expected_clients=4, count_noise=0.0, learning_rate=0.2)
    assert state.count_noise == 0.0
    # 3 of 4 norms ≤ C: b̄ = 0.75, C ← 2·exp(−0.2·(0.75 − 0.5))
    assert state.update([1.0, 2.0, 0.5, 3.0], gen()).clip == pytest.approx(2.0 * math.exp(-0.05))
    assert AdaptiveClip(clip=1.0, expected_clients=40).count_noise == pytest.approx(2.0)  # m/20
    with pytest.raises(ValueError, match="privacy.dp_fedavg.target_quantile"):
        AdaptiveClip(clip=1.0, expected_clients=10, target_quantile=1.5)
    with pytest.raises(ValueError, match="privacy.dp_fedavg.clip_norm"):
        AdaptiveClip(clip=0.0, expected_clients=10)


def test_update_noise_multiplier_matches_hand_computation():
    # z = 1, σ_b = 5: (1 − 1/100)^(−1/2) = 1.0050378…
    assert update_noise_multiplier(1.0, 5.0) == pytest.approx(1.0050378152592121, rel=1e-12)
    # z = 1.2, m = 100 → σ_b = 5: (1/1.44 − 1/100)^(−1/2)
    assert update_noise_multiplier(1.2, expected_clients=100) == pytest.approx(
        (1 / 1.44 - 0.01) ** -0.5
    )
    assert AdaptiveClip(clip=1.0, expected_clients=100).update_noise_multiplier(
        1.2
    ) == pytest.approx(1.2087344, rel=1e-6)
    # the pair (updates at z_Δ, count at 2σ_b) is one Gaussian at z
    z_delta = update_noise_multiplier(0.9, 2.0)
    assert (z_delta**-2 + 4.0**-2) ** -0.5 == pytest.approx(0.9)


def test_update_noise_multiplier_refuses_a_count_that_uses_the_whole_budget():
    with pytest.raises(ValueError, match="whole budget"):
        update_noise_multiplier(1.0, count_noise=0.5)  # 2σ_b = z
    with pytest.raises(ValueError, match="whole budget"):
        update_noise_multiplier(1.0, expected_clients=8)  # σ_b = 0.4


# --- accountant --------------------------------------------------------------------------------

FIXED = {"sampling": "fixed", "population": 1000, "sample_size": 100}


def poisson_eps(rounds: int, z: float, q: float = 0.1, **kw) -> float:
    return acc.epsilon_after(rounds, z, "poisson", q, delta=DELTA, **kw)


def test_epsilon_grows_with_rounds_and_falls_with_noise():
    by_rounds = [poisson_eps(n, 1.0) for n in (1, 10, 50, 100, 200)]
    assert all(a < b for a, b in zip(by_rounds, by_rounds[1:]))
    by_noise = [poisson_eps(50, z) for z in (0.8, 1.0, 1.5, 3.0)]
    assert all(a > b for a, b in zip(by_noise, by_noise[1:]))
    assert poisson_eps(0, 1.0) == 0.0


@pytest.mark.parametrize("q,z,steps", [(0.1, 1.0, 100), (0.1, 1.5, 50), (0.02, 0.9, 500)])
def test_poisson_epsilon_agrees_with_opacus(q, z, steps):
    opacus_accountants = pytest.importorskip("opacus.accountants")
    reference = opacus_accountants.RDPAccountant()
    reference.history = [(z, q, steps)]
    expected = reference.get_epsilon(DELTA)
    assert poisson_eps(steps, z, q) == pytest.approx(expected, rel=0.01)  # measured: within 0.06 %


def test_fixed_size_sampling_is_finite_and_costs_more_than_poisson():
    for z in (1.0, 1.5):
        fixed = acc.epsilon_after(50, z, delta=DELTA, **FIXED)
        assert math.isfinite(fixed)
        # replace-one (sensitivity 2C) under Wang et al.'s bound: above Poisson add/remove at the
        # same z, and also above Poisson at the same noise-to-sensitivity ratio z/2
        assert fixed > poisson_eps(50, z)
        assert fixed > poisson_eps(50, z / 2)


def test_fixed_size_counts_twice_the_sensitivity():
    # everyone every round: no amplification, so replace-one at z is the Gaussian at z/2
    full = acc.epsilon_after(20, 2.0, "fixed", population=10, sample_size=10, delta=DELTA)
    assert full == pytest.approx(acc.epsilon_after(20, 1.0, "poisson", 1.0, delta=DELTA), rel=1e-9)


def test_two_releases_per_round_cost_like_one_at_z_over_sqrt2():
    two = poisson_eps(50, 1.4, releases_per_round=2)
    assert two == pytest.approx(poisson_eps(50, 1.4 / math.sqrt(2)), rel=1e-9)
    assert two > poisson_eps(50, 1.4)


def test_privacy_accountant_steps():
    a = acc.PrivacyAccountant(1.1, "poisson", sample_rate=0.1, delta=DELTA)
    assert a.rounds == 0 and a.epsilon() == 0.0
    a.step()
    a.step(29)
    assert a.rounds == 30
    assert a.epsilon() == pytest.approx(poisson_eps(30, 1.1))
    with pytest.raises(ValueError, match="n_rounds"):
        a.step(-1)
    f = acc.PrivacyAccountant(1.5, delta=DELTA, **FIXED)
    f.step(50)
    assert f.epsilon() == pytest.approx(acc.epsilon_after(50, 1.5, delta=DELTA, **FIXED))
    assert f.sample_rate == pytest.approx(0.1)


def test_max_rounds_is_the_last_round_within_the_target():
    n = budget.max_rounds(4.0, 1.1, "poisson", 0.1, delta=DELTA)
    assert 1 < n < 1000
    assert poisson_eps(n, 1.1) <= 4.0 < poisson_eps(n + 1, 1.1)
    assert budget.max_rounds(0.01, 1.1, "poisson", 0.1, delta=DELTA) == 0
    assert budget.max_rounds(4.0, 1.1, "poisson", 0.1, delta=DELTA, limit=5) == 5


def test_noise_for_is_the_least_noise_within_the_target():
    z = budget.noise_for(4.0, 50, "poisson", 0.1, delta=DELTA)
    assert poisson_eps(50, z) <= 4.0 < poisson_eps(50, z - 1e-3)
    zf = budget.noise_for(8.0, 20, delta=DELTA, tolerance=0.05, **FIXED)  # fixed-size RDP is slower
    assert acc.epsilon_after(20, zf, delta=DELTA, **FIXED) <= 8.0
    assert acc.epsilon_after(20, zf - 0.05, delta=DELTA, **FIXED) > 8.0


def test_check_plan_names_the_rounds_and_the_noise_that_fit():
    allowed = budget.max_rounds(4.0, 1.1, "poisson", 0.1, delta=DELTA)
    needed = budget.noise_for(4.0, 50, "poisson", 0.1, delta=DELTA)
    with pytest.raises(budget.BudgetExceeded) as info:
        budget.check_plan(4.0, 50, 1.1, "poisson", 0.1, delta=DELTA)
    err = info.value
    assert err.allowed_rounds == allowed
    assert needed <= err.required_noise_multiplier < needed + 0.011
    assert err.epsilon == pytest.approx(poisson_eps(50, 1.1))
    text = str(err)
    assert f"allows {allowed} rounds" in text
    assert f"≥ {err.required_noise_multiplier:.2f} fits 50 rounds" in text
    assert (
        "privacy.dp_fedavg.target_epsilon=4" in text
        and "training.rounds" in text
        and "sample_rate=0.1" in text
    )
    # the suggested (rounded-up) noise does fit
    assert (
        budget.check_plan(4.0, 50, err.required_noise_multiplier, "poisson", 0.1, delta=DELTA)
        <= 4.0
    )


def test_check_plan_returns_epsilon_when_it_fits():
    assert budget.check_plan(10.0, 50, 1.1, "poisson", 0.1, delta=DELTA) == pytest.approx(
        poisson_eps(50, 1.1)
    )


@pytest.mark.parametrize(
    "kwargs,setting",
    [
        ({"delta": 0.0}, "privacy.dp_fedavg.delta"),
        ({"delta": 1.0}, "privacy.dp_fedavg.delta"),
        ({"noise_multiplier": 0.0}, "privacy.dp_fedavg.noise_multiplier"),
        ({"noise_multiplier": float("nan")}, "privacy.dp_fedavg.noise_multiplier"),
        ({"sample_rate": 0.0}, "sample rate"),
        ({"sample_rate": 1.5}, "sample rate"),
        ({"sample_rate": None}, "sample_rate"),
        ({"sampling": "uniform"}, "privacy.sampling"),
        ({"releases_per_round": 0}, "releases_per_round"),
    ],
)
def test_bad_settings_name_the_setting(kwargs, setting):
    args = {
        "noise_multiplier": 1.0,
        "sampling": "poisson",
        "sample_rate": 0.1,
        "delta": DELTA,
    } | kwargs
    with pytest.raises(ValueError, match=setting):
        acc.PrivacyAccountant(**args)


def test_bad_budget_and_sampling_settings():
    with pytest.raises(ValueError, match="privacy.dp_fedavg.target_epsilon"):
        budget.max_rounds(0.0, 1.0, "poisson", 0.1, delta=DELTA)
    with pytest.raises(ValueError, match="privacy.dp_fedavg.target_epsilon"):
        budget.check_plan(-1.0, 10, 1.0, "poisson", 0.1, delta=DELTA)
    with pytest.raises(ValueError, match="training.rounds"):
        acc.epsilon_after(-3, 1.0, "poisson", 0.1, delta=DELTA)
    with pytest.raises(ValueError, match="population"):
        acc.epsilon_after(10, 1.0, "fixed", sample_size=10, delta=DELTA)
    with pytest.raises(ValueError, match="exceeds the population"):
        acc.epsilon_after(10, 1.0, "fixed", population=10, sample_size=11, delta=DELTA)
    with pytest.raises(ValueError, match="disagrees"):
        acc.epsilon_after(10, 1.0, "fixed", 0.5, population=100, sample_size=10, delta=DELTA)
