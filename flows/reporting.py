"""What the training flow does around each round of the loop (:class:`RoundReporting`, a
:class:`fedmtl.rounds.Callbacks`): the round's metrics, per-client records and failures to MLflow
(what privacy allows), the ε spent, the checkpoint, progress."""

from __future__ import annotations

import json
import time

import pandas as pd
from prefect import get_run_logger

from fedmtl import rounds as round_loop
from fedmtl.config import Config
from fedmtl.data.manifest import atomic_write_bytes
from fedmtl.eval.metrics import summarize
from fedmtl.faults import crash_if_due
from fedmtl.federation import Federation
from fedmtl.lifecycle.checkpoint import Checkpoint, capture_rng, table_record
from fedmtl.server.grouping import adjusted_rand
from fedmtl.state import ServerState
from flows import interrupt, progress


class RoundReporting(round_loop.Callbacks):
    """What the flow does around each round of the loop (:func:`fedmtl.rounds.run`): before it,
    stop at an interrupt (a safe point: the last checkpoint is being written whole) or when the
    next round would exceed ``privacy.dp_fedavg.target_epsilon``; after it, the round's metrics,
    per-client records and failures to MLflow (what privacy allows), the ε spent, the checkpoint,
    progress."""

    def __init__(
        self, fed, cfg, clients, tracker, tags, budget, checkpoints, history, extra
    ) -> None:
        self.fed, self.cfg, self.clients, self.tracker, self.tags = fed, cfg, clients, tracker, tags
        self.budget, self.checkpoints, self.history, self.extra = (
            budget,
            checkpoints,
            history,
            extra,
        )

    def before_round(self, state: ServerState) -> bool:
        interrupt.check(state.round)
        return True

    def after_round(self, state: ServerState, report: round_loop.Round) -> None:
        fed, cfg, tracker = self.fed, self.cfg, self.tracker
        crash_if_due(cfg.faults.crash_at_round, state.round)  # fault injection: a SIGKILL mid-round
        start = time.perf_counter()
        records, updates = report.records, report.updates
        failed = {
            client: str(failure) for client, failure in report.failed.items()
        }  # the round's report
        for client, why in report.not_evaluated.items():
            failed[client] = (
                f"{failed[client]} (and not evaluated)"
                if client in failed
                else f"not evaluated: {why}"
            )
        summary = {**summarize(records), **report.pooled, **grouping_metrics(fed, records)}
        # under DP who took part (and so how many) is secret: the sampling amplification counts
        # on it
        extra = (
            {}
            if cfg.privacy.dp_fedavg.enabled
            else {
                "clients/participating": len(updates),
                "clients/failed": len(failed),
                "clients/retried": report.retried,
                "clients/refused": len(report.refused),
            }
        )
        if cfg.privacy.per_client_metrics:  # a client's training loss is its own figure too
            extra["train/loss/mean"] = sum(u.metrics["train_loss"] for u in updates) / len(updates)
        if report.privacy is not None:
            extra.update(report.privacy.metrics(dp=cfg.privacy.dp_fedavg.enabled))
            for client, why in report.privacy.held_back.items():
                failed.setdefault(client, f"held back: {why}")
        if self.budget is not None:  # stepped by the loop's ClientLevelBudget, before this callback
            extra["privacy/epsilon"] = self.budget.epsilon()
        if (
            fed.sample_level is not None
        ):  # each client's sample-level ε: the largest and the mean so far
            extra.update(fed.dp_sgd_metrics(state))
            extra["privacy/dp_sgd_sat_out"] = float(len(report.sat_out))
        tracker.log_metrics(
            {**summary, **extra, **{f"time/{k}_s": v for k, v in report.seconds.items()}},
            state.round,
        )
        if client_runs(cfg, self.clients):
            tracker.log_clients(records, state.round, {"data_version": self.tags["data_version"]})
        tracking = time.perf_counter() - start
        tracker.log_metrics(
            {"time/tracking_s": tracking, "time/round_s": sum(report.seconds.values()) + tracking},
            state.round,
        )
        if (
            failed and cfg.privacy.dp_fedavg.enabled
        ):  # names sampled clients: kept with the coordinator, not released
            atomic_write_bytes(
                fed.store.root.parent / "rounds" / f"round-{state.round:04d}-failed.json",
                json.dumps(failed, indent=2).encode(),
            )  # mkstemp: mode 0600
        elif failed:
            tracker.log_text(
                json.dumps(failed, indent=2), f"rounds/round-{state.round:04d}-failed.json"
            )

        self.history.append(summary)
        log = {
            "summary": summary,
            "metrics": table_record(tracker.take_journal()),
        }  # replayed on a resume
        if fed.grouping_method is not None and cfg.privacy.per_client_metrics:
            log["assignment"] = table_record(assignment_table(records, state.round))
        if (
            cfg.tracking.client_runs
            and cfg.privacy.per_client_metrics
            and not client_runs(cfg, self.clients)
        ):
            log["clients"] = table_record(records.assign(round=state.round))
        self.checkpoints.save(
            Checkpoint(state, log, {**self.extra, "child_runs": tracker.child_runs}, capture_rng()),
            background=True,
        )
        get_run_logger().info("round %d: %s", state.round, _headline(summary))
        progress.current().round_done(state.round, _headline(summary))


def client_runs(cfg: Config, clients: list[str]) -> bool:
    """Whether per-client metrics go to child runs (else to the table clients/rounds.csv);
    never when ``privacy.evaluation.client_metrics`` is off (the default with privacy on)."""
    return (
        cfg.tracking.client_runs
        and cfg.privacy.per_client_metrics
        and len(clients) <= cfg.tracking.max_client_runs
    )


def grouping_metrics(fed: Federation, records: pd.DataFrame) -> dict[str, float]:
    """How many groups are in use and, where the data has true groups, the adjusted Rand
    index of the learned assignment against them."""
    if fed.grouping_method is None or records.empty:
        return {}
    assigned = assignment_table(records, 0).set_index("client")["group"].to_dict()
    out = {"grouping/n_groups": float(len(set(assigned.values())))}
    if fed.manifest.true_groups and fed.grouping_method != "column":
        ari = adjusted_rand(assigned, fed.groups)
        if ari is not None:
            out["grouping/ari"] = ari
    return out


def assignment_table(records: pd.DataFrame, round_: int) -> pd.DataFrame:
    """Each client's group in this round (as the client itself resolved it at evaluation)."""
    if records.empty or "assigned_group" not in records:
        return pd.DataFrame(columns=["round", "client", "group"])
    table = records.drop_duplicates("client")[["client", "assigned_group"]].rename(
        columns={"assigned_group": "group"}
    )
    table.insert(0, "round", round_)
    return table.reset_index(drop=True)


def _headline(summary: dict[str, float]) -> str:
    out = []
    for variant in ("global", "group", "personal"):
        key = next(
            (k for k in (f"{variant}/accuracy/mean", f"{variant}/accuracy/pooled") if k in summary),
            None,
        )
        if key is not None:
            out.append(f"{variant} {summary[key]:.3f}")
    return ", ".join(out)
