"""The registry side of champion/challenger promotion and rollback (MLflow).

Aliases: ``challenger`` (set by every training run on its new version) and ``champion`` (the
version in use). The decision itself is pure (``fedmtl/promotion.py``); this module reads the
facts it needs from the registry, records every decision, and moves the alias.

Every decision (promote, reject, rollback) is recorded twice: as tags on the model version it
concerns (``promotion.*``: decision, reasons, by, at, compared_with, record_run) and as a run in
the experiment ``<tracking.experiment>-promotions`` holding the compared metrics, the per-client
table and ``decision.json``. Order of writes: the record run first (RUNNING), then the alias —
the single write that changes what is served —, then the version tags, then the record run is
closed FINISHED. A crash part way leaves the record run unfinished (visible in the UI), never a
version tagged ``champion`` that is not the alias target.
"""

from __future__ import annotations

import getpass
import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import mlflow  # tasks/__init__ has already quietened MLflow (fedmtl.quiet)
from mlflow.entities import Metric, Param
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from fedmtl.promotion import Decision, RunFacts
from models.personalized import PersonalizedPredictor
from tasks.registry import CHALLENGER, CHAMPION, load_predictor
from tasks.tracking import ensure_experiment, resolve_tracking_uri

PREVIOUS_CHAMPION = "previous_champion"


class RegistryError(ValueError):
    """A model, version or alias the promotion needs is not in the registry."""


