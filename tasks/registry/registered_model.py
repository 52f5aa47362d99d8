"""The registered model: whose it is (fedmtl's, never another team's model of the same name), its
creation, and its aliases ``challenger`` and ``champion``."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

import mlflow
from tasks.locking import registry_lock

CHALLENGER = "challenger"
CHAMPION = "champion"
DESCRIPTION = (
    "fedmtl personalised model: a shared base plus heads routed by client_id "
    "(personal head, else the client's group head, else the global head). A client unknown to "
    "the model that sends labelled rows (optional label columns) gets a cold start: the group "
    "head with the lowest loss on them, fine-tuned on them."
)

#: The tag that marks a registered model as fedmtl's (set when fedmtl creates it).
OWNER_TAG, OWNER = "fedmtl", "personalized-model"


class RegisteredModelClash(ValueError):
    """``tracking.registered_model`` names a registered model that is not fedmtl's."""


def check_registered_model(
    client: MlflowClient, name: str, setting: str = "tracking.registered_model"
) -> None:
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
        f"{setting} = '{name}': a registered model of that name already exists in "
        f"{client.tracking_uri} and was not created by fedmtl (no tag {OWNER_TAG}={OWNER}; "
        f"{len(client.search_model_versions(f'name = {name!r}', max_results=1000))} version(s), "
        f"description {(model.description or 'none')[:80]!r}). fedmtl would add its versions to it "
        f"and move its aliases: set {setting} to another name, or, if the model is fedmtl's, "
        f"tag it {OWNER_TAG}={OWNER}"
    )


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
