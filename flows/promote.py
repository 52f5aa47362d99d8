"""Champion/challenger promotion and rollback as Prefect flows.

``fedmtl-promote``: both versions answer every validated client's held-out rows (the current
partitions, through each model's own routing; each loaded only once its artifacts matched the
hashes recorded at registration, tasks/registry.py), the gates of ``promotion`` decide
(``fedmtl/lifecycle/promotion.py``), and the registry records the decision and, on a pass, moves the
``champion`` alias (``tasks/promotion.py``). ``fedmtl-rollback`` gives ``champion`` back to the
version the current champion replaced.

Two promotions at once: the decision is written only if the champion is still the one it was
made against (checked under the model's registry lock, :meth:`Registry.apply`); when another
promotion or a rollback moved it meanwhile, the challenger is judged again against the new
champion (its scores are kept; only the new champion is scored), and the decision it records
says what changed under it.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
from prefect import flow, get_run_logger, task, unmapped
from prefect.cache_policies import NO_CACHE

from fedmtl.config import Config
from fedmtl.data.manifest import read_manifest
from fedmtl.data.validation import read_report, usable_clients
from fedmtl.lifecycle.promotion import Decision, decide
from models.scoring import held_out_rows, score_clients
from tasks.promotion import (
    CHALLENGER,
    CHAMPION,
    ChampionChanged,
    Registry,
    RegistryError,
    actor_name,
)
from tasks.registry import check_artifacts

MAX_ATTEMPTS = 5  # decisions made again because the champion moved meanwhile, before giving up


@task(name="score_model", task_run_name="score-v{version}", cache_policy=NO_CACHE)
def score_model(
    version: str, registry: Registry, partitions_dir: str, clients: list[str]
) -> pd.DataFrame:
    """Every client's held-out metrics under one model version."""
    mv = registry.version(version)
    predictor = registry.predictor(mv)
    try:
        return score_clients(predictor, held_out_rows(partitions_dir, clients))
    except ValueError as exc:
        raise RegistryError(
            f"version {version} of '{registry.name}' cannot score the current data: {exc}"
        ) from None


def score_at_sites(cfg: Config, registry: Registry, version: str, sites: list[str]) -> pd.DataFrame:
    """Every site's held-out metrics under one model version, scored at the sites; a site that
    gives none is named in the log and left out of the gates."""
    from flows.sites import score_at_sites as scored

    predictor = registry.predictor(registry.version(version))  # its artifacts' hashes checked
    scores, missing = scored(cfg, predictor.bundle, version, sites)
    for why in missing.values():
        get_run_logger().warning("version %s not scored at a site: %s", version, why)
    if scores.empty:
        raise RegistryError(f"no site scored version {version} of '{registry.name}'")
    return scores


