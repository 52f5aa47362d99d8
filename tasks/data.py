"""The data pipeline's steps as Prefect tasks: prepare → partition → validate."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from fedmtl.config import Config
from fedmtl.data import partitions
from fedmtl.data.manifest import read_manifest
from fedmtl.data.validation import validate_partitions


@task(name="prepare", cache_policy=NO_CACHE)
def prepare(cfg: Config) -> str:
    """Load the configured source and write the prepared raw data (the user's file is only read)."""
    return str(partitions.prepare(cfg.data))


@task(name="partition", cache_policy=NO_CACHE)
def partition(cfg: Config) -> int:
    """Split the prepared data into one file per client, each with a train and a test split."""
    return len(partitions.partition(cfg.data).clients)


@task(name="validate", cache_policy=NO_CACHE)
def validate(cfg: Config) -> dict[str, list[str]]:
    """Great Expectations suite per partition; returns the quarantined clients and reasons."""
    manifest = read_manifest(cfg.data.partitions_dir)
    report = validate_partitions(
        cfg.data.partitions_dir, manifest, cfg.validation, cfg.data.validation_dir
    )
    return report.quarantined
