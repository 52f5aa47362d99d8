"""Private evaluation: the federation's metrics from sufficient statistics, not client figures.

Each client reduces its held-out scores to sufficient statistics, per (model variant, task):

- classification: the K×K confusion counts (true class × predicted class);
- regression: the number of rows, Σ|error| and Σ error², each row's |error| clipped to
  ``ERROR_CLIP`` (in the label's units) so that every entry has a public bound.

The clients' statistics are summed (with SecAgg+ when ``privacy.secure_sum`` is on,
:func:`fedmtl.privacy.secagg.secure_sum`, or CKKS with ``secure_aggregation_protocol: ckks``,
:func:`fedmtl.privacy.he.encrypted_sum`), so the server learns the federation's pooled confusion
matrix and error sums and nothing about any one client. Optionally Gaussian noise is added to the
summed counts (``noise_std``). From them: pooled accuracy (= the sample-weighted mean of the
clients' accuracies), macro precision, recall and F1 over the classes present in the pooled
matrix (scikit-learn's definitions, tested against it on the concatenated rows), MAE and RMSE.
Per-client means and the worst clients' mean need per-client figures and are not available.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedmtl.data.manifest import TaskSpec
from fedmtl.privacy.dp import gaussian_noise
from fedmtl.privacy.randomness import SecretStream

ERROR_CLIP = 100.0
"""Regression: each row's |error| counts at most this much in the summed statistics."""


@dataclass(frozen=True)
class StatLayout:
    """Where each (variant, task)'s statistics lie in a client's statistics vector."""

    keys: tuple[tuple[str, str], ...]  # (variant, task)
    sizes: tuple[int, ...]
    tasks: Mapping[str, TaskSpec]

    @classmethod
    def build(cls, variants: Sequence[str], tasks: Sequence[TaskSpec]) -> "StatLayout":
        keys, sizes = [], []
        for variant in variants:
            for task in tasks:
                keys.append((variant, task.name))
                sizes.append(task.n_outputs**2 if task.kind == "classification" else 3)
        return cls(tuple(keys), tuple(sizes), {t.name: t for t in tasks})

    @property
    def width(self) -> int:
        return sum(self.sizes)

    def bounds(self, max_rows: int) -> np.ndarray:
        """A public bound on every entry of a client holding at most ``max_rows`` held-out rows
        (the largest split in the manifest): counts ≤ max_rows, Σ|e| ≤ max_rows·ERROR_CLIP,
        Σe² ≤ max_rows·ERROR_CLIP²."""
        parts = []
        for (_, task), size in zip(self.keys, self.sizes):
            if self.tasks[task].kind == "classification":
                parts.append(np.full(size, float(max_rows)))
            else:
                parts.append(max_rows * np.array([1.0, ERROR_CLIP, ERROR_CLIP**2]))
        return np.concatenate(parts) if parts else np.zeros(0)

    def sensitivity(self, max_rows: int) -> float:
        """A public bound on the L2 norm of one client's whole statistics vector: what adding or
        removing the client changes the sum by. A confusion block holds counts ≥ 0 that sum to
        the client's held-out rows (≤ ``max_rows``), so its norm is ≤ ``max_rows``; a regression
        block's is ≤ the norm of its entries' bounds."""
        bounds = self.bounds(max_rows)
        total, offset = 0.0, 0
        for (_, task), size in zip(self.keys, self.sizes):
            block = bounds[offset : offset + size]
            offset += size
            total += (
                float(max_rows) ** 2
                if self.tasks[task].kind == "classification"
                else float(block @ block)
            )
        return math.sqrt(total)


def task_statistics(task: TaskSpec, y_true: np.ndarray, output: np.ndarray) -> np.ndarray:
    """One client's sufficient statistics of one task from the model's raw output."""
    y_true = np.asarray(y_true)
    if task.kind == "classification":
        k = task.n_outputs
        pred = np.asarray(output).argmax(axis=1)
        return np.bincount(y_true.astype(np.int64) * k + pred, minlength=k * k).astype(np.float64)
    error = np.clip(
        np.asarray(output).reshape(-1) - y_true.astype(np.float64), -ERROR_CLIP, ERROR_CLIP
    )
    return np.array([error.size, np.abs(error).sum(), (error**2).sum()], dtype=np.float64)


