"""Quality benchmark: every method on every scenario, several seeds.

    python -m benchmarks.quality [--quick] [--scenarios a,b] [--methods x,y] [--seeds N] [--jobs J]

writes ``benchmarks/results/quality.md`` (tables) and ``quality.json`` (one record per scenario,
method, seed and metric). Each run uses the core's round loop (:func:`fedmtl.federation.run_rounds`,
the same client and server code the Prefect flow calls) on partitions made by the data pipeline
(prepare + partition; GE validation is skipped, the generated data is valid by construction) and is
scored once, after the last round, on every client's held-out split. Seeds change the data draw,
the partition and the model initialisation together.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

DIGITS = {"data.source": "digits", "data.partition.n_clients": 20}
#: FedProx's setting: 30 devices, MLR 60 → 10, sizes lognormal(4, 2) + 50
FEDPROX = {
    "data.source": "synthetic",
    "data.synthetic.n_clients": 30,
    "model.hidden": [],
    "training.lr": 0.05,
    "training.batch_size": 16,
}
#: pFedMe's setting: 100 users, sizes (lognormal(4, 2) + 50) × 5 (capped at 20,000 rows)
PFEDME = {
    "data.source": "synthetic",
    "data.synthetic.n_clients": 100,
    "data.synthetic.size_scale": 5,
    "model.hidden": [],
    "training.lr": 0.05,
    "training.batch_size": 64,
}

#: Synthetic(0.5, 0.5) with three tasks (label, label_1 binary, label_2) on a shared 32-unit base
SYN_TASKS = {
    **FEDPROX,
    "data.synthetic.alpha": 0.5,
    "data.synthetic.beta": 0.5,
    "data.synthetic.n_tasks": 3,
    "model.hidden": [32],
}


@dataclass(frozen=True)
class Scenario:
    name: str
    overrides: dict
    rounds: int = 30
    quick_rounds: int = 10
    grouped: bool = False  # the data has true groups (ARI is scored)
    extra_methods: tuple[str, ...] = field(default_factory=tuple)


SCENARIOS = {
    s.name: s
    for s in [
        Scenario("digits-shards", {**DIGITS, "data.partition.scheme": "shards"}),
        Scenario(
            "digits-dirichlet",
            {**DIGITS, "data.partition.scheme": "dirichlet", "data.partition.alpha": 0.1},
        ),
        Scenario(
            "digits-label-permutation",
            {**DIGITS, "data.partition.scheme": "label-permutation", "data.partition.n_groups": 4},
            grouped=True,
        ),
        Scenario(
            "digits-rotation",
            {**DIGITS, "data.partition.scheme": "rotation", "data.partition.n_groups": 4},
            grouped=True,
        ),
        Scenario(
            "synthetic-0.5-fedprox",
            {**FEDPROX, "data.synthetic.alpha": 0.5, "data.synthetic.beta": 0.5},
        ),
        Scenario(
            "synthetic-1-fedprox", {**FEDPROX, "data.synthetic.alpha": 1, "data.synthetic.beta": 1}
        ),
        Scenario(
            "synthetic-0.5-pfedme-mlr",
            {**PFEDME, "data.synthetic.alpha": 0.5, "data.synthetic.beta": 0.5},
            rounds=20,
            quick_rounds=5,
        ),
        Scenario(
            "synthetic-1-pfedme-mlr",
            {**PFEDME, "data.synthetic.alpha": 1, "data.synthetic.beta": 1},
            rounds=20,
            quick_rounds=5,
        ),
        Scenario(
            "synthetic-0.5-pfedme-mlp",
            {
                **PFEDME,
                "data.synthetic.alpha": 0.5,
                "data.synthetic.beta": 0.5,
                "model.hidden": [20],
            },
            rounds=20,
            quick_rounds=5,
        ),
        Scenario(
            "har", {"data.source": "har", "model.hidden": [128, 64], "training.lr": 0.05}, rounds=30
        ),
        # clients that differ in their tasks: half the users hold no is_transition labels
        Scenario(
            "har-missing",
            {
                "data.source": "har",
                "model.hidden": [128, 64],
                "training.lr": 0.05,
                "data.partition.missing_tasks": 0.5,
            },
            rounds=30,
        ),
        # three label functions of the same x on a shared base; with and without half the
        # clients lacking each of the two further tasks
        Scenario("synthetic-tasks", {**SYN_TASKS}),
        Scenario("synthetic-tasks-missing", {**SYN_TASKS, "data.partition.missing_tasks": 0.5}),
        # FLamby's Fed-Heart-Disease: 4 hospitals, 13 features, logistic regression (FLamby's
        # baseline model), its own train/test split; benchmarks.heart gives the pooled and
        # local-only references on the same split
        Scenario(
            "heart",
            {
                "data.source": "heart",
                "model.hidden": [],
                "training.lr": 0.05,
                "training.batch_size": 16,
            },
            rounds=30,
        ),
    ]
}
#: scenarios with at most this many clients (cross-silo: heart's 4 hospitals) also record each
#: client's personalised accuracy and macro-F1 (``client/<id>/<metric>``; benchmarks.heart)
PER_CLIENT_UP_TO = 8
QUICK_SCENARIOS = ("digits-shards", "digits-label-permutation", "synthetic-0.5-fedprox")
#: the methods; "fedmtl" runs with its defaults (the personal step's choice by approximate
#: leave-one-out, ``loo``); "fedmtl-cluster" learns its groups by clustering; "fedmtl-off" keeps
#: one λ (0.3) for every client; "fedmtl-cv" chooses λ per client by 5-fold CV
METHODS = (
    "local",
    "fedavg",
    "fedavg-ft",
    "fedper",
    "fedrep",
    "lg-fedavg",
    "ditto",
    "pfedme",
    "ifca",
    "fedala",
    "feddbe",
    "gpfl",
    "fedem",
    "fedbabu",
    "fedrod",
    "fedcp",
    "fedmtl",
    "fedmtl-cluster",
    "fedmtl-off",
    "fedmtl-cv",
)
METHOD_OVERRIDES = {
    "fedmtl-cluster": {"algorithm.method": "fedmtl", "grouping.method": "cluster"},
    "fedmtl-off": {"algorithm.method": "fedmtl", "algorithm.personal_lambda_search": "off"},
    "fedmtl-cv": {"algorithm.method": "fedmtl", "algorithm.personal_lambda_search": "cv"},
}


def scenario_data(
    scenario: str, method: str, seed: int, quick: bool, workdir: str, extra: tuple[str, ...] = ()
):
    """The run's configuration and manifest; the scenario's data for ``seed`` is prepared and
    partitioned under ``workdir`` on first use (shared by every method's run)."""
    from fedmtl.config import load_config
    from fedmtl.data import partition, prepare
    from fedmtl.data.manifest import read_manifest

    sc = SCENARIOS[scenario]
    data_dir = Path(workdir) / f"{scenario}-s{seed}"
    values = {
        **sc.overrides,
        "data.seed": seed,
        "training.seed": seed,
        "training.rounds": sc.quick_rounds if quick else sc.rounds,
        "data.raw_dir": str(data_dir / "raw"),
        "data.partitions_dir": str(data_dir / "partitions"),
        "algorithm.method": method,
        "tracking.register_model": False,  # the core's round loop only: nothing is registered
        **METHOD_OVERRIDES.get(method, {}),
    }
    cfg = load_config(
        None,
        [f"{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in values.items()]
        + list(extra),
    )
    if not (data_dir / "partitions" / "manifest.json").exists():
        prepare(cfg.data)
        partition(cfg.data)
    return cfg, read_manifest(cfg.data.partitions_dir)


def run_one(
    scenario: str, method: str, seed: int, quick: bool, workdir: str, extra: tuple[str, ...] = ()
) -> list[dict]:
    """Train ``method`` on ``scenario`` with ``seed``; return metric records."""
    import torch

    torch.set_num_threads(1)
    from fedmtl.client.store import ClientStore
    from fedmtl.federation import Federation
    from fedmtl.rounds import run_rounds
    from fedmtl.server.grouping import adjusted_rand

    sc = SCENARIOS[scenario]
    cfg, manifest = scenario_data(scenario, method, seed, quick, workdir, extra)
    store = Path(tempfile.mkdtemp(dir=workdir, prefix="store-"))
    fed = Federation.from_config(cfg, manifest, ClientStore(store))
    start = time.perf_counter()
    state, records, history = run_rounds(
        fed, manifest.client_ids, cfg.training.rounds, evaluate_every=cfg.training.rounds
    )
    wall = time.perf_counter() - start
    shutil.rmtree(store, ignore_errors=True)
    final = history[-1]
    metrics = {
        "personal_accuracy": final.get("personal/accuracy/mean"),
        "personal_accuracy_worst10": final.get("personal/accuracy/worst10"),
        "personal_f1": final.get("personal/f1/mean"),
        "group_accuracy": final.get("group/accuracy/mean"),
        "group_accuracy_worst10": final.get("group/accuracy/worst10"),
        "global_accuracy": final.get("global/accuracy/mean"),
        "personalisation_gain": final.get("personalisation_gain/accuracy"),
        "wall_s": wall,
    }
    for key, value in final.items():  # further tasks (multi-task scenarios), e.g. is_transition/
        if key.count("/") == 3 and key.startswith(tuple(t.name + "/" for t in manifest.tasks[1:])):
            task, variant, metric, stat = key.split("/")
            if variant == "personal" and stat == "mean" and metric in ("accuracy", "f1"):
                metrics[f"{task}/personal_{metric}"] = value
    if len(manifest.client_ids) <= PER_CLIENT_UP_TO and not records.empty:  # cross-silo: per site
        first = manifest.tasks[0].name
        mine = records[(records["variant"] == "personal") & (records["task"] == first)]
        for row in mine.itertuples():
            for metric in ("accuracy", "f1"):
                if hasattr(row, metric):
                    metrics[f"client/{row.client}/{metric}"] = float(getattr(row, metric))
    if sc.grouped and fed.grouping_method not in (None, "column"):
        metrics["ari"] = adjusted_rand(state.assignment, fed.groups)
    return [
        {"scenario": scenario, "method": method, "seed": seed, "metric": k, "value": v}
        for k, v in metrics.items()
        if v is not None
    ]


def _run_star(args: tuple) -> list[dict]:
    return run_one(*args)


def summarise(records: list[dict]) -> dict:
    """mean and std over seeds per (scenario, method, metric)."""
    import pandas as pd

    frame = pd.DataFrame(records)
    return (
        frame.groupby(["scenario", "method", "metric"])["value"]
        .agg(["mean", "std", "count"])
        .reset_index()
    )


def markdown(records: list[dict], args: argparse.Namespace, wall: float) -> str:
    import pandas as pd

    table = summarise(records)
    lines = [
        "# Quality benchmark",
        "",
        f"`python -m benchmarks.quality {' '.join(args.argv)}`: {args.seeds} seed(s) in this run, "
        f"{'quick' if args.quick else 'full'} mode, {wall / 60:.1f} min on {os.cpu_count()} cores"
        + (
            " (these runs only; the other runs' records were kept from the existing quality.json)."
            if args.update
            else "."
        ),
        "",
        "Mean over seeds (± standard deviation) of the client-mean on held-out splits, "
        "after the last round. "
        "**Bold**: the best method of the scenario (highest mean).",
        "",
    ]
    for metric, title in (
        ("personal_accuracy", "Personalised accuracy (client mean, %)"),
        ("personal_accuracy_worst10", "Worst-10 % client accuracy (%)"),
        ("personal_f1", "Personalised macro-F1 (client mean, %)"),
        ("group_accuracy", "Group model accuracy (client mean, %)"),
        ("group_accuracy_worst10", "Group model worst-10 % client accuracy (%)"),
        ("global_accuracy", "Global model accuracy (client mean, %)"),
        ("personalisation_gain", "Personalisation gain, personalised − global accuracy (points)"),
        ("ari", "Adjusted Rand index of learned groups"),
        ("wall_s", "Wall time per run (s)"),
    ):
        part = table[table["metric"] == metric]
        if part.empty:
            continue
        scale = 1 if metric in ("ari", "wall_s") else 100
        scenarios = [s for s in SCENARIOS if s in set(part["scenario"])]
        methods = [m for m in METHODS if m in set(part["method"])]
        lines += [
            f"## {title}",
            "",
            "| method | " + " | ".join(scenarios) + " |",
            "|---|" + "---|" * len(scenarios),
        ]
        best = {s: part[part["scenario"] == s]["mean"].max() for s in scenarios}
        for m in methods:
            cells = []
            for s in scenarios:
                row = part[(part["scenario"] == s) & (part["method"] == m)]
                if row.empty:
                    cells.append("")
                    continue
                mean, std = float(row["mean"].iloc[0]) * scale, row["std"].iloc[0]
                text = f"{mean:.1f}" if metric != "ari" else f"{mean:.2f}"
                if pd.notna(std) and metric != "wall_s":
                    text += (
                        f" ± {float(std) * scale:.1f}"
                        if metric != "ari"
                        else f" ± {float(std):.2f}"
                    )
                if metric not in ("wall_s",) and abs(float(row["mean"].iloc[0]) - best[s]) < 1e-12:
                    text = f"**{text}**"
                cells.append(text)
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += _further_tasks(table)
    return "\n".join(lines)


def _further_tasks(table) -> list[str]:
    """The further tasks' personalised accuracy and macro-F1 (multi-task scenarios; with
    ``data.partition.missing_tasks``, over the clients that hold the task's labels)."""
    part = table[table["metric"].str.contains("/personal_")]
    if part.empty:
        return []
    lines = [
        "## Further tasks: personalised accuracy / macro-F1 (client mean over the clients that "
        "hold the task, %)",
        "",
    ]
    for scenario in [s for s in SCENARIOS if s in set(part["scenario"])]:
        rows = part[part["scenario"] == scenario]
        tasks = sorted({m.split("/")[0] for m in rows["metric"]})
        methods = [m for m in METHODS if m in set(rows["method"])]
        lines += [
            f"**{scenario}**",
            "",
            "| method | " + " | ".join(tasks) + " |",
            "|---|" + "---|" * len(tasks),
        ]
        for m in methods:
            cells = []
            for t in tasks:
                got = {
                    k: rows[(rows["method"] == m) & (rows["metric"] == f"{t}/personal_{k}")]
                    for k in ("accuracy", "f1")
                }
                if got["accuracy"].empty:
                    cells.append("")
                    continue
                acc = float(got["accuracy"]["mean"].iloc[0]) * 100
                f1 = float(got["f1"]["mean"].iloc[0]) * 100 if not got["f1"].empty else float("nan")
                cells.append(f"{acc:.1f} / {f1:.1f}")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def check_names(parser: argparse.ArgumentParser, scenarios: list[str], methods: list[str]) -> None:
    """Refuse (``parser.error``) a scenario or method this benchmark does not know, naming it."""
    for name in scenarios:
        if name not in SCENARIOS:
            parser.error(f"unknown scenario '{name}'; choose from {', '.join(SCENARIOS)}")
    for name in methods:
        if name not in METHODS:
            parser.error(f"unknown method '{name}'; choose from {', '.join(METHODS)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="3 scenarios, fewer rounds, 1 seed (< 5 min)"
    )
    parser.add_argument(
        "--scenarios", default=None, help=f"comma-separated, from: {', '.join(SCENARIOS)}"
    )
    parser.add_argument(
        "--methods", default=None, help=f"comma-separated, from: {', '.join(METHODS)}"
    )
    parser.add_argument(
        "--seeds", type=int, default=None, help="seeds 0..N-1 (default 3; quick: 1)"
    )
    parser.add_argument(
        "--first-seed",
        type=int,
        default=0,
        help="seeds first..first+N-1 (with --update: add seeds)",
    )
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel processes")
    parser.add_argument(
        "--out", default=str(RESULTS), help="folder for quality.md and quality.json"
    )
    parser.add_argument(
        "--update",
        action="store_true",
        help="merge into the existing quality.json: replace only the runs made now",
    )
    parser.add_argument(
        "--set",
        dest="extra",
        action="append",
        default=[],
        help="a setting for every run, key=value (repeatable; for tuning)",
    )
    args = parser.parse_args(argv)
    args.argv = argv if argv is not None else __import__("sys").argv[1:]
    scenarios = (
        args.scenarios.split(",")
        if args.scenarios
        else list(QUICK_SCENARIOS if args.quick else SCENARIOS)
    )
    methods = args.methods.split(",") if args.methods else list(METHODS)
    check_names(parser, scenarios, methods)
    args.seeds = args.seeds or (1 if args.quick else 3)

    from fedmtl import quiet

    quiet.configure()
    start = time.perf_counter()
    records: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="fedmtl-quality-") as workdir:
        # prepare each scenario's data once per seed before the parallel runs
        extra = tuple(args.extra)
        jobs = [
            (s, m, seed, args.quick, workdir, extra)
            for s in scenarios
            for seed in range(args.first_seed, args.first_seed + args.seeds)
            for m in methods
        ]
        with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            firsts = [j for j in jobs if j[1] == methods[0]]
            for res in pool.map(_run_star, firsts):
                records += res
                _progress(res)
            rest = [j for j in jobs if j[1] != methods[0]]
            for res in pool.map(_run_star, rest):
                records += res
                _progress(res)
    wall = time.perf_counter() - start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.update and (out / "quality.json").exists():
        done = {(r["scenario"], r["method"], r["seed"]) for r in records}
        kept = [
            r
            for r in json.loads((out / "quality.json").read_text())
            if (r["scenario"], r["method"], r["seed"]) not in done
        ]
        records = kept + records
    (out / "quality.json").write_text(json.dumps(records, indent=1) + "\n")
    text = markdown(records, args, wall)
    (out / "quality.md").write_text(text + "\n")
    print(text)


def _progress(res: list[dict]) -> None:
    if not res:
        return
    head = res[0]
    acc = next((r["value"] for r in res if r["metric"] == "personal_accuracy"), float("nan"))
    wall = next((r["value"] for r in res if r["metric"] == "wall_s"), float("nan"))
    print(
        f"  {head['scenario']:28s} {head['method']:15s} seed {head['seed']}: "
        f"personalised accuracy {acc:.3f} ({wall:.0f} s)",
        flush=True,
    )


if __name__ == "__main__":
    main()
