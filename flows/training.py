"""The federated training flow: rounds of dispatch → local_train → group_aggregate →
global_merge → evaluate, reported to MLflow, ending with a registered personalised model."""

from __future__ import annotations

import contextlib
import uuid
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import flow, get_run_logger, runtime
from prefect.context import FlowRunContext
from prefect.utilities.annotations import quote

from fedmtl import rounds as round_loop
from fedmtl.client.store import ClientStore
from fedmtl.config import Config, dump_config
from fedmtl.data.manifest import Manifest, read_manifest
from fedmtl.data.validation import bind_partitions, read_report, usable_clients
from fedmtl.federation import Federation
from fedmtl.lifecycle.checkpoint import CheckpointStore, record_table, restore_rng
from fedmtl.lifecycle.provenance import data_version, git_commit
from fedmtl.lifecycle.runs import RunRecord, find_resumable
from fedmtl.lifecycle.warmstart import seed_store, state_from_bundle
from fedmtl.privacy.plan import (
    ClientLevelBudget,
    PrivacyPlanError,
    check_privacy,
    privacy_tags,
    run_accountant,
)
from fedmtl.privacy.randomness import SecretRandom
from fedmtl.privacy.sample_level import EPSILON_KEY
from fedmtl.rounds import ClientBudgetsSpent, RoundFailed
from fedmtl.state import ServerState
from flows import interrupt, progress
from flows.registration import finish
from flows.reporting import RoundReporting
from flows.sites import site_steps, sites_data
from flows.steps import PrefectSteps
from tasks.registry import CHAMPION, champion_bundle, check_registered_model
from tasks.round import evaluate
from tasks.tracking import RunTracker

#: the flow, and its errors (importable from here)
__all__ = ["ClientBudgetsSpent", "PrivacyPlanError", "RoundFailed", "federated_training"]


