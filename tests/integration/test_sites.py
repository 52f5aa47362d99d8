"""Sites as separate processes through a real Prefect server with basic authentication (issue
18): three site processes, each a Prefect task worker serving its own task ``fedmtl_site_NAME``
from a folder only it can read, and a coordinator that reaches them only through Prefect and the
exchange store. The trained model and the evaluation equal the simulation's for the same
partitions and seeds, with and without the secure sum (SecAgg+ across the site processes: no
plain update is stored); an update changed or replayed in the exchange store is refused, naming
the site; a site serves its own personalised model; no row of a site's data is found in the
exchange store, the Prefect server's database or the coordinator's MLflow store.

Where this test runs as root, each site and the coordinator of `fedmtl train` run as a Unix user
of their own (made by the test, removed after), in a private mount namespace where the
interpreter is reachable even under /root (tests.integration.isolation); elsewhere, or where
that cannot work, they run as this test's user, each site's folder still 0700, with a warning
saying why."""

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
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fedmtl.client.store import ClientStore
from fedmtl.config import Config, load_config
from fedmtl.data import partition, prepare
from fedmtl.data.manifest import Manifest, read_manifest
from fedmtl.federation import Federation
from fedmtl.privacy.secagg.wire import decode_masked
from fedmtl.rounds import run, run_round, run_rounds
from fedmtl.sites.envelope import open_envelope
from fedmtl.sites.exchange import Exchange
from fedmtl.sites.identity import COORDINATOR, Identity, KnownParties
from fedmtl.sites.rounds import SiteSteps
from fedmtl.sites.site import publish_settings, site_partition
from fedmtl.state import FailureKind
from tests.conftest import tiny_overrides
from tests.integration.isolation import as_user, isolation_problem, run_as
from tests.integration.rows import RowFinder, encodings
from tests.integration.test_schedule import free_port, tail
from tests.unit.test_sites_secure import plain_inputs

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
#: the Prefect server's basic auth (PREFECT_SERVER_API_AUTH_STRING), which every party is given
AUTH = "fedmtl:sites-test-secret"


def prefect_at(api: str):
    """This process's Prefect client settings for the test's server (URL and auth)."""
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    return temporary_settings(updates={PREFECT_API_URL: api, PREFECT_API_AUTH_STRING: AUTH})


def make_user(name: str, created: list[str]) -> tuple[int, int]:
    """The Unix user ``fedmtl-NAME`` (made by this test and removed after it, unless there)."""
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


def coordinator_home(root: Path) -> Path:
    """The folder of `fedmtl train` as the coordinator (test 2): its working directory, its
    home, and every path it writes (tiny_overrides: MLflow store and artifacts, metrics.json,
    training.workdir)."""
    return root / "coordinator-home"


def coordinator_overrides(root: Path) -> list[str]:
    sites = {
        "federation.mode": "sites",
        "federation.exchange": f"file://{root / 'exchange'}",
        "federation.coordinator_keys": str(root / "coordinator-keys"),
        "federation.sites": str(root / "site-keys"),
        "federation.deadline": 180,
        "data.partitions_dir": str(root / "none"),
        "tracking.registered_model": "fedmtl-sites-test",
    }
    return tiny_overrides(coordinator_home(root), **{**SETTINGS, "training.rounds": 1}, **sites)


@dataclass
class Sites:
    """The running federation: a Prefect server and a `fedmtl site serve` process per site."""

    root: Path
    cfg: Config
    manifest: Manifest
    api: str
    coordinator: Identity
    #: each site's (uid, gid), and the coordinator's (key COORDINATOR: test 2's `fedmtl
    #: train`), or None each where they run as this test's user (see isolation_problem)
    users: dict[str, tuple[int, int] | None]
    procs: dict[str, subprocess.Popen]
    logs: dict[str, Path]
    serve: Callable[[str], None]


