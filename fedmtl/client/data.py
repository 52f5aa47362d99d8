"""A client's view of its own partition: tensors for training and its held-out split.

:func:`load_client_data` reads a partition file once per version of it (cached by path, mtime,
size, inode and ctime), hashing the bytes it parses. Given the :class:`PartitionDigest` that
validation recorded, it refuses a file whose bytes are not the ones validated. Whatever goes
wrong with a client's partition raises a :class:`PartitionError` naming the client and the file:

- :class:`PartitionUnavailable`: missing, unreadable, not Parquet, or a symbolic link that leaves
  the partitions folder;
- :class:`PartitionChanged`: not the bytes validation saw (its SHA-256 or size differs), or not
  validated at all;
- :class:`PartitionInvalid`: no longer the data contract, checked on every read whether or not
  a digest is given: a contract column missing, a feature that is not numeric, no train rows,
  NaN or infinite features or regression labels, a class label outside the declared classes.

The flow treats such a client like a quarantined one: named, it sits the round out (training and
evaluation), never retried (:class:`fedmtl.state.ClientFailure`, kind ``partition``).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fedmtl.data.manifest import (
    Manifest,
    PartitionDigest,
    TaskSpec,
    UnsafeManifest,
    partition_path,
    remember_digest,
)


class PartitionError(ValueError):
    """A client's partition that cannot be trained or evaluated on; names the client and file."""

    failure_kind = (
        "partition"  # its file is what it is: not retried, it sits out like a quarantined client
    )

    def __init__(
        self,
        message: str,
        client: str | None = None,
        path: str | Path | None = None,
        digest: PartitionDigest | None = None,
    ) -> None:
        super().__init__(message)
        self.client = client
        self.path = None if path is None else str(path)
        self.digest = digest  # of the bytes that were read, when they were


class PartitionUnavailable(PartitionError, FileNotFoundError):
    """The partition file is missing, cannot be read, or leaves the partitions folder."""


class PartitionChanged(PartitionError):
    """The partition file is not the one validation passed (its SHA-256 or size differs)."""


class PartitionInvalid(PartitionError):
    """The partition's data breaks the contract (empty, wrong dtype, non-finite values)."""


@dataclass(frozen=True)
class ClientData:
    client: str
    group: str
    x_train: torch.Tensor
    y_train: dict[str, torch.Tensor]
    x_test: torch.Tensor
    y_test: dict[str, torch.Tensor]

    @property
    def n_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def n_test(self) -> int:
        return int(self.x_test.shape[0])


#: the encoded class label of a row without this task's label (torch's ignore_index)
MISSING_CLASS = -100


def labelled(task: TaskSpec, y: torch.Tensor) -> torch.Tensor:
    """The rows that hold ``task``'s label (an optional task's may be missing: -100 or NaN)."""
    if task.kind == "classification":
        return y != MISSING_CLASS
    return torch.isfinite(y)


def labelled_counts(data: ClientData) -> dict[str, int] | None:
    """Per task, the train rows that hold its label; None when every row holds every label."""
    counts = {}
    for name, y in data.y_train.items():
        have = torch.isfinite(y) if y.is_floating_point() else y != MISSING_CLASS
        counts[name] = int(have.sum())
    return None if all(c == data.n_train for c in counts.values()) else counts


