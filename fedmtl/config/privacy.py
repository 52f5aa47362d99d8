"""The ``privacy`` section: one sub-section per mechanism (docs/privacy.md).

```yaml
privacy:
  dp_fedavg:   {enabled: false, clip_norm: 1.0, noise_multiplier: 1.0, delta: 1.0e-05, ...}
  secure_sum:  {enabled: false, protocol: secagg, range: 1.0, ...}
  dp_sgd:      {enabled: false, noise_multiplier: 1.0, max_grad_norm: 1.0, ...}
  evaluation:  {client_metrics: null, noise: 0.0, noise_multiplier: 10.0}
  min_group_size: 3
```

Each sub-section is handed as it is (frozen) to the mechanism it configures
(:mod:`fedmtl.privacy`). The flat keys of earlier releases (``privacy.dp``,
``privacy.secagg_range``, ...) still work: :data:`RENAMED` maps each to its new key, and
reading one warns with that name (:func:`upgrade_privacy`); giving both is an error.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

from pydantic import Field, model_validator

from fedmtl.config.sections import _Section


def tenseal_installed() -> bool:
    """Whether the ``he`` extra (TenSEAL, for ``secure_sum.protocol: ckks``) is installed,
    without importing it (nor :mod:`fedmtl.privacy.he`: the settings depend on no mechanism)."""
    import importlib.util

    return importlib.util.find_spec("tenseal") is not None


class DPFedAvgConfig(_Section):
    """Client-level DP-FedAvg (McMahan et al. 2018): each client's released update (base and
    group head) clipped to ``clip_norm``, Gaussian noise ``noise_multiplier``·C on every
    released sum, clients Poisson-sampled at ``training.clients_per_round``, ε at ``delta``
    accounted every round (RDP, dp-accounting)."""

    enabled: bool = Field(False, description="client-level differential privacy (DP-FedAvg)")
    clip_norm: float = Field(
        1.0, gt=0, description="C: each released update is clipped to this L2 norm"
    )
    noise_multiplier: float = Field(
        1.0, gt=0, description="z: noise std on every released sum is z·C"
    )
    delta: float = Field(1e-5, gt=0, lt=1, description="δ of the (ε, δ) guarantee")
    target_epsilon: float | None = Field(
        None,
        gt=0,
        description="refuse to start when the planned rounds would spend more, and stop before",
    )
    adaptive_clip: bool = Field(
        False, description="C follows a quantile of the update norms (Andrew et al. 2021)"
    )
    target_quantile: float = Field(
        0.5, ge=0, le=1, description="adaptive_clip: the norm quantile γ C tracks"
    )
    clip_learning_rate: float = Field(
        0.2, gt=0, description="adaptive_clip: η_C of C ← C·exp(−η_C (b̄ − γ))"
    )


class SecureSumConfig(_Section):
    """The server sees sums only: SecAgg+ masking (Bell et al. 2020) or CKKS homomorphic
    encryption (TenSEAL; a key holder decrypts only the sum)."""

    enabled: bool = Field(False, description="the server sees masked updates and their sum only")
    protocol: Literal["secagg", "ckks"] = Field(
        "secagg",
        description="secagg (SecAgg+ masking) or ckks (TenSEAL CKKS homomorphic encryption; "
        "needs the 'he' extra)",
    )
    range: float = Field(
        1.0, gt=0, description="without dp_fedavg: each update coordinate is clipped to ±this"
    )
    neighbours: int | None = Field(
        None,
        ge=2,
        description="SecAgg+ graph degree k (default: sized for max_dropout, ≥ 2·⌈log2 n⌉+1)",
    )
    max_dropout: float = Field(
        0.1,
        ge=0,
        lt=0.5,
        description="the dropout mid-protocol the default k survives (sum lost with "
        "probability ≤ 1e-4)",
    )
    dropout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="simulated: this fraction of each release's clients drops mid-protocol",
    )

    @model_validator(mode="after")
    def _check_protocol(self) -> "SecureSumConfig":
        if self.enabled and self.protocol == "ckks" and not tenseal_installed():
            raise ValueError(
                "privacy.secure_sum.protocol=ckks needs the optional 'tenseal' package, "
                "which is not installed: pip install -e '.[he]'"
            )
        return self


class DPSGDConfig(_Section):
    """Sample-level DP-SGD inside local training (Opacus): each row's gradient clipped, Gaussian
    noise on every step, each client's own ε accounted (fedmtl/privacy/dpsgd.py)."""

    enabled: bool = Field(False, description="sample-level DP-SGD inside each client's training")
    noise_multiplier: float = Field(
        1.0, gt=0, description="σ: noise std on each step's summed row gradients is σ·max_grad_norm"
    )
    max_grad_norm: float = Field(
        1.0, gt=0, description="each row's gradient is clipped to this L2 norm"
    )
    delta: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="δ of each client's sample-level (ε, δ) (default: dp_fedavg.delta)",
    )
    target_epsilon: float | None = Field(
        None,
        gt=0,
        description="a client whose next round would take its sample-level ε above this sits "
        "the round out (named in the round report) instead",
    )
    accountant: Literal["rdp", "prv"] = Field(
        "rdp",
        description="Opacus accountant of each client's ε: rdp (Rényi DP) or prv (privacy loss "
        "random variables, tighter)",
    )


