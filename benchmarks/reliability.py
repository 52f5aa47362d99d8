"""Reliability benchmark: failing clients, Byzantine clients, and a crash with resume.

    python -m benchmarks.reliability [--quick] [--parts failures,byzantine,resume]

writes ``benchmarks/results/reliability.md`` and ``reliability.json``. Workload: digits split over
20 clients in 4 label-permutation groups, MLP 64-64-10, 5 local epochs, lr 0.05, 30 rounds
(``--quick``: 10). Parts:

- **failures**: ``fedmtl train`` (the Prefect flow, embedded defaults) fault-free, and with 30 % of
  the client training attempts failing (``faults.client_failure_rate=0.3``), with the default
  retries (``training.client_retries=2``, exponential backoff) and without any: the final
  personalised accuracy, how many clients came back on a retry or were lost, and wall time.
- **byzantine**: 20 % of the clients (4 of 20, the same every round) send sign-flipped ×10 updates,
  Gaussian noise 10× as long as their update, or train on flipped labels; each aggregation rule
  (``server.aggregator``) against each attack, for fedmtl and for FedAvg, through the core's
  round (:func:`fedmtl.federation.run_rounds`): the honest clients' final personalised accuracy
  (FedAvg: its global model) against the clean run with the plain mean.
- **resume**: ``fedmtl train`` killed with SIGKILL in the middle of a round
  (``faults.crash_at_round``), then ``fedmtl train --resume``: whether the final model is
  bit-identical to an uninterrupted run, and what each process cost.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import write_results
from benchmarks.speed import overrides, prepare_data

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
WORKLOAD = {
    "data.source": "digits",
    "data.partition.scheme": "label-permutation",
    "data.partition.n_clients": 20,
    "data.partition.n_groups": 4,
    "model.hidden": [64],
    "training.local_epochs": 5,
    "training.lr": 0.05,
    "tracking.client_runs": False,
}
RULES = ("mean", "median", "trimmed_mean", "multi_krum", "norm_bound")
ATTACKS = ("none", "sign_flip", "gaussian", "label_flip")
#: fedmtl on the grouped workload; FedAvg on an IID split of the same data, where its one global
#: model is the right model (on label-permuted groups it is at 33 % before any attack)
BYZANTINE_CASES = (("fedmtl", "label-permutation"), ("fedavg", "iid"))


def fedmtl_train(root: Path, params: Path, *extra: str) -> tuple[int, float, dict]:
    """``fedmtl train`` as a user runs it: (exit code, wall seconds, its metrics file)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=str(root / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    metrics = root / "metrics.json"
    metrics.unlink(missing_ok=True)
    command = [
        str(Path(sys.executable).parent / "fedmtl"),
        "train",
        "--params",
        str(params),
        *extra,
    ]
    start = time.perf_counter()
    with open(root / "train.log", "w") as log:
        code = subprocess.run(
            command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT
        ).returncode
    wall = time.perf_counter() - start
    return code, wall, json.loads(metrics.read_text()) if metrics.exists() else {}


def sets(values: dict) -> list[str]:
    return [a for o in overrides(values) for a in ("--set", o)]


def run_totals(tracking_uri: str, run_id: str) -> dict[str, float]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    return {
        key: sum(m.value for m in client.get_metric_history(run_id, key))
        for key in ("clients/retried", "clients/failed")
    }


# -- failing clients --------------------------------------------------------------------------


def part_failures(root: Path, rounds: int) -> list[dict]:
    params = prepare_data(root, {**WORKLOAD, "training.rounds": rounds})
    tracking = f"sqlite:///{root / 'mlflow/mlflow.db'}"
    rows = []
    for name, values in [
        ("fault-free", {}),
        ("30 % failing, retried", {"faults.client_failure_rate": 0.3}),
        (
            "30 % failing, no retries",
            {"faults.client_failure_rate": 0.3, "training.client_retries": 0},
        ),
    ]:
        code, wall, metrics = fedmtl_train(root, params, *sets(values))
        row = {
            "setting": name,
            "exit_code": code,
            "seconds": wall,
            "rounds": metrics.get("rounds"),
            "personal_accuracy": metrics.get("personal_accuracy"),
            "group_accuracy": metrics.get("group_accuracy"),
            **(run_totals(tracking, metrics["mlflow_run_id"]) if metrics else {}),
        }
        rows.append(row)
        print("failures", row, flush=True)
    return rows


# -- Byzantine clients ------------------------------------------------------------------------


def part_byzantine(root: Path, rounds: int) -> list[dict]:
    import torch

    from benchmarks.speed import make_config
    from fedmtl.client.store import ClientStore
    from fedmtl.data.manifest import read_manifest
    from fedmtl.eval.metrics import summarize
    from fedmtl.federation import Federation
    from fedmtl.rounds import run_rounds

    torch.set_num_threads(1)
    rows = []
    for method, scheme in BYZANTINE_CASES:
        workload = {
            **WORKLOAD,
            "training.rounds": rounds,
            "algorithm.method": method,
            "data.partition.scheme": scheme,
        }
        data = root / scheme
        prepare_data(data, workload)
        manifest = read_manifest(data / "data/partitions")
        metric = "personal/accuracy/mean" if method == "fedmtl" else "global/accuracy/mean"
        for attack in ATTACKS:
            for rule in RULES:
                values = {**workload, "server.aggregator": rule}
                if attack != "none":
                    values.update(
                        {"faults.byzantine_fraction": 0.2, "faults.byzantine_attack": attack}
                    )
                cfg = make_config(data, values)
                with tempfile.TemporaryDirectory() as store:
                    fed = Federation.from_config(cfg, manifest, ClientStore(Path(store)))
                    start = time.perf_counter()
                    _, records, _ = run_rounds(
                        fed, manifest.client_ids, rounds, evaluate_every=rounds
                    )
                    seconds = time.perf_counter() - start
                honest = records[~records["client"].isin(fed.byzantine)]
                groups = (
                    {c: fed.groups.get(c) for c in sorted(fed.byzantine)} if scheme != "iid" else {}
                )
                row = {
                    "method": method,
                    "scheme": scheme,
                    "attack": attack,
                    "rule": rule,
                    "byzantine": sorted(fed.byzantine),
                    "byzantine_groups": groups,
                    "accuracy": summarize(honest)[metric],
                    "seconds": seconds,
                }
                rows.append(row)
                print("byzantine", row, flush=True)
    return rows


# -- crash and resume -------------------------------------------------------------------------


def part_resume(root: Path, rounds: int) -> dict:
    import torch

    from fedmtl.lifecycle.checkpoint import CheckpointStore
    from fedmtl.lifecycle.runs import RunRecord

    params = prepare_data(root, {**WORKLOAD, "training.rounds": rounds})
    code_ref, wall_ref, ref = fedmtl_train(root, params)
    crash_at = rounds // 2 + 1
    code_crash, wall_crash, _ = fedmtl_train(
        root, params, "--set", f"faults.crash_at_round={crash_at}"
    )
    code_resume, wall_resume, resumed = fedmtl_train(root, params, "--resume")
    runs = {}
    for record in (root / ".fedmtl" / "runs").glob("*/run.json"):
        run = RunRecord.load(record.parent)
        runs[run.mlflow_run_id] = CheckpointStore(record.parent / "checkpoints").load(rounds).state
    a, b = runs.get(ref.get("mlflow_run_id")), runs.get(resumed.get("mlflow_run_id"))
    identical = bool(
        a is not None
        and b is not None
        and torch.equal(a.base, b.base)
        and all(
            torch.equal(a.group_heads[g][t], b.group_heads[g][t])
            for g in a.group_heads
            for t in a.group_heads[g]
        )
    )
    out = {
        "rounds": rounds,
        "crash_at_round": crash_at,
        "uninterrupted_exit": code_ref,
        "crashed_exit": code_crash,
        "killed_by_sigkill": code_crash == -signal.SIGKILL,
        "resumed_exit": code_resume,
        "uninterrupted_s": wall_ref,
        "crashed_s": wall_crash,
        "resumed_s": wall_resume,
        "bit_identical": identical,
        "personal_accuracy": [ref.get("personal_accuracy"), resumed.get("personal_accuracy")],
    }
    print("resume", out, flush=True)
    return out


# -- report -------------------------------------------------------------------------------------


def report(results: dict, quick: bool) -> str:
    lines = [
        "# Reliability: failing clients, Byzantine clients, crash and resume",
        "",
        f"`python -m benchmarks.reliability{' --quick' if quick else ''}` on this machine "
        f"({os.cpu_count()} cores). Digits over 20 clients in 4 label-permutation groups, "
        "MLP 64-64-10, "
        f"{results.get('rounds')} rounds.",
        "",
    ]
    if results.get("failures"):
        rows = results["failures"]
        base = rows[0]["personal_accuracy"]
        lines += [
            "## Failing clients (`fedmtl train`, the Prefect flow)",
            "",
            "| setting | exit | rounds | personalised accuracy | Δ points | group-model accuracy | "
            "clients back on a retry | client-rounds lost | seconds |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            acc, group = r.get("personal_accuracy"), r.get("group_accuracy")
            delta = "" if acc is None or base is None else f"{100 * (acc - base):+.2f}"
            lines.append(
                f"| {r['setting']} | {r['exit_code']} | {r.get('rounds')} | "
                f"{acc if acc is None else f'{acc:.4f}'} | {delta} | "
                f"{'' if group is None else f'{group:.4f}'} | {r.get('clients/retried', 0):.0f} | "
                f"{r.get('clients/failed', 0):.0f} | {r['seconds']:.1f} |"
            )
    if results.get("byzantine"):
        rows = results["byzantine"]
        lines += [
            "",
            "## Byzantine clients (20 %: 4 of 20, the same every round)",
            "",
            "Honest clients' final accuracy (fedmtl: personalised; FedAvg: its global model); "
            "in brackets "
            "the difference from the clean run with the plain mean, in points.",
            "",
        ]
        for method in dict.fromkeys(r["method"] for r in rows):
            part = [r for r in rows if r["method"] == method]
            clean = next(
                r["accuracy"] for r in part if r["attack"] == "none" and r["rule"] == "mean"
            )
            scheme = part[0].get("scheme", "label-permutation")
            groups = part[-1].get("byzantine_groups") or {}
            where = (
                (
                    " Byzantine clients and their groups: "
                    + ", ".join(f"{c} ({g})" for c, g in groups.items())
                    + "."
                )
                if groups
                else ""
            )
            lines += [
                f"### {method} ({scheme} split)",
                "",
                f"{len(part[-1]['byzantine'])} Byzantine clients of 20." + where,
                "",
                "| attack | " + " | ".join(RULES) + " |",
                "|---|" + "---|" * len(RULES),
            ]
            for attack in ATTACKS:
                cells = []
                for rule in RULES:
                    r = next(x for x in part if x["attack"] == attack and x["rule"] == rule)
                    cells.append(f"{r['accuracy']:.3f} ({100 * (r['accuracy'] - clean):+.1f})")
                lines.append(f"| {attack} | " + " | ".join(cells) + " |")
            lines.append("")
    if results.get("resume"):
        r = results["resume"]
        lines += [
            "## Crash and resume (`fedmtl train`, SIGKILL mid-round, then `fedmtl train --resume`)",
            "",
            "| rounds | killed in round | killed by SIGKILL | resume exit "
            "| final model bit-identical | "
            "uninterrupted (s) | crashed run (s) | resumed run (s) |",
            "|---|---|---|---|---|---|---|---|",
            f"| {r['rounds']} | {r['crash_at_round']} | {r['killed_by_sigkill']} | "
            f"{r['resumed_exit']} | "
            f"{r['bit_identical']} | {r['uninterrupted_s']:.1f} | {r['crashed_s']:.1f} | "
            f"{r['resumed_s']:.1f} |",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--parts", default="failures,byzantine,resume")
    parser.add_argument("--out", type=Path, default=RESULTS / "reliability")
    parser.add_argument(
        "--update", action="store_true", help="keep the parts not run from the last results"
    )
    args = parser.parse_args()
    rounds = 10 if args.quick else 30
    results: dict = {}
    if args.update and args.out.with_suffix(".json").exists():
        results = json.loads(args.out.with_suffix(".json").read_text())
    results["rounds"] = rounds
    parts = set(args.parts.split(","))
    with tempfile.TemporaryDirectory(prefix="fedmtl-reliability-") as tmp:
        if "failures" in parts:
            results["failures"] = part_failures(Path(tmp) / "failures", rounds)
        if "byzantine" in parts:
            results["byzantine"] = part_byzantine(Path(tmp) / "byzantine", rounds)
        if "resume" in parts:
            results["resume"] = part_resume(Path(tmp) / "resume", min(rounds, 10))
    write_results(args.out, report(results, args.quick), results)


if __name__ == "__main__":
    main()
