"""Concurrency, for real: separate `fedmtl` processes on one MLflow SQLite store.

- two `fedmtl train` runs started together on a new store (same tracking URI, same workdir):
  both finish, with complete metric histories, two loadable registered versions, the newest
  one `challenger`, and an intact database;
- two `fedmtl promote` runs at once: exactly one champion, both decisions recorded, and the
  one that wrote second was judged again against the champion the first had just installed
  (and says so);
- two `dvc repro` of one stage at once in one repository: the second fails at once with
  DVC's message naming the process that holds the stage, and dvc.lock stays intact.

The two promotions are made to overlap where it matters: the test holds the model's registry
lock until both processes have read the (absent) champion, scored and decided, and are
waiting to write; then it lets them go. Without that they would overlap only when their
timing happens to, and the race would be tested by chance.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

import mlflow
from fedmtl.config import load_config
from fedmtl.data import load_partition, partition, prepare
from fedmtl.data.manifest import read_manifest
from fedmtl.data.validation import validate_partitions
from tasks.promotion import Registry
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
MODEL = "fedmtl-concurrency-test"
ROUNDS = 3
PERMISSIVE = (
    "promotion.min_gain=-1",
    "promotion.max_client_regression=1",
    "promotion.worst_fraction=1",
)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Partitions of the tests' 8-client set-up; no MLflow store yet (the trainings create it)."""
    root = tmp_path_factory.mktemp("concurrency")
    overrides = tiny_overrides(
        root,
        **{
            "tracking.registered_model": MODEL,
            "training.rounds": ROUNDS,
            # opt in: the test compares the two runs' personal heads
            "tracking.bundle_personal_heads": True,
        },
    )
    cfg = load_config(None, overrides)
    prepare(cfg.data)
    partition(cfg.data)
    validate_partitions(
        cfg.data.partitions_dir,
        read_manifest(cfg.data.partitions_dir),
        cfg.validation,
        cfg.data.validation_dir,
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_URL")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return SimpleNamespace(
        root=root,
        cfg=cfg,
        overrides=overrides,
        env=env,
        uri=cfg.tracking.tracking_uri,
        client=MlflowClient(cfg.tracking.tracking_uri),
    )


