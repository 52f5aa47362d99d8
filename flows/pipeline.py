"""The whole pipeline in one flow run: prepare → partition → validate → train.

``dvc repro`` runs the same steps as separate DVC stages (dvc.yaml); this flow is what
``fedmtl run`` uses. Scheduled runs (flows/scheduled.py) reproduce the DVC stages instead, so
that every scheduled run's data is a version DVC records.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from fedmtl.config import Config
from flows.runners import with_runner, worker_environment
from flows.training import federated_training
from tasks.data import partition, prepare, validate


@flow(name="fedmtl-pipeline", log_prints=False)
def pipeline(config: dict[str, Any]) -> dict[str, Any]:
    cfg = Config.model_validate(config)
    prepare(cfg)
    partition(cfg)
    validate(cfg)
    with worker_environment(cfg.runner):
        return with_runner(federated_training, cfg)(cfg.model_dump(mode="json"))
