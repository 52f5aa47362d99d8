"""What a target ε allows before a run starts, on the client-level accountant of
:mod:`fedmtl.privacy.accounting`: the rounds that fit (:func:`max_rounds`), the noise multiplier a
number of rounds needs (:func:`noise_for`), and the refusal that names both
(:func:`check_plan`, :class:`BudgetExceeded`)."""

from __future__ import annotations

import math

from fedmtl.privacy.accounting import (
    Sampling,
    SamplingPlan,
    _check_delta,
    _check_noise,
    _check_releases,
    _check_rounds,
    _check_target,
    _epsilon,
    sampling_plan,
)

#: noise multipliers searched by :func:`noise_for`
_MAX_NOISE = 1e4
#: rounds searched by :func:`max_rounds`
_MAX_ROUNDS = 10**7


def max_rounds(
    target_epsilon: float,
    noise_multiplier: float,
    sampling: Sampling = "poisson",
    sample_rate: float | None = None,
    population: int | None = None,
    sample_size: int | None = None,
    *,
    delta: float,
    releases_per_round: int = 1,
    limit: int = _MAX_ROUNDS,
) -> int:
    """The largest number of rounds with ε ≤ ``target_epsilon`` (0 if one round exceeds it;
    ``limit`` if that many still fit). ε grows with the rounds, so a doubling then a binary
    search."""
    plan = sampling_plan(sampling, sample_rate, population, sample_size)
    return _max_rounds(
        _check_target(target_epsilon),
        _check_noise(noise_multiplier),
        plan,
        _check_releases(releases_per_round),
        _check_delta(delta),
        _check_rounds(limit, "limit"),
    )


def _max_rounds(
    target: float,
    z: float,
    plan: SamplingPlan,
    releases: int,
    delta: float,
    limit: int,
    extra: tuple[float, ...] = (),
) -> int:
    def fits(n: int) -> bool:
        return _epsilon(z, plan, releases, n, delta, extra) <= target

    if limit == 0 or not fits(1):
        return 0
    lo, hi = 1, 2  # fits(lo); find hi with not fits(hi)
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    if hi > limit:
        if fits(limit):
            return limit
        hi = limit
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def noise_for(
    target_epsilon: float,
    rounds: int,
    sampling: Sampling = "poisson",
    sample_rate: float | None = None,
    population: int | None = None,
    sample_size: int | None = None,
    *,
    delta: float,
    releases_per_round: int = 1,
    tolerance: float = 1e-3,
) -> float:
    """The smallest noise multiplier z (to within ``tolerance``) with ε ≤ ``target_epsilon`` after
    ``rounds`` rounds: ε(z) ≤ target and ε(z − tolerance) > target. ε falls with z, so a
    bisection."""
    plan = sampling_plan(sampling, sample_rate, population, sample_size)
    if not (math.isfinite(tolerance) and tolerance > 0):
        raise ValueError(f"tolerance must be > 0, got {tolerance}")
    return _noise_for(
        _check_target(target_epsilon),
        _check_rounds(rounds),
        plan,
        _check_releases(releases_per_round),
        _check_delta(delta),
        float(tolerance),
    )


def _noise_for(
    target: float,
    rounds: int,
    plan: SamplingPlan,
    releases: int,
    delta: float,
    tolerance: float,
    extra: tuple[float, ...] = (),
) -> float:
    def fits(z: float) -> bool:
        return _epsilon(z, plan, releases, rounds, delta, extra) <= target

    lo, hi = 0.0, 1.0  # z=0 is no privacy, so not fits(lo); find hi with fits(hi)
    while not fits(hi):
        lo, hi = hi, hi * 2
        if hi > _MAX_NOISE:
            raise ValueError(
                f"no noise multiplier up to {_MAX_NOISE:g} reaches "
                f"privacy.dp_fedavg.target_epsilon={target:g} "
                f"at privacy.dp_fedavg.delta={delta:g} after {rounds} rounds"
            )
    while hi - lo > tolerance:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return hi


class BudgetExceeded(Exception):
    """A training plan whose ε would exceed the target; carries the numbers and the fixes."""

    def __init__(
        self,
        *,
        target_epsilon: float,
        delta: float,
        rounds: int,
        epsilon: float,
        allowed_rounds: int,
        noise_multiplier: float,
        required_noise_multiplier: float,
        sampling: str,
        sampling_text: str,
    ) -> None:
        self.target_epsilon = target_epsilon
        self.delta = delta
        self.rounds = rounds
        self.epsilon = epsilon
        self.allowed_rounds = allowed_rounds
        self.noise_multiplier = noise_multiplier
        self.required_noise_multiplier = required_noise_multiplier
        self.sampling = sampling
        super().__init__(
            f"privacy.dp_fedavg.target_epsilon={target_epsilon:g} at δ={delta:g} allows "
            f"{allowed_rounds} "
            f"round{'s' if allowed_rounds != 1 else ''} with noise_multiplier={noise_multiplier:g} "
            f"and {sampling_text} (ε after {rounds} rounds would be {epsilon:.3g}); lower "
            "training.rounds, raise privacy.dp_fedavg.noise_multiplier "
            f"(≥ {required_noise_multiplier:.2f} fits {rounds} rounds) "
            f"or sample fewer clients"
        )


def check_plan(
    target_epsilon: float,
    rounds: int,
    noise_multiplier: float,
    sampling: Sampling = "poisson",
    sample_rate: float | None = None,
    population: int | None = None,
    sample_size: int | None = None,
    *,
    delta: float,
    releases_per_round: int = 1,
    extra_releases: tuple[float, ...] = (),
) -> float:
    """ε after ``rounds`` rounds (and ``extra_releases``, as in :func:`epsilon_after`) if it is
    ≤ ``target_epsilon``; :class:`BudgetExceeded` otherwise, naming the rounds that fit and the
    noise multiplier that fits ``rounds`` rounds."""
    target = _check_target(target_epsilon)
    plan = sampling_plan(sampling, sample_rate, population, sample_size)
    z, n, releases, d = (
        _check_noise(noise_multiplier),
        _check_rounds(rounds),
        _check_releases(releases_per_round),
        _check_delta(delta),
    )
    extra = tuple(float(e) for e in extra_releases)
    eps = _epsilon(z, plan, releases, n, d, extra)
    if eps <= target:
        return eps
    allowed = _max_rounds(target, z, plan, releases, d, limit=n, extra=extra)
    if _epsilon(1e4, plan, releases, n, d, extra) > target:  # the extra releases alone exceed it
        raise BudgetExceeded(
            target_epsilon=target,
            delta=d,
            rounds=n,
            epsilon=eps,
            allowed_rounds=allowed,
            noise_multiplier=z,
            required_noise_multiplier=math.inf,
            sampling=plan.sampling,
            sampling_text=plan.describe() + " (the evaluation's release alone spends more: raise "
            "privacy.evaluation.noise_multiplier)",
        )
    needed = _noise_for(target, n, plan, releases, d, tolerance=1e-3, extra=extra)
    needed = math.ceil(needed * 100) / 100  # rounded up, so the number shown still fits
    raise BudgetExceeded(
        target_epsilon=target,
        delta=d,
        rounds=n,
        epsilon=eps,
        allowed_rounds=allowed,
        noise_multiplier=z,
        required_noise_multiplier=needed,
        sampling=plan.sampling,
        sampling_text=plan.describe(),
    )
