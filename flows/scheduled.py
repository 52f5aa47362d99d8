"""Scheduled recurring training: one flow run brings the data to its latest DVC version and
continues training from the registry's champion.

``fedmtl-scheduled`` is what the deployments run (``fedmtl schedule``, flows/deploy.py, or
``prefect deploy`` with prefect.yaml). It runs in the DVC project's root directory (the
deployment's working directory) and

1. with ``schedule.refresh_data``: reproduces the data stages prepare → partition → validate
   (prepare always; the others when the prepared data changed), so dvc.lock records the new
   partitions' md5, the run's ``data_version``; with ``schedule.push_data``, ``dvc push``es it
   to the default remote (skipped, with a warning, when the project has none);
2. runs ``fedmtl-train`` as a subflow with ``training.warm_start = schedule.warm_start``
   (default ``champion``: the champion's base, global and group heads and round count, and its
   personal heads if it bundles them (``tracking.bundle_personal_heads``), when the alias exists;
   the champion is loaded only once its artifacts matched the hashes recorded at registration);
3. with ``schedule.promote``: judges the new version with the promotion gates (the
   ``fedmtl-promote`` flow, as a subflow): it becomes the champion if it passes them, else the
   reasons are written on its tags and the champion stays; a rejection is an outcome, not a
   failure of the run;
4. returns the training summary with the promotion's decision.

Any failing step (a DVC stage, the push, a champion that does not fit the data, training)
fails the flow run with that step's error, which names the stage, file, setting or version.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, runtime

from fedmtl.config import Config, load_config, validate_config
from flows.promote import promote
from flows.runners import with_runner, worker_environment
from flows.training import federated_training
from tasks.versioning import push_data, refresh_data

#: the summary keys a scheduled run returns (the training flow's, minus tensors and history)
SUMMARY_DROP = ("bundle", "history")


@flow(name="fedmtl-scheduled", log_prints=False)
def scheduled_training(config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Refresh the DVC data, then train from the champion. ``config``: a ``Config`` as a dict
    (what ``fedmtl schedule`` stores on the deployment); None: the working directory's
    ``params.yaml`` as it is at run time (what prefect.yaml's deployment uses)."""
    cfg = load_config("params.yaml") if config is None else validate_config(config)
    logger = get_run_logger()
    refreshed: dict[str, Any] = {}
    if cfg.refreshes_data:
        refreshed = refresh_data(cfg)
        if cfg.schedule.push_data:
            push_data()
    elif cfg.federation.mode == "sites":
        logger.info("federation.mode is sites: each site validates its own data")
    else:
        logger.info("schedule.refresh_data is false: training on the data as it is")
    with worker_environment(cfg.runner):
        result = with_runner(federated_training, cfg)(training_config(cfg))
    summary = {k: v for k, v in result.items() if k not in SUMMARY_DROP}
    if cfg.schedule.promote and result.get("model_version"):
        decision = promote(
            cfg.model_dump(mode="json"),
            challenger=str(result["model_version"]),
            actor=f"schedule:{runtime.deployment.name or cfg.schedule.deployment}",
        )
        summary["promoted"] = decision["promote"]
        summary["promotion_reasons"] = decision["reasons"]
        logger.info(
            "version %s %s",
            result["model_version"],
            "promoted to champion"
            if decision["promote"]
            else "rejected: " + "; ".join(decision["reasons"]),
        )
    if refreshed:
        summary["data_changed"] = bool(refreshed.get("changed"))
        summary["previous_data_version"] = refreshed.get("previous")
    return summary


def training_config(cfg: Config) -> dict[str, Any]:
    """The training flow's settings: ``training.warm_start`` from ``schedule.warm_start``."""
    tree = cfg.model_dump(mode="json")
    tree["training"]["warm_start"] = cfg.schedule.warm_start
    return validate_config(tree).model_dump(mode="json")
