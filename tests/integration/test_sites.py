"""Sites as separate processes through a real Prefect server (issue 18, in progress): three site
processes, each serving its own deployment ``fedmtl-site/NAME`` from a folder only it can read
(its own Unix user where this test runs as root), and a coordinator that reaches them only
through Prefect and the exchange store. The trained model and the evaluation equal the
simulation's for the same partitions and seeds."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import warnings
from pathlib import Path

import pytest
import torch

from fedmtl.client.store import ClientStore
from fedmtl.config import load_config
from fedmtl.data import partition, prepare
from fedmtl.data.manifest import Manifest, read_manifest, write_manifest
from fedmtl.federation import Federation
from fedmtl.rounds import run, run_round, run_rounds
from fedmtl.sites.exchange import Exchange
from fedmtl.sites.identity import COORDINATOR, Identity, KnownParties
from fedmtl.sites.rounds import SiteSteps
from fedmtl.sites.site import publish_settings
from fedmtl.state import FailureKind
from tests.conftest import tiny_overrides
from tests.integration.test_schedule import free_port, tail

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
SETTINGS = {
    "data.partition.n_clients": 3,
    "data.partition.n_groups": 1,
    "training.batched": "off",
    "training.local_epochs": 1,
    "training.rounds": 2,
}
RUN = "sitesrun1"


def interpreter_unreadable() -> str | None:
    """Why users other than this test's cannot run this Python (then every site runs as this
    test's user, its folder still 0700), or None. Probed as ``nobody`` before any user is made."""
    if os.geteuid() != 0 or shutil.which("useradd") is None:
        return "this test does not run as root (or has no useradd)"
    nobody = pwd.getpwnam("nobody")
    try:
        probe = subprocess.run(
            [sys.executable, "-c", "import fedmtl"],
            user=nobody.pw_uid,
            group=nobody.pw_gid,
            extra_groups=[],
            capture_output=True,
            text=True,
        )
    except OSError as exc:  # e.g. the interpreter lives under /root (0700)
        return f"another user cannot run {sys.executable}: {exc}"
    return (
        None
        if probe.returncode == 0
        else f"another user cannot import fedmtl: {probe.stderr[-300:]}"
    )


