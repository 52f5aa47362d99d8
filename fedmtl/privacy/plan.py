"""A run's privacy plan, before and around its rounds: which settings cannot give the promised
guarantee (:func:`check_privacy`), the run's client-level accountant (:func:`run_accountant`),
the stop before a round that would spend more than ``privacy.dp_fedavg.target_epsilon``
(:class:`ClientLevelBudget`, a callback of :func:`fedmtl.rounds.run`) and the tags that
record what the run promised (:func:`privacy_tags`). No Prefect, no MLflow: the flow and the
simulator use them alike."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from fedmtl.config import Config
from fedmtl.privacy.accountant import within_budget
from fedmtl.privacy.dp import default_count_noise, update_noise_multiplier
from fedmtl.server.dispatch import sample_rate
from fedmtl.state import ServerState

if TYPE_CHECKING:  # dp_accounting (and scipy under it) costs ~0.6 s to import: only under DP
    from fedmtl.privacy.accounting import PrivacyAccountant

log = logging.getLogger("fedmtl.privacy")


class PrivacyPlanError(ValueError):
    """Privacy settings that cannot give the promised guarantee (the message says why)."""


def check_privacy(cfg: Config, grouping_method: str | None) -> None:
    """Refuse settings under which the guarantee would not hold. ``grouping_method``: the
    grouping rule in force (:attr:`fedmtl.federation.Federation.grouping_method`)."""
    p = cfg.privacy
    if p.dp and grouping_method in ("ifca", "cluster"):
        raise PrivacyPlanError(
            f"privacy.dp_fedavg with grouping '{grouping_method}' "
            f"(algorithm.method={cfg.algorithm.method}, "
            f"grouping.method={cfg.grouping.method}): each client would pick the group whose sum "
            "it joins from its own data, a choice released outside ε; use grouping.method=column"
        )
    if p.enabled and cfg.server.aggregator != "mean":
        raise PrivacyPlanError(
            f"server.aggregator={cfg.server.aggregator} with privacy ({p.mechanism}): a robust "
            "rule needs each client's own update, which secure aggregation hides and DP's "
            "guarantee does not cover; use server.aggregator=mean (DP's clipping already bounds "
            "any one client's influence)"
        )
    if p.secure and grouping_method == "cluster":
        raise PrivacyPlanError(
            "privacy.secure_sum with grouping.method=cluster: the server would cluster the "
            "clients' own head updates, which secure aggregation exists to hide; use "
            "grouping.method=column or ifca"
        )


def run_accountant(cfg: Config, n_clients: int) -> PrivacyAccountant | None:
    """The run's client-level accountant (None without DP-FedAvg), with the final evaluation's
    release planned. With ``privacy.dp_fedavg.target_epsilon``, a plan whose rounds would spend
    more refuses to start (:class:`PrivacyPlanError`), with the numbers and the ways out."""
    p = cfg.privacy
    if not p.dp:
        return None
    from fedmtl.privacy.accounting import PrivacyAccountant
    from fedmtl.privacy.budget import BudgetExceeded, check_plan

    dp = p.dp_fedavg
    rate = sample_rate(cfg.training.clients_per_round, n_clients)
    if dp.adaptive_clip:
        try:
            update_noise_multiplier(dp.noise_multiplier, default_count_noise(rate * n_clients))
        except ValueError as exc:
            raise PrivacyPlanError(
                f"privacy.dp_fedavg.adaptive_clip with {rate * n_clients:g} expected clients "
                f"per round: {exc}"
            ) from None
    evaluation = (
        p.evaluation.noise_multiplier,
    )  # the final model's pooled evaluation, released once
    if dp.target_epsilon is not None:
        try:
            check_plan(
                dp.target_epsilon,
                cfg.training.rounds,
                dp.noise_multiplier,
                "poisson",
                sample_rate=rate,
                delta=dp.delta,
                extra_releases=evaluation,
            )
        except BudgetExceeded as exc:
            raise PrivacyPlanError(str(exc)) from None
    return PrivacyAccountant(
        dp.noise_multiplier, "poisson", sample_rate=rate, delta=dp.delta, planned=evaluation
    )


class ClientLevelBudget:
    """A callback of the round loop: accounts every round, and stops training before a round
    (and the final evaluation after it) would spend more than ``target_epsilon``."""

    def __init__(
        self,
        accountant: PrivacyAccountant,
        target_epsilon: float | None,
        logger: logging.Logger | logging.LoggerAdapter | None = None,
    ) -> None:
        self.accountant, self.target, self.log = accountant, target_epsilon, logger or log

    def before_round(self, state: ServerState) -> bool:
        if within_budget(self.accountant, self.target):
            return True
        self.log.warning(
            "privacy budget: stopping after round %d: one more round would spend ε=%.3g > "
            "privacy.dp_fedavg.target_epsilon=%g at δ=%g",
            state.round,
            self.accountant.epsilon_after_next(),
            self.target,
            self.accountant.delta,
        )
        return False

    def after_round(self, state: ServerState, report) -> None:
        self.accountant.step()


def privacy_tags(cfg: Config) -> dict[str, str]:
    """The run's tags for its privacy settings (the mechanisms and their public parameters)."""
    p = cfg.privacy
    tags = {"privacy": p.mechanism}
    if p.dp:
        tags.update(
            {
                "privacy_delta": f"{p.dp_fedavg.delta:g}",
                "privacy_noise_multiplier": f"{p.dp_fedavg.noise_multiplier:g}",
            }
        )
    if p.sample_level:
        tags.update(
            {
                "privacy_dp_sgd_noise_multiplier": f"{p.dp_sgd.noise_multiplier:g}",
                "privacy_dp_sgd_max_grad_norm": f"{p.dp_sgd.max_grad_norm:g}",
            }
        )
    if p.insecure_seeded_noise:  # noise replayable from training.seed: no ε holds
        tags["privacy_epsilon_void"] = "true"
    return tags