def client_statistics(
    layout: StatLayout,
    outputs: Mapping[tuple[str, str], np.ndarray],
    y_test: Mapping[str, np.ndarray],
) -> np.ndarray:
    """A client's whole statistics vector: ``outputs[(variant, task)]`` scored against its
    labels."""
    parts = [
        task_statistics(layout.tasks[task], y_test[task], outputs[(variant, task)])
        for variant, task in layout.keys
    ]
    return np.concatenate(parts) if parts else np.zeros(0)


def statistics_score(
    task: TaskSpec, y_true: np.ndarray, output: np.ndarray
) -> dict[str, np.ndarray]:
    """A scorer for :func:`fedmtl.eval.metrics.evaluate_clients` that keeps the statistics."""
    return {"statistics": task_statistics(task, y_true, output)}


def pooled_evaluation(
    layout: StatLayout,
    records: Sequence[Mapping],
    *,
    secure: bool,
    max_rows: int,
    min_clients: int = 2,
    noise_std: float = 0.0,
    generator: torch.Generator | SecretStream | None = None,
    neighbours: int | None = None,
    max_dropout: float | None = None,
    protocol: str = "secagg",
    noise_multiplier: float | None = None,
) -> dict[str, float]:
    """The round's metrics from the clients' statistics records (``client``, ``variant``,
    ``task``, ``statistics``): each client's vector is summed (:func:`secure_total`) and only
    the pooled figures come out, plus ``personalisation_gain/{metric}/pooled`` (personal minus
    global, pooled) and ``evaluation/clients``. Fewer than ``min_clients`` clients release no
    figures: a sum over one client is that client's own.

    ``noise_multiplier`` z (client-level DP, ``privacy.dp_fedavg.enabled``): each client's vector
    is clipped to the layout's :meth:`~StatLayout.sensitivity` Δ (a no-op for honest statistics)
    and the sum gets N(0, (zΔ)²) on every entry instead of ``noise_std``: one Gaussian mechanism
    of multiplier z over all the clients, which the run's accountant counts."""
    parts: dict[str, dict[tuple[str, str], np.ndarray]] = {}
    for r in records:
        parts.setdefault(r["client"], {})[(r["variant"], r["task"])] = r["statistics"]
    # under DP how many clients answered is itself a count outside ε: not released
    out = {} if noise_multiplier is not None else {"evaluation/clients": float(len(parts))}
    if len(parts) < max(2, min_clients):
        return out
    vectors = {c: np.concatenate([stats[key] for key in layout.keys]) for c, stats in parts.items()}
    if noise_multiplier is not None:
        delta = layout.sensitivity(max_rows)
        for c, v in vectors.items():
            norm = float(np.linalg.norm(v))
            if norm > delta:
                vectors[c] = v * (delta / norm)
        noise_std = float(noise_multiplier) * delta
    total = secure_total(
        vectors,
        secure,
        layout.bounds(max_rows),
        noise_std,
        generator,
        neighbours,
        max_dropout,
        protocol,
    )
    out.update(pooled_metrics(layout, total))
    for key in list(out):
        head, _, rest = key.partition("personal/")
        if (
            key.startswith(f"{head}personal/")
            and key.endswith("/pooled")
            and f"{head}global/{rest}" in out
        ):
            metric = rest.split("/")[0]
            gain = out[key] - out[f"{head}global/{rest}"]
            out[f"{head}personalisation_gain/{metric}/pooled"] = (
                gain if metric not in ("mae", "rmse") else -gain
            )
    return out


