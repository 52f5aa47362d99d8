"""Local training primitives that every method's client procedure is built from.

- :func:`fit`: mini-batch SGD over chosen parameters, with an optional penalty (FedProx's
  proximal term) or a per-step hook (Ditto's proximal step);
- :func:`train_heads`: heads only, on the frozen base (features computed once);
- :func:`train_joint`: base and heads together, either part optionally frozen;
- :func:`train_loss`: the loss of given weights on the client's train split (IFCA's choice).

Every random draw comes from a generator seeded by (seed, round, client), so a client's result
does not depend on which thread or process trains it (:func:`client_seed`).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from fedmtl.client.data import MISSING_CLASS, ClientData, labelled
from fedmtl.data.manifest import TaskSpec
from fedmtl.state import Heads, Vector, assign, flat


@dataclass(frozen=True)
class LocalConfig:
    """Client-side settings of every method (see ``training`` and ``algorithm`` in params.yaml)."""

    epochs: int = 2
    personal_epochs: int = 2
    batch_size: int = 16
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0
    prox_mu: float = 0.0  # FedProx μ on the shared step (0 = plain FedAvg local training)
    personal_lambda: float = 0.3  # fedmtl: pull of ψ_c towards φ_g
    personal_fit: str = "map"  # fedmtl: "map" (exact, L-BFGS) or "sgd" (personal_epochs)
    #: fedmtl: "loo" (per client and task: the bias-adapted group head or the personal head on a
    #: λ path, by approximate leave-one-out), "off" (personal_lambda) or "cv" (λ from the grid)
    personal_lambda_search: str = "loo"
    personal_lambda_grid: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)
    ditto_lambda: float = 0.1
    pfedme_lambda: float = 15.0
    pfedme_inner_steps: int = 5
    pfedme_personal_lr: float = 0.05
    #: GPFL: λ of the magnitude-level guidance and μ, the weight decay of the CoV and GCE (the
    #: GPFL authors' values for MLPs and small CNNs; PFLlib's generic defaults are 1.0 and 0.0)
    gpfl_lambda: float = 0.01
    gpfl_mu: float = 0.1
    #: a :class:`fedmtl.privacy.dpsgd.DPSGDSession` while a client trains under
    #: ``privacy.dp_sgd.enabled``: every :func:`fit` is then DP-SGD and its steps are recorded
    #: there (set per client round, never here)
    dp_sgd: Any = field(default=None, compare=False, repr=False)

    @classmethod
    def from_config(cls, cfg) -> "LocalConfig":  # a fedmtl.config.Config
        t, a = cfg.training, cfg.algorithm
        return cls(
            epochs=t.local_epochs,
            personal_epochs=t.personal_epochs,
            batch_size=t.batch_size,
            lr=t.lr,
            momentum=t.momentum,
            weight_decay=t.weight_decay,
            prox_mu=a.prox_mu,
            personal_lambda=a.personal_lambda,
            personal_fit=a.personal_fit,
            personal_lambda_search=a.personal_lambda_search,
            personal_lambda_grid=tuple(a.personal_lambda_grid),
            ditto_lambda=a.ditto_lambda,
            pfedme_lambda=a.pfedme_lambda,
            pfedme_inner_steps=a.pfedme_inner_steps,
            pfedme_personal_lr=a.pfedme_personal_lr,
        )


def client_seed(seed: int, round_: int, client: str, purpose: str = "") -> int:
    """A stable 63-bit seed for one client's work in one round."""
    return zlib.crc32(f"{seed}:{round_}:{client}:{purpose}".encode()) | (seed & 0x7FFFFFFF) << 32


def multitask_loss(
    outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor], tasks: Sequence[TaskSpec]
) -> torch.Tensor:
    """Sum over tasks: cross-entropy for classification, mean squared error for regression, each
    the mean over the rows that hold the task's label (an optional task's rows without one add
    nothing; a task no row holds adds 0)."""
    total = torch.zeros(())
    for task in tasks:
        rows, have = task_row_losses(task, outputs[task.name], targets[task.name])
        total = total + rows.sum() / have.sum().clamp(min=1)
    return total


