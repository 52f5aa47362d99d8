"""Client-level differential privacy for federated averaging (DP-FedAvg), as pure functions.

What the mechanism protects
---------------------------
The unit of privacy is a *client*: two federations are neighbours when one has one more client
(all of its data) than the other (add/remove one, Poisson sampling), or when one client's data is
replaced by arbitrary other data (replace one, fixed-size sampling). Each sampled client's update
Δ_i (one flat vector: the shared base θ and the head φ_g of the client's group) is clipped to
L2 norm ≤ C (:func:`clip_update`), so adding or removing one client changes a released sum by
at most C (replacing one: at most 2C). Every released sum gets Gaussian noise N(0, (zC)² I)
(:func:`noised_sum`), and is divided by a public denominator (the *expected* number of clients
qN under Poisson sampling, the fixed sample size m otherwise) — dividing by the actual number of
sampled clients would release that number without noise.

Inside ε: everything computed from the noised group sums — the group heads φ_g, the base θ and
the server optimiser's state. Outside ε: the personal heads, which never leave the client, and
anything a client sends besides its clipped update (its group choice under ``grouping.method``
ifca or cluster, its sample count, validation results); DP-FedAvg requires that the group of a
client be fixed and public (e.g. ``grouping.method=column``) and that the sums be unweighted
(each clipped update with weight 1), not weighted by the clients' sample counts.

Assumptions: each client belongs to exactly one group, so the per-group sums are computed on
disjoint sets of clients; the clients of a round are sampled as the accountant is told
(:mod:`fedmtl.privacy.accounting`); a group with no sampled client still releases its
(pure-noise) sum.

Adaptive clipping (:class:`AdaptiveClip`): the clip norm C follows the target quantile γ of the
update norms, C ← C·exp(−η_C (b̄ − γ)), where b̄ is the noised fraction of clients whose
norm is ≤ C. The count query Σ(b_i − ½) has sensitivity ½ and noise σ_b, so it is a Gaussian
mechanism with noise multiplier 2σ_b; the update sums use
z_Δ = (z⁻² − (2σ_b)⁻²)^(−½) (:func:`update_noise_multiplier`), so that the pair is exactly a
Gaussian mechanism with the configured overall noise multiplier z — the z the accountant is given.

Randomness: in a run, every noise draw comes from the run's secret key
(:class:`fedmtl.privacy.randomness.SecretRandom`, a ChaCha20 stream per purpose); a seeded
``torch.Generator`` is accepted for tests only (anyone who knows the seed can replay it, and it
keeps only 32 bits of its seed). Floating-point attacks (Mironov 2012) are not addressed.

References:

- H. B. McMahan, D. Ramage, K. Talwar, L. Zhang. *Learning Differentially Private Recurrent
  Language Models.* ICLR 2018 (DP-FedAvg).
- G. Andrew, O. Thakkar, H. B. McMahan, S. Ramaswamy. *Differentially Private Learning with
  Adaptive Clipping.* NeurIPS 2021 (Algorithm 1, Theorem 1).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedmtl.privacy.randomness import SecretStream

#: relative slack when checking that a summed update is clipped (float32 rounding of the scaling)
_CLIP_SLACK = 1e-5


def _check_clip(clip: float) -> float:
    clip = float(clip)
    if not (math.isfinite(clip) and clip > 0):
        raise ValueError(f"privacy.dp_fedavg.clip_norm must be a finite number > 0, got {clip}")
    return clip


def _check_noise_multiplier(noise_multiplier: float) -> float:
    z = float(noise_multiplier)
    if not (math.isfinite(z) and z >= 0):
        raise ValueError(
            "privacy.dp_fedavg.noise_multiplier must be a finite number >= 0, "
            f"got {noise_multiplier}"
        )
    return z


def clip_update(delta: torch.Tensor, clip: float) -> tuple[torch.Tensor, float]:
    """Δ·min(1, C/‖Δ‖₂) and ‖Δ‖₂ (the norm before clipping; the input is not modified).

    A vector no longer than C is returned unchanged (a copy); a longer one is scaled to norm C.
    """
    clip = _check_clip(clip)
    norm = float(torch.linalg.vector_norm(delta.detach().to(torch.float64)))
    if not math.isfinite(norm):
        raise ValueError(f"client update has a non-finite norm ({norm}); it cannot be clipped")
    if norm <= clip:
        return delta.detach().clone(), norm
    return (delta.detach() * (clip / norm)).to(delta.dtype), norm


def gaussian_noise(
    like: torch.Tensor | torch.Size | Sequence[int],
    std: float,
    generator: torch.Generator | SecretStream,
) -> torch.Tensor:
    """N(0, std² I) shaped like ``like`` (a tensor: also its dtype and device; a shape: float32),
    from a :class:`~fedmtl.privacy.randomness.SecretStream` (what every release uses) or a seeded
    ``torch.Generator`` (reproducible by anyone who knows the seed: tests only)."""
    std = float(std)
    if not (math.isfinite(std) and std >= 0):
        raise ValueError(f"noise standard deviation must be a finite number >= 0, got {std}")
    if isinstance(like, torch.Tensor):
        shape, dtype, device = like.shape, like.dtype, like.device
    else:
        shape, dtype, device = torch.Size(like), torch.float32, torch.device("cpu")
    if not dtype.is_floating_point:
        dtype = torch.float32
    if isinstance(
        generator, SecretStream
    ):  # the secret source every release uses (fedmtl.privacy.randomness)
        return (generator.standard_normal(shape) * std).to(dtype=dtype, device=device)
    noise = torch.randn(shape, generator=generator, dtype=dtype, device=generator.device)
    return (noise * std).to(device)


def noised_sum(
    clipped: Sequence[torch.Tensor],
    clip: float,
    noise_multiplier: float,
    generator: torch.Generator,
    *,
    like: torch.Tensor | None = None,
) -> torch.Tensor:
    """Σ_i Δ_i + N(0, (zC)² I): one released sum of clipped client updates.

    Each Δ_i must already be clipped to C (:func:`clip_update`; checked, ValueError otherwise).
    An empty ``clipped`` (no sampled client in this group) still releases pure noise; pass
    ``like`` for its shape then. The caller divides by a public denominator.
    """
    clip = _check_clip(clip)
    z = _check_noise_multiplier(noise_multiplier)
    if not clipped:
        if like is None:
            raise ValueError("noised_sum of no updates needs `like` for the shape of the noise")
        total = torch.zeros_like(like, dtype=torch.float64)
        out_dtype = like.dtype
    else:
        shape = clipped[0].shape
        total = torch.zeros(shape, dtype=torch.float64, device=clipped[0].device)
        for i, update in enumerate(clipped):
            if update.shape != shape:
                raise ValueError(
                    f"update {i} has shape {tuple(update.shape)}, expected {tuple(shape)}"
                )
            norm = float(torch.linalg.vector_norm(update.detach().to(torch.float64)))
            if not norm <= clip * (1 + _CLIP_SLACK):
                raise ValueError(
                    f"update {i} has norm {norm:.6g} > privacy.dp_fedavg.clip_norm={clip}; "
                    "clip it first"
                )
            total += update.detach().to(torch.float64)
        out_dtype = clipped[0].dtype
    noise = gaussian_noise(total, z * clip, generator)
    return (total + noise).to(out_dtype)


def default_count_noise(expected_clients: float) -> float:
    """σ_b = m/20, Andrew et al.'s choice: the noised fraction b̄ then has std 0.05."""
    if not (math.isfinite(expected_clients) and expected_clients > 0):
        raise ValueError(f"expected clients per round must be > 0, got {expected_clients}")
    return expected_clients / 20.0


