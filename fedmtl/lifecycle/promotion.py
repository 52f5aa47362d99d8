"""Champion/challenger promotion gates: should the newly trained model replace the one in use?

Both models answer every client's held-out rows (``models/scoring.py``); the gates compare
the per-client scores of ``promotion.metric`` on ``promotion.task``:

- ``metric``: the challenger's client mean ≥ the champion's + ``min_gain``;
- ``client_regression``: no client scores worse than under the champion by more than
  ``max_client_regression``;
- ``worst_clients``: the mean of the worst ``worst_fraction`` of clients does not drop;

and absolute gates, which a first model (no champion yet) must pass alone:

- ``min_metric``: the client mean reaches ``min_metric``;
- ``validation``: the challenger's training data passed validation (at most
  ``max_quarantined_fraction`` of its clients quarantined);
- ``privacy``: when the run trained with differential privacy, every ε it spent ≤ ``max_epsilon``:
  the client-level ε of DP-FedAvg, and the largest client's sample-level ε of DP-SGD. Secure
  aggregation alone spends no ε and has no such gate.

For lower-is-better metrics (mae, rmse) "worse" and "gain" are oriented accordingly. Everything
here is pure: the registry side (aliases, tags, the decision record) is in ``tasks/promotion.py``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd

from fedmtl.config import PromotionConfig
from fedmtl.eval.metrics import HIGHER_IS_BETTER, worst_fraction_mean


@dataclass(frozen=True)
class RunFacts:
    """What the challenger's training run recorded about its data and privacy."""

    clients: int  # clients that passed validation and trained
    quarantined: int  # clients whose partitions failed validation
    privacy: str = "none"  # "none" or the mechanisms joined by "+", e.g. "dp-fedavg+secagg"
    epsilon: float | None = None  # DP-FedAvg: the client-level ε spent
    dp_sgd_epsilon: float | None = None  # DP-SGD: the largest client's sample-level ε

    def spent(self) -> dict[str, float | None]:
        """The ε of each differentially private mechanism the run used, by name."""
        mechanisms = set(self.privacy.split("+"))
        out: dict[str, float | None] = {}
        if "dp-fedavg" in mechanisms:
            out["client-level"] = self.epsilon
        if "dp-sgd" in mechanisms:
            out["sample-level (largest client)"] = self.dp_sgd_epsilon
        return out


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str
    value: float | None = None
    threshold: float | None = None


@dataclass
class Decision:
    promote: bool
    checks: list[Check]
    metric: str
    task: str
    challenger_mean: float
    champion_mean: float | None
    challenger_worst: float
    champion_worst: float | None
    per_client: pd.DataFrame = field(repr=False)  # client, challenger, champion, delta

    @property
    def reasons(self) -> list[str]:
        """Why it was rejected (the failed checks), or why it passed."""
        failed = [c.detail for c in self.checks if not c.passed]
        return failed or [c.detail for c in self.checks]

    def summary(self) -> dict[str, Any]:
        """The decision as plain values (for the registry's tags and the decision record)."""
        return {
            "promote": self.promote,
            "metric": self.metric,
            "task": self.task,
            "challenger_mean": self.challenger_mean,
            "champion_mean": self.champion_mean,
            "challenger_worst": self.challenger_worst,
            "champion_worst": self.champion_worst,
            "checks": [asdict(c) for c in self.checks],
        }


def client_scores(scores: pd.DataFrame, metric: str, task: str | None) -> tuple[str, pd.Series]:
    """(task, the per-client ``metric`` of that task) from a ``score_clients`` table."""
    if scores.empty:
        raise ValueError("no client has held-out rows to score the model on")
    tasks = list(dict.fromkeys(scores["task"]))
    task = task or tasks[0]
    if task not in tasks:
        raise ValueError(
            f"promotion.task '{task}' is not a task of the model (tasks: {', '.join(tasks)})"
        )
    rows = scores[scores["task"] == task]
    if metric not in rows.columns or rows[metric].isna().all():
        kinds = [m for m in HIGHER_IS_BETTER if m in rows.columns and rows[m].notna().any()]
        raise ValueError(
            f"promotion.metric '{metric}' does not apply to task '{task}' "
            f"(its metrics: {', '.join(kinds)})"
        )
    return task, rows.set_index("client")[metric].astype(float)


