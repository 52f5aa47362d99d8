"""The one configuration model of fedmtl, stored as ``params.yaml`` (DVC's parameter file).

Every setting lives here, in sections: ``data``, ``model``, ``training``, ``algorithm``,
``server``, ``grouping``, ``validation``, ``tracking``, ``coldstart`` and ``promotion``.
``load_config`` reads a YAML file, applies ``key=value`` overrides and validates the result;
every error names the key at fault and, for choices, the allowed values (:class:`ConfigError`).
"""

from __future__ import annotations

from difflib import get_close_matches
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

Source = Literal["digits", "synthetic", "table", "har"]
Scheme = Literal["iid", "dirichlet", "shards", "label-permutation", "rotation"]
Base = Literal["mlp", "cnn"]
GroupWeighting = Literal["samples", "uniform", "sqrt"]
Grouping = Literal["column", "ifca", "cluster"]
Method = Literal[
    "fedmtl", "local", "fedavg", "fedavg-ft", "fedper", "fedrep", "lg-fedavg", "ditto", "pfedme", "ifca"
]
ServerOptimizerName = Literal["fedavg", "fedadam", "fedyogi"]
TaskKind = Literal["classification", "regression"]
PersonalFit = Literal["sgd", "map"]
PersonalLambdaSearch = Literal["off", "cv"]
HarWindows = Literal["segment", "session"]
RunnerKind = Literal["thread", "process", "dask", "ray"]
PromotionMetric = Literal["f1", "accuracy", "precision", "recall", "mae", "rmse"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PartitionConfig(_Section):
    """How the prepared data set is split into clients (only for the built-in sources)."""

    scheme: Scheme = "label-permutation"
    n_clients: int = Field(20, ge=1)
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration (scheme=dirichlet)")
    shards_per_client: int = Field(2, ge=1, description="classes per client (scheme=shards)")
    n_groups: int = Field(
        4, ge=1, description="groups (scheme=label-permutation: any; rotation: 1..4)"
    )


class SyntheticConfig(_Section):
    """FedProx's Synthetic(alpha, beta) generator (Li et al. 2020)."""

    alpha: float = Field(0.5, ge=0)
    beta: float = Field(0.5, ge=0)
    n_clients: int = Field(30, ge=1)
    n_features: int = Field(60, ge=1)
    n_classes: int = Field(10, ge=2)
    size_scale: float = Field(1.0, gt=0, description="multiplies each client's lognormal size")
    n_tasks: int = Field(
        1, ge=1, le=4, description="label columns: label, then label_1 (binary), label_2, ..."
    )


class TableConfig(_Section):
    """The user's own CSV or Parquet file: one row per example, a column naming its client."""

    path: str | None = None
    client_column: str = "client"
    label_columns: list[str] = Field(default_factory=lambda: ["label"], min_length=1)
    group_column: str | None = None
    feature_columns: list[str] | None = Field(
        None, description="default: every other numeric column"
    )
    task_kinds: dict[str, TaskKind] = Field(
        default_factory=dict, description="per label column; default classification"
    )


class HarConfig(_Section):
    """UCI HAPT smartphone recordings (``pip install 'fedmtl[har]'``): one client per user."""

    window: int = Field(128, ge=8, description="samples per window (50 Hz: 128 = 2.56 s)")
    overlap: float = Field(0.5, ge=0, lt=1, description="overlap of consecutive windows")
    windows: HarWindows = Field(
        "segment",
        description="segment: inside each labelled activity segment (HAPT's own windows); "
        "session: across the whole session, labelled by majority",
    )
    transition_task: bool = Field(True, description="add the is_transition task")
    max_users: int | None = Field(None, ge=1, description="keep only the first N users")


class DataConfig(_Section):
    source: Source = "digits"
    seed: int = 0
    test_fraction: float = Field(0.25, gt=0, lt=1)
    raw_dir: str = "data/raw"
    partitions_dir: str = "data/partitions"
    validation_dir: str = "data/validation"
    partition: PartitionConfig = Field(default_factory=PartitionConfig)
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)
    table: TableConfig = Field(default_factory=TableConfig)
    har: HarConfig = Field(default_factory=HarConfig)

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        if self.source == "table" and not self.table.path:
            raise ValueError("data.table.path must be set when data.source is 'table'")
        if self.partition.scheme == "rotation" and self.partition.n_groups > 4:
            raise ValueError("data.partition.n_groups must be 1..4 for scheme 'rotation'")
        return self


