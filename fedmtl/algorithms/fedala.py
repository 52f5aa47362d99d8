"""FedALA (Zhang et al., AAAI 2023, "FedALA: Adaptive Local Aggregation for Personalized
Federated Learning"): the client does not overwrite its local model with the received global
one; it mixes them element-wise, with weights it learns on its own data.

**Adaptive local aggregation (ALA).** With the client's local model (θ_c, φ_c) and the received
global model (θ, φ), the *adapted* parameters (every task head, plus the last
:attr:`FedALA.base_tensors` parameter tensors of the base) become

    p ← p_c + (p − p_c) ⊙ W = W ⊙ p + (1 − W) ⊙ p_c,   W ∈ [0, 1] element-wise,

and the lower base layers take the global values. W starts at 1 (FedAvg's start) and is learnt
by W ← clip(W − η · ∂L/∂p ⊙ (p − p_c), 0, 1) after every mini-batch of a random contiguous
:attr:`FedALA.rand_percent` % of the client's train rows (in order; a last partial batch is
dropped unless it is the only one), as PFLlib's ``utils/ALA.py`` does: the first time until
the loss of the last batch of each pass has a standard deviation below :attr:`FedALA.threshold`
over :attr:`FedALA.num_pre_loss` passes, afterwards one pass from the client's previous W. A client
that has no local model yet starts from the global model (PFLlib skips ALA while the two are
equal, in the first round).

**Round.** ALA, then ordinary local training (``local_epochs``, FedProx's μ if set) from the
adapted model. The client **releases** the change of the whole model (base and heads) against
the global model it received, as FedAvg; it **keeps** its trained model and W
(``extra["fedala/weights"]``). **Personalised model**: its local model after the ALA step on the
latest global model (W learnt one more pass, not kept: evaluation changes no client state).

Differences from PFLlib: only a round's participants run ALA (PFLlib runs it on every client
each round), when they next train; the first ALA stops after :attr:`FedALA.max_passes` passes
if it has not converged (PFLlib has no bound); the ALA step is outside DP-SGD, so the method
refuses ``privacy.dp_sgd``.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from fedmtl.algorithms.base import Algorithm, ClientContext, diff
from fedmtl.client.data import ClientData
from fedmtl.client.training import load_weights, multitask_loss, train_joint
from fedmtl.state import ClientUpdate, Heads, PersonalState, ServerState, Vector

#: the personal-state entry holding W (over the adapted parameters, in :func:`_top` order)
WEIGHTS = "fedala/weights"

Model = tuple[Vector, Heads]


@dataclass(eq=False)
class FedALA(Algorithm):
    """Settings: the paper's and PFLlib's defaults (``system/main.py``, ``utils/ALA.py``)."""

    name: ClassVar[str] = "fedala"
    #: learning rate of W (PFLlib ``-et/--eta``, default 1.0)
    eta: float = 1.0
    #: percent of the train rows W is learnt on (PFLlib ``-s/--rand_percent``, default 80)
    rand_percent: float = 80.0
    #: base parameter tensors (a linear layer has two) adapted besides the heads. PFLlib's
    #: ``-p/--layer_idx`` default 2 counts the model's last tensors: its head's weight and bias,
    #: i.e. the heads only, here 0
    base_tensors: int = 0
    #: the first ALA runs until the std of the last ``num_pre_loss`` pass losses is below
    #: ``threshold`` (PFLlib ``ALA.py`` defaults 0.1 and 10)
    threshold: float = 0.1
    num_pre_loss: int = 10
    #: bound on the passes of the first ALA (not in PFLlib)
    max_passes: int = 100

    def client_round(
        self,
        ctx: ClientContext,
        state: ServerState,
        data: ClientData,
        group: str,
        personal: PersonalState | None,
    ) -> tuple[ClientUpdate, PersonalState]:
        start, weights = self._start(ctx, state, data, personal)
        base, heads, loss = train_joint(
            ctx.model,
            *start,
            data,
            ctx.tasks,
            ctx.cfg,
            ctx.generator,
            ctx.cfg.epochs,
            prox_mu=ctx.cfg.prox_mu,
        )
        update = self.update(
            data, group, base - state.base, diff(heads, state.global_heads), train_loss=loss
        )
        return update, PersonalState(heads, base, {} if weights is None else {WEIGHTS: weights})

    def personalized(
        self,
        ctx: ClientContext,
        state: ServerState,
        data: ClientData,
        group: str,
        personal: PersonalState | None,
    ) -> tuple[Vector, Heads, None]:
        (base, heads), _ = self._start(ctx, state, data, personal)
        return base, heads, None

    def _start(
        self, ctx: ClientContext, state: ServerState, data: ClientData, p: PersonalState | None
    ) -> tuple[Model, Vector | None]:
        received = (state.base, state.global_heads)
        if p is None or p.base is None:
            return received, None
        return self.adapt(ctx, (p.base, p.heads), received, data, p.extra.get(WEIGHTS))

    # the ALA step ---------------------------------------------------------------------------

    def window(self, n: int, generator: torch.Generator) -> slice:
        """The rows W is learnt on: a random contiguous ``rand_percent`` % of the ``n``."""
        k = int(self.rand_percent / 100 * n)
        start = int(torch.randint(0, n - k + 1, (1,), generator=generator))
        return slice(start, start + k)

    def mix(self, model: nn.Module, local: Model, received: Model, weights: Vector) -> Model:
        """W ⊙ global + (1 − W) ⊙ local on the adapted parameters, global below them."""
        m, names = _tail(model, self.base_tensors), list(received[1])
        top = weights * _top(*received, m, names) + (1 - weights) * _top(*local, m, names)
        return _with_top(*received, m, top)

    def adapt(
        self,
        ctx: ClientContext,
        local: Model,
        received: Model,
        data: ClientData,
        weights: Vector | None,
    ) -> tuple[Model, Vector]:
        """The ALA step: the mixed model and W, learnt from ``weights`` (None: the first ALA,
        from W = 1 until converged; else one pass). Draws its rows from ``ctx.generator``."""
        model, m, names = ctx.model, _tail(ctx.model, self.base_tensors), list(received[1])
        rows = self.window(data.n_train, ctx.generator)
        local_top, global_top = _top(*local, m, names), _top(*received, m, names)
        gap = global_top - local_top
        w = torch.ones_like(global_top) if weights is None else weights.clone()
        x = data.x_train[rows]
        y = {k: v[rows] for k, v in data.y_train.items()}
        size = ctx.cfg.batch_size
        starts = list(range(0, x.shape[0] - size + 1, size)) or ([0] if x.shape[0] else [])
        load_weights(model, *received)  # the lower layers: the global model's
        model.train()
        params = _adapted(model, self.base_tensors, names)
        passes = 0 if not starts else self.max_passes if weights is None else 1
        losses: list[float] = []  # one a pass: its last batch's
        for _ in range(passes):
            for s in starts:
                _write(params, w * global_top + (1 - w) * local_top)
                loss = multitask_loss(
                    model(x[s : s + size]), {k: v[s : s + size] for k, v in y.items()}, ctx.tasks
                )
                grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])
                w = (w - self.eta * grad * gap).clamp_(0, 1)
            losses.append(float(loss.detach()))
            if len(losses) > self.num_pre_loss and (
                statistics.pstdev(losses[-self.num_pre_loss :]) < self.threshold
            ):
                break
        return self.mix(model, local, received, w), w


def _adapted(model: nn.Module, base_tensors: int, tasks: list[str]) -> list[nn.Parameter]:
    base = list(model.base.parameters())
    return base[len(base) - base_tensors :] + [
        p for t in tasks for p in model.heads[t].parameters()
    ]


def _tail(model: nn.Module, base_tensors: int) -> int:
    """How many trailing values of the flat base vector the adapted base tensors hold."""
    return sum(p.numel() for p in _adapted(model, base_tensors, []))


def _top(base: Vector, heads: Heads, m: int, names: list[str]) -> Vector:
    """The adapted parameters as one vector: the base's last ``m`` values, then each head."""
    return torch.cat([base[base.numel() - m :], *(heads[t] for t in names)])


def _with_top(base: Vector, heads: Heads, m: int, top: Vector) -> Model:
    out, offset = {}, m
    for t, v in heads.items():
        out[t] = top[offset : offset + v.numel()].clone()
        offset += v.numel()
    return torch.cat([base[: base.numel() - m], top[:m]]), out


@torch.no_grad()
def _write(params: list[nn.Parameter], vector: Vector) -> None:
    offset = 0
    for p in params:
        p.copy_(vector[offset : offset + p.numel()].view_as(p))
        offset += p.numel()
