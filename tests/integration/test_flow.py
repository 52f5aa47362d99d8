"""The training flow for real: Prefect's test harness, MLflow in a temp dir, GE quarantine."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

import mlflow
from fedmtl.config import load_config
from fedmtl.data import load_partition, partition, prepare
from fedmtl.data.manifest import read_manifest
from fedmtl.data.validation import validate_partitions
from models.personalized import PersonalizedPredictor
from tests.conftest import tiny_overrides, with_settings

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(prefect_harness, tmp_path_factory):
    from flows.training import federated_training

    root = tmp_path_factory.mktemp("flow")
    cfg = load_config(None, tiny_overrides(root))
    prepare(cfg.data)
    manifest = partition(cfg.data)
    # break one client's partition: a NaN feature must quarantine exactly that client
    broken = manifest.clients[3]
    path = root / "data/partitions" / broken.file
    frame = pd.read_parquet(path)
    frame.loc[frame.index[0], "x10"] = np.nan
    frame.to_parquet(path)
    validate_partitions(
        cfg.data.partitions_dir,
        read_manifest(cfg.data.partitions_dir),
        cfg.validation,
        cfg.data.validation_dir,
    )
    result = federated_training(cfg.model_dump(mode="json"))
    return cfg, manifest, broken.client, result


def test_flow_tracks_rounds_clients_and_provenance(trained):
    cfg, manifest, broken, result = trained
    client = MlflowClient(cfg.tracking.tracking_uri)
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert tags["quarantined_clients"] == broken
    assert tags["data_version"] and tags["git_commit"] and tags["prefect_flow_run_id"]
    assert run.data.params["training.rounds"] == "2"
    history = client.get_metric_history(run.info.run_id, "personal/accuracy/mean")
    assert [m.step for m in history] == [1, 2]
    for step in (
        "dispatch",
        "local_train",
        "group_aggregate",
        "global_merge",
        "evaluate",
        "tracking",
    ):
        assert len(client.get_metric_history(run.info.run_id, f"time/{step}_s")) == 2
    children = client.search_runs(
        [run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'"
    )
    names = {c.data.tags["client"] for c in children}
    assert names == set(manifest.client_ids) - {broken}
    assert all("personal/accuracy" in c.data.metrics for c in children)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"plots/convergence.png", "plots/clients_global_vs_personal.png"} <= artifacts
    metrics = json.loads((cfg.tracking.metrics_file and open(cfg.tracking.metrics_file).read()))
    assert metrics["mlflow_run_id"] == run.info.run_id and metrics["clients"] == 7
    assert 0 <= metrics["personal_accuracy"] <= 1


def test_registered_pyfunc_predicts_like_the_model_in_memory(trained):
    cfg, manifest, broken, result = trained
    mlflow.set_tracking_uri(cfg.tracking.tracking_uri)
    client = MlflowClient(cfg.tracking.tracking_uri)
    version = client.get_model_version_by_alias(cfg.tracking.registered_model, "challenger")
    assert str(version.version) == result["model_version"]
    assert version.tags["data_version"] == result["data_version"]
    loaded = mlflow.pyfunc.load_model(f"models:/{cfg.tracking.registered_model}@challenger")

    rows = []
    for c in manifest.client_ids[:3]:
        part = load_partition(cfg.data.partitions_dir, c)
        test = part[part["split"] == "test"].head(4)
        rows.append(test[manifest.features].astype("float64").assign(client_id=c))
    unknown = rows[0].head(2).assign(client_id="never-seen")
    frame = pd.concat([*rows, unknown], ignore_index=True)[["client_id", *manifest.features]]

    served = loaded.predict(frame)
    expected = PersonalizedPredictor(result["bundle"]).predict(frame)  # the model in memory
    pd.testing.assert_frame_equal(
        served.reset_index(drop=True), expected.reset_index(drop=True), check_dtype=False
    )
    assert set(served.loc[frame["client_id"] == "never-seen", "head"]) == {"global"}
    # personal heads stay on the clients by default: a known client is answered by its group's heads
    assert set(served.loc[frame["client_id"] == manifest.client_ids[0], "head"]) == {"group"}


def test_many_clients_log_a_table_instead_of_child_runs(trained, tmp_path):
    from flows.training import federated_training

    cfg, manifest, broken, _ = trained
    many = with_settings(
        cfg,
        {
            "tracking.max_client_runs": 3,  # 7 usable clients: above the threshold
            "tracking.register_model": False,
            "tracking.metrics_file": str(tmp_path / "metrics.json"),
        },
    )
    result = federated_training(many.model_dump(mode="json"))
    client = MlflowClient(cfg.tracking.tracking_uri)
    run = client.get_run(result["mlflow_run_id"])
    children = client.search_runs(
        [run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'"
    )
    assert children == []
    table = pd.read_csv(
        client.download_artifacts(run.info.run_id, "clients/rounds.csv", str(tmp_path))
    )
    assert sorted(table["round"].unique()) == [1, 2]
    assert set(table["client"]) == set(manifest.client_ids) - {broken}
    assert {"variant", "task", "accuracy", "f1"} <= set(table.columns)
    assert len(table) == 2 * 7 * 3  # rounds x clients x (global, group, personal)
