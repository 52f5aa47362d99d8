"""Running a command as another Unix user (tests run as root): the user's own uid and gid, no
supplementary groups, in a private mount namespace where this Python is reachable even when it
lives under a folder other users cannot enter (``/root``, mode 0700: pyenv's interpreters, a
checkout under root's home).

For every folder the interpreter needs (its prefixes, the virtual environment, the checkout of
the editable install, ``sys.path``) that has an ancestor "others" cannot traverse, the command's
namespace binds the folder aside, mounts an empty tmpfs (mode 755) over the topmost such
ancestor and binds the folder back at its own path inside it: the user reaches exactly those
folders, nothing else of that ancestor, and nothing changes outside the namespace. Then
``setpriv`` drops to the user and execs the command (the same process id: a signal to it reaches
the command)."""

from __future__ import annotations

import os
import shlex
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from tests.conftest import REPO

#: what a user of a site needs to import to run one
PROBE = "import fedmtl, cli, flows, torch, prefect, mlflow"


def traversable(folder: Path) -> bool:
    """Whether any user may pass through ``folder`` (its "others" search bit)."""
    return bool(folder.stat().st_mode & stat.S_IXOTH)


def blocking_ancestor(path: Path) -> Path | None:
    """The topmost ancestor of ``path`` that others cannot traverse, or None."""
    for parent in reversed(path.parents):  # "/" first
        if not traversable(parent):
            return parent
    return None


def interpreter_paths(extra: Iterable[str | Path] = ()) -> list[Path]:
    """The folders this interpreter and the project need, resolved: its prefixes, the folder of
    its executable, the checkout, every existing ``sys.path`` entry, and ``extra``."""
    import fedmtl

    found = [
        sys.base_prefix,
        sys.prefix,
        sys.base_exec_prefix,
        sys.exec_prefix,
        Path(sys.executable).resolve().parent,
        REPO,
        Path(fedmtl.__file__).resolve().parents[1],
        *(p for p in sys.path if p),
        *extra,
    ]
    paths = []
    for p in found:
        path = Path(os.path.realpath(p))
        if path.is_dir() and path not in paths:
            paths.append(path)
    return paths


def unreachable(paths: Iterable[Path]) -> list[Path]:
    """Those of ``paths`` behind a folder others cannot traverse, none inside another of them."""
    blocked = sorted({p for p in paths if blocking_ancestor(p) is not None}, key=lambda p: p.parts)
    kept: list[Path] = []
    for p in blocked:
        if not any(p.is_relative_to(k) for k in kept):
            kept.append(p)
    return kept


def setup_script(paths: Sequence[Path]) -> str:
    """The shell lines that make ``paths`` reachable in a fresh mount namespace (module docs)."""
    if not paths:
        return ""
    veils = []
    for p in paths:
        top = blocking_ancestor(p)
        assert top is not None
        if not any(top.is_relative_to(v) for v in veils):
            veils = [v for v in veils if not v.is_relative_to(top)] + [top]
    q = shlex.quote
    lines = [
        "set -e",
        "mask=$(umask); umask 022; stage=$(mktemp -d /tmp/fedmtl-stage.XXXXXX)",
        'mount -t tmpfs -o mode=700 stage "$stage"',
    ]
    for i, p in enumerate(paths):
        lines.append(f'mkdir "$stage/{i}"; mount --rbind {q(str(p))} "$stage/{i}"')
    for v in veils:
        lines.append(f"mount -t tmpfs -o mode=755 veil {q(str(v))}")
    for i, p in enumerate(paths):
        lines.append(f'mkdir -p {q(str(p))}; mount --rbind "$stage/{i}" {q(str(p))}')
    lines.append('umount -l "$stage"; rmdir "$stage"; umask "$mask"')
    return "\n".join(lines)


def as_user(
    cmd: Sequence[str | os.PathLike], user: tuple[int, int], extra: Iterable[str | Path] = ()
) -> list[str]:
    """``cmd`` to run as ``user`` (uid, gid) with this interpreter reachable (module docs);
    ``extra``: more folders it needs that may lie behind an untraversable folder."""
    uid, gid = user
    script = "\n".join(
        [
            setup_script(unreachable(interpreter_paths(extra))),
            f'exec setpriv --reuid={uid} --regid={gid} --clear-groups -- "$@"',
        ]
    )
    return [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "--",
        "sh",
        "-c",
        script,
        "sh",
        *map(str, cmd),
    ]


def run_as(
    user: tuple[int, int],
    cmd: Sequence[str | os.PathLike],
    extra: Iterable[str | Path] = (),
    **kwargs,
) -> subprocess.CompletedProcess:
    """``cmd`` run to its end as ``user`` (:func:`as_user`), its output captured as text."""
    return subprocess.run(as_user(cmd, user, extra), capture_output=True, text=True, **kwargs)


def isolation_problem(user: tuple[int, int] | None = None) -> str | None:
    """Why this test cannot run commands as another user with :func:`as_user` (it does not run
    as root, a tool is missing, or ``user``, ``nobody`` by default, cannot import the project
    that way), or None."""
    if os.geteuid() != 0:
        return "this test does not run as root"
    missing = [t for t in ("useradd", "unshare", "setpriv", "mount") if shutil.which(t) is None]
    if missing:
        return f"no {', '.join(missing)} here"
    if user is None:
        import pwd

        nobody = pwd.getpwnam("nobody")
        user = nobody.pw_uid, nobody.pw_gid
    env = {**os.environ, "HOME": "/", "PREFECT_HOME": "/nonexistent/prefect"}
    try:
        probe = run_as(user, [sys.executable, "-c", PROBE], env=env, cwd="/", timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"user {user[0]} cannot run {sys.executable} in a mount namespace: {exc}"
    if probe.returncode != 0:
        return f"user {user[0]} cannot import the project ({PROBE}): {probe.stderr[-400:]}"
    return None
