"""Sites through Prefect (issue 18, in progress): each site serves a deployment of its own,
``fedmtl-site/NAME`` (``fedmtl site serve``: :meth:`prefect.Flow.serve` in the site's process,
on the site's machine, under the site's user), and the coordinator's round starts a flow run of
the deployment of each site it sampled (:class:`PrefectLauncher`) and waits for it until the
round's deadline.

Why a served deployment per site rather than a work pool per site: a run of
``fedmtl-site/NAME`` can only be picked up by the process serving that deployment (the site's),
no code storage or pull step is needed (the site runs the fedmtl it installed), and a site
that is offline simply leaves its run scheduled: the coordinator's deadline drops it and
cancels the run. Prefect carries only the task (``train`` or ``evaluate``), the round and the run
id; models and updates travel sealed through the exchange store (:mod:`fedmtl.sites`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect import flow, get_client
from prefect.deployments import run_deployment

from fedmtl.config import Config
from fedmtl.data.manifest import Manifest
from fedmtl.data.validation import ValidationReport
from fedmtl.sites.exchange import Exchange
from fedmtl.sites.identity import COORDINATOR, Identity, KnownParties
from fedmtl.sites.rounds import SiteSteps
from fedmtl.sites.site import gather_sites, open_session, publish_settings

#: the site flow's name: the site NAME's deployment is ``fedmtl-site/NAME``
SITE_FLOW = "fedmtl-site"
#: where a serving site keeps its folder (set by ``fedmtl site serve``)
SITE_DIR_ENV = "FEDMTL_SITE_DIR"


@flow(name=SITE_FLOW, log_prints=False)
def site_task(task: str, round: int, run: str) -> int:  # noqa: A002 - the parameter name Prefect shows
    """One task at this site: ``train`` (the round's local training) or ``evaluate``; returns
    the bytes it wrote to the exchange store."""
    root = os.environ.get(SITE_DIR_ENV)
    if not root:
        raise RuntimeError(
            f"{SITE_DIR_ENV} is not set: a site's flow runs under `fedmtl site serve`"
        )
    return open_session(Path(root), run).run_task(task, round)


class PrefectLauncher:
    """Starts a site's task as a run of its deployment and waits for it (module docs)."""

    def __init__(self, run: str, poll: float = 0.5) -> None:
        self.run, self.poll = run, poll

    def launch(self, site: str, round_: int, task: str = "train") -> UUID:
        flow_run = run_deployment(
            f"{SITE_FLOW}/{site}",
            parameters={"task": task, "round": round_, "run": self.run},
            timeout=0,  # started, not awaited: the round waits for all its sites together
            as_subflow=False,
        )
        return flow_run.id

    def wait(self, handle: UUID, timeout: float) -> None:
        end = time.monotonic() + timeout
        with get_client(sync_client=True) as client:
            while True:
                state = client.read_flow_run(handle).state
                if state is not None and state.is_final():
                    if state.is_completed():
                        return
                    raise RuntimeError(
                        f"the site's flow run ended {state.name}: {state.message or ''}".strip()
                    )
                if time.monotonic() >= end:
                    from prefect.states import Cancelled

                    client.set_flow_run_state(
                        handle, Cancelled(message="past the round's deadline"), force=True
                    )
                    raise TimeoutError
                time.sleep(self.poll)

    def finished(self, handle: UUID) -> bool:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(handle).state
        return state is not None and state.is_final()

    def close(self) -> None:
        pass


def serve_site(root: str | Path, **serve_options: Any) -> None:
    """Serves this site's deployment ``fedmtl-site/NAME`` until interrupted."""
    from fedmtl.sites.site import read_site

    name = read_site(root)["site"]
    os.environ[SITE_DIR_ENV] = str(Path(root).resolve())
    site_task.serve(name=name, **serve_options)


def sites_data(cfg: Config) -> tuple[Manifest, ValidationReport, list[str], dict[str, str], str]:
    """The coordinator's view of the sites' data (``federation.mode: sites``): the manifest and
    validation report from their sealed summaries, the sites that left none, the data version
    (a digest of the summaries: the sites' data as validated) and the summaries as JSON."""
    manifest, report, missing = gather_sites(cfg.federation.exchange, cfg.federation.sites)
    summary = json.dumps(
        {
            "manifest": json.loads(manifest.to_json()),
            "validation": report.to_dict(),
            "sites_without_summary": missing,
        },
        indent=2,
        sort_keys=True,
    )
    digest = hashlib.sha256(summary.encode()).hexdigest()
    version = {
        "data_version": f"sites:{digest[:16]}",
        "data_version_source": "sites",
        "data_hash": digest,
    }
    return manifest, report, missing, version, summary


def site_steps(cfg: Config, run: str) -> SiteSteps:
    """The round's steps with local training and evaluation at the sites, for ``run`` (the run's
    key: its messages' folder in the exchange store); the run's settings sealed there first."""
    coordinator = Identity.load(cfg.federation.coordinator_keys, COORDINATOR)
    known = KnownParties.from_folder(cfg.federation.sites)
    exchange = Exchange(cfg.federation.exchange, run)
    publish_settings(exchange, coordinator, cfg)
    return SiteSteps(
        exchange, coordinator, known, PrefectLauncher(run), deadline=cfg.federation.deadline
    )