class ModelConfig(_Section):
    base: Base = "mlp"
    hidden: list[int] = Field(
        default_factory=lambda: [128, 64],
        description="widths of the base's layers; [] with mlp = multinomial logistic regression",
    )
    dropout: float = Field(0.0, ge=0, lt=1)
    cnn_channels: list[int] = Field(default_factory=lambda: [16, 32], min_length=1)

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        if self.base == "cnn" and not self.hidden:
            raise ValueError("model.hidden must name at least one width for base 'cnn'")
        if any(h < 1 for h in self.hidden):
            raise ValueError(f"model.hidden widths must be positive, got {self.hidden}")
        return self


class TrainingConfig(_Section):
    rounds: int = Field(30, ge=1)
    clients_per_round: float = Field(
        1.0, gt=0, description="a fraction (<=1) or a count (>1) of the clients, sampled per round"
    )
    local_epochs: int = Field(5, ge=1)
    personal_epochs: int = Field(
        5, ge=0, description="epochs of training the personal part (fedmtl/FedRep heads, Ditto's "
        "personal model, FedAvg-FT's fine-tuning)"
    )
    batch_size: int = Field(16, ge=1)
    lr: float = Field(0.2, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    min_clients: int = Field(
        2, ge=1, description="fewest valid clients a run may start with, and fewest updates a round needs"
    )
    client_retries: int = Field(
        2, ge=0, description="a client whose training raised is retried by Prefect this many times, with "
        "exponential backoff; one that keeps failing is left out of the round and named"
    )
    retry_delay: float = Field(0.5, ge=0, description="seconds before the first retry (doubling after)")
    client_timeout: float | None = Field(
        None, gt=0, description="seconds a client may take before it is cut off for the round (no retry)"
    )
    seed: int = 0
    workdir: str = Field(".fedmtl", description="run state: per-client stores, checkpoints")
    warm_start: Literal["none", "champion"] = Field(
        "none", description="champion: start from the registry's champion (its base, heads, personal "
        "heads and round count) when one exists; none: from a fresh initialisation"
    )
    batched: Literal["auto", "on", "off"] = Field(
        "auto", description="train a task's clients together (torch.func, fedmtl/client/batched.py): auto: "
        "whenever the method's client round is the shared step (fedmtl, fedavg, fedavg-ft, FedProx) and "
        "the model has no dropout or batch norm; on: the same, else an error naming why; off: one client "
        "at a time"
    )
    clients_per_task: int | None = Field(
        None, ge=1, description="clients trained by one Prefect task; null: one task per worker "
        "(runner.workers; else the CPU count, or 1 for batched training on threads), at least 8 "
        "clients each on average, balanced by training rows (fedmtl.server.dispatch.shards)"
    )

    @field_validator("batched", mode="before")
    @classmethod
    def _on_off(cls, value: Any) -> Any:
        """YAML reads a bare on/off as a boolean."""
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


class AlgorithmConfig(_Section):
    """The federated method and its own settings (docs/algorithm.md)."""

    method: Method = "fedmtl"
    prox_mu: float = Field(0.0, ge=0, description="FedProx μ on the shared local objective")
    personal_fit: PersonalFit = Field(
        "map", description="fedmtl: fit ψ_c exactly (map: L-BFGS, prior at φ_g) or by personal_epochs of SGD"
    )
    personal_lambda: float = Field(
        0.3, ge=0, description="fedmtl: precision of the prior pulling ψ_c towards φ_g"
    )
    personal_lambda_search: PersonalLambdaSearch = Field(
        "off", description="fedmtl (personal_fit map): off: every client uses personal_lambda; cv: each "
        "client picks its own λ from personal_lambda_grid by 5-fold cross-validation on its train rows "
        "(least log-loss on the left-out folds), then refits on all of them (fedmtl/client/personal.py; personal_lambda "
        "for clients with fewer than 10 train rows). cv gains up to 1.4 points (docs/quality.md) for 41 fits "
        "per client and evaluation instead of 1: opt in where the evaluation cost is small"
    )
    personal_lambda_grid: list[float] = Field(
        [0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0], min_length=2,
        description="fedmtl: the λ values personal_lambda_search: cv chooses from (each > 0)"
    )
    ditto_lambda: float = Field(0.1, ge=0, description="Ditto: λ of λ/2·‖v − w‖²")
    pfedme_lambda: float = Field(15.0, gt=0, description="pFedMe: λ of the Moreau envelope")
    pfedme_inner_steps: int = Field(5, ge=1, description="pFedMe: K steps per mini-batch")
    pfedme_personal_lr: float = Field(0.05, gt=0, description="pFedMe: personal learning rate")

    @field_validator("personal_lambda_search", mode="before")
    @classmethod
    def _off_from_yaml(cls, value: object) -> object:
        return "off" if value is False else value  # YAML 1.1 reads a bare off as false

    @field_validator("personal_lambda_grid")
    @classmethod
    def _positive_grid(cls, value: list[float]) -> list[float]:
        if any(not v > 0 for v in value):
            raise ValueError(f"every value of personal_lambda_grid must be > 0, got {value}")
        return value


class ServerConfig(_Section):
    """The server optimiser (Reddi et al. 2021) and the aggregation rule (fedmtl/server/robust.py)."""

    optimizer: ServerOptimizerName = "fedavg"
    lr: float = Field(1.0, gt=0, description="server step η (1 with fedavg = plain averaging)")
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.99, ge=0, lt=1)
    tau: float = Field(1e-3, gt=0, description="adaptivity τ of FedAdam/FedYogi")
    aggregator: Literal["mean", "median", "trimmed_mean", "krum", "multi_krum", "norm_bound"] = Field(
        "mean", description="how updates are combined within a group and groups across: the weighted "
        "mean, or a Byzantine-robust rule"
    )
    trim_fraction: float = Field(0.2, ge=0, lt=0.5, description="trimmed_mean: share cut at each end")
    byzantine_clients: int | None = Field(
        None, ge=0, description="krum/multi_krum: f, the Byzantine clients tolerated (null: ⌈20 %⌉ within Krum's n > 2f + 2)"
    )
    max_update_norm: float | None = Field(
        None, gt=0, description="norm_bound: each update is scaled to at most this norm (null: the median norm)"
    )
    max_norm_ratio: float | None = Field(
        10.0, gt=1, description="bounded influence under every aggregator: an update whose L2 norm exceeds this "
        "multiple of the round's (lower) median update norm is refused, the client named in the round report "
        "(null: off; with privacy on, clipping or secure aggregation's range bounds updates instead)"
    )


