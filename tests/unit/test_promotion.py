"""The promotion gates on hand-made per-client score tables (no registry, no flow)."""

from __future__ import annotations

import pandas as pd
import pytest

from fedmtl.config import PromotionConfig
from fedmtl.lifecycle.promotion import RunFacts, decide

CLEAN = RunFacts(clients=10, quarantined=0)


def scores(values: dict[str, float], metric: str = "f1", task: str = "label") -> pd.DataFrame:
    return pd.DataFrame(
        {
            "client": list(values),
            "task": task,
            "n_test": 10,
            "head": "personal",
            metric: list(values.values()),
        }
    )


def policy(**kw) -> PromotionConfig:
    return PromotionConfig(**kw)


def check(decision, name):
    return next(c for c in decision.checks if c.name == name)


BASE = {f"c{i}": 0.80 + 0.01 * i for i in range(10)}


def test_first_model_passes_on_the_absolute_gates_alone():
    d = decide(scores(BASE), None, CLEAN, policy())
    assert d.promote and {c.name for c in d.checks} == {"min_metric", "validation"}
    d = decide(scores({k: 0.3 for k in BASE}), None, CLEAN, policy(min_metric=0.5))
    assert not d.promote and "misses promotion.min_metric 0.5" in d.reasons[0]


def test_a_better_challenger_is_promoted_and_an_equal_one_needs_min_gain_zero():
    better = {k: v + 0.02 for k, v in BASE.items()}
    d = decide(scores(better), scores(BASE), CLEAN, policy())
    assert d.promote and check(d, "metric").value == pytest.approx(0.02)
    assert decide(scores(BASE), scores(BASE), CLEAN, policy(min_gain=0.0)).promote
    d = decide(scores(BASE), scores(BASE), CLEAN, policy(min_gain=0.01))
    assert not d.promote and [c.name for c in d.checks if not c.passed] == ["metric"]


def test_one_client_regressing_blocks_promotion_and_is_named():
    new = {k: v + 0.03 for k, v in BASE.items()}
    new["c4"] = BASE["c4"] - 0.2  # the mean still improves, one client is much worse
    d = decide(scores(new), scores(BASE), CLEAN, policy(max_client_regression=0.05))
    assert check(d, "metric").passed and not check(d, "client_regression").passed
    assert not d.promote and "'c4' -0.200" in check(d, "client_regression").detail
    assert check(
        decide(scores(new), scores(BASE), CLEAN, policy(max_client_regression=0.25)),
        "client_regression",
    ).passed


def test_worst_clients_must_not_drop():
    new = dict(BASE)
    new["c0"] = BASE["c0"] - 0.01  # the worst client a little worse
    new["c9"] = BASE["c9"] + 0.5  # the mean up a lot
    d = decide(scores(new), scores(BASE), CLEAN, policy(max_client_regression=0.05))
    assert check(d, "metric").passed and check(d, "client_regression").passed
    assert not check(d, "worst_clients").passed and not d.promote


def test_validation_and_privacy_gates_read_the_run_facts():
    d = decide(
        scores(BASE),
        None,
        RunFacts(clients=6, quarantined=4),
        policy(max_quarantined_fraction=0.25),
    )
    assert not d.promote and "4 of 10 clients quarantined" in check(d, "validation").detail
    dp = RunFacts(clients=10, quarantined=0, privacy="dp-fedavg", epsilon=12.0)
    d = decide(scores(BASE), None, dp, policy(max_epsilon=8.0))
    assert not check(d, "privacy").passed and "ε = 12" in check(d, "privacy").detail
    assert decide(
        scores(BASE), None, RunFacts(10, 0, "dp-fedavg", 3.0), policy(max_epsilon=8.0)
    ).promote
    d = decide(scores(BASE), None, RunFacts(10, 0, "dp-fedavg", None), policy())
    assert not d.promote and "no ε recorded" in check(d, "privacy").detail


def test_privacy_gate_checks_each_dp_mechanism_and_not_secure_aggregation_alone():
    # secure aggregation spends no ε: nothing to gate
    d = decide(scores(BASE), None, RunFacts(10, 0, "secagg"), policy(max_epsilon=1.0))
    assert d.promote and all(c.name != "privacy" for c in d.checks)
    # DP-SGD alone: its largest client ε is what counts
    assert decide(
        scores(BASE), None, RunFacts(10, 0, "dp-sgd", dp_sgd_epsilon=3.0), policy(max_epsilon=8.0)
    ).promote
    d = decide(
        scores(BASE), None, RunFacts(10, 0, "dp-sgd", dp_sgd_epsilon=9.5), policy(max_epsilon=8.0)
    )
    assert not d.promote and "sample-level (largest client) ε = 9.5" in check(d, "privacy").detail
    # both: each must fit
    both = RunFacts(10, 0, "dp-fedavg+secagg+dp-sgd", epsilon=2.0, dp_sgd_epsilon=12.0)
    d = decide(scores(BASE), None, both, policy(max_epsilon=8.0))
    assert (
        not d.promote
        and check(d, "privacy").value == 12.0
        and "client-level ε = 2" in check(d, "privacy").detail
    )
    d = decide(
        scores(BASE),
        None,
        RunFacts(10, 0, "dp-fedavg+dp-sgd", epsilon=2.0),
        policy(max_epsilon=8.0),
    )
    assert (
        not d.promote
        and "sample-level (largest client) no ε recorded" in check(d, "privacy").detail
    )


def test_lower_is_better_metrics_are_oriented():
    old = {k: 1.0 for k in BASE}
    new = {k: 0.8 for k in BASE}  # a lower error is a gain
    d = decide(scores(new, "mae"), scores(old, "mae"), CLEAN, policy(metric="mae", min_metric=None))
    assert d.promote and check(d, "metric").value == pytest.approx(0.2)
    d = decide(scores(old, "mae"), scores(new, "mae"), CLEAN, policy(metric="mae", min_metric=None))
    assert not d.promote


def test_clients_only_one_model_knows_do_not_count_as_regressions():
    new = {**BASE, "newcomer": 0.1}
    d = decide(scores(new), scores(BASE), CLEAN, policy(min_gain=-1.0))
    assert set(d.per_client["client"]) == set(BASE)
    assert check(d, "client_regression").passed


def test_unknown_task_or_metric_is_named():
    with pytest.raises(ValueError, match="promotion.task 'other' is not a task"):
        decide(scores(BASE), None, CLEAN, policy(task="other"))
    with pytest.raises(ValueError, match="promotion.metric 'mae' does not apply to task 'label'"):
        decide(scores(BASE), None, CLEAN, policy(metric="mae"))