def encode_labels(
    values: pd.Series | np.ndarray, task: TaskSpec, client: str = "?"
) -> torch.Tensor:
    """Class labels -> indices into ``task.classes``; regression targets -> float32. An optional
    task's missing labels (null) -> -100 (:data:`MISSING_CLASS`) or NaN."""
    missing = pd.isna(values).to_numpy() if isinstance(values, pd.Series) else pd.isna(values)
    values = np.asarray(values, dtype=object if missing.any() else None)
    if task.kind == "regression":
        return torch.tensor(np.where(missing, np.nan, values).astype(np.float32))
    index = {c: i for i, c in enumerate(task.classes)}
    if task.optional and missing.any():  # (3.0 from a column with nulls finds the class 3)
        codes = [MISSING_CLASS if m else index[v] for v, m in zip(values.tolist(), missing)]
        return torch.as_tensor(np.array(codes, dtype=np.int64))
    try:
        return torch.as_tensor(np.array([index[v] for v in values.tolist()], dtype=np.int64))
    except KeyError as exc:
        raise ValueError(
            f"client '{client}': label {exc.args[0]!r} of task '{task.name}' is not in the "
            f"declared classes {task.classes}"
        ) from None


def check_frame(
    frame: pd.DataFrame, manifest: Manifest, client: str, path: str | Path = "?"
) -> None:
    """Raise :class:`PartitionInvalid` when ``frame`` breaks the contract in a way training
    would not notice or would crash on: a contract column missing, a feature column that is not
    numeric (strings would be parsed silently), no train rows, NaN or infinite features or
    regression labels. (Labels outside the declared classes are caught when they are encoded.)"""

    def invalid(why: str) -> PartitionInvalid:
        return PartitionInvalid(f"client '{client}': partition file '{path}' {why}", client, path)

    needed = ["split", "group", *manifest.features, *(t.name for t in manifest.tasks)]
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise invalid(f"lacks the contract column(s) {missing[:10]}")
    odd = [
        f"'{c}' ({frame[c].dtype})" for c in manifest.features if frame[c].dtype.kind not in "iuf"
    ]
    if odd:
        raise invalid(f"has feature column(s) that are not numeric: {', '.join(odd[:5])}")
    if not (frame["split"] == "train").any():
        raise invalid(f"has no train rows ({len(frame)} rows in all)")
    x = frame[manifest.features].to_numpy(dtype=np.float64)
    bad = ~np.isfinite(x)
    if bad.any():
        rows, cols = np.nonzero(bad)
        where = ", ".join(
            f"'{manifest.features[c]}' at position {r}" for r, c in zip(rows[:3], cols[:3])
        )
        raise invalid(f"holds {int(bad.sum())} NaN or infinite feature value(s): {where}")
    for task in manifest.tasks:
        missing = frame[task.name].isna()
        if missing.any() and not task.optional:
            raise invalid(
                f"lacks {int(missing.sum())} label(s) of task '{task.name}' (null in its column), "
                "which the manifest does not declare optional"
            )
        if task.kind == "regression":
            y = pd.to_numeric(frame[task.name], errors="coerce").to_numpy(dtype=np.float64)
            if not np.isfinite(y[~missing.to_numpy()]).all():
                raise invalid(f"holds NaN, infinite or non-numeric labels of task '{task.name}'")


def frame_to_client(frame: pd.DataFrame, manifest: Manifest, client: str) -> ClientData:
    group = str(frame["group"].iloc[0]) if len(frame) else "0"
    parts = {}
    for split in ("train", "test"):
        rows = frame[frame["split"] == split]
        x = torch.tensor(rows[manifest.features].to_numpy(dtype=np.float32, copy=True))
        y = {t.name: encode_labels(rows[t.name], t, client) for t in manifest.tasks}
        parts[split] = (x, y)
    return ClientData(
        client, group, parts["train"][0], parts["train"][1], parts["test"][0], parts["test"][1]
    )


class ManifestKey:
    """A manifest as part of a cache key, made once per federation: hashed and compared by its
    JSON, carrying the manifest (a cache miss needs no parsing) and a client -> file index.
    Serialising and scanning the manifest on every call costs O(clients), which made a round's
    data loading quadratic in the number of clients (minutes per round at 10,000 clients)."""

    __slots__ = ("manifest", "text", "files", "_hash")

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self.text = manifest.to_json()
        self.files = {c.client: c.file for c in manifest.clients}
        self._hash = hash(self.text)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ManifestKey) and (self is other or self.text == other.text)


