"""The federated round, written once: dispatch → local train → group aggregate → global merge →
evaluate.

:func:`run_round` is one round and :func:`run` the loop over rounds. *How* each step runs is an
argument, a :class:`Steps`: :class:`InProcess` makes plain calls (the simulator's
:func:`run_rounds`, the benchmarks, the tests); ``flows.steps.PrefectSteps`` runs the same steps
as Prefect tasks, with the client shards mapped over the task runner and failed clients retried
(the ``fedmtl-train`` flow). Everything beside the round itself (tracking, checkpoints, the
privacy budget, progress, interrupts) is a :class:`Callbacks` of the caller's, called before and
after each round, as pfl-research's ``after_central_iteration`` and Flower's strategy loop do.

What a round does, in order (each a method of :class:`Steps`):

1. **dispatch**: the round's participants (a fixed-size sample, or under DP a Poisson sample
   drawn from the run's secret key);
2. **local train**: every participant's update against its group's heads, then
   :meth:`~fedmtl.federation.Federation.screen` (weights from the manifest, outsized updates
   refused); fewer than ``min_clients`` updates fail the round (:class:`RoundFailed`), or stop
   training when the rest sat out with their DP-SGD budget spent (:class:`ClientBudgetsSpent`);
3. **group aggregate**: one release per group (private under ``privacy``);
4. **global merge**: the server optimiser's step across groups (and learned groups when due);
5. **evaluate** (every ``evaluate_every`` rounds and the last; never with 0): each client scores
   the global, group and personalised models on its held-out split.

The core of fedmtl: no Prefect, no MLflow.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import pandas as pd

from fedmtl.federation import Federation, participants, sat_out_clients
from fedmtl.privacy.aggregation import RoundPrivacy
from fedmtl.server.dispatch import shards
from fedmtl.state import ClientFailure, ClientUpdate, GroupAggregate, ServerState


class RoundFailed(RuntimeError):
    """Too few clients returned an update for the round to count."""


class ClientBudgetsSpent(RoundFailed):
    """Too few clients for a round, because the others' DP-SGD budgets are spent: training stops."""


@dataclass
class Round:
    """What one round did. ``failed``: client -> why, for every client whose update the round
    lost (failed or refused); ``not_evaluated``: the clients whose evaluation failed; the clients
    the group rule held back are in ``privacy.held_back``."""

    number: int  # the state's round after the merge (1 for the first)
    chosen: list[str]
    updates: list[ClientUpdate]
    failed: dict[str, ClientFailure]
    refused: dict[str, ClientFailure]
    retried: int
    sat_out: list[str]
    privacy: RoundPrivacy | None
    records: pd.DataFrame
    pooled: dict[str, float]
    evaluated: bool
    not_evaluated: dict[str, ClientFailure] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # step -> wall-clock seconds


class Steps:
    """How a round's steps run. This base class makes plain in-process calls; a subclass runs
    them elsewhere (``flows.steps.PrefectSteps``: Prefect tasks)."""

    def dispatch(
        self, fed: Federation, clients: list[str], per_round: float, round_: int
    ) -> list[str]:
        return participants(fed, clients, per_round, round_)

    def local_train(
        self, fed: Federation, state: ServerState, chosen: list[str]
    ) -> tuple[list[ClientUpdate], dict[str, ClientFailure], int]:
        """(updates in client order, failed client -> why, how many came back on a retry)."""
        failed: dict[str, ClientFailure] = {}
        size = fed.clients_per_task or max(len(chosen), 1)
        updates = [
            u for shard in shards(chosen, size) for u in fed.train_clients(shard, state, failed)
        ]
        return updates, failed, 0

    def group_aggregate(
        self,
        fed: Federation,
        updates: list[ClientUpdate],
        state: ServerState,
        clients: list[str],
        per_round: float,
    ) -> tuple[dict[str, GroupAggregate], RoundPrivacy | None]:
        return fed.aggregate(updates, state, clients, per_round)

    def global_merge(
        self,
        fed: Federation,
        state: ServerState,
        groups: dict[str, GroupAggregate],
        updates: list[ClientUpdate] | None,
        privacy: RoundPrivacy | None,
    ) -> ServerState:
        return fed.merge(state, groups, updates, privacy)

    def evaluate(
        self, fed: Federation, state: ServerState, clients: list[str]
    ) -> tuple[pd.DataFrame, dict[str, float], dict[str, ClientFailure]]:
        """(per-client records, pooled metrics, client -> why it was not evaluated): records
        when per-client metrics are allowed, else the pooled metrics of the private evaluation."""
        skipped: dict[str, ClientFailure] = {}
        if fed.privacy.per_client_metrics:
            return pd.DataFrame(fed.evaluate_clients(clients, state, skipped)), {}, skipped
        return pd.DataFrame(), fed.evaluate_pooled(clients, state, skipped), skipped