def pooled_metrics(layout: StatLayout, total: np.ndarray) -> dict[str, float]:
    """Metrics from the summed statistics: ``{variant}/{metric}/pooled`` for the first task,
    ``{task}/{variant}/{metric}/pooled`` for the others."""
    out: dict[str, float] = {}
    first = next(iter(layout.tasks), None)
    offset = 0
    for (variant, task), size in zip(layout.keys, layout.sizes):
        block = np.clip(np.asarray(total[offset : offset + size], dtype=np.float64), 0, None)
        offset += size
        prefix = "" if task == first else f"{task}/"
        spec = layout.tasks[task]
        metrics = (
            confusion_metrics(block.reshape(spec.n_outputs, spec.n_outputs))
            if spec.kind == "classification"
            else error_metrics(block)
        )
        out.update({f"{prefix}{variant}/{m}/pooled": v for m, v in metrics.items()})
    return out


def confusion_metrics(confusion: np.ndarray) -> dict[str, float]:
    """Accuracy and macro precision/recall/F1 over the classes present (as true or predicted)."""
    support, predicted = confusion.sum(1), confusion.sum(0)
    present = (support + predicted) > 0
    n = confusion.sum()
    if n <= 0 or not present.any():
        return {}
    tp = np.diag(confusion)[present]
    s, p = support[present], predicted[present]
    precision = np.divide(tp, p, out=np.zeros_like(tp), where=p > 0)
    recall = np.divide(tp, s, out=np.zeros_like(tp), where=s > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return {
        "accuracy": float(np.diag(confusion).sum() / n),
        "precision": float(precision.mean()),
        "recall": float(recall.mean()),
        "f1": float(f1.mean()),
    }


def error_metrics(block: np.ndarray) -> dict[str, float]:
    n, abs_sum, sq_sum = block
    if n <= 0:
        return {}
    return {"mae": float(abs_sum / n), "rmse": float(np.sqrt(sq_sum / n))}


def secure_total(
    statistics: Mapping[str, np.ndarray],
    secure: bool,
    bound: float | np.ndarray,
    noise_std: float = 0.0,
    generator: torch.Generator | SecretStream | None = None,
    neighbours: int | None = None,
    max_dropout: float | None = None,
    protocol: str = "secagg",
) -> np.ndarray:
    """Σ of the clients' statistics vectors: through SecAgg+ (``protocol`` "secagg") or CKKS
    ("ckks") when ``secure``, plainly otherwise;
    plus N(0, noise_std²) per entry when asked. ``bound``: a public bound on every entry, one
    number or one per entry (:meth:`StatLayout.bounds`); entries beyond it are clipped. The
    secure sum runs on the entries divided by their bounds, so every entry has the same
    fixed-point precision relative to its range."""
    vectors = {c: np.asarray(v, dtype=np.float64) for c, v in statistics.items()}
    if not vectors:
        return np.zeros(0)
    width = len(next(iter(vectors.values())))
    scale = np.broadcast_to(np.asarray(bound, dtype=np.float64), (width,))
    if not np.all(scale > 0):
        raise ValueError("every statistics bound must be positive")
    if secure and protocol == "ckks":
        from fedmtl.privacy.he import encrypted_sum

        result = encrypted_sum({c: v / scale for c, v in vectors.items()}, bound=1.0)
        total = np.asarray(result.sum, dtype=np.float64) * scale
    elif secure:
        from fedmtl.privacy.secagg import DEFAULT_MAX_DROPOUT, secure_sum

        scaled = {c: v / scale for c, v in vectors.items()}
        result = secure_sum(
            scaled,
            clip=1.0,
            neighbours=neighbours,
            max_dropout=DEFAULT_MAX_DROPOUT if max_dropout is None else max_dropout,
        )
        total = np.asarray(result.sum, dtype=np.float64) * scale
    else:
        total = np.sum([np.clip(v, -scale, scale) for v in vectors.values()], axis=0)
    if noise_std > 0:
        if generator is None:
            raise ValueError(
                "evaluation noise needs its random source (the run's SecretRandom stream)"
            )
        total = (
            total
            + gaussian_noise(
                torch.zeros(total.shape, dtype=torch.float64), noise_std, generator
            ).numpy()
        )
    return total
