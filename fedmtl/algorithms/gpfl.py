"""GPFL (Zhang et al., ICCV 2023): global and personalised feature information, learned at once.

After the feature extractor φ (fedmtl's base) sits a **Conditional Valve** (CoV): two small
networks that map a conditional input c to an affine transform, γ(c) and β(c) (each
Linear → ReLU → LayerNorm), and turn the feature f = φ(x) into ReLU(f ⊙ (1 + γ(c)) + β(c)).
With the **global** conditional input g it gives the global feature f_G, with the client's
**personalised** conditional input p_c the personalised feature f_P. The **Global Category
Embedding layer** (GCE: one embedding e_k per class, one table per classification task) guides
f_G: an angle-level loss (cross-entropy of the cosines cos(f_G, e_k)) and a magnitude-level one,
λ·‖f_G − ē_y‖ (the Frobenius norm over the batch, ē the embeddings as received this round).
The personal head is trained on f_P with the task loss. So a client minimises, per mini-batch,

    task_loss(head(f_P), y) + Σ_tasks [ CE(cos(f_G, E), y) + λ·‖f_G − Ē[y]‖ ],

with SGD on φ and the heads, and SGD with weight decay μ on the CoV and the GCE (PFLlib's
``clientgpfl.py``: ``GCE_opt`` and ``CoV_opt`` have ``weight_decay=mu``). The conditional inputs
are computed from the received GCE at the start of the round, as constants: g is the mean of the
class embeddings, p_c their mean weighted by the client's class frequencies (averaged over the
classification tasks when there are several).

**What is released.** Δ of the extractor, the CoV and the GCE, as one base vector: the model this
method builds (:meth:`GPFL.build_model`) has as its ``base`` a :class:`GPFLBase` holding the three,
so the server averages them exactly as it averages any base (sample-weighted; PFLlib's server
averages the base, the CoV and the GCE with the same sample weights, which is the same as averaging
their concatenation). Nothing else leaves the client: the head (trained on f_P) and p_c (which
would reveal the client's label distribution) stay personal. No core aggregation code changes;
the one core change is the hook :meth:`fedmtl.algorithms.base.Algorithm.build_model` (default:
the configured model), called by :meth:`fedmtl.federation.Federation.new_model`.

**The heads and the three variants.** A :class:`GPFLHead` holds (γ_p, β_p, W, b, s) and computes
(1 − s)·(W·ReLU(f ⊙ (1 + γ_p) + β_p) + b) + s·cos(f_G, E): the base emits f and the GCE's cosine
scores of f_G, so one pair of (base, heads) vectors describes either route.

- ``personal``: the client's head (W, b) with γ_p = γ(p_c), β_p = β(p_c) from the server's CoV and
  p_c from the server's GCE and its own labels, and s = 0: exactly head(CoV(φ(x), p_c)), GPFL's
  prediction. A client that has not trained yet gets the global variant.
- ``global`` (= ``group``: GPFL has no groups): the server's head, s = 1: the GCE used as a
  classifier on the global feature, argmax_k cos(f_G, e_k), which only involves shared modules.
  (A regression task has no class embeddings; its global variant predicts 0.)

**Differences from PFLlib.** p_c and g come from the GCE received this round (PFLlib computes them
when the new GCE arrives from the client's previous GCE, and from zeros in the first round); a
client with several tasks has one CoV and one p_c (the mean over its classification tasks), one
head per task and one GCE table per classification task; regression tasks are trained on f_P
with the squared error and get no guidance. DP-SGD is refused (the loop is GPFL's own). At least
one classification task is needed.

**Defaults.** λ = ``gpfl_lambda`` = 0.01 and μ = ``gpfl_mu`` = 0.1, the GPFL authors' values for
3-layer MLPs and 4-layer CNNs (TsingZ0/GPFL ``system/run_me.sh``; fedmtl's bases are such
networks). PFLlib's ``main.py`` has λ = 1.0 and μ = 0.0, defaults it shares with pFedMe, FedProx
and others. With those values on the tiny digits federation, the magnitude term (λ times a norm
over the batch, ≈ 30 per batch) outweighs the task loss, and the personalised route stays at
chance for 8 rounds. With 0.01 and 0.1 it learns.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from fedmtl.algorithms.base import Algorithm, ClientContext
from fedmtl.client.data import ClientData
from fedmtl.client.training import batches, load_weights, multitask_loss
from fedmtl.data.manifest import TaskSpec
from fedmtl.nn.multitask import MultiTaskModel
from fedmtl.state import ClientUpdate, Heads, PersonalState, ServerState, Vector, flat


class CoV(nn.Module):
    """The Conditional Valve: a feature f and a conditional input c give
    ReLU(f ⊙ (1 + γ(c)) + β(c)), with γ and β each Linear → ReLU → LayerNorm (PFLlib's)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.LayerNorm([dim]))
        self.beta = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.LayerNorm([dim]))

    def affine(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gamma(context), self.beta(context)

    def forward(self, feature: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.affine(context)
        return F.relu(feature * (gamma + 1) + beta)


class GPFLBase(nn.Module):
    """What GPFL shares: the feature extractor, the CoV and the GCE (one class-embedding table
    per classification task). Its output, per row: the feature f, then for each classification
    task the cosines of the global feature f_G with that task's class embeddings."""

    def __init__(self, extractor: nn.Module, dim: int, classes: dict[str, int]) -> None:
        super().__init__()
        self.extractor = extractor
        self.cov = CoV(dim)
        self.gce = nn.ModuleDict({t: nn.Embedding(k, dim) for t, k in classes.items()})
        self.dim = dim
        self.out_features = dim + sum(classes.values())

    def embeddings(self) -> dict[str, torch.Tensor]:
        return {t: e.weight for t, e in self.gce.items()}

    @torch.no_grad()
    def generic_input(self) -> torch.Tensor:
        """g: the mean class embedding (averaged over the classification tasks)."""
        return torch.stack([e.mean(0) for e in self.embeddings().values()]).mean(0)

    @torch.no_grad()
    def personal_input(self, frequencies: dict[str, torch.Tensor]) -> torch.Tensor:
        """p_c: the class embeddings weighted by the client's class frequencies."""
        return torch.stack([frequencies[t] @ e for t, e in self.embeddings().items()]).mean(0)

    def cosines(self, global_feature: torch.Tensor) -> dict[str, torch.Tensor]:
        """cos(f_G, e_k) per classification task: the GCE's scores (PFLlib's ``GCE.forward``)."""
        unit = F.normalize(global_feature)
        return {t: F.linear(unit, F.normalize(e)) for t, e in self.embeddings().items()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feature = self.extractor(x)
        scores = self.cosines(self.cov(feature, self.generic_input()))
        return torch.cat([feature, *scores.values()], dim=1)


class GPFLHead(nn.Module):
    """One task's head on :class:`GPFLBase`'s output: (1 − s)·linear(ReLU(f ⊙ (1 + γ) + β)) +
    s·(the GCE's cosines of the task). s = 0 with γ = γ(p_c), β = β(p_c): the personalised route;
    s = 1: the GCE classifier on the global feature."""

    def __init__(self, linear: nn.Module, dim: int, scores: tuple[int, int] | None) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(dim))
        self.beta = nn.Parameter(torch.zeros(dim))
        self.linear = linear
        self.guided = nn.Parameter(torch.ones(1))
        self.dim = dim
        self.scores = scores

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        personal = self.linear(F.relu(z[:, : self.dim] * (1 + self.gamma) + self.beta))
        out = (1 - self.guided) * personal
        if self.scores is not None:
            out = out + self.guided * z[:, self.scores[0] : self.scores[1]]
        return out


def class_frequencies(data: ClientData, tasks: Sequence[TaskSpec]) -> dict[str, torch.Tensor]:
    """The client's class frequencies on its train split, per classification task."""
    out = {}
    for t in tasks:
        if t.kind == "classification":
            counts = torch.bincount(data.y_train[t.name], minlength=t.n_outputs).float()
            out[t.name] = counts / counts.sum().clamp_min(1.0)
    return out


def guidance_loss(
    base: GPFLBase,
    global_feature: torch.Tensor,
    y: dict[str, torch.Tensor],
    frozen: dict[str, torch.Tensor],
    lam: float,
) -> torch.Tensor:
    """The GCE's guidance of f_G, summed over the classification tasks: the angle-level
    cross-entropy of the cosines plus λ·‖f_G − ē_y‖ (``frozen``: the embeddings received)."""
    total = torch.zeros(())
    for t, scores in base.cosines(global_feature).items():
        total = total + F.cross_entropy(scores, y[t])
        total = total + lam * torch.norm(global_feature - frozen[t][y[t]], 2)
    return total


class GPFL(Algorithm):
    name = "gpfl"
    shares_heads = False  # the head on f_P is personal; the CoV and GCE travel in the base

    def build_model(self, model: nn.Module, tasks: Sequence[TaskSpec]) -> nn.Module:
        classes = {t.name: t.n_outputs for t in tasks if t.kind == "classification"}
        if not classes:
            raise ValueError(
                "algorithm.method 'gpfl' needs at least one classification task: its global "
                "category embeddings (GCE) embed classes"
            )
        dim = next(iter(model.heads.values())).in_features
        base = GPFLBase(model.base, dim, classes)
        heads, offset = {}, dim
        for t in tasks:
            scores = None
            if t.name in classes:
                scores = (offset, offset + classes[t.name])
                offset += classes[t.name]
            heads[t.name] = GPFLHead(model.heads[t.name], dim, scores)
        return MultiTaskModel(base, heads)

    def client_round(
        self,
        ctx: ClientContext,
        state: ServerState,
        data: ClientData,
        group: str,
        personal: PersonalState | None,
    ) -> tuple[ClientUpdate, PersonalState]:
        cfg, model, tasks = ctx.cfg, ctx.model, ctx.tasks
        start = personal.heads if personal is not None else state.global_heads
        load_weights(model, state.base, start)
        base: GPFLBase = model.base
        generic = base.generic_input()
        own = base.personal_input(class_frequencies(data, tasks))
        frozen = {t: e.detach().clone() for t, e in base.embeddings().items()}
        before = self.guidance(model, data, generic, frozen, cfg.gpfl_lambda)

        model.train()
        linear = [p for t in tasks for p in model.heads[t.name].linear.parameters()]
        opt = torch.optim.SGD(
            [
                {
                    "params": [*base.extractor.parameters(), *linear],
                    "weight_decay": cfg.weight_decay,
                },
                {
                    "params": [*base.cov.parameters(), *base.gce.parameters()],
                    "weight_decay": cfg.gpfl_mu,
                },
            ],
            lr=cfg.lr,
            momentum=cfg.momentum,
        )
        loss = float("nan")
        for _ in range(cfg.epochs if data.n_train else 0):
            total, count = 0.0, 0
            for idx in batches(data.n_train, cfg.batch_size, ctx.generator):
                x, y = data.x_train[idx], {k: v[idx] for k, v in data.y_train.items()}
                opt.zero_grad(set_to_none=True)
                feature = base.extractor(x)
                personal_feature = base.cov(feature, own)
                outputs = {t.name: model.heads[t.name].linear(personal_feature) for t in tasks}
                task_loss = multitask_loss(outputs, y, tasks)
                guide = guidance_loss(base, base.cov(feature, generic), y, frozen, cfg.gpfl_lambda)
                (task_loss + guide).backward()
                opt.step()
                total += float(task_loss.detach()) * len(idx)
                count += len(idx)
            loss = total / max(count, 1)
        after = self.guidance(model, data, generic, frozen, cfg.gpfl_lambda)

        new_base = flat(base)
        heads = self._personal_heads(model, own, tasks)
        update = self.update(
            data,
            group,
            new_base - state.base,
            {},
            train_loss=loss,
            gpfl_guidance_start=before,
            gpfl_guidance=after,
        )
        return update, PersonalState(heads)

    def personalized(
        self,
        ctx: ClientContext,
        state: ServerState,
        data: ClientData,
        group: str,
        personal: PersonalState | None,
    ) -> tuple[Vector, Heads, None]:
        """head(CoV(φ(x), p_c)) with the server's φ, CoV and GCE and the client's head; the
        global variant (the GCE classifier) for a client that has not trained yet."""
        if personal is None or not personal.heads:
            return state.base, state.global_heads, None
        load_weights(ctx.model, state.base, personal.heads)
        own = ctx.model.base.personal_input(class_frequencies(data, ctx.tasks))
        return state.base, self._personal_heads(ctx.model, own, ctx.tasks), None

    @staticmethod
    @torch.no_grad()
    def _personal_heads(model: nn.Module, own: torch.Tensor, tasks: Sequence[TaskSpec]) -> Heads:
        """The model's heads on the personalised route: γ_p, β_p from its CoV at p_c, s = 0."""
        gamma, beta = model.base.cov.affine(own)
        heads = {}
        for t in tasks:
            head = model.heads[t.name]
            head.gamma.copy_(gamma)
            head.beta.copy_(beta)
            head.guided.zero_()
            heads[t.name] = flat(head)
        return heads

    @staticmethod
    @torch.no_grad()
    def guidance(
        model: nn.Module,
        data: ClientData,
        generic: torch.Tensor,
        frozen: dict[str, torch.Tensor],
        lam: float,
    ) -> float:
        """The guidance loss of the model's shared modules on the client's whole train split
        (λ's norm over all its rows)."""
        if data.n_train == 0:
            return float("nan")
        base: GPFLBase = model.base
        was = base.training
        base.eval()
        loss = guidance_loss(
            base, base.cov(base.extractor(data.x_train), generic), data.y_train, frozen, lam
        )
        base.train(was)
        return float(loss)


__all__ = ["CoV", "GPFL", "GPFLBase", "GPFLHead", "class_frequencies", "guidance_loss"]
