"""Privacy in the training flow: DP-FedAvg with its accountant, SecAgg+, no per-client output."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from fedmtl.config import load_config
from fedmtl.data import partition, prepare
from fedmtl.data.manifest import read_manifest
from fedmtl.data.validation import validate_partitions
from fedmtl.privacy.accounting import epsilon_after
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.slow

PRIVATE = {
    "data.partition.n_clients": 12,
    "training.rounds": 3,
    "training.clients_per_round": 0.5,
    "privacy.dp_fedavg.enabled": True,
    "privacy.secure_sum.enabled": True,
    "privacy.dp_fedavg.adaptive_clip": True,
    "privacy.dp_fedavg.noise_multiplier": 0.5,
    "privacy.dp_fedavg.clip_norm": 0.5,
    "privacy.secure_sum.dropout": 0.2,
    "privacy.min_group_size": 2,
}


@pytest.fixture(scope="module")
def data(prefect_harness, tmp_path_factory):
    root = tmp_path_factory.mktemp("privacy")
    cfg = load_config(None, tiny_overrides(root, **PRIVATE))
    prepare(cfg.data)
    partition(cfg.data)
    validate_partitions(
        cfg.data.partitions_dir,
        read_manifest(cfg.data.partitions_dir),
        cfg.validation,
        cfg.data.validation_dir,
    )
    return root


@pytest.fixture(scope="module")
def trained(data):
    from flows.training import federated_training

    cfg = load_config(None, tiny_overrides(data, **PRIVATE))
    return cfg, federated_training(cfg.model_dump(mode="json"))


def test_dp_run_logs_epsilon_every_round_and_tags_the_run_and_model(trained):
    cfg, result = trained
    client = MlflowClient(cfg.tracking.tracking_uri)
    run = client.get_run(result["mlflow_run_id"])
    assert run.data.tags["privacy"] == "dp-fedavg+secagg"
    eps = [
        m.value
        for m in sorted(
            client.get_metric_history(run.info.run_id, "privacy/epsilon"), key=lambda m: m.step
        )
    ]
    assert (
        len(eps) == 4 and eps[0] < eps[1] < eps[2] < eps[3]
    )  # 3 rounds, then the evaluation's release
    assert eps[2] == pytest.approx(
        epsilon_after(3, 0.5, "poisson", sample_rate=0.5, delta=cfg.privacy.dp_fedavg.delta)
    )
    want = epsilon_after(
        3,
        0.5,
        "poisson",
        sample_rate=0.5,
        delta=cfg.privacy.dp_fedavg.delta,
        extra_releases=(cfg.privacy.evaluation.noise_multiplier,),
    )
    assert float(run.data.tags["privacy_epsilon"]) == pytest.approx(want, rel=1e-4)
    assert eps[-1] == pytest.approx(want, rel=1e-4)
    version = client.get_model_version(cfg.tracking.registered_model, result["model_version"])
    assert version.tags["privacy"] == "dp-fedavg+secagg"
    assert float(version.tags["privacy_epsilon"]) == pytest.approx(want, rel=1e-4)
    clips = client.get_metric_history(run.info.run_id, "privacy/clip")
    assert len({round(m.value, 9) for m in clips}) > 1  # adaptive clipping moved C
    assert (
        "privacy_epsilon_void" not in run.data.tags and "privacy_epsilon_void" not in version.tags
    )


def test_dp_releases_no_count_that_depends_on_who_was_sampled(trained):
    """Who takes part in a round is secret under DP (the amplification by sampling counts on
    it): no participant, failure, release or drop-out count is logged, nor which clients failed."""
    cfg, result = trained
    client = MlflowClient(cfg.tracking.tracking_uri)
    run = client.get_run(result["mlflow_run_id"])
    for name in (
        "clients/participating",
        "clients/failed",
        "clients/retried",
        "clients/refused",
        "privacy/released_clients",
        "privacy/held_back",
        "privacy/dropped_mid_protocol",
        "evaluation/clients",
        "train/loss/mean",
    ):
        assert name not in run.data.metrics, name
    assert not [a for a in client.list_artifacts(run.info.run_id) if a.path == "rounds"]


def test_the_runs_secret_key_stays_in_its_directory_with_mode_0600_and_is_never_logged(trained):
    import os
    import stat
    from pathlib import Path

    from fedmtl.privacy.randomness import KEY_FILE

    cfg, result = trained
    keys = list(Path(cfg.training.workdir).glob(f"runs/*/{KEY_FILE}"))
    assert len(keys) == 1 and stat.S_IMODE(os.stat(keys[0]).st_mode) == 0o600
    secret = keys[0].read_bytes()
    client = MlflowClient(cfg.tracking.tracking_uri)
    run = client.get_run(result["mlflow_run_id"])
    logged = [*run.data.params.values(), *run.data.tags.values()]
    for form in (
        secret.hex(),
        str(int.from_bytes(secret, "big")),
        str(int.from_bytes(secret, "little")),
    ):
        assert not any(form in value for value in logged)


def test_privacy_on_keeps_per_client_metrics_out_of_mlflow(trained):
    cfg, result = trained
    client = MlflowClient(cfg.tracking.tracking_uri)
    run = client.get_run(result["mlflow_run_id"])
    children = client.search_runs(
        [run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'"
    )
    assert children == []
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    names |= {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert "clients_final.csv" not in names and "plots/personalisation_gain.png" not in names
    assert "plots/convergence.png" in names


def test_privacy_on_evaluates_from_the_securely_summed_statistics(trained):
    cfg, result = trained
    client = MlflowClient(cfg.tracking.tracking_uri)
    metrics = client.get_run(result["mlflow_run_id"]).data.metrics
    assert not any(k.endswith(("/mean", "/weighted_mean", "/worst10")) for k in metrics)
    for variant in ("global", "group", "personal"):  # under DP: the final model's, released once
        history = client.get_metric_history(result["mlflow_run_id"], f"{variant}/accuracy/pooled")
        assert [m.step for m in history] == [3] and all(0 <= m.value <= 1 for m in history)
    assert result["personal_accuracy"] == metrics["personal/accuracy/pooled"]
    assert (
        result["evaluation"] == "pooled through a secure sum"
        and "personal_accuracy_worst10" not in result
    )


def test_a_seeded_noise_run_is_tagged_epsilon_void_on_the_run_and_its_model_version(data):
    from flows.training import federated_training

    cfg = load_config(
        None,
        tiny_overrides(
            data,
            **{
                **PRIVATE,
                "privacy.insecure_seeded_noise": True,
                "privacy.secure_sum.enabled": False,
                "training.rounds": 1,
                "tracking.experiment": "seeded",
            },
        ),
    )
    result = federated_training(cfg.model_dump(mode="json"))
    client = MlflowClient(cfg.tracking.tracking_uri)
    assert client.get_run(result["mlflow_run_id"]).data.tags["privacy_epsilon_void"] == "true"
    version = client.get_model_version(cfg.tracking.registered_model, result["model_version"])
    assert version.tags["privacy_epsilon_void"] == "true"


def test_secure_aggregation_refuses_clustering_the_clients_own_updates(data):
    from flows.training import PrivacyPlanError, federated_training

    cfg = load_config(
        None,
        tiny_overrides(
            data, **{**PRIVATE, "privacy.dp_fedavg.enabled": False, "grouping.method": "cluster"}
        ),
    )
    with pytest.raises(PrivacyPlanError, match="grouping.method=cluster"):
        federated_training(cfg.model_dump(mode="json"))


def test_a_plan_over_the_target_epsilon_refuses_to_start_with_the_numbers(data):
    from flows.training import PrivacyPlanError, federated_training

    cfg = load_config(
        None,
        tiny_overrides(
            data,
            **PRIVATE,
            **{"privacy.dp_fedavg.target_epsilon": 0.5, "tracking.experiment": "refused"},
        ),
    )
    with pytest.raises(
        PrivacyPlanError, match=r"privacy.dp_fedavg.target_epsilon=0.5 .* allows \d+ rounds"
    ):
        federated_training(cfg.model_dump(mode="json"))
    assert MlflowClient(cfg.tracking.tracking_uri).get_experiment_by_name("refused") is None


def test_dp_refuses_groups_a_client_picks_from_its_own_data(data):
    from flows.training import PrivacyPlanError, federated_training

    cfg = load_config(None, tiny_overrides(data, **PRIVATE, **{"algorithm.method": "ifca"}))
    with pytest.raises(PrivacyPlanError, match="grouping.method=column"):
        federated_training(cfg.model_dump(mode="json"))


def test_dp_sgd_run_logs_each_clients_epsilon_every_round_and_tags_run_and_model(data):
    """Sample-level DP-SGD (Opacus) in the flow: the largest and mean client ε every round, the
    largest tagged on the run and on the model version; no per-client figures."""
    from flows.training import federated_training

    settings = {
        "data.partition.n_clients": 12,
        "privacy.dp_sgd.enabled": True,
        "privacy.dp_sgd.noise_multiplier": 1.0,
        "training.batch_size": 32,
        "tracking.experiment": "dp-sgd",
    }
    cfg = load_config(None, tiny_overrides(data, **settings))
    result = federated_training(cfg.model_dump(mode="json"))
    client = MlflowClient(cfg.tracking.tracking_uri)
    run = client.get_run(result["mlflow_run_id"])
    assert (
        run.data.tags["privacy"] == "dp-sgd"
        and run.data.tags["privacy_dp_sgd_noise_multiplier"] == "1"
    )
    history = {
        name: [
            m.value
            for m in sorted(client.get_metric_history(run.info.run_id, name), key=lambda m: m.step)
        ]
        for name in (
            "privacy/dp_sgd_epsilon_max",
            "privacy/dp_sgd_epsilon_mean",
            "privacy/dp_sgd_sat_out",
        )
    }
    eps = history["privacy/dp_sgd_epsilon_max"]
    assert len(eps) == 2 and 0 < eps[0] < eps[1]
    assert all(m <= e for m, e in zip(history["privacy/dp_sgd_epsilon_mean"], eps))
    assert history["privacy/dp_sgd_sat_out"] == [0.0, 0.0]
    assert float(run.data.tags["privacy_dp_sgd_epsilon_max"]) == pytest.approx(eps[-1], rel=1e-5)
    assert run.data.tags["privacy_dp_sgd_delta"] == "1e-05"
    version = client.get_model_version(cfg.tracking.registered_model, result["model_version"])
    assert version.tags["privacy"] == "dp-sgd"
    assert float(version.tags["privacy_dp_sgd_epsilon_max"]) == pytest.approx(eps[-1], rel=1e-5)
    assert (
        "personal/accuracy/pooled" in run.data.metrics
        and "personal/accuracy/mean" not in run.data.metrics
    )
