"""The one configuration model of fedmtl, stored as ``params.yaml`` (DVC's parameter file).

Every setting lives here, in sections: ``data``, ``model``, ``training``, ``algorithm``,
``server``, ``grouping``, ``validation``, ``tracking``, ``coldstart``, ``promotion``,
``schedule``, ``runner``, ``faults`` (:mod:`fedmtl.config.sections`) and ``privacy``, one
sub-section per mechanism (:mod:`fedmtl.config.privacy`). :func:`load_config` reads a YAML file,
applies ``key=value`` overrides and validates the result once (:mod:`fedmtl.config.schema`);
every section is frozen and handed as it is to what it configures.
"""

from fedmtl.config.data import DataConfig, HarConfig, PartitionConfig, SyntheticConfig, TableConfig
from fedmtl.config.federation import FederationConfig
from fedmtl.config.operations import (
    ColdStartConfig,
    PromotionConfig,
    ScheduleConfig,
    TrackingConfig,
)
from fedmtl.config.privacy import (
    RENAMED,
    DPFedAvgConfig,
    DPSGDConfig,
    EvaluationPrivacyConfig,
    PrivacyConfig,
    SecureSumConfig,
    tenseal_installed,
)
from fedmtl.config.schema import (
    Config,
    ConfigError,
    dp_sgd_blocker,
    dump_config,
    flatten,
    load_config,
    parse_override,
    validate_config,
)
from fedmtl.config.sections import (
    AlgorithmConfig,
    FaultsConfig,
    GroupingConfig,
    Method,
    ModelConfig,
    RunnerConfig,
    ServerConfig,
    TrainingConfig,
    ValidationConfig,
)

__all__ = [
    "RENAMED",
    "AlgorithmConfig",
    "ColdStartConfig",
    "Config",
    "ConfigError",
    "DPFedAvgConfig",
    "DPSGDConfig",
    "DataConfig",
    "EvaluationPrivacyConfig",
    "FaultsConfig",
    "FederationConfig",
    "GroupingConfig",
    "HarConfig",
    "Method",
    "ModelConfig",
    "PartitionConfig",
    "PrivacyConfig",
    "PromotionConfig",
    "RunnerConfig",
    "ScheduleConfig",
    "SecureSumConfig",
    "ServerConfig",
    "SyntheticConfig",
    "TableConfig",
    "TrackingConfig",
    "TrainingConfig",
    "ValidationConfig",
    "dp_sgd_blocker",
    "dump_config",
    "flatten",
    "load_config",
    "parse_override",
    "tenseal_installed",
    "validate_config",
]
