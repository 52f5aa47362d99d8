"""Private evaluation (fedmtl/privacy/evaluation.py): pooled metrics from summed statistics."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    mean_absolute_error,
    mean_squared_error,
    precision_recall_fscore_support,
)

from fedmtl.data.manifest import TaskSpec
from fedmtl.privacy.evaluation import StatLayout, client_statistics, pooled_metrics, secure_total
from fedmtl.privacy.randomness import SecretRandom

TASKS = [TaskSpec("label", "classification", [0, 1, 2, 3]), TaskSpec("y", "regression", [])]


def clients(n: int = 12, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n):
        rows = int(rng.integers(3, 30))
        y = rng.integers(0, 3 if i % 2 else 4, rows)  # some clients never see class 3
        logits = rng.normal(size=(rows, 4)) + 2.0 * np.eye(4)[y] * rng.random()
        target = rng.normal(size=rows)
        out[f"c{i:02d}"] = (y, logits, target, target + rng.normal(scale=0.3, size=rows))
    return out


@pytest.mark.parametrize("secure", [False, True])
def test_pooled_metrics_equal_scikit_learn_on_the_concatenated_rows(secure):
    layout = StatLayout.build(["global"], TASKS)
    data = clients()
    stats = {
        c: client_statistics(
            layout, {("global", "label"): logits, ("global", "y"): pred}, {"label": y, "y": target}
        )
        for c, (y, logits, target, pred) in data.items()
    }
    metrics = pooled_metrics(layout, secure_total(stats, secure, bound=100.0))
    y = np.concatenate([d[0] for d in data.values()])
    pred = np.concatenate([d[1].argmax(1) for d in data.values()])
    present = sorted(set(y) | set(pred))
    p, r, f, _ = precision_recall_fscore_support(
        y, pred, labels=present, average="macro", zero_division=0
    )
    assert metrics["global/accuracy/pooled"] == pytest.approx(accuracy_score(y, pred), abs=1e-6)
    assert metrics["global/precision/pooled"] == pytest.approx(p, abs=1e-6)
    assert metrics["global/recall/pooled"] == pytest.approx(r, abs=1e-6)
    assert metrics["global/f1/pooled"] == pytest.approx(f, abs=1e-6)
    target = np.concatenate([d[2] for d in data.values()])
    values = np.concatenate([d[3] for d in data.values()])
    assert metrics["y/global/mae/pooled"] == pytest.approx(
        mean_absolute_error(target, values), abs=1e-5
    )
    assert metrics["y/global/rmse/pooled"] == pytest.approx(
        np.sqrt(mean_squared_error(target, values)), abs=1e-5
    )


def test_noise_on_the_counts_changes_the_figures_only_a_little():
    layout = StatLayout.build(["global"], TASKS[:1])
    stats = {
        c: client_statistics(layout, {("global", "label"): d[1]}, {"label": d[0]})
        for c, d in clients(40).items()
    }
    exact = pooled_metrics(layout, secure_total(stats, False, bound=100.0))
    noisy = pooled_metrics(
        layout,
        secure_total(
            stats,
            False,
            bound=100.0,
            noise_std=2.0,
            generator=SecretRandom.fresh().stream("evaluation"),
        ),
    )
    assert noisy["global/accuracy/pooled"] != exact["global/accuracy/pooled"]
    assert noisy["global/accuracy/pooled"] == pytest.approx(
        exact["global/accuracy/pooled"], abs=0.05
    )
