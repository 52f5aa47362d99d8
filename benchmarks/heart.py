"""Fed-Heart-Disease's references: what federated training is judged against (issue 19).

    python -m benchmarks.heart

On the ``heart`` source's split (FLamby's: 4 hospitals, their own train/test rows; the quality
benchmark's ``heart`` scenario, :func:`benchmarks.quality.scenario_data`), scikit-learn's logistic
regression fitted

- **pooled (centralised)**: on every hospital's train rows together, as if the data could be
  pooled (C by 5-fold cross-validation on the pooled train rows), scored on each hospital's
  test rows;
- **local-only**: each hospital alone on its own train rows (C by 5-fold CV where it has two
  classes with enough rows; Switzerland's 30 train rows are all positive: it predicts that
  class);

and reports the client mean of accuracy and macro-F1 (the quality benchmark's statistics) beside
the quality benchmark's heart rows (``quality.json``). The split is FLamby's own (no seed to
vary): one run. Writes ``benchmarks/results/heart.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import warnings
from pathlib import Path

from benchmarks import write_results
from benchmarks.quality import scenario_data

RESULTS = Path(__file__).resolve().parent / "results"
#: scikit-learn's C (inverse regularisation strength), half-decade steps
CS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)


def _fit(x, y):
    """Logistic regression with C by 5-fold stratified CV (accuracy); a constant predictor
    where the rows hold one class."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold

    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2:
        return lambda x_new: np.full(len(x_new), classes[0])
    folds = min(5, int(counts.min()))
    if folds < 2:
        return LogisticRegression(max_iter=5000).fit(x, y).predict
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cv = StratifiedKFold(folds, shuffle=True, random_state=0)
        return LogisticRegressionCV(Cs=list(CS), cv=cv, max_iter=5000).fit(x, y).predict


def references(workdir: str) -> dict[str, dict[str, float]]:
    """estimator -> {accuracy, f1}: client means over the hospitals' test rows."""
    import numpy as np
    from sklearn.metrics import accuracy_score, f1_score

    from fedmtl.client.data import load_client_data

    cfg, manifest = scenario_data("heart", "local", 0, False, workdir)
    task = manifest.tasks[0].name
    data = {c: load_client_data(cfg.data.partitions_dir, manifest, c) for c in manifest.client_ids}
    pooled = _fit(
        np.concatenate([d.x_train.numpy() for d in data.values()]),
        np.concatenate([d.y_train[task].numpy() for d in data.values()]),
    )
    out: dict[str, dict[str, list[float]]] = {"pooled LR": {}, "local LR": {}}
    for client, d in data.items():
        x_te, y_te = d.x_test.numpy(), d.y_test[task].numpy()
        local = _fit(d.x_train.numpy(), d.y_train[task].numpy())
        for name, predict in (("pooled LR", pooled), ("local LR", local)):
            y_hat = predict(x_te)
            scores = out[name]
            scores.setdefault("accuracy", []).append(accuracy_score(y_te, y_hat))
            scores.setdefault("f1", []).append(
                f1_score(y_te, y_hat, average="macro", labels=[0, 1], zero_division=0)
            )
            scores.setdefault(f"client/{client}/accuracy", []).append(scores["accuracy"][-1])
            scores.setdefault(f"client/{client}/f1", []).append(scores["f1"][-1])
    return {name: {k: float(np.mean(v)) for k, v in scores.items()} for name, scores in out.items()}


def markdown(refs: dict[str, dict[str, float]], quality: list[dict]) -> str:
    import pandas as pd

    from benchmarks.quality import METHODS

    hospitals = ("cleveland", "hungary", "switzerland", "va")
    lines = [
        "# Fed-Heart-Disease: federated methods against pooled and local-only references",
        "",
        "`python -m benchmarks.heart`: FLamby's split (4 hospitals, their train/test rows); "
        "client means over the hospitals' test rows. References: scikit-learn logistic "
        "regression, C by 5-fold CV, pooled (all train rows together) and local-only (each "
        "hospital alone). Methods: the quality benchmark's `heart` rows (logistic regression "
        "trained federated, personalised models, mean over its seeds; ± the standard deviation). "
        "Per hospital: accuracy / macro-F1 (%). Switzerland's train rows are all positive and "
        "its test rows hold one negative of 16: its macro-F1 is about 48 for any model that "
        "misses that row and about 98 for one that finds it without a false alarm, a 12-point "
        "swing in the client mean from one test row.",
        "",
        "| model | accuracy (%) | macro-F1 (%) | " + " | ".join(hospitals) + " |",
        "|---|---|---|" + "---|" * len(hospitals),
    ]
    for name, r in refs.items():
        per = [
            f"{100 * r[f'client/{h}/accuracy']:.1f} / {100 * r[f'client/{h}/f1']:.1f}"
            for h in hospitals
        ]
        lines.append(
            f"| **{name}** | {100 * r['accuracy']:.1f} | {100 * r['f1']:.1f} | "
            + " | ".join(per)
            + " |"
        )
    frame = pd.DataFrame([r for r in quality if r["scenario"] == "heart"])
    if not frame.empty:
        table = frame.groupby(["method", "metric"])["value"].agg(["mean", "std"])
        for method in [m for m in METHODS if m in set(frame["method"])]:

            def cell(metric: str, spread: bool = True) -> str:
                if (method, metric) not in table.index:
                    return ""
                mean, std = table.loc[(method, metric)]
                text = f"{100 * mean:.1f}"
                return text + (f" ± {100 * std:.1f}" if spread and pd.notna(std) else "")

            per = [
                f"{cell(f'client/{h}/accuracy', False)} / {cell(f'client/{h}/f1', False)}"
                if (method, f"client/{h}/accuracy") in table.index
                else ""
                for h in hospitals
            ]
            lines.append(
                f"| {method} | {cell('personal_accuracy')} | {cell('personal_f1')} | "
                + " | ".join(per)
                + " |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "heart")
    parser.add_argument("--quality", type=Path, default=RESULTS / "quality.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fedmtl-heart-") as workdir:
        refs = references(workdir)
    quality = json.loads(args.quality.read_text()) if args.quality.exists() else []
    text = markdown(refs, quality)
    write_results(args.out, text, {"references": refs})


if __name__ == "__main__":
    main()
