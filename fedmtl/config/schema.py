"""The whole configuration (:class:`Config`, stored as ``params.yaml``) and how it is read:
``load_config`` reads a YAML file, applies ``key=value`` overrides and validates the result once;
every error names the key at fault and, for choices, the allowed values (:class:`ConfigError`)."""

from __future__ import annotations

import warnings
from difflib import get_close_matches
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from fedmtl.config.data import DataConfig
from fedmtl.config.federation import FederationConfig
from fedmtl.config.operations import (
    ColdStartConfig,
    PromotionConfig,
    ScheduleConfig,
    TrackingConfig,
)
from fedmtl.config.privacy import PrivacyConfig, renamed
from fedmtl.config.sections import (
    NOT_SERVABLE,
    AlgorithmConfig,
    FaultsConfig,
    GroupingConfig,
    ModelConfig,
    RunnerConfig,
    ServerConfig,
    TrainingConfig,
    ValidationConfig,
    _Section,
)


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
    federation: FederationConfig = Field(default_factory=FederationConfig)

    @model_validator(mode="after")
    def _check_dp_sgd(self) -> "Config":
        if not self.privacy.sample_level:
            return self
        problem = dp_sgd_blocker(self.algorithm.method, self.grouping.method)
        if problem is None and self.training.batched == "on":
            problem = (
                "training.batched=on with privacy.dp_sgd.enabled: DP-SGD clips each row's gradient "
                "(Opacus per-sample gradients), which the batched step (torch.func over clients) "
                "does not compute; use training.batched=auto or off"
            )
        if problem is not None:
            raise ValueError(problem)
        return self

    @model_validator(mode="after")
    def _check_bundled_personal_heads(self) -> "Config":
        on = [
            k
            for k, v in (
                ("privacy.dp_fedavg.enabled", self.privacy.dp_fedavg.enabled),
                ("privacy.dp_sgd.enabled", self.privacy.sample_level),
            )
            if v
        ]
        if self.tracking.bundle_personal_heads and on:
            raise ValueError(
                f"tracking.bundle_personal_heads=true with {' and '.join(on)}=true: every client's "
                "personal heads (and personal bases) are fitted on its own rows outside the DP "
                "guarantee (ε) and would be published in the registered model; set "
                "tracking.bundle_personal_heads=false (clients fit and keep their own heads: "
                "`fedmtl personalize`), or turn DP-FedAvg and DP-SGD off"
            )
        if self.tracking.register_model and self.algorithm.method in NOT_SERVABLE:
            raise ValueError(
                f"algorithm.method={self.algorithm.method} with tracking.register_model=true: "
                "its model is not the plain multi-task model (GPFL: conditional valve and class "
                "embeddings; FedEM: a mixture of components; FedCP: a policy network in its "
                "heads), which the registered model serves; "
                "set tracking.register_model=false (a benchmark method, not served yet)"
            )
        return self

    @model_validator(mode="after")
    def _check_feddbe_server(self) -> Config:
        # FedDBE's global mean representation rides as an extra head that the server averages:
        # a mean only under plain averaging (fedmtl/algorithms/feddbe.py)
        server = self.server
        if self.algorithm.method == "feddbe" and (server.optimizer != "fedavg" or server.lr != 1):
            raise ValueError(
                f"algorithm.method=feddbe with server.optimizer={server.optimizer}, "
                f"server.lr={server.lr}: FedDBE's global mean representation is the server's "
                "average of the clients' means, which needs server.optimizer=fedavg and "
                "server.lr=1"
            )
        return self

    @model_validator(mode="after")
    def _check_sites(self) -> Config:
        if self.federation.mode != "sites":
            return self
        secure = self.privacy.secure_sum
        if secure.enabled and secure.protocol != "secagg":
            raise ValueError(
                f"federation.mode=sites with privacy.secure_sum.protocol={secure.protocol}: "
                "across site processes the secure sum is SecAgg+ (protocol: secagg)"
            )
        learned = self.algorithm.method == "ifca" or self.grouping.method in ("ifca", "cluster")
        if secure.enabled and (self.server.aggregator != "mean" or learned):
            what = (
                f"server.aggregator={self.server.aggregator}"
                if self.server.aggregator != "mean"
                else "groups learned from the updates"
            )
            raise ValueError(
                f"federation.mode=sites with privacy.secure_sum.enabled and {what}: the "
                "coordinator sees sums only, never the single updates these need"
            )
        if secure.enabled and secure.dropout:
            raise ValueError(
                f"federation.mode=sites with privacy.secure_sum.dropout={secure.dropout}: the "
                "simulated dropout does not apply to sites, whose real dropouts SecAgg+ recovers "
                "from; set it to 0"
            )
        if not self.privacy.per_client_metrics:
            raise ValueError(
                "federation.mode=sites evaluates at the sites with per-client records only; the "
                "pooled evaluation across site processes is not built yet: set "
                "privacy.evaluation.client_metrics=true where privacy allows it"
            )
        return self

    @property
    def refreshes_data(self) -> bool:
        """Whether a scheduled run re-runs the DVC data stages at the coordinator first: with
        ``schedule.refresh_data``, in simulation only (sites validate and version their own
        data: their summaries give the run's data version)."""
        return self.schedule.refresh_data and self.federation.mode == "simulation"

    def flat(self) -> dict[str, Any]:
        """Every setting as ``section.key`` -> value (for MLflow params and DVC)."""
        return flatten(self.model_dump(mode="json"))


def dp_sgd_blocker(method: str, grouping: str) -> str | None:
    """Why ``privacy.dp_sgd.enabled`` cannot give its guarantee with this method and grouping, or
    None. (Methods that group clients: fedmtl, which groups by ``grouping.method``, and IFCA.)"""
    if method == "pfedme":
        return (
            "algorithm.method=pfedme with privacy.dp_sgd.enabled: pFedMe's client loop (K inner "
            "steps per batch on a personal model) is its own and is not made private; use another "
            "method"
        )
    if method in ("fedala", "feddbe", "gpfl", "fedem", "fedrod", "fedcp"):
        return (
            f"algorithm.method={method} with privacy.dp_sgd.enabled: its client loop (FedALA's "
            "adaptive aggregation, FedDBE's bias memory, GPFL's guidance losses, FedEM's "
            "E-step, FedRoD's two heads, FedCP's feature-discrepancy term) is its own and is "
            "not made private; use another method"
        )
    if method == "ifca" or (method == "fedmtl" and grouping in ("ifca", "cluster")):
        how = "algorithm.method=ifca" if method == "ifca" else f"grouping.method={grouping}"
        return (
            f"{how} with privacy.dp_sgd.enabled: a client would pick its group from the loss of "
            "every one of its rows, a choice released outside the sample-level ε; use "
            "grouping.method=column"
        )
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
    if len(parts) == 2 and parts[0] == "privacy":
        moved = renamed(parts[1], value)
        if moved is not None:  # an old flat key: set its new place, with the warning
            warnings.warn(
                f"{dotted} is now privacy.{moved}; the old key still works but will be removed",
                FutureWarning,
                stacklevel=3,
            )
            dotted, parts = f"privacy.{moved}", ["privacy", *moved.split(".")]
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
        model = (
            annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel)
            else None
        )
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
        return (
            f"setting '{loc}' = {error.get('input')!r} is not allowed; allowed values: {expected}"
        )
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