@flow(name="fedmtl-train", log_prints=False)
def federated_training(config: Config, resume: bool = False) -> dict[str, Any]:
    """Train on the validated partitions named in ``config`` (a :class:`Config`; Prefect
    validates a mapping into one, e.g. a deployment's stored parameters, old keys included).

    Every complete round is checkpointed in the run's directory (``training.workdir``/runs/KEY:
    :mod:`fedmtl.lifecycle.checkpoint`). ``resume``: continue the newest interrupted run with the
    same settings and data after its last good checkpoint, in the same MLflow run; a retry of the
    same Prefect flow run resumes by itself."""
    cfg = config if isinstance(config, Config) else Config.model_validate(config)
    logger = get_run_logger()
    interrupt.reinstall()  # fedmtl train: SIGTERM stops at the next safe point, as SIGINT does
    at_sites = cfg.federation.mode == "sites"
    if at_sites:  # the sites' sealed summaries: public metadata and validation outcomes, no data
        manifest, report, missing, version, summary = sites_data(cfg)
        digests = None
        for site in missing:
            logger.warning("site '%s' has left no validation summary: not in this run", site)
    else:
        manifest, version = read_manifest(cfg.data.partitions_dir), None
        # bound to what was validated: the manifest must be the one validated, a client whose
        # file changed since is quarantined (named), and every read of a partition checks it
        report, digests = bind_partitions(
            cfg.data.partitions_dir, manifest, read_report(cfg.data.validation_dir)
        )
    for client, why in report.changed.items():
        logger.warning("client '%s' is quarantined: %s", client, why)
    clients = usable_clients(manifest, report, cfg.training.min_clients)
    tags = run_tags(cfg, manifest, report, version)
    runs_root = Path(cfg.training.workdir) / "runs"
    settings = cfg.flat()
    found = find_resumable(
        runs_root,
        settings,
        tags["data_version"],
        flow_run_id=tags.get("prefect_flow_run_id"),
        latest=resume,
    )
    if found is not None:
        run_dir, record = found
    else:
        key = uuid.uuid4().hex[:8]
        run_dir, record = (
            runs_root / key,
            RunRecord(key, settings, tags["data_version"], tags.get("prefect_flow_run_id")),
        )
    # the run's secret key (DP noise, Poisson sampling): kept in the run's directory, mode 0600,
    # never logged, so that a resume draws exactly the noise the uninterrupted run would have
    fed = Federation.from_config(
        cfg,
        manifest,
        ClientStore(run_dir / "clients"),
        SecretRandom.load_or_create(run_dir),
        partition_digests=digests,
    )
    check_privacy(cfg, fed.grouping_method)
    if fed.secret.seeded:
        logger.warning(
            "privacy.insecure_seeded_noise is on: DP noise and sampling can be replayed from "
            "training.seed; this run's ε is void (tagged privacy_epsilon_void=true)"
        )
        tags["privacy_epsilon_void"] = "true"
    budget = run_accountant(cfg, len(clients))
    checkpoints = CheckpointStore(run_dir / "checkpoints")
    tracker = RunTracker(
        cfg.tracking.tracking_uri, cfg.tracking.experiment, cfg.tracking.artifact_root
    )
    if cfg.tracking.registered_model:  # before any training: not a clash found at the very end
        check_registered_model(tracker.client, cfg.tracking.registered_model)
    checkpoint = None
    if found is not None and record.mlflow_run_id:
        checkpoint, problems = checkpoints.latest()
        for problem in problems:
            logger.warning("corrupt checkpoint, not loaded: %s", problem)
        tracker.resume(record.mlflow_run_id)
        tracker.set_tags({"resumed_from_round": str(checkpoint.round if checkpoint else 0)})
        logger.info(
            "resuming run %s (MLflow run %s) after round %d",
            record.key,
            record.mlflow_run_id,
            checkpoint.round if checkpoint else 0,
        )
        progress.current().note(
            f"resuming run {record.key} (MLflow run {record.mlflow_run_id}) after round "
            f"{checkpoint.round if checkpoint else 0} of {cfg.training.rounds}"
        )
    else:
        record.mlflow_run_id = tracker.start(
            f"{manifest.source}-{cfg.algorithm.method}-{record.key}", settings, tags
        )
        record.save(run_dir)
        tracker.log_text(dump_config(cfg), "config/params.yaml")
        if at_sites:
            tracker.log_text(summary, "validation/sites.json")
        else:
            tracker.log_artifact(cfg.data.validation_dir, "validation")
    logger.info(
        "MLflow run %s: %d clients (%d quarantined)",
        record.mlflow_run_id,
        len(clients),
        len(report.quarantined),
    )

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
            budget.step(
                state.round
            )  # a warm start's champion rounds and the rounds before a resume count
        progress.current().start(cfg.training.rounds)
        steps = site_steps(cfg, record.key) if at_sites else PrefectSteps(cfg)
        report_round = RoundReporting(
            fed,
            cfg,
            clients,
            tracker,
            tags,
            budget,
            checkpoints,
            history,
            {"start_round": start_round, "run": record.key},
        )
        stop_at_budget = (
            [ClientLevelBudget(budget, cfg.privacy.dp_fedavg.target_epsilon, logger)]
            if budget is not None
            else []
        )
        outcome = round_loop.run(
            fed,
            state,
            clients,
            cfg.training.rounds - (state.round - start_round),
            steps=steps,
            per_round=cfg.training.clients_per_round,
            min_clients=cfg.training.min_clients,
            evaluate_every=0
            if cfg.privacy.dp_fedavg.enabled
            else 1,  # DP: only the final model's, released once
            callbacks=[*stop_at_budget, report_round],
        )
        state = outcome.state
        if outcome.records is not None:
            records = outcome.records
        if isinstance(outcome.stopped, ClientBudgetsSpent):
            if not history:  # not one round could train: nothing to register
                raise outcome.stopped
            logger.warning(
                "privacy budget: stopping after round %d: %s", state.round, outcome.stopped
            )
        interrupt.check(
            state.round
        )  # before the final evaluation and registration (a resume does them)
        if (
            budget is not None
        ):  # DP: the final model's evaluation, released once, noised and accounted
            history, records = release_final_evaluation(
                fed, state, clients, history, budget, tracker, checkpoints
            )
        elif records is None:  # resumed after the last round: score the final state again
            records, _, _ = (
                steps.evaluate(fed, state, clients)
                if at_sites
                else evaluate(quote(fed), quote(state), quote(clients))
            )
        if budget is not None:
            tracker.set_tags({"privacy_epsilon": f"{budget.epsilon():.6g}"})
        if fed.sample_level is not None:
            tracker.set_tags(fed.sample_level.tags(state.privacy.get(EPSILON_KEY)))
        checkpoints.wait()
        rounds = checkpoints.records(state.round)
        per_client = record_table(rounds, "clients")
        if (
            per_client is not None
        ):  # per-client metrics of every round, as one table (above max_client_runs)
            tracker.log_table(per_client, "clients/rounds.csv")
        result = finish(
            fed,
            state,
            clients,
            records,
            history,
            record_table(rounds, "assignment"),
            cfg,
            tracker,
            tags,
        )
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
            logger.info(
                "no '%s' alias on '%s' yet: starting from a fresh initialisation", CHAMPION, name
            )
        else:
            version, bundle = found
            fresh, personal = state_from_bundle(
                fed,
                bundle,
                f"{CHAMPION} version {version} of '{name}'",
                "train with training.warm_start=none (scheduled runs: schedule.warm_start=none)",
                fresh,
            )
            seed_store(fed.store, personal, fresh.round)
            started_from = f"models:/{name}/{version}"
            logger.info(
                "warm start from %s: round %d, %d clients' personal state",
                started_from,
                fresh.round,
                len(personal),
            )
    tracker.set_tags({"warm_start": started_from})
    return fresh


