"""FedDBE (Zhang et al., NeurIPS 2023, "Eliminating Domain Bias for Federated Learning in
Representation Space"): FedAvg with a domain bias eliminator in representation space.

- **PRBM** (personalized representation bias memory): a learnable vector b_c per client, added
  to the base's output before the heads (one vector for all tasks: it lives in representation
  space), heads(θ(x) + b_c). It is trained with the model by the same SGD (PFLlib: a separate
  plain SGD at the same learning rate; the same with ``training.momentum`` and
  ``weight_decay`` 0, the defaults) and kept on the client (``extra["feddbe/prbm"]``).
- **MR** (mean regularisation): κ · mean_d ½(z̄_c − z̄)² is added to the local loss, where z̄_c is
  the client's running mean of θ(x) over the round's batches (z̄_c ← (1 − ρ)·z̄_c + ρ·batch mean,
  from 0 at the start of each round, earlier batches detached) and z̄ the global mean: the
  clients' sample-weighted mean of their z̄_c after round 1, then fixed.

This follows PFLlib's ``clientdbe.py``/``serverdbe.py``: there the server runs an initialisation
period (every client trains once without PRBM and MR) and averages the clients' running means.
Here round 1 is that period (no PRBM, no MR); its model updates are averaged as FedAvg's (PFLlib
discards them) and only that round's participants contribute to z̄ (PFLlib: every client).

**How z̄ reaches the server and back.** The server state holds base and heads only, so z̄ rides
as an extra head ``feddbe/mean`` (:meth:`Algorithm.extra_heads`: zeros in round 0). In round 1 a
client releases z̄_c − 0 as that head's delta, and the server's sample-weighted mean of head
deltas makes it Σ n_c z̄_c / Σ n_c; from round 2 the clients release a zero delta, so it stays.
Thus z̄ takes every path an update takes (screening, robust rules, DP-FedAvg's clipping and
noise, the secure sum, sites, checkpoints, warm starts) with no code of its own; evaluation and
serving read heads by task name, so they ignore it. (A metric would reach the round's records,
not the state; a new state field would need each of those paths to learn it.) It is the exact
weighted mean with ``server.optimizer: fedavg`` and ``server.lr: 1`` (the defaults); another
server lr scales it, and FedAdam/FedYogi step it like a parameter, which is no mean at all.

**Released**: Δθ, Δφ for every task (as FedAvg) and, in round 1, z̄_c; never b_c.
**Personalised model**: θ + b_c + φ, the PRBM folded into each linear head's bias
(φ(z + b) = Wz + (Wb + c)), so it is a (base, heads) pair like every method's; the global
model for a client that has not trained. MR couples a batch's rows, so the method refuses
``privacy.dp_sgd``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from fedmtl.algorithms.base import Algorithm, ClientContext, diff
from fedmtl.client.data import ClientData
from fedmtl.client.training import fit, load_weights, read_heads
from fedmtl.state import ClientUpdate, Heads, PersonalState, ServerState, Vector, assign, flat

#: the extra server head carrying the global representation mean z̄
MEAN = "feddbe/mean"
#: the personal-state entry holding the client's PRBM b_c
PRBM = "feddbe/prbm"


@dataclass(eq=False)
class FedDBE(Algorithm):
    """Settings: κ = 50 and ρ = 1, the one run the authors publish (``TsingZ0/DBE``,
    ``system/run_me.sh``: ``-klw 50 -mo 1``; then z̄_c is the last batch's mean). The argparse
    defaults of PFLlib's and DBE's ``main.py`` (``-klw 0 -mo 0.1``) turn MR off; with ρ = 0.1
    the running mean, restarted from 0 each round, is shrunk towards 0 by 0.9^batches, and
    κ = 50 then hardly moves the representation (measured on the tests' digits clients)."""

    name: ClassVar[str] = "feddbe"
    #: κ, the weight of MR
    kappa: float = 50.0
    #: ρ, the momentum of the running representation mean
    momentum: float = 1.0

    def extra_heads(self, model: nn.Module) -> Heads:
        return {MEAN: torch.zeros(_width(model))}

    def client_round(
        self,
        ctx: ClientContext,
        state: ServerState,
        data: ClientData,
        group: str,
        personal: PersonalState | None,
    ) -> tuple[ClientUpdate, PersonalState]:
        received, target = _split(state.global_heads)
        ready = state.round > 0  # z̄ was formed in round 1: PRBM and MR from round 2
        model = _Biased(ctx.model, _bias(ctx.model, personal), self.momentum, ready)
        load_weights(ctx.model, state.base, received)
        model.train()
        params = [*ctx.model.base.parameters()]
        params += [p for t in received for p in ctx.model.heads[t].parameters()]

        def penalty() -> torch.Tensor:
            return self.kappa * torch.mean(0.5 * (model.running - target) ** 2)

        loss = fit(
            model,
            params + ([model.bias] if ready else []),
            data.x_train,
            data.y_train,
            ctx.tasks,
            ctx.cfg.epochs,
            ctx.cfg,
            ctx.generator,
            penalty=penalty if ready and self.kappa > 0 else None,
        )
        heads = read_heads(ctx.model, received)
        mean = torch.zeros_like(target) if ready else model.running.detach() - target
        update = self.update(
            data,
            group,
            flat(ctx.model.base) - state.base,
            {**diff(heads, received), MEAN: mean},
            train_loss=loss,
        )
        return update, PersonalState({}, None, {PRBM: model.bias.detach().clone()})

    def personalized(
        self,
        ctx: ClientContext,
        state: ServerState,
        data: ClientData,
        group: str,
        personal: PersonalState | None,
    ) -> tuple[Vector, Heads, None]:
        received, _ = _split(state.global_heads)
        if personal is None or PRBM not in personal.extra:
            return state.base, received, None
        return state.base, fold(ctx.model, received, personal.extra[PRBM]), None


class _Biased(nn.Module):
    """heads(θ(x) + b), recording the running mean of θ(x) over the batches it has seen."""

    def __init__(self, model: nn.Module, bias: nn.Parameter, momentum: float, use_bias: bool):
        super().__init__()
        self.model, self.bias, self.momentum, self.use_bias = model, bias, momentum, use_bias
        self.running = torch.zeros(_width(model))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.model.base(x)
        self.running = (1 - self.momentum) * self.running.detach() + self.momentum * z.mean(0)
        if self.use_bias:
            z = z + self.bias
        return {t: head(z) for t, head in self.model.heads.items()}


def fold(model: nn.Module, heads: Heads, bias: Vector) -> Heads:
    """Heads that read θ(x) as the given ones read θ(x) + b: each linear head's bias + W b."""
    out = {}
    for t, vector in heads.items():
        head = model.heads[t]
        if not isinstance(head, nn.Linear):
            raise TypeError(f"feddbe folds its PRBM into linear heads; '{t}' is {type(head)}")
        assign(head, vector)
        with torch.no_grad():
            head.bias.add_(head.weight @ bias)
        out[t] = flat(head)
    return out


def _split(heads: Heads) -> tuple[Heads, Vector]:
    """(the task heads, z̄) of the server's heads."""
    return {t: v for t, v in heads.items() if t != MEAN}, heads[MEAN]


def _bias(model: nn.Module, personal: PersonalState | None) -> nn.Parameter:
    kept = personal.extra.get(PRBM) if personal is not None else None
    return nn.Parameter(kept.clone() if kept is not None else torch.zeros(_width(model)))


def _width(model: nn.Module) -> int:
    """The representation's width: the base's ``out_features``, else the heads' input."""
    width = getattr(model.base, "out_features", None)
    if width is None:
        width = next(iter(model.heads.values())).in_features
    return int(width)
