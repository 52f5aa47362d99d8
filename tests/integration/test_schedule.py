"""Scheduled recurring training for real: a Prefect server, `fedmtl schedule` serving the
deployment, runs triggered with `run_deployment`, DVC data versions and warm starts from the
champion, a failing run, and Ctrl-C."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from fedmtl.config import dump_config, load_config
from tests.conftest import REPO

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
DEPLOYMENT = "fedmtl-scheduled/test"
MODEL = "fedmtl-sched"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rows(clients: list[str], n: int, seed: int) -> pd.DataFrame:
    """Per client: 4 numeric features, a binary label from a client-specific rule."""
    rng = np.random.default_rng(seed)
    parts = []
    for i, client in enumerate(clients):
        x = rng.normal(size=(n, 4))
        sign = 1 if i % 2 == 0 else -1
        frame = pd.DataFrame(x, columns=[f"x{j}" for j in range(4)])
        frame["label"] = (sign * x[:, 0] + 0.5 * x[:, 1] > 0).astype(int)
        frame.insert(0, "client", client)
        parts.append(frame)
    return pd.concat(parts, ignore_index=True)


def sh(cwd: Path, env: dict, *args: str) -> str:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no output)"


def partitions_hash(project: Path) -> str:
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    return lock["stages"]["partition"]["outs"][0]["md5"]


class Served:
    """The test's Prefect server, the project and the `fedmtl schedule` process serving it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.project = root / "project"
        self.csv = root / "incoming" / "rows.csv"
        self.remote = root / "dvc-remote"
        self.port = free_port()
        self.api = f"http://127.0.0.1:{self.port}/api"
        self.env = {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            "PREFECT_HOME": str(root / "prefect-home"),
            "PREFECT_API_URL": self.api,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_RUNNER_POLL_FREQUENCY": "2",
        }
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}

    def start(self, name: str, args: list[str], cwd: Path) -> subprocess.Popen:
        blocked = signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, [])
        handler = signal.getsignal(signal.SIGINT)
        if (
            blocked or handler is not signal.default_int_handler
        ):  # what the child would have inherited
            warnings.warn(
                f"starting {name}: this test process has SIGINT "
                f"{'blocked' if blocked else 'unblocked'}, "
                f"handler {handler!r}; the child gets it unblocked and at its default"
            )
        log = self.logs[name] = self.root / f"{name}.log"
        handle = log.open("w")
        proc = subprocess.Popen(
            args,
            cwd=cwd,
            env=self.env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_signals_as_from_a_shell,
        )
        handle.close()
        self.procs[name] = proc
        return proc

    def wait_healthy(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            server = self.procs["server"]
            assert server.poll() is None, f"prefect server exited:\n{tail(self.logs['server'])}"
            try:
                with urllib.request.urlopen(f"{self.api}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise AssertionError(
            f"prefect server not healthy after {timeout} s:\n{tail(self.logs['server'])}"
        )

    def stop(self) -> None:
        for name in ("serve", "server"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def make_project(served: Served) -> None:
    project = served.project
    project.mkdir()
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(REPO / name, project / name)
    served.csv.parent.mkdir()
    rows([f"c{i}" for i in range(4)], 40, seed=0).to_csv(served.csv, index=False)
    cfg = load_config(
        None,
        [
            "data.source=table",
            f"data.table.path={served.csv}",
            "model.hidden=[16]",
            "training.rounds=1",
            "training.local_epochs=1",
            "training.personal_epochs=1",
            "tracking.client_runs=false",
            f"tracking.registered_model={MODEL}",
            "promotion.min_metric=0.0",
        ],
    )
    (project / "params.yaml").write_text(dump_config(cfg))
    env = served.env
    sh(project, env, "git", "init", "-q")
    sh(
        project,
        env,
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
    sh(project, env, "dvc", "init", "-q")
    sh(project, env, "dvc", "remote", "add", "-d", "local", str(served.remote))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    served = Served(tmp_path_factory.mktemp("schedule"))
    try:
        make_project(served)
        served.start(
            "server",
            [
                str(BIN / "prefect"),
                "server",
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                str(served.port),
            ],
            served.root,
        )
        served.wait_healthy()
        served.start(
            "serve",
            [
                str(BIN / "fedmtl"),
                "schedule",
                "--interval",
                "3600",
                "--name",
                "test",
                "--params",
                "params.yaml",
            ],
            served.project,
        )
        with temporary_settings(updates={PREFECT_API_URL: served.api}):  # for the tests too
            with get_client(sync_client=True) as client:
                served.deployment = registered(
                    client, DEPLOYMENT, served.procs["serve"], served.logs["serve"]
                )
            yield served
    finally:
        served.stop()


def registered(client, name: str, proc: subprocess.Popen, log: Path, timeout: float = 180):
    """The deployment ``name`` once the serving process ``proc`` has registered it (its start
    message comes before the runner registers it); fails if the process exits or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"fedmtl schedule exited:\n{tail(log)}"
        try:
            return client.read_deployment_by_name(name)
        except Exception:  # noqa: BLE001 - not registered yet
            pass
        assert time.monotonic() < deadline, (
            f"no deployment {name} after {timeout:g} s:\n{tail(log)}"
        )
        time.sleep(1)


def trigger(served: Served, timeout: float = 400):
    from prefect.deployments import run_deployment

    run = run_deployment(DEPLOYMENT, timeout=timeout, poll_interval=1)
    assert run.state is not None and run.state.is_final(), (
        f"flow run not final after {timeout} s: {run.state}\n{tail(served.logs['serve'])}"
    )
    return run


def mlflow_run(served: Served):
    metrics = json.loads((served.project / "metrics.json").read_text())
    client = MlflowClient(f"sqlite:///{served.project / 'mlflow/mlflow.db'}")
    return client, client.get_run(metrics["mlflow_run_id"])


def test_deployment_has_the_schedule_and_a_concurrency_limit_of_one(served):
    from prefect.client.schemas.objects import ConcurrencyLimitStrategy

    dep = served.deployment
    assert [s.schedule.interval for s in dep.schedules] == [dt.timedelta(seconds=3600)]
    assert all(s.active for s in dep.schedules) and not dep.paused
    assert dep.global_concurrency_limit is not None and dep.global_concurrency_limit.limit == 1
    assert dep.concurrency_options.collision_strategy == ConcurrencyLimitStrategy.ENQUEUE
    assert dep.parameters["config"]["schedule"]["warm_start"] == "champion"
    out = tail(served.logs["serve"])
    assert f"serving deployment {DEPLOYMENT}" in out and "next run 20" in out
    assert f"prefect deployment run '{DEPLOYMENT}'" in out


def test_scheduled_runs_version_the_data_and_continue_from_the_champion(served):
    # first run: no champion yet; DVC versions the data, MLflow records that version
    first = trigger(served)
    assert first.state.is_completed(), f"{first.state.message}\n{tail(served.logs['serve'])}"
    client, run1 = mlflow_run(served)
    v1 = partitions_hash(served.project)
    assert (
        run1.data.tags["data_version"] == v1 and run1.data.tags["data_version_source"] == "dvc.lock"
    )
    assert run1.data.tags["warm_start"] == "none"
    assert [
        m.step for m in client.get_metric_history(run1.info.run_id, "personal/accuracy/mean")
    ] == [1]
    assert any(served.remote.rglob("*")), "the data version was not pushed to the DVC remote"
    version = run1.data.tags["model_version"]
    # the run judged its own version with the promotion gates: the first version has no
    # champion to beat, so only the absolute gates count (min_metric lowered for this data)
    judged = client.get_model_version(MODEL, version)
    assert judged.tags["promotion.decision"] == "promoted", judged.tags
    assert judged.tags["promotion.by"] == "schedule:test"
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == version

    # new rows arrive (more for the old clients, and a new client): a new data version, and
    # training continues from the champion: its round count, so the first step is 2
    more = rows([f"c{i}" for i in range(5)], 12, seed=1)
    pd.concat([pd.read_csv(served.csv), more]).to_csv(served.csv, index=False)
    second = trigger(served)
    assert second.state.is_completed(), f"{second.state.message}\n{tail(served.logs['serve'])}"
    client, run2 = mlflow_run(served)
    v2 = partitions_hash(served.project)
    assert run2.info.run_id != run1.info.run_id and v2 != v1
    assert run2.data.tags["data_version"] == v2
    assert run2.data.tags["warm_start"] == f"models:/{MODEL}/{version}"
    assert [
        m.step for m in client.get_metric_history(run2.info.run_id, "personal/accuracy/mean")
    ] == [2]
    assert run2.data.tags["model_version"] != version
    judged = client.get_model_version(MODEL, run2.data.tags["model_version"]).tags
    assert judged["promotion.decision"] in ("promoted", "rejected")
    assert (
        judged["promotion.compared_with"] == version
    )  # judged against the champion it started from


def test_failing_runs_fail_with_the_cause_and_never_overlap(served):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with served.csv.open("a") as f:
        f.write("c0,0.1,0.2,0.3,0.4,\n")  # a row without its label
    with temporary_settings(updates={PREFECT_API_URL: served.api}):
        ids = [run_deployment(DEPLOYMENT, timeout=0).id for _ in range(2)]  # both due at once
        deadline = time.monotonic() + 300
        with get_client(sync_client=True) as client:
            while True:
                runs = [client.read_flow_run(i) for i in ids]
                if all(r.state.is_final() for r in runs):
                    break
                assert time.monotonic() < deadline, (
                    f"runs not final: {[r.state for r in runs]}\n" + tail(served.logs["serve"])
                )
                time.sleep(1)
    for run in runs:
        assert run.state.is_failed(), f"{run.state}\n{tail(served.logs['serve'])}"
        message = run.state.message
        assert "DVC stage 'prepare' failed" in message and "label column 'label'" in message, (
            message
        )
        assert str(served.csv) in message and "missing values" in message, message
    first, second = sorted(runs, key=lambda r: r.start_time)
    assert first.end_time <= second.start_time, "two runs of the deployment overlapped"


def _signals_as_from_a_shell() -> None:
    """In a started process, before it runs: SIGINT as a shell's foreground command gets it,
    neither blocked nor ignored, so that Ctrl-C is what the test presses. A child inherits both
    from the process that starts it, and a test run launched as a background job of a
    non-interactive shell (``make test &``, as CI or a script may) runs with SIGINT ignored:
    Python then never installs its Ctrl-C handler, and ``fedmtl schedule`` rightly keeps
    ignoring SIGINT as any background command does."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _stacks(pid: int) -> str:
    """For a hang report: the signal state of process ``pid`` (blocked, ignored, caught,
    pending: hexadecimal masks, SIGINT is bit 1) and its Python stacks (py-spy, when installed)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        masks = "\n".join(
            line for line in status.splitlines() if line.startswith(("Sig", "ShdPnd"))
        )
    except OSError as exc:
        masks = f"(no signal state: {exc})"
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if spy is None:
        return masks + "\n(py-spy not installed: no stacks)"
    done = subprocess.run(
        [spy, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=60
    )
    return masks + "\n" + (done.stdout + done.stderr)[-6000:]


def _run_states(api: str) -> list[str]:
    """Every flow run's name and state on the test's server, for a hang report."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        return [
            f"{r.name}: {r.state.name if r.state else None}"
            for r in client.read_flow_runs(limit=50)
        ]


def _wait_until_idle(api: str, timeout: float = 180) -> None:
    """Wait until no flow run is running or waiting: a run still in flight from the test before
    (the second broken run waits for the first's concurrency slot) is what the served process is
    busy with when the first Ctrl-C was seen ignored in the full suite."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    deadline = time.monotonic() + timeout
    with temporary_settings(updates={PREFECT_API_URL: api}):
        with get_client(sync_client=True) as client:
            while time.monotonic() < deadline:
                runs = client.read_flow_runs(limit=200)
                if not any(
                    r.state is not None and not r.state.is_final() and r.state.name != "Scheduled"
                    for r in runs
                ):
                    return
                time.sleep(1)
    warnings.warn(f"flow runs still in flight after {timeout:g} s: {_run_states(api)}")


def test_ctrl_c_stops_serving_and_pauses_the_schedule(served):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    _wait_until_idle(served.api)
    proc = served.procs["serve"]
    # a run's subprocess prints its end (a failed run: its traceback) after the API has its final
    # state: wait until the log is quiet, so that what follows is what Ctrl-C printed
    before, deadline = -1, time.monotonic() + 30
    while time.monotonic() < deadline:
        size = len(served.logs["serve"].read_text(errors="replace"))
        if size == before:
            break
        before = size
        time.sleep(1.5)
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        # Before the served process was started with SIGINT at its default
        # (_signals_as_from_a_shell), every suite launched as a background job (SIGINT ignored)
        # failed here. Should a Ctrl-C go unheeded again: record the process's signal state,
        # output and stacks, then press Ctrl-C again, as a user would; fail if that does not stop
        # it.
        where = _stacks(proc.pid)
        said = served.logs["serve"].read_text(errors="replace")[before:][-3000:]
        warnings.warn(
            f"fedmtl schedule ignored the first Ctrl-C for 60 s; its output since:\n{said}\n"
            f"its flow runs: {_run_states(served.api)}\nits signal state and threads then:\n{where}"
        )
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            pytest.fail(
                "fedmtl schedule did not stop after two Ctrl-C:\n"
                + served.logs["serve"].read_text(errors="replace")[before:][-4000:]
                + "\n"
                + where
            )
    out = served.logs["serve"].read_text(errors="replace")[before:]  # what Ctrl-C printed
    assert proc.returncode == 130, out  # interrupted, as a shell reports it
    assert f"stopped serving {DEPLOYMENT}" in out and "Traceback" not in out, out
    with temporary_settings(updates={PREFECT_API_URL: served.api}):
        with get_client(sync_client=True) as client:
            dep = client.read_deployment_by_name(DEPLOYMENT)
    assert dep.paused or not any(s.active for s in dep.schedules)


def test_sigterm_stops_a_background_serve_and_pauses_its_schedule(served):
    """Started as a background job (SIGINT ignored, as the README says), ``fedmtl schedule`` is
    stopped by SIGTERM, the same way as by Ctrl-C."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    name = "fedmtl-scheduled/background"
    log = served.root / "background.log"
    with log.open("w") as handle:
        proc = subprocess.Popen(
            [
                str(BIN / "fedmtl"),
                "schedule",
                "--interval",
                "3600",
                "--name",
                "background",
                "--params",
                "params.yaml",
            ],
            cwd=served.project,
            env=served.env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
        )
    try:
        with (
            temporary_settings(updates={PREFECT_API_URL: served.api}),
            get_client(sync_client=True) as client,
        ):
            assert not registered(client, name, proc, log).paused
            proc.send_signal(signal.SIGINT)  # ignored, as by every background command
            time.sleep(3)
            assert proc.poll() is None, tail(log)
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
            out = log.read_text(errors="replace")
            assert proc.returncode == 0, out
            assert f"stopped serving {name}" in out and "Traceback" not in out, out
            dep = client.read_deployment_by_name(name)
        assert dep.paused or not any(s.active for s in dep.schedules)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
