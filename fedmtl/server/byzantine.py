"""Byzantine clients on purpose: the faulty or malicious updates the robust rules
(:mod:`fedmtl.server.robust`) are tested and benchmarked against. A setting for experiments, like
:mod:`fedmtl.faults`; nothing here runs unless a test or a benchmark asks for it.

Threat model: a fixed fraction of the clients (:func:`attackers`, the same ones every round) are
Byzantine; the others follow the protocol. Attacks:

- ``sign_flip`` (model poisoning): send −s·Δ instead of the honest update Δ (base and heads),
  s = 10 by default — pushes the mean the wrong way, s times as hard as an honest client pulls.
- ``gaussian`` (model poisoning, Blanchard et al. 2017; Fang et al. 2020): send zero-mean
  isotropic Gaussian noise N(0, σ²I) instead of Δ. The papers use a fixed large variance; since
  the size of an update depends on the model, the learning rate and the number of local steps,
  the default here is relative, σ = s × RMS(Δ) (the RMS over the client's whole released update):
  the noise vector is about s times as long as the honest update it replaces, as destructive as
  the sign flip in magnitude but in a random direction. ``noise_std`` sets an absolute σ instead.
- ``label_flip`` (data poisoning, as in Fang et al. 2020): train on corrupted
  labels y → C − 1 − y (:func:`flip_labels`) and send the resulting, honestly computed update.
  It changes the client's *data*, not its update, so :func:`corrupt_update` does not apply it:
  the training code maps the attacker's training labels with :func:`flip_labels` (per task, with
  that task's number of classes) before local training, and leaves its evaluation labels alone.

References:

- P. Blanchard, E. M. El Mhamdi, R. Guerraoui, J. Stainer. *Machine Learning with Adversaries:
  Byzantine Tolerant Gradient Descent.* NeurIPS 2017.
- M. Fang, X. Cao, J. Jia, N. Gong. *Local Model Poisoning Attacks to Byzantine-Robust Federated
  Learning.* USENIX Security 2020.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Sequence

import torch

from fedmtl.state import ClientUpdate, Vector

ATTACKS = ("sign_flip", "gaussian", "label_flip")
MODEL_ATTACKS = ("sign_flip", "gaussian")  # applied to the released update (corrupt_update)
DATA_ATTACKS = ("label_flip",)  # applied to the training labels (flip_labels)


def attackers(clients: Sequence[str], fraction: float, seed: int) -> frozenset[str]:
    """The Byzantine clients: a seeded uniform choice of round(fraction · n) of them, rounding
    halves up (Python's ``round`` rounds 2.5 to 2). The choice depends only on the set of client
    ids, the fraction and the seed, not on the order of ``clients``, so calling it every round gives
    the same attackers every round."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"Byzantine fraction must be in [0, 1], got {fraction}")
    ids = sorted(clients)
    if len(set(ids)) != len(ids):
        raise ValueError(f"client ids must be distinct, got {list(clients)}")
    k = math.floor(fraction * len(ids) + 0.5)
    return frozenset(random.Random(seed).sample(ids, k))


def _noise_like(v: Vector, std: float, generator: torch.Generator | None) -> Vector:
    noise = torch.randn(v.shape, generator=generator, dtype=torch.float64) * std
    return noise.to(v.dtype)


def corrupt_update(
    update: ClientUpdate,
    attack: str,
    *,
    scale: float = 10.0,
    noise_std: float | None = None,
    generator: torch.Generator | None = None,
) -> ClientUpdate:
    """A new :class:`ClientUpdate` with the deltas (base and heads) replaced under ``attack``
    (``sign_flip``: −scale·Δ; ``gaussian``: N(0, σ²) with σ = ``noise_std``, default scale × the
    update's RMS). Client, group, sample count and metrics are kept; the input is not modified.
    ``generator`` seeds the Gaussian noise (``None``: torch's global generator)."""
    if attack in DATA_ATTACKS:
        raise ValueError(
            f"attack '{attack}' corrupts training labels, not updates: apply "
            "fedmtl.server.byzantine.flip_labels to the client's labels before local training"
        )
    if attack not in MODEL_ATTACKS:
        raise ValueError(f"attack '{attack}' is not known; allowed values: {ATTACKS}")
    parts = ([update.delta_base] if update.delta_base is not None else []) + list(
        update.delta_heads.values()
    )
    if attack == "sign_flip":

        def corrupt(v: Vector) -> Vector:
            return -scale * v
    else:
        if noise_std is None:
            count = sum(p.numel() for p in parts)
            square = sum(float(p.to(torch.float64).square().sum()) for p in parts)
            noise_std = scale * math.sqrt(square / count) if count else 0.0
        if not (noise_std >= 0 and math.isfinite(noise_std)):
            raise ValueError(f"noise_std must be a finite number >= 0, got {noise_std}")
        std = noise_std

        def corrupt(v: Vector) -> Vector:
            return _noise_like(v, std, generator)

    return dataclasses.replace(
        update,
        delta_base=corrupt(update.delta_base) if update.delta_base is not None else None,
        delta_heads={t: corrupt(v) for t, v in update.delta_heads.items()},
        metrics=dict(update.metrics),
    )


def flip_labels(y: torch.Tensor, n_classes: int) -> torch.Tensor:
    """The label-flipping attack, y → n_classes − 1 − y (a new tensor of the same dtype; an
    involution). Raises if a label is outside [0, n_classes)."""
    if n_classes < 1:
        raise ValueError(f"n_classes must be >= 1, got {n_classes}")
    if y.is_floating_point() or y.is_complex():
        raise ValueError(f"labels must be integers, got dtype {y.dtype}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= n_classes):
        raise ValueError(
            f"labels must be in [0, {n_classes}), got values in [{int(y.min())}, {int(y.max())}]"
        )
    return (n_classes - 1) - y