class GroupingConfig(_Section):
    method: Grouping = "column"
    column: str = "group"
    weighting: GroupWeighting = "samples"
    n_groups: int = Field(4, ge=1, description="ifca: k heads; cluster: the most groups tried")
    warmup_rounds: int = Field(3, ge=1, description="cluster: rounds in one group before clustering")
    min_silhouette: float = Field(
        0.1, ge=-1, le=1, description="cluster: below this best silhouette, keep one group"
    )


class ValidationConfig(_Section):
    min_train_rows: int = Field(8, ge=1)
    min_test_rows: int = Field(2, ge=1)


class TrackingConfig(_Section):
    tracking_uri: str = "sqlite:///mlflow/mlflow.db"
    artifact_root: str = "mlflow/artifacts"
    experiment: str = "fedmtl"
    registered_model: str = "fedmtl-personalized"
    register_model: bool = True
    client_runs: bool = Field(True, description="a child run per client with its metrics")
    max_client_runs: int = Field(
        50, ge=0, description="above this many clients, per-client metrics go to the table artifact "
        "clients/rounds.csv instead of child runs"
    )
    bundle_personal_heads: bool = Field(
        False, description="opt-in: publish every client's personal heads (and personal bases) inside the "
        "registered model; off: they stay on the clients (each fits its own, `fedmtl personalize`) and the "
        "model answers a known client with its group's heads, else the global heads. Refused with privacy.dp "
        "or privacy.dp_sgd (the personal parts are fitted outside ε)"
    )
    metrics_file: str = "metrics.json"


