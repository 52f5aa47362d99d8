"""Where a run's inputs came from: the data version (DVC) and the code version (git)."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import yaml


def content_hash(directory: str | Path) -> str:
    """SHA-256 over every file's relative path and bytes, in sorted order."""
    directory = Path(directory)
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(path.relative_to(directory).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def dvc_lock_hash(out_path: str | Path, lock_file: str | Path = "dvc.lock") -> str | None:
    """The md5 DVC recorded in ``dvc.lock`` for the stage output ``out_path``, if any."""
    lock_file = Path(lock_file)
    if not lock_file.exists():
        return None
    lock = yaml.safe_load(lock_file.read_text()) or {}
    wanted = Path(out_path).as_posix().rstrip("/")
    for stage in (lock.get("stages") or {}).values():
        for out in stage.get("outs") or []:
            if Path(out.get("path", "")).as_posix().rstrip("/") == wanted:
                if not _matches(Path(out_path), out):
                    return None  # the lock describes other data than what is on disk now
                return out.get("md5")
    return None


def _matches(directory: Path, out: dict) -> bool:
    files = [p for p in directory.rglob("*") if p.is_file()] if directory.is_dir() else []
    if "nfiles" in out and out["nfiles"] != len(files):
        return False
    if "size" in out and out["size"] != sum(p.stat().st_size for p in files):
        return False
    return True


def data_version(partitions_dir: str | Path, lock_file: str | Path = "dvc.lock") -> dict[str, str]:
    """``data_version``: the DVC hash of the partitions when dvc.lock has them (the version
    `dvc checkout` restores), else ``sha256:<content hash>``; ``data_hash``: the content hash."""
    content = content_hash(partitions_dir)
    dvc = dvc_lock_hash(partitions_dir, lock_file)
    return {
        "data_version": dvc or f"sha256:{content[:16]}",
        "data_version_source": "dvc.lock" if dvc else "content",
        "data_hash": content,
    }


def git_commit(cwd: str | Path = ".") -> dict[str, str]:
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
            )
            return done.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {
        "git_commit": commit,
        "git_dirty": str(bool(dirty)).lower() if dirty is not None else "unknown",
    }
