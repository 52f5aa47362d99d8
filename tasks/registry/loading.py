"""Load a fedmtl pyfunc model back, only from a local copy whose artifacts matched their recorded
hashes: its predictor, or the bundle of the version an alias (``champion``) points at."""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path

from mlflow.tracking import MlflowClient

import mlflow
from models.personalized import PersonalizedBundle, PersonalizedPredictor
from tasks.registry.integrity import ModelIntegrityError, verified_copy
from tasks.registry.registered_model import CHAMPION

#: MLflow loads a "models from code" model by running its code, which hands the model over
#: through one module-level global (``set_model``): two loads at once (promotion scores the
#: challenger and the champion in parallel) can both get the same model object, whose
#: ``load_context`` then holds whichever bundle loaded last — both versions would answer alike.
_pyfunc_load_lock = threading.Lock()


def predictor_from(local_model: str | Path) -> PersonalizedPredictor:
    """The predictor of a fedmtl pyfunc model in a local folder (one :func:`verified_copy`
    checked)."""
    with _pyfunc_load_lock:
        return mlflow.pyfunc.load_model(str(local_model)).unwrap_python_model().predictor


def load_predictor(model_uri: str, tracking_uri: str) -> PersonalizedPredictor:
    """The predictor inside a registered (or logged) fedmtl pyfunc model, loaded from a local
    copy of its artifacts once they matched their recorded hashes (:func:`verified_copy`;
    else :class:`ModelIntegrityError`, before any of its code runs)."""
    with tempfile.TemporaryDirectory(prefix="fedmtl-model-") as tmp:
        return predictor_from(verified_copy(model_uri, tracking_uri, tmp))


def champion_bundle(
    registered_model: str, tracking_uri: str, alias: str = CHAMPION
) -> tuple[str, PersonalizedBundle] | None:
    """(version, bundle) of the model version that ``alias`` of ``registered_model`` points at,
    or None when the registered model or the alias does not exist. A version that exists but
    cannot be loaded raises ``RuntimeError`` naming it; one whose artifacts fail their integrity
    check, :class:`ModelIntegrityError` (nothing of it is loaded)."""
    client = MlflowClient(tracking_uri)
    try:
        model = client.get_registered_model(registered_model)
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    version = (model.aliases or {}).get(alias)
    if version is None:
        return None
    uri = f"models:/{registered_model}/{version}"
    try:
        bundle = load_predictor(uri, tracking_uri).bundle
    except ModelIntegrityError:  # names the version already; a refusal, not a failure to load
        raise
    except Exception as exc:  # noqa: BLE001 - any failure to load names the version
        raise RuntimeError(
            f"cannot load {alias} version {version} of '{registered_model}' ({uri}) from "
            f"{tracking_uri}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from exc
    return str(version), bundle
