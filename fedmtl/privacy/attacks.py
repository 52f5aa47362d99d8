"""Membership-inference attacks: the privacy leakage of a released model, measured.

What the attacks measure
------------------------
A membership-inference attack is given one candidate example (x, y) and the released model, and
decides whether (x, y) was in the training data (a *member*) or not (a *non-member*). Each attack
here turns every candidate into a score (larger = "more likely a member"); sweeping a threshold
over the scores of known members and known non-members gives a ROC curve, summarised in an
:class:`AttackResult`:

- ``auc``: the area under the ROC curve. 0.5 means the attack is no better than a coin flip (no
  measured leakage); 1.0 means it separates members from non-members perfectly. A value below
  0.5 is chance plus noise, not "negative leakage".
- ``advantage``: max over thresholds of TPR − FPR = 2·(balanced accuracy − 0.5) (Yeom et al.).
- ``tpr_at_1pct_fpr`` / ``tpr_at_01pct_fpr``: the fraction of members found while wrongly
  flagging at most 1 % / 0.1 % of non-members — the low-FPR regime Carlini et al. argue is the one
  that matters (an attack that confidently identifies a few members is a real breach even when
  its AUC is close to 0.5). They are only resolved when there are well over 100 / 1000
  non-members; with fewer, "FPR ≤ 0.1 %" means "no false positive at all".

An (ε, δ)-DP training procedure bounds every attack: TPR ≤ e^ε·FPR + δ at each threshold, so the
advantage is at most (e^ε − 1 + 2δ)/(e^ε + 1). fedmtl's DP-FedAvg is *client-level*; a guarantee
for one client's whole data set covers each single example of that client as well (under the
add/remove relation, changing one example of a client is two steps: ε and δ grow accordingly).
The measured AUC is a *lower* bound on leakage (what these attacks find), the DP bound an upper one.

Attacks
-------
- :func:`loss_threshold_attack` (Yeom et al. 2018): members tend to have a lower loss; score =
  −loss. Needs only the released model and the candidates (:func:`per_example_loss`).
- :func:`lira_offline` / :func:`lira_online` (LiRA, Carlini et al. 2022): calibrate each example
  separately. Some examples have a low loss whether or not they were trained on (easy examples),
  some a high loss even when trained on (outliers); a global threshold confuses the two. LiRA
  trains *shadow models* on data from the same distribution, with and without each candidate,
  records the logit-scaled confidence φ = log(p_y / (1 − p_y)) of the true class
  (:func:`logit_confidence`, :func:`shadow_statistics`), fits a Gaussian to the OUT (and, online,
  the IN) statistics of every example, and scores the target model's statistic by a likelihood
  (ratio) test. The offline variant needs only OUT shadows, so shadows can be trained once, ahead
  of time, and reused for every candidate.

Threat model
------------
The attacker holds the *released* model — the shared base plus the group heads, as registered
after federated training — and a set of candidate examples, and can query the model on them
(logits, so losses and confidences); each candidate is scored with the base and the heads of
its own group (loaded into a ``MultiTaskModel``, one task head picked by ``task``). For LiRA the attacker also holds data from the same
distribution and can run the same training procedure to train shadow models (for fedmtl: a
federated run producing base + group heads on the shadow's data). The personal heads are never
released (they stay on the clients) and are out of scope; so are attacks that observe the
updates exchanged during training (a stronger attacker, covered only by the DP guarantee).

All functions are pure (no global state, no logging); what a "model" is and how shadows are
trained is the caller's business, so a benchmark can call these with any ``torch.nn.Module``.

References:

- S. Yeom, I. Giacomelli, M. Fredrikson, S. Jha. *Privacy Risk in Machine Learning: Analyzing
  the Connection to Overfitting.* IEEE CSF 2018.
- N. Carlini, S. Chien, M. Nasr, S. Song, A. Terzis, F. Tramèr. *Membership Inference Attacks
  From First Principles.* IEEE S&P 2022 (LiRA; Eq. 4 for the logit scaling, § IV-C/D for the
  online and offline tests and the global variance for few shadows).
- R. Shokri, M. Stronati, C. Song, V. Shmatikov. *Membership Inference Attacks Against Machine
  Learning Models.* IEEE S&P 2017 (shadow models).
- P. Kairouz, S. Oh, P. Viswanath. *The Composition Theorem for Differential Privacy.* ICML 2015
  (the hypothesis-testing view of (ε, δ)-DP behind the TPR/FPR bound).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import norm
from sklearn.metrics import roc_auc_score, roc_curve

__all__ = [
    "AttackResult",
    "evaluate_scores",
    "lira_offline",
    "lira_online",
    "logit_confidence",
    "loss_threshold_attack",
    "per_example_loss",
    "shadow_statistics",
    "split_in_out",
    "tpr_at_fpr",
]

#: below this many OUT (or IN) statistics per example, ``variance="auto"`` uses one global variance
#: (Carlini et al. 2022, § VI-A: per-example variances need about 64 shadows)
GLOBAL_VARIANCE_BELOW = 64

#: floor on fitted standard deviations, so that a constant statistic does not divide by zero
_MIN_STD = 1e-12

Variance = Literal["auto", "global", "per_example"]


@dataclass(frozen=True)
class AttackResult:
    """How well one attack separates members from non-members (see the module docstring)."""

    auc: float
    advantage: float
    tpr_at_1pct_fpr: float
    tpr_at_01pct_fpr: float
    n_members: int
    n_nonmembers: int
    name: str


# --- model queries -----------------------------------------------------------------------------


def _select_logits(output: torch.Tensor | dict[str, torch.Tensor], task: str | None) -> torch.Tensor:
    """``output[task]``, the only entry of a one-task dict, or ``output`` itself if a tensor."""
    if isinstance(output, torch.Tensor):
        return output
    if not isinstance(output, dict):
        raise ValueError(f"model output must be a tensor or a dict of tensors, got {type(output).__name__}")
    if task is not None:
        if task not in output:
            raise ValueError(f"task '{task}' is not among the model's outputs {sorted(output)}")
        return output[task]
    if len(output) != 1:
        raise ValueError(f"the model has several tasks {sorted(output)}; pass task= to choose one")
    return next(iter(output.values()))


def _model_device(model: torch.nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _check_xy(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.as_tensor(x)
    y = torch.as_tensor(y).reshape(-1).long()
    if x.shape[0] == 0:
        raise ValueError("x is empty: need at least one example")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} rows but y has {y.shape[0]} labels")
    return x, y


def _logits(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, task: str | None, batch_size: int
) -> torch.Tensor:
    """Class logits [n, C] of ``model`` on ``x`` (eval mode, no grad; the mode is restored)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = _model_device(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            parts = [
                _select_logits(model(x[i : i + batch_size].to(device)), task).detach().cpu()
                for i in range(0, x.shape[0], batch_size)
            ]
    finally:
        model.train(was_training)
    logits = torch.cat(parts).to(torch.float64)
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ValueError(f"expected classification logits of shape [n, C>=2], got {tuple(logits.shape)}")
    if int(y.min()) < 0 or int(y.max()) >= logits.shape[1]:
        raise ValueError(f"labels must lie in [0, {logits.shape[1] - 1}], got [{int(y.min())}, {int(y.max())}]")
    return logits


def per_example_loss(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    task: str | None = None,
    batch_size: int = 4096,
) -> np.ndarray:
    """Cross-entropy of each row of ``x`` against its label in ``y``, as float64 [n].

    The model is queried in eval mode without gradients (its training mode is restored). When
    it returns a dict {task: logits} (fedmtl's ``MultiTaskModel``), ``output[task]`` is used, or
    the only entry when ``task`` is None; a plain tensor output is used as is.
    """
    x, y = _check_xy(x, y)
    logits = _logits(model, x, y, task, batch_size)
    return F.cross_entropy(logits, y, reduction="none").numpy()


def logit_confidence(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    task: str | None = None,
    batch_size: int = 4096,
) -> np.ndarray:
    """LiRA's statistic φ = log(p_y / (1 − p_y)) of the true class, as float64 [n].

    Computed stably from the logits z as z_y − logsumexp_{j≠y} z_j (= log p_y − log Σ_{j≠y} p_j),
    so it stays finite when p_y rounds to 0 or 1. Model handling as in :func:`per_example_loss`.
    """
    x, y = _check_xy(x, y)
    logits = _logits(model, x, y, task, batch_size)
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf"))
    return (true - torch.logsumexp(others, dim=1)).numpy()


# --- scoring -----------------------------------------------------------------------------------


def _as_finite_1d(values: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty: need at least one value")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def _as_mask(members_mask: np.ndarray, n: int) -> np.ndarray:
    mask = np.asarray(members_mask)
    if mask.ndim != 1 or mask.shape[0] != n:
        raise ValueError(f"members_mask must have shape ({n},), got {mask.shape}")
    if mask.dtype != np.bool_:
        if not np.all(np.isin(mask, (0, 1))):
            raise ValueError("members_mask must be boolean (or 0/1)")
        mask = mask.astype(bool)
    if not mask.any():
        raise ValueError("members_mask has no members: need at least one member and one non-member")
    if mask.all():
        raise ValueError("members_mask has no non-members: need at least one member and one non-member")
    return mask


def tpr_at_fpr(scores: np.ndarray, members_mask: np.ndarray, max_fpr: float) -> float:
    """The largest TPR of a threshold on ``scores`` whose FPR is ≤ ``max_fpr`` (0 if none)."""
    if not 0.0 <= max_fpr <= 1.0:
        raise ValueError(f"max_fpr must lie in [0, 1], got {max_fpr}")
    scores = _as_finite_1d(scores, "scores")
    mask = _as_mask(members_mask, scores.shape[0])
    fpr, tpr, _ = roc_curve(mask, scores, drop_intermediate=False)
    return float(tpr[fpr <= max_fpr].max())


def evaluate_scores(scores: np.ndarray, members_mask: np.ndarray, name: str) -> AttackResult:
    """Summarise attack ``scores`` (larger = more likely a member) against the true membership."""
    scores = _as_finite_1d(scores, "scores")
    mask = _as_mask(members_mask, scores.shape[0])
    fpr, tpr, _ = roc_curve(mask, scores, drop_intermediate=False)
    return AttackResult(
        auc=float(roc_auc_score(mask, scores)),
        advantage=float(np.max(tpr - fpr)),
        tpr_at_1pct_fpr=float(tpr[fpr <= 0.01].max()),
        tpr_at_01pct_fpr=float(tpr[fpr <= 0.001].max()),
        n_members=int(mask.sum()),
        n_nonmembers=int((~mask).sum()),
        name=name,
    )


def loss_threshold_attack(
    member_losses: np.ndarray, nonmember_losses: np.ndarray, name: str = "loss_threshold"
) -> AttackResult:
    """Yeom et al.'s attack: score = −loss, so a lower loss reads as "member"."""
    members = _as_finite_1d(member_losses, "member_losses")
    nonmembers = _as_finite_1d(nonmember_losses, "nonmember_losses")
    scores = -np.concatenate([members, nonmembers])
    mask = np.concatenate([np.ones(members.size, bool), np.zeros(nonmembers.size, bool)])
    return evaluate_scores(scores, mask, name)


# --- LiRA --------------------------------------------------------------------------------------


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


def _fit_gaussians(stats: np.ndarray, variance: Variance, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-example mean and std of ``stats`` [n, K] (NaN-padded); global or per-example variance.

    The global variance is the pooled within-example variance: Σ_i Σ_k (s_ik − μ_i)² / Σ_i (K_i − 1).
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
            raise ValueError(f"{name}: a per-example variance needs >= 2 shadow statistics per example")
        std = np.sqrt(squares / (counts - 1))
    else:
        dof = int(np.sum(counts - 1))
        if dof < 1:
            raise ValueError(f"{name}: a global variance needs some example with >= 2 shadow statistics")
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
    scores = norm.logpdf(target, loc=mean_in, scale=std_in) - norm.logpdf(target, loc=mean_out, scale=std_out)
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
        raise ValueError(f"n_shadows must be >= 2 (each example needs IN and OUT shadows), got {n_shadows}")
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
        raise ValueError(f"conf {conf.shape} and in_mask {in_mask.shape} must be 2-D of the same shape")
    return np.where(in_mask, conf, np.nan), np.where(in_mask, np.nan, conf)
