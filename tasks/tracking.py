"""MLflow reporting for a training flow run: one parent run, per-client child runs, batched
and asynchronous.

Every metric goes through ``MlflowClient.log_batch`` (one call per run per round), never
``log_metric`` in a loop, and asynchronously (``synchronous=False``: MLflow's own logging queue
writes while the next round trains); :meth:`RunTracker.end` flushes the queue before it closes
the runs. Child runs are created once per client and reused every round; above
``tracking.max_client_runs`` clients the flow keeps per-client metrics in a table artifact
instead (one child run per client would cost a round trip per client per round).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

import mlflow  # tasks/__init__ has already quietened MLflow (fedmtl.quiet)
from tasks.locking import is_database_uri, store_lock

MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000


def resolve_tracking_uri(uri: str) -> str:
    """Make a relative ``sqlite:///path`` absolute and create its folder."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        path = Path(uri[len(prefix) :]).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return prefix + str(path)
    return uri


_OPENED: set[str] = set()  # stores this process has opened (MLflow keeps them per URI)


def open_store(tracking_uri: str) -> MlflowClient:
    """A client of the store at ``tracking_uri``, which this process opens for the first time
    while holding the store's ``init`` lock (:mod:`tasks.locking`).

    MLflow creates a database store's tables, and migrates an old one, when a process first
    opens it; two processes doing that at once on a new SQLite file fail (``Online migration
    expected to match one row when updating … in 'alembic_version'``), e.g. two ``fedmtl
    train`` runs started together on a fresh store. Under the lock the second one waits and
    then finds the tables in place. Both of MLflow's stores are opened: tracking and registry."""
    uri = resolve_tracking_uri(tracking_uri)
    if uri in _OPENED or not is_database_uri(uri):
        return MlflowClient(uri)
    with store_lock(uri, "init"):
        client = MlflowClient(uri)  # opens the tracking store
        client.search_registered_models(max_results=1)  # and the registry's
    _OPENED.add(uri)
    return client


def ensure_experiment(client: MlflowClient, name: str, artifact_root: str) -> str:
    """The id of experiment ``name``, created if it does not exist. Another process may create
    it between the look-up and the creation (two runs started together): its id is used then."""
    existing = client.get_experiment_by_name(name)
    if existing is not None:
        return existing.experiment_id
    location = None
    if artifact_root and "://" not in artifact_root:
        path = Path(artifact_root).resolve()
        path.mkdir(parents=True, exist_ok=True)
        location = path.as_uri()
    elif artifact_root:
        location = artifact_root
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        existing = client.get_experiment_by_name(name)  # created by a concurrent process
        if existing is None:
            raise
        return existing.experiment_id


