"""Local training on a client: the shared update it releases and the personal head it keeps.

The default client procedure of fedmtl (see docs/algorithm.md):

1. **personal step** (FedRep's head phase): with the received base θ frozen, train the client's
   personal heads ψ_c for ``personal_epochs``, starting from its group's heads φ_g (default,
   ``personal_init: group``: fine-tuning that stays anchored to the group) or from its stored ψ_c
   (``personal_init: personal``). ψ_c stays on the client.
2. **shared step**: from (θ, φ_g), train base and group heads jointly for ``local_epochs``
   (optionally with FedProx's proximal term μ/2·‖θ−θ_r‖²) and release Δθ and Δφ_g.

Every random draw comes from a generator seeded by (seed, round, client), so a client's result
does not depend on which thread or process trains it.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from fedmtl.client import ClientData
from fedmtl.data.manifest import TaskSpec
from fedmtl.state import ClientUpdate, Heads, Vector, assign, flat


@dataclass(frozen=True)
class LocalConfig:
    epochs: int = 2
    personal_epochs: int = 2
    batch_size: int = 16
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0
    prox_mu: float = 0.0
    personal_init: str = "group"  # or "personal": continue from the stored ψ_c

    @classmethod
    def from_training(cls, training) -> "LocalConfig":  # a fedmtl.config.TrainingConfig
        return cls(
            epochs=training.local_epochs,
            personal_epochs=training.personal_epochs,
            batch_size=training.batch_size,
            lr=training.lr,
            momentum=training.momentum,
            weight_decay=training.weight_decay,
            personal_init=training.personal_init,
        )


def client_seed(seed: int, round_: int, client: str, purpose: str = "") -> int:
    """A stable 63-bit seed for one client's work in one round."""
    return zlib.crc32(f"{seed}:{round_}:{client}:{purpose}".encode()) | (seed & 0x7FFFFFFF) << 32


def multitask_loss(
    outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor], tasks: Sequence[TaskSpec]
) -> torch.Tensor:
    """Sum over tasks: cross-entropy for classification, mean squared error for regression."""
    total = torch.zeros(())
    for task in tasks:
        out, y = outputs[task.name], targets[task.name]
        if task.kind == "classification":
            total = total + F.cross_entropy(out, y)
        else:
            total = total + F.mse_loss(out.squeeze(-1), y)
    return total


def _batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    order = torch.randperm(n, generator=generator)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]


def _sgd(params: list[nn.Parameter], cfg: LocalConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _run_epochs(
    forward,
    params: list[nn.Parameter],
    x: torch.Tensor,
    y: dict[str, torch.Tensor],
    tasks: Sequence[TaskSpec],
    epochs: int,
    cfg: LocalConfig,
    generator: torch.Generator,
    penalty=None,
) -> float:
    """Mini-batch SGD over (x, y) for ``epochs``; returns the mean loss of the last epoch."""
    if x.shape[0] == 0 or epochs == 0:
        return float("nan")
    opt = _sgd(params, cfg)
    last = 0.0
    for _ in range(epochs):
        total, count = 0.0, 0
        for idx in _batches(x.shape[0], cfg.batch_size, generator):
            opt.zero_grad(set_to_none=True)
            loss = multitask_loss(forward(x[idx]), {k: v[idx] for k, v in y.items()}, tasks)
            objective = loss + penalty() if penalty is not None else loss
            objective.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        last = total / max(count, 1)
    return last


def load_weights(model: nn.Module, base: Vector, heads: Heads) -> None:
    assign(model.base, base)
    for task, vec in heads.items():
        assign(model.heads[task], vec)


def train_personal_heads(
    model: nn.Module,
    base: Vector,
    start: Heads,
    data: ClientData,
    tasks: Sequence[TaskSpec],
    cfg: LocalConfig,
    generator: torch.Generator,
) -> tuple[Heads, float]:
    """Train only the heads on the frozen base (features computed once). Returns ψ_c and loss."""
    load_weights(model, base, start)
    if cfg.personal_epochs == 0 or data.n_train == 0:
        return {t: v.clone() for t, v in start.items()}, float("nan")
    with torch.no_grad():
        model.base.eval()
        z = model.base(data.x_train)
    model.train()
    heads = model.heads
    params = [p for h in heads.values() for p in h.parameters()]

    def forward(zb: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: head(zb) for name, head in heads.items()}

    loss = _run_epochs(forward, params, z, data.y_train, tasks, cfg.personal_epochs, cfg, generator)
    return {t: flat(model.heads[t]) for t in start}, loss


def train_shared(
    model: nn.Module,
    base: Vector,
    group_heads: Heads,
    data: ClientData,
    tasks: Sequence[TaskSpec],
    cfg: LocalConfig,
    generator: torch.Generator,
) -> tuple[Vector, Heads, float]:
    """Joint training of base and group heads; returns (Δθ, Δφ_g, loss)."""
    load_weights(model, base, group_heads)
    model.train()
    penalty = None
    if cfg.prox_mu > 0:
        anchor = [p.detach().clone() for p in model.base.parameters()]

        def penalty() -> torch.Tensor:  # FedProx (Li et al. 2020)
            sq = sum(((p - a) ** 2).sum() for p, a in zip(model.base.parameters(), anchor))
            return 0.5 * cfg.prox_mu * sq

    loss = _run_epochs(
        model, list(model.parameters()), data.x_train, data.y_train, tasks, cfg.epochs, cfg,
        generator, penalty,
    )
    delta_base = flat(model.base) - base
    delta_heads = {t: flat(model.heads[t]) - v for t, v in group_heads.items()}
    return delta_base, delta_heads, loss


def local_train(
    model: nn.Module,
    base: Vector,
    group_heads: Heads,
    personal: Heads | None,
    data: ClientData,
    tasks: Sequence[TaskSpec],
    cfg: LocalConfig,
    seed: int,
) -> tuple[ClientUpdate, Heads]:
    """One client's round: the personal step, then the shared step. Returns (update, ψ_c)."""
    generator = torch.Generator().manual_seed(seed)
    keep = cfg.personal_init == "personal" and personal is not None
    start = personal if keep else group_heads
    new_personal, personal_loss = train_personal_heads(
        model, base, start, data, tasks, cfg, generator
    )
    delta_base, delta_heads, loss = train_shared(model, base, group_heads, data, tasks, cfg, generator)
    update = ClientUpdate(
        client=data.client,
        group=data.group,
        n_samples=data.n_train,
        delta_base=delta_base,
        delta_heads=delta_heads,
        metrics={"train_loss": loss, "personal_train_loss": personal_loss},
    )
    return update, new_personal
