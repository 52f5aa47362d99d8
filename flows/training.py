"""The federated training flow: rounds of dispatch → local_train → group_aggregate →
global_merge → evaluate, reported to MLflow, ending with a registered personalised model."""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import flow, get_run_logger, runtime
from prefect.context import FlowRunContext
from prefect.utilities.annotations import quote

from fedmtl.eval import plots
from fedmtl import rounds as round_loop
from fedmtl.lifecycle.checkpoint import (Checkpoint, CheckpointStore, RunRecord, capture_rng, find_resumable,
                               record_table, restore_rng, table_record)
from fedmtl.config import Config, dump_config
from fedmtl.data.manifest import Manifest, atomic_write_bytes, read_manifest
from fedmtl.eval.metrics import summarize
from fedmtl.faults import crash_if_due
from fedmtl.federation import Federation
from fedmtl.server.grouping import adjusted_rand
from fedmtl.lifecycle.provenance import data_version, git_commit
from fedmtl.privacy.randomness import SecretRandom
from fedmtl.rounds import ClientBudgetsSpent, RoundFailed  # noqa: F401 - the flow's errors, importable here
from fedmtl.state import ServerState
from fedmtl.client.store import ClientStore
from fedmtl.data.validation import bind_partitions, read_report, usable_clients
from fedmtl.lifecycle.warmstart import seed_store, state_from_bundle
from flows import interrupt, progress
from flows.steps import PrefectSteps
from models.personalized import CLIENT_COLUMN, PersonalizedBundle
from tasks.registry import CHAMPION, champion_bundle, check_registered_model, log_personalized_model
from tasks.round import evaluate
from tasks.tracking import RunTracker