class RunTracker:
    """The MLflow side of one training flow run."""

    def __init__(self, tracking_uri: str, experiment: str, artifact_root: str) -> None:
        # MLflow's async writer otherwise blocks in a 1 s queue poll, so each flush (the end
        # of the run, logging the model, the process's exit) waited up to 1 s; buffered, it
        # wakes on the flush and also writes a round's batches in one transaction.
        os.environ.setdefault("MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS", "1")  # whole seconds
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        mlflow.set_tracking_uri(self.tracking_uri)
        self.client = open_store(self.tracking_uri)
        self.experiment_id = ensure_experiment(self.client, experiment, artifact_root)
        self.run_id: str | None = None
        self.child_runs: dict[str, str] = {}
        self._journal: list[
            tuple[str, Metric]
        ] = []  # every metric logged since the last take_journal

    # -- runs -------------------------------------------------------------------------------
    def start(self, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> str:
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
        self.run_id = run.info.run_id
        items = [Param(k, _param_value(v)) for k, v in sorted(params.items())]
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + MAX_PARAMS_PER_BATCH])
        return self.run_id

    def resume(self, run_id: str) -> str:
        """Continue an interrupted run (``fedmtl train --resume``): mark it running again."""
        self.run_id = run_id
        self.client.update_run(run_id, status="RUNNING")
        return run_id

    def set_tags(self, tags: dict[str, str]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def flush(self) -> None:
        """Wait until every queued metric is written."""
        mlflow.flush_async_logging()

    def end(self, status: str = "FINISHED") -> None:
        self.flush()
        for run_id in self.child_runs.values():
            self.client.set_terminated(run_id, status)
        if self.run_id:
            self.client.set_terminated(self.run_id, status)

    # -- metrics ----------------------------------------------------------------------------
    def log_metrics(self, metrics: dict[str, float], step: int, run_id: str | None = None) -> None:
        now = int(time.time() * 1000)
        items = [
            Metric(_metric_key(k), float(v), now, step)
            for k, v in metrics.items()
            if v is not None and v == v  # drop NaN
        ]
        target = run_id or self.run_id
        self._journal += [(target, m) for m in items]
        for i in range(0, len(items), MAX_METRICS_PER_BATCH):
            self.client.log_batch(
                target, metrics=items[i : i + MAX_METRICS_PER_BATCH], synchronous=False
            )

    def take_journal(self) -> pd.DataFrame:
        """The metrics logged since the last call (run, key, value, timestamp, step), for the
        round's checkpoint: they are written asynchronously, so a crash may lose some that were
        queued; :meth:`replay` writes them again on a resume."""
        rows = [(run, m.key, m.value, m.timestamp, m.step) for run, m in self._journal]
        self._journal = []
        return pd.DataFrame(rows, columns=["run_id", "key", "value", "timestamp", "step"])

    def replay(self, journal: pd.DataFrame | None) -> None:
        """Log a journal again, synchronously. Idempotent: MLflow skips a metric it already has
        with the same key, value, timestamp and step."""
        if journal is None or journal.empty:
            return
        for run_id, rows in journal.groupby("run_id", sort=False):
            items = [
                Metric(k, float(v), int(t), int(s))
                for k, v, t, s in rows[["key", "value", "timestamp", "step"]].itertuples(
                    index=False
                )
            ]
            for i in range(0, len(items), MAX_METRICS_PER_BATCH):
                self.client.log_batch(str(run_id), metrics=items[i : i + MAX_METRICS_PER_BATCH])

    def log_clients(self, records: pd.DataFrame, step: int, tags: dict[str, str]) -> None:
        """Per-client metrics into one child run per client (created on first use)."""
        if records.empty:
            return
        metric_cols = [c for c in records.select_dtypes("number").columns if c != "n_test"]
        first_task = records["task"].iloc[0]
        for client, rows in records.groupby("client", sort=True):
            run_id = self.child_runs.get(client)
            if run_id is None:
                child_tags = {
                    "mlflow.parentRunId": self.run_id,
                    "client": str(client),
                    "group": str(rows["group"].iloc[0]),
                    **tags,
                }
                run = self.client.create_run(
                    self.experiment_id, run_name=f"client-{client}", tags=child_tags
                )
                run_id = self.child_runs[client] = run.info.run_id
            metrics: dict[str, float] = {}
            for row in rows.itertuples(index=False):
                prefix = "" if row.task == first_task else f"{row.task}/"
                for m in metric_cols:
                    metrics[f"{prefix}{row.variant}/{m}"] = getattr(row, m)
            self.log_metrics(metrics, step, run_id)

    # -- artifacts --------------------------------------------------------------------------
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        elif path.exists():
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, text, name)

    def log_figure(self, figure, name: str) -> None:
        self.client.log_figure(self.run_id, figure, name)

    def log_table(self, frame: pd.DataFrame, name: str) -> None:
        """``frame`` as CSV at artifact path ``name`` (which may name a folder, e.g.
        groups/x.csv)."""
        folder, _, filename = name.rpartition("/")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / filename
            frame.to_csv(path, index=False)
            self.client.log_artifact(self.run_id, str(path), folder or None)


def _metric_key(key: str) -> str:
    return key.replace("%", "pct")


def _param_value(value: Any) -> str:
    text = "" if value is None else str(value)
    return text[:6000]
