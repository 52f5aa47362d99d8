"""The model lifecycle's sections: ``tracking`` (MLflow), ``coldstart`` (a new client's own
head), ``promotion`` (the gates to champion) and ``schedule`` (recurring runs)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from fedmtl.config.sections import _Section

PromotionMetric = Literal["f1", "accuracy", "precision", "recall", "mae", "rmse"]


class TrackingConfig(_Section):
    tracking_uri: str = "sqlite:///mlflow/mlflow.db"
    artifact_root: str = "mlflow/artifacts"
    experiment: str = "fedmtl"
    registered_model: str = "fedmtl-personalized"
    register_model: bool = True
    client_runs: bool = Field(True, description="a child run per client with its metrics")
    max_client_runs: int = Field(
        50,
        ge=0,
        description="above this many clients, per-client metrics go to the table artifact "
        "clients/rounds.csv instead of child runs",
    )
    bundle_personal_heads: bool = Field(
        False,
        description="opt-in: publish every client's personal heads (and personal bases) inside the "
        "registered model; off: they stay on the clients (each fits its own, `fedmtl personalize`) "
        "and the model answers a known client with its group's heads, else the global heads. "
        "Refused with privacy.dp_fedavg.enabled or privacy.dp_sgd.enabled (the personal parts are "
        "fitted outside ε)",
    )
    metrics_file: str = "metrics.json"


class ColdStartConfig(_Section):
    """A client that took no part in training (``fedmtl personalize``, the pyfunc given labels):
    it picks the group head with the lowest loss on its k labelled rows, then fine-tunes its
    own head from it on those rows, the base frozen (fedmtl/lifecycle/coldstart.py). The defaults,
    a gentle fine-tune (10 full-batch steps at k <= 32, lr 0.02, pulled back to the group head by
    μ = 1),
    did as well as any setting tried by benchmarks/coldstart.py at k = 5..20; longer or faster
    fine-tunes without the pull overfit the k rows and lost up to 1.6 points."""

    epochs: int = Field(
        10, ge=0, description="passes over the labelled rows (0 = the chosen group head as is)"
    )
    lr: float = Field(0.02, gt=0, description="learning rate of the head fine-tune")
    batch_size: int = Field(
        32, ge=1, description="rows per step (k <= batch_size: one full-batch step per epoch)"
    )
    prox_mu: float = Field(
        1.0, ge=0, description="pull of the fine-tuned head towards the group head"
    )
    seed: int = Field(0, description="seeds the fine-tune's draws (with the client id)")

    @model_validator(mode="after")
    def _check(self) -> "ColdStartConfig":
        if self.lr * self.prox_mu >= 1:
            raise ValueError(
                "coldstart.lr × coldstart.prox_mu must be below 1 "
                f"(got {self.lr} × {self.prox_mu}): "
                "a larger pull towards the group head overshoots it at every step and diverges"
            )
        return self


class PromotionConfig(_Section):
    """The gates a challenger must pass to become the registry's ``champion`` (``fedmtl
    promote``). Both models answer every client's held-out rows through their own routing;
    ``metric`` is the client's personalised score on ``task`` (default: the first task)."""

    metric: PromotionMetric = Field(
        "f1", description="per-client score compared: macro-F1, accuracy (or mae/rmse)"
    )
    task: str | None = Field(
        None, description="the task whose metric is compared (default: the first)"
    )
    min_gain: float = Field(
        0.0, description="the challenger's client mean must beat the champion's by this much"
    )
    max_client_regression: float = Field(
        0.05,
        ge=0,
        description="no client may score worse than under the champion by more than this",
    )
    worst_fraction: float = Field(
        0.1, gt=0, le=1, description="the worst clients' mean (this fraction of them) must not drop"
    )
    min_metric: float | None = Field(
        0.5,
        description="absolute gate: the challenger's client mean must reach this (also for the "
        "first champion)",
    )
    max_quarantined_fraction: float = Field(
        0.25,
        ge=0,
        le=1,
        description="absolute gate: at most this fraction of clients failed validation",
    )
    max_epsilon: float = Field(
        10.0,
        gt=0,
        description="absolute gate when privacy is on: the run's spent ε must not exceed this",
    )


class ScheduleConfig(_Section):
    """Scheduled recurring training (``fedmtl schedule``, ``prefect.yaml``): each run brings the
    data to its latest DVC version, then trains, continuing from the champion."""

    deployment: str = Field(
        "nightly", description="the Prefect deployment's name (fedmtl-scheduled/<name>)"
    )
    warm_start: Literal["none", "champion"] = Field(
        "champion",
        description="training.warm_start of scheduled runs: continue from the registry's champion",
    )
    refresh_data: bool = Field(
        True,
        description="re-run the DVC data stages (prepare, partition, validate) before training",
    )
    push_data: bool = Field(
        True, description="dvc push the new data version when a DVC remote is configured"
    )
    promote: bool = Field(
        True,
        description="after training, judge the new version with the promotion gates "
        "(fedmtl promote)",
    )