@flow(name="fedmtl-train", log_prints=False)
def federated_training(config: dict[str, Any], resume: bool = False) -> dict[str, Any]:
    """Train on the validated partitions named in ``config`` (a ``Config`` as a dict).

    Every complete round is checkpointed in the run's directory (``training.workdir``/runs/KEY:
    :mod:`fedmtl.lifecycle.checkpoint`). ``resume``: continue the newest interrupted run with the same
    settings and data after its last good checkpoint, in the same MLflow run; a retry of the same
    Prefect flow run resumes by itself."""
    cfg = Config.model_validate(config)
    logger = get_run_logger()
    interrupt.reinstall()  # fedmtl train: SIGTERM stops at the next safe point, as SIGINT does
    manifest = read_manifest(cfg.data.partitions_dir)
    # bound to what was validated: the manifest must be the one validated, a client whose file
    # changed since is quarantined (named), and every read of a partition checks its SHA-256
    report, digests = bind_partitions(cfg.data.partitions_dir, manifest, read_report(cfg.data.validation_dir))
    for client, why in report.changed.items():
        logger.warning("client '%s' is quarantined: %s", client, why)
    clients = usable_clients(manifest, report, cfg.training.min_clients)
    tags = run_tags(cfg, manifest, report)
    runs_root = Path(cfg.training.workdir) / "runs"
    settings = cfg.flat()
    found = find_resumable(runs_root, settings, tags["data_version"], flow_run_id=tags.get("prefect_flow_run_id"),
                           latest=resume)
    if found is not None:
        run_dir, record = found
    else:
        key = uuid.uuid4().hex[:8]
        run_dir, record = runs_root / key, RunRecord(key, settings, tags["data_version"],
                                                     tags.get("prefect_flow_run_id"))
    # the run's secret key (DP noise, Poisson sampling): kept in the run's directory, mode 0600,
    # never logged, so that a resume draws exactly the noise the uninterrupted run would have
    fed = Federation.from_config(cfg, manifest, ClientStore(run_dir / "clients"), SecretRandom.load_or_create(run_dir),
                                 partition_digests=digests)
    check_privacy(cfg, fed)
    if fed.secret.seeded:
        logger.warning("privacy.insecure_seeded_noise is on: DP noise and sampling can be replayed from "
                       "training.seed; this run's ε is void (tagged privacy_epsilon_void=true)")
        tags["privacy_epsilon_void"] = "true"
    budget = privacy_budget(cfg, len(clients))
    checkpoints = CheckpointStore(run_dir / "checkpoints")
    tracker = RunTracker(cfg.tracking.tracking_uri, cfg.tracking.experiment, cfg.tracking.artifact_root)
    if cfg.tracking.registered_model:  # before any training: not a clash found at the very end
        check_registered_model(tracker.client, cfg.tracking.registered_model)
    checkpoint = None
    if found is not None and record.mlflow_run_id:
        checkpoint, problems = checkpoints.latest()
        for problem in problems:
            logger.warning("corrupt checkpoint, not loaded: %s", problem)
        tracker.resume(record.mlflow_run_id)
        tracker.set_tags({"resumed_from_round": str(checkpoint.round if checkpoint else 0)})
        logger.info("resuming run %s (MLflow run %s) after round %d", record.key, record.mlflow_run_id,
                    checkpoint.round if checkpoint else 0)
        progress.current().note(f"resuming run {record.key} (MLflow run {record.mlflow_run_id}) after round "
                                f"{checkpoint.round if checkpoint else 0} of {cfg.training.rounds}")
    else:
        record.mlflow_run_id = tracker.start(f"{manifest.source}-{cfg.algorithm.method}-{record.key}",
                                             settings, tags)
        record.save(run_dir)
        tracker.log_text(dump_config(cfg), "config/params.yaml")
        tracker.log_artifact(cfg.data.validation_dir, "validation")
    logger.info("MLflow run %s: %d clients (%d quarantined)", record.mlflow_run_id, len(clients),
                len(report.quarantined))

    records = None
    try:
        if checkpoint is not None:
            state, start_round = checkpoint.state, int(checkpoint.extra.get("start_round", 0))
            rounds = checkpoints.records(state.round)
            history = [r["summary"] for r in rounds]
            tracker.child_runs = dict(checkpoint.extra.get("child_runs", {}))
            tracker.replay(record_table(rounds, "metrics"))  # what the crash left unwritten
            restore_rng(checkpoint.rng)
        else:
            state, history = starting_state(fed, cfg, tracker), []
            start_round = state.round
        if budget is not None and state.round:
            budget.step(state.round)  # a warm start's champion rounds and the rounds before a resume count
        progress.current().start(cfg.training.rounds)
        report_round = RoundReporting(fed, cfg, clients, tracker, tags, budget, checkpoints, history,
                                      {"start_round": start_round, "run": record.key})
        outcome = round_loop.run(fed, state, clients, cfg.training.rounds - (state.round - start_round),
                             steps=PrefectSteps(cfg), per_round=cfg.training.clients_per_round,
                             min_clients=cfg.training.min_clients,
                             evaluate_every=0 if cfg.privacy.dp else 1,  # DP: only the final model's, released once
                             callbacks=[report_round])
        state = outcome.state
        if outcome.records is not None:
            records = outcome.records
        if isinstance(outcome.stopped, ClientBudgetsSpent):
            if not history:  # not one round could train: nothing to register
                raise outcome.stopped
            logger.warning("privacy budget: stopping after round %d: %s", state.round, outcome.stopped)
        interrupt.check(state.round)  # before the final evaluation and registration (a resume does them)
        if budget is not None:  # DP: the final model's evaluation, released once, noised and accounted
            history, records = release_final_evaluation(fed, state, clients, history, budget, tracker, checkpoints)
        elif records is None:  # resumed after the last round: score the final state again
            records, _, _ = evaluate(quote(fed), quote(state), quote(clients))
        if budget is not None:
            tracker.set_tags({"privacy_epsilon": f"{budget.epsilon():.6g}"})
        if fed.dp_sgd is not None:
            tracker.set_tags(dp_sgd_tags(fed, state))
        checkpoints.wait()
        rounds = checkpoints.records(state.round)
        per_client = record_table(rounds, "clients")
        if per_client is not None:  # per-client metrics of every round, as one table (above max_client_runs)
            tracker.log_table(per_client, "clients/rounds.csv")
        result = finish(fed, state, clients, records, history, record_table(rounds, "assignment"), cfg, tracker, tags)
    except BaseException as exc:
        with contextlib.suppress(Exception):  # the run's own error is the one to report
            checkpoints.close()
        if isinstance(exc, interrupt.Interrupted):  # stopped on request, at a safe point
            logger.warning("%s; resume with: fedmtl train --resume", exc)
            tracker.end("KILLED")
        else:
            tracker.end("FAILED")
        raise
    checkpoints.close()
    tracker.end("FINISHED")
    record.finished = True
    record.save(run_dir)
    return result