class ColdStartConfig(_Section):
    """A client that took no part in training (``fedmtl personalize``, the pyfunc given labels):
    it picks the group head with the lowest loss on its k labelled rows, then fine-tunes its
    own head from it on those rows, the base frozen (fedmtl/lifecycle/coldstart.py). The defaults, a gentle
    fine-tune (10 full-batch steps at k <= 32, lr 0.02, pulled back to the group head by μ = 1),
    did as well as any setting tried by benchmarks/coldstart.py at k = 5..20; longer or faster
    fine-tunes without the pull overfit the k rows and lost up to 1.6 points."""

    epochs: int = Field(10, ge=0, description="passes over the labelled rows (0 = the chosen group head as is)")
    lr: float = Field(0.02, gt=0, description="learning rate of the head fine-tune")
    batch_size: int = Field(32, ge=1, description="rows per step (k <= batch_size: one full-batch step per epoch)")
    prox_mu: float = Field(1.0, ge=0, description="pull of the fine-tuned head towards the group head")
    seed: int = Field(0, description="seeds the fine-tune's draws (with the client id)")

    @model_validator(mode="after")
    def _check(self) -> "ColdStartConfig":
        if self.lr * self.prox_mu >= 1:
            raise ValueError(
                f"coldstart.lr × coldstart.prox_mu must be below 1 (got {self.lr} × {self.prox_mu}): "
                "a larger pull towards the group head overshoots it at every step and diverges"
            )
        return self


class PromotionConfig(_Section):
    """The gates a challenger must pass to become the registry's ``champion`` (``fedmtl
    promote``). Both models answer every client's held-out rows through their own routing;
    ``metric`` is the client's personalised score on ``task`` (default: the first task)."""

    metric: PromotionMetric = Field("f1", description="per-client score compared: macro-F1, accuracy (or mae/rmse)")
    task: str | None = Field(None, description="the task whose metric is compared (default: the first)")
    min_gain: float = Field(0.0, description="the challenger's client mean must beat the champion's by this much")
    max_client_regression: float = Field(
        0.05, ge=0, description="no client may score worse than under the champion by more than this"
    )
    worst_fraction: float = Field(
        0.1, gt=0, le=1, description="the worst clients' mean (this fraction of them) must not drop"
    )
    min_metric: float | None = Field(
        0.5, description="absolute gate: the challenger's client mean must reach this (also for the first champion)"
    )
    max_quarantined_fraction: float = Field(
        0.25, ge=0, le=1, description="absolute gate: at most this fraction of clients failed validation"
    )
    max_epsilon: float = Field(
        10.0, gt=0, description="absolute gate when privacy is on: the run's spent ε must not exceed this"
    )


class ScheduleConfig(_Section):
    """Scheduled recurring training (``fedmtl schedule``, ``prefect.yaml``): each run brings the
    data to its latest DVC version, then trains, continuing from the champion."""

    deployment: str = Field("nightly", description="the Prefect deployment's name (fedmtl-scheduled/<name>)")
    warm_start: Literal["none", "champion"] = Field(
        "champion", description="training.warm_start of scheduled runs: continue from the registry's champion"
    )
    refresh_data: bool = Field(
        True, description="re-run the DVC data stages (prepare, partition, validate) before training"
    )
    push_data: bool = Field(True, description="dvc push the new data version when a DVC remote is configured")
    promote: bool = Field(
        True, description="after training, judge the new version with the promotion gates (fedmtl promote)"
    )