def task_row_losses(
    task: TaskSpec, out: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's loss for ``task`` (0 where the row lacks its label) and which rows hold one:
    cross-entropy on logits, or squared error. Safe under ``torch.func.vmap`` and for gradients
    (a missing regression label is replaced before the subtraction, not masked after it)."""
    have = labelled(task, y)
    if task.kind == "classification":
        return F.cross_entropy(out, y, reduction="none", ignore_index=MISSING_CLASS), have
    target = torch.where(have, y, torch.zeros_like(y))
    return torch.where(have, (out.squeeze(-1) - target) ** 2, torch.zeros_like(target)), have


def batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    order = torch.randperm(n, generator=generator)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]


def fit(
    forward: Callable[[torch.Tensor], dict[str, torch.Tensor]],
    params: list[nn.Parameter],
    x: torch.Tensor,
    y: dict[str, torch.Tensor],
    tasks: Sequence[TaskSpec],
    epochs: int,
    cfg: LocalConfig,
    generator: torch.Generator,
    penalty: Callable[[], torch.Tensor] | None = None,
    after_step: Callable[[], None] | None = None,
    lr: float | None = None,
) -> float:
    """Mini-batch SGD over (x, y) for ``epochs``; returns the mean loss of the last epoch.
    With ``cfg.dp_sgd`` set, DP-SGD instead (:mod:`fedmtl.privacy.dpsgd`; ``forward`` must then
    be the module that holds ``params``)."""
    if x.shape[0] == 0 or epochs == 0 or not params:
        return float("nan")
    if cfg.dp_sgd is not None:
        return cfg.dp_sgd.fit(
            forward,
            params,
            x,
            y,
            tasks,
            epochs,
            cfg,
            generator,
            penalty=penalty,
            after_step=after_step,
            lr=lr,
        )
    opt = torch.optim.SGD(
        params,
        lr=cfg.lr if lr is None else lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
    )
    last = 0.0
    for _ in range(epochs):
        total, count = 0.0, 0
        for idx in batches(x.shape[0], cfg.batch_size, generator):
            opt.zero_grad(set_to_none=True)
            loss = multitask_loss(forward(x[idx]), {k: v[idx] for k, v in y.items()}, tasks)
            objective = loss + penalty() if penalty is not None else loss
            objective.backward()
            opt.step()
            if after_step is not None:
                after_step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        last = total / max(count, 1)
    return last


def load_weights(model: nn.Module, base: Vector, heads: Heads) -> None:
    assign(model.base, base)
    for task, vec in heads.items():
        assign(model.heads[task], vec)


def read_heads(model: nn.Module, like: Heads) -> Heads:
    return {t: flat(model.heads[t]) for t in like}


def proximal_penalty(params: list[nn.Parameter], mu: float) -> Callable[[], torch.Tensor] | None:
    """μ/2·‖w − w₀‖² around the parameters' current values (FedProx, Li et al. 2020)."""
    if mu <= 0 or not params:
        return None
    anchor = [p.detach().clone() for p in params]

    def penalty() -> torch.Tensor:
        return 0.5 * mu * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor))

    return penalty


def train_heads(
    model: nn.Module,
    base: Vector,
    start: Heads,
    data: ClientData,
    tasks: Sequence[TaskSpec],
    cfg: LocalConfig,
    generator: torch.Generator,
    epochs: int,
    prox_mu: float = 0.0,
) -> tuple[Heads, float]:
    """Train only the heads on the frozen base (features computed once); returns heads, loss.
    ``prox_mu`` pulls the heads towards ``start`` (μ/2·‖ψ − start‖²)."""
    load_weights(model, base, start)
    if epochs == 0 or data.n_train == 0:
        return {t: v.clone() for t, v in start.items()}, float("nan")
    with torch.no_grad():
        model.base.eval()
        z = model.base(data.x_train)
    model.train()
    heads = _HeadsOnly(model.heads)
    params = [p for h in model.heads.values() for p in h.parameters()]
    loss = fit(
        heads,
        params,
        z,
        data.y_train,
        tasks,
        epochs,
        cfg,
        generator,
        penalty=proximal_penalty(params, prox_mu),
    )
    return read_heads(model, start), loss


class _HeadsOnly(nn.Module):
    """The heads on given features: the module :func:`train_heads` trains."""

    def __init__(self, heads: nn.ModuleDict) -> None:
        super().__init__()
        self.heads = heads

    def forward(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: head(z) for name, head in self.heads.items()}


def train_joint(
    model: nn.Module,
    base: Vector,
    heads: Heads,
    data: ClientData,
    tasks: Sequence[TaskSpec],
    cfg: LocalConfig,
    generator: torch.Generator,
    epochs: int,
    train_base: bool = True,
    train_head: bool = True,
    prox_mu: float = 0.0,
    after_step: Callable[[nn.Module], None] | None = None,
) -> tuple[Vector, Heads, float]:
    """Train base and heads from (base, heads); either part may be frozen. Returns the new
    base, the new heads and the last epoch's loss. ``prox_mu``: FedProx's term on the trained
    parameters; ``after_step(model)``: called after every optimiser step."""
    load_weights(model, base, heads)
    model.train()
    params: list[nn.Parameter] = []
    if train_base:
        params += list(model.base.parameters())
    if train_head:
        params += [p for t in heads for p in model.heads[t].parameters()]
    hook = (lambda: after_step(model)) if after_step is not None else None
    loss = fit(
        model,
        params,
        data.x_train,
        data.y_train,
        tasks,
        epochs,
        cfg,
        generator,
        penalty=proximal_penalty(params, prox_mu),
        after_step=hook,
    )
    return flat(model.base), read_heads(model, heads), loss


@torch.no_grad()
def train_loss(
    model: nn.Module, base: Vector, heads: Heads, data: ClientData, tasks: Sequence[TaskSpec]
) -> float:
    """The loss of (base, heads) on the client's whole train split."""
    if data.n_train == 0:
        return float("inf")
    load_weights(model, base, heads)
    model.eval()
    return float(multitask_loss(model(data.x_train), data.y_train, tasks))
