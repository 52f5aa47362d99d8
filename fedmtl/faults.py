"""Fault injection (``faults`` settings): failures on purpose, for the tests and the reliability
benchmark. Nothing here runs unless a ``faults`` setting asks for it."""

from __future__ import annotations

import os
import signal


def crash_if_due(crash_at_round: int | None, round_: int) -> None:
    """Kill this process with SIGKILL, as an out-of-memory killer or a lost machine would (no
    handler, no clean-up), when ``round_`` is ``faults.crash_at_round``."""
    if crash_at_round is not None and round_ == crash_at_round:
        os.kill(os.getpid(), signal.SIGKILL)