def starting_state(fed: Federation, cfg: Config, tracker: RunTracker) -> ServerState:
    """Round 0, or, with ``training.warm_start: champion`` and a ``champion`` alias on
    ``tracking.registered_model``, the champion's state: its base and heads, its round count
    (so rounds and metric steps continue) and its clients' personal state, seeded into this
    run's client stores. Tags the MLflow run ``warm_start`` (``models:/<name>/<version>`` or
    ``none``). A champion that does not fit the data or settings fails the run (WarmStartError)."""
    logger = get_run_logger()
    fresh = fed.initial_state()
    started_from = "none"
    if cfg.training.warm_start == "champion":
        name = cfg.tracking.registered_model
        found = champion_bundle(name, tracker.tracking_uri)
        if found is None:
            logger.info("no '%s' alias on '%s' yet: starting from a fresh initialisation", CHAMPION, name)
        else:
            version, bundle = found
            fresh, personal = state_from_bundle(
                fed, bundle, f"{CHAMPION} version {version} of '{name}'",
                "train with training.warm_start=none (scheduled runs: schedule.warm_start=none)", fresh)
            seed_store(fed.store, personal, fresh.round)
            started_from = f"models:/{name}/{version}"
            logger.info("warm start from %s: round %d, %d clients' personal state", started_from,
                        fresh.round, len(personal))
    tracker.set_tags({"warm_start": started_from})
    return fresh


class RoundReporting(round_loop.Callbacks):
    """What the flow does around each round of the loop (:func:`fedmtl.rounds.run`): before it,
    stop at an interrupt (a safe point: the last checkpoint is being written whole) or when the
    next round would exceed ``privacy.target_epsilon``; after it, the round's metrics, per-client
    records and failures to MLflow (what privacy allows), the ε spent, the checkpoint, progress."""

    def __init__(self, fed, cfg, clients, tracker, tags, budget, checkpoints, history, extra) -> None:
        self.fed, self.cfg, self.clients, self.tracker, self.tags = fed, cfg, clients, tracker, tags
        self.budget, self.checkpoints, self.history, self.extra = budget, checkpoints, history, extra

    def before_round(self, state: ServerState) -> bool:
        interrupt.check(state.round)
        return not budget_exhausted(self.budget, self.cfg, state)

    def after_round(self, state: ServerState, report: round_loop.Round) -> None:
        fed, cfg, tracker = self.fed, self.cfg, self.tracker
        crash_if_due(cfg.faults.crash_at_round, state.round)  # fault injection: a SIGKILL mid-round
        start = time.perf_counter()
        records, updates = report.records, report.updates
        failed = {client: str(failure) for client, failure in report.failed.items()}  # the round's report
        for client, why in report.not_evaluated.items():
            failed[client] = f"{failed[client]} (and not evaluated)" if client in failed else f"not evaluated: {why}"
        summary = {**summarize(records), **report.pooled, **grouping_metrics(fed, records)}
        # under DP who took part (and so how many) is secret: the sampling amplification counts on it
        extra = {} if cfg.privacy.dp else {"clients/participating": len(updates), "clients/failed": len(failed),
                                          "clients/retried": report.retried, "clients/refused": len(report.refused)}
        if cfg.privacy.per_client_metrics:  # a client's training loss is its own figure too
            extra["train/loss/mean"] = sum(u.metrics["train_loss"] for u in updates) / len(updates)
        if report.privacy is not None:
            extra.update(privacy_metrics(report.privacy, dp=cfg.privacy.dp))
            for client, why in report.privacy.held_back.items():
                failed.setdefault(client, f"held back: {why}")
        if self.budget is not None:
            self.budget.step()
            extra["privacy/epsilon"] = self.budget.epsilon()
        if fed.dp_sgd is not None:  # each client's sample-level ε: the largest and the mean so far
            extra.update(fed.dp_sgd_metrics(state))
            extra["privacy/dp_sgd_sat_out"] = float(len(report.sat_out))
        tracker.log_metrics({**summary, **extra, **{f"time/{k}_s": v for k, v in report.seconds.items()}},
                            state.round)
        if client_runs(cfg, self.clients):
            tracker.log_clients(records, state.round, {"data_version": self.tags["data_version"]})
        tracking = time.perf_counter() - start
        tracker.log_metrics({"time/tracking_s": tracking, "time/round_s": sum(report.seconds.values()) + tracking},
                            state.round)
        if failed and cfg.privacy.dp:  # names sampled clients: kept with the coordinator, not released
            atomic_write_bytes(fed.store.root.parent / "rounds" / f"round-{state.round:04d}-failed.json",
                               json.dumps(failed, indent=2).encode())  # mkstemp: mode 0600
        elif failed:
            tracker.log_text(json.dumps(failed, indent=2), f"rounds/round-{state.round:04d}-failed.json")

        self.history.append(summary)
        log = {"summary": summary, "metrics": table_record(tracker.take_journal())}  # replayed on a resume
        if fed.grouping_method is not None and cfg.privacy.per_client_metrics:
            log["assignment"] = table_record(assignment_table(records, state.round))
        if cfg.tracking.client_runs and cfg.privacy.per_client_metrics and not client_runs(cfg, self.clients):
            log["clients"] = table_record(records.assign(round=state.round))
        self.checkpoints.save(Checkpoint(state, log, {**self.extra, "child_runs": tracker.child_runs},
                                         capture_rng()), background=True)
        get_run_logger().info("round %d: %s", state.round, _headline(summary))
        progress.current().round_done(state.round, _headline(summary))