class EvaluationPrivacyConfig(_Section):
    """What the evaluation releases."""

    client_metrics: bool | None = Field(
        None,
        description="report each client's own metrics (default: only when privacy is off); "
        "off: metrics pooled from the clients' summed confusion counts and error sums",
    )
    noise: float = Field(
        0.0,
        ge=0,
        description="without dp_fedavg: std of Gaussian noise on every summed evaluation count "
        "(no ε is claimed for it); under dp_fedavg use noise_multiplier",
    )
    noise_multiplier: float = Field(
        10.0,
        gt=0,
        description="dp_fedavg: the pooled evaluation of the final model is released once, each "
        "client's statistics clipped to their public bound Δ and N(0, (zΔ)²) added, and the "
        "accountant counts it in ε (rounds before the last release no evaluation)",
    )


#: The flat keys of earlier releases -> their place now (under ``privacy``).
RENAMED: dict[str, str] = {
    "dp": "dp_fedavg.enabled",
    "clip_norm": "dp_fedavg.clip_norm",
    "noise_multiplier": "dp_fedavg.noise_multiplier",
    "delta": "dp_fedavg.delta",
    "target_epsilon": "dp_fedavg.target_epsilon",
    "adaptive_clip": "dp_fedavg.adaptive_clip",
    "target_quantile": "dp_fedavg.target_quantile",
    "clip_learning_rate": "dp_fedavg.clip_learning_rate",
    "secure_aggregation": "secure_sum.enabled",
    "secure_aggregation_protocol": "secure_sum.protocol",
    "secagg_range": "secure_sum.range",
    "secagg_neighbours": "secure_sum.neighbours",
    "secagg_max_dropout": "secure_sum.max_dropout",
    "secagg_dropout": "secure_sum.dropout",
    "client_metrics": "evaluation.client_metrics",
    "evaluation_noise": "evaluation.noise",
    "evaluation_noise_multiplier": "evaluation.noise_multiplier",
    "dp_sgd_noise_multiplier": "dp_sgd.noise_multiplier",
    "dp_sgd_max_grad_norm": "dp_sgd.max_grad_norm",
    "dp_sgd_delta": "dp_sgd.delta",
    "dp_sgd_target_epsilon": "dp_sgd.target_epsilon",
    "dp_sgd_accountant": "dp_sgd.accountant",
}


def renamed(key: str, value: Any = None) -> str | None:
    """The new key (under ``privacy``) of an old flat ``key``, or None. ``dp_sgd`` was a
    switch: a boolean there is the old ``dp_sgd``, now ``dp_sgd.enabled``."""
    if key == "dp_sgd" and isinstance(value, bool):
        return "dp_sgd.enabled"
    return RENAMED.get(key)