def update_noise_multiplier(
    noise_multiplier: float, count_noise: float | None = None, expected_clients: float | None = None
) -> float:
    """z_Δ = (z⁻² − (2σ_b)⁻²)^(−½): the noise multiplier of the update sums under adaptive clipping.

    ``noise_multiplier`` is the overall z (what the accountant is given); ``count_noise`` is σ_b,
    the std of the noise on the count Σ(b_i − ½) (default :func:`default_count_noise` of
    ``expected_clients``). ValueError when 2σ_b ≤ z: the count query would use the whole budget.
    """
    z = _check_noise_multiplier(noise_multiplier)
    if z == 0:
        raise ValueError("privacy.dp_fedavg.noise_multiplier must be > 0 with adaptive clipping")
    if count_noise is None:
        if expected_clients is None:
            raise ValueError("update_noise_multiplier needs count_noise or expected_clients")
        count_noise = default_count_noise(expected_clients)
    sigma_b = float(count_noise)
    if not (math.isfinite(sigma_b) and sigma_b >= 0):
        raise ValueError(f"privacy.count_noise must be a finite number >= 0, got {count_noise}")
    if 2 * sigma_b <= z:
        raise ValueError(
            f"privacy.count_noise={sigma_b:.4g} is too small for "
            f"privacy.dp_fedavg.noise_multiplier={z:.4g}: "
            f"the clip-count query alone would use the whole budget (need 2·count_noise > "
            f"noise_multiplier, i.e. count_noise > {z / 2:.4g}); raise the count noise or the "
            "clients per round"
        )
    return (z**-2 - (2 * sigma_b) ** -2) ** -0.5


