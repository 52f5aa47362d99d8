"""Speed benchmark: what the orchestration costs, against the plain torch floor.

    python -m benchmarks.speed [--quick] [--parts floor,fedmtl,loop,dask,scale] [--rounds N]

writes ``benchmarks/results/speed.md`` (tables) and ``speed.json``. Workload W: digits, 100
clients with 2-class shards, MLP 64-64-10, 5 local epochs, batch 16, SGD lr 0.05, FedAvg, 50
rounds (``--quick``: 10 rounds, 1,000-client scale only). In one run, side by side:

- **floor**: the same training as a plain sequential torch loop, one client after another,
  ``torch.set_num_threads(1)``, no framework (``floor_main`` below), in its own process;
- **fedmtl**: ``fedmtl train`` on the same validated partitions, embedded defaults (the
  ephemeral Prefect API, the SQLite MLflow store, per-round evaluation and tracking), in its
  own process: the whole-process wall time, the steady-state time per round (median of the
  flow's ``time/round_s`` after round 2) with its breakdown by step, and peak memory;
- **loop**: the same with ``training.batched=off`` (the per-client path): final metrics must
  agree with the batched path within 0.5 points;
- **dask**: a compute-heavy configuration (HAR, 30 clients, an MLP 64-1024-1024) on the Dask
  runner with 1 and with 2 local workers;
- **scale**: 1,000 and 10,000 Synthetic (MLR) clients per round through the core's round
  (batched local training, hierarchical aggregation, the server step): seconds per round and
  memory per client.

Every process's peak memory is its maximum resident set size (``os.wait4``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import write_results

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
WORK = REPO / ".fedmtl" / "bench" / "speed"

W = {
    "data.source": "digits",
    "data.partition.scheme": "shards",
    "data.partition.n_clients": 100,
    "data.partition.shards_per_client": 2,
    "model.hidden": [64],
    "training.local_epochs": 5,
    "training.batch_size": 16,
    "training.lr": 0.05,
    "algorithm.method": "fedavg",
    "training.rounds": 50,
}


def overrides(values: dict) -> list[str]:
    return [f"{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in values.items()]


def make_config(root: Path, values: dict):
    """The settings ``values`` with every path inside ``root``."""
    from fedmtl.config import load_config

    paths = {
        "data.raw_dir": root / "data/raw",
        "data.partitions_dir": root / "data/partitions",
        "data.validation_dir": root / "data/validation",
        "training.workdir": root / ".fedmtl",
        "tracking.tracking_uri": f"sqlite:///{root / 'mlflow/mlflow.db'}",
        "tracking.artifact_root": root / "mlflow/artifacts",
        "tracking.metrics_file": root / "metrics.json",
    }
    return load_config(None, overrides({**values, **paths}))


def prepare_data(root: Path, values: dict) -> Path:
    """Validated partitions for ``values`` in ``root`` and its parameter file; returns the file."""
    from fedmtl.config import dump_config
    from fedmtl.data import partition, prepare
    from fedmtl.data.manifest import read_manifest
    from fedmtl.data.validation import validate_partitions

    root.mkdir(parents=True, exist_ok=True)
    cfg = make_config(root, values)
    prepare(cfg.data)
    partition(cfg.data)
    validate_partitions(
        cfg.data.partitions_dir,
        read_manifest(cfg.data.partitions_dir),
        cfg.validation,
        cfg.data.validation_dir,
    )
    params = root / "params.yaml"
    params.write_text(dump_config(cfg))
    return params


def peak_of(args: list[str], cwd: Path, env: dict | None = None) -> tuple[float, float, str]:
    """Run a process to its end: (wall seconds, peak RSS in MiB, its stdout); raises on failure."""
    import tempfile

    with tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(
            args,
            cwd=cwd,
            env={**os.environ, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
        out = proc.stdout.read()  # not communicate(): it would reap the process before wait4
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        err.seek(0)
        errs = err.read()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(
            f"{' '.join(map(str, args))} failed ({code}):\n{out[-2000:]}\n{errs[-4000:]}"
        )
    return wall, usage.ru_maxrss / 1024, out


# -- the floor ---------------------------------------------------------------------------------


def floor_main(params: Path) -> None:
    """The reference: W as a plain sequential torch loop (prints one JSON line)."""
    import numpy as np
    import pandas as pd
    import torch
    from torch import nn

    from fedmtl.config import load_config

    torch.set_num_threads(1)
    cfg = load_config(params)
    parts = Path(cfg.data.partitions_dir)
    manifest = json.loads((parts / "manifest.json").read_text())
    features = manifest["features"]
    data = []
    for entry in manifest["clients"]:
        frame = pd.read_parquet(parts / entry["file"])
        train, test = frame[frame["split"] == "train"], frame[frame["split"] == "test"]
        data.append(
            (
                torch.tensor(train[features].to_numpy(np.float32)),
                torch.tensor(train["label"].to_numpy()),
                torch.tensor(test[features].to_numpy(np.float32)),
                torch.tensor(test["label"].to_numpy()),
            )
        )
    torch.manual_seed(0)
    hidden = cfg.model.hidden[0]
    model = nn.Sequential(nn.Linear(len(features), hidden), nn.ReLU(), nn.Linear(hidden, 10))
    global_w = [p.detach().clone() for p in model.parameters()]
    t = cfg.training
    generator = torch.Generator().manual_seed(0)
    per_round = []
    for _ in range(t.rounds):
        start = time.perf_counter()
        total = [torch.zeros_like(w) for w in global_w]
        n_all = 0
        for x, y, _, _ in data:
            with torch.no_grad():
                for p, w in zip(model.parameters(), global_w):
                    p.copy_(w)
            opt = torch.optim.SGD(model.parameters(), lr=t.lr)
            for _ in range(t.local_epochs):
                order = torch.randperm(len(x), generator=generator)
                for b in range(0, len(x), t.batch_size):
                    idx = order[b : b + t.batch_size]
                    opt.zero_grad()
                    nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
                    opt.step()
            with torch.no_grad():
                for acc, p in zip(total, model.parameters()):
                    acc.add_(p, alpha=len(x))
            n_all += len(x)
        global_w = [acc / n_all for acc in total]
        per_round.append(time.perf_counter() - start)
    with torch.no_grad():
        for p, w in zip(model.parameters(), global_w):
            p.copy_(w)
        accs = [
            float((model(xt).argmax(1) == yt).float().mean()) for _, _, xt, yt in data if len(xt)
        ]
    print(json.dumps({"per_round": per_round, "accuracy": sum(accs) / len(accs)}))


# -- parts ----------------------------------------------------------------------------------------


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def fedmtl_train(root: Path, params: Path, extra: list[str]) -> dict:
    """``fedmtl train`` in its own process; the wall time, peak memory and the flow's timings."""
    from mlflow.tracking import MlflowClient

    env = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    fedmtl = str(Path(sys.executable).parent / "fedmtl")
    sets = [a for o in extra for a in ("--set", o)]
    wall, peak, _ = peak_of([fedmtl, "train", "--params", str(params), *sets], root, env)
    metrics = json.loads((root / "metrics.json").read_text())
    client = MlflowClient(f"sqlite:///{root / 'mlflow/mlflow.db'}")
    run_id = metrics["mlflow_run_id"]

    def series(name: str) -> list[float]:
        return [
            m.value for m in sorted(client.get_metric_history(run_id, name), key=lambda m: m.step)
        ]

    rounds = series("time/round_s")
    steady = rounds[2:] or rounds
    steps = {
        s: median(series(f"time/{s}_s")[2:] or series(f"time/{s}_s"))
        for s in (
            "dispatch",
            "local_train",
            "group_aggregate",
            "global_merge",
            "evaluate",
            "tracking",
        )
    }
    return {
        "wall_s": wall,
        "peak_mib": peak,
        "round_s": median(steady),
        "steps_s": steps,
        "rounds": len(rounds),
        "accuracy": metrics.get("personal_accuracy"),
        "f1": metrics.get("personal_f1"),
        "run_id": run_id,
    }


