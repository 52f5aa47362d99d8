"""The integrity of a logged model: the SHA-256 of its artifacts, recorded when it is logged and
checked before it is loaded.

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

import hashlib
import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mlflow.tracking import MlflowClient

import mlflow

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
        raise ValueError(
            f"the artifact hashes of the model ({len(hashes)} files) take "
            f"{len(value)} characters, more than an MLflow tag holds "
            f"({MAX_TAG_VALUE})"
        )
    return value


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
                raise ValueError(
                    f"model URI '{model_uri}': name a version number or an alias "
                    f"(models:/{name}/<version> or models:/{name}@<alias>), "
                    "not a stage"
                )
            version = client.get_model_version(name, number)
            label = f"version {version.version} of registered model '{name}'"
        else:  # a logged model by id (models:/m-...)
            logged = client.get_logged_model(rest)
            return ModelRef(
                logged.artifact_location,
                f"logged model '{rest}'",
                (logged.tags or {}).get(HASH_TAG),
                f"the logged model's tag {HASH_TAG}",
            )
        # the version's storage location itself: a models:/ download would add a file of its own
        # (registered_model_meta) to the copy
        return ModelRef(
            client.get_model_version_download_uri(name, str(version.version)),
            label,
            (version.tags or {}).get(HASH_TAG),
            f"the version's tag {HASH_TAG}",
        )
    if model_uri.startswith("runs:/"):
        run_id, _, path = model_uri.removeprefix("runs:/").partition("/")
        if path.strip("/") != "model":
            raise ModelIntegrityError(
                f"model URI '{model_uri}': only a fedmtl run's model "
                "(runs:/<run id>/model) can be verified before loading"
            )
        run = client.get_run(run_id)
        outputs = run.outputs.model_outputs if run.outputs is not None else []
        logged = [
            m
            for m in (client.get_logged_model(o.model_id) for o in outputs or [])
            if m.name == "model"
        ]
        if len(logged) != 1:
            raise ModelIntegrityError(
                f"model URI '{model_uri}': run '{run_id}' has {len(logged)} "
                "logged models named 'model' (fedmtl logs one): name a "
                "registered version instead"
            )
        return ModelRef(
            logged[0].artifact_location,
            f"the model of run '{run_id}'",
            run.data.tags.get(HASH_TAG),
            f"the run's tag {HASH_TAG}",
        )
    raise ModelIntegrityError(
        f"model URI '{model_uri}': fedmtl loads only registered versions "
        "(models:/...) and training runs' models (runs:/<run id>/model), "
        "whose artifacts it can verify"
    )


def verify(ref: ModelRef, local: str | Path) -> None:
    """Raise :class:`ModelIntegrityError` unless the files under ``local`` are exactly those
    whose hashes ``ref`` recorded."""
    retrain = "re-register it by training a new version (`fedmtl train` or `fedmtl run`)"
    if not ref.hashes:
        raise ModelIntegrityError(
            f"{ref.label} has no recorded artifact hashes ({ref.how} is missing: it was registered "
            f"before fedmtl recorded them, or not by fedmtl), so its code and weights cannot be "
            f"checked and it is not loaded: {retrain}"
        )
    try:
        expected = json.loads(ref.hashes)
        ok = isinstance(expected, dict) and all(
            isinstance(k, str) and isinstance(v, str) and _SHA256.fullmatch(v)
            for k, v in expected.items()
        )
    except ValueError:
        ok = False
    if not ok or not expected:
        raise ModelIntegrityError(
            f"{ref.label}: {ref.how} is not a JSON object of SHA-256 hashes; "
            f"it is not loaded: {retrain}"
        )
    actual = {
        path: sha for path, sha in artifact_hashes(local).items() if path not in MLFLOW_WRITES
    }
    problems = []
    for path in sorted(set(expected) | set(actual)):
        if path not in actual:
            problems.append(f"artifact '{path}' is missing")
        elif path not in expected:
            problems.append(f"artifact '{path}' was not part of the model when it was registered")
        elif actual[path] != expected[path]:
            problems.append(
                f"artifact '{path}' does not match its recorded SHA-256 "
                f"(recorded {expected[path][:12]}…, found {actual[path][:12]}…)"
            )
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ModelIntegrityError(
            f"{ref.label} failed its integrity check: {'; '.join(problems[:3])}{more}. "
            f"Its artifacts were changed after it was registered; it is not loaded: restore the "
            f"artifacts or {retrain}"
        )


def verified_copy(model_uri: str, tracking_uri: str, dst: str | Path) -> Path:
    """Download the artifacts of ``model_uri`` into the local folder ``dst`` and check them
    against their recorded hashes; returns the model's folder there, to load from (and only
    from: a second download could hold other files). Raises :class:`ModelIntegrityError`."""
    mlflow.set_tracking_uri(tracking_uri)
    ref = resolve(model_uri, tracking_uri)
    if not ref.hashes:  # refuse before downloading anything
        verify(ref, dst)
    local = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=ref.download_uri, dst_path=str(dst), tracking_uri=tracking_uri
        )
    )
    verify(ref, local)
    return local


def check_artifacts(model_uri: str, tracking_uri: str) -> None:
    """Raise :class:`ModelIntegrityError` unless the artifacts of ``model_uri`` match their
    recorded hashes (downloaded to a temporary folder and checked; nothing is loaded)."""
    with tempfile.TemporaryDirectory(prefix="fedmtl-check-") as tmp:
        verified_copy(model_uri, tracking_uri, tmp)
