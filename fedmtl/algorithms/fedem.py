"""FedEM (Marfoq et al., NeurIPS 2021): federated multi-task learning under a mixture of
distributions.

Every client's data distribution is modelled as a mixture of M shared components,
p_c(y | x) = Σ_m π_cm · p_m(y | x), with M component models learned by everyone and mixture
weights π_c ∈ Δ^M kept by the client. A client's round is one EM step (omarfoq/FedEM,
``client.py`` ``MixtureClient`` and ``learners/``):

- **E-step**: with the received components and its current π_c (uniform at first), the
  responsibilities of every train row, q_m(i) = π_cm·exp(−ℓ_m(i)) / Σ_m' π_cm'·exp(−ℓ_m'(i)),
  where ℓ_m(i) is component m's loss on row i (its negative log-likelihood: the cross-entropy;
  for a regression task the squared error; summed over the tasks);
- **π update**: π_c ← the mean of the responsibilities over the rows;
- **M-step**: each component is trained for ``local_epochs`` of SGD on the rows weighted by its
  responsibilities, the loss of a batch being Σ_i q_m(i)·ℓ_m(i) / batch size (FedEM's
  ``Learner.fit_epoch``).

The client releases each component's update; the server averages each component separately,
weighted by the clients' sample counts (FedEM's ``CentralizedAggregator``). π_c never leaves the
client.

**How M components fit fedmtl's state (one base and one head per task).** The method builds its
own model (:meth:`FedEM.build_model`, the hook :meth:`fedmtl.algorithms.base.Algorithm.build_model`
that :meth:`fedmtl.federation.Federation.new_model` calls): its ``base`` is a
:class:`ComponentBases` holding the M component bases (run side by side, output
[rows, M, features]) and each task's head a :class:`MixtureHead` holding the M component heads and
the mixture weights π (the first M values of the head's vector). So the server's base vector is
the M bases end to end and each head vector π then the M heads, and the server's ordinary
sample-weighted mean of Δbase and Δheads *is* FedEM's per-component average (a mean of
concatenated vectors is the concatenation of the means, with the same weights). The π slot of a
released head is always the received one, so its Δ is exactly zero: the server's π stays uniform
and nothing of π_c is released. This needs no new state, no new aggregation and no change to
evaluation, and every server feature (robust rules, DP, secure sums, server optimisers) applies
to the components as to any base and head. With M = 1 the model is the configured one plus a
π = 1 slot, and a round is FedAvg's.

**The three variants.** ``personal``: the mixture with the client's π_c, Σ_m π_cm·softmax(f_m(x))
(scored by its argmax; a regression task: Σ_m π_cm·ŷ_m), FedEM's prediction. ``global`` (=
``group``, FedEM has no groups): the uniform mixture of the server's components, π = 1/M. A client
that has not trained yet has the uniform mixture as its personal model too.

**Differences from omarfoq/FedEM.** The M components take their SGD steps on the same mini-batch
order (FedEM reshuffles for each learner; the components share no parameter, so this is the same
algorithm). The server's mean is over the round's participants, as for every fedmtl method;
FedEM's is over every client, those not sampled contributing their unchanged copies, which
shrinks the step by the sampling rate (the same when ``clients_per_round`` is 1). The
regression loss as negative log-likelihood is the squared error, not halved. DP-SGD is refused
(the loop is FedEM's own). Default M = 3 (FedEM's ``--n_learners`` and the paper's).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from fedmtl.algorithms.base import Algorithm, ClientContext, diff
from fedmtl.client.data import ClientData
from fedmtl.client.training import batches, load_weights, read_heads
from fedmtl.data.manifest import TaskSpec
from fedmtl.nn.multitask import MultiTaskModel
from fedmtl.state import ClientUpdate, Heads, PersonalState, ServerState, Vector, flat


class ComponentBases(nn.Module):
    """The M component bases side by side: output [rows, M, features]."""

    def __init__(self, bases: Sequence[nn.Module]) -> None:
        super().__init__()
        self.components = nn.ModuleList(bases)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([b(x) for b in self.components], dim=1)


class MixtureHead(nn.Module):
    """One task's M component heads, each on its component's features, and the mixture weights
    π (the first M values of the head's vector: a module's own parameters come first). Output:
    the log of the mixture's class probabilities, log Σ_m π_m·softmax(f_m) (classification), or
    Σ_m π_m·ŷ_m (regression)."""

    def __init__(self, heads: Sequence[nn.Module], kind: str) -> None:
        super().__init__()
        self.components = nn.ModuleList(heads)
        m = len(heads)
        self.weights = nn.Parameter(torch.full((m,), 1.0 / m), requires_grad=False)
        self.kind = kind

    def component_outputs(self, z: torch.Tensor) -> list[torch.Tensor]:
        return [head(z[:, m]) for m, head in enumerate(self.components)]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        outs = torch.stack(self.component_outputs(z), dim=1)  # [rows, M, outputs]
        pi = self.weights.view(1, -1, 1)
        if self.kind == "classification":
            return torch.logsumexp(torch.log(pi) + F.log_softmax(outs, dim=-1), dim=1)
        return (pi * outs).sum(dim=1)


def component_losses(
    model: nn.Module, x: torch.Tensor, y: dict[str, torch.Tensor], tasks: Sequence[TaskSpec]
) -> torch.Tensor:
    """ℓ_m(i): each component's loss on each row, summed over the tasks, [M, rows]."""
    z = model.base(x)
    total = 0.0
    for task in tasks:
        outs = model.heads[task.name].component_outputs(z)
        target = y[task.name]
        if task.kind == "classification":
            per = [F.cross_entropy(o, target, reduction="none") for o in outs]
        else:
            per = [(o.squeeze(-1) - target) ** 2 for o in outs]
        total = total + torch.stack(per)
    return total


