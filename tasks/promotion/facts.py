"""What a promotion reads from the registry: versions by number or alias, their predictors, what
their training runs recorded (the facts the pure decision needs, the metric they logged) and how
the versions are named to whoever promotes them (:meth:`RegistryReader.context`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from fedmtl.lifecycle.promotion import RunFacts
from models.personalized import PersonalizedPredictor
from tasks.registry import load_predictor


class RegistryError(ValueError):
    """A model, version or alias the promotion needs is not in the registry."""


@dataclass(frozen=True)
class RegistryReader:
    """One registered model in one tracking store, as read: the side of
    :class:`~tasks.promotion.decisions.Registry` that writes nothing."""

    tracking_uri: str
    name: str
    artifact_root: str = ""  # where the decision records' artifacts go (tracking.artifact_root)

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
        quarantined = [
            c for c in tags.get("quarantined_clients", "none").split(",") if c and c != "none"
        ]
        clients = int(tags.get("validated_clients") or 0)

        def number(key: str) -> float | None:
            value = tags.get(key)
            return float(value) if value not in (None, "") else None

        return RunFacts(
            clients=clients,
            quarantined=len(quarantined),
            privacy=tags.get("privacy", "none"),
            epsilon=number("privacy_epsilon"),
            dp_sgd_epsilon=number("privacy_dp_sgd_epsilon_max"),
        )

    # -- what is judged -----------------------------------------------------------------------
    def describe(self, version: ModelVersion | None) -> dict[str, Any] | None:
        """How a version is named to whoever promotes it: its number, its training run and the
        run's method (the param ``algorithm.method``; the run's tag ``method`` otherwise)."""
        if version is None:
            return None
        run = self._run(version.run_id)
        method = (
            (run.data.params.get("algorithm.method") or run.data.tags.get("method"))
            if run
            else None
        )
        return {
            "version": str(version.version),
            "run_id": version.run_id or None,
            "method": method or "unknown",
        }

    def _run(self, run_id: str | None):
        if not run_id:
            return None
        try:
            return self.client.get_run(run_id)
        except MlflowException:  # the run was deleted: the version still names it
            return None

    def recorded_metric(
        self, version: ModelVersion, metric: str, task: str | None
    ) -> tuple[str, float] | None:
        """(metric key, value): the gate metric as the version's training run recorded it for
        the heads that answer its known clients (the personal heads when the run bundled them,
        else the group heads, else the global ones), last round, mean over clients (pooled when
        only pooled figures exist); None when the run recorded none. A hint for choosing what to
        judge, not the gate: the gates score the current held-out data (``models/scoring.py``)."""
        run = self._run(version.run_id)
        if run is None:
            return None
        metrics = run.data.metrics
        bundled = run.data.params.get("tracking.bundle_personal_heads", "").lower() == "true"
        variants = ("personal", "group", "global") if bundled else ("group", "global")
        prefixes = ([f"{task}/"] if task else []) + [""]  # the first task's keys carry no prefix
        for variant in variants:
            for prefix in prefixes:
                for stat in ("mean", "pooled"):
                    key = f"{prefix}{variant}/{metric}/{stat}"
                    if key in metrics:
                        return key, float(metrics[key])
        return None

    def context(
        self, challenger: ModelVersion, champion: ModelVersion | None, metric: str, task: str | None
    ) -> dict[str, Any]:
        """What ``fedmtl promote`` says before its gates: the two versions (number, run, method)
        and, when the challenger is not the obvious choice, why and which version to judge
        instead (``suggest``): another version that is not the champion, registered after it
        (any, when there is none), neither rolled back nor already rejected against this
        champion, whose run recorded a better ``metric``; or, when the challenger was trained
        with another method than the champion, the best such version with the champion's method."""
        from fedmtl.eval.metrics import HIGHER_IS_BETTER

        higher = HIGHER_IS_BETTER.get(metric, True)
        new, old = self.describe(challenger), self.describe(champion)
        notes: list[str] = []
        suggest: str | None = None
        own = self.recorded_metric(challenger, metric, task)
        if own is not None:
            new.update(metric_key=own[0], metric_value=own[1])
        after = int(champion.version) if champion is not None else 0
        others = []
        for mv in self.client.search_model_versions(f"name = '{self.name}'", max_results=1000):
            tags = mv.tags or {}
            if (
                int(mv.version) <= after
                or str(mv.version) == str(challenger.version)
                or tags.get("promotion.decision") == "rolled_back"
                or (
                    champion is not None
                    and tags.get("promotion.decision") == "rejected"
                    and tags.get("promotion.compared_with") == str(champion.version)
                )
            ):
                continue
            found = self.recorded_metric(mv, metric, task)
            if found is not None:
                others.append(
                    {**self.describe(mv), "metric_key": found[0], "metric_value": found[1]}
                )
        sign = 1.0 if higher else -1.0
        others.sort(key=lambda o: (-sign * o["metric_value"], -int(o["version"])))
        better = [o for o in others if own is not None and sign * (o["metric_value"] - own[1]) > 0]
        if better:
            b = better[0]
            notes.append(
                f"version {b['version']} (method {b['method']}, run {b['run_id']}) "
                f"recorded {b['metric_key']} {b['metric_value']:.4f} on its training run, "
                f"better than version {new['version']}'s {own[1]:.4f}"
                + (f" (and {len(better) - 1} more version(s) did)" if len(better) > 1 else "")
            )
            suggest = b["version"]
        if old is not None and new["method"] != old["method"]:
            same = [o for o in others if o["method"] == old["method"]]
            notes.append(
                f"version {new['version']} was trained with method {new['method']}, "
                f"the champion (version {old['version']}) with {old['method']}"
                + (
                    f"; version {same[0]['version']} is the best registered since with "
                    f"{old['method']}"
                    if same
                    else ""
                )
            )
            if suggest is None and same:
                suggest = same[0]["version"]
        return {"challenger": new, "champion": old, "notes": notes, "suggest": suggest}