@pytest.fixture(scope="module")
def federation_of_sites():
    # under /tmp itself: pytest's own temporary folders are 0700, which a site's user cannot enter
    root = Path(tempfile.mkdtemp(prefix="fedmtl-sites-"))
    os.chmod(root, 0o755)
    # whether each party can run as its own Unix user, probed while the server starts
    probing = ThreadPoolExecutor(max_workers=1)
    problem = probing.submit(isolation_problem)
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
        "PREFECT_API_AUTH_STRING": AUTH,
        "PREFECT_SERVER_API_AUTH_STRING": AUTH,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_HOME": str(root / "prefect-server"),
    }
    procs, logs = {}, {}

    def start(name, args, cwd, user=None, extra_env=None):
        logs[name] = root / f"{name}.log"
        with logs[name].open("w") as out:
            # the exchange folder is shared by every party here: what they create in it, all may
            # write into (an object store with per-site credentials in a real deployment)
            procs[name] = subprocess.Popen(
                as_user(args, user, extra=[root]) if user else args,
                cwd=cwd,
                env={**env, **(extra_env or {})},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                umask=0,
            )
        if user:
            os.chown(logs[name], *user)

    def serve(client: str) -> None:
        """(Re)starts the site's `fedmtl site serve`, as the site's user."""
        home = root / f"site-{client}"
        start(
            f"site-{client}",
            [sys.executable, "-m", "cli", "site", "serve", "--dir", str(home / "site")],
            home,
            users[client],
            {"HOME": str(home), "PREFECT_HOME": str(home / "prefect"), "TMPDIR": str(home / "tmp")},
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
        why = problem.result()
        if why is not None:
            warnings.warn(f"the sites and the coordinator run as this test's user: {why}")
        for client in manifest.client_ids:
            home = root / f"site-{client}"
            part = site_partition(cfg.data.partitions_dir, client, home / "partition")
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
            user = users[client] = None if why else make_user(client, created)
            (home / "tmp").mkdir()  # its TMPDIR: not a /tmp/runner_storage root may have made
            os.chmod(home, 0o700)
            if user:
                chown_tree(home, *user)
            serve(client)
        users[COORDINATOR] = None if why else make_user("coord", created)
        yield Sites(root, cfg, manifest, api, coordinator, users, procs, logs, serve)
    finally:
        probing.shutdown(wait=False)
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


def cannot_read(user: tuple[int, int], paths: list[Path], root: Path) -> dict[str, str]:
    """What ``user`` got trying to read each of ``paths`` (in ``root``), run as that user as the
    parties are (as_user): the error's name, or "read" where it could."""
    script = (
        "import json, sys\n"
        "got = {}\n"
        "for path in sys.argv[1:]:\n"
        "    try:\n"
        "        open(path, 'rb').read(1)\n"
        "        got[path] = 'read'\n"
        "    except OSError as exc:\n"
        "        got[path] = type(exc).__name__\n"
        "print(json.dumps(got))\n"
    )
    probe = run_as(user, [sys.executable, "-c", script, *map(str, paths)], [root], cwd="/")
    assert probe.returncode == 0, probe.stderr
    return json.loads(probe.stdout)


def owners(paths) -> set[int]:
    return {p.stat().st_uid for p in paths}


def site_keys_folder(root: Path, clients: list[str]) -> Path:
    """The folder of the sites' public keys (NAME.pub) the coordinator is given."""
    keys = root / "site-keys"
    keys.mkdir(exist_ok=True)
    for client in clients:
        shutil.copyfile(
            root / f"site-{client}" / "site" / "keys" / f"{client}.pub", keys / f"{client}.pub"
        )
    return keys


def site_keys(root: Path, clients: list[str]) -> KnownParties:
    """The sites' public keys, as the coordinator is given them."""
    known = KnownParties()
    for client in clients:
        known.add(client, Identity.load(root / f"site-{client}" / "site" / "keys", client).public)
    return known


def wait_for_sites(api: str, names: list[str], procs, logs, timeout: float = 120) -> None:
    """Until every site's task worker is subscribed to its task (``fedmtl site serve``)."""
    from flows.sites import online

    end = time.monotonic() + timeout
    with prefect_at(api):
        while len(up := online(names)) < len(names):
            for name in set(names) - set(up):
                proc = procs[f"site-{name}"]
                assert proc.poll() is None, tail(logs[f"site-{name}"])
                assert time.monotonic() < end, tail(logs[f"site-{name}"])
            time.sleep(0.5)


def test_sites_train_and_evaluate_the_simulated_model_through_prefect(federation_of_sites):
    from flows.sites import PrefectLauncher

    sites = federation_of_sites
    root, cfg, manifest, users = sites.root, sites.cfg, sites.manifest, sites.users
    clients = manifest.client_ids
    wait_for_sites(sites.api, clients, sites.procs, sites.logs)
    # the server answers only clients with its auth string (every party here has it)
    anonymous = urllib.request.Request(
        f"{sites.api}/flows/filter",
        data=b"{}",
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(anonymous, timeout=10)
    assert refused.value.code == 401
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
    publish_settings(exchange, sites.coordinator, cfg)
    umask = os.umask(0)  # the shared exchange folder (see start())
    try:
        with prefect_at(sites.api):
            steps = SiteSteps(
                exchange, sites.coordinator, known, PrefectLauncher(RUN), deadline=180
            )
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
        heads = list((root / f"site-{client}" / "site" / "store" / RUN).rglob("*.pt"))
        assert heads, "personal heads at the site"
        if users[client] is not None:  # written by the site's process, as the site's user
            sent = [Path(exchange.root) / exchange.update(r, client) for r in (1, 2)]
            assert owners(heads + sent) == {users[client][0]}, client
    assert not (root / "none").exists()
    if users[clients[0]] is not None:  # a site's folder is its own: another user cannot read it
        private = root / f"site-{clients[0]}" / "partition" / manifest.entry(clients[0]).file
        assert cannot_read(users[clients[1]], [private], root) == {str(private): "PermissionError"}


def test_fedmtl_train_with_federation_mode_sites_runs_the_same_flow(federation_of_sites):
    """`fedmtl train` as the coordinator, in a process of its own with no partition (as a Unix
    user of its own, which cannot read the sites' folders, where this test runs as root): the
    sites' sealed summaries give the manifest, the rounds run at the sites, MLflow gets the run
    and the registry the model; the figures are the simulation's."""
    from mlflow.tracking import MlflowClient

    sites = federation_of_sites
    root, manifest = sites.root, sites.manifest
    clients = manifest.client_ids
    wait_for_sites(sites.api, clients, sites.procs, sites.logs)
    site_keys_folder(root, clients)
    home = coordinator_home(root)
    (home / "tmp").mkdir(parents=True)
    overrides = coordinator_overrides(root)
    cfg = load_config(None, overrides)
    user = sites.users[COORDINATOR]
    if user is not None:  # its own folder and key; the sites' public keys it reads as they are
        chown_tree(home, *user)
        chown_tree(root / "coordinator-keys", *user)
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "PREFECT_API_URL": sites.api,
        "PREFECT_API_AUTH_STRING": AUTH,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "HOME": str(home),
        "PREFECT_HOME": str(home / "prefect"),
        "TMPDIR": str(home / "tmp"),
    }
    args = [sys.executable, "-m", "cli", "train"]  # no params.yaml in its folder: the defaults
    for override in overrides:
        args += ["-s", override]
    done = subprocess.run(
        as_user(args, user, extra=[root]) if user else args,
        cwd=home,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        umask=0,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    metrics_file = Path(cfg.tracking.metrics_file)
    metrics = json.loads(metrics_file.read_text())
    _, _, history = run_rounds(
        Federation.from_config(sites.cfg, manifest, ClientStore(root / "sim2")),
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
    if user is not None:  # it ran as its user, and that user cannot read a site's data
        assert owners([metrics_file]) == {user[0]}
        private = [
            root / f"site-{client}" / "partition" / manifest.entry(client).file
            for client in clients
        ]
        assert cannot_read(user, private, root) == {str(p): "PermissionError" for p in private}
    # a site serves its own personalised model: the registered shared model with its own heads
    site = clients[0]
    served = subprocess.run(
        [sys.executable, "-m", "cli", "site", "serve-model"]
        + ["--dir", str(root / f"site-{site}" / "site"), "--no-serve"]
        + ["--model", f"models:/fedmtl-sites-test/{metrics['model_version']}"]
        + ["--tracking-uri", cfg.tracking.tracking_uri, "--register", f"fedmtl-site-{site}"],
        env={**env, "HOME": str(root), "TMPDIR": tempfile.gettempdir()},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert served.returncode == 0, served.stdout[-3000:] + served.stderr[-3000:]
    import mlflow.pyfunc

    folder = next(p for p in (root / f"site-{site}" / "site" / "serving").rglob("MLmodel")).parent
    rows = pd.read_parquet(root / f"site-{site}" / "partition" / manifest.entry(site).file)
    frame = rows[manifest.features].head(5).assign(client_id=site)
    answered = mlflow.pyfunc.load_model(str(folder)).predict(frame)
    assert set(answered["head"]) == {"personal"}
    others = frame.assign(client_id=clients[1])  # another site's rows: its group's heads
    assert "personal" not in set(mlflow.pyfunc.load_model(str(folder)).predict(others)["head"])
    registered = MlflowClient(cfg.tracking.tracking_uri).search_model_versions(
        f"name='fedmtl-site-{site}'"
    )
    assert [v.tags.get("site") for v in registered] == [site]  # registered only when asked


def test_a_scheduled_run_trains_at_the_sites_and_passes_the_promotion_gates(federation_of_sites):
    """What `fedmtl schedule` runs each time (flows.scheduled, the deployment's flow) with
    federation.mode sites: no DVC refresh at the coordinator (the sites validate their own
    data), training at the sites, the promotion gates on what the sites reported."""
    from mlflow.tracking import MlflowClient

    from flows.scheduled import scheduled_training

    sites = federation_of_sites
    root, manifest = sites.root, sites.manifest
    clients = manifest.client_ids
    wait_for_sites(sites.api, clients, sites.procs, sites.logs)
    home = root / "scheduled-home"
    at_sites = {
        "federation.mode": "sites",
        "federation.exchange": f"file://{root / 'exchange'}",
        "federation.coordinator_keys": str(root / "coordinator-keys"),
        "federation.sites": str(site_keys_folder(root, clients)),
        "federation.deadline": 180,
        "data.partitions_dir": str(root / "none"),
        "tracking.registered_model": "fedmtl-sites-scheduled",
        "schedule.refresh_data": True,  # not at the coordinator, with sites
        "promotion.min_metric": 0.0,  # one round of one epoch: the first version passes
    }
    cfg = load_config(None, tiny_overrides(home, **{**SETTINGS, "training.rounds": 1}, **at_sites))
    umask = os.umask(0)
    try:
        with prefect_at(sites.api):
            summary = scheduled_training(cfg.model_dump(mode="json"))
    finally:
        os.umask(umask)
    assert summary["model_version"] and summary["promoted"], summary.get("promotion_reasons")
    registry = MlflowClient(cfg.tracking.tracking_uri)
    champion = registry.get_model_version_by_alias("fedmtl-sites-scheduled", "champion")
    assert str(champion.version) == str(summary["model_version"])
    run = registry.get_run(champion.run_id)
    assert run.data.tags["federation"] == "sites" and "data_changed" not in summary
    # the gates scored the version at every site (the coordinator has no rows to score it on)
    scored = sorted((root / "exchange").glob("promote-*/score-v*/sites/*.env"))
    assert sorted(p.stem for p in scored) == clients
    assert not (root / "none").exists()


def test_the_secure_sum_runs_across_the_site_processes(federation_of_sites):
    """SecAgg+ across the site processes: the model equals the simulation's with the secure sum,
    every site sent a masked input and no plain update was stored."""
    from flows.sites import PrefectLauncher

    sites = federation_of_sites
    root, manifest, users = sites.root, sites.manifest, sites.users
    clients = manifest.client_ids
    wait_for_sites(sites.api, clients, sites.procs, sites.logs)
    secure = {"privacy.secure_sum.enabled": True, "privacy.evaluation.client_metrics": True}
    cfg = load_config(None, tiny_overrides(root, **SETTINGS, **secure))
    simulated, _, _ = run_rounds(
        Federation.from_config(cfg, manifest, ClientStore(root / "sim-secure")), clients, 1
    )
    blind = load_config(
        None,
        tiny_overrides(root, **SETTINGS, **secure, **{"data.partitions_dir": str(root / "none")}),
    )
    coord = Federation.from_config(blind, manifest, ClientStore(root / "coordinator5"))
    exchange = Exchange(f"file://{root / 'exchange'}", "sitesrun5")
    publish_settings(exchange, sites.coordinator, cfg)
    umask = os.umask(0)
    try:
        with prefect_at(sites.api):
            steps = SiteSteps(
                exchange,
                sites.coordinator,
                site_keys(root, clients),
                PrefectLauncher("sitesrun5"),
                deadline=180,
                stage_deadline=60,
            )
            state, report = run_round(coord, coord.initial_state(), clients, steps, evaluate=False)
    finally:
        os.umask(umask)
    assert report.privacy is not None and not report.privacy.dropped_mid_protocol
    assert torch.allclose(state.base, simulated.base, atol=1e-6)
    stored = exchange.listing()
    assert not [p for p in stored if "/sites/" in p], "no plain update in the store"
    # each site's plain release input (as the simulation computes it): in no stored file, and
    # uncorrelated with the masked words the coordinator received
    plain = plain_inputs((root, cfg, manifest), coord.initial_state(), clients)
    files = [Path(exchange.root) / p for p in stored]
    for client in clients:
        masked = Path(exchange.root) / exchange.secagg(1, "masked", client)
        assert masked.is_file(), stored
        if users[client] is not None:
            assert owners([masked]) == {users[client][0]}  # masked at the site, by its user
        vector = plain[client][0].numpy()
        payload = open_envelope(
            masked.read_bytes(), site_keys(root, clients), sender=client, run="sitesrun5",
            round_=1, kind="secagg-masked",
        )  # fmt: skip
        words = decode_masked(client, payload, vector.size + 1).words[: vector.size]
        assert abs(np.corrcoef(words.astype(np.float64), vector.astype(np.float64))[0, 1]) < 0.1
        window = vector[:32].astype("<f4").tobytes()
        assert not [f for f in files if window in f.read_bytes()], client


def test_a_killed_site_is_dropped_at_the_deadline_and_rejoins_after_a_restart(federation_of_sites):
    from flows.sites import PrefectLauncher

    sites = federation_of_sites
    root, procs, manifest = sites.root, sites.procs, sites.manifest
    clients = manifest.client_ids
    wait_for_sites(sites.api, clients, procs, sites.logs)
    victim = clients[2]
    os.killpg(procs[f"site-{victim}"].pid, signal.SIGKILL)  # the site and any flow run of it
    procs[f"site-{victim}"].wait()
    blind = load_config(
        None, tiny_overrides(root, **SETTINGS, **{"data.partitions_dir": str(root / "none")})
    )
    coord = Federation.from_config(blind, manifest, ClientStore(root / "coordinator3"))
    known = site_keys(root, clients)
    exchange = Exchange(f"file://{root / 'exchange'}", "sitesrun3")
    publish_settings(exchange, sites.coordinator, sites.cfg)
    umask = os.umask(0)
    try:
        with prefect_at(sites.api):
            steps = SiteSteps(
                exchange, sites.coordinator, known, PrefectLauncher("sitesrun3"), deadline=15
            )
            state, first = run_round(
                coord, coord.initial_state(), clients, steps, min_clients=2, evaluate=False
            )
            assert state.round == 1 and [u.client for u in first.updates] == clients[:2]
            assert first.failed[victim].kind is FailureKind.TIMEOUT
            assert f"site '{victim}': nothing by the round's deadline" in str(first.failed[victim])
            sites.serve(victim)  # back: its worker subscribes again and gets its next round's run
            steps.deadline = 180
            state, second = run_round(coord, state, clients, steps, min_clients=2, evaluate=False)
    finally:
        os.umask(umask)
    assert state.round == 2 and [u.client for u in second.updates] == clients and not second.failed


class Meddling:
    """A :class:`flows.sites.PrefectLauncher` through which ``meddle(site, round_)`` changes
    what a site left in the exchange store after its ``train`` run finished and before the
    coordinator opens it (what a store, or someone with access to it, could do). Handles are the
    launcher's own; anything else is the launcher's."""

    def __init__(self, launcher, meddle: Callable[[str, int], None]) -> None:
        self.launcher, self.meddle = launcher, meddle
        self.launched: dict[int, tuple[object, str, int, str]] = {}

    def launch_all(self, sites: list[str], round_: int, task: str = "train"):
        handles = self.launcher.launch_all(sites, round_, task)
        for site, handle in handles.items():
            self.launched[id(handle)] = (handle, site, round_, task)
        return handles

    def wait(self, handle, timeout: float) -> None:
        self.launcher.wait(handle, timeout)
        _, site, round_, task = self.launched[id(handle)]
        if task == "train":
            self.meddle(site, round_)

    def __getattr__(self, name: str):
        return getattr(self.launcher, name)


def test_a_tampered_or_replayed_update_in_the_exchange_store_is_refused_naming_the_site(
    federation_of_sites,
):
    from flows.sites import PrefectLauncher

    sites = federation_of_sites
    root, manifest = sites.root, sites.manifest
    clients = manifest.client_ids
    wait_for_sites(sites.api, clients, sites.procs, sites.logs)
    blind = load_config(
        None, tiny_overrides(root, **SETTINGS, **{"data.partitions_dir": str(root / "none")})
    )
    coord = Federation.from_config(blind, manifest, ClientStore(root / "coordinator4"))
    exchange = Exchange(f"file://{root / 'exchange'}", "sitesrun4")
    publish_settings(exchange, sites.coordinator, sites.cfg)
    tampered, replayed = clients[0], clients[1]
    done = []

    def stored(round_: int, site: str) -> Path:
        return Path(exchange.root) / exchange.update(round_, site)

    def meddle(site: str, round_: int) -> None:
        if (site, round_) == (tampered, 1):  # one bit of its sealed update flipped
            blob = bytearray(stored(1, site).read_bytes())
            blob[len(blob) // 2] ^= 0x08
            stored(1, site).write_bytes(bytes(blob))
        elif (site, round_) == (replayed, 2):  # its genuine update of round 1, again
            shutil.copyfile(stored(1, site), stored(2, site))
        else:
            return
        done.append((site, round_))

    launcher = Meddling(PrefectLauncher("sitesrun4"), meddle)
    umask = os.umask(0)
    try:
        with prefect_at(sites.api):
            known = site_keys(root, clients)
            steps = SiteSteps(exchange, sites.coordinator, known, launcher, deadline=180)
            state, first = run_round(
                coord, coord.initial_state(), clients, steps, min_clients=2, evaluate=False
            )
            state, second = run_round(coord, state, clients, steps, min_clients=2, evaluate=False)
    finally:
        os.umask(umask)
    assert done == [(tampered, 1), (replayed, 2)]
    assert state.round == 2
    assert [u.client for u in first.updates] == [c for c in clients if c != tampered]
    assert list(first.failed) == [tampered]
    assert first.failed[tampered].kind is FailureKind.REJECTED
    assert f"site '{tampered}': update of round 1 refused: the signature does not verify" in str(
        first.failed[tampered]
    )
    assert [u.client for u in second.updates] == [c for c in clients if c != replayed]
    assert list(second.failed) == [replayed]
    assert second.failed[replayed].kind is FailureKind.REJECTED
    assert f"site '{replayed}': update of round 2 refused: a replay" in str(second.failed[replayed])


def test_no_row_of_a_site_is_in_the_exchange_store_prefect_or_mlflow(federation_of_sites):
    """Every file the parties share or the coordinator keeps (the exchange store, the Prefect
    server's home and database, the coordinator's MLflow store and artifacts, its working
    folder) is searched for every row of every site's partition, in bytes and as text (see
    tests.integration.rows), after the runs above: none is there."""
    sites = federation_of_sites
    root, manifest = sites.root, sites.manifest
    clients = manifest.client_ids
    partitions = {c: root / f"site-{c}" / "partition" / manifest.entry(c).file for c in clients}
    rows = {
        c: pd.read_parquet(path)[manifest.features].to_numpy(dtype=np.float32)
        for c, path in partitions.items()
    }
    finder = RowFinder(rows)
    # the search is real: it finds a row written down in each way, and a partition's rows
    probe = Path(tempfile.mkdtemp(prefix="fedmtl-rows-"))
    try:
        row = rows[clients[1]][3]
        for name, blob in encodings(row).items():
            (probe / f"{name}.bin").write_bytes(b"\x00(" + blob + b")\x01")
        table = pd.DataFrame([row], columns=manifest.features)
        table.to_parquet(probe / "row.parquet")
        table.assign(note="x").to_csv(probe / "row.csv", index=False)
        hits, _ = finder.in_folders(probe)
    finally:
        shutil.rmtree(probe)
    found = {h.encoding for h in hits if (h.site, h.row) == (clients[1], 3)}
    assert found == {*encodings(row), "a table row"}
    own = {(h.site, h.row) for h in finder.in_file(partitions[clients[0]])}
    assert own >= {(clients[0], i) for i in range(len(rows[clients[0]]))}

    shared = [root / "exchange", root / "prefect-server", coordinator_home(root)]
    hits, searched = finder.in_folders(*(f for f in shared if f.exists()))
    assert not hits, "rows of the sites' data found:\n" + "\n".join(map(str, hits[:20]))
    assert searched >= 10
    assert any((root / "prefect-server").rglob("*.db")), "the Prefect database was searched"
    tracking = load_config(None, coordinator_overrides(root)).tracking
    if Path(tracking.metrics_file).exists():  # test 2 ran: its MLflow store was searched
        assert Path(tracking.tracking_uri.removeprefix("sqlite:///")).is_file()
        assert any(Path(tracking.artifact_root).rglob("*"))
