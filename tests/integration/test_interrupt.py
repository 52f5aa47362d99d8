"""Interrupting a real ``fedmtl train`` process, as a terminal's Ctrl-C or a service manager does.

The signal goes to the command's whole process group (what a terminal sends on Ctrl-C). The
first one stops the run after the round it is in: exit 130, a message naming the round and how to
resume, the MLflow run KILLED, only complete checkpoints. ``fedmtl train --resume`` says where it
continues and ends where an uninterrupted run ends. A second signal exits at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from fedmtl.config import load_config
from fedmtl.data import partition, prepare
from fedmtl.data.manifest import read_manifest
from fedmtl.data.validation import validate_partitions
from fedmtl.lifecycle.checkpoint import CheckpointStore
from fedmtl.lifecycle.runs import RunRecord
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.slow

ROUNDS = 40  # long enough (a tiny round takes ~0.1 s) to be interrupted mid-run
SETTINGS = {
    "training.rounds": ROUNDS,
    "data.partition.n_clients": 4,
    "tracking.client_runs": False,
    "tracking.register_model": False,
}


def start(root: Path, *args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=str(root / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    command = [str(Path(sys.executable).parent / "fedmtl"), "train", *args]
    out, err = open(root / "out.log", "w"), open(root / "err.log", "w")  # files: no pipe to wait on
    # a session of its own: killpg below reaches the command's process group as a terminal would
    return subprocess.Popen(
        command,
        cwd=root,
        env=env,
        stdout=out,
        stderr=err,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


class Terminal:
    """``fedmtl train`` in a pseudo-terminal of its own, as a user runs it: rich draws its live
    progress bar, and a typed Ctrl-C (``\\x03``) makes the terminal send SIGINT to the foreground
    process group, which is what a user's Ctrl-C does."""

    def __init__(self, root: Path, *args: str) -> None:
        import pty
        import threading

        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
        env.update(
            PREFECT_HOME=str(root / "prefect-home"),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            TERM="xterm",
            COLUMNS="120",
        )
        self.master, slave = pty.openpty()

        def controlling_terminal() -> None:  # in the child: a new session, the pty its terminal
            import fcntl
            import termios

            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)
            signal.signal(signal.SIGINT, signal.SIG_DFL)

        command = [str(Path(sys.executable).parent / "fedmtl"), "train", *args]
        self.process = subprocess.Popen(
            command,
            cwd=root,
            env=env,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            preexec_fn=controlling_terminal,
        )
        os.close(slave)
        self.chunks: list[bytes] = []
        self.reader = threading.Thread(
            target=self._read, daemon=True
        )  # a full pty would block the child
        self.reader.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:
                return
            if not chunk:
                return
            self.chunks.append(chunk)

    def ctrl_c(self) -> None:
        os.write(self.master, b"\x03")

    def text(self) -> str:
        self.reader.join(timeout=5)
        return b"".join(self.chunks).decode(errors="replace")


def output(root: Path) -> tuple[str, str]:
    return (root / "out.log").read_text(), (root / "err.log").read_text()


def new_run(root: Path, known: set[Path], timeout: float = 120.0) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fresh = [
            p.parent
            for p in (root / ".fedmtl" / "runs").glob("*/run.json")
            if p.parent not in known
        ]
        if fresh:
            return fresh[0]
        time.sleep(0.05)
    raise AssertionError(f"no training run started:\n{output(root)}")


