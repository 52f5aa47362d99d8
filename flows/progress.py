"""Progress of a training flow run for whoever watches it in this process (the CLI's bar).

The flow reports rounds and finished clients to :func:`current`; by default nobody listens.
``fedmtl run``/``train`` install a rich progress bar with :func:`reporting`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol


class Progress(Protocol):
    def start(self, rounds: int) -> None: ...

    def round_started(self, round_: int, clients: int) -> None: ...

    def client_done(self, n: int = 1) -> None: ...

    def round_done(self, round_: int, headline: str) -> None: ...

    def note(self, message: str) -> None: ...


class Silent:
    def start(self, rounds: int) -> None:
        pass

    def round_started(self, round_: int, clients: int) -> None:
        pass

    def client_done(self, n: int = 1) -> None:
        pass

    def round_done(self, round_: int, headline: str) -> None:
        pass

    def note(self, message: str) -> None:
        pass


_current: Progress = Silent()


def current() -> Progress:
    return _current


@contextmanager
def reporting(progress: Progress) -> Iterator[Progress]:
    """Send the progress of flow runs started inside the block to ``progress``."""
    global _current
    previous, _current = _current, progress
    try:
        yield progress
    finally:
        _current = previous
