"""Learning-rate tuning: every method chooses its own learning rate the same way, on other seeds.

    python -m benchmarks.tune_lr --scenarios digits-label-permutation \
        --methods fedmtl,gpfl,fedcp,ditto,fedavg-ft [--grid 0.1,...] [--tune-seeds 10,11,12]

The quality benchmark (:mod:`benchmarks.quality`) runs every method with the harness's shared
settings (``training.lr`` 0.2 on digits). Here each (scenario, method) instead takes the
learning rate of ``--grid`` with the best client-mean personalised accuracy averaged over the
**tuning seeds** (by default 10-12: other data draws, partitions and initialisations than the
reported seeds), and is then scored on the **reported seeds** (0-2, those of quality.md) at that
learning rate only: the choice never sees the numbers it is reported with. A run that diverges
(an update with NaN or inf, rejected by the server's screen) counts as failed for that learning
rate. Writes ``benchmarks/results/tuned/lr.md`` and ``lr.json`` (every run's records).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from benchmarks.quality import METHODS, RESULTS, SCENARIOS, check_names, run_one

GRID = (0.05, 0.1, 0.2, 0.3, 0.4, 0.6)
TUNE_SEEDS = (10, 11, 12)
REPORT_SEEDS = (0, 1, 2)
METRICS = ("personal_accuracy", "personal_accuracy_worst10", "personal_f1")


def _run(job: tuple) -> dict:
    scenario, method, seed, lr, workdir = job
    from fedmtl.rounds import RoundFailed
    from fedmtl.server.screening import RejectedUpdate

    try:
        records = run_one(scenario, method, seed, False, workdir, (f"training.lr={lr}",))
    except (RejectedUpdate, RoundFailed) as exc:  # diverged: updates with NaN are rejected
        return {"scenario": scenario, "method": method, "seed": seed, "lr": lr, "failed": str(exc)}
    values = {r["metric"]: r["value"] for r in records}
    return {
        "scenario": scenario,
        "method": method,
        "seed": seed,
        "lr": lr,
        **{m: values.get(m) for m in METRICS},
    }


def choose(runs: list[dict], grid: tuple[float, ...]) -> tuple[float, dict[float, float]]:
    """The learning rate with the best mean personalised accuracy over the tuning runs (a failed
    run scores 0; ties: the smaller learning rate) and each learning rate's mean."""
    means = {}
    for lr in grid:
        mine = [r for r in runs if r["lr"] == lr]
        means[lr] = sum(r.get("personal_accuracy") or 0.0 for r in mine) / max(len(mine), 1)
    best = max(grid, key=lambda lr: (means[lr], -lr))
    return best, means


def shared_settings(scenario: str, method: str) -> float | None:
    """The quality benchmark's client-mean personalised accuracy (shared settings, seeds 0-2)."""
    path = RESULTS / "quality.json"
    if not path.exists():
        return None
    got = [
        r["value"]
        for r in json.loads(path.read_text())
        if (r["scenario"], r["method"], r["metric"]) == (scenario, method, "personal_accuracy")
        and r["seed"] in REPORT_SEEDS
    ]
    return sum(got) / len(got) if got else None