def client_runs(cfg: Config, clients: list[str]) -> bool:
    """Whether per-client metrics go to child runs (else to the table clients/rounds.csv);
    never when ``privacy.client_metrics`` is off (the default with privacy on)."""
    return (cfg.tracking.client_runs and cfg.privacy.per_client_metrics
            and len(clients) <= cfg.tracking.max_client_runs)


class PrivacyPlanError(ValueError):
    """Privacy settings that cannot give the promised guarantee (the message says why)."""


def check_privacy(cfg: Config, fed: Federation) -> None:
    """Refuse settings under which DP's guarantee would not hold."""
    p = cfg.privacy
    if p.dp and fed.grouping_method in ("ifca", "cluster"):
        raise PrivacyPlanError(
            f"privacy.dp with grouping '{fed.grouping_method}' (algorithm.method={cfg.algorithm.method}, "
            f"grouping.method={cfg.grouping.method}): each client would pick the group whose sum it "
            "joins from its own data, a choice released outside ε; use grouping.method=column")
    if p.enabled and cfg.server.aggregator != "mean":
        raise PrivacyPlanError(
            f"server.aggregator={cfg.server.aggregator} with privacy ({p.mechanism}): a robust rule needs each "
            "client's own update, which secure aggregation hides and DP's guarantee does not cover; use "
            "server.aggregator=mean (DP's clipping already bounds any one client's influence)")
    if p.secure_aggregation and fed.grouping_method == "cluster":
        raise PrivacyPlanError(
            "privacy.secure_aggregation with grouping.method=cluster: the server would cluster the "
            "clients' own head updates, which secure aggregation exists to hide; use "
            "grouping.method=column or ifca")


def privacy_budget(cfg: Config, n_clients: int):
    """The run's accountant (None without DP). With ``privacy.target_epsilon``, a plan whose
    rounds would spend more refuses to start, with the numbers and the ways out."""
    p = cfg.privacy
    if not p.dp:
        return None
    from fedmtl.privacy.accounting import BudgetExceeded, PrivacyAccountant, check_plan
    from fedmtl.server.dispatch import sample_rate

    rate = sample_rate(cfg.training.clients_per_round, n_clients)
    if p.adaptive_clip:
        from fedmtl.privacy.dp import default_count_noise, update_noise_multiplier

        try:
            update_noise_multiplier(p.noise_multiplier, default_count_noise(rate * n_clients))
        except ValueError as exc:
            raise PrivacyPlanError(
                f"privacy.adaptive_clip with {rate * n_clients:g} expected clients per round: {exc}") from None
    if p.target_epsilon is not None:
        try:
            check_plan(p.target_epsilon, cfg.training.rounds, p.noise_multiplier, "poisson",
                       sample_rate=rate, delta=p.delta, extra_releases=(p.evaluation_noise_multiplier,))
        except BudgetExceeded as exc:
            raise PrivacyPlanError(str(exc)) from None
    return PrivacyAccountant(p.noise_multiplier, "poisson", sample_rate=rate, delta=p.delta)


