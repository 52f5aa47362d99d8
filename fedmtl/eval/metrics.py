"""Evaluation on each client's own held-out split, and the summaries that leave the clients.

Three models are scored per client and task: ``global`` (θ + φ₀), ``group`` (θ + φ_g) and
``personal`` (the method's personalised weights, e.g. θ + ψ_c for fedmtl). Classification:
accuracy and macro precision, recall and F1 (scikit-learn). Regression: MAE and RMSE. The round
summary over clients: mean, sample-weighted mean, worst-10 % (the mean of the worst ⌈10 %⌉ of
clients) and the personalisation gain (mean over clients of personal minus global).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from fedmtl.client.data import ClientData, labelled
from fedmtl.data.manifest import TaskSpec
from fedmtl.state import Heads, Vector, assign

VARIANTS = ("global", "group", "personal")
HIGHER_IS_BETTER = {
    "accuracy": True,
    "precision": True,
    "recall": True,
    "f1": True,
    "mae": False,
    "rmse": False,
}


def task_metrics(task: TaskSpec, y_true: np.ndarray, output: np.ndarray) -> dict[str, float]:
    """Metrics of one task from the model's raw output (class scores or values)."""
    if task.kind == "classification":
        return classification_metrics(y_true, output.argmax(axis=1))
    return regression_metrics(y_true, output.reshape(-1))


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Accuracy and macro precision, recall and F1 over the classes present in the client's
    labels or predictions (classes the client never sees would otherwise count as zeros).

    The same numbers as scikit-learn's ``accuracy_score`` and ``precision_recall_fscore_support(
    labels=present, average="macro", zero_division=0)`` (:func:`classification_metrics_sklearn`,
    checked against each other in the tests), from one confusion count: scikit-learn's input
    validation costs ~4 ms a call, which at 100 clients × 3 models made evaluation the most
    expensive step of a round."""
    y_true = np.asarray(y_true, dtype=np.int64).reshape(-1)
    y_pred = np.asarray(y_pred, dtype=np.int64).reshape(-1)
    if y_true.size == 0:
        return classification_metrics_sklearn(y_true, y_pred)
    present, codes = np.unique(np.concatenate([y_true, y_pred]), return_inverse=True)
    k = len(present)
    t, p_ = codes[: y_true.size], codes[y_true.size :]
    tp = np.bincount(t[t == p_], minlength=k).astype(np.float64)
    support = np.bincount(t, minlength=k).astype(np.float64)
    predicted = np.bincount(p_, minlength=k).astype(np.float64)
    precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(k), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros(k), where=denom > 0)
    return {
        "accuracy": float(tp.sum() / y_true.size),
        "precision": float(precision.mean()),
        "recall": float(recall.mean()),
        "f1": float(f1.mean()),
    }


def classification_metrics_sklearn(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """The reference definition of :func:`classification_metrics`, with scikit-learn."""
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    present = sorted(set(np.asarray(y_true).tolist()) | set(np.asarray(y_pred).tolist()))
    p, r, f, _ = precision_recall_fscore_support(
        y_true, y_pred, labels=present, average="macro", zero_division=0
    )
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "precision": float(p),
        "recall": float(r),
        "f1": float(f),
    }


def regression_metrics(y_true: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import mean_absolute_error, mean_squared_error  # ~1 s import, when needed

    return {
        "mae": float(mean_absolute_error(y_true, pred)),
        "rmse": float(math.sqrt(mean_squared_error(y_true, pred))),
    }


@torch.no_grad()
def evaluate_clients(
    model: nn.Module,
    jobs: Sequence[tuple[ClientData, dict[str, tuple[Vector, Heads]]]],
    tasks: Sequence[TaskSpec],
    score: Callable[[TaskSpec, np.ndarray, np.ndarray], dict[str, Any]] | None = None,
) -> list[dict]:
    """One record per (client, variant, task), in that order: each client's metrics on its
    held-out split for each variant's (base, heads) weights (``score(task, y_true, output)``,
    by default :func:`task_metrics`; private evaluation scores sufficient statistics instead).
    Batched over the clients: each distinct base runs once over the held-out rows of every client
    that uses it, and each distinct set of head weights once over its clients' features (FedAvg: two
    forward passes for the whole federation instead of one per client and variant). Weights
    are told apart by identity: variants that share a tensor share the pass."""
    model.eval()
    score = score or task_metrics
    jobs = [(data, variants) for data, variants in jobs if data.n_test > 0]
    if not jobs:
        return []
    # which clients use each distinct base, and each distinct (base, heads) set, in order
    bases: dict[int, Vector] = {}
    base_users: dict[int, dict[int, None]] = {}
    weights: dict[tuple[int, ...], tuple[Vector, Heads]] = {}
    head_users: dict[tuple[int, ...], dict[int, None]] = {}
    for i, (_, variants) in enumerate(jobs):
        for base, heads in variants.values():
            bases[id(base)] = base
            base_users.setdefault(id(base), {})[i] = None
            key = _weights_key(base, heads)
            weights[key] = (base, heads)
            head_users.setdefault(key, {})[i] = None

    features: dict[int, dict[int, torch.Tensor]] = {}  # id(base) -> client -> its rows' features
    for key, members in base_users.items():
        assign(model.base, bases[key])
        z = model.base(torch.cat([jobs[i][0].x_test for i in members]))
        features[key] = dict(zip(members, torch.split(z, [jobs[i][0].n_test for i in members])))

    scored: dict[tuple[int, ...], dict[int, dict[str, dict[str, float]]]] = {}
    for key, members in head_users.items():
        base, heads = weights[key]
        z = torch.cat([features[id(base)][i] for i in members])
        sizes = [jobs[i][0].n_test for i in members]
        outputs = {}
        for task in tasks:
            assign(model.heads[task.name], heads[task.name])
            outputs[task.name] = torch.split(model.heads[task.name](z), sizes)
        scored[key] = {
            i: {
                t.name: _score_labelled(score, t, jobs[i][0].y_test[t.name], outputs[t.name][j])
                for t in tasks
            }
            for j, i in enumerate(members)
        }

    records: list[dict] = []
    for i, (data, variants) in enumerate(jobs):
        for variant, (base, heads) in variants.items():
            key = _weights_key(base, heads)
            for task in tasks:
                if scored[key][i][task.name] is None:  # no held-out row holds the task's label
                    continue
                records.append(
                    {
                        "client": data.client,
                        "group": data.group,
                        "n_test": data.n_test,
                        "variant": variant,
                        "task": task.name,
                        **scored[key][i][task.name],
                    }
                )
    return records


def _score_labelled(score, task: TaskSpec, y: torch.Tensor, output: torch.Tensor):
    """``score`` on the rows that hold ``task``'s label; None when none does."""
    have = labelled(task, y)
    if not bool(have.all()):
        if not bool(have.any()):
            return None
        y, output = y[have], output[have]
    return score(task, y.numpy(), output.numpy())


