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
its own group (loaded into a ``MultiTaskModel``, one task head picked by ``task``). For LiRA the
attacker also holds data from the same distribution and can run the same training procedure
to train shadow models (for fedmtl: a federated run producing base + group heads on the shadow's
data). The personal heads are never released (they stay on the clients) and are out of scope;
so are attacks that observe the updates exchanged during training (a stronger attacker, covered
only by the DP guarantee).

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

The package: :mod:`~fedmtl.privacy.attacks.scoring` (:class:`AttackResult` and the ROC summary),
:mod:`~fedmtl.privacy.attacks.queries` (losses and confidences of a model on candidates),
:mod:`~fedmtl.privacy.attacks.loss_threshold` (Yeom et al.) and
:mod:`~fedmtl.privacy.attacks.lira` (LiRA and its shadow models).
"""

from __future__ import annotations

from fedmtl.privacy.attacks.lira import (
    GLOBAL_VARIANCE_BELOW,
    Variance,
    lira_offline,
    lira_online,
    shadow_statistics,
    split_in_out,
)
from fedmtl.privacy.attacks.loss_threshold import loss_threshold_attack
from fedmtl.privacy.attacks.queries import logit_confidence, per_example_loss
from fedmtl.privacy.attacks.scoring import AttackResult, evaluate_scores, tpr_at_fpr

__all__ = [
    "GLOBAL_VARIANCE_BELOW",
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
    "Variance",
]
