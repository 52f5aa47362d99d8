"""Sample-level DP-SGD inside a client's local training (``privacy.dp_sgd.enabled``), with Opacus.

What it protects
----------------
Neighbouring datasets differ in **one row of one client's data** (add/remove). Every SGD step a
client takes in its training round (:meth:`Federation.client_round`: the shared step, FedRep's
head step, Ditto's personal model, ...) becomes a DP-SGD step (Abadi et al. 2016):

- **Poisson sampling**, as Opacus's ``DPDataLoader``: each row joins a step's batch independently
  with probability q = 1/⌈n/B⌉ (n the client's train rows, B = ``training.batch_size``), for
  ⌈n/B⌉ steps per epoch (Opacus's ``UniformWithReplacementSampler`` rule, drawn from the client's
  secret stream);
- **per-row clipping**: Opacus's ``GradSampleModule`` computes each row's gradient of the
  (multi-task) loss; ``DPOptimizer`` clips each to L2 norm C = ``privacy.dp_sgd.max_grad_norm``
  over all the trained parameters together, sums them, adds N(0, (σC)²) noise with
  σ = ``privacy.dp_sgd.noise_multiplier`` (from the same stream) and divides by the expected
  batch size ⌊nq⌋ (as ``PrivacyEngine.make_private`` does); the inner ``torch.optim.SGD`` then
  applies momentum and weight decay;
- a **data-independent term** of the objective (FedProx's μ/2·‖w − w₀‖²) is added to the noised
  gradient after privatisation: it depends on the weights only, so this is post-processing; so
  is Ditto's proximal step after each step.

Accounting
----------
Each client keeps a **ledger** (:mod:`fedmtl.privacy.sample_level`) in its own store
(:meth:`ClientStore.save_record`, record ``dp_sgd``, versioned by round like the personal state,
so a run resumed from its checkpoint of round r reads exactly the ledger of round r): one row
(round, σ, q, steps) per round it trained. Its ε at δ = ``privacy.dp_sgd.delta`` (default
``privacy.dp_fedavg.delta``) is Opacus's own accountant (``rdp``, or ``prv``) over the ledger's
(σ, q, steps); composition over rounds and over several training calls in one round is the same
adaptive composition of sampled Gaussian steps. The client reports that ε with its update
(``dp_sgd_epsilon``), and the server keeps the latest ε of every client in its state
(:data:`fedmtl.privacy.sample_level.EPSILON_KEY`, checkpointed with it) to log
``privacy/dp_sgd_epsilon_max`` and ``_mean`` every round.

``privacy.dp_sgd.target_epsilon``: a client whose next round would take its ε above the target
sits the round out (:class:`fedmtl.privacy.sample_level.DPSGDBudgetSpent`, named in the round
report) instead. A client predicts its next round from the steps of its last one (the same for
every round: they depend on n, B and the epochs only); in its first round it trains, accounts,
and, if the target would be exceeded, discards what it trained: nothing of it leaves the client,
and the decision depends on the step count only, never on the data.

Outside ε: anything computed from a client's data outside its training round (its personal
head ψ_c fitted at evaluation, shipped in the registered model with
``tracking.bundle_personal_heads``; its evaluation figures; its train loss, logged only with
``privacy.evaluation.client_metrics``), and its row count n (public, like the sample count of an
update). The noise and the Poisson batches come from the client's secret stream for the round
(:class:`fedmtl.privacy.randomness.SecretRandom`, purpose ``("client", id, round, "dp-sgd")``: a
ChaCha20 key stream, never from the seed, so nobody can replay them; Opacus's ``secure_mode``
would need ``torchcsprng``, which is not maintained for current torch).

This module imports Opacus lazily, and neither Prefect nor MLflow.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from fedmtl.config.privacy import DPSGDConfig

ACCOUNTANTS = ("rdp", "prv")


# Opacus's backward hook on a model's first layer, whose input needs no gradient: expected, harmless
warnings.filterwarnings(
    "ignore",
    message="Full backward hook is firing when gradients are computed with "
    "respect to module outputs since no inputs require gradients",
    category=UserWarning,
)


def require_opacus() -> None:
    try:
        import opacus  # noqa: F401
    except ImportError:
        raise ImportError(
            "privacy.dp_sgd.enabled needs Opacus: pip install 'fedmtl[dp-sgd]' (opacus>=1.5)"
        ) from None


def poisson_plan(n: int, batch_size: int) -> tuple[float, int, int]:
    """Opacus's plan for n rows at batch size B (``DPDataLoader``/``make_private``): the sample
    rate q = 1/⌈n/B⌉, the steps per epoch ⌈n/B⌉ and the expected batch size ⌊nq⌋ (at least 1)."""
    if n < 1 or batch_size < 1:
        raise ValueError(
            f"DP-SGD needs at least one row and batch size >= 1, got n={n}, batch_size={batch_size}"
        )
    steps = math.ceil(n / batch_size)
    rate = 1 / steps
    return rate, steps, max(int(n * rate), 1)


def compact(history: Sequence[tuple[float, float, int]]) -> list[tuple[float, float, int]]:
    """The history with the steps of equal (σ, q) added up (composition does not depend on
    order)."""
    out: dict[tuple[float, float], int] = {}
    for noise, rate, steps in history:
        key = (float(noise), float(rate))
        out[key] = out.get(key, 0) + int(steps)
    return [(noise, rate, steps) for (noise, rate), steps in out.items() if steps > 0]


def epsilon(
    history: Sequence[tuple[float, float, int]], delta: float, accountant: str = "rdp"
) -> float:
    """ε at ``delta`` of the sampled Gaussian steps in ``history`` ((σ, q, steps) each), by
    Opacus's own accountant (``rdp``: ``RDPAccountant``; ``prv``: ``PRVAccountant``).

    Cached: clients with the same row count share their history. For ``rdp`` the per-step RDP of
    each (σ, q) is also cached (Opacus's series for fractional orders costs ~0.3 s; k steps cost
    k times one, ``compute_rdp``'s own rule), and the result is the accountant's
    ``get_privacy_spent`` computation, operation for operation."""
    steps = compact(history)
    if not steps:
        return 0.0
    if any(noise == 0 for noise, _, _ in steps):
        return math.inf
    return _epsilon(tuple(steps), float(delta), accountant)


@functools.lru_cache(maxsize=4096)
def _epsilon(steps: tuple[tuple[float, float, int], ...], delta: float, accountant: str) -> float:
    if accountant == "rdp":
        from opacus.accountants import RDPAccountant
        from opacus.accountants.analysis import rdp as analysis

        rdp = sum([_rdp_per_step(noise, rate) * count for noise, rate, count in steps])
        eps, _ = analysis.get_privacy_spent(
            orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta
        )
        return float(eps)
    from opacus.accountants import create_accountant

    acc = create_accountant(accountant)
    acc.history = list(steps)
    return float(acc.get_epsilon(delta=delta))


@functools.lru_cache(maxsize=1024)
def _rdp_per_step(noise: float, rate: float):
    """One sampled Gaussian step's RDP at Opacus's default orders (read-only numpy array)."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as analysis

    out = analysis.compute_rdp(
        q=rate, noise_multiplier=noise, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS
    )
    out.setflags(write=False)
    return out


@dataclass
class DPSGDSession:
    """One client's DP-SGD in one round: the settings and the steps it took (σ, q, steps)."""

    spec: DPSGDConfig
    #: the client's secret stream for the round (noise and batch sampling); None: ``generator``
    noise: Any = None
    steps: list[tuple[float, float, int]] = field(default_factory=list)

    def fit(
        self,
        module: nn.Module,
        params: list[nn.Parameter],
        x: torch.Tensor,
        y: dict[str, torch.Tensor],
        tasks: Sequence,
        epochs: int,
        cfg,
        generator: torch.Generator,
        **options,
    ) -> float:
        """DP-SGD over (x, y) for ``epochs`` (the drop-in for :func:`fedmtl.client.training.fit`;
        ``options``: :func:`dp_fit`'s ``penalty``, ``after_step``, ``lr``); returns the mean loss of
        the last epoch's sampled rows."""
        return dp_fit(
            module,
            params,
            x,
            y,
            tasks,
            epochs,
            cfg,
            generator,
            self.spec,
            self.steps,
            noise=self.noise,
            **options,
        )


def dp_fit(
    module: nn.Module,
    params: list[nn.Parameter],
    x: torch.Tensor,
    y: dict[str, torch.Tensor],
    tasks: Sequence,
    epochs: int,
    cfg,
    generator: torch.Generator,
    spec: DPSGDConfig,
    record: list[tuple[float, float, int]] | None = None,
    penalty: Callable[[], torch.Tensor] | None = None,
    after_step: Callable[[], None] | None = None,
    lr: float | None = None,
    noise: Any = None,
) -> float:
    """DP-SGD of ``params`` (parameters of ``module``) on the rows (x, y); appends the steps
    taken, (σ, q, steps), to ``record``. The module's other parameters stay frozen, and the
    module is left as it was found (Opacus's hooks and attributes removed). ``noise``: a
    :class:`~fedmtl.privacy.randomness.SecretStream` that every step's Gaussian noise and Poisson
    batch come from (what a run uses); None: the seeded ``generator`` (tests only: replayable)."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    from fedmtl.client.training import multitask_loss

    n = int(x.shape[0])
    if n == 0 or epochs == 0 or not params:
        return float("nan")
    if not isinstance(module, nn.Module):
        raise TypeError(
            "DP-SGD trains an nn.Module (its per-row gradients come from the module's layers)"
        )
    rate, per_epoch, expected = poisson_plan(n, cfg.batch_size)
    trained = {id(p) for p in params}
    frozen = [p for p in module.parameters() if id(p) not in trained and p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        gsm = GradSampleModule(module, batch_first=True, loss_reduction="mean", strict=True)
    except BaseException:
        for p in frozen:
            p.requires_grad_(True)
        raise
    try:
        inner = torch.optim.SGD(
            params,
            lr=cfg.lr if lr is None else lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
        )
        optimizer = DPOptimizer if noise is None else _secret_optimizer()
        opt = optimizer(
            inner,
            noise_multiplier=spec.noise_multiplier,
            max_grad_norm=spec.max_grad_norm,
            expected_batch_size=expected,
            loss_reduction="mean",
            generator=generator,
        )
        if noise is not None:
            opt.secret_stream = noise
        last = float("nan")
        for _ in range(epochs):
            total, count = 0.0, 0
            sampler = (
                UniformWithReplacementSampler(
                    num_samples=n, sample_rate=rate, generator=generator, steps=per_epoch
                )
                if noise is None
                else _poisson_batches(n, rate, per_epoch, noise)
            )
            for indices in sampler:
                opt.zero_grad(set_to_none=True)
                if indices:
                    idx = torch.as_tensor(indices, dtype=torch.long)
                    loss = multitask_loss(gsm(x[idx]), {k: v[idx] for k, v in y.items()}, tasks)
                    loss.backward()
                    total += float(loss.detach()) * len(indices)
                    count += len(indices)
                else:  # an empty Poisson batch: a step of noise only, as Opacus takes it
                    for p in params:
                        p.grad_sample = p.new_zeros((0, *p.shape))
                if opt.pre_step():  # clip each row, sum, noise, divide by the expected batch
                    if penalty is not None:  # data-independent: added after privatisation
                        for p, g in zip(
                            params, torch.autograd.grad(penalty(), params, allow_unused=True)
                        ):
                            if g is not None:
                                p.grad.add_(g)
                    inner.step()
                if after_step is not None:
                    after_step()
            last = total / count if count else float("nan")
            if record is not None:
                record.append((spec.noise_multiplier, rate, per_epoch))
        return last
    finally:
        for p in params:
            for attr in ("summed_grad", "grad_sample"):
                if hasattr(p, attr):
                    delattr(p, attr)
        gsm.cleanup()
        for m in module.modules():  # what the hooks left on the layers (emptied lists)
            for attr in ("activations", "max_batch_len"):
                if hasattr(m, attr):
                    delattr(m, attr)
        for p in frozen:
            p.requires_grad_(True)


def _poisson_batches(n: int, rate: float, steps: int, stream) -> list[list[int]]:
    """Opacus's Poisson batches (each row joins each step with probability ``rate``), drawn from
    the client's secret stream instead of a seeded generator."""
    return [np.flatnonzero(stream.uniform(n) < rate).tolist() for _ in range(steps)]


@functools.cache
def _secret_optimizer():
    """Opacus's ``DPOptimizer`` with each step's Gaussian noise from the client's secret stream
    (``secret_stream``), the same N(0, (σC)²) per coordinate as Opacus adds."""
    from opacus.optimizers import DPOptimizer
    from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

    from fedmtl.privacy.dp import gaussian_noise

    class SecretNoiseDPOptimizer(DPOptimizer):
        secret_stream = None

        def add_noise(self) -> None:
            for p in self.params:
                _check_processed_flag(p.summed_grad)
                noise = gaussian_noise(
                    p.summed_grad, self.noise_multiplier * self.max_grad_norm, self.secret_stream
                )
                p.grad = (p.summed_grad + noise).view_as(p)
                _mark_as_processed(p.summed_grad)

    return SecretNoiseDPOptimizer
