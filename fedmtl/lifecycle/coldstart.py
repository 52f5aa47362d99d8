"""Cold start: a model for a client that took no part in training.

The client brings k labelled rows (its *support set*). It

1. picks its group: the group head with the lowest loss on the support set, with the shared
   base θ (IFCA's rule, :func:`fedmtl.server.grouping.lowest_loss`, the same rule as
   :func:`fedmtl.server.grouping.choose_group`); a bundle without group heads (methods that do not
   group clients) starts from the global heads instead;
2. fine-tunes its own head from that group head on the support set for ``epochs`` passes, θ
   frozen (:func:`fedmtl.client.training.train_heads`), optionally pulled back to the group head by
   ``prox_mu``/2·‖ψ − φ_g‖²; every draw comes from a generator seeded by ``seed``.

With no labelled row it gets the global heads (``source`` "global").

Labels travel as one tensor per task with the same rows as ``x``; a missing label is ``-1``
(classification, class indices) or NaN (regression). Each task's head is fitted on the rows
that carry that task's label: with θ frozen the heads do not interact, so this is the
multi-task loss restricted to the labels that exist. :func:`encode_support` turns a table's
label columns into that form and names the client and the label when a class is not declared.

No Prefect or MLflow here: the CLI (``fedmtl personalize``) and the served model
(:mod:`models.personalized`) call :func:`personalize`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from fedmtl.client.data import ClientData, encode_labels
from fedmtl.client.training import LocalConfig, train_heads, train_loss
from fedmtl.config import ColdStartConfig
from fedmtl.server.grouping import lowest_loss
from fedmtl.state import Heads, Vector

COLD_START = "cold-start"
GLOBAL = "global"
MISSING_CLASS = -1


@dataclass(frozen=True)
class ColdStartSettings:
    """How the personal head is fine-tuned: the fields of ``coldstart`` in params.yaml
    (:class:`fedmtl.config.ColdStartConfig`, which holds the defaults and why)."""

    epochs: int
    lr: float
    batch_size: int
    prox_mu: float
    seed: int = 0

    @classmethod
    def from_any(cls, cfg: Any) -> "ColdStartSettings":
        """From a ``ColdStartConfig``, a dict of its fields or another settings object; what it
        leaves out takes the default, and the result passes the config's checks."""
        if isinstance(cfg, cls):
            return cfg
        names = cls.__dataclass_fields__
        raw = ColdStartConfig().model_dump()  # defaults for whatever ``cfg`` leaves out
        if isinstance(cfg, dict):
            raw.update({k: v for k, v in cfg.items() if k in names})
        elif cfg is not None:
            raw.update({k: getattr(cfg, k) for k in names if hasattr(cfg, k)})
        valid = ColdStartConfig.model_validate(raw)  # the same checks as params.yaml
        return cls(**{k: getattr(valid, k) for k in names})

    def local(self) -> LocalConfig:
        return LocalConfig(batch_size=self.batch_size, lr=self.lr, momentum=0.0, weight_decay=0.0)


@dataclass(frozen=True)
class ColdStart:
    """The result: the heads to predict with, where they started, and why."""

    group: str | None  # the chosen group; None when the heads are the global ones
    heads: Heads
    source: str  # "cold-start" (fine-tuned on labels) or "global" (no labels)
    losses: dict[str, float] = field(default_factory=dict)  # support loss of each group head
    n_labelled: int = 0  # rows with at least one label


def present(y: torch.Tensor) -> torch.Tensor:
    """Which rows carry a label: not NaN (regression), not negative (classification)."""
    if y.is_floating_point():
        return ~torch.isnan(y)
    return y >= 0


def labelled_rows(y: dict[str, torch.Tensor], n: int) -> torch.Tensor:
    """Rows with at least one task's label."""
    mask = torch.zeros(n, dtype=torch.bool)
    for values in y.values():
        mask |= present(values)
    return mask


def encode_support(
    frame: pd.DataFrame, tasks: Sequence[Any], client: str = "?"
) -> dict[str, torch.Tensor]:
    """The label columns of ``frame`` as tensors: class indices into the task's declared classes
    (missing → -1) or float targets (missing → NaN). A task whose column is absent is missing on
    every row. ``tasks``: TaskSpec-like objects (name, kind, classes). Raises ``ValueError``
    naming the client, the task and the label when a label is not a declared class."""
    y: dict[str, torch.Tensor] = {}
    n = len(frame)
    for task in tasks:
        name = task.name
        if task.kind == "classification":
            out = torch.full((n,), MISSING_CLASS, dtype=torch.int64)
        else:
            out = torch.full((n,), float("nan"), dtype=torch.float32)
        if name in frame.columns:
            values = frame[name]
            mask = values.notna().to_numpy(dtype=bool, copy=True)
            if mask.any():
                kept = values[mask].to_numpy()
                if task.kind == "classification":
                    kept = np.array(
                        [_as_declared(v, task.classes) for v in kept.tolist()], dtype=object
                    )
                else:
                    try:
                        kept = kept.astype(np.float32)
                    except (TypeError, ValueError):
                        raise ValueError(
                            f"client '{client}': task '{name}' is a regression target, but its "
                            f"labels are not numbers (e.g. {kept[0]!r})"
                        ) from None
                out[torch.as_tensor(mask)] = encode_labels(kept, task, client).to(out.dtype)
        y[name] = out
    return y


