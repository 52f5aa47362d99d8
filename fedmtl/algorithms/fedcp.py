"""FedCP (Zhang et al., KDD 2023, "FedCP: Separating Feature Information for Personalized
Federated Learning via Conditional Policy"): a **policy per sample** splits the feature into a
global part and a personalised part.

After the feature extractor θ (fedmtl's base) sits the **Conditional Policy Network** (CPN): for a
feature f and the client's condition vector v_c, the gate input f ⊙ v_c goes through Linear(d, 2d)
→ LayerNorm → ReLU, is read as two scores per feature dimension and turned by a softmax over
the pair into the policies (p, g), p + g = 1 per dimension. The output is

    ψ_c(f ⊙ p) + φ(f ⊙ g),

with ψ_c the client's personalised head and φ the global head. v_c is the L2-normalised sum of
ψ_c's weight rows (PFLlib's ``set_head_g``: the personalised head's weights summed over the
classes), held fixed within a step (``detach``).

A client's round (PFLlib's ``clientcp.py``, which the paper's code is): with φ frozen, SGD on θ,
the CPN and ψ_c for the local epochs on the task loss plus λ·MMD(θ(x), θ₀(x)), the maximum mean
discrepancy (RBF kernels, bandwidths 10, 15, 20, 50) between the features of the trained
extractor and of the one received (θ₀, frozen); the policies are drawn with the Gumbel-softmax
(τ = 1) in training. Then it releases Δθ and, per task, the CPN and the global head it proposes,
½ψ_c + ½φ (PFLlib's ``generate_upload_head``); the server averages them weighted by samples.

**The model.** One task's :class:`FedCPHead` holds (ψ_c, φ, CPN) and computes the output above
from the base's features, so one pair of (base, heads) vectors describes the model. The server's
heads keep the received φ in both places (ψ ≡ φ: the model a new client starts from, its
condition vector from φ): the ``global`` variant (= ``group``; FedCP has no groups). The
``personal`` variant is the server's θ, CPN and φ with the client's ψ_c.

**Differences from PFLlib.** One CPN per task (each task head has its own; PFLlib has one
task). v_c is computed from ψ_c as it trains (detached) rather than once at the round's start. In
evaluation the policies are the softmax without Gumbel noise (PFLlib samples them at test time
too), so the same weights give the same predictions. DP-SGD and optional tasks are refused (the
loop is FedCP's own; a client without a task's labels would propose its untrained ψ_c as φ).

**Defaults.** λ = :data:`MMD_LAMBDA` = 5, the FedCP authors' ``run_me.sh`` (``-lam 5``);
τ = 1 and soft policies (PFLlib's ``tau``, ``hard``).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from fedmtl.algorithms.base import Algorithm, ClientContext, diff
from fedmtl.client.data import ClientData
from fedmtl.client.training import batches, load_weights, multitask_loss, read_heads
from fedmtl.data.manifest import TaskSpec
from fedmtl.nn.multitask import MultiTaskModel
from fedmtl.state import ClientUpdate, Heads, PersonalState, ServerState, Vector, assign, flat

#: λ of the MMD between the trained and the received extractor's features (FedCP's run_me.sh)
MMD_LAMBDA = 5.0
#: the RBF kernels' bandwidths of PFLlib's ``MMD(..., "rbf")``
BANDWIDTHS = (10.0, 15.0, 20.0, 50.0)


class FedCPHead(nn.Module):
    """One task's head: ψ(f ⊙ p) + φ(f ⊙ g), (p, g) the CPN's policies for f ⊙ v, with v the
    normalised sum of ψ's weight rows. ``noise``: a generator, for Gumbel-softmax policies
    (training; drawn from it, so a client's round is reproducible), else the softmax."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        dim = linear.in_features
        self.personal = linear
        self.generic = nn.Linear(dim, linear.out_features)
        with torch.no_grad():
            self.generic.load_state_dict(linear.state_dict())  # ψ ≡ φ at the start
        self.cpn = nn.Sequential(nn.Linear(dim, 2 * dim), nn.LayerNorm([2 * dim]), nn.ReLU())
        self.in_features = dim
        self.noise: torch.Generator | None = None

    def condition(self) -> torch.Tensor:
        """v: the sum of ψ's weight rows, L2-normalised (constant for the gradient)."""
        return F.normalize(self.personal.weight.detach().sum(0, keepdim=True), dim=1)

    def policies(self, feature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.cpn(feature * self.condition()).view(feature.shape[0], 2, -1)
        if self.noise is not None:  # Gumbel-softmax, τ = 1 (torch's draws from the global RNG)
            u = torch.rand(scores.shape, generator=self.noise).clamp(1e-10, 1 - 1e-7)
            scores = scores - torch.log(-torch.log(u))
        pair = scores.softmax(1)
        return pair[:, 0], pair[:, 1]

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        p, g = self.policies(feature)
        return self.personal(feature * p) + self.generic(feature * g)


def mmd(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The (biased) squared maximum mean discrepancy between the rows of x and of y, with the sum
    of RBF kernels exp(−‖a − b‖² / (2h)) over :data:`BANDWIDTHS` (PFLlib's ``MMD``)."""
    both = torch.cat([x, y])
    d2 = torch.cdist(both, both).pow(2)
    k = sum(torch.exp(-0.5 * d2 / h) for h in BANDWIDTHS)
    n = x.shape[0]
    return k[:n, :n].mean() + k[n:, n:].mean() - 2 * k[:n, n:].mean()


def _proposed(head: FedCPHead, received: nn.Module) -> None:
    """The head the client releases: ψ and φ both ½ψ_c + ½φ (``received``: φ as it came), and
    its CPN (in place)."""
    with torch.no_grad():
        pairs = zip(head.personal.parameters(), head.generic.parameters())
        for (p, g), g0 in zip(pairs, received.parameters()):
            mean = 0.5 * p + 0.5 * g0
            g.copy_(mean)
            p.copy_(mean)


class FedCP(Algorithm):
    name = "fedcp"

    def build_model(self, model: nn.Module, tasks: Sequence[TaskSpec]) -> nn.Module:
        heads = {t.name: FedCPHead(model.heads[t.name]) for t in tasks}
        return MultiTaskModel(model.base, heads)

    def client_round(
        self,
        ctx: ClientContext,
        state: ServerState,
        data: ClientData,
        group: str,
        personal: PersonalState | None,
    ) -> tuple[ClientUpdate, PersonalState]:
        cfg, model, tasks = ctx.cfg, ctx.model, ctx.tasks
        load_weights(model, state.base, self._with_own(model, state.global_heads, personal))
        received = {t.name: _frozen_copy(model.heads[t.name].generic) for t in tasks}
        frozen = _frozen_copy(model.base)
        params = [*model.base.parameters()]
        for t in tasks:
            head = model.heads[t.name]
            head.generic.requires_grad_(False)
            params += [*head.personal.parameters(), *head.cpn.parameters()]
        opt = torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
        model.train()
        self._noise(model, ctx.generator)
        total, count = 0.0, 0
        for _ in range(cfg.epochs if data.n_train else 0):
            total, count = 0.0, 0
            for idx in batches(data.n_train, cfg.batch_size, ctx.generator):
                x, y = data.x_train[idx], {k: v[idx] for k, v in data.y_train.items()}
                feature = model.base(x)
                outputs = {t.name: model.heads[t.name](feature) for t in tasks}
                loss = multitask_loss(outputs, y, tasks)
                with torch.no_grad():
                    reference = frozen(x)
                objective = loss + MMD_LAMBDA * mmd(feature, reference)
                opt.zero_grad(set_to_none=True)
                objective.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
                count += len(idx)
        self._noise(model, None)
        own = {}
        for t in tasks:
            head = model.heads[t.name]
            head.generic.requires_grad_(True)
            own[t.name] = flat(head.personal).detach().clone()
            _proposed(head, received[t.name])
        proposed = read_heads(model, state.global_heads)
        update = self.update(
            data,
            group,
            flat(model.base) - state.base,
            diff(proposed, state.global_heads),
            train_loss=total / max(count, 1),
        )
        return update, PersonalState(own)

    def personalized(
        self,
        ctx: ClientContext,
        state: ServerState,
        data: ClientData,
        group: str,
        personal: PersonalState | None,
    ) -> tuple[Vector, Heads, None]:
        """The server's θ, CPN and φ with the client's ψ_c (the server's heads, ψ ≡ φ, for a
        client that never trained)."""
        return state.base, self._with_own(ctx.model, state.global_heads, personal), None

    @staticmethod
    def _with_own(model: nn.Module, heads: Heads, personal: PersonalState | None) -> Heads:
        """``heads`` (the server's) with each task's ψ replaced by the client's own ψ_c."""
        if personal is None:
            return heads
        out = {}
        for t, vector in heads.items():
            head: FedCPHead = model.heads[t]
            assign(head, vector)
            assign(head.personal, personal.heads[t])
            out[t] = flat(head).detach().clone()
        return out

    @staticmethod
    def _noise(model: nn.Module, generator: torch.Generator | None) -> None:
        for head in model.heads.values():
            head.noise = generator


def _frozen_copy(module: nn.Module) -> nn.Module:
    frozen = copy.deepcopy(module).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    return frozen