class InProcess(Steps):
    """The steps as plain calls in this process, one shard of ``fed.clients_per_task`` clients
    at a time. Strict, as a simulator should be: a client that fails raises (except one whose
    DP-SGD budget is spent: it sits the round out), and so does one that cannot be evaluated."""

    def local_train(
        self, fed: Federation, state: ServerState, chosen: list[str]
    ) -> tuple[list[ClientUpdate], dict[str, ClientFailure], int]:
        failed: dict[str, ClientFailure] | None = {} if fed.sample_level is not None else None
        size = fed.clients_per_task or max(len(chosen), 1)
        updates = [
            u for shard in shards(chosen, size) for u in fed.train_clients(shard, state, failed)
        ]
        failed = failed or {}
        sat_out = set(sat_out_clients(failed))
        errors = {c: e for c, e in failed.items() if c not in sat_out}
        if errors:
            raise RuntimeError(
                f"round {state.round + 1}: clients failed: "
                + "; ".join(f"{c}: {e}" for c, e in errors.items())
            )
        return updates, failed, 0

    def evaluate(
        self, fed: Federation, state: ServerState, clients: list[str]
    ) -> tuple[pd.DataFrame, dict[str, float], dict[str, ClientFailure]]:
        """Per-client records always, privacy on or off: the simulator's own measurement (the
        benchmarks' accuracies), which no run releases."""
        return pd.DataFrame(fed.evaluate_clients(clients, state)), {}, {}


def run_round(
    fed: Federation,
    state: ServerState,
    clients: list[str],
    steps: Steps,
    *,
    per_round: float = 1.0,
    min_clients: int = 1,
    evaluate: bool = True,
) -> tuple[ServerState, Round]:
    """One round from ``state``: the new state and what the round did (see the module)."""
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    chosen = steps.dispatch(fed, clients, per_round, state.round)
    seconds["dispatch"] = time.perf_counter() - start

    start = time.perf_counter()
    updates, failed, retried = steps.local_train(fed, state, chosen)
    updates, refused = fed.screen(
        updates
    )  # bounded influence: weights from the manifest, outsized norms refused
    failed = {**failed, **refused}
    seconds["local_train"] = time.perf_counter() - start
    sat_out = sat_out_clients(failed)
    if len(updates) < min_clients:
        if sat_out and len(sat_out) == len(failed):
            raise ClientBudgetsSpent(
                f"round {state.round + 1}: only {len(updates)} of {len(chosen)} clients "
                "can train within "
                f"privacy.dp_sgd.target_epsilon (training.min_clients = {min_clients}); "
                f"{len(sat_out)} sat out: " + "; ".join(str(failed[c]) for c in sat_out)
            )
        raise RoundFailed(
            f"round {state.round + 1}: only {len(updates)} of {len(chosen)} clients returned an "
            f"update (training.min_clients = {min_clients}); failed: "
            + "; ".join(f"{c}: {e}" for c, e in failed.items())
        )

    start = time.perf_counter()
    groups, privacy = steps.group_aggregate(fed, updates, state, clients, per_round)
    seconds["group_aggregate"] = time.perf_counter() - start

    start = time.perf_counter()
    state = steps.global_merge(
        fed, state, groups, updates if fed.needs_updates_to_merge(state) else None, privacy
    )
    seconds["global_merge"] = time.perf_counter() - start

    start = time.perf_counter()
    records, pooled, skipped = (
        steps.evaluate(fed, state, clients) if evaluate else (pd.DataFrame(), {}, {})
    )
    seconds["evaluate"] = time.perf_counter() - start
    return state, Round(
        state.round,
        chosen,
        updates,
        failed,
        refused,
        retried,
        sat_out,
        privacy,
        records,
        pooled,
        evaluate,
        skipped,
        seconds,
    )


