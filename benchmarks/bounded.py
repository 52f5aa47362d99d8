"""Bounded influence on honest clients: ``server.max_norm_ratio`` (default 10) against off.

Every update whose norm exceeds the ratio times the round's lower median norm is refused
(``Federation.screen``). On honest federations that must refuse nothing and change nothing:
this benchmark trains each quality scenario (``benchmarks.quality``'s settings and data) with
the default bound and without it, and reports the accuracies and how many updates were refused
over the whole run. Writes benchmarks/results/bounded.md and .json.

    python -m benchmarks.bounded          # every scenario but HAR, fedmtl and fedavg, seed 0
    python -m benchmarks.bounded --scenarios har --methods fedmtl
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.quality import SCENARIOS, scenario_data

RESULTS = Path(__file__).parent / "results"
SETTINGS = {"bounded (ratio 10)": (), "off": ("server.max_norm_ratio=null",)}


def run(scenario: str, method: str, seed: int, extra: tuple[str, ...], workdir: str) -> dict:
    import torch

    torch.set_num_threads(1)
    from fedmtl.client.store import ClientStore
    from fedmtl.federation import Federation
    from fedmtl.rounds import run_rounds

    cfg, manifest = scenario_data(scenario, method, seed, False, workdir, extra)
    store = Path(tempfile.mkdtemp(dir=workdir, prefix="store-"))
    fed = Federation.from_config(cfg, manifest, ClientStore(store))
    start = time.perf_counter()
    _, _, history = run_rounds(
        fed, manifest.client_ids, cfg.training.rounds, evaluate_every=cfg.training.rounds
    )
    wall = time.perf_counter() - start
    shutil.rmtree(store, ignore_errors=True)
    final = history[-1]
    return {
        "personal": final.get("personal/accuracy/mean"),
        "global": final.get("global/accuracy/mean"),
        "refused": final.get("clients/refused_total", 0.0),
        "wall_s": wall,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenarios", default=",".join(s for s in SCENARIOS if s != "har"))
    parser.add_argument("--methods", default="fedmtl,fedavg")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedmtl-bounded-") as workdir:
        for scenario in args.scenarios.split(","):
            for method in args.methods.split(","):
                row = {"scenario": scenario, "method": method}
                for name, extra in SETTINGS.items():
                    row[name] = run(scenario, method, args.seed, extra, workdir)
                rows.append(row)
                b, o = row["bounded (ratio 10)"], row["off"]
                print(
                    f"{scenario:28s} {method:8s} "
                    f"personal {b['personal']:.4f} vs {o['personal']:.4f}  "
                    f"global {b['global']:.4f} vs {o['global']:.4f}  refused {b['refused']:.0f}",
                    flush=True,
                )
    lines = [
        "# Bounded influence on honest clients (`python -m benchmarks.bounded`)",
        "",
        f"Seed {args.seed}, each scenario's rounds as in `benchmarks.quality`; "
        "accuracies are client means on the "
        "held-out splits; *refused* counts the updates refused over the whole run.",
        "",
        "| scenario | method | personal, bounded | personal, off | "
        "global, bounded | global, off | refused |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        b, o = row["bounded (ratio 10)"], row["off"]
        lines.append(
            f"| {row['scenario']} | {row['method']} | {b['personal']:.4f} | {o['personal']:.4f} | "
            f"{b['global']:.4f} | {o['global']:.4f} | {b['refused']:.0f} |"
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bounded.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "bounded.json").write_text(json.dumps(rows, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
