"""The exchange store: where the coordinator leaves the sealed global state for a round and each
site leaves its sealed update, at any fsspec URL (``file:///srv/fedmtl-exchange``,
``s3://bucket/prefix``, ``memory://``). Writes are atomic (a temporary name, then a move), so a
reader never sees half a message; what is stored is sealed (:mod:`fedmtl.sites.envelope`), so a
store that changes or replays a message is caught by the receiver."""

from __future__ import annotations

import posixpath
import uuid

import fsspec

from fedmtl.sites.identity import check_name


class Exchange:
    """One run's messages under ``url``/``run``."""

    def __init__(self, url: str, run: str) -> None:
        self.fs, root = fsspec.core.url_to_fs(url)
        self.root = posixpath.join(root, check_name(run))
        self.url, self.run = url, run

    def _path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def global_state(self, round_: int) -> str:
        """Where the state a round starts from is (relative to the run)."""
        return posixpath.join(f"round-{int(round_):06d}", "global.env")

    def update(self, round_: int, site: str) -> str:
        """Where ``site``'s update of a round is (relative to the run)."""
        return posixpath.join(f"round-{int(round_):06d}", "sites", f"{check_name(site)}.env")

    def evaluation_state(self, round_: int) -> str:
        """Where the state to evaluate after a round is (relative to the run)."""
        return posixpath.join(f"round-{int(round_):06d}", "evaluate.env")

    def evaluation(self, round_: int, site: str) -> str:
        """Where ``site``'s evaluation of a round's state is (relative to the run)."""
        return posixpath.join(f"round-{int(round_):06d}", "evaluations", f"{check_name(site)}.env")

    def secagg(self, round_: int, stage: str, party: str) -> str:
        """Where a SecAgg+ ``stage`` message of a round from (or, the coordinator's, to)
        ``party`` is (relative to the run)."""
        return posixpath.join(
            f"round-{int(round_):06d}", "secagg", stage, f"{check_name(party)}.env"
        )

    def scoring(self, version: str) -> str:
        """Where a registered model version to score at the sites is (promotion gates)."""
        return posixpath.join(f"score-v{check_name(str(version))}", "model.env")

    def scores(self, version: str, site: str) -> str:
        """Where ``site``'s scores of a model version are."""
        return posixpath.join(
            f"score-v{check_name(str(version))}", "sites", f"{check_name(site)}.env"
        )

    def put(self, relpath: str, blob: bytes) -> int:
        """Writes ``blob`` at ``relpath`` atomically; returns its size in bytes."""
        path = self._path(relpath)
        self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        part = f"{path}.part-{uuid.uuid4().hex}"
        with self.fs.open(part, "wb") as out:
            out.write(blob)
        self.fs.mv(part, path)
        return len(blob)

    def get(self, relpath: str) -> bytes | None:
        """The bytes at ``relpath``, or None when nothing is there (yet)."""
        path = self._path(relpath)
        if not self.fs.exists(path):
            return None
        with self.fs.open(path, "rb") as src:
            return src.read()

    def listing(self) -> list[str]:
        """Every file of the run (relative paths), for audits and tests."""
        if not self.fs.exists(self.root):
            return []
        return sorted(posixpath.relpath(p, self.root) for p in self.fs.find(self.root))
