"""Crash and resume: a training process killed with SIGKILL in the middle of a round, then
``fedmtl train --resume``, ends bit-identical to a run that was never interrupted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from fedmtl.client.store import ClientStore
from fedmtl.config import load_config
from fedmtl.data import partition, prepare
from fedmtl.data.manifest import read_manifest
from fedmtl.data.validation import validate_partitions
from fedmtl.lifecycle.checkpoint import CheckpointStore
from fedmtl.lifecycle.runs import RunRecord
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.slow

SETTINGS = {"training.rounds": 4, "data.partition.n_clients": 6, "tracking.client_runs": True}


def fedmtl(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=str(root / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    command = [str(Path(sys.executable).parent / "fedmtl"), "train", *args]
    with (
        open(root / "out.log", "w") as out,
        open(root / "err.log", "w") as err,
    ):  # files: no pipe to wait on
        done = subprocess.run(command, cwd=root, env=env, stdout=out, stderr=err, timeout=300)
    return subprocess.CompletedProcess(
        command, done.returncode, (root / "out.log").read_text(), (root / "err.log").read_text()
    )


def run_dirs(root: Path) -> dict[str, tuple[Path, RunRecord]]:
    """MLflow run id -> (run directory, record) for every run under the work directory."""
    found = {}
    for record in (root / ".fedmtl" / "runs").glob("*/run.json"):
        run = RunRecord.load(record.parent)
        found[run.mlflow_run_id] = (record.parent, run)
    return found


@pytest.fixture(scope="module")
def root(prefect_harness, tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    cfg = load_config(None, tiny_overrides(root, **SETTINGS))
    prepare(cfg.data)
    partition(cfg.data)
    validate_partitions(
        cfg.data.partitions_dir,
        read_manifest(cfg.data.partitions_dir),
        cfg.validation,
        cfg.data.validation_dir,
    )
    return root


def test_a_run_killed_mid_round_resumes_to_the_same_model_bit_for_bit(root):
    from flows.training import federated_training

    overrides = tiny_overrides(root, **SETTINGS)
    cfg = load_config(None, overrides)
    reference = federated_training(cfg.model_dump(mode="json"))  # never interrupted

    sets = [arg for o in overrides for arg in ("--set", o)]
    crashed = fedmtl(root, *sets, "--set", "faults.crash_at_round=3")
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    runs = run_dirs(root)
    ((run_dir, record),) = [v for k, v in runs.items() if k != reference["mlflow_run_id"]]
    assert not record.finished and CheckpointStore(run_dir / "checkpoints").rounds() == [1, 2]
    written = list((run_dir / "clients").glob("*/personal-r000003.pt"))
    assert written  # the crash came after round 3's local training had written personal state

    resumed = fedmtl(root, *sets, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    record = RunRecord.load(run_dir)
    assert record.finished and len(run_dirs(root)) == 2  # the same run continued, no new one

    final = CheckpointStore(run_dir / "checkpoints").load(4).state
    (ref_dir, _) = run_dirs(root)[reference["mlflow_run_id"]]
    expected = CheckpointStore(ref_dir / "checkpoints").load(4).state
    assert torch.equal(final.base, expected.base)
    assert final.group_heads.keys() == expected.group_heads.keys()
    for g, heads in expected.group_heads.items():
        assert all(torch.equal(final.group_heads[g][t], v) for t, v in heads.items())
    assert all(torch.equal(final.global_heads[t], v) for t, v in expected.global_heads.items())
    ours, theirs = ClientStore(run_dir / "clients"), ClientStore(ref_dir / "clients")
    assert ours.clients() == theirs.clients() and ours.clients()
    for client in theirs.clients():
        assert torch.equal(ours.load(client).heads["label"], theirs.load(client).heads["label"])

    client = MlflowClient(cfg.tracking.tracking_uri)
    run = client.get_run(record.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.tags["resumed_from_round"] == "2"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "personal/accuracy/mean")]
    assert sorted(set(steps)) == [1, 2, 3, 4]
    want = {
        m.step: m.value
        for m in client.get_metric_history(reference["mlflow_run_id"], "personal/accuracy/mean")
    }
    assert {
        m.step: m.value
        for m in client.get_metric_history(run.info.run_id, "personal/accuracy/mean")
    } == want
    children = client.search_runs(
        [run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'"
    )
    assert len(children) == 6  # the client runs were continued, not created again
    assert run.data.tags.get("model_version")  # the resumed run registered its model


def test_resume_with_nothing_to_resume_says_so(root):
    overrides = tiny_overrides(root, **{**SETTINGS, "training.rounds": 9})
    result = fedmtl(root, *[arg for o in overrides for arg in ("--set", o)], "--resume")
    assert result.returncode == 2
    assert "nothing to resume" in result.stderr or "cannot resume" in result.stderr