class FaultsConfig(_Section):
    """Fault injection, for tests and the reliability benchmark (never needed in production)."""

    client_failure_rate: float = Field(
        0.0, ge=0, lt=1, description="each client training attempt raises with this probability (seeded)"
    )
    straggler_rate: float = Field(0.0, ge=0, le=1, description="share of a round's clients that are slow")
    straggler_delay: float = Field(0.0, ge=0, description="seconds a slow client takes before it trains")
    byzantine_fraction: float = Field(0.0, ge=0, lt=0.5, description="share of the clients that are Byzantine")
    byzantine_attack: Literal["sign_flip", "gaussian", "label_flip"] = Field(
        "sign_flip", description="what they do: send −10×Δ, send noise 10× as long as Δ, or train on flipped labels"
    )

    crash_at_round: int | None = Field(
        None, ge=1, description="kill the training process (SIGKILL) in the middle of this round (clients "
        "trained and evaluated, nothing logged or checkpointed): what `fedmtl train --resume` recovers from"
    )


class RunnerConfig(_Section):
    """Where a round's client tasks run (Prefect task runners). ``thread`` (default): threads
    of the flow's process; ``process``: a pool of local processes; ``dask``: a Dask cluster
    through prefect-dask (``pip install 'fedmtl[dask]'``), a ``distributed.LocalCluster`` of
    ``workers`` processes unless ``dask_address`` names an existing scheduler; ``ray``: Ray
    through prefect-ray (``pip install 'fedmtl[ray]'``), a local instance of ``workers`` CPUs
    unless ``ray_address`` names an existing cluster."""

    kind: RunnerKind = "thread"
    workers: int | None = Field(
        None, ge=1, description="threads/processes/Dask workers/Ray CPUs (default: the CPU count)"
    )
    dask_address: str | None = Field(None, description="an existing Dask scheduler, e.g. tcp://10.0.0.5:8786")
    ray_address: str | None = Field(
        None, description="an existing Ray cluster, e.g. ray://10.0.0.5:10001, 10.0.0.5:6379 or auto"
    )
    torch_threads: int | None = Field(
        None, ge=1,
        description="torch threads per worker process (default: 1 for process/dask/ray, torch's own for thread)",
    )

    @model_validator(mode="after")
    def _check(self) -> "RunnerConfig":
        if self.dask_address and self.kind != "dask":
            raise ValueError(f"runner.dask_address is set but runner.kind is '{self.kind}': set runner.kind=dask")
        if self.ray_address and self.kind != "ray":
            raise ValueError(f"runner.ray_address is set but runner.kind is '{self.kind}': set runner.kind=ray")
        return self


def tenseal_installed() -> bool:
    """Whether the ``he`` extra (TenSEAL, for ``secure_aggregation_protocol: ckks``) is installed,
    without importing it (nor :mod:`fedmtl.privacy.he`: the settings depend on no mechanism)."""
    import importlib.util

    return importlib.util.find_spec("tenseal") is not None


