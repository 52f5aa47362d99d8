"""fedmtl's personal step: the exact (MAP) fit of ψ_c, and the choice of its prior strength.

ψ_c = argmin_ψ Σ_i loss_i(ψ) + λ/2·‖ψ − φ_g‖² on the frozen base (linear heads: convex).
``algorithm.personal_lambda_search`` says how λ is chosen:

- ``loo`` (the default, :func:`choose_by_loo`): per client and task, the group head, the group
  head with the client's own output bias, or the personal head at ``personal_lambda``, each
  step kept only where its approximate leave-one-out loss on the client's train rows
  (:mod:`fedmtl.client.loo`) is better by more than :data:`MARGIN_SE` standard errors: a
  personal head only
  where the client's rows support it, at the cost of a fit of C biases and one linear solve
  besides the fixed λ's fit.
- ``off``: ``personal_lambda`` for every client.
- ``cv``: λ from ``personal_lambda_grid`` by k-fold cross-validation (:func:`select_lambda`),
  then one fit on all rows: 41 fits a client.

The held-out split is never read. Everything is deterministic: the folds are fixed by the row
order (stratified by the first task's class), and L-BFGS has no random draws.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from fedmtl.client.data import ClientData, labelled
from fedmtl.client.loo import MAX_SYSTEM, alo_losses, system_size
from fedmtl.client.training import load_weights, multitask_loss, read_heads, task_row_losses
from fedmtl.data.manifest import TaskSpec
from fedmtl.state import Heads, Vector, assign

#: the default λ grid of the search: half-decade steps from 0.01 to 30
LAMBDA_GRID: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)
#: folds of the cross-validation; a client with fewer than 2 × FOLDS train rows keeps the fixed λ
FOLDS = 5
#: ``loo``: precision of the prior on the client's shift of its group head's output bias
BIAS_LAMBDA = 1.0
#: ``loo``: a step away from the group head must lower the mean per-row log-loss by this many
#: standard errors of the paired differences. One (Breiman et al.'s one-standard-error rule)
#: let noise through: on digits label-permutation (10 seeds) a few clients a seed took a bias
#: shift or a personal head that lost held-out rows (worst-10 % 0.9 points below the group
#: heads'); 1.5 keeps every client there at its group head and moves the other scenarios by at
#: most 0.3 points (docs/algorithm.md)
MARGIN_SE = 1.5
#: ``loo``: a client with more train rows scores its choice on this many of them (every k-th):
#: the standard error needs no more, and the ALO's per-row work is the bulk of its cost
SCORED_ROWS = 2048


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
    bias_only: bool = False,
) -> None:
    """In place, from the heads' current values, per task: argmin Σ_i loss_i + λ/2·‖ψ − anchor‖²
    over the rows that hold the task's label (L-BFGS, strong Wolfe line search; each task's
    objective is divided by its row count). ``anchor`` holds the parameters of ``names``' heads,
    in order (``bias_only``: only their biases, which alone move)."""
    tasks = [task for task in tasks if task.name in names]
    by_name = {task.name: task for task in tasks}
    owners = [
        (t, p)
        for t in names
        for p in ([heads[t].bias] if bias_only else list(heads[t].parameters()))
    ]
    params = [p for _, p in owners]
    rows = {t: max(int(labelled(by_name[t], y[t]).sum()), 1) for t in names}
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
        prox = sum(((p - a) ** 2).sum() / rows[t] for (t, p), a in zip(owners, anchor))
        objective = loss + 0.5 * lam * prox
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
        total += float(task_row_losses(task, heads[task.name](z), y[task.name])[0].sum())
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


def _snapshot(heads: nn.ModuleDict, name: str) -> list[torch.Tensor]:
    return [p.detach().clone() for p in heads[name].parameters()]


@torch.no_grad()
def _load(heads: nn.ModuleDict, name: str, values: list[torch.Tensor]) -> None:
    for p, v in zip(heads[name].parameters(), values):
        p.copy_(v)


def _scored_rows(n: int) -> torch.Tensor | None:
    """Which of a task's n labelled rows score the choice: all (None), or above
    :data:`SCORED_ROWS` every k-th (the same rows for every candidate)."""
    step = -(-n // SCORED_ROWS)  # ceil
    return None if step == 1 else torch.arange(0, n, step)


def _loo_rows(
    heads: nn.ModuleDict,
    name: str,
    z: torch.Tensor,
    y: torch.Tensor,
    task: TaskSpec,
    lam: float | None,
    scope: str = "all",
) -> np.ndarray:
    """Per scored row that holds ``task``'s label and can be assessed (:func:`_assessable`):
    the ALO loss of the head fitted with prior precision ``lam`` (``scope``: which of its
    parameters were fitted), or with ``lam`` None the in-sample loss of a head the client did not
    fit (its group head)."""
    have = labelled(task, y)
    z, y = z[have], y[have]
    if y.numel() == 0:
        return np.zeros(0)
    rows = _scored_rows(y.numel())
    with torch.no_grad():
        eta = heads[name](z)
    if lam is None:
        losses = task_row_losses(task, eta, y)[0]
        losses = (losses if rows is None else losses[rows]).numpy()
    else:
        losses = alo_losses(z, eta, y, task.kind, lam, scope, rows)  # type: ignore[arg-type]
    return losses[_assessable(task, y, rows)]


def _assessable(task: TaskSpec, y: torch.Tensor, rows: torch.Tensor | None) -> np.ndarray:
    """Which scored rows the comparison uses: for a classification task, the rows whose class
    the client holds at least twice (leaving out a class's only row removes the class from the
    client's rows: the refitted heads are tested on a class they never saw, while the group head,
    scored in-sample, saw it; the stratified leave-one-out). Every row of a regression task."""
    if task.kind != "classification":
        keep = torch.ones(y.numel(), dtype=torch.bool)
    else:
        keep = torch.bincount(y)[y] >= 2
    return (keep if rows is None else keep[rows]).numpy()


def _beats(candidate: np.ndarray, reference: np.ndarray) -> bool:
    """``candidate``'s mean loss below ``reference``'s by more than :data:`MARGIN_SE` standard
    errors of the paired per-row differences (and at least 3 rows to tell)."""
    gain = reference - candidate
    return gain.size >= 3 and gain.mean() > MARGIN_SE * gain.std(ddof=1) / np.sqrt(gain.size)


def choose_by_loo(
    model: nn.Module,
    base: Vector,
    prior: Heads,
    data: ClientData,
    tasks: Sequence[TaskSpec],
    lam: float,
    bias_lambda: float = BIAS_LAMBDA,
    max_iter: int = 100,
) -> tuple[Heads, dict[str, float]]:
    """``personal_lambda_search: loo`` (the default; module docs, docs/algorithm.md). Per task,
    three nested heads, each kept only where it beats the one before by more than
    :data:`MARGIN_SE` standard errors of the paired per-row differences in log-loss on the
    client's train rows (Breiman et al. 1984's standard-error rule, the simpler model as the
    reference):

    1. the **group head** φ_g, scored in-sample (it trained on these rows: a bias in its favour);
    2. the **bias-adapted group head**: φ_g's weights with the client's own output bias, the MAP
       shift δ = argmin Σ_i loss_i + ``bias_lambda``/2·‖δ‖² (C parameters: the client's label
       prior, well estimated from a few rows), scored by its approximate leave-one-out loss
       (:func:`fedmtl.client.loo.alo_losses`);
    3. the **personal head**: the MAP fit at ``lam`` (``personal_lambda``) with the prior at
       φ_g, scored likewise.

    A client whose rows do not show a step to be better stays where it is. Cost: the fixed λ's
    fit, a fit of C biases and one ALO solve per task. Returns the heads (``model.heads`` holds
    them too) and each task's λ (∞: the group head or the bias-adapted one). A client with fewer
    than 3 train rows, or a head too large for the ALO's linear solve, takes the MAP fit at
    ``lam``."""
    names = list(prior)
    by_name = {task.name: task for task in tasks}
    z = _features(model, base, prior, data)
    heads = model.heads
    anchor = {t: _snapshot(heads, t) for t in names}
    flat_anchor = [a for t in names for a in anchor[t]]
    n = data.n_train
    too_large = any(
        not isinstance(heads[t], nn.Linear)
        or system_size(n, heads[t].out_features, heads[t].in_features) > MAX_SYSTEM
        for t in names
    )
    if n < 3 or too_large:
        _map_solve(heads, names, z, data.y_train, tasks, flat_anchor, lam, max_iter)
        return read_heads(model, prior), dict.fromkeys(names, lam)
    y = data.y_train
    # 1. the group heads, scored in-sample: they were trained on these rows (a bias in their
    # favour, so every step away from them must earn its place)
    chosen = {
        t: (float("inf"), anchor[t], _loo_rows(heads, t, z, y[t], by_name[t], None)) for t in names
    }
    # 2. the bias-adapted group heads: only the output biases move
    bias_anchor = [anchor[t][1] for t in names]
    _map_solve(heads, names, z, y, tasks, bias_anchor, bias_lambda, max_iter, bias_only=True)
    for t in names:
        rows = _loo_rows(heads, t, z, y[t], by_name[t], bias_lambda, "bias")
        if _beats(rows, chosen[t][2]):
            chosen[t] = (float("inf"), _snapshot(heads, t), rows)
        _load(heads, t, anchor[t])
    # 3. the personal heads: the MAP fit at the fixed λ, from the group heads
    _map_solve(heads, names, z, y, tasks, flat_anchor, lam, max_iter)
    choices: dict[str, float] = {}
    for t in names:
        rows = _loo_rows(heads, t, z, y[t], by_name[t], lam, "all")
        if _beats(rows, chosen[t][2]):
            choices[t] = lam  # the personal head (model.heads holds it)
        else:
            choices[t] = chosen[t][0]
            _load(heads, t, chosen[t][1])
    return read_heads(model, prior), choices


def fit_personal_heads(
    model: nn.Module,
    base: Vector,
    prior: Heads,
    data: ClientData,
    tasks: Sequence[TaskSpec],
    lam: float,
    search: str = "loo",
    grid: Sequence[float] = LAMBDA_GRID,
    max_iter: int = 100,
) -> tuple[Heads, float, float]:
    """ψ_c's MAP fit with a prior at ``prior`` (φ_g) on the client's train rows: with
    ``search="loo"`` the bias-adapted group head or the personal head at ``lam``, chosen per task
    by :func:`choose_by_loo`; with ``"off"`` at precision ``lam``; with ``"cv"`` at the λ chosen by
    :func:`select_lambda` (``lam`` when the client has too few rows to cross-validate). Returns
    the heads, their mean train loss and the λ used (the first task's; ∞: the bias-adapted head)."""
    if data.n_train == 0:
        return {t: v.clone() for t, v in prior.items()}, float("nan"), lam
    names = list(prior)
    if search == "loo":
        chosen_heads, choices = choose_by_loo(
            model, base, prior, data, tasks, lam, max_iter=max_iter
        )
        z = _features(model, base, chosen_heads, data)
        with torch.no_grad():
            loss = float(multitask_loss({t: model.heads[t](z) for t in names}, data.y_train, tasks))
        return chosen_heads, loss, choices[names[0]]
    if search == "cv":
        chosen, _ = select_lambda(model, base, prior, data, tasks, grid, max_iter=max_iter)
        lam = lam if chosen is None else chosen
    elif search != "off":
        raise ValueError(
            f"personal_lambda_search '{search}' is not known; allowed values: 'loo', 'off', 'cv'"
        )
    heads, loss = fit_heads_map(model, base, prior, data, tasks, lam, max_iter)
    return heads, loss, lam


def fit_heads_map(
    model: nn.Module,
    base: Vector,
    prior: Heads,
    data: ClientData,
    tasks: Sequence[TaskSpec],
    lam: float,
    max_iter: int = 100,
) -> tuple[Heads, float]:
    """The heads' maximum a posteriori fit on the frozen base, with a Gaussian prior of precision
    ``lam`` centred on ``prior``: argmin_ψ Σ_i loss_i(ψ) + λ/2·‖ψ − prior‖², solved full-batch
    with L-BFGS on features computed once. For linear heads the problem is convex, so the result
    does not depend on a learning rate or an epoch count; the prior weighs relatively less the
    more rows a client has. Returns the heads and their mean train loss."""
    if data.n_train == 0:
        return {t: v.clone() for t, v in prior.items()}, float("nan")
    names = list(prior)
    z = _features(model, base, prior, data)
    heads = model.heads
    anchor = [p.detach().clone() for t in names for p in heads[t].parameters()]
    _map_solve(heads, names, z, data.y_train, tasks, anchor, lam, max_iter)
    with torch.no_grad():
        loss = float(multitask_loss({t: heads[t](z) for t in names}, data.y_train, tasks))
    return read_heads(model, prior), loss
