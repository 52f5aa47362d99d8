"""FedRoD (Chen & Chao, ICLR 2022, "On Bridging Generic and Personalized Federated Learning for
Image Classification"): one shared body, a **generic head** trained for the federation and a
**personalised head** per client, used together.

Each SGD step of a client's round (PFLlib's ``clientrod``, which the paper's code follows):

1. the body and the generic head φ take a step on the **balanced softmax** loss
   (Ren et al. 2020): cross-entropy of ``φ(θ(x)) + log n_c(y)``, with n_c the client's own
   class counts, so that the generic head learns p(x | y) without the client's label skew;
2. the personalised head ψ_c takes a step on the cross-entropy of ``φ(θ(x)) + ψ_c(θ(x))``,
   with the body and the generic head held fixed (``detach``).

Δθ and Δφ are released; ψ_c stays at the client (initialised as the generic head's initial
values, as in PFLlib). The personalised model is θ with the head φ + ψ_c: two linear heads on
the same features sum to one, so the served model is the plain multi-task model.
Regression tasks train both heads on the squared error (no label prior to balance)."""

from __future__ import annotations

import copy

import torch

from fedmtl.algorithms.base import Algorithm, ClientContext, copy_heads, diff
from fedmtl.client.data import ClientData
from fedmtl.client.training import batches, load_weights, multitask_loss, read_heads
from fedmtl.data.manifest import TaskSpec
from fedmtl.state import ClientUpdate, Heads, PersonalState, ServerState, Vector, assign, flat


def balanced_logits(logits: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``logits + log counts``: their cross-entropy is the balanced softmax loss (a class the
    client never saw: count 1e-8)."""
    return logits + counts.clamp(min=1e-8).log()


def _class_counts(data: ClientData, task: TaskSpec) -> torch.Tensor:
    return torch.bincount(data.y_train[task.name], minlength=task.n_outputs).to(torch.float32)


class FedRoD(Algorithm):
    name = "fedrod"

    def client_round(
        self,
        ctx: ClientContext,
        state: ServerState,
        data: ClientData,
        group: str,
        personal: PersonalState | None,
    ) -> tuple[ClientUpdate, PersonalState]:
        cfg, model = ctx.cfg, ctx.model
        start = personal.heads if personal is not None else copy_heads(state.global_heads)
        load_weights(model, state.base, state.global_heads)
        own = {t: _clone_head(model.heads[t], start[t]) for t in state.global_heads}
        counts = {t.name: _class_counts(data, t) for t in ctx.tasks if t.kind == "classification"}
        model.train()
        shared = torch.optim.SGD(
            model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
        mine = torch.optim.SGD(
            [p for h in own.values() for p in h.parameters()],
            lr=cfg.lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
        )
        total, count = 0.0, 0
        for _ in range(cfg.epochs):
            total, count = 0.0, 0
            for idx in batches(data.n_train, cfg.batch_size, ctx.generator):
                xb, yb = data.x_train[idx], {k: v[idx] for k, v in data.y_train.items()}
                rep = model.base(xb)
                generic = {t: head(rep) for t, head in model.heads.items()}
                balanced = {
                    t: balanced_logits(out, counts[t]) if t in counts else out
                    for t, out in generic.items()
                }
                loss = multitask_loss(balanced, yb, ctx.tasks)
                shared.zero_grad(set_to_none=True)
                loss.backward()
                shared.step()
                detached = rep.detach()
                combined = {t: generic[t].detach() + own[t](detached) for t in own}
                loss_p = multitask_loss(combined, yb, ctx.tasks)
                mine.zero_grad(set_to_none=True)
                loss_p.backward()
                mine.step()
                total += float(loss.detach()) * len(idx)
                count += len(idx)
        base, generic_heads = flat(model.base), read_heads(model, state.global_heads)
        kept = {t: flat(h).detach().clone() for t, h in own.items()}
        update = self.update(
            data,
            group,
            base - state.base,
            diff(generic_heads, state.global_heads),
            train_loss=total / max(count, 1),
        )
        return update, PersonalState(kept)

    def personalized(
        self,
        ctx: ClientContext,
        state: ServerState,
        data: ClientData,
        group: str,
        personal: PersonalState | None,
    ) -> tuple[Vector, Heads, PersonalState | None]:
        """θ with φ + ψ_c (the generic head alone for a client that never trained)."""
        if personal is None:
            return state.base, state.global_heads, None
        return (
            state.base,
            {t: state.global_heads[t] + personal.heads[t] for t in state.global_heads},
            None,
        )


def _clone_head(like: torch.nn.Module, values: Vector) -> torch.nn.Module:
    head = copy.deepcopy(like)
    assign(head, values)
    head.train()
    return head
