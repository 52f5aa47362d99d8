"""Batched local training: the shared step of many clients at once, in one process.

The shared step of FedAvg, FedProx, FedAvg-FT and fedmtl is the same procedure for every
client: :func:`~fedmtl.client.training.train_joint` + :func:`~fedmtl.client.training.fit` from a
per-client start (base, heads), mini-batches drawn by the client's own generator, SGD.
:func:`train_shared` runs that procedure for a shard of clients that share an architecture with
``torch.func``:
the clients' parameters are the rows of one contiguous ``[C, P]`` tensor (base, then each
head, in ``named_parameters`` order, so a row is exactly ``flat(base) ++ flat(head) ...``),
and each step is one ``vmap(grad(functional_call(...)))`` over the clients.

Each client's result is what it would get alone (up to floating-point summation order):

- the same mini-batches: the client's generator, seeded as ``Federation.context`` seeds it,
  draws one ``randperm`` per epoch in the same order as :func:`~fedmtl.client.training.batches`;
- the same loss: :func:`~fedmtl.client.training.multitask_loss`'s mean over the batch's real rows
  (rows are padded to the batch size and masked, so a last partial batch averages over its
  real rows only), plus FedProx's μ/2·‖w − w₀‖², whose gradient μ·(w − w₀) is added to
  the loss's gradient;
- the same optimiser: ``torch.optim.SGD``'s update (weight decay, then momentum with
  dampening 0, not Nesterov; the momentum buffer starts as the first gradient);
- a client whose batches of this epoch are done does not move; the returned loss is the
  last epoch's batch losses weighted by batch sizes; a client without train rows does not
  move and reports NaN, as :func:`~fedmtl.client.training.fit` does.

Clients are sorted by their number of batches per epoch, so at step ``t`` of an epoch the
clients that still have a batch are a prefix of the stacked tensor: a step costs what its
active clients' rows cost (views, no gather of parameters), and a round costs about the sum
of the clients' rows, i.e. linear in the number of clients, however unequal their sizes.

Not batched (:func:`batching_blocker` says why; the caller falls back to the per-client
loop): models with dropout (the loop draws its masks from the global RNG in a per-client
order that a batch cannot reproduce) and models with buffers or batch norm (running
statistics are state outside the parameters, and batch norm mixes the rows of a batch, so
padding would change it).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from fedmtl.client.data import ClientData
from fedmtl.client.training import LocalConfig, multitask_loss, task_row_losses
from fedmtl.data.manifest import TaskSpec
from fedmtl.state import Heads, Vector

#: At most this many clients still training at a step: their gradients are taken one by one
#: (same arithmetic, plain autograd), cheaper than vmap's fixed cost of about 4 plain steps.
SOLO_CLIENTS = 4
#: Up to this many clients, a linear model (no base layers) steps by one plain backward through a
#: vmapped forward instead of ``vmap(grad(...))``: 1,000 Synthetic MLR clients 6-12 % faster a
#: round (the same gradients within float rounding, tested). For MLPs that way costs
#: 1.3-4x more per step (64-64-10 with 20 clients, 64-1024-1024 with 2), so they keep vmap(grad).
LINEAR_FORWARD_CLIENTS = 256


class BatchingUnsupported(ValueError):
    """Batched training cannot reproduce the per-client loop for this method or model."""


@dataclass
class SharedJob:
    """One client's shared step: its data, its start (base, heads), its generator and μ."""

    data: ClientData
    base: Vector
    heads: Heads
    generator: torch.Generator
    prox_mu: float = 0.0


def warm_up() -> None:
    """Pay torch.func's one-off set-up (~1 s of lazy imports on the first ``vmap(grad(...))``)
    now, e.g. while the process waits on something else, instead of in the first round."""
    layer = nn.Linear(2, 2)
    params = {k: v.detach().expand(2, *v.shape) for k, v in layer.named_parameters()}

    def loss(p, x):
        return functional_call(layer, p, (x,)).square().sum()

    vmap(grad(loss))(params, torch.zeros(2, 1, 2))


