"""The contract between the data pipeline and training: partition files and their manifest.

A partition is one Parquet file per client, ``<partitions_dir>/<file>``, with the columns

- ``client`` (str): the client id; ``group`` (str): its group ("0" when there is none);
- ``split`` (str): ``train`` or ``test`` (the client's own held-out rows);
- ``row`` (int64): the row's index in the prepared raw data, so any row can be traced back;
- the feature columns named in the manifest (float32), and one column per task (label).

``manifest.json`` beside them describes the whole set (:class:`Manifest`). Its ``file``
entries are plain file names inside the partitions folder (no directory part, not absolute, no
``..``, not hidden, not the manifest itself) and its client ids distinct non-empty strings;
:func:`read_manifest` refuses anything else (:class:`UnsafeManifest`), naming the client and the
entry. A partition file that is a symbolic link must resolve inside the partitions folder
(:func:`partition_path`).

:class:`PartitionDigest` is a partition file's SHA-256 and size: validation records it for every
file it read, and training checks it before using a file (:mod:`fedmtl.data.validation`,
:func:`fedmtl.client.data.load_client_data`).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

MANIFEST = "manifest.json"
SPLITS = ("train", "test")


@dataclass(frozen=True)
class TaskSpec:
    """One prediction target: a label column and how it is learned."""

    name: str
    kind: str = "classification"  # or "regression"
    classes: list[Any] = field(default_factory=list)  # the declared label set (classification)
    #: some clients or rows lack this task's labels (null in its column): they train and are
    #: scored on the tasks they have (``data.partition.missing_tasks``)
    optional: bool = False

    @property
    def n_outputs(self) -> int:
        return len(self.classes) if self.kind == "classification" else 1


@dataclass(frozen=True)
class ClientEntry:
    client: str
    group: str
    file: str
    n_train: int
    n_test: int


@dataclass(frozen=True)
class Manifest:
    source: str
    scheme: str
    features: list[str]
    tasks: list[TaskSpec]
    clients: list[ClientEntry]
    feature_range: tuple[float, float] | None = None  # declared [min, max] of every feature
    input_shape: list[int] | None = None  # e.g. [1, 8, 8] for images; None for flat vectors
    seed: int = 0
    true_groups: bool = False  # whether ``group`` is a known ground truth (e.g. rotation)

    @property
    def client_ids(self) -> list[str]:
        return [c.client for c in self.clients]

    def entry(self, client: str) -> ClientEntry:
        for c in self.clients:
            if c.client == client:
                return c
        raise KeyError(f"client '{client}' is not in the manifest")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False)

    def check(self) -> None:
        """Refuse client ids and file entries that are not safe (:func:`check_entries`)."""
        check_entries(self.clients)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Manifest":
        raw = dict(raw)
        raw["tasks"] = [TaskSpec(**t) for t in raw["tasks"]]
        raw["clients"] = [ClientEntry(**c) for c in raw["clients"]]
        if raw.get("feature_range") is not None:
            raw["feature_range"] = tuple(raw["feature_range"])
        return cls(**raw)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_manifest(directory: str | Path, manifest: Manifest) -> Path:
    path = Path(directory) / MANIFEST
    atomic_write_bytes(path, manifest.to_json().encode())
    return path


def read_manifest(directory: str | Path) -> Manifest:
    """The manifest in ``directory``, its entries checked (:class:`UnsafeManifest`)."""
    path = Path(directory) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(
            f"no partitions at '{directory}' ({MANIFEST} missing): run `fedmtl data partition` first"
        )
    manifest = Manifest.from_dict(json.loads(path.read_text()))
    try:
        manifest.check()
    except UnsafeManifest as exc:
        raise UnsafeManifest(f"'{path}': {exc}") from None
    return manifest


# --------------------------------------------------------------------------------------------
# what a manifest may name


class UnsafeManifest(ValueError):
    """A manifest entry that could make training read outside the partitions folder, or that
    cannot name a client (the message names the client and the entry)."""


def file_entry_problem(file: object) -> str | None:
    """Why ``file`` is not a plain file name inside the partitions folder, or None if it is."""
    if not isinstance(file, str) or not file:
        return "is not a non-empty string"
    if "\x00" in file or any(ord(ch) < 32 for ch in file):
        return "holds control characters"
    if "/" in file or "\\" in file or os.sep in file or (os.altsep and os.altsep in file):
        return "has a directory part (only a plain file name inside the partitions folder is allowed)"
    if os.path.isabs(file) or Path(file).is_absolute() or Path(file).drive:
        return "is an absolute path"
    if file in (".", "..") or file.startswith("."):
        return "starts with '.' (a hidden file, or the folder itself or its parent)"
    if file == MANIFEST:
        return f"is the manifest itself ({MANIFEST})"
    return None


def client_id_problem(client: object) -> str | None:
    """Why ``client`` cannot be a client id, or None. Ids with path separators or ``..`` are
    allowed: no path is ever made from an id itself (partition files get safe names,
    :func:`fedmtl.data.partitions.partition_file_name`; client stores a sanitised name plus a
    hash, :func:`fedmtl.client.store.client_folder`)."""
    if not isinstance(client, str) or not client:
        return "is not a non-empty string"
    if "\x00" in client:
        return "holds a NUL character"
    return None


def check_entries(entries: list[ClientEntry]) -> None:
    """Raise :class:`UnsafeManifest` naming the first bad client id or ``file`` entry: ids must
    be distinct non-empty strings, files distinct plain names (:func:`file_entry_problem`)."""
    ids: set[str] = set()
    files: dict[str, str] = {}
    for entry in entries:
        problem = client_id_problem(entry.client)
        if problem is not None:
            raise UnsafeManifest(f"client id {entry.client!r} {problem}")
        if entry.client in ids:
            raise UnsafeManifest(f"client '{entry.client}' is listed twice")
        ids.add(entry.client)
        problem = file_entry_problem(entry.file)
        if problem is not None:
            raise UnsafeManifest(f"client '{entry.client}': file entry {entry.file!r} {problem}")
        other = files.get(entry.file.casefold())
        if other is not None:
            raise UnsafeManifest(f"client '{entry.client}': file entry {entry.file!r} is also client "
                                 f"'{other}'s file")
        files[entry.file.casefold()] = entry.client


def partition_path(directory: str | Path, client: str, file: str) -> Path:
    """``directory / file``, once ``file`` is a plain name (:class:`UnsafeManifest` if not) and,
    when the file is a symbolic link, its target lies inside ``directory`` (:class:`OSError`
    naming the client if not)."""
    problem = file_entry_problem(file)
    if problem is not None:
        raise UnsafeManifest(f"client '{client}': file entry {file!r} {problem}")
    path = Path(directory) / file
    if path.is_symlink():
        target = path.resolve()
        if not target.is_relative_to(Path(directory).resolve()):
            raise PermissionError(f"client '{client}': partition file '{path}' is a symbolic link to "
                                  f"'{target}', outside the partitions folder '{directory}'")
    return path


# --------------------------------------------------------------------------------------------
# partition digests: what validation saw, checked by training


class PartitionDigest(NamedTuple):
    """A partition file's SHA-256 (hex) and size in bytes."""

    sha256: str
    size: int

    @classmethod
    def of(cls, data: bytes) -> "PartitionDigest":
        return cls(hashlib.sha256(data).hexdigest(), len(data))