def wait_for_round(
    run_dir: Path, process: subprocess.Popen, round_: int, timeout: float = 120.0
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(
                f"training ended before round {round_}: {process.returncode}\n{output(run_dir)}"
            )
        done = (
            CheckpointStore(run_dir / "checkpoints").rounds()
            if (run_dir / "checkpoints").exists()
            else []
        )
        if done and max(done) >= round_:
            return
        time.sleep(0.02)
    raise AssertionError(f"round {round_} never finished")


def runs(root: Path) -> set[Path]:
    return {p.parent for p in (root / ".fedmtl" / "runs").glob("*/run.json")}


@pytest.fixture(scope="module")
def root(prefect_harness, tmp_path_factory):
    root = tmp_path_factory.mktemp("interrupt")
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


def test_ctrl_c_stops_at_a_safe_point_exits_130_and_resume_matches_an_uninterrupted_run(root):
    from flows.training import federated_training

    overrides = tiny_overrides(root, **SETTINGS)
    cfg = load_config(None, overrides)
    reference = federated_training(cfg.model_dump(mode="json"))  # never interrupted
    before = runs(root)
    sets = [arg for o in overrides for arg in ("--set", o)]

    terminal = Terminal(root, *sets)
    process = terminal.process
    run_dir = new_run(root, before)
    wait_for_round(run_dir, process, 2)
    terminal.ctrl_c()  # typed in the terminal: SIGINT to the whole foreground process group
    process.wait(timeout=60)
    out = err = " ".join(terminal.text().split())  # one screen: rich may wrap lines
    assert process.returncode == 130, out
    record = RunRecord.load(run_dir)
    stopped = CheckpointStore(run_dir / "checkpoints").rounds()
    assert stopped and max(stopped) < ROUNDS and not record.finished
    assert f"interrupted at round {max(stopped)}; resume with: fedmtl train --resume" in out
    assert "SIGINT: stopping after the current round" in out
    assert "Connection refused" not in out + err and "Error logging to API" not in out + err
    _, problems = CheckpointStore(run_dir / "checkpoints").latest()
    assert not problems
    client = MlflowClient(cfg.tracking.tracking_uri)
    assert client.get_run(record.mlflow_run_id).info.status == "KILLED"

    resumed = start(root, *sets, "--resume")
    resumed.wait(timeout=300)
    out, err = output(root)
    assert resumed.returncode == 0, f"{out}\n{err}"
    assert (
        f"resuming run {record.key} (MLflow run {record.mlflow_run_id}) "
        f"after round {max(stopped)} of {ROUNDS}" in out
    )
    assert (
        RunRecord.load(run_dir).finished
        and client.get_run(record.mlflow_run_id).info.status == "FINISHED"
    )
    (ref_dir,) = [
        d for d in before if RunRecord.load(d).mlflow_run_id == reference["mlflow_run_id"]
    ]
    final = CheckpointStore(run_dir / "checkpoints").load(ROUNDS).state
    expected = CheckpointStore(ref_dir / "checkpoints").load(ROUNDS).state
    assert torch.equal(final.base, expected.base)
    assert all(torch.equal(final.global_heads[t], v) for t, v in expected.global_heads.items())
    want = {
        m.step: m.value
        for m in client.get_metric_history(reference["mlflow_run_id"], "personal/accuracy/mean")
    }
    got = {
        m.step: m.value
        for m in client.get_metric_history(record.mlflow_run_id, "personal/accuracy/mean")
    }
    assert got == want


def test_sigterm_then_a_second_signal_exits_at_once_leaving_only_complete_checkpoints(root):
    overrides = tiny_overrides(root, **{**SETTINGS, "training.seed": 7})  # another run
    sets = [arg for o in overrides for arg in ("--set", o)]
    before = runs(root)
    process = start(root, *sets)
    run_dir = new_run(root, before)
    wait_for_round(run_dir, process, 1)
    process.send_signal(signal.SIGTERM)  # a service manager's stop: the same safe stop
    time.sleep(0.05)
    os.killpg(process.pid, signal.SIGINT)  # and then Ctrl-C: now
    process.wait(timeout=20)
    out, err = output(root)
    assert process.returncode == 130, f"{out}\n{err}"
    assert "again: exiting now" in err and "resume with: fedmtl train --resume" in err
    store = CheckpointStore(run_dir / "checkpoints")
    _, problems = store.latest()
    assert not problems and store.rounds() == list(range(1, max(store.rounds()) + 1))
    assert not list((run_dir / "checkpoints").glob("*.tmp")) and not list(
        (run_dir / "checkpoints").glob(".*")
    )