@torch.no_grad()
def responsibilities(
    model: nn.Module, pi: torch.Tensor, data: ClientData, tasks: Sequence[TaskSpec]
) -> torch.Tensor:
    """The E-step: q_m(i) ∝ π_m·exp(−ℓ_m(i)) for every train row, [M, rows]; the model must
    hold the components (FedEM's ``MixtureClient.update_sample_weights``)."""
    was = model.training
    model.eval()
    losses = component_losses(model, data.x_train, data.y_train, tasks)
    model.train(was)
    return torch.softmax(torch.log(pi).unsqueeze(1) - losses, dim=0)


def _fresh(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with a new random initialisation (each layer's own)."""
    clone = copy.deepcopy(module)
    for layer in clone.modules():
        if hasattr(layer, "reset_parameters"):
            layer.reset_parameters()
    return clone


def with_weights(head: Vector, pi: torch.Tensor) -> Vector:
    """A mixture head's vector with its mixture weights (the first M values) set to ``pi``."""
    out = head.clone()
    out[: pi.numel()] = pi
    return out


class FedEM(Algorithm):
    name = "fedem"

    def __init__(self, n_components: int = 3) -> None:
        if n_components < 1:
            raise ValueError(f"fedem needs at least one component, got {n_components}")
        self.n_components = n_components

    def build_model(self, model: nn.Module, tasks: Sequence[TaskSpec]) -> nn.Module:
        """Component 0 is the configured model's weights; the others, fresh initialisations."""
        m = self.n_components
        base = ComponentBases([model.base, *(_fresh(model.base) for _ in range(m - 1))])
        heads = {
            t.name: MixtureHead(
                [model.heads[t.name], *(_fresh(model.heads[t.name]) for _ in range(m - 1))],
                t.kind,
            )
            for t in tasks
        }
        return MultiTaskModel(base, heads)

    def mixture_weights(self, personal: PersonalState | None) -> torch.Tensor:
        """π_c as the client keeps it (in its heads' mixture slot), uniform if it has none."""
        if personal is None or not personal.heads:
            return torch.full((self.n_components,), 1.0 / self.n_components)
        return next(iter(personal.heads.values()))[: self.n_components].clone()

    def client_round(
        self,
        ctx: ClientContext,
        state: ServerState,
        data: ClientData,
        group: str,
        personal: PersonalState | None,
    ) -> tuple[ClientUpdate, PersonalState]:
        cfg, model, tasks = ctx.cfg, ctx.model, ctx.tasks
        received = state.global_heads
        load_weights(model, state.base, received)
        pi = self.mixture_weights(personal)
        if data.n_train:
            q = responsibilities(model, pi, data, tasks)  # E-step
            pi = q.mean(dim=1)

        model.train()
        params = [p for p in model.parameters() if p.requires_grad]  # not the mixture slot
        opt = torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
        loss = float("nan")
        for _ in range(cfg.epochs if data.n_train else 0):  # M-step
            total, count = 0.0, 0
            for idx in batches(data.n_train, cfg.batch_size, ctx.generator):
                y = {k: v[idx] for k, v in data.y_train.items()}
                opt.zero_grad(set_to_none=True)
                per = component_losses(model, data.x_train[idx], y, tasks)
                objective = (per * q[:, idx]).sum() / len(idx)
                objective.backward()
                opt.step()
                total += float(objective.detach()) * len(idx)
                count += len(idx)
            loss = total / max(count, 1)

        heads = read_heads(model, received)  # the mixture slot as received: its Δ is 0
        update = self.update(
            data, group, flat(model.base) - state.base, diff(heads, received), train_loss=loss
        )
        mine = {t: with_weights(v, pi) for t, v in heads.items()}
        return update, PersonalState(mine)

    def personalized(
        self,
        ctx: ClientContext,
        state: ServerState,
        data: ClientData,
        group: str,
        personal: PersonalState | None,
    ) -> tuple[Vector, Heads, None]:
        """The server's components mixed with the client's π_c (uniform if it has none)."""
        pi = self.mixture_weights(personal)
        return state.base, {t: with_weights(v, pi) for t, v in state.global_heads.items()}, None


__all__ = ["ComponentBases", "FedEM", "MixtureHead", "component_losses", "responsibilities"]
