"""LiRA (Carlini et al. 2022): per-example Gaussians fitted to shadow models' statistics, the
offline and online likelihood tests, and the training of the shadow models themselves."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
from scipy.stats import norm

from fedmtl.privacy.attacks.queries import _check_xy, logit_confidence
from fedmtl.privacy.attacks.scoring import AttackResult, _as_finite_1d, _as_mask, evaluate_scores

#: below this many OUT (or IN) statistics per example, ``variance="auto"`` uses one global variance
#: (Carlini et al. 2022, § VI-A: per-example variances need about 64 shadows)
GLOBAL_VARIANCE_BELOW = 64

#: floor on fitted standard deviations, so that a constant statistic does not divide by zero
_MIN_STD = 1e-12

Variance = Literal["auto", "global", "per_example"]


def _as_shadow_matrix(values: np.ndarray, n: int, name: str) -> np.ndarray:
    """[n, K] float64 statistics; NaN marks "no statistic" (ragged IN/OUT sets), ±inf is refused."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n}, K), got {arr.shape}")
    if arr.shape[1] == 0:
        raise ValueError(f"{name} has no shadow models (K = 0)")
    if np.isinf(arr).any():
        raise ValueError(f"{name} contains infinite values")
    if (np.isnan(arr).all(axis=1)).any():
        missing = int(np.isnan(arr).all(axis=1).sum())
        raise ValueError(f"{name}: {missing} example(s) have no shadow statistic (all NaN)")
    return arr


def _fit_gaussians(
    stats: np.ndarray, variance: Variance, name: str
) -> tuple[np.ndarray, np.ndarray]:
    """Per-example mean and std of ``stats`` [n, K] (NaN-padded); global or per-example variance.

    The global variance is the pooled within-example variance:
    Σ_i Σ_k (s_ik − μ_i)² / Σ_i (K_i − 1).
    """
    if variance not in ("auto", "global", "per_example"):
        raise ValueError(f"variance must be 'auto', 'global' or 'per_example', got {variance!r}")
    counts = np.sum(~np.isnan(stats), axis=1)
    mean = np.nanmean(stats, axis=1)
    if variance == "auto":
        variance = "global" if counts.min() < GLOBAL_VARIANCE_BELOW else "per_example"
    squares = np.nansum((stats - mean[:, None]) ** 2, axis=1)
    if variance == "per_example":
        if counts.min() < 2:
            raise ValueError(
                f"{name}: a per-example variance needs >= 2 shadow statistics per example"
            )
        std = np.sqrt(squares / (counts - 1))
    else:
        dof = int(np.sum(counts - 1))
        if dof < 1:
            raise ValueError(
                f"{name}: a global variance needs some example with >= 2 shadow statistics"
            )
        std = np.full(stats.shape[0], np.sqrt(squares.sum() / dof))
    return mean, np.maximum(std, _MIN_STD)


def lira_offline(
    target_logit_conf: np.ndarray,
    shadow_out_conf: np.ndarray,
    members_mask: np.ndarray,
    variance: Variance = "auto",
    name: str = "lira_offline",
) -> AttackResult:
    """Offline LiRA: is the target's statistic unusually high for a model trained WITHOUT x?

    ``target_logit_conf`` [n]: φ of each candidate under the attacked model
    (:func:`logit_confidence`); ``shadow_out_conf`` [n, K]: φ of each candidate under K shadow
    models trained without it (NaN where a shadow has no OUT statistic for that example, e.g.
    from :func:`split_in_out`); ``members_mask`` [n]: the true membership, used only to evaluate.

    A Gaussian N(μ_i, σ_i²) is fitted to each example's OUT statistics; the one-sided p-value
    Pr[Z ≥ φ_i] = 1 − CDF(φ_i) is small for members, and the score is −log of it (monotone in
    the CDF, but without the CDF's saturation at 1 for large φ). ``variance``: "per_example"
    (σ_i from example i's shadows), "global" (one pooled σ, the paper's advice for few shadows),
    or "auto" (global when some example has fewer than 64 OUT statistics).
    """
    target = _as_finite_1d(target_logit_conf, "target_logit_conf")
    out = _as_shadow_matrix(shadow_out_conf, target.size, "shadow_out_conf")
    mask = _as_mask(members_mask, target.size)
    mean, std = _fit_gaussians(out, variance, "shadow_out_conf")
    scores = -norm.logsf(target, loc=mean, scale=std)
    return evaluate_scores(scores, mask, name)


