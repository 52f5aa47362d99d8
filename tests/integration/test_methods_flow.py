"""Every method through the real Prefect flow (test harness) with MLflow tracking; learned
groups logged with their ARI; a two-task model end to end; served models match evaluation."""

from __future__ import annotations

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from fedmtl.algorithms import METHODS
from fedmtl.config import load_config
from fedmtl.data import load_partition, partition, prepare
from fedmtl.data.manifest import read_manifest
from fedmtl.data.validation import validate_partitions
from models.personalized import CLIENT_COLUMN, PersonalizedPredictor
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.slow


def _data(root, **extra):
    cfg = load_config(None, tiny_overrides(root, **extra))
    prepare(cfg.data)
    partition(cfg.data)
    validate_partitions(
        cfg.data.partitions_dir,
        read_manifest(cfg.data.partitions_dir),
        cfg.validation,
        cfg.data.validation_dir,
    )
    return cfg


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("methods")
    _data(root)
    return root


def _train(root, **extra):
    from flows.training import federated_training

    cfg = load_config(None, tiny_overrides(root, **extra))
    return cfg, federated_training(cfg.model_dump(mode="json"))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_runs_through_the_flow(prefect_harness, digits_root, method):
    # GPFL and FedCP learn slowly at first (test_algorithms.py)
    rounds = 4 if method in ("gpfl", "fedcp") else 2
    cfg, result = _train(
        digits_root,
        **{
            "algorithm.method": method,
            "training.rounds": rounds,
            "tracking.register_model": False,
            "tracking.client_runs": False,
        },
    )
    run = MlflowClient(cfg.tracking.tracking_uri).get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.info.run_name.startswith(f"digits-{method}-")
    assert run.data.tags["method"] == method and run.data.params["algorithm.method"] == method
    assert result["rounds"] == rounds and result["personal_accuracy"] > 0.2


def _final_clients(cfg, run_id: str) -> pd.DataFrame:
    path = MlflowClient(cfg.tracking.tracking_uri).download_artifacts(run_id, "clients_final.csv")
    return pd.read_csv(path)


def test_learned_groups_are_logged_per_round_with_their_ari(prefect_harness, digits_root):
    cfg, result = _train(
        digits_root,
        **{
            "grouping.method": "cluster",
            "grouping.warmup_rounds": 2,
            "training.rounds": 3,
            "tracking.register_model": False,
            "tracking.client_runs": False,
        },
    )
    client = MlflowClient(cfg.tracking.tracking_uri)
    ari = client.get_metric_history(result["mlflow_run_id"], "grouping/ari")
    assert [m.step for m in ari] == [1, 2, 3] and ari[-1].value == 1.0
    assert [
        m.value for m in client.get_metric_history(result["mlflow_run_id"], "grouping/n_groups")
    ] == [1, 2, 2]
    table = pd.read_csv(client.download_artifacts(result["mlflow_run_id"], "groups/assignment.csv"))
    assert (
        sorted(table["round"].unique()) == [1, 2, 3] and table.groupby("round").size().eq(8).all()
    )
    assert result["grouping_ari"] == 1.0


@pytest.mark.parametrize("method", ["ditto", "lg-fedavg"])
def test_served_model_with_personal_bases_matches_the_evaluation(
    prefect_harness, digits_root, method
):
    cfg, result = _train(
        digits_root,
        **{
            "algorithm.method": method,
            "tracking.client_runs": False,
            "tracking.registered_model": f"fedmtl-test-{method}",
            "tracking.bundle_personal_heads": True,
        },
    )  # opt in: serve them
    final = _final_clients(cfg, result["mlflow_run_id"])
    predictor = PersonalizedPredictor(result["bundle"])
    manifest = read_manifest(cfg.data.partitions_dir)
    for c in manifest.client_ids[:3]:
        part = load_partition(cfg.data.partitions_dir, c)
        test = part[part["split"] == "test"]
        frame = test[manifest.features].astype("float64").assign(**{CLIENT_COLUMN: c})
        served = predictor.predict(frame)
        assert set(served["head"]) == {"personal"}
        accuracy = float((served["label"].to_numpy() == test["label"].to_numpy()).mean())
        expected = final[(final["client"] == c) & (final["variant"] == "personal")][
            "accuracy"
        ].item()
        assert accuracy == pytest.approx(expected, abs=1e-9)


def test_two_tasks_train_together_with_metrics_per_task(prefect_harness, tmp_path):
    extra = {
        "data.source": "synthetic",
        "data.synthetic.n_clients": 6,
        "data.synthetic.n_tasks": 2,
        "training.rounds": 2,
        "tracking.client_runs": False,
        "tracking.registered_model": "fedmtl-test-mt",
    }
    _data(tmp_path, **extra)
    cfg, result = _train(tmp_path, **extra)
    client = MlflowClient(cfg.tracking.tracking_uri)
    metrics = client.get_run(result["mlflow_run_id"]).data.metrics
    for task_prefix in ("", "label_1/"):
        for variant in ("global", "group", "personal"):
            assert 0 <= metrics[f"{task_prefix}{variant}/accuracy/mean"] <= 1
    manifest = read_manifest(cfg.data.partitions_dir)
    assert [t.name for t in manifest.tasks] == ["label", "label_1"]
    part = load_partition(cfg.data.partitions_dir, manifest.client_ids[0])
    frame = (
        part[manifest.features].astype("float64").assign(**{CLIENT_COLUMN: manifest.client_ids[0]})
    )
    served = PersonalizedPredictor(result["bundle"]).predict(frame)
    assert set(served["label_1"].unique()) <= {0, 1} and served["label"].notna().all()