class PrivacyConfig(_Section):
    """What leaves the clients (docs/privacy.md). ``dp``: client-level DP-FedAvg — each
    client's released update (base and group head) clipped to ``clip_norm``, Gaussian noise
    ``noise_multiplier``·C on every released sum, clients Poisson-sampled at
    ``training.clients_per_round``, ε at ``delta`` accounted every round (RDP, dp-accounting).
    ``secure_aggregation``: SecAgg+ (or CKKS homomorphic encryption,
    ``secure_aggregation_protocol``) inside every release, so the server only sees sums.
    Either one turns on the release rule: a group with fewer than ``min_group_size`` clients
    in a round releases no sum of its own."""

    dp: bool = Field(False, description="client-level differential privacy (DP-FedAvg)")
    clip_norm: float = Field(1.0, gt=0, description="C: each released update is clipped to this L2 norm")
    noise_multiplier: float = Field(1.0, gt=0, description="z: noise std on every released sum is z·C")
    delta: float = Field(1e-5, gt=0, lt=1, description="δ of the (ε, δ) guarantee")
    target_epsilon: float | None = Field(
        None, gt=0, description="refuse to start when the planned rounds would spend more, and stop before"
    )
    adaptive_clip: bool = Field(False, description="C follows a quantile of the update norms (Andrew et al. 2021)")
    target_quantile: float = Field(0.5, ge=0, le=1, description="adaptive_clip: the norm quantile γ C tracks")
    clip_learning_rate: float = Field(0.2, gt=0, description="adaptive_clip: η_C of C ← C·exp(−η_C (b̄ − γ))")
    secure_aggregation: bool = Field(False, description="SecAgg+: the server sees masked updates and their sum only")
    secure_aggregation_protocol: Literal["secagg", "ckks"] = Field(
        "secagg", description="the secure sum when secure_aggregation is on: secagg (SecAgg+ masking) or ckks "
        "(TenSEAL CKKS homomorphic encryption, a key holder decrypts only the sum; needs the 'he' extra)"
    )
    secagg_range: float = Field(
        1.0, gt=0, description="secure aggregation without dp: each update coordinate is clipped to ±this"
    )
    secagg_neighbours: int | None = Field(
        None, ge=2, description="SecAgg+ graph degree k (default: sized for secagg_max_dropout, ≥ 2·⌈log2 n⌉+1)"
    )
    secagg_max_dropout: float = Field(
        0.1, ge=0, lt=0.5,
        description="the dropout mid-protocol the default k survives (sum lost with probability ≤ 1e-4)",
    )
    secagg_dropout: float = Field(
        0.0, ge=0, lt=1, description="simulated: this fraction of each release's clients drops mid-protocol"
    )
    min_group_size: int = Field(3, ge=2, description="fewest clients in a released sum")
    client_metrics: bool | None = Field(
        None, description="report each client's own metrics (default: only when privacy is off); "
        "off: metrics pooled from the clients' summed confusion counts and error sums"
    )
    evaluation_noise: float = Field(
        0.0, ge=0, description="without dp: std of Gaussian noise on every summed evaluation count (no ε "
        "is claimed for it); under dp use evaluation_noise_multiplier"
    )
    evaluation_noise_multiplier: float = Field(
        10.0, gt=0, description="dp: the pooled evaluation of the final model is released once, each client's "
        "statistics clipped to their public bound Δ and N(0, (zΔ)²) added, and the accountant counts it in ε "
        "(rounds before the last release no evaluation)"
    )
    insecure_seeded_noise: bool = Field(
        False, description="TESTS ONLY: draw DP noise and sampling from training.seed, which anyone can "
        "replay; the run's ε is void (tagged privacy_epsilon_void=true on the run and its model versions)"
    )
    dp_sgd: bool = Field(
        False, description="sample-level DP-SGD inside local training (Opacus): each row's gradient "
        "clipped, Gaussian noise on every step, each client's own ε accounted (fedmtl/privacy/dpsgd.py)"
    )
    dp_sgd_noise_multiplier: float = Field(
        1.0, gt=0, description="σ: noise std on each step's summed row gradients is σ·dp_sgd_max_grad_norm"
    )
    dp_sgd_max_grad_norm: float = Field(1.0, gt=0, description="each row's gradient is clipped to this L2 norm")
    dp_sgd_delta: float | None = Field(
        None, gt=0, lt=1, description="δ of each client's sample-level (ε, δ) (default: privacy.delta)"
    )
    dp_sgd_target_epsilon: float | None = Field(
        None, gt=0, description="a client whose next round would take its sample-level ε above this sits "
        "the round out (named in the round report) instead"
    )
    dp_sgd_accountant: Literal["rdp", "prv"] = Field(
        "rdp", description="Opacus accountant of each client's ε: rdp (Rényi DP) or prv (privacy loss "
        "random variables, tighter)"
    )

    @model_validator(mode="after")
    def _check_releases(self) -> "PrivacyConfig":
        if self.dp and self.client_metrics:
            raise ValueError("privacy.client_metrics=true with privacy.dp: each client's own metrics would be "
                             "released outside ε; leave privacy.client_metrics unset (pooled, noised and "
                             "accounted evaluation) or turn privacy.dp off")
        if self.dp and self.evaluation_noise:
            raise ValueError("privacy.evaluation_noise with privacy.dp: under DP the evaluation's noise is "
                             "privacy.evaluation_noise_multiplier (relative to its sensitivity, and accounted)")
        return self

    @model_validator(mode="after")
    def _check_protocol(self) -> "PrivacyConfig":
        if self.secure_aggregation and self.secure_aggregation_protocol == "ckks":
            if not tenseal_installed():
                raise ValueError("privacy.secure_aggregation_protocol=ckks needs the optional 'tenseal' "
                                 "package, which is not installed: pip install -e '.[he]'")
        return self

    @property
    def enabled(self) -> bool:
        """Whether the server-side release rules apply (DP-FedAvg or secure aggregation)."""
        return self.dp or self.secure_aggregation

    @property
    def active(self) -> bool:
        """Whether any privacy mechanism is on (the releases' or DP-SGD inside the clients)."""
        return self.enabled or self.dp_sgd

    @property
    def mechanism(self) -> str:
        """The run's ``privacy`` tag: none, or the mechanisms joined by +: dp-fedavg, dp-sgd, secagg
        or ckks (the secure sum in use) (e.g. dp-fedavg+secagg, dp-sgd)."""
        parts = ((["dp-fedavg"] if self.dp else []) + (["dp-sgd"] if self.dp_sgd else [])
                 + ([self.secure_aggregation_protocol] if self.secure_aggregation else []))
        return "+".join(parts) or "none"

    @property
    def dp_sgd_delta_value(self) -> float:
        """DP-SGD's δ: ``dp_sgd_delta``, else ``delta``."""
        return self.delta if self.dp_sgd_delta is None else self.dp_sgd_delta

    @property
    def per_client_metrics(self) -> bool:
        return (not self.active) if self.client_metrics is None else self.client_metrics


