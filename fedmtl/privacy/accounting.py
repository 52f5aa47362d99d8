"""The (ε, δ) accountant of client-level DP-FedAvg, on Google's ``dp_accounting`` RDP accountant.

What ε covers
-------------
Client-level DP: neighbouring federations differ in one client's whole data. Every released sum
is a sum of client updates clipped to L2 norm C plus N(0, (zC)² I) (:mod:`fedmtl.privacy.dp`), so ε
covers everything computed from the released group and global sums — the group heads, the shared
base and the server optimiser's state — over all rounds accounted. The personal heads stay on the
clients and are outside ε, as is anything else a client reveals (see :mod:`fedmtl.privacy.dp`).
The assumptions are those of :mod:`fedmtl.privacy.dp`: each client in exactly one fixed, public
group, the sums unweighted, and the clients sampled exactly as stated here:

- ``sampling="poisson"``: every client joins a round independently with probability q
  (``sample_rate``); neighbouring relation *add/remove one client*; each released sum has
  sensitivity C, and the accountant composes ``PoissonSampledDpEvent(q, Gaussian(z))``.
- ``sampling="fixed"``: a uniformly random set of exactly m = ``sample_size`` of the
  N = ``population`` clients, without replacement. ``dp_accounting``'s RDP accountant supports
  ``SampledWithoutReplacementDpEvent`` only under *replace one client* (N is public; Wang, Balle
  & Kasiviswanathan 2019, Thm 27), and under that relation a sum of updates clipped to C has
  sensitivity 2C (one update swapped for another). The Gaussian's noise multiplier relative to
  that sensitivity is z/2, which is what is composed. Replace-one ε is not comparable one-to-one
  with add/remove ε (replacing is removing and adding); at equal q and z it is larger.

What one round counts
---------------------
Per round, on the same sample of clients, ``releases_per_round`` Gaussian queries of sensitivity
C (2C under replace-one), each with noise multiplier z, composed inside the sampling event (the
tight treatment for several Gaussian queries on one sample: an effective multiplier
z/√releases_per_round; Mironov, Talwar & Zhang 2019, §3).

- The per-group sums are computed on disjoint sets of clients (each client in one group), so one
  client changes exactly one group's sum, by ≤ C; the vector of all group sums, each with its own
  noise N(0, (zC)² I), is therefore *one* Gaussian mechanism of sensitivity C (parallel
  composition). If the global sum is computed from the noised group sums it is post-processing:
  ``releases_per_round=1``.
- If the global sum is separately computed from the clipped updates and separately noised, each
  client takes part in two Gaussian queries per round: ``releases_per_round=2``.

Adaptive clipping (Andrew et al. 2021): pass the *overall* noise multiplier z. The update sums use
z_Δ = (z⁻² − (2σ_b)⁻²)^(−½) (:func:`fedmtl.privacy.dp.update_noise_multiplier`) and the clip-count
query has multiplier 2σ_b, so each (update sum, count) pair is exactly a Gaussian mechanism with
multiplier z and the accounting is unchanged. With ``releases_per_round=2`` and one count query
per round, counting two releases at z counts the count query twice: a valid upper bound.

The accountant is ``dp_accounting.rdp.RdpAccountant`` with its default orders; ε at δ uses its
RDP-to-(ε, δ) conversion (Canonne, Kamath & Steinke 2020, Prop. 12; Asoodeh et al. 2020). Orders
where its numerical series fails to converge are dropped by the library (a valid upper bound);
its warning about that is silenced here. A common rule of thumb is δ ≪ 1/N.

References:

- H. B. McMahan, D. Ramage, K. Talwar, L. Zhang. *Learning Differentially Private Recurrent
  Language Models.* ICLR 2018.
- G. Andrew, O. Thakkar, H. B. McMahan, S. Ramaswamy. *Differentially Private Learning with
  Adaptive Clipping.* NeurIPS 2021.
- I. Mironov, K. Talwar, L. Zhang. *Rényi Differential Privacy of the Sampled Gaussian
  Mechanism.* arXiv:1908.10530, 2019.
- Y.-X. Wang, B. Balle, S. Kasiviswanathan. *Subsampled Rényi Differential Privacy and Analytical
  Moments Accountant.* AISTATS 2019.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import dp_accounting
from dp_accounting.rdp import RdpAccountant

Sampling = Literal["poisson", "fixed"]
SAMPLINGS: tuple[str, ...] = ("poisson", "fixed")


@dataclass(frozen=True)
class SamplingPlan:
    """How the clients of a round are sampled, validated. ``rate`` is q (m/N when fixed)."""

    sampling: Sampling
    rate: float
    population: int | None = None
    sample_size: int | None = None

    def describe(self) -> str:
        if self.sampling == "fixed":
            return (
                f"{self.sample_size} of {self.population} clients per round "
                f"(sample_rate={self.rate:.4g})"
            )
        return f"sample_rate={self.rate:.4g}"


def sampling_plan(
    sampling: str,
    sample_rate: float | None = None,
    population: int | None = None,
    sample_size: int | None = None,
) -> SamplingPlan:
    """Validates the sampling settings. Poisson needs ``sample_rate`` q ∈ (0, 1] (or
    ``sample_size``/``population`` as the expected count); fixed needs ``population`` N and
    ``sample_size`` m with 1 ≤ m ≤ N (``sample_rate``, if given, must equal m/N)."""
    if sampling not in SAMPLINGS:
        raise ValueError(f"privacy.sampling '{sampling}' is not known; allowed values: {SAMPLINGS}")
    if population is not None and (
        isinstance(population, bool) or int(population) != population or population < 1
    ):
        raise ValueError(
            f"population (number of clients) must be an integer >= 1, got {population}"
        )
    if sample_size is not None and (
        isinstance(sample_size, bool) or int(sample_size) != sample_size or sample_size < 1
    ):
        raise ValueError(
            f"sample size (training.clients_per_round) must be an integer >= 1, got {sample_size}"
        )
    if population is not None and sample_size is not None and sample_size > population:
        raise ValueError(
            f"sample size (training.clients_per_round) {sample_size} exceeds the population of "
            f"{population} clients"
        )
    if sampling == "fixed":
        if population is None or sample_size is None:
            raise ValueError(
                "fixed-size sampling needs population and sample_size (training.clients_per_round)"
            )
        rate = sample_size / population
        if sample_rate is not None and not math.isclose(float(sample_rate), rate, rel_tol=1e-9):
            raise ValueError(
                f"sample rate {sample_rate} disagrees with sample_size/population = "
                f"{sample_size}/{population}"
            )
        return SamplingPlan("fixed", rate, int(population), int(sample_size))
    if population is not None and sample_size is not None:
        expected = sample_size / population
        if sample_rate is not None and not math.isclose(float(sample_rate), expected, rel_tol=1e-9):
            raise ValueError(
                f"sample rate {sample_rate} disagrees with sample_size/population = "
                f"{sample_size}/{population}"
            )
        sample_rate = expected
    if sample_rate is None:
        raise ValueError(
            "Poisson sampling needs sample_rate (training.clients_per_round as a fraction)"
        )
    rate = float(sample_rate)
    if not (math.isfinite(rate) and 0 < rate <= 1):
        raise ValueError(
            "sample rate (training.clients_per_round as a fraction) must be in (0, 1], "
            f"got {sample_rate}"
        )
    return SamplingPlan("poisson", rate, population, sample_size)


def _check_noise(noise_multiplier: float) -> float:
    z = float(noise_multiplier)
    if not (math.isfinite(z) and z > 0):
        raise ValueError(
            "privacy.dp_fedavg.noise_multiplier must be a finite number > 0, "
            f"got {noise_multiplier}"
        )
    return z


def _check_delta(delta: float) -> float:
    d = float(delta)
    if not (math.isfinite(d) and 0 < d < 1):
        raise ValueError(f"privacy.dp_fedavg.delta must be in (0, 1), got {delta}")
    return d


def _check_target(target_epsilon: float) -> float:
    eps = float(target_epsilon)
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(
            f"privacy.dp_fedavg.target_epsilon must be a finite number > 0, got {target_epsilon}"
        )
    return eps


def _check_rounds(rounds: int, name: str = "training.rounds") -> int:
    if isinstance(rounds, bool) or int(rounds) != rounds or rounds < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {rounds}")
    return int(rounds)


def _check_releases(releases_per_round: int) -> int:
    if (
        isinstance(releases_per_round, bool)
        or int(releases_per_round) != releases_per_round
        or releases_per_round < 1
    ):
        raise ValueError(f"releases_per_round must be an integer >= 1, got {releases_per_round}")
    return int(releases_per_round)


def round_event(
    noise_multiplier: float, plan: SamplingPlan, releases_per_round: int = 1
) -> dp_accounting.DpEvent:
    """The ``DpEvent`` of one round: the sampling event around ``releases_per_round`` Gaussians."""
    z = _check_noise(noise_multiplier)
    releases = _check_releases(releases_per_round)
    # replace-one doubles the sensitivity of a clipped sum: the multiplier relative to it is z/2
    sigma = float(
        z / 2.0 if plan.sampling == "fixed" else z
    )  # float: dp_accounting tests isinstance(float)
    gaussian: dp_accounting.DpEvent = dp_accounting.GaussianDpEvent(sigma)
    if releases > 1:
        gaussian = dp_accounting.SelfComposedDpEvent(gaussian, releases)
    if plan.sampling == "fixed":
        assert plan.population is not None and plan.sample_size is not None
        return dp_accounting.SampledWithoutReplacementDpEvent(
            plan.population, plan.sample_size, gaussian
        )
    return dp_accounting.PoissonSampledDpEvent(plan.rate, gaussian)


def neighboring_relation(plan: SamplingPlan) -> dp_accounting.NeighboringRelation:
    """Add/remove one client for Poisson sampling, replace one for fixed-size sampling."""
    if plan.sampling == "fixed":
        return dp_accounting.NeighboringRelation.REPLACE_ONE
    return dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE


class _DropNonConvergence(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("_compute_log_a_frac failed to converge")


@contextlib.contextmanager
def _quiet_accountant() -> Iterator[None]:
    logger = logging.getLogger("absl")
    drop = _DropNonConvergence()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def release_event(noise_multiplier: float, plan: SamplingPlan) -> dp_accounting.DpEvent:
    """One Gaussian release over *all* the clients (no sampling), e.g. the pooled evaluation:
    multiplier z relative to its add/remove sensitivity (z/2 under replace-one)."""
    z = _check_noise(noise_multiplier)
    return dp_accounting.GaussianDpEvent(float(z / 2.0 if plan.sampling == "fixed" else z))


@functools.lru_cache(maxsize=4096)
def _epsilon(
    z: float,
    plan: SamplingPlan,
    releases: int,
    rounds: int,
    delta: float,
    extra: tuple[float, ...] = (),
) -> float:
    if rounds == 0 and not extra:
        return 0.0
    accountant = RdpAccountant(neighboring_relation=neighboring_relation(plan))
    with _quiet_accountant():
        if rounds:
            accountant.compose(round_event(z, plan, releases), rounds)
        for z_extra in extra:
            accountant.compose(release_event(z_extra, plan))
        return float(accountant.get_epsilon(delta))


def epsilon_after(
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
    """ε at δ after ``rounds`` rounds (0 for no rounds) and ``extra_releases``: the noise
    multipliers of Gaussian releases over all the clients besides the rounds (the evaluation)."""
    plan = sampling_plan(sampling, sample_rate, population, sample_size)
    return _epsilon(
        _check_noise(noise_multiplier),
        plan,
        _check_releases(releases_per_round),
        _check_rounds(rounds),
        _check_delta(delta),
        tuple(float(e) for e in extra_releases),
    )


class PrivacyAccountant:
    """ε spent by a training run so far: ``step()`` once per round, ``epsilon()`` at δ (an
    :class:`fedmtl.privacy.accountant.Accountant`).

    ``noise_multiplier`` is the overall z (with adaptive clipping, not z_Δ; see the module
    docstring); ``releases_per_round`` states how many separately noised Gaussian queries each
    sampled client takes part in per round (1 when the global sum is computed from the noised
    group sums, 2 when it is noised separately). ``planned``: the noise multipliers of releases
    to come after the last round (the final pooled evaluation), which
    :meth:`epsilon_after_next` counts as already spent.
    """

    def __init__(
        self,
        noise_multiplier: float,
        sampling: Sampling = "poisson",
        sample_rate: float | None = None,
        population: int | None = None,
        sample_size: int | None = None,
        *,
        delta: float,
        releases_per_round: int = 1,
        planned: tuple[float, ...] = (),
    ) -> None:
        self.noise_multiplier = _check_noise(noise_multiplier)
        self.planned = tuple(_check_noise(z) for z in planned)
        self.plan = sampling_plan(sampling, sample_rate, population, sample_size)
        self.delta = _check_delta(delta)
        self.releases_per_round = _check_releases(releases_per_round)
        self._rounds = 0
        self._extra: tuple[float, ...] = ()

    @property
    def rounds(self) -> int:
        """The rounds accounted so far."""
        return self._rounds

    @property
    def sampling(self) -> str:
        return self.plan.sampling

    @property
    def sample_rate(self) -> float:
        return self.plan.rate

    def step(self, n_rounds: int = 1) -> None:
        """Accounts ``n_rounds`` more rounds (each: one sampled round of releases)."""
        self._rounds += _check_rounds(n_rounds, "n_rounds")

    def release(self, noise_multiplier: float) -> None:
        """Accounts one Gaussian release over all the clients (the pooled evaluation)."""
        self._extra += (_check_noise(noise_multiplier),)

    @property
    def extra_releases(self) -> tuple[float, ...]:
        return self._extra

    def epsilon(self) -> float:
        """ε at ``delta`` after the rounds and releases accounted so far (0 before the first)."""
        return _epsilon(
            self.noise_multiplier,
            self.plan,
            self.releases_per_round,
            self._rounds,
            self.delta,
            self._extra,
        )

    def epsilon_after_next(self) -> float:
        """ε after one more round and the planned releases (what training must not exceed)."""
        return _epsilon(
            self.noise_multiplier,
            self.plan,
            self.releases_per_round,
            self._rounds + 1,
            self.delta,
            self._extra + self.planned,
        )

    def __repr__(self) -> str:
        return (
            f"PrivacyAccountant(noise_multiplier={self.noise_multiplier:g}, "
            f"{self.plan.describe()}, "
            f"sampling={self.plan.sampling}, delta={self.delta:g}, "
            f"releases_per_round={self.releases_per_round}, "
            f"rounds={self._rounds})"
        )
