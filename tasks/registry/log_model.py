"""Log the personalised model as an MLflow pyfunc (its signature, its serving environment, the
hashes of the files uploaded) and register it as a new version with alias ``challenger``."""

from __future__ import annotations

import contextlib
import io
import tempfile
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import torch
from mlflow.models import ModelSignature, infer_signature
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, Schema
from mlflow.types.schema import AnyType

import mlflow
import models
from models.personalized import PersonalizedBundle, PersonalizedPredictor
from models.pyfunc import BUNDLE_ARTIFACT
from tasks.registry.integrity import (
    HASH_TAG,
    ModelIntegrityError,
    _sha256,
    artifact_hashes,
    hashes_tag_value,
)
from tasks.registry.registered_model import claim_challenger, ensure_registered_model

SERVING_ENTRY = Path(models.__file__).parent / "serving.py"


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
    NaN, or as text; the model checks labels against the declared classes itself.)

    The feature columns are declared optional too (their types still apply when present):
    MLflow's schema enforcement would answer a request that lacks one with a dump of the whole
    request and schema before its reason; the model itself refuses it with one sentence naming
    the missing column(s) (``PersonalizedPredictor.predict``, answered HTTP 400 by
    ``models/serving.py``)."""
    features = set(bundle.features)
    inputs = [
        ColSpec(c.type, c.name, required=False) if c.name in features and c.required else c
        for c in signature.inputs.inputs
    ]
    names = {c.name for c in inputs}
    inputs += [
        ColSpec(AnyType(), t["name"], required=False)
        for t in bundle.tasks
        if t["name"] not in names
    ]
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

    ``input_example`` is stored with the model (``input_example.json``,
    ``serving_input_example.json``): it must be synthetic, never a client's rows
    (flows/training.py ``input_example``).

    The SHA-256 of every artifact file is recorded (tag :data:`HASH_TAG` on the version, the run
    and the logged model; see :mod:`tasks.registry.integrity`). The registry entry is created
    only after the model's artifacts were written and checked, so a crash leaves no version that
    points at a half-written model."""
    predictor = PersonalizedPredictor(bundle)
    output_example = predictor.predict(input_example)
    with warnings.catch_warnings():  # MLflow's hint about integer columns: labels never miss
        warnings.simplefilter("ignore", UserWarning)
        signature = with_optional_labels(infer_signature(input_example, output_example), bundle)
    buffer = io.BytesIO()
    torch.save(bundle.to_dict(), buffer)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bundle.pt"
        path.write_bytes(buffer.getvalue())
        with mlflow.start_run(run_id=run_id), _recording_uploads() as uploaded:
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(SERVING_ENTRY),
                artifacts={BUNDLE_ARTIFACT: str(path)},
                signature=signature,
                input_example=input_example,
                pip_requirements=pip_requirements(),
            )
    hashes = _logged_hashes(info, uploaded.get(info.model_id), _sha256(buffer.getvalue()))
    recorded = hashes_tag_value(hashes)
    client = MlflowClient()
    client.set_tag(run_id, HASH_TAG, recorded)
    # a store without logged-model tags: the version's tag decides
    with contextlib.suppress(Exception):
        client.set_logged_model_tags(info.model_id, {HASH_TAG: recorded})
    version = None
    if registered_model:
        ensure_registered_model(client, registered_model)
        mv = client.create_model_version(
            registered_model,
            info.model_uri,
            run_id=run_id,
            tags={**(tags or {}), HASH_TAG: recorded},
            model_id=info.model_id,
        )
        version = str(mv.version)
        claim_challenger(client, registered_model, version)
    return info.model_uri, version


_upload_lock = threading.Lock()


@contextlib.contextmanager
def _recording_uploads() -> Iterator[dict[str, dict[str, str]]]:
    """While inside: the hashes of the local folder that MLflow uploads as a logged model's
    artifacts (``MlflowClient.log_model_artifacts``), by model id, taken just before the upload
    (what was written, not what the store returns). Only this thread's uploads are recorded."""
    captured: dict[str, dict[str, str]] = {}
    me = threading.get_ident()
    with _upload_lock:
        original = MlflowClient.log_model_artifacts

        def recording(self, model_id, local_dir, *args, **kwargs):
            if threading.get_ident() == me:
                captured[model_id] = artifact_hashes(local_dir)
            return original(self, model_id, local_dir, *args, **kwargs)

        MlflowClient.log_model_artifacts = recording
        try:
            yield captured
        finally:
            MlflowClient.log_model_artifacts = original


def _logged_hashes(info, uploaded: dict[str, str] | None, bundle_sha: str) -> dict[str, str]:
    """The hashes to record for the model just logged (``info``): those of the files uploaded,
    checked against a fresh download of the store's copy (so the store holds exactly them). If
    the upload could not be observed (another MLflow version), the downloaded copy's hashes,
    after checking that its bundle and loader code are the bytes written here."""
    location = MlflowClient().get_logged_model(info.model_id).artifact_location
    with tempfile.TemporaryDirectory() as tmp:
        stored = artifact_hashes(
            mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=tmp)
        )
    if uploaded is None:
        own = {
            f"artifacts/{BUNDLE_ARTIFACT}.pt": bundle_sha,
            SERVING_ENTRY.name: _sha256(SERVING_ENTRY.read_bytes()),
        }
        for rel, sha in own.items():
            if rel in stored and stored[rel] != sha:
                raise ModelIntegrityError(
                    f"the logged model {info.model_uri}: artifact '{rel}' "
                    "changed in the artifact store while it was being logged"
                )
        uploaded = stored
    if stored != uploaded:
        bad = sorted(p for p in set(stored) | set(uploaded) if stored.get(p) != uploaded.get(p))
        raise ModelIntegrityError(
            f"the logged model {info.model_uri}: the artifact store's copy "
            f"of {bad[:5]} differs from what was uploaded; nothing was "
            "registered"
        )
    return uploaded