def part_floor(params: Path, root: Path) -> dict:
    wall, peak, out = peak_of(
        [sys.executable, "-m", "benchmarks.speed", "--floor", str(params)], REPO
    )
    result = json.loads(out.strip().splitlines()[-1])
    per_round = result["per_round"]
    return {
        "wall_s": wall,
        "peak_mib": peak,
        "round_s": median(per_round[2:] or per_round),
        "accuracy": result["accuracy"],
    }


def part_dask(root: Path) -> dict:
    """A compute-heavy configuration on the Dask runner with 1 and 2 local workers (each a
    ``fedmtl train`` process of its own)."""
    heavy = {
        "data.source": "har",
        "model.hidden": [1024, 1024],
        "training.rounds": 5,
        "training.local_epochs": 3,
        "training.batch_size": 32,
        "training.batched": "off",
        "tracking.client_runs": False,
        "tracking.register_model": False,
        "runner.kind": "dask",
    }
    params = prepare_data(root, heavy)
    out = {}
    for workers in (1, 2):
        r = fedmtl_train(root, params, [f"runner.workers={workers}"])
        out[str(workers)] = {
            "wall_s": r["wall_s"],
            "round_s": r["round_s"],
            "train_s": r["steps_s"]["local_train"],
        }
    return out


def part_scale(n_clients: int, rounds: int = 3) -> dict:
    """``n_clients`` Synthetic MLR clients per round through the core's round, data in memory,
    in a process of its own (this one has MLflow and more loaded, whose objects the cyclic
    garbage collector would walk during the round; a training process freezes them)."""
    _, _, out = peak_of(
        [sys.executable, "-m", "benchmarks.scale", str(n_clients), str(rounds), "--json"], REPO
    )
    return json.loads(out.strip().splitlines()[-1])


