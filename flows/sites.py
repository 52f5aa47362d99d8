"""Sites through Prefect: each site is a Prefect **task worker** serving a task of its own,
``fedmtl_site_NAME`` (``fedmtl site serve``: :func:`prefect.task_worker.serve` in the site's
process, on the site's machine, under the site's user); the coordinator's round submits a
background run of each sampled site's task (:class:`PrefectLauncher`, as ``Task.delay``) and waits
for it until the round's deadline.

Why task workers, of the Prefect mechanisms that route work to one named place:

* a run of ``fedmtl_site_NAME`` reaches only the workers subscribed to that task key (the site's),
  pushed over the server's websocket: no polling interval;
* it runs *in* the site's long-lived process, which keeps torch, fedmtl and the run's session
  (its partition, its federation) loaded between rounds: a task costs about 0.1 s of Prefect
  overhead, where a run of a served deployment or a work pool's worker starts a new Python
  process each time (4-5 s here, importing torch and fedmtl: ``benchmarks/sites.py`` measured
  both);
* no code storage or pull step: the site runs the fedmtl it installed;
* a site that is offline leaves its run scheduled: the coordinator's deadline drops it and
  cancels the run (a worker that comes back skips it).

Prefect carries only the task (``train`` or ``evaluate``), the round and the run id, as the task
run's tags (no parameters, so nothing goes to Prefect's result storage); models and updates travel
sealed through the exchange store (:mod:`fedmtl.sites`). The server is reached with Prefect's
own settings (``PREFECT_API_URL``; a self-hosted server with ``PREFECT_SERVER_API_AUTH_STRING``
is reached with ``PREFECT_API_AUTH_STRING`` at the coordinator and every site).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import io
import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from prefect import Task, get_client, task
from prefect.futures import PrefectDistributedFuture
from prefect.utilities.asyncutils import run_coro_as_sync
from prefect.utilities.engine import emit_task_run_state_change_event

from fedmtl.config import Config
from fedmtl.data.manifest import Manifest
from fedmtl.data.validation import ValidationReport
from fedmtl.sites.envelope import open_envelope, seal
from fedmtl.sites.exchange import Exchange
from fedmtl.sites.identity import COORDINATOR, Identity, KnownParties, check_name
from fedmtl.sites.rounds import SiteSession, SiteSteps
from fedmtl.sites.site import gather_sites, open_session, publish_settings

#: the site NAME's task (its key starts with ``fedmtl_site_NAME-``)
SITE_TASK = "fedmtl_site"
#: where a serving site keeps its folder (set by ``fedmtl site serve``)
SITE_DIR_ENV = "FEDMTL_SITE_DIR"
#: the task that scores a registered model version at a site (the promotion gates)
SCORE = "score"
#: the task that does nothing at the site: is it there, and what does a round trip cost
PING = "ping"
#: the task run's tags that say what to do: fedmtl-task=train, fedmtl-round=3, fedmtl-run=ID
TAG = "fedmtl-"


def _task_name(site: str) -> str:
    return f"{SITE_TASK}_{check_name(site).replace('-', '_').replace('.', '_')}"


@functools.lru_cache(maxsize=4)
def _session(root: str, run: str) -> SiteSession:
    """The site's session of a run, kept while the site serves (its partition and federation
    loaded once)."""
    return open_session(Path(root), run)


def _never_cached(*_: Any) -> str:
    return uuid.uuid4().hex  # every run of a site's task runs (a task worker caches by default)


def _work() -> int:
    """One task at this site (what the task run's tags say): ``train`` (the round's local
    training) or ``evaluate``; returns the bytes it wrote to the exchange store."""
    from prefect.runtime import task_run

    root = os.environ.get(SITE_DIR_ENV)
    if not root:
        raise RuntimeError(
            f"{SITE_DIR_ENV} is not set: a site's task runs under `fedmtl site serve`"
        )
    with get_client(sync_client=True) as client:
        tags = client.read_task_run(task_run.id).tags
    job = dict(t[len(TAG) :].split("=", 1) for t in tags if t.startswith(TAG) and "=" in t)
    missing = {"task", "round", "run"} - set(job)
    if missing:
        raise ValueError(f"the task run's tags lack {', '.join(sorted(missing))}: {tags}")
    if job["task"] == PING:
        return 0
    if job["task"] == SCORE:  # the promotion gates: a registered version, scored here
        return _score_here(root, job["run"], job["round"])
    return _session(root, job["run"]).run_task(job["task"], int(job["round"]))


def _score_here(root: str, run: str, version: str) -> int:
    """Scores the model version the coordinator sealed for ``run`` on this site's held-out rows
    (as the promotion gates score every client in simulation); the sealed records out."""
    from fedmtl.bundle import PersonalizedBundle
    from fedmtl.sites.site import read_site
    from models.personalized import PersonalizedPredictor
    from models.scoring import held_out_rows, score_clients

    site = read_site(root)
    name = check_name(site["site"])
    known = KnownParties.from_folder(Path(root) / "trusted")
    exchange = Exchange(site["exchange"], run)
    blob = exchange.get(exchange.scoring(version))
    if blob is None:
        raise FileNotFoundError(f"site '{name}': no model version {version} to score in {run}")
    payload = open_envelope(
        blob, known, sender=COORDINATOR, run=run, round_=int(version), kind="score-model"
    )
    bundle = PersonalizedBundle.from_dict(torch.load(io.BytesIO(payload), weights_only=True))
    scores = score_clients(PersonalizedPredictor(bundle), held_out_rows(site["partitions"], [name]))
    identity = Identity.load(Path(root) / "keys", name)
    body = scores.to_json(orient="records").encode()
    sealed = seal(body, identity, run=run, round_=int(version), kind="scores")
    return exchange.put(exchange.scores(version, name), sealed)


def score_at_sites(
    cfg: Config, bundle: Any, version: str, sites: list[str]
) -> tuple[pd.DataFrame, dict[str, str]]:
    """The coordinator's side of the promotion gates with sites: ``bundle`` (a registered
    version's model, checked against its hashes by the caller) sealed into the exchange store,
    scored by every site on its own held-out rows; (the scores as ``score_clients`` gives them,
    site -> why it gave none)."""
    run = f"promote-{uuid.uuid4().hex[:12]}"
    coordinator = Identity.load(cfg.federation.coordinator_keys, COORDINATOR)
    known = KnownParties.from_folder(cfg.federation.sites)
    exchange = Exchange(cfg.federation.exchange, run)
    buffer = io.BytesIO()
    torch.save(bundle.to_dict(), buffer)
    sealed = seal(buffer.getvalue(), coordinator, run=run, round_=int(version), kind="score-model")
    exchange.put(exchange.scoring(version), sealed)
    launcher = PrefectLauncher(run)
    handles = launcher.launch_all(sites, int(version), SCORE)
    end = time.monotonic() + cfg.federation.deadline
    frames, missing = [], {}
    for site, handle in handles.items():
        try:
            launcher.wait(handle, max(0.0, end - time.monotonic()))
            blob = exchange.get(exchange.scores(version, site))
            if blob is None:
                raise FileNotFoundError(f"site '{site}': finished but left no scores")
            payload = open_envelope(
                blob, known, sender=site, run=run, round_=int(version), kind="scores"
            )
            frame = pd.read_json(io.StringIO(payload.decode()), orient="records")
            if not frame.empty and set(frame["client"].astype(str)) != {site}:
                raise ValueError(f"site '{site}': its scores hold other clients")
        except Exception as exc:  # noqa: BLE001 - a site that cannot score is named, left out
            missing[site] = f"site '{site}': {exc}" if f"'{site}'" not in str(exc) else str(exc)
            continue
        frames.append(frame)
    return (pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()), missing


def site_task(site: str) -> Task:
    """The task that only ``site``'s worker runs (one key per site)."""

    def work() -> int:
        return _work()

    work.__qualname__ = work.__name__ = _task_name(site)
    return task(work, name=f"fedmtl-site-{site}", cache_key_fn=_never_cached)