def decide(
    challenger: pd.DataFrame,
    champion: pd.DataFrame | None,
    facts: RunFacts,
    policy: PromotionConfig,
) -> Decision:
    """Apply the gates to the per-client score tables (``models.scoring.score_clients``) of the
    challenger and of the champion (None when there is no champion yet)."""
    metric = policy.metric
    higher = HIGHER_IS_BETTER[metric]
    sign = 1.0 if higher else -1.0  # a gain is sign * (challenger - champion)
    task, new = client_scores(challenger, metric, policy.task)
    new_mean = float(new.mean())
    new_worst = worst_fraction_mean(new, higher, policy.worst_fraction)
    checks: list[Check] = []

    if policy.min_metric is not None:
        ok = new_mean >= policy.min_metric if higher else new_mean <= policy.min_metric
        checks.append(
            Check(
                "min_metric",
                ok,
                f"client mean {metric} {new_mean:.4f} "
                f"{'reaches' if ok else 'misses'} promotion.min_metric {policy.min_metric}",
                new_mean,
                policy.min_metric,
            )
        )
    total = facts.clients + facts.quarantined
    fraction = facts.quarantined / total if total else 1.0
    ok = total > 0 and fraction <= policy.max_quarantined_fraction
    checks.append(
        Check(
            "validation",
            ok,
            f"{facts.quarantined} of {total} clients quarantined by validation "
            f"({fraction:.0%}; promotion.max_quarantined_fraction "
            f"{policy.max_quarantined_fraction:.0%})",
            fraction,
            policy.max_quarantined_fraction,
        )
    )
    spent = facts.spent()
    if spent:
        ok = all(
            e is not None and math.isfinite(e) and e <= policy.max_epsilon for e in spent.values()
        )
        what = "; ".join(
            f"{name} {'no ε recorded' if e is None else f'ε = {e:.3g}'}"
            for name, e in spent.items()
        )
        worst = max((e for e in spent.values() if e is not None), default=None)
        checks.append(
            Check(
                "privacy",
                ok,
                f"privacy '{facts.privacy}': {what} (promotion.max_epsilon {policy.max_epsilon})",
                worst,
                policy.max_epsilon,
            )
        )

    old_mean = old_worst = None
    per_client = pd.DataFrame({"client": new.index, "challenger": new.to_numpy()})
    if champion is not None:
        _, old = client_scores(champion, metric, task)
        old_mean = float(old.mean())
        old_worst = worst_fraction_mean(old, higher, policy.worst_fraction)
        gain = sign * (new_mean - old_mean)
        ok = gain >= policy.min_gain
        checks.append(
            Check(
                "metric",
                ok,
                f"client mean {metric} {new_mean:.4f} vs champion {old_mean:.4f} "
                f"(gain {gain:+.4f}; promotion.min_gain {policy.min_gain})",
                gain,
                policy.min_gain,
            )
        )
        both = new.index.intersection(old.index)
        delta = sign * (new[both] - old[both])
        per_client = pd.DataFrame(
            {
                "client": both,
                "challenger": new[both].to_numpy(),
                "champion": old[both].to_numpy(),
                "delta": delta.to_numpy(),
            }
        )
        worse = delta[delta < -policy.max_client_regression].sort_values()
        if len(worse):
            named = ", ".join(f"'{c}' {d:+.3f}" for c, d in worse.head(5).items())
            more = f" and {len(worse) - 5} more" if len(worse) > 5 else ""
            detail = (
                f"{len(worse)} client(s) worse by more than promotion.max_client_regression "
                f"{policy.max_client_regression}: {named}{more}"
            )
        elif len(delta) and float(delta.min()) < 0:
            detail = (
                f"no client worse by more than {policy.max_client_regression} "
                f"(largest drop {float(delta.min()):+.3f}, client '{delta.idxmin()}')"
            )
        else:
            detail = "no client scores worse than under the champion"
        checks.append(
            Check(
                "client_regression",
                not len(worse),
                detail,
                float(delta.min()) if len(delta) else None,
                -policy.max_client_regression,
            )
        )
        drop = sign * (new_worst - old_worst)
        ok = drop >= -1e-12
        checks.append(
            Check(
                "worst_clients",
                ok,
                f"worst {policy.worst_fraction:.0%} of clients: {metric} "
                f"{new_worst:.4f} vs champion {old_worst:.4f}",
                new_worst,
                old_worst,
            )
        )
    promote = all(c.passed for c in checks)
    return Decision(
        promote, checks, metric, task, new_mean, old_mean, new_worst, old_worst, per_client
    )
