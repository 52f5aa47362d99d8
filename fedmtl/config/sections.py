"""The training sections: ``model``, ``training``, ``algorithm``, ``server``, ``grouping``,
``validation``, ``faults`` and ``runner`` (the data's are :mod:`fedmtl.config.data`, the model
lifecycle's :mod:`fedmtl.config.operations`, privacy's :mod:`fedmtl.config.privacy`). Every
section is frozen: it is validated once and handed as it is to the part of fedmtl it configures."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Base = Literal["mlp", "cnn"]
GroupWeighting = Literal["samples", "uniform", "sqrt"]
Grouping = Literal["column", "ifca", "cluster"]
Method = Literal[
    "fedmtl",
    "local",
    "fedavg",
    "fedavg-ft",
    "fedper",
    "fedrep",
    "lg-fedavg",
    "ditto",
    "pfedme",
    "ifca",
    "fedala",
    "feddbe",
    "gpfl",
    "fedem",
    "fedbabu",
    "fedrod",
    "fedcp",
]
#: methods whose model is not the plain multi-task model (GPFL's conditional valve and class
#: embeddings, FedEM's mixture, FedCP's policy network): the registered model cannot serve them yet
NOT_SERVABLE = ("gpfl", "fedem", "fedcp")
ServerOptimizerName = Literal["fedavg", "fedadam", "fedyogi"]
PersonalFit = Literal["sgd", "map"]
PersonalLambdaSearch = Literal["loo", "off", "cv"]
RunnerKind = Literal["thread", "process", "dask", "ray"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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
        5,
        ge=0,
        description="epochs of training the personal part (fedmtl/FedRep heads, Ditto's "
        "personal model, FedAvg-FT's fine-tuning)",
    )
    batch_size: int = Field(16, ge=1)
    lr: float = Field(0.2, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    min_clients: int = Field(
        2,
        ge=1,
        description="fewest valid clients a run may start with, and fewest updates a round needs",
    )
    client_retries: int = Field(
        2,
        ge=0,
        description="a client whose training raised is retried by Prefect this many times, with "
        "exponential backoff; one that keeps failing is left out of the round and named",
    )
    retry_delay: float = Field(
        0.5, ge=0, description="seconds before the first retry (doubling after)"
    )
    client_timeout: float | None = Field(
        None,
        gt=0,
        description="seconds a client may take before it is cut off for the round (no retry)",
    )
    seed: int = 0
    workdir: str = Field(".fedmtl", description="run state: per-client stores, checkpoints")
    warm_start: Literal["none", "champion"] = Field(
        "none",
        description="champion: start from the registry's champion (its base, heads, personal "
        "heads and round count) when one exists; none: from a fresh initialisation",
    )
    batched: Literal["auto", "on", "off"] = Field(
        "auto",
        description="train a task's clients together (torch.func, fedmtl/client/batched.py): auto: "
        "whenever the method's client round is the shared step (fedmtl, fedavg, fedavg-ft, "
        "FedProx) and the model has no dropout or batch norm; on: the same, else an error naming "
        "why; off: one client at a time",
    )
    clients_per_task: int | None = Field(
        None,
        ge=1,
        description="clients trained by one Prefect task; null: one task per worker "
        "(runner.workers; else the CPU count, or 1 for batched training on threads), at least 8 "
        "clients each on average, balanced by training rows (fedmtl.server.dispatch.shards)",
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
        "map",
        description="fedmtl: fit ψ_c exactly (map: L-BFGS, prior at φ_g) or by personal_epochs "
        "of SGD",
    )
    personal_lambda: float = Field(
        0.3, ge=0, description="fedmtl: precision of the prior pulling ψ_c towards φ_g"
    )
    personal_lambda_search: PersonalLambdaSearch = Field(
        "loo",
        description="fedmtl (personal_fit map): loo: per client and task, the group head, the "
        "group head with the client's own output bias, or its MAP head at personal_lambda, each "
        "step kept where the approximate leave-one-out log-loss on its train rows shows it "
        "better by more than 1.5 standard errors (docs/algorithm.md); off: every client uses "
        "personal_lambda; cv: each client picks its own λ from personal_lambda_grid by 5-fold "
        "cross-validation on its train rows, then refits on all of them (41 fits a client). "
        "personal_lambda is also the λ of clients with fewer than 3 train rows under loo",
    )
    personal_lambda_grid: list[float] = Field(
        [0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0],
        min_length=2,
        description="fedmtl: the λ values personal_lambda_search: cv chooses from (each > 0)",
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
    """The server optimiser (Reddi et al. 2021) and the aggregation rule
    (fedmtl/server/robust.py)."""

    optimizer: ServerOptimizerName = "fedavg"
    lr: float = Field(1.0, gt=0, description="server step η (1 with fedavg = plain averaging)")
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.99, ge=0, lt=1)
    tau: float = Field(1e-3, gt=0, description="adaptivity τ of FedAdam/FedYogi")
    aggregator: Literal["mean", "median", "trimmed_mean", "krum", "multi_krum", "norm_bound"] = (
        Field(
            "mean",
            description="how updates are combined within a group and groups across: the weighted "
            "mean, or a Byzantine-robust rule",
        )
    )
    trim_fraction: float = Field(
        0.2, ge=0, lt=0.5, description="trimmed_mean: share cut at each end"
    )
    byzantine_clients: int | None = Field(
        None,
        ge=0,
        description="krum/multi_krum: f, the Byzantine clients tolerated (null: ⌈20 %⌉ within "
        "Krum's n > 2f + 2)",
    )
    max_update_norm: float | None = Field(
        None,
        gt=0,
        description="norm_bound: each update is scaled to at most this norm (null: the median "
        "norm)",
    )
    max_norm_ratio: float | None = Field(
        10.0,
        gt=1,
        description="bounded influence under every aggregator: an update whose L2 norm exceeds "
        "this multiple of the round's (lower) median update norm is refused, the client named in "
        "the round report (null: off; with privacy on, clipping or secure aggregation's range "
        "bounds updates instead)",
    )


class GroupingConfig(_Section):
    method: Grouping = "column"
    column: str = "group"
    weighting: GroupWeighting = "samples"
    n_groups: int = Field(4, ge=1, description="ifca: k heads; cluster: the most groups tried")
    warmup_rounds: int = Field(
        3, ge=1, description="cluster: rounds in one group before clustering"
    )
    min_silhouette: float = Field(
        0.1, ge=-1, le=1, description="cluster: below this best silhouette, keep one group"
    )


class ValidationConfig(_Section):
    min_train_rows: int = Field(8, ge=1)
    min_test_rows: int = Field(2, ge=1)


class FaultsConfig(_Section):
    """Fault injection, for tests and the reliability benchmark (never needed in production)."""

    client_failure_rate: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="each client training attempt raises with this probability (seeded)",
    )
    straggler_rate: float = Field(
        0.0, ge=0, le=1, description="share of a round's clients that are slow"
    )
    straggler_delay: float = Field(
        0.0, ge=0, description="seconds a slow client takes before it trains"
    )
    byzantine_fraction: float = Field(
        0.0, ge=0, lt=0.5, description="share of the clients that are Byzantine"
    )
    byzantine_attack: Literal["sign_flip", "gaussian", "label_flip"] = Field(
        "sign_flip",
        description="what they do: send −10×Δ, send noise 10× as long as Δ, or train on flipped "
        "labels",
    )

    crash_at_round: int | None = Field(
        None,
        ge=1,
        description="kill the training process (SIGKILL) in the middle of this round (clients "
        "trained and evaluated, nothing logged or checkpointed): what `fedmtl train --resume` "
        "recovers from",
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
    dask_address: str | None = Field(
        None, description="an existing Dask scheduler, e.g. tcp://10.0.0.5:8786"
    )
    ray_address: str | None = Field(
        None,
        description="an existing Ray cluster, e.g. ray://10.0.0.5:10001, 10.0.0.5:6379 or auto",
    )
    torch_threads: int | None = Field(
        None,
        ge=1,
        description="torch threads per worker process (default: 1 for process/dask/ray, torch's "
        "own for thread)",
    )

    @model_validator(mode="after")
    def _check(self) -> "RunnerConfig":
        if self.dask_address and self.kind != "dask":
            raise ValueError(
                f"runner.dask_address is set but runner.kind is '{self.kind}': set runner.kind=dask"
            )
        if self.ray_address and self.kind != "ray":
            raise ValueError(
                f"runner.ray_address is set but runner.kind is '{self.kind}': set runner.kind=ray"
            )
        return self
