"""Read runs back from the MLflow tracking store for ``fedmtl compare``: by run id or run name."""

from __future__ import annotations

import re

from mlflow.entities import ViewType  # tasks/__init__ has already quietened MLflow (fedmtl.quiet)
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from fedmtl.eval.comparison import RunRecord
from tasks.locking import sqlite_path

RUN_ID = re.compile(r"[0-9a-f]{32}")


class RunLookupError(LookupError):
    """A run or tracking store that cannot be found; the message names it."""

    def __str__(self) -> str:  # LookupError would quote the message
        return str(self.args[0]) if self.args else ""


def open_existing_store(tracking_uri: str) -> MlflowClient:
    """A client on an existing store; never creates an empty one for a mistyped path."""
    db = sqlite_path(tracking_uri)
    if db is not None and not db.is_file():
        raise RunLookupError(
            f"tracking store '{tracking_uri}' does not exist (no file '{db}'): "
            "train first, or pass --tracking-uri"
        )
    try:
        client = MlflowClient(tracking_uri)
        client.search_experiments(max_results=1)
    except Exception as exc:  # noqa: BLE001 - not an MLflow store, or unreachable
        raise RunLookupError(
            f"cannot read tracking store '{tracking_uri}': {_first_line(exc)}"
        ) from None
    return client


def find_run(client: MlflowClient, ref: str, tracking_uri: str):
    """The run with id ``ref``, else the one active run named ``ref`` in any experiment."""
    if RUN_ID.fullmatch(ref):
        try:
            return client.get_run(ref)
        except MlflowException:
            pass  # not an id of this store: maybe a name
    experiments = [
        e.experiment_id for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)
    ]
    if "'" in ref and '"' in ref:
        raise RunLookupError(
            f"no run '{ref}' in {tracking_uri}: a run name cannot hold both quote characters"
        )
    quoted = f'"{ref}"' if "'" in ref else f"'{ref}'"
    runs = (
        client.search_runs(
            experiments, f"attributes.run_name = {quoted}", ViewType.ACTIVE_ONLY, max_results=50
        )
        if experiments
        else []
    )
    if not runs:
        raise RunLookupError(
            f"no run '{ref}' in {tracking_uri}: neither a run id nor a run name there"
        )
    if len(runs) > 1:
        ids = ", ".join(r.info.run_id for r in runs[:5]) + (" ..." if len(runs) > 5 else "")
        raise RunLookupError(
            f"run name '{ref}' matches {len(runs)} runs in {tracking_uri} ({ids}): "
            "pass a run id instead"
        )
    return runs[0]


def fetch_runs(refs: list[str], tracking_uri: str) -> list[RunRecord]:
    """Each run's settings (params), tags (without MLflow's own) and final metric values
    (MLflow's latest value of each metric: the one of the highest step, i.e. the last round)."""
    client = open_existing_store(tracking_uri)
    records = []
    for ref in refs:
        run = find_run(client, ref, tracking_uri)
        records.append(
            RunRecord(
                run_id=run.info.run_id,
                name=run.info.run_name or run.info.run_id,
                params=dict(run.data.params),
                metrics={k: float(v) for k, v in run.data.metrics.items()},
                tags={k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")},
                status=run.info.status,
            )
        )
    return records


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
