"""``fedmtl schedule``: recurring training as a Prefect deployment, served in the foreground."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.app import ParamsOpt, SetOpt, VerboseOpt, _config, _fail, app, console
from fedmtl import quiet


@app.command("schedule")
def schedule(
    cron: Annotated[
        Optional[str],
        typer.Option(
            "--cron",
            help='cron expression, e.g. "0 2 * * *" (02:00 every day; UTC unless --timezone)',
        ),
    ] = None,
    interval: Annotated[
        Optional[float], typer.Option("--interval", help="seconds between runs (instead of --cron)")
    ] = None,
    name: Annotated[
        Optional[str], typer.Option("--name", help="deployment name (default: schedule.deployment)")
    ] = None,
    timezone: Annotated[
        Optional[str], typer.Option("--timezone", help="time zone of --cron, e.g. Europe/Berlin")
    ] = None,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Schedule recurring training (a Prefect deployment, served in the foreground).

    The deployment fedmtl-scheduled/NAME runs on the schedule: DVC data refresh, warm start
    from the champion, training, promotion gates; one run at a time. Needs a Prefect server
    (PREFECT_API_URL). Ctrl-C stops serving and pauses the schedule."""
    import datetime as dt

    cfg = _config(params, set_)
    quiet.configure(verbose)
    if (cron is None) == (interval is None):
        _fail(ValueError('give exactly one schedule: --cron "0 2 * * *" or --interval SECONDS'), 2)
    _check_schedule(cron, interval, timezone)  # before the DVC and Prefect server checks
    if cfg.refreshes_data:
        from fedmtl.lifecycle.datarefresh import DataRefreshError, check_params, require_project

        try:
            check_params(cfg, require_project(Path.cwd()))
        except DataRefreshError as exc:
            _fail(exc, 2)
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL

    api = PREFECT_API_URL.value()
    if not api:
        _fail(
            ValueError(
                "fedmtl schedule needs a Prefect server to keep the schedule: start one with "
                "`prefect server start`, then "
                "`prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api` "
                "(or export PREFECT_API_URL)"
            ),
            2,
        )
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        unhealthy = client.api_healthcheck()
    if unhealthy is not None:
        _fail(
            ConnectionError(
                f"cannot reach the Prefect API at {api} (PREFECT_API_URL): {unhealthy}"
            ),
            2,
        )
    from flows.deploy import FLOW_NAME, ScheduleError, build_deployment, describe_schedule, next_run
    from flows.deploy import serve as serve_deployment

    try:
        deployment = build_deployment(cfg, name, cron, interval, timezone)
    except ScheduleError as exc:
        _fail(exc, 2)
    full = f"{FLOW_NAME}/{deployment.name}"
    when = next_run(deployment)
    if when is not None:
        wait = when - dt.datetime.now(dt.timezone.utc)
        minutes = max(0, int(wait.total_seconds() // 60))
        when_text = f"{when:%Y-%m-%d %H:%M:%S %Z} (in {minutes // 60} h {minutes % 60} min)"
    else:
        when_text = "unknown"
    steps = (
        "DVC data refresh (prepare, partition, validate"
        + (", push" if cfg.schedule.push_data else "")
        + ") → "
        if cfg.refreshes_data
        else ""
    )
    start = "the champion" if cfg.schedule.warm_start == "champion" else "a fresh initialisation"
    console.print(f"serving deployment [bold]{full}[/] (Prefect API {api})")
    console.print(f"  schedule:   {describe_schedule(deployment)}; next run {when_text}")
    judged = " → promotion gates (champion if it passes)" if cfg.schedule.promote else ""
    console.print(
        f"  each run:   {steps}train {cfg.training.rounds} rounds from {start} "
        f"of '{cfg.tracking.registered_model}'{judged}"
    )
    console.print(
        "  overlap:    never (concurrency limit 1: a run due while one runs waits for it)"
    )
    console.print(f"  run now:    [bold]prefect deployment run '{full}'[/]")
    if PREFECT_UI_URL.value():
        console.print(f"  runs:       {PREFECT_UI_URL.value()}/deployments")
    console.print(
        "Ctrl-C stops serving (and pauses the schedule until the next `fedmtl schedule`)."
    )
    sys.stdout.flush()
    import logging

    flows_logger = logging.getLogger("prefect.flows")
    shown, level = flows_logger.getEffectiveLevel(), flows_logger.level

    class HowStopped(logging.Filter):
        """Prefect's serve catches Ctrl-C and SIGTERM alike and only logs (at INFO) which it was;
        the logger is opened to INFO to see it, and shows what it showed before."""

        interrupted = False

        def filter(self, record: logging.LogRecord) -> bool:
            if record.getMessage().startswith("Received KeyboardInterrupt"):
                HowStopped.interrupted = True
            return record.levelno >= shown

    watch = HowStopped()
    flows_logger.addFilter(watch)
    flows_logger.setLevel(min(shown, logging.INFO))
    try:
        serve_deployment(deployment)
    except KeyboardInterrupt:
        HowStopped.interrupted = True
    finally:
        flows_logger.removeFilter(watch)
        flows_logger.setLevel(level)
    console.print(f"stopped serving {full}; its schedule is paused")
    if (
        HowStopped.interrupted
    ):  # Ctrl-C: 130, as an interrupted command; SIGTERM (a service stop): 0
        raise typer.Exit(130)


def _check_schedule(cron: str | None, interval: float | None, timezone: str | None) -> None:
    """Exit 2 naming the option when --cron, --interval or --timezone is invalid (Prefect's own
    validation of cron expressions and IANA time zones)."""
    import datetime as dt

    from prefect.client.schemas.schedules import CronSchedule, IntervalSchedule
    from pydantic import ValidationError

    if interval is not None and not interval > 0:
        _fail(
            ValueError(
                f"--interval {interval} is not a valid schedule: it must be a positive number of "
                "seconds"
            ),
            2,
        )
    try:
        if cron is not None:
            CronSchedule(cron=cron, timezone=timezone)
        else:
            IntervalSchedule(interval=dt.timedelta(seconds=interval or 1), timezone=timezone)
    except ValidationError as exc:
        problem = exc.errors()[0]
        option = "--timezone" if problem["loc"] and problem["loc"][0] == "timezone" else "--cron"
        value = timezone if option == "--timezone" else cron
        message = str(problem["msg"]).removeprefix("Value error, ")
        _fail(ValueError(f"{option} {value!r} is not a valid schedule: {message}"), 2)