def stat_key(path: str | Path) -> tuple[str, int, int, int, int]:
    """(path, mtime_ns, size, inode, ctime_ns): what says a file is unchanged for the caches
    (a write, a replace or a ``touch`` that restores the mtime all change one of them)."""
    st = os.stat(path)
    return str(path), st.st_mtime_ns, st.st_size, st.st_ino, st.st_ctime_ns


_DIGESTS: OrderedDict[tuple, PartitionDigest] = OrderedDict()
_DIGESTS_LOCK = threading.Lock()
_DIGESTS_MAX = 65536


def remember_digest(key: tuple, digest: PartitionDigest) -> None:
    with _DIGESTS_LOCK:
        _DIGESTS[key] = digest
        _DIGESTS.move_to_end(key)
        while len(_DIGESTS) > _DIGESTS_MAX:
            _DIGESTS.popitem(last=False)


def file_digest(path: str | Path) -> PartitionDigest:
    """The file's digest, hashed once per :func:`stat_key` (cached; :class:`OSError` if the file
    cannot be read)."""
    key = stat_key(path)
    with _DIGESTS_LOCK:
        known = _DIGESTS.get(key)
    if known is not None:
        return known
    digest = PartitionDigest.of(Path(path).read_bytes())
    if digest.size == key[2]:  # not rewritten while it was read
        remember_digest(key, digest)
    return digest