def served_keys() -> dict[str, str]:
    """The task key each site's worker serves now (from the server's live task workers):
    site task name -> key."""
    with get_client(sync_client=True) as client:
        response = client.request("POST", "/task_workers/filter", json={})
    keys = {}
    for worker in response.json():
        for key in worker.get("task_keys", []):
            if key.startswith(f"{SITE_TASK}_"):
                keys[key.rsplit("-", 1)[0]] = key
    return keys


def online(sites: list[str]) -> list[str]:
    """Those of ``sites`` whose worker is subscribed now."""
    keys = served_keys()
    return [s for s in sites if _task_name(s) in keys]


class PrefectLauncher:
    """Submits a site's task as a background task run and waits for it (module docs)."""

    def __init__(self, run: str, poll: float = 0.05) -> None:
        self.run, self.poll = run, poll
        self._keys: tuple[float, dict[str, str]] = (float("-inf"), {})

    def _served(self) -> dict[str, str]:
        """:func:`served_keys`, asked once for a round's launches (kept for 5 s)."""
        at, keys = self._keys
        if time.monotonic() - at > 5.0:
            self._keys = (time.monotonic(), keys := served_keys())
        return keys

    def _job(self, site: str, round_: int, task: str) -> Task:
        job = site_task(site).with_options(
            tags={f"{TAG}task={task}", f"{TAG}round={int(round_)}", f"{TAG}run={self.run}"}
        )
        # the key the site's worker serves (its fedmtl may sit at another path or version);
        # this process's own when the site is not subscribed now (its run waits for it)
        job.task_key = self._served().get(_task_name(site), job.task_key)
        return job

    def launch(self, site: str, round_: int, task: str = "train") -> PrefectDistributedFuture:
        return self.launch_all([site], round_, task)[site]

    def launch_all(
        self, sites: list[str], round_: int, task: str = "train"
    ) -> dict[str, PrefectDistributedFuture]:
        """What ``Task.delay`` does for each site's task, the round's runs created at once (one
        client, concurrent requests): a serial ``delay`` costs a round trip per site."""
        jobs = {site: self._job(site, round_, task) for site in sites}

        async def create() -> list[Any]:
            async with get_client() as client:
                return await asyncio.gather(
                    *(job.create_run(client=client, deferred=True) for job in jobs.values())
                )

        runs = run_coro_as_sync(create())
        for run in runs:  # the event ``delay`` emits (what automations and the UI see)
            emit_task_run_state_change_event(
                task_run=run, initial_state=None, validated_state=run.state
            )
        return {
            site: PrefectDistributedFuture(task_run_id=run.id)
            for site, run in zip(jobs, runs, strict=True)
        }

    def wait(self, handle: PrefectDistributedFuture, timeout: float) -> None:
        # the task run's state, polled: not the future's event subscription, which stays with
        # the first API a process used
        end = time.monotonic() + timeout
        with get_client(sync_client=True) as client:
            while True:
                state = client.read_task_run(handle.task_run_id).state
                if state is not None and state.is_final():
                    if state.is_completed():
                        return
                    raise RuntimeError(
                        f"the site's task run ended {state.name}: {state.message or ''}".strip()
                    )
                if time.monotonic() >= end:
                    from prefect.states import Cancelled

                    client.set_task_run_state(
                        handle.task_run_id,
                        Cancelled(message="past the round's deadline"),
                        force=True,
                    )
                    raise TimeoutError
                time.sleep(self.poll)

    def finished(self, handle: PrefectDistributedFuture) -> bool:
        with get_client(sync_client=True) as client:
            state = client.read_task_run(handle.task_run_id).state
        return state is not None and state.is_final()

    def close(self) -> None:
        pass


def serve_site(root: str | Path) -> None:
    """Serves this site's task ``fedmtl_site_NAME`` until interrupted (one task at a time)."""
    from prefect.task_worker import serve

    from fedmtl.sites.site import read_site

    name = read_site(root)["site"]
    os.environ[SITE_DIR_ENV] = str(Path(root).resolve())
    # a background task has no flow run for its logs to go to: they stay in the site's own log
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
    # the site's own log: a line per task (where its time went), never leaves the site
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s | %(levelname)s | %(message)s"))
    sites_log = logging.getLogger("fedmtl.sites")
    sites_log.addHandler(handler)
    sites_log.setLevel(logging.INFO)
    sites_log.propagate = False
    serve(site_task(name), limit=1)


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