def _weights_key(base: Vector, heads: Heads) -> tuple[int, ...]:
    return (id(base), *(id(heads[t]) for t in sorted(heads)))


def worst_fraction_mean(values: pd.Series, higher_is_better: bool, fraction: float = 0.1) -> float:
    k = max(1, math.ceil(fraction * len(values)))
    ordered = values.sort_values(ascending=higher_is_better)
    return float(ordered.iloc[:k].mean())


def summarize(records: pd.DataFrame) -> dict[str, float]:
    """Round summaries: ``{variant}/{metric}/{mean|weighted_mean|worst10}`` for the first task
    (prefixed ``{task}/`` for further tasks) and ``personalisation_gain/{metric}``."""
    out: dict[str, float] = {}
    if records.empty:
        return out
    tasks = list(dict.fromkeys(records["task"]))
    for i, task in enumerate(tasks):
        prefix = "" if i == 0 else f"{task}/"
        rows = records[records["task"] == task]
        metrics = [m for m in HIGHER_IS_BETTER if m in rows.columns and rows[m].notna().any()]
        for variant, part in rows.groupby("variant", sort=False):
            w = part["n_test"].to_numpy(dtype=float)
            for m in metrics:
                values = part[m]
                out[f"{prefix}{variant}/{m}/mean"] = float(values.mean())
                out[f"{prefix}{variant}/{m}/weighted_mean"] = float(np.average(values, weights=w))
                out[f"{prefix}{variant}/{m}/worst10"] = worst_fraction_mean(
                    values, HIGHER_IS_BETTER[m]
                )
        pivot = rows.pivot_table(index="client", columns="variant", values=metrics)
        for m in metrics:
            if ("personal" in pivot[m]) and ("global" in pivot[m]):
                gain = pivot[m]["personal"] - pivot[m]["global"]
                if not HIGHER_IS_BETTER[m]:
                    gain = -gain
                out[f"{prefix}personalisation_gain/{m}"] = float(gain.mean())
    return out