class Config(_Section):
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    grouping: GroupingConfig = Field(default_factory=GroupingConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    coldstart: ColdStartConfig = Field(default_factory=ColdStartConfig)
    promotion: PromotionConfig = Field(default_factory=PromotionConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    runner: RunnerConfig = Field(default_factory=RunnerConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    faults: FaultsConfig = Field(default_factory=FaultsConfig)

    @model_validator(mode="after")
    def _check_dp_sgd(self) -> "Config":
        if not self.privacy.dp_sgd:
            return self
        problem = dp_sgd_blocker(self.algorithm.method, self.grouping.method)
        if problem is None and self.training.batched == "on":
            problem = ("training.batched=on with privacy.dp_sgd: DP-SGD clips each row's gradient "
                       "(Opacus per-sample gradients), which the batched step (torch.func over clients) does "
                       "not compute; use training.batched=auto or off")
        if problem is not None:
            raise ValueError(problem)
        return self

    @model_validator(mode="after")
    def _check_bundled_personal_heads(self) -> "Config":
        on = [k for k, v in (("privacy.dp", self.privacy.dp), ("privacy.dp_sgd", self.privacy.dp_sgd)) if v]
        if self.tracking.bundle_personal_heads and on:
            raise ValueError(
                f"tracking.bundle_personal_heads=true with {' and '.join(on)}=true: every client's personal heads "
                "(and personal bases) are fitted on its own rows outside the DP guarantee (ε) and would be "
                "published in the registered model; set tracking.bundle_personal_heads=false (clients fit and "
                "keep their own heads: `fedmtl personalize`), or turn privacy.dp and privacy.dp_sgd off")
        return self

    def flat(self) -> dict[str, Any]:
        """Every setting as ``section.key`` -> value (for MLflow params and DVC)."""
        return flatten(self.model_dump(mode="json"))


def dp_sgd_blocker(method: str, grouping: str) -> str | None:
    """Why ``privacy.dp_sgd`` cannot give its guarantee with this method and grouping, or None.
    (Methods that group clients: fedmtl, which groups by ``grouping.method``, and IFCA.)"""
    if method == "pfedme":
        return ("algorithm.method=pfedme with privacy.dp_sgd: pFedMe's client loop (K inner steps per "
                "batch on a personal model) is its own and is not made private; use another method")
    if method == "ifca" or (method == "fedmtl" and grouping in ("ifca", "cluster")):
        how = "algorithm.method=ifca" if method == "ifca" else f"grouping.method={grouping}"
        return (f"{how} with privacy.dp_sgd: a client would pick its group from the loss of every one of "
                "its rows, a choice released outside the sample-level ε; use grouping.method=column")
    return None


class ConfigError(ValueError):
    """An invalid setting; the message names the key and what is allowed."""


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _allowed_keys(model: type[BaseModel]) -> list[str]:
    return sorted(model.model_fields)


def _section(parts: list[str]) -> type[BaseModel] | None:
    """The settings model at ``parts`` (a path of section names), or None if there is none."""
    model: type[BaseModel] = Config
    for part in parts:
        field = model.model_fields.get(part)
        annotation = field.annotation if field is not None else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def _unknown(dotted: str, model: type[BaseModel] | None) -> str:
    """``unknown setting 'a.b'``, with the closest allowed key and the allowed keys."""
    message = f"unknown setting '{dotted}'"
    if model is None:
        return message
    prefix, _, key = dotted.rpartition(".")
    allowed = _allowed_keys(model)
    close = get_close_matches(key, allowed, n=1, cutoff=0.6)
    if close:
        message += f" (did you mean '{prefix + '.' if prefix else ''}{close[0]}'?)"
    where = f"keys in '{prefix}'" if prefix else "sections"
    return f"{message}; allowed {where}: {', '.join(allowed)}"


def _set_key(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b.c`` in a nested dict, checking every part against the Config schema."""
    parts = dotted.split(".")
    model: type[BaseModel] | None = Config
    node = tree
    for depth, part in enumerate(parts):
        here = ".".join(parts[: depth + 1])
        if model is not None and part not in model.model_fields:
            raise ConfigError(_unknown(here, model))
        if depth == len(parts) - 1:
            node[part] = value
            return
        annotation = model.model_fields[part].annotation if model is not None else None
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
        if model is None:
            raise ConfigError(f"setting '{here}' is a value, not a section: cannot set '{dotted}'")
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` with the value read as YAML (numbers, booleans, lists)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key=value, e.g. training.rounds=5")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _describe(error: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in error["loc"] if not str(p).startswith("function-"))
    msg = error["msg"]
    if error.get("type") == "extra_forbidden":
        return _unknown(loc, _section([str(p) for p in error["loc"][:-1]]))
    if error.get("type") == "literal_error":
        expected = error.get("ctx", {}).get("expected", "")
        return f"setting '{loc}' = {error.get('input')!r} is not allowed; allowed values: {expected}"
    if not loc:
        return msg.removeprefix("Value error, ")
    return f"setting '{loc}' = {error.get('input')!r}: {msg}"


def validate_config(tree: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        lines = [_describe(e) for e in exc.errors()]
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read ``path`` (default: built-in defaults), apply ``key=value`` overrides, validate."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"parameter file '{path}' does not exist")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"parameter file '{path}' is not valid YAML: {exc}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"parameter file '{path}' must hold a mapping of sections")
    for text in overrides or []:
        key, value = parse_override(text)
        _set_key(tree, key, value)
    return validate_config(tree)


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)