def upgrade_privacy(tree: dict[str, Any]) -> dict[str, Any]:
    """``tree`` (the ``privacy`` mapping) with every old flat key moved to its new place, each
    move warned about by name; an old key given beside its new one is an error naming both."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in tree.items()}
    if isinstance(out.get("dp_sgd"), bool):  # the old switch
        out["dp_sgd"] = {"enabled": out["dp_sgd"]}
        _warn("dp_sgd", "dp_sgd.enabled")
    for old in list(out):
        new = renamed(old, out[old])
        if new is None:
            continue
        value = out.pop(old)
        section, key = new.split(".")
        node = out.setdefault(section, {})
        if not isinstance(node, dict):
            raise ValueError(f"privacy.{section} must be a section (a mapping), got {node!r}")
        if key in node:
            raise ValueError(
                f"privacy.{old} and privacy.{new} are both set: privacy.{old} is the old name "
                f"of privacy.{new}; keep only privacy.{new}"
            )
        node[key] = value
        _warn(old, new)
    return out


def _warn(old: str, new: str) -> None:
    warnings.warn(
        f"privacy.{old} is now privacy.{new}; the old key still works but will be removed",
        FutureWarning,
        stacklevel=3,
    )


class PrivacyConfig(_Section):
    """What leaves the clients (docs/privacy.md): client-level DP-FedAvg, a secure sum, DP-SGD
    inside the clients, and what the evaluation releases. ``dp_fedavg`` or ``secure_sum`` turns on
    the release rule: a group with fewer than ``min_group_size`` clients in a round releases no
    sum of its own."""

    dp_fedavg: DPFedAvgConfig = Field(default_factory=DPFedAvgConfig)
    secure_sum: SecureSumConfig = Field(default_factory=SecureSumConfig)
    dp_sgd: DPSGDConfig = Field(default_factory=DPSGDConfig)
    evaluation: EvaluationPrivacyConfig = Field(default_factory=EvaluationPrivacyConfig)
    min_group_size: int = Field(3, ge=2, description="fewest clients in a released sum")
    insecure_seeded_noise: bool = Field(
        False,
        description="TESTS ONLY: draw DP noise and sampling from training.seed, which anyone can "
        "replay; the run's ε is void (tagged privacy_epsilon_void=true on the run and its model "
        "versions)",
    )

    @model_validator(mode="before")
    @classmethod
    def _upgrade(cls, value: Any) -> Any:
        return upgrade_privacy(value) if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _check_releases(self) -> "PrivacyConfig":
        if self.dp and self.evaluation.client_metrics:
            raise ValueError(
                "privacy.evaluation.client_metrics=true with privacy.dp_fedavg: each client's own "
                "metrics would be released outside ε; leave privacy.evaluation.client_metrics "
                "unset (pooled, noised and accounted evaluation) or turn privacy.dp_fedavg off"
            )
        if self.dp and self.evaluation.noise:
            raise ValueError(
                "privacy.evaluation.noise with privacy.dp_fedavg: under DP the evaluation's noise "
                "is privacy.evaluation.noise_multiplier (relative to its sensitivity, and "
                "accounted)"
            )
        return self

    @property
    def dp(self) -> bool:
        """Whether client-level DP-FedAvg is on."""
        return self.dp_fedavg.enabled

    @property
    def secure(self) -> bool:
        """Whether the releases go through a secure sum."""
        return self.secure_sum.enabled

    @property
    def sample_level(self) -> bool:
        """Whether DP-SGD runs inside the clients."""
        return self.dp_sgd.enabled

    @property
    def enabled(self) -> bool:
        """Whether the server-side release rules apply (DP-FedAvg or a secure sum)."""
        return self.dp or self.secure

    @property
    def active(self) -> bool:
        """Whether any privacy mechanism is on (the releases' or DP-SGD inside the clients)."""
        return self.enabled or self.sample_level

    @property
    def mechanism(self) -> str:
        """The run's ``privacy`` tag: none, or the mechanisms joined by +: dp-fedavg, dp-sgd, secagg
        or ckks (the secure sum in use) (e.g. dp-fedavg+secagg, dp-sgd)."""
        parts = (
            (["dp-fedavg"] if self.dp else [])
            + (["dp-sgd"] if self.sample_level else [])
            + ([self.secure_sum.protocol] if self.secure else [])
        )
        return "+".join(parts) or "none"

    @property
    def dp_sgd_delta(self) -> float:
        """DP-SGD's δ: ``dp_sgd.delta``, else ``dp_fedavg.delta``."""
        return self.dp_fedavg.delta if self.dp_sgd.delta is None else self.dp_sgd.delta

    @property
    def per_client_metrics(self) -> bool:
        """Whether each client's own metrics are reported (``evaluation.client_metrics``;
        default: only when no mechanism is on)."""
        chosen = self.evaluation.client_metrics
        return (not self.active) if chosen is None else chosen
