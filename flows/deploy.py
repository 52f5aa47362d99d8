"""The scheduled-training deployment: ``fedmtl-scheduled/<name>`` on a cron or interval schedule.

:func:`build_deployment` makes it from a ``Config`` (its dict is the deployment's
``config`` parameter; ``schedule.deployment`` its default name); :func:`serve` registers it
with the Prefect API and executes its runs (each in a subprocess started from the current
directory, the DVC project's root), in the foreground, like ``flow.serve`` (``fedmtl
schedule`` calls both). prefect.yaml describes the same deployment for
``prefect deploy`` and a process work pool.

Runs never overlap: the deployment has a concurrency limit of 1 with the ``ENQUEUE`` collision
strategy, so a run that comes due (or is triggered) while another is running is not started
but waits in the ``AwaitingConcurrencySlot`` state and starts when the running one has ended
(it is not cancelled). The serving runner itself also runs at most one flow run at a time.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.deployments.runner import EntrypointType, RunnerDeployment

from fedmtl.config import Config
from flows.scheduled import scheduled_training

FLOW_NAME = "fedmtl-scheduled"
CONCURRENCY = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)


class ScheduleError(ValueError):
    """An unusable schedule (none, both, or an invalid cron expression or interval)."""


def build_deployment(
    cfg: Config,
    name: str | None = None,
    cron: str | None = None,
    interval: float | None = None,
    timezone: str | None = None,
) -> RunnerDeployment:
    """The deployment of ``fedmtl-scheduled`` with exactly one of ``cron`` or ``interval``
    (seconds), concurrency limit 1, and ``cfg`` as its ``config`` parameter."""
    from prefect.client.schemas.schedules import CronSchedule, IntervalSchedule

    if (cron is None) == (interval is None):
        raise ScheduleError('give exactly one schedule: --cron "0 2 * * *" or --interval SECONDS')
    try:
        if cron is not None:
            schedule = CronSchedule(cron=cron, timezone=timezone)
        else:
            if interval <= 0:
                raise ValueError("must be positive")
            schedule = IntervalSchedule(interval=dt.timedelta(seconds=interval), timezone=timezone)
    except ValueError as exc:
        what = f"--cron {cron!r}" if cron is not None else f"--interval {interval}"
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise ScheduleError(f"{what} is not a valid schedule: {_short(exc) or first}") from None
    name = name or cfg.schedule.deployment
    return scheduled_training.to_deployment(
        name=name,
        schedule=schedule,
        concurrency_limit=CONCURRENCY,
        parameters=deployment_parameters(cfg),
        description=(
            "fedmtl scheduled training: refresh the DVC data (new data version), "
            "warm-start from the "
            "registry's champion, train, register a challenger. One run at a time."
        ),
        tags=["fedmtl", "scheduled"],
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def describe_schedule(deployment: RunnerDeployment) -> str:
    schedule = deployment.schedules[0].schedule
    cron = getattr(schedule, "cron", None)
    tz = getattr(schedule, "timezone", None) or "UTC"
    if cron is not None:
        return f"cron '{cron}' ({tz})"
    seconds = schedule.interval.total_seconds()
    return f"every {seconds:g} s" + (f" ({dt.timedelta(seconds=seconds)})" if seconds >= 60 else "")


def next_run(deployment: RunnerDeployment, after: dt.datetime | None = None) -> dt.datetime | None:
    """When the schedule next fires after ``after`` (default: now), as the server computes it."""
    from prefect.server.schemas import schedules as server_schedules

    client_schedule = deployment.schedules[0].schedule
    kind = getattr(server_schedules, type(client_schedule).__name__, None)
    if kind is None:
        return None
    server_schedule = kind.model_validate(client_schedule.model_dump())
    start = after or dt.datetime.now(dt.timezone.utc)
    dates = asyncio.run(server_schedule.get_dates(n=1, start=start))
    return dates[0] if dates else None


def serve(deployment: RunnerDeployment) -> None:
    """Register ``deployment`` and execute its runs until interrupted (Ctrl-C, SIGTERM); on
    the way out its schedule is paused (``pause_on_shutdown``) so no runs pile up unserved."""
    from prefect import serve as prefect_serve

    prefect_serve(deployment, limit=1, pause_on_shutdown=True, print_starting_message=False)


def deployment_parameters(cfg: Config) -> dict[str, Any]:
    return {"config": cfg.model_dump(mode="json")}


def _short(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        try:
            return "; ".join(str(e.get("msg", "")).removeprefix("Value error, ") for e in errors())
        except Exception:  # noqa: BLE001 - fall back to the plain message
            return ""
    return ""
