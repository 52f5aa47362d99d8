"""Log the personalised model as an MLflow pyfunc and register it with an alias."""

from __future__ import annotations

import io
import tempfile
import warnings
from pathlib import Path

import mlflow
import pandas as pd
import torch
from mlflow.models import ModelSignature, infer_signature
from mlflow.types import ColSpec, Schema
from mlflow.types.schema import AnyType
from mlflow.tracking import MlflowClient

import models
from models.personalized import PersonalizedBundle, PersonalizedPredictor
from models.pyfunc import BUNDLE_ARTIFACT
from tasks.locking import registry_lock

CHALLENGER = "challenger"
SERVING_ENTRY = Path(models.__file__).parent / "serving.py"
DESCRIPTION = (
    "fedmtl personalised model: a shared base plus heads routed by client_id "
    "(personal head, else the client's group head, else the global head). A client unknown to "
    "the model that sends labelled rows (optional label columns) gets a cold start: the group "
    "head with the lowest loss on them, fine-tuned on them."
)


def pip_requirements() -> list[str]:
    """The serving environment: this one's versions (read from the installed metadata; importing
    scikit-learn to ask it would cost ~1.3 s)."""
    from importlib.metadata import version

    packages = ("mlflow", "torch", "pandas", "numpy", "scikit-learn")
    return [f"{p}=={version(p).split('+')[0]}" for p in packages]


def with_optional_labels(signature: ModelSignature, bundle: PersonalizedBundle) -> ModelSignature:
    """Add each task's label column to the input schema as an optional column of any type:
    the labelled rows of a client the model does not know are its cold-start support set.
    (Any type: a label column that mixes labelled and unlabelled rows arrives as floats with
    NaN, or as text; the model checks labels against the declared classes itself.)"""
    inputs = list(signature.inputs.inputs)
    names = {c.name for c in inputs}
    inputs += [ColSpec(AnyType(), t["name"], required=False) for t in bundle.tasks if t["name"] not in names]
    return ModelSignature(Schema(inputs), signature.outputs, signature.params)


def log_personalized_model(
    run_id: str,
    bundle: PersonalizedBundle,
    input_example: pd.DataFrame,
    registered_model: str | None,
    tags: dict[str, str] | None = None,
) -> tuple[str, str | None]:
    """Log under ``run_id`` as artifact ``model``; register as a new version of
    ``registered_model`` with alias ``challenger``. Returns (model URI, version or None).

    The registry entry is created only after the model's artifacts were written, so a crash
    leaves no version that points at a half-written model."""
    predictor = PersonalizedPredictor(bundle)
    output_example = predictor.predict(input_example)
    with warnings.catch_warnings():  # MLflow's hint about integer columns: labels never miss
        warnings.simplefilter("ignore", UserWarning)
        signature = with_optional_labels(infer_signature(input_example, output_example), bundle)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bundle.pt"
        buffer = io.BytesIO()
        torch.save(bundle.to_dict(), buffer)
        path.write_bytes(buffer.getvalue())
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(SERVING_ENTRY),
                artifacts={BUNDLE_ARTIFACT: str(path)},
                signature=signature,
                input_example=input_example,
                pip_requirements=pip_requirements(),
            )
    version = None
    if registered_model:
        client = MlflowClient()
        ensure_registered_model(client, registered_model)
        mv = client.create_model_version(
            registered_model, info.model_uri, run_id=run_id, tags=tags or {}, model_id=info.model_id
        )
        version = str(mv.version)
        claim_challenger(client, registered_model, version)
    return info.model_uri, version


#: The tag that marks a registered model as fedmtl's (set when fedmtl creates it).
OWNER_TAG, OWNER = "fedmtl", "personalized-model"


class RegisteredModelClash(ValueError):
    """``tracking.registered_model`` names a registered model that is not fedmtl's."""


def check_registered_model(client: MlflowClient, name: str, setting: str = "tracking.registered_model") -> None:
    """Refuse a registered model of this name that fedmtl did not create (another team's, or
    another kind of model): fedmtl would add versions to it and move its aliases. Fine when it
    does not exist yet, or carries the tag ``fedmtl=personalized-model`` (or, created before that
    tag, fedmtl's description)."""
    try:
        model = client.get_registered_model(name)
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return
        raise
    if model.tags.get(OWNER_TAG) == OWNER or (model.description or "") == DESCRIPTION:
        return
    raise RegisteredModelClash(
        f"{setting} = '{name}': a registered model of that name already exists in {client.tracking_uri} "
        f"and was not created by fedmtl (no tag {OWNER_TAG}={OWNER}; "
        f"{len(client.search_model_versions(f'name = {name!r}', max_results=1000))} version(s), "
        f"description {(model.description or 'none')[:80]!r}). fedmtl would add its versions to it and "
        f"move its aliases: set {setting} to another name, or, if the model is fedmtl's, tag it "
        f"{OWNER_TAG}={OWNER}")


def ensure_registered_model(client: MlflowClient, name: str) -> None:
    """Create the registered model unless it exists (then it must be fedmtl's); another process
    may create it between the look-up and the creation (two training runs ending together),
    which is fine."""
    check_registered_model(client, name)
    try:
        client.get_registered_model(name)
        return
    except mlflow.exceptions.MlflowException:
        pass
    try:
        client.create_registered_model(name, tags={OWNER_TAG: OWNER}, description=DESCRIPTION)
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def claim_challenger(client: MlflowClient, name: str, version: str) -> bool:
    """Give alias ``challenger`` to ``version`` unless it already points at a newer version.

    Two runs that register at about the same time (versions 4 and 5) would otherwise set the
    alias in either order, and it could end on 4. Under the registry lock of the model
    (:mod:`tasks.locking`, the one promotions hold) the read and the write are one step.
    Returns whether the alias was moved."""
    with registry_lock(client.tracking_uri, name):
        try:
            current = client.get_model_version_by_alias(name, CHALLENGER).version
        except mlflow.exceptions.MlflowException:
            current = None
        if current is not None and int(current) > int(version):
            return False
        client.set_registered_model_alias(name, CHALLENGER, version)
        return True


def load_predictor(model_uri: str, tracking_uri: str) -> PersonalizedPredictor:
    """The predictor inside a registered (or logged) fedmtl pyfunc model."""
    mlflow.set_tracking_uri(tracking_uri)
    return mlflow.pyfunc.load_model(model_uri).unwrap_python_model().predictor


CHAMPION = "champion"


def champion_bundle(
    registered_model: str, tracking_uri: str, alias: str = CHAMPION
) -> tuple[str, PersonalizedBundle] | None:
    """(version, bundle) of the model version that ``alias`` of ``registered_model`` points at,
    or None when the registered model or the alias does not exist. A version that exists but
    cannot be loaded raises ``RuntimeError`` naming it."""
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
    except Exception as exc:  # noqa: BLE001 - any failure to load names the version
        raise RuntimeError(
            f"cannot load {alias} version {version} of '{registered_model}' ({uri}) from {tracking_uri}: "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from exc
    return str(version), bundle
