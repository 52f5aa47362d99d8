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
from pathlib import Path

import yaml

from fedmtl.client.store import ClientStore
from fedmtl.config import Config
from fedmtl.data.manifest import read_manifest
from fedmtl.federation import Federation
from fedmtl.sites.envelope import open_envelope, seal
from fedmtl.sites.exchange import Exchange
from fedmtl.sites.identity import COORDINATOR, Identity, KnownParties, check_name
from fedmtl.sites.rounds import SiteSession

SITE_FILE = "site.yaml"
SETTINGS = "run.env"


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
    return root


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
    return SiteSession(identity, known, exchange, fed, name)
