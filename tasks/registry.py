"""Log the personalised model as an MLflow pyfunc and register it with an alias; load it back
only after checking its artifacts.

Integrity. A logged model is code as well as data: its ``serving.py`` (MLflow "models from code")
is executed when the model is loaded, and ``bundle.pt``, ``MLmodel`` and the rest decide what is
served. When a model is logged, the SHA-256 of every file MLflow uploads for it is recorded, as
the JSON ``{relative path: sha256}``, in the tag ``fedmtl.artifact_sha256`` of the model version
(set when the version is created), of the training run and of the logged model. Every load
(:func:`load_predictor`, :func:`verified_copy`: ``fedmtl evaluate``/``serve``/``personalize``,
promotion's scoring, warm start from the champion, rollback's check) downloads the artifacts to a
local temporary folder, checks that folder against the tag (a changed, missing or extra file is
refused with :class:`ModelIntegrityError`) and then loads from that same folder, never from a
second download. A version without the tag (registered before fedmtl recorded hashes, or not by
fedmtl) is refused. The tags live in the tracking store, the files in the artifact store: this
catches changes to the artifact store, not someone who can also rewrite the tracking store's tags.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import tempfile
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
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
    NaN, or as text; the model checks labels against the declared classes itself.)

    The feature columns are declared optional too (their types still apply when present):
    MLflow's schema enforcement would answer a request that lacks one with a dump of the whole
    request and schema before its reason; the model itself refuses it with one sentence naming
    the missing column(s) (``PersonalizedPredictor.predict``, answered HTTP 400 by
    ``models/serving.py``)."""
    features = set(bundle.features)
    inputs = [ColSpec(c.type, c.name, required=False) if c.name in features and c.required else c
              for c in signature.inputs.inputs]
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

    ``input_example`` is stored with the model (``input_example.json``, ``serving_input_example.json``):
    it must be synthetic, never a client's rows (flows/training.py ``input_example``).

    The SHA-256 of every artifact file is recorded (tag :data:`HASH_TAG` on the version, the run
    and the logged model; see the module's docstring). The registry entry is created only after
    the model's artifacts were written and checked, so a crash leaves no version that points at
    a half-written model."""
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
    with contextlib.suppress(Exception):  # a store without logged-model tags: the version's tag decides
        client.set_logged_model_tags(info.model_id, {HASH_TAG: recorded})
    version = None
    if registered_model:
        ensure_registered_model(client, registered_model)
        mv = client.create_model_version(
            registered_model, info.model_uri, run_id=run_id, tags={**(tags or {}), HASH_TAG: recorded},
            model_id=info.model_id,
        )
        version = str(mv.version)
        claim_challenger(client, registered_model, version)
    return info.model_uri, version


#: The tag holding ``{relative path: sha256}`` of every file of the logged model (JSON).
HASH_TAG = "fedmtl.artifact_sha256"
#: Files MLflow itself adds to a model's folder after it was logged, which nothing ever loads:
#: loading ``models:/<name>/<version>`` from a local artifact store writes ``registered_model_meta``
#: (the name and version, for the caller's information) into the store's own folder.
MLFLOW_WRITES = frozenset({"registered_model_meta"})
#: The longest tag value every MLflow store accepts for a model version (older servers: 5000).
MAX_TAG_VALUE = 5000
_SHA256 = re.compile(r"[0-9a-f]{64}")


class ModelIntegrityError(ValueError):
    """A model's artifacts differ from the hashes recorded when it was logged (a file changed,
    missing or added), or it has no recorded hashes: it is not loaded."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def artifact_hashes(root: str | Path) -> dict[str, str]:
    """``{path relative to root (POSIX): sha256 of its bytes}`` for every file under ``root``.
    A link or anything that is not a plain file is recorded as such (so it never matches)."""
    root = Path(root)
    out: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            out[rel] = "not a plain file (a link)"
        elif path.is_file():
            digest = hashlib.sha256()
            with path.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
            out[rel] = digest.hexdigest()
        elif not path.is_dir():
            out[rel] = "not a plain file"
    return out