def site_user(name: str, created: list[str]) -> tuple[int, int] | None:
    """A Unix user of the site's own (made by this test, removed after it), or None (see
    :func:`interpreter_unreadable`)."""
    why = interpreter_unreadable()
    if why is not None:
        warnings.warn(f"site '{name}' runs as this test's user: {why}")
        return None
    user = f"fedmtl-{name}"
    try:
        pwd.getpwnam(user)
    except KeyError:
        done = subprocess.run(
            ["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", user],
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr
        created.append(user)
    entry = pwd.getpwnam(user)
    return entry.pw_uid, entry.pw_gid


def chown_tree(path: Path, uid: int, gid: int) -> None:
    for p in [path, *path.rglob("*")]:
        os.chown(p, uid, gid)


@pytest.fixture(scope="module")
def federation_of_sites():
    # under /tmp itself: pytest's own temporary folders are 0700, which a site's user cannot enter
    root = Path(tempfile.mkdtemp(prefix="fedmtl-sites-"))
    os.chmod(root, 0o755)
    cfg = load_config(None, tiny_overrides(root, **SETTINGS))
    prepare(cfg.data)
    partition(cfg.data)
    manifest = read_manifest(cfg.data.partitions_dir)
    exchange_dir = root / "exchange"
    exchange_dir.mkdir()
    os.chmod(exchange_dir, 0o1777)
    keys = root / "coordinator-keys"
    coordinator = Identity.generate(COORDINATOR)
    coordinator.save(keys)
    api = f"http://127.0.0.1:{free_port()}/api"
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",
        "PREFECT_HOME": str(root / "prefect-server"),
    }
    procs, logs = {}, {}

    def start(name, args, cwd, user=None, extra_env=None):
        logs[name] = root / f"{name}.log"
        with logs[name].open("w") as out:
            ids = {"user": user[0], "group": user[1], "extra_groups": []} if user else {}
            # the exchange folder is shared by every party here: what they create in it, all may
            # write into (an object store with per-site credentials in a real deployment)
            ids["umask"] = 0
            procs[name] = subprocess.Popen(
                args,
                cwd=cwd,
                env={**env, **(extra_env or {})},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **ids,
            )
        if user:
            os.chown(logs[name], *user)

    def serve(client: str) -> None:
        """(Re)starts the site's `fedmtl site serve`."""
        home = root / f"site-{client}"
        start(
            f"site-{client}",
            [sys.executable, "-m", "cli", "site", "serve", "--dir", str(home / "site")],
            home,
            users.get(client),
            {"HOME": str(home), "PREFECT_HOME": str(home / "prefect")},
        )

    start(
        "server",
        [
            str(BIN / "prefect"),
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            api.split(":")[2].split("/")[0],
        ],
        root,
    )
    users, created = {}, []
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{api}/health", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, tail(logs["server"])
                assert procs["server"].poll() is None, tail(logs["server"])
                time.sleep(0.5)
        for client in manifest.client_ids:
            home = root / f"site-{client}"
            part = home / "partition"
            part.mkdir(parents=True)
            entry = manifest.entry(client)
            shutil.copyfile(Path(cfg.data.partitions_dir) / entry.file, part / entry.file)
            write_manifest(
                part,
                Manifest.from_dict(
                    {
                        **json.loads(manifest.to_json()),
                        "clients": [
                            json.loads(manifest.to_json())["clients"][
                                manifest.client_ids.index(client)
                            ]
                        ],
                    }
                ),
            )
            done = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "cli",
                    "site",
                    "init",
                    "--site",
                    client,
                    "--partitions",
                    str(part),
                    "--exchange",
                    f"file://{exchange_dir}",
                    "--coordinator-key",
                    str(keys / f"{COORDINATOR}.pub"),
                    "--dir",
                    str(home / "site"),
                ],
                env=env,
                capture_output=True,
                text=True,
            )
            assert done.returncode == 0, done.stdout + done.stderr
            user = users[client] = site_user(client, created)
            os.chmod(home, 0o700)
            if user:
                chown_tree(home, *user)
            serve(client)
        yield root, cfg, manifest, api, coordinator, users, procs, logs, serve
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
        end = time.monotonic() + 10
        for proc in procs.values():  # each in a session of its own: its flow-run children too
            try:
                proc.wait(max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        shutil.rmtree(root, ignore_errors=True)
        for user in created:
            subprocess.run(["userdel", user], capture_output=True)


def site_keys(root: Path, clients: list[str]) -> KnownParties:
    """The sites' public keys, as the coordinator is given them."""
    known = KnownParties()
    for client in clients:
        known.add(client, Identity.load(root / f"site-{client}" / "site" / "keys", client).public)
    return known


def wait_for_deployments(api: str, names: list[str], procs, logs, timeout: float = 120) -> None:
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    end = time.monotonic() + timeout
    with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        for name in names:
            while True:
                try:
                    client.read_deployment_by_name(f"fedmtl-site/{name}")
                    break
                except Exception:  # noqa: BLE001 - not there yet
                    proc = procs[f"site-{name}"]
                    assert proc.poll() is None, tail(logs[f"site-{name}"])
                    assert time.monotonic() < end, tail(logs[f"site-{name}"])
                    time.sleep(0.5)


def test_sites_train_and_evaluate_the_simulated_model_through_prefect(federation_of_sites):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.sites import PrefectLauncher

    root, cfg, manifest, api, coordinator, users, procs, logs, _ = federation_of_sites
    clients = manifest.client_ids
    wait_for_deployments(api, clients, procs, logs)
    simulated, sim_records, _ = run_rounds(
        Federation.from_config(cfg, manifest, ClientStore(root / "sim")),
        clients,
        2,
        evaluate_every=2,
    )
    # the coordinator has the manifest's public metadata and no partition: it reads no data
    blind = load_config(
        None, tiny_overrides(root, **SETTINGS, **{"data.partitions_dir": str(root / "none")})
    )
    coord = Federation.from_config(blind, manifest, ClientStore(root / "coordinator"))
    known = site_keys(root, clients)
    exchange = Exchange(f"file://{root / 'exchange'}", RUN)
    publish_settings(exchange, coordinator, cfg)
    umask = os.umask(0)  # the shared exchange folder (see start())
    try:
        with temporary_settings(updates={PREFECT_API_URL: api}):
            steps = SiteSteps(exchange, coordinator, known, PrefectLauncher(RUN), deadline=180)
            outcome = run(coord, coord.initial_state(), clients, 2, steps=steps, evaluate_every=2)
    finally:
        os.umask(umask)
    assert outcome.state.round == 2
    assert torch.allclose(outcome.state.base, simulated.base, atol=1e-6)
    key = ["client", "variant", "task"]
    got = outcome.records.sort_values(key).reset_index(drop=True)
    want = sim_records.sort_values(key).reset_index(drop=True)
    assert got["accuracy"].tolist() == pytest.approx(want["accuracy"].tolist(), abs=1e-6)
    # what the sites keep stays with them; the exchange store holds sealed messages only
    for client in clients:
        assert any((root / f"site-{client}" / "site" / "store" / RUN).rglob("*.pt")), (
            "personal heads at the site"
        )
    assert not (root / "none").exists()
    if users[clients[0]] is not None:  # a site's folder is its own: another user cannot read it
        other = users[clients[1]]
        private = root / f"site-{clients[0]}" / "partition" / manifest.entry(clients[0]).file
        probe = subprocess.run(
            [
                sys.executable,
                "-c",
                f"open({str(private)!r}, 'rb')",
            ],
            user=other[0],
            group=other[1],
            extra_groups=[],
            capture_output=True,
            text=True,
        )
        assert probe.returncode != 0 and "PermissionError" in probe.stderr


def test_fedmtl_train_with_federation_mode_sites_runs_the_same_flow(federation_of_sites):
    """`fedmtl train` as the coordinator, in a process of its own with no partition: the sites'
    sealed summaries give the manifest, the rounds run at the sites, MLflow gets the run and the
    registry the model; the figures are the simulation's."""
    from mlflow.tracking import MlflowClient

    root, cfg, manifest, api, coordinator, users, procs, logs, _ = federation_of_sites
    clients = manifest.client_ids
    wait_for_deployments(api, clients, procs, logs)
    keys = root / "site-keys"
    keys.mkdir(exist_ok=True)
    for client in clients:
        shutil.copyfile(
            root / f"site-{client}" / "site" / "keys" / f"{client}.pub", keys / f"{client}.pub"
        )
    home = root / "coordinator-home"
    home.mkdir()
    sites = {
        "federation.mode": "sites",
        "federation.exchange": f"file://{root / 'exchange'}",
        "federation.coordinator_keys": str(root / "coordinator-keys"),
        "federation.sites": str(keys),
        "federation.deadline": 180,
        "data.partitions_dir": str(root / "none"),
        "tracking.registered_model": "fedmtl-sites-test",
    }
    overrides = tiny_overrides(root, **{**SETTINGS, "training.rounds": 1}, **sites)
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    args = [sys.executable, "-m", "cli", "train"]  # no params.yaml in its folder: the defaults
    for override in overrides:
        args += ["-s", override]
    done = subprocess.run(
        args, cwd=home, env=env, capture_output=True, text=True, timeout=600, umask=0
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    metrics = json.loads((root / "metrics.json").read_text())
    _, _, history = run_rounds(
        Federation.from_config(cfg, manifest, ClientStore(root / "sim2")),
        clients,
        1,
        evaluate_every=1,
    )
    assert metrics["personal_accuracy"] == pytest.approx(
        history[-1]["personal/accuracy/mean"], abs=1e-6
    )
    assert metrics["global_accuracy"] == pytest.approx(
        history[-1]["global/accuracy/mean"], abs=1e-6
    )
    assert metrics["clients"] == len(clients) and metrics["rounds"] == 1
    run = MlflowClient(cfg.tracking.tracking_uri).get_run(metrics["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["federation"] == "sites"
    assert run.data.tags["data_version"].startswith("sites:") and metrics["model_version"]
    assert not (root / "none").exists()


def test_a_killed_site_is_dropped_at_the_deadline_and_rejoins_after_a_restart(federation_of_sites):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.sites import PrefectLauncher

    root, cfg, manifest, api, coordinator, users, procs, logs, serve = federation_of_sites
    clients = manifest.client_ids
    wait_for_deployments(api, clients, procs, logs)
    victim = clients[2]
    os.killpg(procs[f"site-{victim}"].pid, signal.SIGKILL)  # the site and any flow run of it
    procs[f"site-{victim}"].wait()
    blind = load_config(
        None, tiny_overrides(root, **SETTINGS, **{"data.partitions_dir": str(root / "none")})
    )
    coord = Federation.from_config(blind, manifest, ClientStore(root / "coordinator3"))
    known = site_keys(root, clients)
    exchange = Exchange(f"file://{root / 'exchange'}", "sitesrun3")
    publish_settings(exchange, coordinator, cfg)
    umask = os.umask(0)
    try:
        with temporary_settings(updates={PREFECT_API_URL: api}):
            steps = SiteSteps(
                exchange, coordinator, known, PrefectLauncher("sitesrun3"), deadline=15
            )
            state, first = run_round(
                coord, coord.initial_state(), clients, steps, min_clients=2, evaluate=False
            )
            assert state.round == 1 and [u.client for u in first.updates] == clients[:2]
            assert first.failed[victim].kind is FailureKind.TIMEOUT
            assert f"site '{victim}': nothing by the round's deadline" in str(first.failed[victim])
            serve(victim)  # back: its next round's run is picked up when its runner polls
            steps.deadline = 180
            state, second = run_round(coord, state, clients, steps, min_clients=2, evaluate=False)
    finally:
        os.umask(umask)
    assert state.round == 2 and [u.client for u in second.updates] == clients and not second.failed