def lira_online(
    target_conf: np.ndarray,
    shadow_in_conf: np.ndarray,
    shadow_out_conf: np.ndarray,
    members_mask: np.ndarray,
    variance: Variance = "auto",
    name: str = "lira_online",
) -> AttackResult:
    """Online LiRA: likelihood ratio of the target's statistic under the IN and OUT Gaussians.

    ``shadow_in_conf`` [n, K_in] / ``shadow_out_conf`` [n, K_out]: φ of each candidate under
    shadows trained with / without it (NaN-padded where ragged, see :func:`split_in_out`). The
    score is log N(φ_i; μ_in,i, σ_in,i²) − log N(φ_i; μ_out,i, σ_out,i²); ``variance`` applies to
    the IN and OUT fits separately, as in :func:`lira_offline`.
    """
    target = _as_finite_1d(target_conf, "target_conf")
    stats_in = _as_shadow_matrix(shadow_in_conf, target.size, "shadow_in_conf")
    stats_out = _as_shadow_matrix(shadow_out_conf, target.size, "shadow_out_conf")
    mask = _as_mask(members_mask, target.size)
    mean_in, std_in = _fit_gaussians(stats_in, variance, "shadow_in_conf")
    mean_out, std_out = _fit_gaussians(stats_out, variance, "shadow_out_conf")
    scores = norm.logpdf(target, loc=mean_in, scale=std_in) - norm.logpdf(
        target, loc=mean_out, scale=std_out
    )
    return evaluate_scores(scores, mask, name)


# --- shadow models -----------------------------------------------------------------------------


def _shadow_in_mask(n: int, n_shadows: int, rng: np.random.Generator) -> np.ndarray:
    """[n, K] boolean: each example IN exactly ⌊K/2⌋ shadows, chosen at random (Carlini et al.)."""
    order = rng.random((n, n_shadows)).argsort(axis=1)
    return order < n_shadows // 2


def shadow_statistics(
    train_fn: Callable[[np.ndarray], torch.nn.Module],
    pool_x: torch.Tensor,
    pool_y: torch.Tensor,
    n_shadows: int,
    rng: np.random.Generator | int | None,
    task: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Train ``n_shadows`` shadow models on random halves of a pool; return (conf, in_mask).

    ``train_fn(indices)`` receives the sorted int64 indices of the pool rows a shadow may train
    on and returns the trained model. The caller decides what a "model" is and how it is trained;
    it should mimic the attacked model's training as closely as it can — for fedmtl, a
    ``MultiTaskModel`` holding the base and the candidates' group heads after a federated run on
    the clients holding these rows (``task`` picks the task head, as in :func:`per_example_loss`).
    Candidates from several groups: call once per group, each with that group's pool and heads.

    Each example is IN exactly ⌊K/2⌋ shadows (a random choice per example, as in Carlini et al.),
    so each shadow trains on about half of the pool and, for K ≥ 2, every example has IN and OUT
    shadows. Returns ``conf`` [n, K] (φ of pool row i under shadow k, :func:`logit_confidence`)
    and ``in_mask`` [n, K] (True where row i was in shadow k's training set). The pool usually
    also holds the candidates: split with :func:`split_in_out` and pass to the LiRA functions.
    """
    if n_shadows < 2:
        raise ValueError(
            f"n_shadows must be >= 2 (each example needs IN and OUT shadows), got {n_shadows}"
        )
    pool_x, pool_y = _check_xy(pool_x, pool_y)
    n = pool_x.shape[0]
    if n < 2:
        raise ValueError(f"the pool needs at least 2 examples, got {n}")
    rng = np.random.default_rng(rng)
    in_mask = _shadow_in_mask(n, n_shadows, rng)
    conf = np.empty((n, n_shadows), dtype=np.float64)
    for k in range(n_shadows):
        indices = np.flatnonzero(in_mask[:, k]).astype(np.int64)
        if indices.size == 0:
            raise ValueError(f"shadow {k} drew no training example; use a larger pool")
        conf[:, k] = logit_confidence(train_fn(indices), pool_x, pool_y, task=task)
    return conf, in_mask


def split_in_out(conf: np.ndarray, in_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """NaN-padded (IN, OUT) statistics [n, K] from :func:`shadow_statistics`'s output.

    ``in_conf[i, k]`` is ``conf[i, k]`` where row i was IN shadow k and NaN elsewhere;
    ``out_conf`` the other way round. The LiRA functions skip the NaNs.
    """
    conf = np.asarray(conf, dtype=np.float64)
    in_mask = np.asarray(in_mask, dtype=bool)
    if conf.ndim != 2 or conf.shape != in_mask.shape:
        raise ValueError(
            f"conf {conf.shape} and in_mask {in_mask.shape} must be 2-D of the same shape"
        )
    return np.where(in_mask, conf, np.nan), np.where(in_mask, np.nan, conf)