def hashes_tag_value(hashes: dict[str, str]) -> str:
    """The tag value of ``hashes``: canonical JSON, at most :data:`MAX_TAG_VALUE` characters."""
    value = json.dumps(dict(sorted(hashes.items())), separators=(",", ":"))
    if len(value) > MAX_TAG_VALUE:
        raise ValueError(f"the artifact hashes of the model ({len(hashes)} files) take {len(value)} characters, "
                         f"more than an MLflow tag holds ({MAX_TAG_VALUE})")
    return value


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
        stored = artifact_hashes(mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=tmp))
    if uploaded is None:
        own = {f"artifacts/{BUNDLE_ARTIFACT}.pt": bundle_sha, SERVING_ENTRY.name: _sha256(SERVING_ENTRY.read_bytes())}
        for rel, sha in own.items():
            if rel in stored and stored[rel] != sha:
                raise ModelIntegrityError(f"the logged model {info.model_uri}: artifact '{rel}' changed in the "
                                          "artifact store while it was being logged")
        uploaded = stored
    if stored != uploaded:
        bad = sorted(p for p in set(stored) | set(uploaded) if stored.get(p) != uploaded.get(p))
        raise ModelIntegrityError(f"the logged model {info.model_uri}: the artifact store's copy of {bad[:5]} "
                                  "differs from what was uploaded; nothing was registered")
    return uploaded


@dataclass(frozen=True)
class ModelRef:
    """What a model URI names, resolved once (an alias to its version number)."""

    download_uri: str  # where exactly these artifacts are stored (no alias to move)
    label: str  # "version 3 of registered model 'm'" (for messages)
    hashes: str | None  # the recorded tag value (None: none recorded)
    how: str  # where the hashes should have been recorded


def resolve(model_uri: str, tracking_uri: str) -> ModelRef:
    """Resolve ``model_uri`` (``models:/<name>/<version>``, ``models:/<name>@<alias>``,
    ``models:/<model id>``, ``runs:/<run id>/model``) to its artifacts and recorded hashes."""
    client = MlflowClient(tracking_uri)
    if model_uri.startswith("models:/"):
        rest = model_uri.removeprefix("models:/").strip("/")
        if "@" in rest:
            name, alias = rest.split("@", 1)
            version = client.get_model_version_by_alias(name, alias)  # raises for an unknown alias
            label = f"version {version.version} (alias '{alias}') of registered model '{name}'"
        elif "/" in rest:
            name, number = rest.rsplit("/", 1)
            if not number.isdigit():
                raise ValueError(f"model URI '{model_uri}': name a version number or an alias "
                                 f"(models:/{name}/<version> or models:/{name}@<alias>), not a stage")
            version = client.get_model_version(name, number)
            label = f"version {version.version} of registered model '{name}'"
        else:  # a logged model by id (models:/m-...)
            logged = client.get_logged_model(rest)
            return ModelRef(logged.artifact_location, f"logged model '{rest}'", (logged.tags or {}).get(HASH_TAG),
                            f"the logged model's tag {HASH_TAG}")
        # the version's storage location itself: a models:/ download would add a file of its own
        # (registered_model_meta) to the copy
        return ModelRef(client.get_model_version_download_uri(name, str(version.version)), label,
                        (version.tags or {}).get(HASH_TAG), f"the version's tag {HASH_TAG}")
    if model_uri.startswith("runs:/"):
        run_id, _, path = model_uri.removeprefix("runs:/").partition("/")
        if path.strip("/") != "model":
            raise ModelIntegrityError(f"model URI '{model_uri}': only a fedmtl run's model (runs:/<run id>/model) "
                                      "can be verified before loading")
        run = client.get_run(run_id)
        outputs = run.outputs.model_outputs if run.outputs is not None else []
        logged = [m for m in (client.get_logged_model(o.model_id) for o in outputs or []) if m.name == "model"]
        if len(logged) != 1:
            raise ModelIntegrityError(f"model URI '{model_uri}': run '{run_id}' has {len(logged)} logged models "
                                      "named 'model' (fedmtl logs one): name a registered version instead")
        return ModelRef(logged[0].artifact_location, f"the model of run '{run_id}'", run.data.tags.get(HASH_TAG),
                        f"the run's tag {HASH_TAG}")
    raise ModelIntegrityError(f"model URI '{model_uri}': fedmtl loads only registered versions (models:/...) "
                              "and training runs' models (runs:/<run id>/model), whose artifacts it can verify")