def start(s, name: str, lane: int, *args: str, sets: tuple[str, ...] = ()) -> SimpleNamespace:
    """`fedmtl ARGS --set …` in its own process (cwd: the temp root, so no params.yaml is read),
    its output in ``<name>.log``, with no Prefect API configured: it starts its own ephemeral
    one. Each ``lane`` has its own PREFECT_HOME: Prefect creates its database there on first
    use, and two servers doing that at once on one new PREFECT_HOME can fail ('table work_queue
    already exists'), a race of Prefect's, not of the MLflow store under test."""
    log = s.root / f"{name}.log"
    options = [a for o in (*s.overrides, *sets) for a in ("--set", o)]
    env = {**s.env, "PREFECT_HOME": str(s.root / f"prefect-{lane}")}
    with log.open("w") as out:
        process = subprocess.Popen(
            [str(BIN / "fedmtl"), *args, *options],
            cwd=s.root,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return SimpleNamespace(process=process, log=log, name=name)


def finish(job: SimpleNamespace, timeout: float = 240) -> tuple[int, str]:
    try:
        code = job.process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        job.process.kill()
        job.process.wait()
        code = None
    return code, job.log.read_text()


@pytest.fixture(scope="module")
def trainings(store):
    s = store
    jobs = [
        start(
            s,
            f"train-{seed}",
            seed,
            "train",
            sets=(
                f"training.seed={seed}",
                f"tracking.metrics_file={s.root / f'metrics-{seed}.json'}",
            ),
        )
        for seed in (1, 2)
    ]
    done = [finish(job) for job in jobs]
    for (code, output), job in zip(done, jobs):
        assert code == 0, f"{job.name} exited {code}:\n{output}"
    return [json.loads((s.root / f"metrics-{seed}.json").read_text()) for seed in (1, 2)]


def test_two_trainings_at_once_on_one_new_store(store, trainings):
    s, client = store, store.client
    runs = [client.get_run(t["mlflow_run_id"]) for t in trainings]
    assert len({r.info.run_id for r in runs}) == 2
    assert {r.data.params["training.seed"] for r in runs} == {"1", "2"}
    for run in runs:
        assert run.info.status == "FINISHED"
        per_round = [
            k for k in run.data.metrics if k.startswith(("personal/", "global/", "group/", "time/"))
        ]
        assert len(per_round) > 20
        for key in per_round:  # every round's value of every per-round metric, all finite
            history = client.get_metric_history(run.info.run_id, key)
            assert sorted(m.step for m in history) == list(range(1, ROUNDS + 1)), key
            assert all(math.isfinite(m.value) for m in history), key
        children = client.search_runs(
            [run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'"
        )
        assert len(children) == 8 and {c.info.status for c in children} == {"FINISHED"}
        for child in children:
            history = client.get_metric_history(child.info.run_id, "personal/accuracy")
            assert sorted(m.step for m in history) == list(range(1, ROUNDS + 1))
    # both registered; each version loads and is the model of its own run
    versions = {t["model_version"] for t in trainings}
    assert versions == {"1", "2"}
    mlflow.set_tracking_uri(s.uri)
    manifest = read_manifest(s.cfg.data.partitions_dir)
    part = load_partition(s.cfg.data.partitions_dir, manifest.client_ids[0])
    rows = (
        part[part["split"] == "test"]
        .head(4)[manifest.features]
        .assign(client_id=manifest.client_ids[0])
    )
    bundles = []
    for t in trainings:
        mv = client.get_model_version(MODEL, t["model_version"])
        assert mv.run_id == t["mlflow_run_id"] and mv.status == "READY"
        model = mlflow.pyfunc.load_model(f"models:/{MODEL}/{mv.version}")
        answer = model.predict(rows[["client_id", *manifest.features]])
        assert len(answer) == 4 and set(answer["head"]) == {"personal"}
        bundles.append(model.unwrap_python_model().predictor.bundle)
        assert bundles[-1].round == ROUNDS
    # same workdir, different seeds: neither run's state (base, personal heads) is the other's
    assert not torch.equal(bundles[0].base, bundles[1].base)
    first_client = manifest.client_ids[0]
    assert any(
        not torch.equal(a, b)
        for a, b in zip(
            bundles[0].personal_heads[first_client].values(),
            bundles[1].personal_heads[first_client].values(),
        )
    )
    # the newer version is the challenger, whichever run claimed the alias last
    assert str(client.get_model_version_by_alias(MODEL, "challenger").version) == "2"
    # one experiment, not two of the same name; the store is intact
    assert len([e for e in client.search_experiments() if e.name == s.cfg.tracking.experiment]) == 1
    database = s.uri[len("sqlite:///") :]
    with sqlite3.connect(database) as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert db.execute("SELECT count(*) FROM runs WHERE status != 'FINISHED'").fetchone() == (0,)
    for seed in (1, 2):
        assert "database is locked" not in (s.root / f"train-{seed}.log").read_text()


def test_two_promotions_at_once_leave_one_champion_and_record_both(store, trainings):
    s, client = store, store.client
    assert {t["model_version"] for t in trainings} == {"1", "2"}
    registry = Registry(s.uri, MODEL)
    with registry.lock():  # both decide against "no champion", then wait to write
        jobs = [
            start(
                s,
                f"promote-v{v}",
                lane,
                "promote",
                "--challenger",
                v,
                "--actor",
                who,
                sets=PERMISSIVE,
            )
            for lane, v, who in ((1, "1", "alice"), (2, "2", "bob"))
        ]
        deadline = time.monotonic() + 180
        while not all("waiting for another promotion" in job.log.read_text() for job in jobs):
            for job in jobs:
                assert job.process.poll() is None, f"{job.name} ended early:\n{job.log.read_text()}"
            assert time.monotonic() < deadline, "\n\n".join(j.log.read_text() for j in jobs)
            time.sleep(0.2)
    done = {job.name: finish(job) for job in jobs}

    versions = [str(mv.version) for mv in client.search_model_versions(f"name = '{MODEL}'")]
    holders = [v for v in versions if "champion" in client.get_model_version(MODEL, v).aliases]
    assert sorted(versions) == ["1", "2"] and len(holders) == 1
    tags = {v: client.get_model_version(MODEL, v).tags for v in versions}
    assert all(
        "promotion.decision" in t for t in tags.values()
    )  # both decisions are on their versions
    # the first to write had no champion to beat and became it
    first = next(v for v, t in tags.items() if t["promotion.compared_with"] == "none")
    second = "2" if first == "1" else "1"
    assert done[f"promote-v{first}"][0] == 0, done[f"promote-v{first}"][1]
    assert (
        tags[first]["promotion.decision"] == "promoted"
        and tags[first]["promotion.champion_moved_meanwhile"] == "no"
    )
    # the second was judged again, against the champion the first had just installed, and says so
    code, output = done[f"promote-v{second}"]
    assert tags[second]["promotion.compared_with"] == first, output
    assert (
        f"changed from none to version {first}"
        in tags[second]["promotion.champion_moved_meanwhile"]
    )
    assert f"changed from none to version {first}" in output
    assert "champion_scores.csv" in {
        a.path for a in client.list_artifacts(tags[second]["promotion.record_run"])
    }
    # the gate "worst clients do not drop" cannot be loosened: the weaker of the two, if second, is
    # rejected
    promoted = tags[second]["promotion.decision"] == "promoted"
    assert (code, tags[second]["promotion.decision"]) in ((0, "promoted"), (3, "rejected")), output
    if promoted:
        assert holders == [second] and tags[second]["promotion.replaced_version"] == first
        assert tags[first]["previous_champion"] == "true" and tags[first]["replaced_by"] == second
    else:
        assert holders == [first] and "previous_champion" not in tags[first]

    # both decisions are runs of the promotions experiment, finished, none left behind
    experiment = client.get_experiment_by_name(f"{s.cfg.tracking.experiment}-promotions")
    records = client.search_runs([experiment.experiment_id])
    assert len(records) == 2 and {r.info.status for r in records} == {"FINISHED"}
    by_version = {r.data.tags["version"]: r for r in records}
    assert by_version[first].data.tags["compared_with"] == "none"
    assert by_version[second].data.tags["compared_with"] == first
    assert f"version {first}" in by_version[second].data.tags["champion_changed"]
    decision = json.loads(
        Path(
            client.download_artifacts(by_version[second].info.run_id, "decision.json", str(s.root))
        ).read_text()
    )
    assert (
        decision["by"] == ("alice" if second == "1" else "bob")
        and decision["champion_mean"] is not None
    )
    assert len(decision["champion_changed"]) == 1 and decision["promote"] is promoted

    if (
        promoted
    ):  # the chain is whole: a rollback gives the champion back to the first one's version
        _, restored, _ = Registry.open(s.uri, MODEL).rollback(
            "carol", s.cfg.tracking.experiment, "test"
        )
        assert str(restored.version) == first
        assert str(client.get_model_version_by_alias(MODEL, "champion").version) == first


OPENER = """
import sys, time
from pathlib import Path
from tasks.registry import ensure_registered_model
from tasks.tracking import RunTracker, ensure_experiment

folder, me = Path(sys.argv[1]), sys.argv[2]

def barrier(name):
    (folder / f"{name}-{me}").touch()
    while not (folder / name).exists():
        time.sleep(0.005)

barrier("open")
tracker = RunTracker(sys.argv[3], "fedmtl", str(folder / "artifacts"))  # creates the store's tables
barrier("create")
print(ensure_experiment(tracker.client, "shared", ""), flush=True)
ensure_registered_model(tracker.client, "shared-model")
"""


def test_processes_opening_a_new_store_together(tmp_path):
    """Three processes released at the same instant onto a new SQLite store: each opens it
    (MLflow creates the tables then: without the store's init lock, all but one fail with
    'table … already exists' or 'duplicate column name'), then each creates the same
    experiment and registered model (without handling the lost race, all but one fail with
    'already exists')."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    jobs = [
        subprocess.Popen(
            [sys.executable, "-c", OPENER, str(tmp_path), str(i), uri],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(3)
    ]
    for phase in ("open", "create"):
        deadline = time.monotonic() + 120
        while len(list(tmp_path.glob(f"{phase}-*"))) < len(jobs):
            assert all(j.poll() is None for j in jobs) and time.monotonic() < deadline, "\n".join(
                j.communicate()[0] for j in jobs if j.poll() is not None
            )
            time.sleep(0.01)
        (tmp_path / phase).touch()
    outputs = [j.communicate(timeout=120)[0] for j in jobs]
    assert [j.returncode for j in jobs] == [0, 0, 0], "\n---\n".join(outputs)
    assert len({out.strip().splitlines()[-1] for out in outputs}) == 1  # one experiment id for all
    client = MlflowClient(uri)
    assert [e.name for e in client.search_experiments()].count("shared") == 1
    assert client.get_registered_model("shared-model").name == "shared-model"
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]


def test_two_dvc_repros_of_one_stage_at_once(tmp_path):
    """DVC guards a stage's outputs itself: a second `dvc repro` of a stage that is running
    fails at once (exit 255) naming the process that holds it, and dvc.lock stays whole."""
    dvc = shutil.which("dvc", path=str(BIN))
    git = shutil.which("git")
    if dvc is None or git is None:
        pytest.skip("dvc or git is not installed")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}

    def run(*a, **k):
        return subprocess.run(a, cwd=tmp_path, env=env, capture_output=True, text=True, **k)

    run(git, "init", "-q", check=True)
    run(dvc, "init", "-q", check=True)
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  slow:\n    cmd: sleep 4 && echo done > out.txt\n    outs: [out.txt]\n"
    )
    with (tmp_path / "first.log").open("w") as out:
        first = subprocess.Popen(
            [dvc, "repro", "slow"], cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    deadline = time.monotonic() + 30
    while (
        "Running stage" not in (tmp_path / "first.log").read_text()
    ):  # the stage's command has started
        assert first.poll() is None and time.monotonic() < deadline, (
            tmp_path / "first.log"
        ).read_text()
        time.sleep(0.1)
    began = time.monotonic()
    second = run(dvc, "repro", "slow")
    assert second.returncode != 0 and time.monotonic() - began < 4
    assert "is busy, it is being blocked by" in second.stderr + second.stdout
    assert f"PID {first.pid}" in second.stderr + second.stdout
    assert first.wait(timeout=60) == 0, (tmp_path / "first.log").read_text()
    lock = yaml.safe_load((tmp_path / "dvc.lock").read_text())
    assert lock["stages"]["slow"]["outs"][0]["md5"]
    assert "up to date" in run(dvc, "status").stdout.lower()
