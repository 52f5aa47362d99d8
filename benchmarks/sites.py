"""Sites benchmark: rounds at site processes through a real Prefect server, against the
simulation of the same work (issue 18).

    python -m benchmarks.sites [--sites 3,10] [--rounds 3] [--modes plain,secagg]
                               [--hidden 512,384] [--sources digits,har]

For each data source, number of sites and mode: a ``prefect server`` on 127.0.0.1, one ``fedmtl
site serve`` process per site (one client each; the MLP's hidden widths ``--hidden``: 512,384 is
a ~1 MB model), and the coordinator's round loop with :class:`fedmtl.sites.rounds.SiteSteps`
(``PrefectLauncher``); the same partitions and seeds in the simulation (``InProcess``, per-
client path). ``secagg``: the secure sum on (SecAgg+ across the site processes). Reports seconds
per round (median), where a round's time goes at the sites (from the task runs' own timestamps:
start = the task run created until it runs, i.e. Prefect's push to the site's worker; run = the
site's task itself), bytes per site per round through the exchange store, and the gap in final
personalised accuracy. Writes ``benchmarks/results/sites.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from benchmarks import write_results

RESULTS = Path(__file__).resolve().parent / "results"
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Timed:
    """A launcher that keeps the round's task runs, to read their timestamps after it."""

    def __init__(self, inner) -> None:
        self.inner, self.runs, self.submitting = inner, [], 0.0

    def launch_all(self, sites, round_, task="train"):
        start = time.perf_counter()
        handles = self.inner.launch_all(sites, round_, task)
        self.submitting += time.perf_counter() - start
        self.runs.extend(handles.values())
        return handles

    def wait(self, handle, timeout):
        return self.inner.wait(handle, timeout)

    def finished(self, handle):
        return self.inner.finished(handle)

    def phases(self) -> tuple[float, float, float]:
        """Medians over this round's task runs: (created → running, running → done), and the
        seconds the coordinator spent submitting them."""
        from prefect import get_client

        starts, runs = [], []
        with get_client(sync_client=True) as client:
            for handle in self.runs:
                run = client.read_task_run(handle.task_run_id)
                if run.start_time and run.end_time:
                    starts.append((run.start_time - run.created).total_seconds())
                    runs.append((run.end_time - run.start_time).total_seconds())
        self.runs, submitting, self.submitting = [], self.submitting, 0.0
        return (
            statistics.median(starts) if starts else float("nan"),
            statistics.median(runs) if runs else float("nan"),
            submitting,
        )


POSTGRES_BIN = Path("/usr/lib/postgresql")


def postgres_bin() -> Path | None:
    """The folder of a local PostgreSQL's ``initdb`` and ``pg_ctl``, if there is one."""
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    versions = sorted(POSTGRES_BIN.glob("*/bin/pg_ctl"))
    return versions[-1].parent if versions else None