def budget_exhausted(budget, cfg: Config, state: ServerState) -> bool:
    """Whether one more round would spend more than ``privacy.target_epsilon`` (then training
    stops here, logged, rather than exceed it)."""
    target = cfg.privacy.target_epsilon
    if budget is None or target is None:
        return False
    from fedmtl.privacy.accounting import epsilon_after

    after = epsilon_after(budget.rounds + 1, budget.noise_multiplier, "poisson",  # and the final evaluation
                          sample_rate=budget.sample_rate, delta=budget.delta,
                          extra_releases=(cfg.privacy.evaluation_noise_multiplier,))
    if after <= target:
        return False
    get_run_logger().warning(
        "privacy budget: stopping after round %d: one more round would spend ε=%.3g > "
        "privacy.target_epsilon=%g at δ=%g", state.round, after, target, budget.delta)
    return True


def release_final_evaluation(fed, state, clients, history, budget, tracker, checkpoints):
    """Under DP: the final model's pooled evaluation, the run's one evaluation release (each
    client's statistics clipped to their public bound, Gaussian noise of multiplier
    ``privacy.evaluation_noise_multiplier``), counted by the accountant; logged at the last
    round's step and merged into the last summary. A run resumed after it was released
    reuses the released figures (the checkpoint's ``evaluation`` record): never a second release."""
    released = checkpoints.released_evaluation(state.round)
    if released is None:
        _, released, _ = evaluate(quote(fed), quote(state), quote(clients))
        checkpoints.save_released_evaluation(state.round, released)
    tracker.log_metrics(released, state.round)
    budget.release(fed.privacy.evaluation_noise_multiplier)
    tracker.log_metrics({"privacy/epsilon": budget.epsilon()}, state.round)
    history = [*history[:-1], {**(history[-1] if history else {}), **released}]
    return history, pd.DataFrame()


def dp_sgd_tags(fed: Federation, state: ServerState) -> dict[str, str]:
    """Under DP-SGD: the largest and the mean client ε spent (at ``privacy_dp_sgd_delta``)."""
    if fed.dp_sgd is None:
        return {}
    metrics = fed.dp_sgd_metrics(state)
    out = {"privacy_dp_sgd_delta": f"{fed.dp_sgd.delta:g}"}
    for name in ("max", "mean"):
        value = metrics.get(f"privacy/dp_sgd_epsilon_{name}")
        if value is not None:
            out[f"privacy_dp_sgd_epsilon_{name}"] = f"{value:.6g}"
    return out


def privacy_metrics(report, dp: bool = False) -> dict[str, float]:
    """The round's private-aggregation report as metrics (no client's own values). Under DP
    only what is public or covered by ε: the clip norm (adaptive clipping moves it by the noised
    count, post-processing), the noise std and the planned releases; the counts of released,
    held-back and dropped clients depend on who was sampled and are not released."""
    out = {
        "privacy/clip": report.clip,
        "privacy/noise_std": report.noise_std,
        "privacy/releases": float(len(report.releases)),
    }
    if not dp:
        out.update({
            "privacy/released_clients": float(report.released_clients),
            "privacy/held_back": float(len(report.held_back)),
            "privacy/dropped_mid_protocol": float(len(report.dropped_mid_protocol)),
            "time/secagg_s": report.secagg_seconds,
        })
    return out


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
        columns={"assigned_group": "group"})
    table.insert(0, "round", round_)
    return table.reset_index(drop=True)


