"""A registered-model name clash: `tracking.registered_model` names a model in the registry that
fedmtl did not create (another team's). Training refuses before it trains anything, naming the
setting; promotion refuses too; tagging the model as fedmtl's lets training use it."""

from __future__ import annotations

import pytest
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from cli import app
from fedmtl.config import load_config
from fedmtl.data import partition, prepare
from fedmtl.data.manifest import read_manifest
from fedmtl.data.validation import validate_partitions
from tasks.registry import OWNER, OWNER_TAG, RegisteredModelClash
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.slow
NAME = "churn-model"


def test_training_and_promotion_refuse_another_teams_registered_model(prefect_harness, tmp_path):
    from flows.training import federated_training

    overrides = tiny_overrides(tmp_path, **{"tracking.registered_model": NAME})
    cfg = load_config(None, overrides)
    prepare(cfg.data)
    partition(cfg.data)
    validate_partitions(
        cfg.data.partitions_dir,
        read_manifest(cfg.data.partitions_dir),
        cfg.validation,
        cfg.data.validation_dir,
    )
    (tmp_path / "mlflow").mkdir(exist_ok=True)
    client = MlflowClient(cfg.tracking.tracking_uri)
    client.create_registered_model(NAME, description="gradient-boosted churn model (team B)")

    with pytest.raises(RegisteredModelClash) as clash:
        federated_training(cfg.model_dump(mode="json"))
    message = str(clash.value)
    assert f"tracking.registered_model = '{NAME}'" in message and "not created by fedmtl" in message
    assert "team B" in message and f"{OWNER_TAG}={OWNER}" in message
    # refused before training: no run was started, the other model is untouched
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    )
    assert runs == []
    assert client.search_model_versions(f"name = '{NAME}'") == []
    assert client.get_registered_model(NAME).description == "gradient-boosted churn model (team B)"

    # `fedmtl promote` on it: exit 2, the same message
    result = CliRunner().invoke(app, ["promote", *[a for o in overrides for a in ("--set", o)]])
    assert result.exit_code == 2, result.output
    assert "not created by fedmtl" in " ".join(result.output.split())

    # it is fedmtl's after all: tagged, training registers its version there
    client.set_registered_model_tag(NAME, OWNER_TAG, OWNER)
    done = federated_training(cfg.model_dump(mode="json"))
    assert done["model_version"] == "1"
    assert str(client.get_model_version_by_alias(NAME, "challenger").version) == "1"