def start_postgres(root: Path) -> tuple[str, list[str]]:
    """A throwaway PostgreSQL cluster under ``root`` for the Prefect server (as the ``postgres``
    user when run as root: PostgreSQL refuses root): (its SQLAlchemy URL, the command that
    stops it)."""
    pg = postgres_bin()
    if pg is None:
        raise RuntimeError("--database postgres: no PostgreSQL here (pg_ctl not found)")
    data, port = root / "pgdata", free_port()
    data.mkdir(parents=True)
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(data, "postgres")
        os.chmod(root, 0o755)
        as_user = ["runuser", "-u", "postgres", "--"]
    subprocess.run(
        [*as_user, str(pg / "initdb"), "-D", str(data), "-A", "trust", "-U", "prefect"],
        check=True,
        capture_output=True,
    )
    options = f"-p {port} -k {data} -c listen_addresses=127.0.0.1"
    subprocess.run(
        [*as_user, str(pg / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(data / "log")]
        + ["-w", "start"],
        check=True,
        capture_output=True,
    )
    stop = [*as_user, str(pg / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]
    # the cluster's own database "postgres" holds Prefect's tables (a throwaway cluster)
    return f"postgresql+asyncpg://prefect@127.0.0.1:{port}/postgres", stop


def one(
    n_sites: int,
    rounds: int,
    mode: str,
    hidden: str,
    source: str = "digits",
    database: str = "sqlite",
) -> dict:
    import torch

    torch.set_num_threads(1)  # as each site (the same sums: the same model, to the bit)
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from fedmtl.client.store import ClientStore
    from fedmtl.config import load_config
    from fedmtl.data import partition, prepare
    from fedmtl.data.manifest import read_manifest
    from fedmtl.eval.metrics import summarize
    from fedmtl.federation import Federation
    from fedmtl.rounds import InProcess, run_round
    from fedmtl.sites.exchange import Exchange
    from fedmtl.sites.identity import COORDINATOR, Identity, KnownParties
    from fedmtl.sites.rounds import SiteSteps
    from fedmtl.sites.site import publish_settings, site_partition
    from flows.sites import PING, PrefectLauncher, online

    root = Path(tempfile.mkdtemp(prefix="fedmtl-bench-sites-"))
    settings = {
        "data.source": source,
        "data.har.max_users": n_sites,  # HAR: one client per user, the first N users
        "data.partition.n_clients": n_sites,
        "data.partition.n_groups": 1 if n_sites < 6 else 2,  # SecAgg+ needs ≥ 3 a group
        "model.hidden": f"[{hidden}]",
        "privacy.secure_sum.enabled": mode == "secagg",
        "privacy.evaluation.client_metrics": True,
        "training.batched": "off",
        "training.rounds": rounds,
        "training.local_epochs": 5,
        "data.raw_dir": root / "data/raw",
        "data.partitions_dir": root / "data/partitions",
        "data.validation_dir": root / "data/validation",
        "training.workdir": root / ".fedmtl",
    }
    cfg = load_config(None, [f"{k}={v}" for k, v in settings.items()])
    prepare(cfg.data)
    partition(cfg.data)
    manifest = read_manifest(cfg.data.partitions_dir)
    clients = manifest.client_ids
    api = f"http://127.0.0.1:{free_port()}/api"
    env = {
        **os.environ,
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",
        "PREFECT_HOME": str(root / "prefect"),
    }
    procs: list[subprocess.Popen] = []
    stop_database: list[str] = []

    def start(args: list[str], cwd: Path, extra: dict | None = None) -> None:
        log = open(cwd / "process.log", "a")  # noqa: SIM115 - closed with the process's end
        procs.append(
            subprocess.Popen(
                args,
                cwd=cwd,
                env={**env, **(extra or {})},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )

    coordinator = Identity.generate(COORDINATOR)
    coordinator.save(root / "coordinator-keys")
    try:
        server_env = {}
        if database == "postgres":
            url, stop_database = start_postgres(root)
            server_env = {"PREFECT_SERVER_DATABASE_CONNECTION_URL": url}
        start(
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
            server_env,
        )
        end = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{api}/health", timeout=2):
                    break
            except OSError:
                if time.monotonic() > end:
                    raise RuntimeError("prefect server did not start") from None
                time.sleep(0.5)
        known = KnownParties()
        for client in clients:
            home = root / f"site-{client}"
            site_partition(cfg.data.partitions_dir, client, home / "partition")
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "cli",
                    "site",
                    "init",
                    "--site",
                    client,
                    "--partitions",
                    str(home / "partition"),
                    "--exchange",
                    f"file://{root / 'exchange'}",
                    "--coordinator-key",
                    str(root / "coordinator-keys" / "coordinator.pub"),
                    "--dir",
                    str(home / "site"),
                ],
                env=env,
                check=True,
                capture_output=True,
            )
            known.add(client, Identity.load(home / "site" / "keys", client).public)
            start(
                [sys.executable, "-m", "cli", "site", "serve", "--dir", str(home / "site")],
                home,
                # one thread each: the sites share this machine's cores (each has its own in a
                # deployment); the simulation too (torch's sums depend on the thread count)
                {"PREFECT_HOME": str(home / "prefect"), "OMP_NUM_THREADS": "1"},
            )
        with temporary_settings(updates={PREFECT_API_URL: api}):
            end = time.monotonic() + 180
            while len(online(clients)) < len(clients):
                if time.monotonic() > end:
                    missing = sorted(set(clients) - set(online(clients)))
                    raise RuntimeError(f"sites {missing} did not come up")
                time.sleep(0.5)
        exchange = Exchange(f"file://{root / 'exchange'}", "bench")
        publish_settings(exchange, coordinator, cfg)
        coord = Federation.from_config(cfg, manifest, ClientStore(root / "coordinator"))
        sim = Federation.from_config(cfg, manifest, ClientStore(root / "sim"))
        state_sites = state_sim = coord.initial_state()
        at_sites, simulated, traffic, phases = [], [], [], []
        with temporary_settings(updates={PREFECT_API_URL: api}):
            launcher = Timed(PrefectLauncher("bench"))
            steps = SiteSteps(exchange, coordinator, known, launcher, deadline=300)
            for r in range(rounds):
                last = r == rounds - 1
                start_t = time.perf_counter()
                state_sites, report_sites = run_round(
                    coord, state_sites, clients, steps, evaluate=last
                )
                at_sites.append(time.perf_counter() - start_t)
                phases.append((*launcher.phases(), report_sites.seconds["group_aggregate"]))
                traffic.append(
                    sum(a + b for a, b in steps.traffic.values()) / max(len(steps.traffic), 1)
                )
                start_t = time.perf_counter()
                state_sim, report_sim = run_round(
                    sim, state_sim, clients, InProcess(), evaluate=last
                )
                simulated.append(time.perf_counter() - start_t)
            # Prefect's floor: rounds of a task that does nothing at every site (submit, push,
            # the site's task engine, the coordinator's wait), through the same launcher
            floor = []
            for r in range(5):
                start_t = time.perf_counter()
                for handle in launcher.launch_all(clients, r, PING).values():
                    launcher.wait(handle, 120)
                floor.append(time.perf_counter() - start_t)
            launcher.phases()
        acc_sites = summarize(report_sites.records)["personal/accuracy/mean"]
        acc_sim = summarize(report_sim.records)["personal/accuracy/mean"]
        # a site missing from the last round's evaluation (late, failed) changes the mean: named
        records = report_sites.records
        evaluated = set(records["client"].astype(str)) if len(records) else set()
        missing = sorted(set(clients) - evaluated)
        # steady rounds: after the first (each site process's start: its first model, its
        # partition, torch's first calls) and before the last (it evaluates too)
        steady = slice(1, -1) if rounds > 2 else slice(0, 1)
        train_sites = statistics.median(at_sites[steady])
        train_sim = statistics.median(simulated[steady])
        return {
            "source": source,
            "database": database,
            "sites": n_sites,
            "mode": mode,
            "model_floats": int(coord.initial_state().base.numel()),
            "start_s": statistics.median(p[0] for p in phases[steady]),
            "run_s": statistics.median(p[1] for p in phases[steady]),
            "submit_s": statistics.median(p[2] for p in phases[steady]),
            "aggregate_s": statistics.median(p[3] for p in phases[steady]),
            "rounds": rounds,
            "round_s_sites": train_sites,
            "round_s_sim": train_sim,
            "floor_s": statistics.median(floor),
            "first_round_s_sites": at_sites[0],
            "first_round_s_sim": simulated[0],
            "last_round_with_evaluation_s_sites": at_sites[-1],
            "last_round_with_evaluation_s_sim": simulated[-1],
            "bytes_per_site_round": traffic[0],
            "personal_accuracy_sites": acc_sites,
            "personal_accuracy_sim": acc_sim,
            "gap_points": 100 * (acc_sites - acc_sim),
            "sites_missing_from_evaluation": missing,
        }
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        time.sleep(2)
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        if stop_database:
            subprocess.run(stop_database, check=False, capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def report(rows: list[dict]) -> str:
    cores = os.cpu_count()
    lines = [
        "# Sites: rounds at site processes through Prefect, against the simulation",
        "",
        f"`python -m benchmarks.sites` on this machine ({cores} cores): one client per "
        "site, 5 local epochs, FedMTL, the per-client path in both, one torch thread per site and "
        "for the simulation (the same sums: the same model); a real Prefect server and "
        "one `fedmtl site serve` process (a Prefect task worker) per site. Round: a steady "
        "training round (the median of all but the first and the last); first: the first "
        "round (each site process loads its partition and model, torch's first calls); "
        "submit: the coordinator's time creating the round's task runs (all sites); start "
        "and run: the median site task run's time from created to running (Prefect's push "
        "to the site's task worker) and from running to done (the site's "
        "task); aggregate: the group aggregate step (with SecAgg+: the protocol after training); "
        "Prefect's floor: a round of the `ping` task (nothing at the site) through the same "
        "launcher, server and workers (median of 5): what any round costs before work.",
        "",
        "| data | Prefect database | sites | mode | model (MB) | round at sites (s) "
        "| submit / start / run at a site / aggregate (s) "
        "| simulated (s) | × | Prefect's floor (s) | first round, sites / sim (s) "
        "| last round with evaluation, sites / sim (s) "
        "| bytes per site per round | personalised accuracy sites / sim | gap (points) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = r["round_s_sites"] / r["round_s_sim"]
        sites_s, sim_s = (
            r["last_round_with_evaluation_s_sites"],
            r["last_round_with_evaluation_s_sim"],
        )
        last = f"{sites_s:.2f} / {sim_s:.3f}"
        first = (
            f"{r['first_round_s_sites']:.2f} / {r['first_round_s_sim']:.3f}"
            if "first_round_s_sites" in r
            else "-"
        )
        accuracy = f"{r['personal_accuracy_sites']:.4f} / {r['personal_accuracy_sim']:.4f}"
        lines.append(
            f"| {r.get('source', 'digits')} | {r.get('database', 'sqlite')} | {r['sites']} "
            f"| {r['mode']} "
            f"| {4 * r['model_floats'] / 1e6:.2f} "
            f"| {r['round_s_sites']:.2f} | {r['submit_s']:.1f} / {r['start_s']:.1f} / "
            f"{r['run_s']:.1f} / {r['aggregate_s']:.1f} "
            f"| {r['round_s_sim']:.3f} | {ratio:.1f} | {r.get('floor_s', float('nan')):.2f} "
            f"| {first} | "
            f"{last} | {r['bytes_per_site_round']:,.0f} | {accuracy} | {r['gap_points']:+.2f} |"
        )
    for r in rows:
        if r.get("sites_missing_from_evaluation"):
            lines.append(
                f"\n{r.get('source', 'digits')}, {r['sites']} sites, {r['mode']}: not in the last "
                f"round's evaluation: {', '.join(r['sites_missing_from_evaluation'])} (the gap "
                "compares means over different clients)"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", default="3,10")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--modes", default="plain,secagg")
    parser.add_argument("--hidden", default="512,384", help="the MLP's hidden widths")
    parser.add_argument("--out", type=Path, default=RESULTS / "sites")
    parser.add_argument("--sources", default="digits", help="digits, har (the har extra)")
    parser.add_argument(
        "--database",
        default="sqlite",
        help="the Prefect server's database: sqlite (its default) or postgres (a throwaway "
        "local cluster; what Prefect advises for many concurrent clients)",
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)  # N,MODE,SOURCE,DB: one row, as JSON
    args = parser.parse_args()
    if args.one:
        n, mode, *source = args.one.split(",")
        print(json.dumps(one(int(n), args.rounds, mode, args.hidden, *source)))
        return
    rows = []
    for source in args.sources.split(","):
        for n in [int(x) for x in args.sites.split(",")]:
            for mode in args.modes.split(","):
                # a process each: Prefect's clients (events, waiters) keep the first API they met
                done = subprocess.run(
                    [sys.executable, "-m", "benchmarks.sites"]
                    + ["--one", f"{n},{mode},{source},{args.database}"]
                    + ["--rounds", str(args.rounds), "--hidden", args.hidden],
                    capture_output=True,
                    text=True,
                    check=False,
                )
                if done.returncode != 0:
                    raise RuntimeError(f"{source}, {n} sites, {mode}: {done.stderr[-3000:]}")
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(rows[-1], flush=True)
    write_results(args.out, report(rows), {"rows": rows})


if __name__ == "__main__":
    main()
