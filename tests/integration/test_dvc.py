"""DVC for real: the pipeline in a temporary git repository, reproduced and re-versioned."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from fedmtl.config import load_config
from tests.conftest import REPO

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def sh(cwd: Path, *args: str) -> str:
    env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def partitions_hash(repo: Path) -> str:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return lock["stages"]["partition"]["outs"][0]["md5"]


def fails(cwd: Path, *args: str) -> tuple[int, str]:
    env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0, f"{' '.join(args)} succeeded:\n{done.stdout}\n{done.stderr}"
    return done.returncode, done.stdout + done.stderr


def outputs(repo: Path) -> dict[str, bytes]:
    """Every output of the pipeline and dvc.lock, as bytes."""
    files = [
        p for p in sorted((repo / "data").rglob("*")) if p.is_file() and "data_docs" not in p.parts
    ]
    files += [p for p in (repo / "metrics.json", repo / "dvc.lock") if p.exists()]
    return {str(p.relative_to(repo)): p.read_bytes() for p in files}


def stale_stages(repo: Path) -> list[str]:
    """The stages `dvc status` lists (it prints each as an unindented ``name:`` line)."""
    status = sh(repo, "dvc", "status")
    return [ln[:-1] for ln in status.splitlines() if ln.endswith(":") and not ln[:1].isspace()]


def test_repro_versions_data_and_mlflow_records_it(tmp_path):
    repo = tmp_path / "project"
    repo.mkdir()
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(REPO / name, repo / name)
    for package in ("fedmtl", "models", "tasks", "flows"):  # the train stage's code deps
        shutil.copytree(
            REPO / package, repo / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["partition"].update(n_clients=6, n_groups=2)
    params["training"].update(rounds=1, local_epochs=1, personal_epochs=1)
    params["tracking"]["client_runs"] = False
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(repo, "git", "init", "-q")
    sh(
        repo,
        "git",
        "-c",
        "user.email=t@t",
        "-c",
        "user.name=t",
        "commit",
        "-q",
        "--allow-empty",
        "-m",
        "init",
    )
    sh(repo, "dvc", "init", "-q")
    sh(repo, "dvc", "remote", "add", "-d", "local", str(tmp_path / "remote"))

    sh(repo, "dvc", "repro", "--quiet")
    first = partitions_hash(repo)
    metrics = json.loads((repo / "metrics.json").read_text())
    assert metrics["data_version"] == first
    cfg = load_config(repo / "params.yaml")
    uri = f"sqlite:///{repo / 'mlflow/mlflow.db'}"
    run = MlflowClient(uri).get_run(metrics["mlflow_run_id"])
    assert run.data.tags["data_version"] == first
    assert run.data.tags["data_version_source"] == "dvc.lock"
    assert len(run.data.tags["git_commit"]) == 40
    sh(repo, "dvc", "push", "--quiet")
    assert any((tmp_path / "remote").rglob("*")), "dvc push wrote nothing to the local remote"

    # nothing changed: nothing re-runs
    assert "Running stage" not in sh(repo, "dvc", "repro")

    # a bad setting in params.yaml, through `dvc repro` and through `make run` (whose first step
    # is `fedmtl check`): refused with the setting named, every output and dvc.lock kept as they
    # were (the outputs are `persist: true`: DVC does not delete them before the command runs)
    recipe = (REPO / "Makefile").read_text().split("\nrun:", 1)[1].split("\n\n", 1)[0]
    assert "fedmtl check" in recipe and recipe.index("fedmtl check") < recipe.index("dvc repro")
    good = (repo / "params.yaml").read_text()
    before = outputs(repo)
    assert "data/validation/report.json" in before and any(p.endswith(".parquet") for p in before)
    for section, key, value, named in (
        ("training", None, None, "training.rouns"),
        ("data", "partition", "twelve", "data.partition.n_clients"),
    ):
        bad = yaml.safe_load(good)
        if key is None:
            bad[section]["rouns"] = bad[section].pop("rounds")
        else:
            bad[section][key]["n_clients"] = value
        (repo / "params.yaml").write_text(yaml.safe_dump(bad, sort_keys=False))
        code, said = fails(repo, "fedmtl", "check")
        assert code == 2 and named in said, said
        _, said = fails(repo, "dvc", "repro")
        assert named in said, said
        assert outputs(repo) == before, f"a bad {named} changed or removed outputs"
    (repo / "params.yaml").write_text(good)
    assert stale_stages(repo) == []

    # `fedmtl run` (the whole pipeline in one flow) validates the same partitions again: the
    # report DVC tracks is the same bytes (the Data Docs beside it are not tracked), so only the
    # train stage, whose metrics.json the run rewrote, is out of date; once `dvc repro` has
    # trained, a second `dvc repro` runs nothing
    sh(repo, "fedmtl", "run")
    assert stale_stages(repo) == ["train"]
    ran = sh(repo, "dvc", "repro")
    assert "Running stage 'train'" in ran and "Running stage 'validate'" not in ran, ran
    trained = json.loads((repo / "metrics.json").read_text())["mlflow_run_id"]
    assert "Running stage" not in sh(repo, "dvc", "repro")
    assert stale_stages(repo) == []
    assert json.loads((repo / "metrics.json").read_text())["mlflow_run_id"] == trained
    metrics = json.loads((repo / "metrics.json").read_text())

    # change a data parameter: new partitions, new hash, and the new MLflow run records it
    params["data"]["seed"] = 1
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(repo, "dvc", "repro", "--quiet")
    second = partitions_hash(repo)
    assert second != first
    metrics2 = json.loads((repo / "metrics.json").read_text())
    assert metrics2["mlflow_run_id"] != metrics["mlflow_run_id"]
    assert MlflowClient(uri).get_run(metrics2["mlflow_run_id"]).data.tags["data_version"] == second
    assert cfg.data.partitions_dir == "data/partitions"


def test_push_without_a_remote_or_to_a_broken_one_says_which_and_changes_nothing(tmp_path):
    """A missing DVC remote: with none configured, `push` says so and pushes nothing (the
    scheduled flow warns and trains on); with a default remote whose URL cannot be written, it
    fails naming the remote and the way to go on without pushing; the data and dvc.lock stay
    as they were."""
    from fedmtl.lifecycle.datarefresh import DataRefreshError, push, remote

    repo = tmp_path / "project"
    repo.mkdir()
    sh(repo, "git", "init", "-q")
    sh(repo, "dvc", "init", "-q")
    (repo / "data.txt").write_text("rows\n")
    (repo / "dvc.yaml").write_text(
        "stages:\n  copy:\n    cmd: cp data.txt out.txt\n    deps: [data.txt]\n"
        "    outs: [out.txt]\n"
    )
    sh(repo, "dvc", "repro", "--quiet")
    before = {p: (repo / p).read_bytes() for p in ("data.txt", "out.txt", "dvc.lock")}

    assert remote(repo) is None and push(repo) is None  # no remote: nothing to push to

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the remote's folder should be")
    sh(repo, "dvc", "remote", "add", "-d", "shared", str(blocker / "remote"))
    assert remote(repo) == "shared"
    with pytest.raises(DataRefreshError) as failed:
        push(repo)
    message = str(failed.value)
    assert "`dvc push` to remote 'shared' failed" in message and str(repo) in message
    assert "schedule.push_data=false" in message
    assert {p: (repo / p).read_bytes() for p in before} == before
    assert blocker.read_text() == "a file where the remote's folder should be"
