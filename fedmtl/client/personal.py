"""fedmtl's personal step: the exact (MAP) fit of ψ_c, and the choice of its prior strength.

ψ_c = argmin_ψ Σ_i loss_i(ψ) + λ/2·‖ψ − φ_g‖² on the frozen base (linear heads: convex).
``algorithm.personal_lambda_search`` says how λ is chosen:

- ``off`` (the default): ``personal_lambda`` for every client.
- ``cv``: λ from ``personal_lambda_grid`` by k-fold cross-validation (:func:`select_lambda`),
  then one fit on all rows: 41 fits a client.
- ``holdout`` (:func:`choose_heads`): a choice *between* the shared and personal heads. Each
  client keeps one stratified fifth of its train rows out of the shared step (a validation
  fold), walks a short λ path on the rest and, per task, keeps whichever of the MAP head at each
  λ, its group head φ_g and the global head φ₀ has the least log-loss on the validation fold.
  Measured below the fixed λ on all 8 scenarios (docs/quality.md: the shared model trained on
  80 % of the rows, and one fold of ~20 rows is a noisy judge): not the default.

The held-out split is never read. Everything is deterministic: the folds are fixed by the row
order (stratified by the first task's class), and L-BFGS has no random draws.
"""

from __future__ import annotations

import dataclasses
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
#: the λ path of ``holdout``, walked from the largest: decade steps
HOLDOUT_PATH: tuple[float, ...] = (30.0, 3.0, 0.3, 0.03)
#: what a task's choice may be besides a λ: the group head φ_g (λ → ∞) and the global head φ₀
GROUP, GLOBAL = "group", "global"


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
    strong Wolfe line search; the objective is divided by the row count). ``anchor`` holds the
    parameters of ``names``' heads, in order."""
    tasks = [task for task in tasks if task.name in names]
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


def validation_rows(
    data: ClientData, tasks: Sequence[TaskSpec], folds: int = FOLDS
) -> torch.Tensor:
    """The client's validation rows for ``holdout``'s choice: one stratified fold of its
    train rows (fold 0 of :func:`cv_folds`), which the shared step never trains on, so that
    the shared heads and the personal candidates are compared on rows none of them has seen.
    None of a client's rows when it has fewer than 2·``folds`` train rows."""
    if data.n_train < 2 * folds:
        return torch.zeros(data.n_train, dtype=torch.bool)
    return torch.as_tensor(cv_folds(data.y_train[tasks[0].name].numpy(), folds) == 0)


def without_validation_rows(data: ClientData, tasks: Sequence[TaskSpec]) -> ClientData:
    """``data`` with its validation rows (:func:`validation_rows`) left out of the train split:
    what the shared step trains on under ``personal_lambda_search: holdout``."""
    keep = ~validation_rows(data, tasks)
    if bool(keep.all()):
        return data
    return dataclasses.replace(
        data, x_train=data.x_train[keep], y_train={t: v[keep] for t, v in data.y_train.items()}
    )


def _snapshot(heads: nn.ModuleDict, name: str) -> list[torch.Tensor]:
    return [p.detach().clone() for p in heads[name].parameters()]


@torch.no_grad()
def _load(heads: nn.ModuleDict, name: str, values: list[torch.Tensor]) -> None:
    for p, v in zip(heads[name].parameters(), values):
        p.copy_(v)


@torch.no_grad()
def _row_losses(
    heads: nn.ModuleDict, name: str, z: torch.Tensor, y: torch.Tensor, task: TaskSpec
) -> torch.Tensor:
    """Each row's loss under task ``name``'s head: cross-entropy, or squared error."""
    out = heads[name](z)
    if task.kind == "classification":
        return F.cross_entropy(out, y, reduction="none")
    return (out.squeeze(-1) - y) ** 2