def markdown(results: list[dict], commands: dict[str, str]) -> str:
    lines = [
        "# Learning rates tuned per method",
        "",
        "Each method's learning rate is chosen from the grid by its client-mean personalised "
        f"accuracy on the tuning seeds ({list(TUNE_SEEDS)} unless the command says otherwise) and "
        "reported on seeds "
        f"{list(REPORT_SEEDS)} at that learning rate (`benchmarks/tune_lr.py`). Shared settings: "
        "the quality benchmark's row (every method at the scenario's shared learning rate, the "
        "same reported seeds).",
        "",
    ]
    for scenario in dict.fromkeys(r["scenario"] for r in results):
        here = [r for r in results if r["scenario"] == scenario]
        grid = tuple(sorted({r["lr"] for r in here if r["phase"] == "tune"}))
        lines += [
            f"## {scenario}",
            "",
            commands.get(scenario, ""),
            "",
            "Tuning seeds, mean personalised accuracy (%) per learning rate (— : diverged on a "
            "seed):",
            "",
            "| method | " + " | ".join(f"{lr:g}" for lr in grid) + " |",
            "|---|" + "---|" * len(grid),
        ]
        chosen = {}
        for method in dict.fromkeys(r["method"] for r in here):
            tune = [r for r in here if r["method"] == method and r["phase"] == "tune"]
            best, means = choose(tune, grid)
            chosen[method] = best
            cells = []
            for lr in grid:
                failed = any("failed" in r for r in tune if r["lr"] == lr)
                text = "—" if failed else f"{100 * means[lr]:.1f}"
                cells.append(f"**{text}**" if lr == best else text)
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines += [
            "",
            "Reported seeds at the chosen learning rate (%, mean ± std over seeds):",
            "",
            "| method | chosen lr | personalised accuracy | worst-10 % | macro-F1 "
            "| shared settings |",
            "|---|---|---|---|---|---|",
        ]
        for method, lr in chosen.items():
            rep = [r for r in here if r["method"] == method and r["phase"] == "report"]
            cells = []
            for metric in METRICS:
                vals = [100 * r[metric] for r in rep if r.get(metric) is not None]
                if len(vals) < len(rep) or not vals:
                    cells.append("diverged")
                    continue
                std = statistics.stdev(vals) if len(vals) > 1 else 0.0
                cells.append(f"{statistics.fmean(vals):.2f} ± {std:.1f}")
            shared = shared_settings(scenario, method)
            cells.append("" if shared is None else f"{100 * shared:.2f}")
            lines.append(f"| {method} | {lr:g} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", required=True, help=f"from: {', '.join(SCENARIOS)}")
    parser.add_argument("--methods", required=True, help=f"from: {', '.join(METHODS)}")
    parser.add_argument("--grid", default=",".join(f"{g:g}" for g in GRID))
    parser.add_argument("--tune-seeds", default=",".join(map(str, TUNE_SEEDS)))
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", default=str(RESULTS / "tuned"))
    parser.add_argument(
        "--update",
        action="store_true",
        help="keep the existing lr.json's runs of other scenarios",
    )
    args = parser.parse_args(argv)
    args.argv = argv if argv is not None else __import__("sys").argv[1:]
    args.grid = tuple(float(g) for g in args.grid.split(","))
    args.tune_seeds = tuple(int(s) for s in args.tune_seeds.split(","))
    scenarios, methods = args.scenarios.split(","), args.methods.split(",")
    check_names(parser, scenarios, methods)
    if set(args.tune_seeds) & set(REPORT_SEEDS):
        parser.error(f"--tune-seeds must not include the reported seeds {list(REPORT_SEEDS)}")

    from fedmtl import quiet

    quiet.configure()
    start = time.perf_counter()
    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="fedmtl-tune-") as workdir:
        with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            tune_jobs = [
                (s, m, seed, lr, workdir)
                for s in scenarios
                for m in methods
                for lr in args.grid
                for seed in args.tune_seeds
            ]
            for r in pool.map(_run, tune_jobs):
                results.append({**r, "phase": "tune"})
                print(
                    f"  tune {r['scenario']} {r['method']} lr {r['lr']:g} seed {r['seed']}: "
                    f"{r.get('personal_accuracy', r.get('failed'))}",
                    flush=True,
                )
            report_jobs = []
            for s in scenarios:
                for m in methods:
                    tune = [r for r in results if (r["scenario"], r["method"]) == (s, m)]
                    lr, _ = choose(tune, args.grid)
                    report_jobs += [(s, m, seed, lr, workdir) for seed in REPORT_SEEDS]
            for r in pool.map(_run, report_jobs):
                results.append({**r, "phase": "report"})
    wall = time.perf_counter() - start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    commands = {
        s: f"`python -m benchmarks.tune_lr {' '.join(args.argv)}`: {wall / 60:.1f} min on "
        f"{os.cpu_count()} cores (tuning and reported runs)."
        for s in scenarios
    }
    if args.update and (out / "lr.json").exists():
        old = json.loads((out / "lr.json").read_text())
        results = [r for r in old["runs"] if r["scenario"] not in scenarios] + results
        commands = {**{k: v for k, v in old["commands"].items() if k not in scenarios}, **commands}
    (out / "lr.json").write_text(json.dumps({"commands": commands, "runs": results}, indent=1))
    text = markdown(results, commands)
    (out / "lr.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
