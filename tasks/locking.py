"""Inter-process locks keyed on an MLflow tracking store (and a name within it).

Two kinds of write to a shared store need them:

- creating a new SQLite store: MLflow creates its tables and runs its schema migrations the
  first time a process opens a store, and two processes doing that at once on one new file
  fail (``Online migration expected to match one row when updating … in 'alembic_version'``);
- moving the registry's aliases (``champion`` on a promotion or rollback, ``challenger`` after
  training): a read-decide-write that two processes must not interleave.

For a ``sqlite:///`` store the lock file lies beside the database (``.mlflow.db.<key>.lock``),
so every process that can write the store shares it, whoever runs it. For other stores (an
MLflow server, a database server) it lies in the user's cache folder
(``$XDG_CACHE_HOME/fedmtl/locks``, or ``FEDMTL_LOCK_DIR``), keyed by the store's URI: it
serialises the processes of one user on one machine only, and writers elsewhere are not held
back (the promotion re-reads the champion just before moving it, see tasks/promotion.py).

The locks are ``flock(2)`` locks (the ``filelock`` package, a dependency of torch): the
kernel releases them when their process dies, even by SIGKILL, so a crash leaves no stale lock.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

from filelock import FileLock, Timeout

SQLITE = "sqlite:///"


class LockTimeout(TimeoutError):
    """Another process held a lock for longer than the caller would wait."""


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for other stores and ``:memory:``)."""
    if not tracking_uri.startswith(SQLITE):
        return None
    path = tracking_uri[len(SQLITE) :].split("?", 1)[0]
    if not path or path == ":memory:":
        return None
    return Path(path).resolve()


def is_database_uri(tracking_uri: str) -> bool:
    """A store MLflow opens itself with SQLAlchemy (and creates or migrates on first use)."""
    scheme = urlsplit(tracking_uri).scheme.split("+", 1)[0]
    return scheme in ("sqlite", "postgresql", "mysql", "mssql")


def lock_path(tracking_uri: str, key: str) -> Path:
    """The lock file for ``key`` in the store at ``tracking_uri``."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", key)[:80]
    if safe != key:  # two keys that sanitise alike must not share a lock
        safe += "-" + hashlib.sha256(key.encode()).hexdigest()[:8]
    database = sqlite_path(tracking_uri)
    if database is not None:
        return database.parent / f".{database.name}.{safe}.lock"
    folder = (
        os.environ.get("FEDMTL_LOCK_DIR")
        or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fedmtl" / "locks"
    )
    store = hashlib.sha256(tracking_uri.encode()).hexdigest()[:16]
    return Path(folder) / f"{store}.{safe}.lock"


@contextlib.contextmanager
def store_lock(
    tracking_uri: str,
    key: str,
    timeout: float = 300.0,
    on_wait: Callable[[Path], None] | None = None,
) -> Iterator[Path]:
    """Hold the lock ``key`` of the store at ``tracking_uri``. ``on_wait(path)`` is called once
    when another process holds it (then this one waits up to ``timeout`` seconds, else raises
    :class:`LockTimeout` naming the lock file)."""
    path = lock_path(tracking_uri, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if on_wait is not None:
            on_wait(path)
        try:
            lock.acquire(timeout=timeout)
        except Timeout:
            raise LockTimeout(
                f"another process has held the lock '{path}' ({key}) "
                f"for more than {timeout:.0f} s; "
                "if no fedmtl command is running against this store, check for a hung one"
            ) from None
    try:
        yield path
    finally:
        lock.release()


def registry_lock(
    tracking_uri: str,
    model: str,
    timeout: float = 300.0,
    on_wait: Callable[[Path], None] | None = None,
):
    """The lock on the aliases of registered model ``model`` (a context manager): held by a
    promotion or rollback while it checks and moves ``champion``, and by a training run while
    it claims ``challenger``. Each holds it for a second or two."""
    return store_lock(tracking_uri, f"registry-{model}", timeout, on_wait)


__all__ = [
    "LockTimeout",
    "is_database_uri",
    "lock_path",
    "registry_lock",
    "sqlite_path",
    "store_lock",
]
