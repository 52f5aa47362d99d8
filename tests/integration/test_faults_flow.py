"""Failing and slow clients in the training flow: Prefect retries with backoff, a timeout that
cuts stragglers off, every failure named, and a round that fails clearly below min_clients."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from fedmtl.config import load_config
from fedmtl.data import partition, prepare
from fedmtl.data.manifest import read_manifest
from fedmtl.data.validation import validate_partitions
from flows import progress
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.slow

FAULTS = {
    "training.rounds": 3,
    "faults.client_failure_rate": 0.4,
    "training.retry_delay": 0.05,
    "faults.straggler_rate": 0.2,
    "faults.straggler_delay": 5.0,
    "training.client_timeout": 0.3,
}


@pytest.fixture(scope="module")
def data(prefect_harness, tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    cfg = load_config(None, tiny_overrides(root))
    prepare(cfg.data)
    partition(cfg.data)
    validate_partitions(
        cfg.data.partitions_dir,
        read_manifest(cfg.data.partitions_dir),
        cfg.validation,
        cfg.data.validation_dir,
    )
    return root


def test_failing_clients_are_retried_stragglers_cut_off_and_every_loss_named(data):
    from flows.training import federated_training

    cfg = load_config(None, tiny_overrides(data, **FAULTS))
    result = federated_training(cfg.model_dump(mode="json"))
    client = MlflowClient(cfg.tracking.tracking_uri)
    run_id = result["mlflow_run_id"]

    def history(key):
        return {m.step: m.value for m in client.get_metric_history(run_id, key)}

    participating, failed, retried = (
        history("clients/participating"),
        history("clients/failed"),
        history("clients/retried"),
    )
    assert sorted(participating) == [1, 2, 3]
    assert all(
        participating[r] + failed[r] == 8 for r in participating
    )  # everyone is accounted for
    assert sum(retried.values()) >= 2  # injected failures came back on a retry
    reports = []  # every round's (client, why): a client may fail in several rounds
    for artifact in client.list_artifacts(run_id, "rounds"):
        reports += json.loads(open(client.download_artifacts(run_id, artifact.path)).read()).items()
    assert len(reports) == sum(failed.values())
    assert any(
        "ClientTimeout" in why and "training.client_timeout = 0.3 s" in why for _, why in reports
    )
    assert all(why.split(":")[0] in ("ClientTimeout", "InjectedFailure") for _, why in reports)
    assert result["personal_accuracy"] > 0.3


def test_a_round_with_too_few_updates_fails_naming_the_clients(data):
    from flows.training import RoundFailed, federated_training

    cfg = load_config(
        None,
        tiny_overrides(
            data,
            **{
                "faults.client_failure_rate": 0.95,
                "training.client_retries": 0,
                "training.min_clients": 8,
            },
        ),
    )
    with pytest.raises(
        RoundFailed,
        match=r"round 1: only \d of 8 clients returned an update .*c00\d: InjectedFailure",
    ):
        federated_training(cfg.model_dump(mode="json"))


def test_client_retries_counts_the_retries_after_the_first_attempt(data):
    """training.client_retries = 2: a client that keeps failing is tried 3 times in all (its
    shard's attempt, then 2 retries), and its report says so."""
    from flows.training import RoundFailed, federated_training

    cfg = load_config(
        None,
        tiny_overrides(
            data,
            **{
                "faults.client_failure_rate": 0.999,
                "training.client_retries": 2,
                "training.retry_delay": 0.01,
                "training.min_clients": 8,
            },
        ),
    )
    with pytest.raises(RoundFailed) as failure:
        federated_training(cfg.model_dump(mode="json"))
    message = str(failure.value)
    assert message.count("(attempt 3;") == 8 and "(attempt 4;" not in message
    assert message.count("tried 2 more times") == 8


class RemoveAfterRound(progress.Silent):
    """A progress listener that deletes one client's partition file when a round ends: the file
    really goes missing in the middle of a run, as a flaky site's would."""

    def __init__(self, path, after: int) -> None:
        self.path, self.after = path, after

    def round_done(self, round_: int, headline: str) -> None:
        if round_ == self.after:
            self.path.unlink()


def test_a_partition_missing_mid_run_sits_out_named_and_the_run_goes_on(prefect_harness, tmp_path):
    """A partition file removed after round 1 (a flaky site, a deleted file): the client is
    named in each later round's report, never retried, left out of the evaluation, and the run
    finishes with the others (main failed the whole run after two retries)."""
    import shutil

    from flows.training import federated_training

    root = tmp_path
    cfg = load_config(
        None, tiny_overrides(root, **{"training.rounds": 3, "tracking.register_model": False})
    )
    prepare(cfg.data)
    partition(cfg.data)
    manifest = read_manifest(cfg.data.partitions_dir)
    validate_partitions(cfg.data.partitions_dir, manifest, cfg.validation, cfg.data.validation_dir)
    gone = manifest.clients[5]
    path = Path(cfg.data.partitions_dir) / gone.file
    keep = root / "kept.parquet"
    shutil.copy(path, keep)
    with progress.reporting(RemoveAfterRound(path, after=1)):
        result = federated_training(cfg.model_dump(mode="json"))
    client = MlflowClient(cfg.tracking.tracking_uri)
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    failed = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "clients/failed")}
    retried = {
        m.step: m.value for m in client.get_metric_history(run.info.run_id, "clients/retried")
    }
    assert failed == {1: 0.0, 2: 1.0, 3: 1.0} and retried == {1: 0.0, 2: 0.0, 3: 0.0}
    for round_ in (2, 3):
        report = json.loads(
            open(
                client.download_artifacts(run.info.run_id, f"rounds/round-{round_:04d}-failed.json")
            ).read()
        )
        assert list(report) == [gone.client]
        assert (
            report[gone.client].startswith("PartitionUnavailable: ")
            and "is missing" in report[gone.client]
        )
        assert (
            "not evaluated" in report[gone.client]
            and f"client '{gone.client}'" in report[gone.client]
        )
    assert result["clients"] == len(manifest.clients)  # trained on, named
    assert keep.read_bytes() != b""  # (raw data untouched; the copy is only for the reader)
