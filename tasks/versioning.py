"""The data-version steps of a scheduled run as Prefect tasks (thin wrappers over
:mod:`fedmtl.lifecycle.datarefresh`)."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from fedmtl.config import Config
from fedmtl.lifecycle import datarefresh
from fedmtl.lifecycle.provenance import data_version, dvc_lock_hash


@task(name="refresh-data", cache_policy=NO_CACHE)
def refresh_data(cfg: Config) -> dict[str, str | bool | None]:
    """Reproduce the DVC data stages of the project in the working directory (where the
    settings' relative paths and dvc.lock's are rooted); returns the data version before and
    after."""
    logger = get_run_logger()
    project = datarefresh.require_project(Path.cwd())
    datarefresh.check_params(cfg, project)
    partitions = Path(cfg.data.partitions_dir)
    lock = Path("dvc.lock")
    before = dvc_lock_hash(partitions, lock) if partitions.exists() else None
    datarefresh.reproduce(project)
    after = data_version(partitions, lock)
    if after["data_version_source"] != "dvc.lock":
        raise datarefresh.DataRefreshError(
            f"after `dvc repro`, '{lock}' records no version of '{cfg.data.partitions_dir}': "
            "is it the "
            "partition stage's output in dvc.yaml (data.partitions_dir)?"
        )
    changed = after["data_version"] != before
    logger.info("data version %s (%s)", after["data_version"], "new" if changed else "unchanged")
    return {"data_version": after["data_version"], "previous": before, "changed": changed}


@task(name="push-data", cache_policy=NO_CACHE)
def push_data() -> str | None:
    """``dvc push`` the data version to the project's default remote; None when it has none."""
    name = datarefresh.push(Path.cwd())
    logger = get_run_logger()
    if name is None:
        logger.warning("no default DVC remote in '%s': the data version was not pushed", Path.cwd())
    else:
        logger.info("pushed the data version to DVC remote '%s'", name)
    return name
