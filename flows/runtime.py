"""Running a flow from the command line without leaving the Prefect API mid-write.

Prefect's ephemeral API records task-run events asynchronously; a process that exits while
the recorder is still writing prints ``CancelledError`` tracebacks and loses the last states.
``run_and_settle`` waits (bounded) until every task run of the flow run is recorded final.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterParentFlowRunId,
    TaskRunFilter,
    TaskRunFilterState,
    TaskRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.client.schemas.sorting import TaskRunSort

_OPEN = [
    StateType.PENDING,
    StateType.RUNNING,
    StateType.SCHEDULED,
    StateType.CANCELLING,
    StateType.PAUSED,
]


class _ShutdownNoise(logging.Filter):
    """After the flow has settled: drop the recorder's flush errors caused by the cancellation
    of its in-flight write at interpreter exit (nothing of this run is left to record)."""

    def filter(self, record: logging.LogRecord) -> bool:
        cancelled = bool(record.exc_info) and record.exc_info[0] is asyncio.CancelledError
        return not (cancelled or "Error flushing" in record.getMessage())


def run_and_settle(
    flow_fn: Callable[..., Any], *args: Any, timeout: float = 20.0, **kwargs: Any
) -> Any:
    """Run ``flow_fn``; wait for its task runs to be recorded; return its result or raise."""
    state = flow_fn(*args, return_state=True, **kwargs)
    try:
        settle(state.state_details.flow_run_id, timeout)
    finally:
        logging.getLogger("prefect.server.services.task_run_recorder").addFilter(_ShutdownNoise())
    return state.result()


def settle(flow_run_id, timeout: float = 20.0, poll: float = 0.05) -> bool:
    """True once every task run under ``flow_run_id`` (and its subflows) is final and their
    number has stopped growing; False if ``timeout`` passed first."""
    try:
        from prefect.events.worker import EventsWorker

        EventsWorker.drain_all(timeout=timeout, at_exit=False)
    except Exception:  # noqa: BLE001 - draining is best effort
        pass
    deadline = time.monotonic() + timeout
    last = None
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            children = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])
                )
            )
            runs = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id, *(r.id for r in children)]))
            still_open = client.read_task_runs(
                flow_run_filter=runs,
                task_run_filter=TaskRunFilter(
                    state=TaskRunFilterState(type=TaskRunFilterStateType(any_=_OPEN))
                ),
                limit=1,
            )
            newest = client.read_task_runs(
                flow_run_filter=runs, sort=TaskRunSort.EXPECTED_START_TIME_DESC, limit=1
            )
            marker = (newest[0].id, newest[0].state_type) if newest else None
            if not still_open and marker == last:
                return True
            last = marker
            time.sleep(poll)
    return False
