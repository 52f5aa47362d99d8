"""fedmtl's personal step: the exact (MAP) fit of ψ_c, and the choice of its prior strength.

ψ_c = argmin_ψ Σ_i loss_i(ψ) + λ/2·‖ψ − φ_g‖² on the frozen base (linear heads: convex). With
``algorithm.personal_lambda_search: cv`` the client picks its own λ (empirical Bayes by
cross-validation, :func:`select_lambda`): k-fold cross-validation on its own train rows over
``algorithm.personal_lambda_grid``, scored by the held-out folds' log-loss, then one fit on all
its train rows with the chosen λ. The held-out split is never read. Everything is deterministic:
the folds are fixed by the row order (stratified by the first task's class), and L-BFGS has no
random draws.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fedmtl.client.data import ClientData
from fedmtl.client.training import load_weights, multitask_loss, read_heads
from fedmtl.data.manifest import TaskSpec
from fedmtl.state import Heads, Vector, assign

#: the default λ grid of the search: half-decade steps from 0.01 to 30
LAMBDA_GRID: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)
#: folds of the cross-validation; a client with fewer than 2 × FOLDS train rows keeps the fixed λ
FOLDS = 5


def cv_folds(labels: np.ndarray, k: int = FOLDS) -> np.ndarray:
    """Each row's fold, stratified and deterministic: the i-th row of each class goes to
    fold i mod k."""
    labels = np.asarray(labels).reshape(-1)
    folds = np.zeros(labels.shape[0], dtype=np.int64)
    for value in np.unique(labels):
        rows = np.flatnonzero(labels == value)
        folds[rows] = np.arange(rows.size) % k
    return folds


def _map_solve(
    heads: nn.ModuleDict,
    names: Sequence[str],
    z: torch.Tensor,
    y: dict[str, torch.Tensor],
    tasks: Sequence[TaskSpec],
    anchor: list[torch.Tensor],
    lam: float,
    max_iter: int,
) -> None:
    """In place, from the heads' current values: argmin Σ_i loss_i + λ/2·‖ψ − anchor‖² (L-BFGS,
    strong Wolfe line search; the objective is divided by the row count)."""
    params = [p for t in names for p in heads[t].parameters()]
    n = float(z.shape[0])
    opt = torch.optim.LBFGS(
        params,
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-6,
        tolerance_change=1e-9,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = multitask_loss({t: heads[t](z) for t in names}, y, tasks)
        prox = sum(((p - a) ** 2).sum() for p, a in zip(params, anchor))
        objective = loss + 0.5 * lam / n * prox
        objective.backward()
        return objective

    opt.step(closure)


@torch.no_grad()
def _held_out_loss(
    heads: nn.ModuleDict,
    names: Sequence[str],
    z: torch.Tensor,
    y: dict[str, torch.Tensor],
    tasks: Sequence[TaskSpec],
) -> float:
    """Σ over rows and tasks: cross-entropy (classification), squared error (regression)."""
    total = 0.0
    for task in tasks:
        if task.name not in names:
            continue
        out = heads[task.name](z)
        if task.kind == "classification":
            total += float(F.cross_entropy(out, y[task.name], reduction="sum"))
        else:
            total += float(F.mse_loss(out.squeeze(-1), y[task.name], reduction="sum"))
    return total


def _features(model: nn.Module, base: Vector, prior: Heads, data: ClientData) -> torch.Tensor:
    load_weights(model, base, prior)
    with torch.no_grad():
        model.base.eval()
        return model.base(data.x_train)


def select_lambda(
    model: nn.Module,
    base: Vector,
    prior: Heads,
    data: ClientData,
    tasks: Sequence[TaskSpec],
    grid: Sequence[float] = LAMBDA_GRID,
    folds: int = FOLDS,
    max_iter: int = 100,
) -> tuple[float | None, list[float]]:
    """The λ of ``grid`` whose MAP fit on k − 1 folds of the client's train rows has the least
    log-loss on the remaining fold, summed over the k folds (ties: the larger λ), and the summed
    held-out losses per λ. Along each fold the grid is walked from the largest λ down, each fit
    warm-started from the previous one (the first from the prior). ``None`` (and no scores) when
    the client has fewer than 2·``folds`` train rows. Reads only ``data``'s train split."""
    grid = sorted(float(g) for g in grid)
    if data.n_train < 2 * folds or len(grid) < 2:
        return None, []
    z = _features(model, base, prior, data)
    names = list(prior)
    heads = model.heads
    anchor = [p.detach().clone() for t in names for p in heads[t].parameters()]
    fold = torch.as_tensor(cv_folds(data.y_train[tasks[0].name].numpy(), folds))
    scores = np.zeros(len(grid))
    for f in range(folds):
        fit_rows, held = fold != f, fold == f
        y_fit = {t: v[fit_rows] for t, v in data.y_train.items()}
        y_held = {t: v[held] for t, v in data.y_train.items()}
        z_fit, z_held = z[fit_rows], z[held]
        for t in names:
            assign(heads[t], prior[t])
        for j in range(len(grid) - 1, -1, -1):
            _map_solve(heads, names, z_fit, y_fit, tasks, anchor, grid[j], max_iter)
            scores[j] += _held_out_loss(heads, names, z_held, y_held, tasks)
    best = int(np.flatnonzero(scores <= scores.min() * (1 + 1e-9))[-1])
    return grid[best], scores.tolist()


def fit_personal_heads(
    model: nn.Module,
    base: Vector,
    prior: Heads,
    data: ClientData,
    tasks: Sequence[TaskSpec],
    lam: float,
    search: str = "off",
    grid: Sequence[float] = LAMBDA_GRID,
    max_iter: int = 100,
) -> tuple[Heads, float, float]:
    """ψ_c's MAP fit with a prior of precision λ at ``prior`` (φ_g) on the client's train rows;
    with ``search="cv"`` λ is chosen per client by :func:`select_lambda` (``lam`` is kept when
    the client has too few rows to cross-validate). Returns the heads, their mean train loss and
    the λ used."""
    if data.n_train == 0:
        return {t: v.clone() for t, v in prior.items()}, float("nan"), lam
    if search == "cv":
        chosen, _ = select_lambda(model, base, prior, data, tasks, grid, max_iter=max_iter)
        lam = lam if chosen is None else chosen
    elif search != "off":
        raise ValueError(
            f"personal_lambda_search '{search}' is not known; allowed values: 'off', 'cv'"
        )
    z = _features(model, base, prior, data)
    names = list(prior)
    heads = model.heads
    anchor = [p.detach().clone() for t in names for p in heads[t].parameters()]
    _map_solve(heads, names, z, data.y_train, tasks, anchor, lam, max_iter)
    with torch.no_grad():
        loss = float(multitask_loss({t: heads[t](z) for t in names}, data.y_train, tasks))
    return read_heads(model, prior), loss, lam
