"""Shared fixtures: tiny configurations and a Prefect test harness for integration tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fedmtl import quiet

quiet.configure()
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

REPO = Path(__file__).resolve().parents[1]


def with_settings(cfg, settings: dict[str, object]):
    """``cfg`` (a frozen :class:`fedmtl.config.Config`) with ``section.key`` settings changed,
    validated again as a whole."""
    from fedmtl.config import Config

    tree = cfg.model_dump()
    for key, value in settings.items():
        *path, name = key.split(".")
        node = tree
        for part in path:
            node = node[part]
        node[name] = value
    return Config.model_validate(tree)


def tiny_overrides(root: Path, **extra: object) -> list[str]:
    """Settings for a fast run inside ``root``: digits, 8 clients in 2 permutation groups."""
    values = {
        "data.partition.n_clients": 8,
        "data.partition.n_groups": 2,
        "data.raw_dir": str(root / "data/raw"),
        "data.partitions_dir": str(root / "data/partitions"),
        "data.validation_dir": str(root / "data/validation"),
        "training.rounds": 2,
        "training.local_epochs": 1,
        "training.personal_epochs": 1,
        "training.workdir": str(root / ".fedmtl"),
        "tracking.tracking_uri": f"sqlite:///{root / 'mlflow/mlflow.db'}",
        "tracking.artifact_root": str(root / "mlflow/artifacts"),
        "tracking.metrics_file": str(root / "metrics.json"),
        "tracking.registered_model": "fedmtl-test",
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
