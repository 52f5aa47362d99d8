"""A site's folder, and what the coordinator tells every site at the start of a run.

A site keeps everything of its own in one folder, readable by its own user only::

    SITE/site.yaml      its name, the exchange store's URL, where its partition is
    SITE/keys/          its key pair (NAME.key, 0600; NAME.pub to give the coordinator)
    SITE/trusted/       the public keys it trusts (the coordinator's: coordinator.pub)
    SITE/store/RUN/     its clients' personal state, per run (never leaves the site)

The coordinator seals the run's settings (the whole :class:`fedmtl.config.Config`) into the
exchange store once (:func:`publish_settings`); a site trains with exactly those settings, its
own data paths put in place of the coordinator's (:func:`open_session`), so that the model is
the one the simulation would train.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import yaml

from fedmtl.bundle import PersonalizedBundle
from fedmtl.client.store import ClientStore
from fedmtl.config import Config
from fedmtl.config.sections import ValidationConfig
from fedmtl.data.manifest import Manifest, read_manifest, write_manifest
from fedmtl.data.validation import ClientValidation, ValidationReport, validate_partitions
from fedmtl.federation import Federation
from fedmtl.sites.envelope import open_envelope, seal
from fedmtl.sites.exchange import Exchange
from fedmtl.sites.identity import COORDINATOR, Identity, KnownParties, check_name
from fedmtl.sites.rounds import SiteSession
from fedmtl.state import PersonalState

SITE_FILE = "site.yaml"
SETTINGS = "run.env"
#: the exchange store's area outside any run, where each site leaves its sealed summary
SUMMARIES = "sites"
#: what every site's data must share with the others' (the model is built from it)
SCHEMA = ("features", "tasks", "input_shape", "feature_range")


class SiteError(ValueError):
    """A site folder or run that cannot be used (the message names the site and what)."""


def init_site(
    root: str | Path, name: str, partitions: str | Path, exchange: str, coordinator_key: str | Path
) -> Path:
    """Creates the site's folder (mode 0700): its key pair, the coordinator's public key, and
    ``site.yaml``. ``partitions``: the site's own validated partition (a folder with its
    manifest, naming the site as its one client)."""
    root = Path(root)
    check_name(name)
    manifest = read_manifest(partitions)
    if manifest.client_ids != [name]:
        raise SiteError(
            f"site '{name}': the partition at {partitions} holds clients {manifest.client_ids}; a "
            f"site's partition holds its own client only, named '{name}'"
        )
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    Identity.generate(name).save(root / "keys")
    (root / "trusted").mkdir(exist_ok=True)
    shutil.copyfile(coordinator_key, root / "trusted" / f"{COORDINATOR}.pub")
    KnownParties.from_folder(root / "trusted")  # refuses a file that is not a public key
    settings = {"site": name, "exchange": exchange, "partitions": str(Path(partitions).resolve())}
    (root / SITE_FILE).write_text(yaml.safe_dump(settings, sort_keys=False))
    publish_summary(root)
    return root


def publish_summary(
    root: str | Path, validation: ValidationConfig | None = None
) -> ValidationReport:
    """Validates the site's partition at the site (Great Expectations, the same suite as in
    simulation; results and Data Docs in ``SITE/validation``) and leaves its sealed summary in the
    exchange store: its manifest entry (row counts, group, the data's schema) and the outcome
    (passed, or quarantined with each failing expectation). Never a row."""
    root = Path(root)
    site = read_site(root)
    name = site["site"]
    manifest = read_manifest(site["partitions"])
    report = validate_partitions(
        site["partitions"], manifest, validation or ValidationConfig(), root / "validation"
    )
    outcome = report.clients[name]
    body = {
        "manifest": json.loads(manifest.to_json()),
        "validation": {"passed": outcome.passed, "failures": outcome.failures},
    }
    identity = Identity.load(root / "keys", name)
    exchange = Exchange(site["exchange"], SUMMARIES)
    sealed = seal(json.dumps(body).encode(), identity, run=SUMMARIES, round_=0, kind="validation")
    exchange.put(f"{name}.env", sealed)
    return report


def gather_sites(
    exchange_url: str, sites_keys: str | Path
) -> tuple[Manifest, ValidationReport, list[str]]:
    """The coordinator's side: every known site's sealed summary (``sites_keys``: a folder of
    ``NAME.pub``), checked, as one manifest (public metadata only: no site's data is read) and a
    validation report; and the sites that left no summary, named. A site whose data's schema
    differs from the others' is refused, naming it."""
    known = KnownParties.from_folder(sites_keys)
    known.keys.pop(COORDINATOR, None)
    if not known.keys:
        raise SiteError(f"no site public keys (NAME.pub) in {sites_keys} (federation.sites)")
    exchange = Exchange(exchange_url, SUMMARIES)
    entries, results, missing, schema, first = [], {}, [], None, None
    for name in sorted(known.keys):
        blob = exchange.get(f"{name}.env")
        if blob is None:
            missing.append(name)
            continue
        body = json.loads(
            open_envelope(blob, known, sender=name, run=SUMMARIES, round_=0, kind="validation")
        )
        raw = body["manifest"]
        described = [c["client"] for c in raw["clients"]]
        if described != [name]:
            raise SiteError(f"site '{name}': its summary describes clients {described}")
        mine = {k: raw.get(k) for k in SCHEMA}
        if schema is None:
            schema, first = mine, {k: v for k, v in raw.items() if k != "clients"}
        elif mine != schema:
            differ = [k for k in SCHEMA if mine[k] != schema[k]]
            raise SiteError(
                f"site '{name}': its data's {', '.join(differ)} differ from the other sites'; "
                "every site must hold the same columns and tasks"
            )
        entries.append(raw["clients"][0])
        verdict = body["validation"]
        results[name] = ClientValidation(
            name, f"(at site '{name}')", bool(verdict["passed"]), list(verdict["failures"])
        )
    if not entries:
        raise SiteError(
            f"no site has left a summary in {exchange_url} yet "
            "(run `fedmtl site init` at each site)"
        )
    manifest = Manifest.from_dict({**first, "clients": entries})
    return manifest, ValidationReport(results), missing


def read_site(root: str | Path) -> dict:
    path = Path(root) / SITE_FILE
    if not path.exists():
        raise SiteError(
            f"{root} is not a site folder (no {SITE_FILE}; create one with `fedmtl site init`)"
        )
    settings = yaml.safe_load(path.read_text()) or {}
    missing = {"site", "exchange", "partitions"} - set(settings)
    if missing:
        raise SiteError(f"{path} lacks {', '.join(sorted(missing))}")
    return settings


def publish_settings(exchange: Exchange, coordinator: Identity, cfg: Config) -> int:
    """The coordinator's side: the run's settings, sealed, for every site to train with."""
    body = json.dumps(cfg.model_dump(mode="json")).encode()
    return exchange.put(
        SETTINGS, seal(body, coordinator, run=exchange.run, round_=0, kind="run-settings")
    )


def open_session(root: str | Path, run: str) -> SiteSession:
    """The site's session for ``run``: the coordinator's settings (checked: sealed by the
    coordinator for this run) with the site's own data paths, its partition, its key."""
    root = Path(root)
    site = read_site(root)
    name = check_name(site["site"])
    identity = Identity.load(root / "keys", name)
    known = KnownParties.from_folder(root / "trusted")
    exchange = Exchange(site["exchange"], run)
    blob = exchange.get(SETTINGS)
    if blob is None:
        raise SiteError(f"site '{name}': run {run} has no settings in the exchange store yet")
    tree = json.loads(
        open_envelope(blob, known, sender=COORDINATOR, run=run, round_=0, kind="run-settings")
    )
    tree["data"]["partitions_dir"] = site["partitions"]
    tree["training"]["workdir"] = str(root / "work")
    cfg = Config.model_validate(tree)
    manifest = read_manifest(site["partitions"])
    fed = Federation.from_config(cfg, manifest, ClientStore(root / "store" / check_name(run)))
    return SiteSession(identity, known, exchange, fed, name, patience=cfg.federation.deadline)


def personal_state(root: str | Path, run: str | None = None) -> tuple[str, PersonalState]:
    """The personal state this site keeps for ``run`` (default: the run it trained in last):
    (the run, its personal heads and base). Never leaves the site unless it opts in."""
    root = Path(root)
    name = check_name(read_site(root)["site"])
    stores = root / "store"
    runs = sorted(
        (p for p in stores.iterdir() if p.is_dir()) if stores.is_dir() else [],
        key=lambda p: p.stat().st_mtime,
    )
    if run is None and not runs:
        raise SiteError(f"site '{name}': no personal state in {stores} yet (train first)")
    chosen = stores / check_name(run) if run is not None else runs[-1]
    kept = ClientStore(chosen).load(name) if chosen.is_dir() else None
    if kept is None:
        raise SiteError(f"site '{name}': no personal state for run '{chosen.name}' in {stores}")
    return chosen.name, kept


def with_personal(
    bundle: PersonalizedBundle, client: str, kept: PersonalState
) -> PersonalizedBundle:
    """``bundle`` (the registered shared model) answering for ``client`` with its own personal
    heads (and base), and for nobody else's: the site's personalised model."""
    return replace(
        bundle,
        personal_heads={client: dict(kept.heads)} if kept.heads else {},
        personal_bases={client: kept.base} if kept.base is not None else {},
    )


def site_partition(partitions: str | Path, client: str, dest: str | Path) -> Path:
    """``client``'s partition file from a partition folder, with a manifest naming it alone, in
    ``dest``: a site's own partition (e.g. a simulated federation's client handed to its site)."""
    manifest = read_manifest(partitions)
    entry = manifest.entry(client)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(partitions) / entry.file, dest / entry.file)
    raw = json.loads(manifest.to_json())
    mine = [c for c in raw["clients"] if c["client"] == client]
    write_manifest(dest, Manifest.from_dict({**raw, "clients": mine}))
    return dest
