"""What fedmtl's default personal step costs: a run with ``personal_lambda_search: loo`` (the
default) against the fixed λ (``off``), same scenario, seed and process.

    python -m benchmarks.personal_step [--scenarios a,b] [--repeats 2]

Each scenario runs off, loo, off, loo, ... after one warm-up run (imports, first-touch
allocations); the table keeps each setting's fastest run (the least disturbed by the machine)
and both settings' personalised accuracy. Writes ``benchmarks/results/personal-step.md``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from benchmarks.quality import SCENARIOS, run_one

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT = (
    "digits-shards,digits-dirichlet,digits-label-permutation,digits-rotation,"
    "synthetic-0.5-fedprox,synthetic-1-fedprox,synthetic-0.5-pfedme-mlr,har,heart"
)


def measure(scenario: str, repeats: int, workdir: str) -> dict:
    runs: dict[str, list[tuple[float, float]]] = {"fedmtl-off": [], "fedmtl": []}
    for _ in range(repeats):
        for method in runs:
            metrics = {
                r["metric"]: r["value"] for r in run_one(scenario, method, 0, False, workdir)
            }
            runs[method].append((metrics["wall_s"], metrics["personal_accuracy"]))
    off, loo = min(w for w, _ in runs["fedmtl-off"]), min(w for w, _ in runs["fedmtl"])
    return {
        "scenario": scenario,
        "off_s": off,
        "loo_s": loo,
        "ratio": loo / off,
        "off_acc": runs["fedmtl-off"][0][1],
        "loo_acc": runs["fedmtl"][0][1],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", default=DEFAULT)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    scenarios = args.scenarios.split(",")
    for name in scenarios:
        if name not in SCENARIOS:
            parser.error(f"unknown scenario '{name}'; choose from {', '.join(SCENARIOS)}")

    from fedmtl import quiet

    quiet.configure()
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedmtl-personal-step-") as workdir:
        run_one("heart", "fedmtl-off", 0, False, workdir)  # warm-up
        for scenario in scenarios:
            rows.append(measure(scenario, args.repeats, workdir))
            r = rows[-1]
            print(
                f"  {scenario:28s} off {r['off_s']:6.2f} s  loo {r['loo_s']:6.2f} s  "
                f"×{r['ratio']:.2f}",
                flush=True,
            )
    lines = [
        "# The default personal step's cost",
        "",
        f"`python -m benchmarks.personal_step --repeats {args.repeats}` on {os.cpu_count()} "
        "cores: one seed (0), the whole run (training and the final evaluation, where the "
        "personal step runs) through the core's round loop; the fastest of "
        f"{args.repeats} runs per setting, interleaved in one process after a warm-up.",
        "",
        "| scenario | fixed λ, `off` (s) | `loo`, the default (s) | × | personalised accuracy "
        "off / loo |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['scenario']} | {r['off_s']:.2f} | {r['loo_s']:.2f} | {r['ratio']:.2f} | "
            f"{r['off_acc'] * 100:.1f} / {r['loo_acc'] * 100:.1f} |"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "personal-step.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
