"""Querying the attacked (or a shadow) model on candidate examples: per-example loss and LiRA's
logit-scaled confidence of the true class, in eval mode and without gradients."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _select_logits(
    output: torch.Tensor | dict[str, torch.Tensor], task: str | None
) -> torch.Tensor:
    """``output[task]``, the only entry of a one-task dict, or ``output`` itself if a tensor."""
    if isinstance(output, torch.Tensor):
        return output
    if not isinstance(output, dict):
        raise ValueError(
            f"model output must be a tensor or a dict of tensors, got {type(output).__name__}"
        )
    if task is not None:
        if task not in output:
            raise ValueError(f"task '{task}' is not among the model's outputs {sorted(output)}")
        return output[task]
    if len(output) != 1:
        raise ValueError(f"the model has several tasks {sorted(output)}; pass task= to choose one")
    return next(iter(output.values()))


def _model_device(model: torch.nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _check_xy(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.as_tensor(x)
    y = torch.as_tensor(y).reshape(-1).long()
    if x.shape[0] == 0:
        raise ValueError("x is empty: need at least one example")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} rows but y has {y.shape[0]} labels")
    return x, y


def _logits(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, task: str | None, batch_size: int
) -> torch.Tensor:
    """Class logits [n, C] of ``model`` on ``x`` (eval mode, no grad; the mode is restored)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = _model_device(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            parts = [
                _select_logits(model(x[i : i + batch_size].to(device)), task).detach().cpu()
                for i in range(0, x.shape[0], batch_size)
            ]
    finally:
        model.train(was_training)
    logits = torch.cat(parts).to(torch.float64)
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ValueError(
            f"expected classification logits of shape [n, C>=2], got {tuple(logits.shape)}"
        )
    if int(y.min()) < 0 or int(y.max()) >= logits.shape[1]:
        raise ValueError(
            f"labels must lie in [0, {logits.shape[1] - 1}], got [{int(y.min())}, {int(y.max())}]"
        )
    return logits


def per_example_loss(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    task: str | None = None,
    batch_size: int = 4096,
) -> np.ndarray:
    """Cross-entropy of each row of ``x`` against its label in ``y``, as float64 [n].

    The model is queried in eval mode without gradients (its training mode is restored). When
    it returns a dict {task: logits} (fedmtl's ``MultiTaskModel``), ``output[task]`` is used, or
    the only entry when ``task`` is None; a plain tensor output is used as is.
    """
    x, y = _check_xy(x, y)
    logits = _logits(model, x, y, task, batch_size)
    return F.cross_entropy(logits, y, reduction="none").numpy()


def logit_confidence(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    task: str | None = None,
    batch_size: int = 4096,
) -> np.ndarray:
    """LiRA's statistic φ = log(p_y / (1 − p_y)) of the true class, as float64 [n].

    Computed stably from the logits z as z_y − logsumexp_{j≠y} z_j (= log p_y − log Σ_{j≠y} p_j),
    so it stays finite when p_y rounds to 0 or 1. Model handling as in :func:`per_example_loss`.
    """
    x, y = _check_xy(x, y)
    logits = _logits(model, x, y, task, batch_size)
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf"))
    return (true - torch.logsumexp(others, dim=1)).numpy()