def finish(fed, state, clients, records, history, assignments, cfg, tracker, tags) -> dict[str, Any]:
    """Plots, the per-client table, the registered model and the DVC metrics file."""
    fig = plots.convergence(history)
    tracker.log_figure(fig, "plots/convergence.png")
    plots.close(fig)
    if cfg.privacy.per_client_metrics:  # per-client figures and tables: not with privacy on
        fig = plots.clients_global_vs_personal(records)
        tracker.log_figure(fig, "plots/clients_global_vs_personal.png")
        plots.close(fig)
        fig = plots.personalisation_gain_histogram(records)
        tracker.log_figure(fig, "plots/personalisation_gain.png")
        plots.close(fig)
        tracker.log_table(records, "clients_final.csv")
    if fed.grouping_method is not None and assignments is not None and cfg.privacy.per_client_metrics:
        assigned = assignments
        tracker.log_table(assigned, "groups/assignment.csv")
        if not assigned.empty:
            fig = plots.group_assignment(assigned)
            tracker.log_figure(fig, "plots/group_assignment.png")
            plots.close(fig)

    version = None
    model_uri = None
    bundle = None
    if cfg.tracking.register_model:
        bundle = make_bundle(fed, state, cfg)
        example = input_example(fed)  # synthetic: never a client's rows
        model_uri, version = log_personalized_model(
            tracker.run_id, bundle, example, cfg.tracking.registered_model,
            tags={"data_version": tags["data_version"], "git_commit": tags["git_commit"],
                  **privacy_tags(cfg, tracker)},
        )
        tracker.set_tags({"registered_model": cfg.tracking.registered_model, "model_version": version or ""})

    final = history[-1]
    pooled = not cfg.privacy.per_client_metrics  # then only pooled figures exist (no worst-10 %)
    stat = "pooled" if pooled else "mean"
    metrics = {
        "global_accuracy": final.get(f"global/accuracy/{stat}"),
        "group_accuracy": final.get(f"group/accuracy/{stat}"),
        "personal_accuracy": final.get(f"personal/accuracy/{stat}"),
        "global_f1": final.get(f"global/f1/{stat}"),
        "group_f1": final.get(f"group/f1/{stat}"),
        "personal_f1": final.get(f"personal/f1/{stat}"),
        "personal_accuracy_worst10": final.get("personal/accuracy/worst10"),
        "global_accuracy_worst10": final.get("global/accuracy/worst10"),
        "group_accuracy_worst10": final.get("group/accuracy/worst10"),
        "personalisation_gain": final.get("personalisation_gain/accuracy" + ("/pooled" if pooled else "")),
        "grouping_ari": final.get("grouping/ari"),
        "evaluation": ("pooled through a secure sum" if cfg.privacy.secure_aggregation else "pooled")
        if pooled else "mean over clients",
        "rounds": state.round,
        "clients": len(clients),
        "mlflow_run_id": tracker.run_id,
        "model_version": version,
        "data_version": tags["data_version"],
    }
    metrics = {k: v for k, v in metrics.items() if v is not None}
    atomic_write_bytes(cfg.tracking.metrics_file, (json.dumps(metrics, indent=2) + "\n").encode())
    return {**metrics, "model_uri": model_uri, "registered_model": cfg.tracking.registered_model,
            "tracking_uri": tracker.tracking_uri, "history": history, "bundle": bundle}


def privacy_tags(cfg: Config, tracker: RunTracker) -> dict[str, str]:
    """The model version's privacy tags: the mechanism and, under DP, the ε spent (at δ)."""
    out = {"privacy": cfg.privacy.mechanism}
    if cfg.privacy.insecure_seeded_noise:  # noise replayable from training.seed: no ε holds
        out["privacy_epsilon_void"] = "true"
    if cfg.privacy.dp or cfg.privacy.dp_sgd:
        tags = tracker.client.get_run(tracker.run_id).data.tags
    if cfg.privacy.dp:
        out.update({"privacy_epsilon": tags.get("privacy_epsilon", ""),
                    "privacy_delta": f"{cfg.privacy.delta:g}"})
    if cfg.privacy.dp_sgd:
        out.update({k: tags[k] for k in ("privacy_dp_sgd_epsilon_max", "privacy_dp_sgd_delta") if k in tags})
    return out