@lru_cache(maxsize=4096)
def _load_cached(
    path: str, mtime_ns: int, size: int, ino: int, ctime_ns: int, key: ManifestKey, client: str
) -> tuple[ClientData, PartitionDigest]:
    """The client's data and the digest of the very bytes it was parsed from (one read)."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise PartitionUnavailable(
            f"client '{client}': partition file '{path}' cannot be read: {exc.strerror or exc}",
            client,
            path,
        ) from None
    digest = PartitionDigest.of(raw)
    if digest.size == size:
        remember_digest((path, mtime_ns, size, ino, ctime_ns), digest)
    try:
        frame = pd.read_parquet(io.BytesIO(raw))
    except Exception as exc:  # noqa: BLE001 - any parse error: the file is not a partition
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PartitionUnavailable(
            f"client '{client}': partition file '{path}' cannot be read as Parquet: {first}",
            client,
            path,
            digest,
        ) from None
    try:
        check_frame(frame, key.manifest, client, path)
        data = frame_to_client(frame, key.manifest, client)
    except PartitionError as exc:
        exc.digest = digest
        raise
    except (ValueError, TypeError, KeyError) as exc:  # e.g. a label outside the declared classes
        raise PartitionInvalid(
            f"client '{client}': partition file '{path}': {exc}", client, path, digest
        ) from None
    return data, digest


def load_client_data(
    partitions_dir: str | Path,
    manifest: Manifest | ManifestKey,
    client: str,
    expected: PartitionDigest | None = None,
) -> ClientData:
    """Read a client's partition (cached while the file is unchanged). Pass a
    :class:`ManifestKey` made once when loading many clients. ``expected``: the digest
    validation recorded; the file must hold exactly those bytes (:class:`PartitionChanged`).
    Any problem with the file raises a :class:`PartitionError` naming the client and file."""
    key = manifest if isinstance(manifest, ManifestKey) else ManifestKey(manifest)
    file = key.files.get(client)
    if file is None:
        raise KeyError(f"client '{client}' is not in the manifest")
    try:
        path = partition_path(partitions_dir, client, file)
        st = path.stat()
    except UnsafeManifest as exc:
        raise PartitionUnavailable(str(exc), client, Path(partitions_dir) / str(file)) from None
    except FileNotFoundError:
        raise PartitionUnavailable(
            f"client '{client}': partition file '{Path(partitions_dir) / file}' is missing",
            client,
            Path(partitions_dir) / file,
        ) from None
    except OSError as exc:
        raise PartitionUnavailable(
            str(exc)
            if "client '" in str(exc)
            else f"client '{client}': partition file '{Path(partitions_dir) / file}' cannot "
            f"be read: {exc.strerror or exc}",
            client,
            Path(partitions_dir) / file,
        ) from None
    if expected is not None and st.st_size != expected.size:
        raise _changed(client, path, expected, f"{st.st_size} bytes, validated {expected.size}")
    try:
        data, digest = _load_cached(
            str(path), st.st_mtime_ns, st.st_size, st.st_ino, st.st_ctime_ns, key, client
        )
    except PartitionError as exc:
        if expected is not None and exc.digest is not None and exc.digest != expected:
            raise _changed(
                client, path, expected, f"SHA-256 {exc.digest.sha256[:12]}…, and now: {exc}"
            ) from None
        raise
    if expected is not None and digest != expected:
        raise _changed(client, path, expected, f"SHA-256 {digest.sha256[:12]}…")
    return data


def _changed(client: str, path: Path, expected: PartitionDigest, now: str) -> PartitionChanged:
    return PartitionChanged(
        f"client '{client}': partition file '{path}' changed after validation "
        f"({now}; validated SHA-256 "
        f"{expected.sha256[:12]}…, {expected.size} bytes): re-run `fedmtl data validate`",
        client,
        path,
    )