def choose_heads(
    model: nn.Module,
    base: Vector,
    prior: Heads,
    global_heads: Heads | None,
    data: ClientData,
    tasks: Sequence[TaskSpec],
    lam: float,
    path: Sequence[float] = HOLDOUT_PATH,
    folds: int = FOLDS,
    max_iter: int = 100,
) -> tuple[Heads, dict[str, float | str]]:
    """``personal_lambda_search: holdout`` (module docs). Per task, of the group head ``prior``
    (φ_g), the global head ``global_heads`` (φ₀) and the MAP heads on ``path`` (fitted on the
    client's train rows but its validation fold, :func:`validation_rows`, large λ first, each
    warm-started from the previous one), the one with the least log-loss on the validation fold
    (ties: the shared heads, then the larger λ); a chosen personal head is refitted on every
    train row at its λ, warm-started. The shared step must have left the validation fold out
    (:meth:`fedmtl.algorithms.FedMTL.shared_rows`), or the shared heads, trained on those rows,
    win unfairly. Returns the heads (model.heads holds them too) and each task's choice: its λ,
    ``"group"`` or ``"global"``. A client with fewer than 2·``folds`` train rows takes the MAP
    fit at ``lam``."""
    names = list(prior)
    by_name = {task.name: task for task in tasks}
    z = _features(model, base, prior, data)
    heads = model.heads
    anchor = {t: _snapshot(heads, t) for t in names}
    flat_anchor = [a for t in names for a in anchor[t]]
    if data.n_train < 2 * folds:
        _map_solve(heads, names, z, data.y_train, tasks, flat_anchor, lam, max_iter)
        return read_heads(model, prior), dict.fromkeys(names, lam)
    held = validation_rows(data, tasks, folds)
    y_fit = {t: v[~held] for t, v in data.y_train.items()}
    y_held = {t: v[held] for t, v in data.y_train.items()}
    z_fit, z_held = z[~held], z[held]
    # per task, in order of preference: (choice, the head's parameters, held-out row losses)
    candidates: dict[str, list[tuple[float | str, list[torch.Tensor], torch.Tensor]]] = {
        t: [] for t in names
    }

    def offer(name: str, choice: float | str) -> None:
        rows = _row_losses(heads, name, z_held, y_held[name], by_name[name])
        candidates[name].append((choice, _snapshot(heads, name), rows))

    for t in names:
        offer(t, GROUP)
        if global_heads is not None:
            assign(heads[t], global_heads[t])
            offer(t, GLOBAL)
            _load(heads, t, anchor[t])
    for value in sorted(path, reverse=True):
        _map_solve(heads, names, z_fit, y_fit, tasks, flat_anchor, value, max_iter)
        for t in names:
            offer(t, value)
    choices: dict[str, float | str] = {}
    for t in names:
        # the least held-out log-loss; ties: the shared heads, then the larger λ
        scores = [float(c[2].mean()) for c in candidates[t]]
        choice, values, _ = candidates[t][min(range(len(scores)), key=lambda i: (scores[i], i))]
        _load(heads, t, values)
        choices[t] = choice
        if not isinstance(choice, str):  # a personal head: refit on every train row, warm
            _map_solve(heads, [t], z, data.y_train, tasks, anchor[t], choice, max_iter)
    return read_heads(model, prior), choices


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
    global_heads: Heads | None = None,
) -> tuple[Heads, float, float]:
    """ψ_c's MAP fit with a prior of precision λ at ``prior`` (φ_g) on the client's train rows;
    with ``search="cv"`` λ is chosen per client by :func:`select_lambda` (``lam`` is kept when
    the client has too few rows to cross-validate); with ``search="holdout"`` each task's head is
    chosen by :func:`choose_heads` among the λ path, φ_g and ``global_heads``. Returns the heads,
    their mean train loss and the λ used (``holdout``: the first task's; ∞ where it kept φ_g,
    NaN where it took the global head)."""
    if data.n_train == 0:
        return {t: v.clone() for t, v in prior.items()}, float("nan"), lam
    if search == "holdout":
        chosen_heads, choices = choose_heads(
            model, base, prior, global_heads, data, tasks, lam, max_iter=max_iter
        )
        z = _features(model, base, chosen_heads, data)
        with torch.no_grad():
            names = list(prior)
            loss = float(multitask_loss({t: model.heads[t](z) for t in names}, data.y_train, tasks))
        first = choices[next(iter(prior))]
        used = {GROUP: float("inf"), GLOBAL: float("nan")}.get(first, first)
        return chosen_heads, loss, float(used)
    if search == "cv":
        chosen, _ = select_lambda(model, base, prior, data, tasks, grid, max_iter=max_iter)
        lam = lam if chosen is None else chosen
    elif search != "off":
        raise ValueError(
            f"personal_lambda_search '{search}' is not known; allowed values: 'holdout', 'cv', "
            "'off'"
        )
    z = _features(model, base, prior, data)
    names = list(prior)
    heads = model.heads
    anchor = [p.detach().clone() for t in names for p in heads[t].parameters()]
    _map_solve(heads, names, z, data.y_train, tasks, anchor, lam, max_iter)
    with torch.no_grad():
        loss = float(multitask_loss({t: heads[t](z) for t in names}, data.y_train, tasks))
    return read_heads(model, prior), loss, lam