@dataclass(frozen=True)
class AdaptiveClip:
    """Geometric quantile tracking of the clip norm (Andrew et al. 2021, Algorithm 1).

    ``clip`` C, ``expected_clients`` m (the public denominator of b̄: qN, or the fixed sample size),
    ``target_quantile`` γ, ``learning_rate`` η_C, ``count_noise`` σ_b (default m/20; 0 is not
    private and only for tests).
    """

    clip: float
    expected_clients: float
    target_quantile: float = 0.5
    learning_rate: float = 0.2
    count_noise: float | None = None

    def __post_init__(self) -> None:
        _check_clip(self.clip)
        if not (math.isfinite(self.expected_clients) and self.expected_clients > 0):
            raise ValueError(f"expected clients per round must be > 0, got {self.expected_clients}")
        if not 0 <= self.target_quantile <= 1:
            raise ValueError(
                f"privacy.dp_fedavg.target_quantile must be in [0, 1], got {self.target_quantile}"
            )
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(
                f"privacy.dp_fedavg.clip_learning_rate must be > 0, got {self.learning_rate}"
            )
        if self.count_noise is None:
            object.__setattr__(self, "count_noise", default_count_noise(self.expected_clients))
        elif not (math.isfinite(self.count_noise) and self.count_noise >= 0):
            raise ValueError(
                f"privacy.count_noise must be a finite number >= 0, got {self.count_noise}"
            )

    def noised_fraction(self, norms: Sequence[float], generator: torch.Generator) -> float:
        """b̄ = (Σ_i (b_i − ½) + N(0, σ_b²)) / m + ½ with b_i = [‖Δ_i‖ ≤ C] (sensitivity ½)."""
        centred = sum((1.0 if float(n) <= self.clip else 0.0) - 0.5 for n in norms)
        noise = float(gaussian_noise((1,), float(self.count_noise), generator).to(torch.float64)[0])
        return (centred + noise) / self.expected_clients + 0.5

    def update(self, norms: Sequence[float], generator: torch.Generator) -> AdaptiveClip:
        """The state after one round: C·exp(−η_C (b̄ − γ)), from this round's unclipped norms."""
        b_bar = self.noised_fraction(norms, generator)
        clip = self.clip * math.exp(-self.learning_rate * (b_bar - self.target_quantile))
        return dataclasses.replace(self, clip=clip)

    def update_from_count(self, under: float, n: int, generator: torch.Generator) -> AdaptiveClip:
        """:meth:`update` from the number ``under`` of this round's ``n`` clients whose norm was
        ≤ C (e.g. a secure sum of the clients' bits) instead of the norms themselves."""
        if not 0 <= under <= n:
            raise ValueError(f"{under} clients under the clip norm out of {n}")
        noise = float(gaussian_noise((1,), float(self.count_noise), generator).to(torch.float64)[0])
        b_bar = (under - n / 2 + noise) / self.expected_clients + 0.5
        clip = self.clip * math.exp(-self.learning_rate * (b_bar - self.target_quantile))
        return dataclasses.replace(self, clip=clip)

    def update_noise_multiplier(self, noise_multiplier: float) -> float:
        """z_Δ for this state's σ_b (:func:`update_noise_multiplier`)."""
        return update_noise_multiplier(noise_multiplier, self.count_noise)