def verify(ref: ModelRef, local: str | Path) -> None:
    """Raise :class:`ModelIntegrityError` unless the files under ``local`` are exactly those
    whose hashes ``ref`` recorded."""
    retrain = "re-register it by training a new version (`fedmtl train` or `fedmtl run`)"
    if not ref.hashes:
        raise ModelIntegrityError(
            f"{ref.label} has no recorded artifact hashes ({ref.how} is missing: it was registered before "
            f"fedmtl recorded them, or not by fedmtl), so its code and weights cannot be checked and it is not "
            f"loaded: {retrain}")
    try:
        expected = json.loads(ref.hashes)
        ok = isinstance(expected, dict) and all(
            isinstance(k, str) and isinstance(v, str) and _SHA256.fullmatch(v) for k, v in expected.items())
    except ValueError:
        ok = False
    if not ok or not expected:
        raise ModelIntegrityError(f"{ref.label}: {ref.how} is not a JSON object of SHA-256 hashes; it is not "
                                  f"loaded: {retrain}")
    actual = {path: sha for path, sha in artifact_hashes(local).items() if path not in MLFLOW_WRITES}
    problems = []
    for path in sorted(set(expected) | set(actual)):
        if path not in actual:
            problems.append(f"artifact '{path}' is missing")
        elif path not in expected:
            problems.append(f"artifact '{path}' was not part of the model when it was registered")
        elif actual[path] != expected[path]:
            problems.append(f"artifact '{path}' does not match its recorded SHA-256 "
                            f"(recorded {expected[path][:12]}…, found {actual[path][:12]}…)")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ModelIntegrityError(
            f"{ref.label} failed its integrity check: {'; '.join(problems[:3])}{more}. Its artifacts were changed "
            f"after it was registered; it is not loaded: restore the artifacts or {retrain}")


def verified_copy(model_uri: str, tracking_uri: str, dst: str | Path) -> Path:
    """Download the artifacts of ``model_uri`` into the local folder ``dst`` and check them
    against their recorded hashes; returns the model's folder there, to load from (and only
    from: a second download could hold other files). Raises :class:`ModelIntegrityError`."""
    mlflow.set_tracking_uri(tracking_uri)
    ref = resolve(model_uri, tracking_uri)
    if not ref.hashes:  # refuse before downloading anything
        verify(ref, dst)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=ref.download_uri, dst_path=str(dst),
                                                     tracking_uri=tracking_uri))
    verify(ref, local)
    return local


def check_artifacts(model_uri: str, tracking_uri: str) -> None:
    """Raise :class:`ModelIntegrityError` unless the artifacts of ``model_uri`` match their
    recorded hashes (downloaded to a temporary folder and checked; nothing is loaded)."""
    with tempfile.TemporaryDirectory(prefix="fedmtl-check-") as tmp:
        verified_copy(model_uri, tracking_uri, tmp)


#: MLflow loads a "models from code" model by running its code, which hands the model over
#: through one module-level global (``set_model``): two loads at once (promotion scores the
#: challenger and the champion in parallel) can both get the same model object, whose
#: ``load_context`` then holds whichever bundle loaded last — both versions would answer alike.
_pyfunc_load_lock = threading.Lock()


def predictor_from(local_model: str | Path) -> PersonalizedPredictor:
    """The predictor of a fedmtl pyfunc model in a local folder (one :func:`verified_copy` checked)."""
    with _pyfunc_load_lock:
        return mlflow.pyfunc.load_model(str(local_model)).unwrap_python_model().predictor


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
    """The predictor inside a registered (or logged) fedmtl pyfunc model, loaded from a local
    copy of its artifacts once they matched their recorded hashes (:func:`verified_copy`;
    else :class:`ModelIntegrityError`, before any of its code runs)."""
    with tempfile.TemporaryDirectory(prefix="fedmtl-model-") as tmp:
        return predictor_from(verified_copy(model_uri, tracking_uri, tmp))


CHAMPION = "champion"


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
            f"cannot load {alias} version {version} of '{registered_model}' ({uri}) from {tracking_uri}: "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from exc
    return str(version), bundle
