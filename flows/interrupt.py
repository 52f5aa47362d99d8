"""Stopping a command-line training run at the next safe point (Ctrl-C, SIGINT, SIGTERM).

``fedmtl train``/``run`` run the flow inside :func:`stopping_safely`. The first SIGINT or
SIGTERM only asks for a stop: the flow finishes the round it is in (its checkpoint is written
whole), then :func:`check` raises :class:`Interrupted`, the flow marks its MLflow run
``KILLED``, and the command prints where it stopped and how to resume, and exits 130, the
shell's code for an interrupted command. A second signal exits at once (130): checkpoints are
written to a temporary file and renamed, so only complete ones are ever on disk, and
``fedmtl train --resume`` continues from the last of them.

The embedded Prefect API runs in a session of its own (:class:`flows.startup.ApiStart`), so a
terminal's Ctrl-C, which goes to the whole foreground process group, does not kill it under the
run; it stops when the command exits.

Prefect's flow engine installs its own SIGTERM handler for the duration of a flow run (it turns
the signal into a crash); :func:`reinstall` puts this module's back, from inside the flow.
Outside :func:`stopping_safely` (a deployment's run, a test calling the flow) nothing here is
active and :func:`check` never raises.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator

#: The exit status of an interrupted command (128 + SIGINT), as shells report it.
EXIT_INTERRUPTED = 130
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """The run stopped at a safe point after ``round_`` complete rounds, on request."""

    def __init__(self, round_: int, signal_name: str) -> None:
        super().__init__(f"interrupted ({signal_name}) at round {round_}")
        self.round = round_
        self.signal_name = signal_name


class _Stop:
    def __init__(self) -> None:
        self.active = False
        self.requested = threading.Event()
        self.signal_name = ""
        self.notify: Callable[[str], None] = lambda message: None
        self.last_words = ""


_stop = _Stop()


def _handle(signum: int, frame: object) -> None:
    name = signal.Signals(signum).name
    if _stop.requested.is_set():  # the second signal: now
        with contextlib.suppress(Exception):
            sys.stderr.write(f"\n{name} again: exiting now. {_stop.last_words}\n")
            sys.stderr.flush()
        os._exit(EXIT_INTERRUPTED)
    _stop.signal_name = name
    _stop.requested.set()
    with contextlib.suppress(Exception):
        _stop.notify(
            f"{name}: stopping after the current round (its checkpoint is written whole); "
            "press Ctrl-C again to exit at once"
        )


def requested() -> bool:
    """Whether a stop was asked for (always False outside :func:`stopping_safely`)."""
    return _stop.active and _stop.requested.is_set()


def check(round_: int) -> None:
    """At a safe point, after ``round_`` complete rounds: raise :class:`Interrupted` if a stop
    was asked for."""
    if requested():
        raise Interrupted(round_, _stop.signal_name)


def reinstall() -> None:
    """Inside a flow run: handle SIGTERM here again, not by Prefect's engine (which replaced
    this module's handler when the run started). No-op outside :func:`stopping_safely` or off
    the main thread."""
    if _stop.active and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _handle)


@contextlib.contextmanager
def stopping_safely(notify: Callable[[str], None], last_words: str = "") -> Iterator[None]:
    """Inside: SIGINT and SIGTERM ask for a stop at the next safe point (``notify`` is told,
    once); a second one exits at once with status 130 after printing ``last_words``."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    _stop.requested.clear()
    _stop.active, _stop.notify, _stop.last_words, _stop.signal_name = True, notify, last_words, ""
    for s in SIGNALS:
        signal.signal(s, _handle)
    try:
        yield
    finally:
        _stop.active = False
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
