"""What one linear model per client can reach on the Synthetic scenarios (no federation).

    python -m benchmarks.ceiling [--scenarios a,b] [--seeds N] [--jobs J]

writes ``benchmarks/results/ceiling.md`` (table) and ``ceiling.json`` (one record per scenario,
seed and estimator). Each client of the quality benchmark's Synthetic scenarios (the same data,
partitions and train/held-out splits, :func:`benchmarks.quality.scenario_data`) fits scikit-learn's
multinomial logistic regression on its own train rows, alone:

- ``C = c`` for each c of :data:`CS`, the same C for every client; the best of them, chosen by
  looking at the held-out accuracy, is an *oracle* (optimistic) figure;
- ``C by 5-fold CV``: each client picks its own C from :data:`CS` by 5-fold cross-validation
  (accuracy) on its train rows, then refits: what a careful local-only practitioner would do.

The table sets these beside the quality benchmark's local-only and fedmtl rows
(``quality.json``). The scenarios' labels are a linear function of the features per client
(y = argmax(W_k x + b_k)) and W_k shares nothing across clients but its prior's scale, so this
shows what a well-tuned linear personal model reaches without any federation.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from benchmarks.quality import scenario_data

RESULTS = Path(__file__).resolve().parent / "results"
SYNTHETIC = ("synthetic-0.5-fedprox", "synthetic-1-fedprox", "synthetic-0.5-pfedme-mlr")
#: scikit-learn's C (inverse regularisation strength), half-decade steps
CS = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 1000.0)
FOLDS = 5


def _client_accuracies(x_tr, y_tr, x_te, y_te) -> dict[str, float]:
    import numpy as np
    from sklearn.model_selection import StratifiedKFold

    out = {f"C={c:g}": acc for c, acc in zip(CS, _path(x_tr, y_tr, x_te, y_te))}
    folds = min(FOLDS, int(np.bincount(y_tr).max()))
    if folds >= 2:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # classes with fewer rows than folds
            cv = StratifiedKFold(folds, shuffle=True, random_state=0)
            scores = np.zeros(len(CS))
            for fit_rows, held in cv.split(x_tr, y_tr):
                scores += _path(x_tr[fit_rows], y_tr[fit_rows], x_tr[held], y_tr[held])
        best = CS[int(np.argmax(scores))]
    else:
        best = 1.0
    out["cv"] = out[f"C={best:g}"]
    return out


def _path(x_tr, y_tr, x_te, y_te) -> list[float]:
    """Held-out accuracy of the fit at each C of :data:`CS`, walked upwards, each fit warm-started
    from the previous one (the same convex optima, far fewer L-BFGS steps at large C). Train rows
    of one class (a small client, or one of its folds): every fit predicts that class."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    if len(np.unique(y_tr)) < 2:
        return [float(np.mean(y_te == y_tr[0]))] * len(CS)
    model = LogisticRegression(max_iter=5000, warm_start=True)
    scores = []
    for c in CS:
        model.set_params(C=c)
        scores.append(float(model.fit(x_tr, y_tr).score(x_te, y_te)))
    return scores


def run_one(scenario: str, seed: int, workdir: str) -> list[dict]:
    import numpy as np

    from fedmtl.client.data import load_client_data

    cfg, manifest = scenario_data(scenario, "local", seed, False, workdir)
    task = manifest.tasks[0].name
    per_client = []
    for client in manifest.client_ids:
        data = load_client_data(cfg.data.partitions_dir, manifest, client)
        if data.n_test == 0 or data.n_train == 0:
            continue
        per_client.append(
            _client_accuracies(
                data.x_train.numpy(),
                data.y_train[task].numpy(),
                data.x_test.numpy(),
                data.y_test[task].numpy(),
            )
        )
    return [
        {
            "scenario": scenario,
            "seed": seed,
            "estimator": k,
            "value": float(np.mean([c[k] for c in per_client])),
        }
        for k in per_client[0]
    ]


def _star(args: tuple) -> list[dict]:
    return run_one(*args)


def markdown(records: list[dict], quality: list[dict], argv: list[str], wall: float) -> str:
    import pandas as pd

    frame = pd.DataFrame(records)
    seeds = sorted(frame["seed"].unique())
    scenarios = [s for s in SYNTHETIC if s in set(frame["scenario"])]
    q = (
        pd.DataFrame(quality)
        if quality
        else pd.DataFrame(columns=["scenario", "method", "seed", "metric", "value"])
    )
    q = q[(q["metric"] == "personal_accuracy") & q["seed"].isin(seeds)]

    def mean_of(part: pd.DataFrame) -> str:
        return f"{100 * part['value'].mean():.1f}" if not part.empty else ""

    lines = [
        "# Linear ceiling of the Synthetic scenarios",
        "",
        f"`python -m benchmarks.ceiling {' '.join(argv)}`: seeds {', '.join(map(str, seeds))}; "
        f"{wall / 60:.1f} min on {os.cpu_count()} cores.",
        "",
        "Client-mean accuracy (%) on the held-out splits, mean over the seeds; one scikit-learn "
        "logistic regression per client on its own train rows (see the module docstring). "
        "`local` and `fedmtl`: the quality benchmark's rows for the same seeds.",
        "",
        "| estimator | " + " | ".join(scenarios) + " |",
        "|---|" + "---|" * len(scenarios),
    ]
    rows = [(f"per-client LR, C = {c:g}", f"C={c:g}") for c in CS] + [
        ("per-client LR, C by 5-fold CV", "cv")
    ]
    for label, key in rows:
        cells = [
            mean_of(frame[(frame["scenario"] == s) & (frame["estimator"] == key)])
            for s in scenarios
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    oracle = []
    for s in scenarios:
        part = frame[(frame["scenario"] == s) & (frame["estimator"] != "cv")]
        oracle.append(f"{100 * part.groupby('estimator')['value'].mean().max():.1f}")
    lines.append("| per-client LR, best single C (oracle) | " + " | ".join(oracle) + " |")
    for method in ("local", "fedmtl"):
        cells = [mean_of(q[(q["scenario"] == s) & (q["method"] == method)]) for s in scenarios]
        lines.append(f"| quality benchmark: {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--scenarios",
        default=",".join(SYNTHETIC),
        help=f"comma-separated, from: {', '.join(SYNTHETIC)}",
    )
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel processes")
    parser.add_argument(
        "--out", default=str(RESULTS), help="folder for ceiling.md and ceiling.json"
    )
    args = parser.parse_args(argv)
    argv = argv if argv is not None else __import__("sys").argv[1:]
    scenarios = args.scenarios.split(",")
    for name in scenarios:
        if name not in SYNTHETIC:
            parser.error(f"unknown scenario '{name}'; choose from {', '.join(SYNTHETIC)}")
    start = time.perf_counter()
    records: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="fedmtl-ceiling-") as workdir:
        jobs = [(s, seed, workdir) for s in scenarios for seed in range(args.seeds)]
        with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            for res in pool.map(_star, jobs):
                records += res
                cv = next(r["value"] for r in res if r["estimator"] == "cv")
                print(
                    f"  {res[0]['scenario']:28s} seed {res[0]['seed']}: C by CV {100 * cv:.1f} %",
                    flush=True,
                )
    wall = time.perf_counter() - start
    quality_file = RESULTS / "quality.json"
    quality = json.loads(quality_file.read_text()) if quality_file.exists() else []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ceiling.json").write_text(json.dumps(records, indent=1) + "\n")
    text = markdown(records, quality, argv, wall)
    (out / "ceiling.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