def make_bundle(fed: Federation, state: ServerState, cfg: Config) -> PersonalizedBundle:
    """The model to register: the shared base, global and group heads and the client → group
    routing. Personal heads and bases stay on the clients (each fits and keeps its own, e.g.
    ``fedmtl personalize``) unless ``tracking.bundle_personal_heads`` opts in, which the
    settings refuse under ``privacy.dp``/``privacy.dp_sgd`` (they are fitted outside ε)."""
    personal, bases = {}, {}
    if cfg.tracking.bundle_personal_heads and (cfg.privacy.dp or cfg.privacy.dp_sgd):
        raise ValueError("tracking.bundle_personal_heads=true with privacy.dp or privacy.dp_sgd: personal heads "
                         "are fitted outside the DP guarantee and would be published in the registered model; "
                         "set tracking.bundle_personal_heads=false")
    if cfg.tracking.bundle_personal_heads:
        for client in fed.manifest.client_ids:
            kept = fed.store.load(client)
            if kept is None:
                continue
            if kept.heads:
                personal[client] = kept.heads
            if kept.base is not None:
                bases[client] = kept.base
    return PersonalizedBundle(
        model_cfg=cfg.model.model_dump(mode="json"),
        features=list(fed.manifest.features),
        tasks=[{"name": t.name, "kind": t.kind, "classes": list(t.classes)} for t in fed.manifest.tasks],
        input_shape=fed.manifest.input_shape,
        base=state.base,
        global_heads=state.global_heads,
        group_heads=state.group_heads,
        client_groups={c: g for c, g in state.assignment.items() if g in state.group_heads},
        personal_heads=personal,
        personal_bases=bases,
        coldstart=cfg.coldstart.model_dump(mode="json"),
        round=state.round,
    )


#: the client id of the registered model's input example: no client of the data
EXAMPLE_CLIENT = "example-client"


def input_example(fed: Federation, rows: int = 2) -> pd.DataFrame:
    """The input example stored with the registered model (``input_example.json``,
    ``serving_input_example.json``, the signature): synthetic, for every run. ``rows`` rows of
    zeros under the feature columns and a client id no client has (so it is answered by the
    global heads, as an unknown client without labels is); never a client's rows or statistics."""
    client = EXAMPLE_CLIENT
    while client in set(fed.manifest.client_ids):
        client += "-x"
    frame = pd.DataFrame(0.0, index=range(rows), columns=list(fed.manifest.features))
    frame.insert(0, CLIENT_COLUMN, client)
    return frame


def run_tags(cfg: Config, manifest: Manifest, report) -> dict[str, str]:
    tags = {
        **data_version(cfg.data.partitions_dir),
        **git_commit(),
        "method": cfg.algorithm.method,
        "server_optimizer": cfg.server.optimizer,
        "dataset": manifest.source,
        "partition_scheme": manifest.scheme,
        "grouping": cfg.grouping.method,
        "privacy": cfg.privacy.mechanism,
        "quarantined_clients": ",".join(sorted(report.quarantined)) or "none",
        "validated_clients": str(len(report.passed)),
    }
    if cfg.privacy.dp:
        tags.update({"privacy_delta": f"{cfg.privacy.delta:g}",
                     "privacy_noise_multiplier": f"{cfg.privacy.noise_multiplier:g}"})
    if cfg.privacy.dp_sgd:
        tags.update({"privacy_dp_sgd_noise_multiplier": f"{cfg.privacy.dp_sgd_noise_multiplier:g}",
                     "privacy_dp_sgd_max_grad_norm": f"{cfg.privacy.dp_sgd_max_grad_norm:g}"})
    context = FlowRunContext.get()
    if context is not None and context.task_runner is not None:
        tags["task_runner"] = type(context.task_runner).__name__
    try:
        tags["prefect_flow_run_id"] = str(runtime.flow_run.id)
        tags["prefect_flow_run_name"] = str(runtime.flow_run.name)
    except Exception:  # noqa: BLE001 - outside a flow run there is no id to record
        pass
    return tags


def _headline(summary: dict[str, float]) -> str:
    out = []
    for variant in ("global", "group", "personal"):
        key = next((k for k in (f"{variant}/accuracy/mean", f"{variant}/accuracy/pooled") if k in summary), None)
        if key is not None:
            out.append(f"{variant} {summary[key]:.3f}")
    return ", ".join(out)
