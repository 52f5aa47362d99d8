"""Log the personalised model as an MLflow pyfunc and register it with an alias; load it back
only after checking its artifacts.

The package: :mod:`~tasks.registry.log_model` (log and register), :mod:`~tasks.registry.integrity`
(the artifact hashes and their check, see its docstring), :mod:`~tasks.registry.loading` (the
predictor of a checked copy, the champion's bundle) and :mod:`~tasks.registry.registered_model`
(whose the registered model is, its aliases).
"""

from __future__ import annotations

from tasks.registry.integrity import (
    HASH_TAG,
    MAX_TAG_VALUE,
    MLFLOW_WRITES,
    ModelIntegrityError,
    ModelRef,
    artifact_hashes,
    check_artifacts,
    hashes_tag_value,
    resolve,
    verified_copy,
    verify,
)
from tasks.registry.loading import champion_bundle, load_predictor, predictor_from
from tasks.registry.log_model import (
    SERVING_ENTRY,
    log_personalized_model,
    pip_requirements,
    with_optional_labels,
)
from tasks.registry.registered_model import (
    CHALLENGER,
    CHAMPION,
    DESCRIPTION,
    OWNER,
    OWNER_TAG,
    RegisteredModelClash,
    check_registered_model,
    claim_challenger,
    ensure_registered_model,
)

__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "DESCRIPTION",
    "HASH_TAG",
    "MAX_TAG_VALUE",
    "MLFLOW_WRITES",
    "OWNER",
    "OWNER_TAG",
    "SERVING_ENTRY",
    "ModelIntegrityError",
    "ModelRef",
    "RegisteredModelClash",
    "artifact_hashes",
    "champion_bundle",
    "check_artifacts",
    "check_registered_model",
    "claim_challenger",
    "ensure_registered_model",
    "hashes_tag_value",
    "load_predictor",
    "log_personalized_model",
    "pip_requirements",
    "predictor_from",
    "resolve",
    "verified_copy",
    "verify",
    "with_optional_labels",
]