def batching_blocker(model: nn.Module) -> str | None:
    """Why the batched step cannot reproduce the loop for ``model``, or None if it can."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            return (
                f"the model has dropout ({name}, p={module.p}): its masks come from the global "
                "RNG in per-client order, which a batch of clients cannot reproduce"
            )
        if isinstance(module, nn.modules.batchnorm._NormBase):
            return (
                f"the model has batch norm ({name}): it mixes the rows of a batch and keeps "
                "running statistics"
            )
    buffers = [n for n, _ in model.named_buffers()]
    if buffers:
        return f"the model has buffers ({', '.join(buffers[:3])}): state outside the parameters"
    return None


@dataclass
class _Layout:
    """Where each trained parameter lies in a row of the stacked ``[C, P]`` tensor."""

    entries: list[tuple[str, torch.Size, int, int]]  # functional_call name, shape, start, end
    base: tuple[int, int]
    heads: dict[str, tuple[int, int]]
    width: int


def _layout(model: nn.Module, tasks: Sequence[str]) -> _Layout:
    entries: list[tuple[str, torch.Size, int, int]] = []
    offset = 0

    def add(prefix: str, module: nn.Module) -> tuple[int, int]:
        nonlocal offset
        start = offset
        for name, p in module.named_parameters():
            entries.append((f"{prefix}.{name}", p.shape, offset, offset + p.numel()))
            offset += p.numel()
        return start, offset

    base = add("base", model.base)
    heads = {t: add(f"heads.{t}", model.heads[t]) for t in tasks}
    return _Layout(entries, base, heads, offset)


def _masked_loss(
    outputs: dict[str, torch.Tensor],
    targets: dict[str, torch.Tensor],
    mask: torch.Tensor,
    count: torch.Tensor,
    tasks: Sequence[TaskSpec],
) -> torch.Tensor:
    """:func:`~fedmtl.client.training.multitask_loss` over the rows where ``mask`` is set (and,
    per task, that hold its label)."""
    total = torch.zeros(())
    for task in tasks:
        rows, have = task_row_losses(task, outputs[task.name], targets[task.name])
        have = have & mask
        total = total + torch.where(have, rows, torch.zeros_like(rows)).sum() / have.sum().clamp(
            min=1
        )
    return total


def train_shared(
    model: nn.Module,
    tasks: Sequence[TaskSpec],
    cfg: LocalConfig,
    jobs: Sequence[SharedJob],
    epochs: int | None = None,
) -> list[tuple[Vector, Heads, float]]:
    """The shared step of every job at once: per job (new base, new heads, last epoch's loss),
    as ``train_joint(model, job.base, job.heads, job.data, tasks, cfg, job.generator, epochs,
    prox_mu=job.prox_mu)`` returns it. ``model`` only gives the architecture; its weights are
    not touched. ``epochs`` defaults to ``cfg.epochs``."""
    epochs = cfg.epochs if epochs is None else epochs
    reason = batching_blocker(model)
    if reason is not None:
        raise BatchingUnsupported(reason)
    task_names = list(model.heads.keys())
    for job in jobs:
        if set(job.heads) != set(task_names):
            raise BatchingUnsupported(
                f"client '{job.data.client}' trains heads {sorted(job.heads)}, the model has "
                f"{sorted(task_names)}: the batched step trains every head"
            )
    layout = _layout(model, task_names)
    entries = layout.entries
    results: list[tuple[Vector, Heads, float] | None] = [None] * len(jobs)

    def unstack(row: torch.Tensor, like: Heads) -> tuple[Vector, Heads]:
        a, b = layout.base
        return row[a:b].clone(), {t: row[slice(*layout.heads[t])].clone() for t in like}

    def start_row(job: SharedJob) -> torch.Tensor:
        return torch.cat([job.base.reshape(-1)] + [job.heads[t].reshape(-1) for t in task_names])

    active = [
        i for i, job in enumerate(jobs) if job.data.n_train > 0 and epochs > 0 and layout.width > 0
    ]
    chosen = set(active)
    for i, job in enumerate(jobs):
        if i not in chosen:  # fit's early return: nothing moves, the loss is NaN
            results[i] = (
                job.base.clone(),
                {t: v.clone() for t, v in job.heads.items()},
                float("nan"),
            )
    if not active:
        return results  # type: ignore[return-value]

    bs = cfg.batch_size
    # clients with the most batches first: at step t the clients still training are a prefix
    order = sorted(active, key=lambda i: -math.ceil(jobs[i].data.n_train / bs))
    sel = [jobs[i] for i in order]
    C = len(sel)
    n = torch.tensor([j.data.n_train for j in sel])
    nb = (n + bs - 1) // bs
    steps = int(nb[0])
    k_t = C - torch.bincount(nb, minlength=steps + 1).cumsum(0)[:steps]  # clients with nb > t
    step_start = torch.cat([torch.zeros(1, dtype=torch.long), k_t.cumsum(0)])
    slots = int(step_start[-1])
    bounds = [(int(k), int(a), int(b)) for k, a, b in zip(k_t, step_start[:-1], step_start[1:])]

    x_all = torch.cat([j.data.x_train for j in sel])
    y_all = {t.name: torch.cat([j.data.y_train[t.name] for j in sel]) for t in tasks}
    row_start = torch.cat([torch.zeros(1, dtype=torch.long), n.cumsum(0)[:-1]])
    row_client = torch.repeat_interleave(torch.arange(C), n)
    row_j = torch.arange(int(n.sum())) - row_start[row_client]
    # where row j of a client's epoch order lands: slot (step j // bs, client) at position j % bs
    dest = (step_start[row_j // bs] + row_client) * bs + row_j % bs
    mask_all = torch.zeros(slots * bs, dtype=torch.bool)
    mask_all[dest] = True
    mask_all = mask_all.view(slots, bs)
    count_all = mask_all.sum(1).to(x_all.dtype)
    slot_client = torch.arange(slots) - torch.repeat_interleave(
        step_start[:-1], k_t
    )  # the client of each slot

    weights = torch.stack([start_row(j) for j in sel]).to(x_all.dtype).contiguous()  # [C, P]
    anchor = weights.clone()
    mu = torch.tensor([j.prox_mu for j in sel], dtype=weights.dtype)
    use_prox = bool((mu > 0).any())
    buf = torch.zeros_like(weights) if cfg.momentum != 0 else None

    def objective(params, x, ys, mask, count):
        loss = _masked_loss(
            functional_call(model, params, (x,), tie_weights=False), ys, mask, count, tasks
        )
        return loss, loss

    batched_grad = vmap(grad(objective, has_aux=True))
    batched_loss = vmap(objective)
    linear = layout.base[0] == layout.base[1]  # no base layers: multinomial logistic regression
    solo = copy.deepcopy(model).train()
    named = dict(solo.named_parameters())
    solo_params = [named[name] for name, _, _, _ in entries]  # in the row's order

    def gradients(w, x, ys, mask, count) -> tuple[torch.Tensor, torch.Tensor]:
        """Every active client's loss gradient as ``[k, P]`` rows, and its loss ``[k]``."""
        k = w.shape[0]
        if k <= SOLO_CLIENTS:  # the tail of a shard: vmap's fixed cost outweighs k plain steps
            rows, losses = [], []
            for i in range(k):
                with torch.no_grad():  # the client's row into a module of its own: plain autograd
                    for (_, shape, s, e), p in zip(entries, solo_params):
                        p.copy_(w[i, s:e].view(shape))
                m = int(count[i])  # a slot's real rows come first
                loss = multitask_loss(solo(x[i, :m]), {t: y[i, :m] for t, y in ys.items()}, tasks)
                grads = torch.autograd.grad(
                    loss, solo_params, allow_unused=True, materialize_grads=True
                )
                rows.append(torch.cat([g.reshape(-1) for g in grads]))
                losses.append(loss.detach())
            return torch.stack(rows), torch.stack(losses)
        if linear and k <= LINEAR_FORWARD_CLIENTS:  # one plain backward through a vmapped forward
            leaf = w.detach().requires_grad_()
            params = {name: leaf[:, s:e].unflatten(1, shape) for name, shape, s, e in entries}
            loss, _ = batched_loss(params, x, ys, mask, count)
            (g,) = torch.autograd.grad(loss.sum(), leaf)  # client i's loss depends on row i only
            return g, loss.detach()
        params = {name: w[:, s:e].unflatten(1, shape) for name, shape, s, e in entries}
        grads, loss = batched_grad(params, x, ys, mask, count)
        return torch.cat([grads[name].reshape(k, -1) for name, _, _, _ in entries], dim=1), loss

    losses = torch.zeros(slots, dtype=x_all.dtype)  # this epoch's loss of every (step, client)
    for _ in range(epochs):
        # the generator's draws of fit's `batches`: one permutation per epoch; padding reads row 0
        perms = torch.cat([torch.randperm(int(j.data.n_train), generator=j.generator) for j in sel])
        index = torch.zeros(slots * bs, dtype=torch.long)
        index[dest] = perms + row_start[row_client]
        index = index.view(slots, bs)
        for k, a, b in bounds:
            idx, mask, count = index[a:b], mask_all[a:b], count_all[a:b]
            w = weights[:k]
            g, loss = gradients(
                w, x_all[idx], {name: y[idx] for name, y in y_all.items()}, mask, count
            )
            if use_prox:
                g = g + mu[:k, None] * (w - anchor[:k])
            if cfg.weight_decay != 0:
                g = g.add(w, alpha=cfg.weight_decay)
            if buf is not None:
                buf[:k].mul_(cfg.momentum).add_(g)
                g = buf[:k]
            w.add_(g, alpha=-cfg.lr)
            losses[a:b] = loss.detach()
    # fit's returned loss: the last epoch's batch losses weighted by batch sizes, over the rows
    total = torch.zeros(C, dtype=torch.float64).index_add_(
        0, slot_client, losses.double() * count_all.double()
    )
    last = total / n.double()
    for pos, i in enumerate(order):
        base, heads = unstack(weights[pos], jobs[i].heads)
        results[i] = (base, heads, float(last[pos]))
    return results  # type: ignore[return-value]