def _as_declared(value: Any, classes: Sequence[Any]) -> Any:
    """A label read back as a float (an integer column with missing values) or as text (CSV)
    matched to the declared class it stands for; anything else is returned as is."""
    if value in classes:
        return value
    if (
        isinstance(value, float)
        and value.is_integer()
        and (int(value) in classes or all(isinstance(c, int) for c in classes))
    ):
        return int(value)  # so that an undeclared 42.0 is reported as the 42 it stands for
    text = str(value)
    for c in classes:
        if str(c) == text:
            return c
    return value


def _task_data(x: torch.Tensor, y: dict[str, torch.Tensor], task: Any, client: str) -> ClientData:
    """The rows of the support set that carry ``task``'s label, as a ClientData to train on."""
    mask = present(y[task.name])
    empty_x = x[:0]
    return ClientData(
        client, "", x[mask], {task.name: y[task.name][mask]}, empty_x, {task.name: y[task.name][:0]}
    )


def _check(x: torch.Tensor, y: dict[str, torch.Tensor], tasks: Sequence[Any], client: str) -> None:
    names = [t.name for t in tasks]
    unknown = sorted(set(y) - set(names))
    if unknown:
        raise ValueError(
            f"client '{client}': labels for unknown task(s) {unknown}; "
            f"the model's tasks are {names}"
        )
    for task in tasks:
        if task.name not in y:
            continue
        values = y[task.name]
        if values.shape[0] != x.shape[0]:
            raise ValueError(
                f"client '{client}': task '{task.name}' has {values.shape[0]} labels "
                f"for {x.shape[0]} rows"
            )
        if task.kind == "classification":
            if values.is_floating_point():
                raise ValueError(
                    f"client '{client}': task '{task.name}' needs class indices (int64)"
                )
            bad = values[(values >= len(task.classes))]
            if bad.numel():
                raise ValueError(
                    f"client '{client}': label index {int(bad[0])} of task '{task.name}' "
                    "is not one "
                    f"of the {len(task.classes)} declared classes {list(task.classes)}"
                )


def support_loss(
    model: nn.Module,
    base: Vector,
    heads: Heads,
    x: torch.Tensor,
    y: dict[str, torch.Tensor],
    tasks: Sequence[Any],
    client: str = "?",
) -> float:
    """The multi-task loss of (base, heads) on the labels that exist: the sum over tasks of the
    task's mean loss on the rows that carry its label (:func:`fedmtl.client.training.train_loss`;
    with every label present this is exactly the train loss IFCA's rule compares)."""
    total, any_task = 0.0, False
    for task in tasks:
        if task.name not in y or not bool(present(y[task.name]).any()):
            continue
        total += train_loss(model, base, heads, _task_data(x, y, task, client), [task])
        any_task = True
    return total if any_task else float("inf")


def personalize(
    model: nn.Module,
    base: Vector,
    group_heads: dict[str, Heads],
    global_heads: Heads,
    x: torch.Tensor,
    y: dict[str, torch.Tensor],
    tasks: Sequence[Any],
    cfg: Any = None,
    seed: int | None = None,
    client: str = "?",
) -> ColdStart:
    """Personal heads for a client that took no part in training (see the module docstring).

    ``model``: a model of the right architecture (its weights are overwritten); ``x``: the
    support rows' features; ``y``: task -> labels for those rows (missing: -1 / NaN; a task left
    out is missing everywhere); ``cfg``: a ``ColdStartConfig`` or dict of its fields (None: the
    defaults); ``seed``: overrides ``cfg.seed``. The base is never changed."""
    settings = ColdStartSettings.from_any(cfg)
    seed = settings.seed if seed is None else seed
    tasks = list(tasks)
    x = torch.as_tensor(x, dtype=torch.float32)
    _check(x, y, tasks, client)
    labelled = labelled_rows(y, x.shape[0])
    n_labelled = int(labelled.sum())
    if n_labelled == 0:
        return ColdStart(None, _copy(global_heads), GLOBAL, {}, 0)

    was_training = model.training
    losses: dict[str, float] = {}
    if group_heads:
        losses = {
            g: support_loss(model, base, group_heads[g], x, y, tasks, client)
            for g in sorted(group_heads)
        }
        group: str | None = lowest_loss(losses)
        start = group_heads[group]
    else:  # a method without groups: the global heads are everyone's group
        group, start = None, global_heads

    generator = torch.Generator().manual_seed(int(seed))
    local = settings.local()
    heads = _copy(start)
    with torch.enable_grad():  # callers may predict under no_grad
        for task in tasks:
            if task.name not in y:
                continue
            data = _task_data(x, y, task, client)
            if data.n_train == 0:
                continue
            tuned, _ = train_heads(
                model,
                base,
                heads,
                data,
                [task],
                local,
                generator,
                settings.epochs,
                prox_mu=settings.prox_mu,
            )
            heads[task.name] = tuned[task.name]
    model.train(was_training)
    return ColdStart(group, heads, COLD_START, losses, n_labelled)


def _copy(heads: Heads) -> Heads:
    return {t: v.detach().clone() for t, v in heads.items()}
