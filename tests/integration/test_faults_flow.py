"""Failing and slow clients in the training flow: Prefect retries with backoff, a timeout that
cuts stragglers off, every failure named, and a round that fails clearly below min_clients."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient

from fedmtl.config import load_config
from fedmtl.data import partition, prepare
from fedmtl.data.manifest import read_manifest
from fedmtl.validation import validate_partitions
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.slow

FAULTS = {"training.rounds": 3, "faults.client_failure_rate": 0.4, "training.retry_delay": 0.05,
          "faults.straggler_rate": 0.2, "faults.straggler_delay": 5.0, "training.client_timeout": 0.3}


@pytest.fixture(scope="module")
def data(prefect_harness, tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    cfg = load_config(None, tiny_overrides(root))
    prepare(cfg.data)
    partition(cfg.data)
    validate_partitions(cfg.data.partitions_dir, read_manifest(cfg.data.partitions_dir),
                        cfg.validation, cfg.data.validation_dir)
    return root


def test_failing_clients_are_retried_stragglers_cut_off_and_every_loss_named(data):
    from flows.training import federated_training

    cfg = load_config(None, tiny_overrides(data, **FAULTS))
    result = federated_training(cfg.model_dump(mode="json"))
    client = MlflowClient(cfg.tracking.tracking_uri)
    run_id = result["mlflow_run_id"]

    def history(key):
        return {m.step: m.value for m in client.get_metric_history(run_id, key)}

    participating, failed, retried = history("clients/participating"), history("clients/failed"), history("clients/retried")
    assert sorted(participating) == [1, 2, 3]
    assert all(participating[r] + failed[r] == 8 for r in participating)  # everyone is accounted for
    assert sum(retried.values()) >= 2  # injected failures came back on a retry
    reports = []  # every round's (client, why): a client may fail in several rounds
    for artifact in client.list_artifacts(run_id, "rounds"):
        reports += json.loads(open(client.download_artifacts(run_id, artifact.path)).read()).items()
    assert len(reports) == sum(failed.values())
    assert any("ClientTimeout" in why and "training.client_timeout = 0.3 s" in why for _, why in reports)
    assert all(why.split(":")[0] in ("ClientTimeout", "InjectedFailure") for _, why in reports)
    assert result["personal_accuracy"] > 0.3


def test_a_round_with_too_few_updates_fails_naming_the_clients(data):
    from flows.training import RoundFailed, federated_training

    cfg = load_config(None, tiny_overrides(data, **{"faults.client_failure_rate": 0.95, "training.client_retries": 0,
                                                     "training.min_clients": 8}))
    with pytest.raises(RoundFailed, match=r"round 1: only \d of 8 clients returned an update .*c00\d: InjectedFailure"):
        federated_training(cfg.model_dump(mode="json"))


def test_client_retries_counts_the_retries_after_the_first_attempt(data):
    """training.client_retries = 2: a client that keeps failing is tried 3 times in all (its
    shard's attempt, then 2 retries), and its report says so."""
    from flows.training import RoundFailed, federated_training

    cfg = load_config(None, tiny_overrides(data, **{"faults.client_failure_rate": 0.999, "training.client_retries": 2,
                                                     "training.retry_delay": 0.01, "training.min_clients": 8}))
    with pytest.raises(RoundFailed) as failure:
        federated_training(cfg.model_dump(mode="json"))
    message = str(failure.value)
    assert message.count("(attempt 3;") == 8 and "(attempt 4;" not in message
    assert message.count("tried 2 more times") == 8