@flow(name="fedmtl-promote", log_prints=False)
def promote(
    config: dict[str, Any],
    challenger: str = CHALLENGER,
    actor: str | None = None,
    dry_run: bool = False,
) -> dict[str, Any]:
    """Compare ``challenger`` (a version number or alias) with the champion on every client's
    held-out data; promote it if every gate passes. ``dry_run``: decide, record nothing."""
    cfg = Config.model_validate(config)
    logger = get_run_logger()
    registry = Registry.open(
        cfg.tracking.tracking_uri, cfg.tracking.registered_model, cfg.tracking.artifact_root
    )
    new = registry.version(challenger)
    old = registry.by_alias(CHAMPION)
    if old is not None and old.version == new.version:
        raise RegistryError(f"version {new.version} of '{registry.name}' is already the champion")
    # what is judged, said before the gates: which version, run and method, and whether another
    # version looks like the better candidate (the alias challenger follows the newest version)
    about = registry.context(new, old, cfg.promotion.metric, cfg.promotion.task)
    for note in about["notes"]:
        logger.warning("%s", note)
    at_sites = cfg.federation.mode == "sites"
    if at_sites:  # the sites' summaries; each site scores both versions on its own rows
        from flows.sites import sites_data

        manifest, report, *_ = sites_data(cfg)
        clients = usable_clients(manifest, report, 1)
    else:
        manifest = read_manifest(cfg.data.partitions_dir)
        clients = usable_clients(manifest, read_report(cfg.data.validation_dir), 1)
    who = actor_name(actor)
    scores: dict[str, pd.DataFrame] = {}  # by version: a version's scores do not change
    changed: list[
        str
    ] = []  # how the champion moved under this promotion, recorded with its decision
    record = None

    for _ in range(MAX_ATTEMPTS):
        if (
            old is not None and old.version == new.version
        ):  # a concurrent promotion of the same version
            raise RegistryError(
                f"version {new.version} of '{registry.name}' is already the champion: {changed[-1]}"
            )
        versions = [str(new.version)] + ([str(old.version)] if old is not None else [])
        missing = [v for v in versions if v not in scores]
        if missing and at_sites:
            scores.update({v: score_at_sites(cfg, registry, v, clients) for v in missing})
        elif missing:
            futures = score_model.map(
                missing, unmapped(registry), unmapped(cfg.data.partitions_dir), unmapped(clients)
            )
            scores.update(zip(missing, (f.result() for f in futures)))
        champion_scores = scores[str(old.version)] if old is not None else None
        decision = decide(
            scores[str(new.version)], champion_scores, registry.run_facts(new), cfg.promotion
        )
        if dry_run:
            break
        tables = {
            "per_client.csv": decision.per_client,
            "challenger_scores.csv": scores[str(new.version)],
        }
        if old is not None:
            tables["champion_scores.csv"] = champion_scores
        if (
            registry.run_facts(new).privacy != "none" or cfg.privacy.active
        ):  # each client's own figures:
            tables = {}  # not published next to a private model (the decision's summary still is)
        try:
            record = registry.apply(
                decision,
                new,
                old,
                who,
                cfg.tracking.experiment,
                tables,
                changed,
                _waiting(logger, registry.name),
            )
            break
        except ChampionChanged as exc:
            logger.warning("%s: judging version %s again", exc, new.version)
            changed.append(str(exc))
            old = exc.current
    else:
        raise RuntimeError(
            f"the champion of '{registry.name}' changed {MAX_ATTEMPTS} times while version "
            f"{new.version} was being judged; nothing was recorded: try again"
        )
    logger.info(
        "version %s %s: %s",
        new.version,
        "promoted" if decision.promote else "rejected",
        "; ".join(decision.reasons),
    )
    out = result(
        decision, registry, new.version, old.version if old else None, who, record, dry_run
    )
    out["champion_changed"] = changed
    out["judged"] = {
        **about,
        "champion": registry.describe(old) if old is not None else None,
        "challenger_ref": challenger,
    }
    return out


@flow(name="fedmtl-rollback", log_prints=False)
def rollback(config: dict[str, Any], actor: str | None = None, reason: str = "") -> dict[str, Any]:
    """Give ``champion`` back to the version the current champion replaced, once that version's
    artifacts matched their recorded hashes (else :class:`~tasks.registry.ModelIntegrityError`,
    and the champion stays)."""
    cfg = Config.model_validate(config)
    registry = Registry.open(
        cfg.tracking.tracking_uri, cfg.tracking.registered_model, cfg.tracking.artifact_root
    )
    who = actor_name(actor)
    current = registry.by_alias(CHAMPION)
    previous = (
        current.tags.get("promotion.replaced_version", "none") if current is not None else "none"
    )
    if previous not in (
        "",
        "none",
    ):  # never give champion to a version whose artifacts were changed
        check_artifacts(f"models:/{registry.name}/{previous}", registry.tracking_uri)
    current, restored, record = registry.rollback(
        who, cfg.tracking.experiment, reason, _waiting(get_run_logger(), registry.name)
    )
    get_run_logger().info(
        "champion of '%s': version %s -> %s", registry.name, current.version, restored.version
    )
    return {
        "model": registry.name,
        "from_version": str(current.version),
        "to_version": str(restored.version),
        "by": who,
        "record_run": record,
    }


def _waiting(logger, model: str):
    """What to say when another process holds the model's registry lock."""

    def waiting(path) -> None:
        logger.warning(
            "waiting for another promotion or rollback of '%s' to finish writing (lock %s)",
            model,
            path,
        )

    return waiting


def result(
    decision: Decision,
    registry: Registry,
    new: str,
    old: str | None,
    who: str,
    record: str | None,
    dry_run: bool,
) -> dict[str, Any]:
    return {
        **decision.summary(),
        "reasons": decision.reasons,
        "model": registry.name,
        "challenger_version": str(new),
        "champion_version": str(old) if old else None,
        "by": who,
        "record_run": record,
        "dry_run": dry_run,
        "per_client": decision.per_client.to_dict(orient="records"),
    }