class Callbacks:
    """Side concerns around the loop; every method may be left as is. ``before_round`` may raise
    (e.g. an interrupt) or return False to stop training before the round."""

    def before_round(self, state: ServerState) -> bool:
        return True

    def after_round(self, state: ServerState, report: Round) -> None:
        pass


@dataclass
class Outcome:
    """The loop's end: the final state, the rounds run, the last evaluated round's records, and
    why training stopped early (None: every round ran)."""

    state: ServerState
    rounds: int
    records: pd.DataFrame | None
    stopped: Exception | None = None


def run(
    fed: Federation,
    state: ServerState,
    clients: list[str],
    rounds: int,
    *,
    steps: Steps | None = None,
    per_round: float = 1.0,
    min_clients: int = 1,
    evaluate_every: int = 1,
    callbacks: Sequence[Callbacks] = (),
) -> Outcome:
    """``rounds`` rounds from ``state`` (see the module). Evaluates every ``evaluate_every``-th
    round of this call and the last (0: never). Training stops early, with the reason in
    :attr:`Outcome.stopped`, when every client still able to train has spent its DP-SGD budget
    (:class:`ClientBudgetsSpent`), or when a callback's ``before_round`` returns False."""
    steps = steps if steps is not None else InProcess()
    records = None
    for r in range(rounds):
        if not all(cb.before_round(state) for cb in callbacks):
            return Outcome(state, r, records)
        due = evaluate_every > 0 and ((r + 1) % evaluate_every == 0 or r + 1 == rounds)
        try:
            state, report = run_round(
                fed,
                state,
                clients,
                steps,
                per_round=per_round,
                min_clients=min_clients,
                evaluate=due,
            )
        except ClientBudgetsSpent as exc:
            return Outcome(state, r, records, exc)
        if report.evaluated:
            records = report.records
        for cb in callbacks:
            cb.after_round(state, report)
    return Outcome(state, rounds, records)


class _History(Callbacks):
    """The summaries :func:`run_rounds` returns: one per evaluated round."""

    def __init__(self, fed: Federation) -> None:
        from fedmtl.eval.metrics import summarize

        self.fed, self.summarize = fed, summarize
        self.summaries: list[dict[str, float]] = []
        self.refused = 0

    def after_round(self, state: ServerState, report: Round) -> None:
        self.refused += len(report.refused)
        if not report.evaluated:
            return
        extra = (
            {"privacy/dp_sgd_sat_out": float(len(report.sat_out))}
            if self.fed.sample_level is not None
            else {}
        )
        extra["clients/refused"] = float(len(report.refused))
        extra["clients/refused_total"] = float(self.refused)  # over all the rounds so far
        self.summaries.append(
            {
                **self.summarize(report.records),
                **report.pooled,
                **self.fed.dp_sgd_metrics(state),
                **extra,
            }
        )


def run_rounds(
    fed: Federation,
    clients: list[str],
    rounds: int,
    per_round: float = 1.0,
    state: ServerState | None = None,
    evaluate_every: int = 1,
) -> tuple[ServerState, pd.DataFrame, list[dict[str, float]]]:
    """The simulator: :func:`run` with the :class:`InProcess` steps; returns the final state,
    the last evaluation's per-client records and every evaluated round's summary. Under
    ``privacy.dp_sgd.enabled`` a client over its target sits the round out, and training stops
    when no client of a round can train."""
    history = _History(fed)
    outcome = run(
        fed,
        state or fed.initial_state(),
        clients,
        rounds,
        per_round=per_round,
        evaluate_every=evaluate_every,
        callbacks=[history],
    )
    records = outcome.records if outcome.records is not None else pd.DataFrame()
    return outcome.state, records, history.summaries