@dataclass(frozen=True)
class Registry:
    """One registered model in one tracking store."""

    tracking_uri: str
    name: str
    artifact_root: str = ""  # where the decision records' artifacts go (tracking.artifact_root)

    @classmethod
    def open(cls, tracking_uri: str, name: str, artifact_root: str = "") -> "Registry":
        uri = resolve_tracking_uri(tracking_uri)
        mlflow.set_tracking_uri(uri)
        registry = cls(uri, name, artifact_root)
        try:
            registry.client.get_registered_model(name)
        except MlflowException:
            raise RegistryError(f"registered model '{name}' does not exist in {uri}: train first "
                                "(`fedmtl run`), or check tracking.registered_model") from None
        return registry

    @property
    def client(self) -> MlflowClient:
        return MlflowClient(self.tracking_uri)

    def by_alias(self, alias: str) -> ModelVersion | None:
        try:
            return self.client.get_model_version_by_alias(self.name, alias)
        except MlflowException:
            return None

    def version(self, ref: str) -> ModelVersion:
        """A version by number (``"3"``) or alias (``"challenger"``, ``"@champion"``)."""
        ref = ref.lstrip("@")
        if ref.isdigit():
            try:
                return self.client.get_model_version(self.name, ref)
            except MlflowException:
                raise RegistryError(f"model '{self.name}' has no version {ref}") from None
        found = self.by_alias(ref)
        if found is None:
            raise RegistryError(f"model '{self.name}' has no version with alias '{ref}'")
        return found

    def predictor(self, version: ModelVersion) -> PersonalizedPredictor:
        return load_predictor(f"models:/{self.name}/{version.version}", self.tracking_uri)

    def run_facts(self, version: ModelVersion) -> RunFacts:
        """What the version's training run recorded about its data and privacy."""
        if not version.run_id:
            return RunFacts(clients=0, quarantined=0)
        tags = self.client.get_run(version.run_id).data.tags
        quarantined = [c for c in tags.get("quarantined_clients", "none").split(",") if c and c != "none"]
        clients = int(tags.get("validated_clients") or 0)
        eps = tags.get("privacy_epsilon")
        return RunFacts(clients=clients, quarantined=len(quarantined), privacy=tags.get("privacy", "none"),
                        epsilon=float(eps) if eps not in (None, "") else None)

    # -- decisions ----------------------------------------------------------------------------
    def record(self, experiment: str, action: str, version: ModelVersion, compared: ModelVersion | None,
               actor: str, summary: dict[str, Any], tables: dict[str, Any] | None = None) -> str:
        """Open the decision's record run (left RUNNING until :meth:`close`); returns its id."""
        client = self.client
        experiment_id = ensure_experiment(client, f"{experiment}-promotions", self.artifact_root)
        when = now()
        run = client.create_run(experiment_id, run_name=f"{action}-{self.name}-v{version.version}", tags={
            "action": action, "registered_model": self.name, "version": str(version.version),
            "compared_with": str(compared.version) if compared else "none", "by": actor, "at": when,
            "decision": _decision_word(action, summary),
        })
        run_id = run.info.run_id
        params = [Param("model", self.name), Param("version", str(version.version)),
                  Param("compared_with", str(compared.version) if compared else "none")]
        stamp = int(datetime.now(timezone.utc).timestamp() * 1000)
        metrics = [Metric(k, float(v), stamp, 0) for k, v in summary.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v]
        client.log_batch(run_id, metrics=metrics, params=params)
        client.log_text(run_id, json.dumps({**summary, "by": actor, "at": when}, indent=2, default=str),
                        "decision.json")
        for name, frame in (tables or {}).items():
            client.log_text(run_id, frame.to_csv(index=False), name)
        return run_id

    def close(self, run_id: str) -> None:
        self.client.set_terminated(run_id, "FINISHED")

    def apply(self, decision: Decision, challenger: ModelVersion, champion: ModelVersion | None,
              actor: str, experiment: str, scores: dict[str, Any]) -> str:
        """Record ``decision``; on a pass move ``champion`` to the challenger. Returns the
        record run's id."""
        action = "promote" if decision.promote else "reject"
        run_id = self.record(experiment, action, challenger, champion, actor, decision.summary(), scores)
        client = self.client
        when = now()
        if decision.promote:
            client.set_registered_model_alias(self.name, CHAMPION, str(challenger.version))
            if champion is not None:
                for key, value in ((PREVIOUS_CHAMPION, "true"), ("replaced_by", str(challenger.version)),
                                   ("demoted_at", when)):
                    client.set_model_version_tag(self.name, str(champion.version), key, value)
        tags = {
            "promotion.decision": "promoted" if decision.promote else "rejected",
            "promotion.reasons": " | ".join(decision.reasons)[:5000],
            "promotion.by": actor, "promotion.at": when,
            "promotion.compared_with": str(champion.version) if champion else "none",
            "promotion.record_run": run_id,
            "promotion.metric": f"{decision.task}/{decision.metric}",
            "promotion.challenger_mean": f"{decision.challenger_mean:.6f}",
        }
        if decision.champion_mean is not None:
            tags["promotion.champion_mean"] = f"{decision.champion_mean:.6f}"
        if decision.promote:
            tags["promotion.replaced_version"] = str(champion.version) if champion else "none"
        for key, value in tags.items():
            client.set_model_version_tag(self.name, str(challenger.version), key, value)
        self.close(run_id)
        return run_id

    def rollback(self, actor: str, experiment: str, reason: str = "") -> tuple[ModelVersion, ModelVersion, str]:
        """Give ``champion`` back to the version the current champion replaced. Returns
        (the version rolled back from, the version restored, the record run's id)."""
        current = self.by_alias(CHAMPION)
        if current is None:
            raise RegistryError(f"model '{self.name}' has no champion: nothing to roll back")
        previous = current.tags.get("promotion.replaced_version", "none")
        if previous in ("", "none"):
            raise RegistryError(f"champion version {current.version} of '{self.name}' replaced no earlier "
                                "champion: there is nothing to roll back to")
        restored = self.version(previous)
        summary = {"action": "rollback", "from_version": int(current.version),
                   "to_version": int(restored.version), "reason": reason or "not given"}
        run_id = self.record(experiment, "rollback", current, restored, actor, summary)
        client = self.client
        when = now()
        client.set_registered_model_alias(self.name, CHAMPION, str(restored.version))
        for key, value in (("promotion.decision", "rolled_back"), ("rolled_back_by", actor),
                           ("rolled_back_at", when), ("rolled_back_reason", reason or "not given"),
                           ("rolled_back_record_run", run_id)):
            client.set_model_version_tag(self.name, str(current.version), key, value)
        client.set_model_version_tag(self.name, str(restored.version), "restored_at", when)
        if PREVIOUS_CHAMPION in restored.tags:
            client.delete_model_version_tag(self.name, str(restored.version), PREVIOUS_CHAMPION)
        self.close(run_id)
        return current, restored, run_id


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def actor_name(given: str | None = None) -> str:
    """Who decided: the given name (``--actor``), else the operating-system user."""
    if given:
        return given
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user database entry (containers)
        return os.environ.get("USER", "unknown")


def _decision_word(action: str, summary: dict[str, Any]) -> str:
    if action == "rollback":
        return "rolled_back"
    return "promoted" if summary.get("promote") else "rejected"


__all__ = ["CHALLENGER", "CHAMPION", "PREVIOUS_CHAMPION", "Registry", "RegistryError", "actor_name"]