def release_final_evaluation(fed, state, clients, history, budget, tracker, checkpoints):
    """Under DP: the final model's pooled evaluation, the run's one evaluation release (each
    client's statistics clipped to their public bound, Gaussian noise of multiplier
    ``privacy.evaluation.noise_multiplier``), counted by the accountant; logged at the last
    round's step and merged into the last summary. A run resumed after it was released
    reuses the released figures (the checkpoint's ``evaluation`` record): never a second release."""
    released = checkpoints.released_evaluation(state.round)
    if released is None:
        _, released, _ = evaluate(quote(fed), quote(state), quote(clients))
        checkpoints.save_released_evaluation(state.round, released)
    tracker.log_metrics(released, state.round)
    budget.release(fed.privacy.evaluation.noise_multiplier)
    tracker.log_metrics({"privacy/epsilon": budget.epsilon()}, state.round)
    history = [*history[:-1], {**(history[-1] if history else {}), **released}]
    return history, pd.DataFrame()


def run_tags(
    cfg: Config, manifest: Manifest, report, version: dict | None = None
) -> dict[str, str]:
    tags = {
        **(version or data_version(cfg.data.partitions_dir)),
        "federation": cfg.federation.mode,
        **git_commit(),
        "method": cfg.algorithm.method,
        "server_optimizer": cfg.server.optimizer,
        "dataset": manifest.source,
        "partition_scheme": manifest.scheme,
        "grouping": cfg.grouping.method,
        **privacy_tags(cfg),
        "quarantined_clients": ",".join(sorted(report.quarantined)) or "none",
        "validated_clients": str(len(report.passed)),
    }
    context = FlowRunContext.get()
    if context is not None and context.task_runner is not None:
        tags["task_runner"] = type(context.task_runner).__name__
    try:
        tags["prefect_flow_run_id"] = str(runtime.flow_run.id)
        tags["prefect_flow_run_name"] = str(runtime.flow_run.name)
    except Exception:  # noqa: BLE001 - outside a flow run there is no id to record
        pass
    return tags
