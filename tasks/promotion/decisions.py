"""What a promotion writes: every decision (promote, reject, rollback) recorded, and the
``champion`` alias moved, under the model's registry lock.

Every decision (promote, reject, rollback) is recorded twice: as tags on the model version it
concerns (``promotion.*``: decision, reasons, by, at, compared_with, record_run) and as a run in
the experiment ``<tracking.experiment>-promotions`` holding the compared metrics, the per-client
table and ``decision.json``. Order of writes: the record run first (RUNNING), then the alias —
the single write that changes what is served —, then the version tags, then the record run is
closed FINISHED. A crash part way leaves the record run unfinished (visible in the UI), never a
version tagged ``champion`` that is not the alias target.

Concurrency. A promotion reads the champion, scores both versions (seconds), decides, and then
writes: two promotions at once would both judge against the champion they read, and the second
write would silently replace the first's champion without ever being compared with it (and
record the wrong ``replaced_version``, breaking rollback). So the writes of a decision happen
under the model's registry lock (:mod:`tasks.locking`), after checking that the champion is
still the one the decision was made against (a compare-and-set): if another promotion or a
rollback moved it meanwhile, :class:`ChampionChanged` is raised and the flow judges the
challenger again against the new champion; the decision it records then says which champion
changed under it (``promotion.champion_moved_meanwhile``). For a ``sqlite:///`` store the lock is
a file beside the database, shared by every process that writes it, so check and write are
atomic. For a remote store the lock only covers this machine's processes: the champion is read
again just before the alias moves, which leaves writers on other machines a window of a few
requests.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from mlflow.entities import Metric, Param
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

import mlflow  # tasks/__init__ has already quietened MLflow (fedmtl.quiet)
from fedmtl.lifecycle.promotion import Decision
from tasks.locking import registry_lock
from tasks.promotion.facts import RegistryError, RegistryReader
from tasks.registry import CHAMPION, check_registered_model
from tasks.tracking import ensure_experiment, open_store, resolve_tracking_uri

PREVIOUS_CHAMPION = "previous_champion"
#: On a judged version: "no", or how another promotion or a rollback moved the champion while it
#: was being judged (``promotion.champion_changed`` before, which read as "this promotion did
#: not change the champion" on a promoted version; removed when a version is judged again).
CHAMPION_MOVED_TAG = "promotion.champion_moved_meanwhile"
LEGACY_CHAMPION_MOVED_TAG = "promotion.champion_changed"
#: Tags of a demotion or rollback that stop being true when the version is promoted again.
STALE_ON_PROMOTION = frozenset(
    {
        PREVIOUS_CHAMPION,
        "replaced_by",
        "demoted_at",
        "restored_at",
        "rolled_back_by",
        "rolled_back_at",
        "rolled_back_reason",
        "rolled_back_record_run",
    }
)
#: seconds to wait for another promotion's or rollback's writes (a second or two)
LOCK_TIMEOUT = 300.0


class ChampionChanged(RuntimeError):
    """The champion is no longer the version a decision was made against: another promotion
    or a rollback moved it in the meantime."""

    def __init__(
        self, model: str, expected: ModelVersion | None, current: ModelVersion | None
    ) -> None:
        self.expected, self.current = expected, current
        how = ""
        if current is not None and current.tags.get("promotion.decision") == "promoted":
            how = (
                f"; version {current.version} was promoted by "
                f"{current.tags.get('promotion.by', 'someone')} "
                f"(record run {current.tags.get('promotion.record_run', '?')})"
            )
        elif current is not None and "restored_at" in current.tags:
            how = f"; version {current.version} was restored by a rollback"
        super().__init__(
            f"the champion of '{model}' changed from {_label(expected)} to "
            f"{_label(current)} while this decision was being made{how}"
        )


def _label(version: ModelVersion | None) -> str:
    return f"version {version.version}" if version is not None else "none"


def _number(version: ModelVersion | None) -> str | None:
    return str(version.version) if version is not None else None


@dataclass(frozen=True)
class Registry(RegistryReader):
    """One registered model in one tracking store."""

    @classmethod
    def open(cls, tracking_uri: str, name: str, artifact_root: str = "") -> "Registry":
        uri = resolve_tracking_uri(tracking_uri)
        mlflow.set_tracking_uri(uri)
        open_store(uri)
        registry = cls(uri, name, artifact_root)
        try:
            registry.client.get_registered_model(name)
        except MlflowException:
            raise RegistryError(
                f"registered model '{name}' does not exist in {uri}: train first "
                "(`fedmtl run`), or check tracking.registered_model"
            ) from None
        check_registered_model(registry.client, name)  # never promote within another team's model
        return registry

    def lock(self, on_wait=None, timeout: float = LOCK_TIMEOUT):
        """The model's registry lock (a context manager), held while an alias is read and moved:
        by promotions, rollbacks and training runs claiming ``challenger``. ``on_wait(path)``
        is called when another process holds it."""
        return registry_lock(self.tracking_uri, self.name, timeout, on_wait)

    def check_champion(self, expected: ModelVersion | None) -> None:
        """Raise :class:`ChampionChanged` unless the champion is still ``expected``."""
        current = self.by_alias(CHAMPION)
        if _number(current) != _number(expected):
            raise ChampionChanged(self.name, expected, current)

    # -- decisions ----------------------------------------------------------------------------
    def record(
        self,
        experiment: str,
        action: str,
        version: ModelVersion,
        compared: ModelVersion | None,
        actor: str,
        summary: dict[str, Any],
        tables: dict[str, Any] | None = None,
        extra_tags: dict[str, str] | None = None,
    ) -> str:
        """Open the decision's record run (left RUNNING until :meth:`close`); returns its id."""
        client = self.client
        experiment_id = ensure_experiment(client, f"{experiment}-promotions", self.artifact_root)
        when = now()
        run = client.create_run(
            experiment_id,
            run_name=f"{action}-{self.name}-v{version.version}",
            tags={
                "action": action,
                "registered_model": self.name,
                "version": str(version.version),
                "compared_with": str(compared.version) if compared else "none",
                "by": actor,
                "at": when,
                "decision": _decision_word(action, summary),
                **(extra_tags or {}),
            },
        )
        run_id = run.info.run_id
        params = [
            Param("model", self.name),
            Param("version", str(version.version)),
            Param("compared_with", str(compared.version) if compared else "none"),
        ]
        stamp = int(datetime.now(timezone.utc).timestamp() * 1000)
        metrics = [
            Metric(k, float(v), stamp, 0)
            for k, v in summary.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v
        ]
        client.log_batch(run_id, metrics=metrics, params=params)
        client.log_text(
            run_id,
            json.dumps({**summary, "by": actor, "at": when}, indent=2, default=str),
            "decision.json",
        )
        for name, frame in (tables or {}).items():
            client.log_text(run_id, frame.to_csv(index=False), name)
        return run_id

    def close(self, run_id: str) -> None:
        self.client.set_terminated(run_id, "FINISHED")

    def apply(
        self,
        decision: Decision,
        challenger: ModelVersion,
        champion: ModelVersion | None,
        actor: str,
        experiment: str,
        scores: dict[str, Any],
        champion_changed: list[str] | None = None,
        on_wait=None,
    ) -> str:
        """Record ``decision``, made against ``champion`` (None: there was none); on a pass
        move ``champion`` to the challenger. Returns the record run's id.

        Under the registry lock, and only if the champion is still ``champion``: else raises
        :class:`ChampionChanged` having written nothing that stays (the decision must be made
        again against the new champion). ``champion_changed``: what changed under earlier
        attempts of this promotion, recorded with the decision."""
        action = "promote" if decision.promote else "reject"
        changed = [c for c in (champion_changed or []) if c]
        summary = {**decision.summary(), **({"champion_changed": changed} if changed else {})}
        with self.lock(on_wait):
            self.check_champion(champion)
            run_id = self.record(
                experiment,
                action,
                challenger,
                champion,
                actor,
                summary,
                scores,
                {"champion_changed": " | ".join(changed)[:5000]} if changed else None,
            )
            if decision.promote:
                # again, just before the write: writers the lock does not reach (remote stores)
                try:
                    self.check_champion(champion)
                except ChampionChanged as exc:
                    self.client.set_tag(run_id, "decision", "superseded")
                    self.client.set_tag(run_id, "superseded_because", str(exc)[:5000])
                    self.client.set_terminated(run_id, "KILLED")
                    raise
            self._write(decision, challenger, champion, actor, run_id, changed)
        return run_id

    def _write(
        self,
        decision: Decision,
        challenger: ModelVersion,
        champion: ModelVersion | None,
        actor: str,
        run_id: str,
        changed: list[str],
    ) -> None:
        client = self.client
        when = now()
        if decision.promote:
            client.set_registered_model_alias(self.name, CHAMPION, str(challenger.version))
            if champion is not None:
                for key, value in (
                    (PREVIOUS_CHAMPION, "true"),
                    ("replaced_by", str(challenger.version)),
                    ("demoted_at", when),
                ):
                    client.set_model_version_tag(self.name, str(champion.version), key, value)
        tags = {
            "promotion.decision": "promoted" if decision.promote else "rejected",
            "promotion.reasons": " | ".join(decision.reasons)[:5000],
            "promotion.by": actor,
            "promotion.at": when,
            "promotion.compared_with": str(champion.version) if champion else "none",
            "promotion.record_run": run_id,
            "promotion.metric": f"{decision.task}/{decision.metric}",
            "promotion.challenger_mean": f"{decision.challenger_mean:.6f}",
        }
        if decision.champion_mean is not None:
            tags["promotion.champion_mean"] = f"{decision.champion_mean:.6f}"
        if decision.promote:
            tags["promotion.replaced_version"] = str(champion.version) if champion else "none"
        # whether another promotion or a rollback moved the champion while this decision was being
        # made (then what moved it). Not whether this decision changed the champion: that is
        # promotion.decision (a promotion always does).
        tags[CHAMPION_MOVED_TAG] = " | ".join(changed)[:5000] if changed else "no"
        version = str(challenger.version)
        for key, value in tags.items():
            client.set_model_version_tag(self.name, version, key, value)
        # what earlier decisions left that this one makes untrue: a promoted version is neither a
        # previous champion nor rolled back; without a champion, nothing was compared with
        stale = [
            k
            for k in (client.get_model_version(self.name, version).tags or {})
            if (k == "promotion.champion_mean" and decision.champion_mean is None)
            or (k == "promotion.replaced_version" and not decision.promote)
            or k == LEGACY_CHAMPION_MOVED_TAG
            or (decision.promote and k in STALE_ON_PROMOTION)
        ]
        for key in stale:
            with contextlib.suppress(MlflowException):
                client.delete_model_version_tag(self.name, version, key)
        self.close(run_id)

    def rollback(
        self, actor: str, experiment: str, reason: str = "", on_wait=None
    ) -> tuple[ModelVersion, ModelVersion, str]:
        """Give ``champion`` back to the version the current champion replaced. Returns
        (the version rolled back from, the version restored, the record run's id). Reads and
        writes under the registry lock, so it never interleaves with a promotion's writes."""
        with self.lock(on_wait):
            return self._rollback(actor, experiment, reason)

    def _rollback(
        self, actor: str, experiment: str, reason: str
    ) -> tuple[ModelVersion, ModelVersion, str]:
        current = self.by_alias(CHAMPION)
        if current is None:
            raise RegistryError(f"model '{self.name}' has no champion: nothing to roll back")
        previous = current.tags.get("promotion.replaced_version", "none")
        if previous in ("", "none"):
            raise RegistryError(
                f"champion version {current.version} of '{self.name}' replaced no "
                "earlier champion: there is nothing to roll back to"
            )
        restored = self.version(previous)
        summary = {
            "action": "rollback",
            "from_version": int(current.version),
            "to_version": int(restored.version),
            "reason": reason or "not given",
        }
        run_id = self.record(experiment, "rollback", current, restored, actor, summary)
        client = self.client
        when = now()
        client.set_registered_model_alias(self.name, CHAMPION, str(restored.version))
        for key, value in (
            ("promotion.decision", "rolled_back"),
            ("rolled_back_by", actor),
            ("rolled_back_at", when),
            ("rolled_back_reason", reason or "not given"),
            ("rolled_back_record_run", run_id),
        ):
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