# -- report -------------------------------------------------------------------------------------


def report(results: dict, quick: bool) -> str:
    lines = [
        "# Speed: orchestration against the plain torch floor",
        "",
        f"`python -m benchmarks.speed{' --quick' if quick else ''}` on this machine "
        f"({os.cpu_count()} cores). Workload W: digits, 100 clients × 2-class shards, "
        "MLP 64-64-10, "
        f"5 local epochs, batch 16, lr 0.05, FedAvg, {results['rounds']} rounds.",
        "",
    ]
    floor = results.get("floor")
    if floor:
        lines += [
            "## W end to end",
            "",
            "| path | whole process (s) | steady round (s) | × floor round | peak memory (MiB) "
            "| accuracy |",
            "|---|---|---|---|---|---|",
        ]
        for name, label in (
            ("floor", "floor: sequential torch, 1 thread"),
            ("fedmtl", "fedmtl train (batched), new MLflow store"),
            ("fedmtl_again", "fedmtl train (batched), again on that store"),
            ("loop", "fedmtl train, per-client path (`training.batched=off`)"),
        ):
            r = results.get(name)
            if r:
                lines.append(
                    f"| {label} | {r['wall_s']:.1f} | {r['round_s']:.3f} | "
                    f"{r['round_s'] / floor['round_s']:.2f} | {r['peak_mib']:.0f} | "
                    f"{r['accuracy']:.4f} |"
                )
        r = results.get("fedmtl")
        if r:
            again = results.get("fedmtl_again")
            again_text = (
                f"; run again on the existing store {again['wall_s']:.1f} s = "
                f"{again['wall_s'] / floor['wall_s']:.2f}×"
                if again
                else ""
            )
            lines += [
                "",
                f"Whole process: fedmtl {r['wall_s']:.1f} s = "
                f"{r['wall_s'] / floor['wall_s']:.2f}× the "
                f"floor's {floor['wall_s']:.1f} s{again_text} (target ≤ 1.5×). Steady round: "
                f"{r['round_s'] / floor['round_s']:.2f}× (target ≤ 1.0×).",
                "",
                "Steady-state time per round by step (median over rounds 3..N, seconds):",
                "",
                "| " + " | ".join(r["steps_s"]) + " |",
                "|" + "---|" * len(r["steps_s"]),
                "| " + " | ".join(f"{v:.3f}" for v in r["steps_s"].values()) + " |",
            ]
            loop = results.get("loop")
            if loop:
                lines += [
                    "",
                    "Batched vs per-client path, final personalised accuracy: "
                    f"{r['accuracy']:.4f} vs "
                    f"{loop['accuracy']:.4f} "
                    f"(difference {100 * abs(r['accuracy'] - loop['accuracy']):.2f} "
                    "points; target ≤ 0.5).",
                ]
    dask = results.get("dask")
    if dask:
        one, two = dask["1"], dask["2"]
        lines += [
            "",
            "## Dask runner, compute-heavy configuration",
            "",
            "HAR, 30 clients (one per user, 295–434 windows each), MLP 64-1024-1024 "
            "with two heads, "
            "3 local epochs, batch 32, 5 rounds, per-client path, one shard of clients per worker; "
            "the local_train step, median of rounds 3–5.",
            "",
            "| Dask workers | whole process (s) | local_train per round (s) |",
            "|---|---|---|",
            f"| 1 | {one['wall_s']:.1f} | {one['train_s']:.2f} |",
            f"| 2 | {two['wall_s']:.1f} | {two['train_s']:.2f} |",
            "",
            f"Speed-up of the training step with 2 workers: {one['train_s'] / two['train_s']:.2f}× "
            "(target ≥ 1.5×).",
        ]
    scale = results.get("scale")
    if scale:
        lines += [
            "",
            "## Many clients per round (Synthetic, MLR, core round, data in memory)",
            "",
            "| clients per round | seconds per round | process peak (MiB) | data (MiB) "
            "| MiB per client |",
            "|---|---|---|---|---|",
        ]
        for r in scale:
            lines.append(
                f"| {r['clients']:,} | {r['round_s']:.2f} | {r['peak_mib']:.0f} | "
                f"{r['data_mib']:.0f} | "
                f"{r['mib_per_client']:.3f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--parts", default="floor,fedmtl,loop,dask,scale")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS / "speed")
    parser.add_argument(
        "--update", action="store_true", help="keep the parts not run from the last results"
    )
    parser.add_argument("--floor", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.floor:
        floor_main(args.floor)
        return
    parts = set(args.parts.split(","))
    rounds = args.rounds or (10 if args.quick else 50)
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    results: dict = {"rounds": rounds}
    if args.update and args.out.with_suffix(".json").exists():
        results = {**json.loads(args.out.with_suffix(".json").read_text()), **results}
    params = prepare_data(WORK, {**W, "training.rounds": rounds})
    if "floor" in parts or "fedmtl" in parts:
        results["floor"] = part_floor(params, WORK)
        print("floor", results["floor"], flush=True)
    if "fedmtl" in parts:
        results["fedmtl"] = fedmtl_train(WORK, params, [])
        print("fedmtl", results["fedmtl"], flush=True)
        # the same command again, as a nightly run finds things: the MLflow store already exists
        results["fedmtl_again"] = fedmtl_train(WORK, params, [])
        print("fedmtl_again", results["fedmtl_again"], flush=True)
    if "loop" in parts:
        results["loop"] = fedmtl_train(WORK, params, ["training.batched=off"])
        print("loop", results["loop"], flush=True)
    if "dask" in parts and not args.quick:
        results["dask"] = part_dask(WORK / "heavy")
        print("dask", results["dask"], flush=True)
    if "scale" in parts:
        results["scale"] = [part_scale(1000)] + ([] if args.quick else [part_scale(10_000)])
        print("scale", results["scale"], flush=True)
    write_results(args.out, report(results, args.quick), results)


if __name__ == "__main__":
    main()
