"""Round checkpoints: everything a run needs to continue after its last complete round.

After every round the trainer writes one checkpoint: the server state (base, group and global
heads, assignment, the server optimiser's moments and the adaptive clip, which live in
``ServerState.optimizer``), the global random states (torch, numpy, Python's ``random``), a
small JSON record of the run (``extra``: e.g. the MLflow run id), and the round's own record
(``rounds/round-NNNNNN.pt``: its summary, the metrics it logged, its per-client tables), which
is kept for every round so that a resumed run still reports all of them.
The clients' personal state is not copied: the :class:`~fedmtl.client.store.ClientStore` keeps a
version per round, and a resumed run reads each client's newest version up to the checkpoint's
round (see its docstring).

Writing is atomic and verifiable:

1. the round record, then ``round-NNNNNN.pt`` (``torch.save`` of tensors and plain containers),
   each written to a temporary file, fsync'd and renamed into place;
2. then ``round-NNNNNN.json`` (round, SHA-256 and size of the ``.pt`` and of the round record,
   the format version and ``extra``) the same way. The JSON is the commit point: files
   without it are an interrupted write and are ignored.

The state is serialised when :meth:`CheckpointStore.save` is called; the writing (and its
fsyncs) runs on a background thread, in order, while the next round trains (~2 ms a round
less on the critical path); :meth:`CheckpointStore.wait` waits for it and raises what it
raised. A crash before a checkpoint is committed resumes from the one before.

Reading checks the JSON, the size and the SHA-256 of the ``.pt`` before anything is unpickled,
and unpickles with ``torch.load(weights_only=True)`` (tensors and containers only, no code). A
checkpoint that fails any check raises :class:`CorruptCheckpoint` naming the file and what is
wrong; :meth:`CheckpointStore.latest` reports it and falls back to the previous good checkpoint
(the last ``keep`` are kept). Training is deterministic given the seed (every client draws from
its own generator seeded by seed, round and client), so a run resumed from round r ends with a
model bit-identical to one that was never interrupted.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import random
import re
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from fedmtl.data.manifest import atomic_write_bytes
from fedmtl.state import ServerState

FORMAT = 1
_NAME = re.compile(r"^round-(\d{6})\.json$")


class CorruptCheckpoint(ValueError):
    """A checkpoint that fails its checks (the message names the file and the check)."""


@dataclass
class Checkpoint:
    state: ServerState
    record: dict[str, Any] = field(default_factory=dict)  # this round's own record (plain values)
    extra: dict[str, Any] = field(default_factory=dict)  # JSON-able run record
    rng: dict[str, Any] = field(default_factory=dict)  # from :func:`capture_rng`

    @property
    def round(self) -> int:
        return self.state.round


def capture_rng() -> dict[str, Any]:
    """The process-wide random states: torch's (a uint8 tensor), numpy's legacy global
    generator and Python's ``random``, as tensors and plain lists."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
    }


def restore_rng(rng: dict[str, Any]) -> None:
    """Put back the random states :func:`capture_rng` took (missing parts are left alone)."""
    if "torch" in rng:
        torch.set_rng_state(rng["torch"])
    if "numpy" in rng:
        n = rng["numpy"]
        np.random.set_state(
            (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"])
        )
    if "python" in rng:
        p = rng["python"]
        random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))


class CheckpointStore:
    """The checkpoints of one run, in ``root`` (created on the first save)."""

    def __init__(self, root: str | Path, keep: int = 2) -> None:
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.root = Path(root)
        self.keep = keep
        self._writer: ThreadPoolExecutor | None = None
        self._pending: Future | None = None
        self._committed: dict[int, dict[str, Any]] = {}  # round records this store wrote, as saved

    def _paths(self, round_: int) -> tuple[Path, Path, Path]:
        name = f"round-{round_:06d}"
        return (
            self.root / f"{name}.pt",
            self.root / f"{name}.json",
            self.root / "rounds" / f"{name}.pt",
        )

    def rounds(self) -> list[int]:
        """The rounds with a committed record (their JSON exists), oldest first."""
        if not self.root.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.root.iterdir() if (m := _NAME.match(p.name)))

    def save(self, checkpoint: Checkpoint, background: bool = False) -> None:
        """Commit ``checkpoint``: its round record and state, then the JSON record naming their
        checksums; then drop all but the newest ``keep`` states (round records stay).
        ``background``: serialise now, write on the store's thread (see :meth:`wait`)."""
        state = _serialise(
            {"format": FORMAT, "state": checkpoint.state.to_dict(), "rng": checkpoint.rng}
        )
        as_saved = {"format": FORMAT, "round": checkpoint.round, **checkpoint.record}
        record = _serialise(as_saved)
        extra = json.loads(json.dumps(checkpoint.extra, default=_jsonable))  # a copy, checked now
        job = functools.partial(self._write, checkpoint.round, state, record, extra, as_saved)
        if not background:
            self.wait()
            job()
            return
        self.wait()  # one checkpoint in flight at a time, committed in round order
        if self._writer is None:
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="fedmtl-checkpoint")
        self._pending = self._writer.submit(job)

    def wait(self) -> None:
        """Wait for the checkpoint being written in the background; raise what its writing
        raised."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """:meth:`wait`, then stop the writer thread."""
        try:
            self.wait()
        finally:
            if self._writer is not None:
                self._writer.shutdown(wait=True)
                self._writer = None

    def _write(
        self,
        round_: int,
        state: bytes,
        record: bytes,
        extra: dict[str, Any],
        as_saved: dict[str, Any],
    ) -> None:
        pt, meta_path, record_path = self._paths(round_)
        atomic_write_bytes(record_path, record)
        atomic_write_bytes(pt, state)
        meta = {
            "format": FORMAT,
            "round": round_,
            "sha256": hashlib.sha256(state).hexdigest(),
            "bytes": len(state),
            "record_sha256": hashlib.sha256(record).hexdigest(),
            "extra": extra,
        }
        atomic_write_bytes(meta_path, (json.dumps(meta, indent=1) + "\n").encode())
        self._committed[round_] = as_saved
        for old in self.rounds()[: -self.keep]:
            for path in self._paths(old)[:2]:
                path.unlink(missing_ok=True)

    def _released_path(self, round_: int) -> Path:
        return self.root / "released" / f"evaluation-{round_:06d}.json"

    def released_evaluation(self, round_: int) -> dict[str, float] | None:
        """The DP evaluation released for the model of ``round_`` (None: not released yet). A
        release is recorded before it is logged, so a resumed run logs those figures again and
        never releases (and spends ε on) a second, differently noised evaluation."""
        path = self._released_path(round_)
        return json.loads(path.read_text()) if path.exists() else None

    def save_released_evaluation(self, round_: int, metrics: dict[str, float]) -> None:
        atomic_write_bytes(
            self._released_path(round_), json.dumps(metrics, default=_jsonable).encode()
        )

    def load(self, round_: int) -> Checkpoint:
        """The checkpoint of ``round_``, verified (raises :class:`CorruptCheckpoint`)."""
        pt, meta_path, record_path = self._paths(round_)
        try:
            meta = json.loads(meta_path.read_text())
        except FileNotFoundError:
            raise CorruptCheckpoint(f"checkpoint {meta_path}: no such record") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CorruptCheckpoint(
                f"checkpoint {meta_path}: the record is not valid JSON ({exc})"
            ) from None
        if (
            not isinstance(meta, dict)
            or meta.get("format") != FORMAT
            or meta.get("round") != round_
        ):
            raise CorruptCheckpoint(
                f"checkpoint {meta_path}: unexpected record (format {FORMAT}, round {round_} "
                "expected)"
            )
        raw = _verified(pt, meta.get("sha256"), meta.get("bytes"))
        try:
            state = ServerState.from_dict(raw["state"])
        except Exception as exc:  # noqa: BLE001 - any failure to decode is corruption
            raise CorruptCheckpoint(
                f"checkpoint {pt}: cannot be decoded ({type(exc).__name__}: {exc})"
            ) from None
        if state.round != round_:
            raise CorruptCheckpoint(f"checkpoint {pt}: holds round {state.round}, not {round_}")
        record = _verified(record_path, meta.get("record_sha256"))
        return Checkpoint(state, record, dict(meta.get("extra", {})), raw.get("rng", {}))

    def records(self, up_to: int) -> list[dict[str, Any]]:
        """The round records of rounds 1..``up_to`` that exist, in order, unpickled with
        ``weights_only``; one that cannot be read raises :class:`CorruptCheckpoint`. (The
        checkpoint being resumed from checks its own round's record against its SHA-256.)
        Records this store committed itself are not read back (~6 ms a round)."""
        out = []
        for r in range(1, up_to + 1):
            if r in self._committed:
                out.append(self._committed[r])
                continue
            path = self._paths(r)[2]
            if not path.exists():
                continue
            try:
                raw = torch.load(path, weights_only=True)
            except Exception as exc:  # noqa: BLE001
                raise CorruptCheckpoint(
                    f"round record {path}: cannot be decoded ({type(exc).__name__}: {exc})"
                ) from None
            if not isinstance(raw, dict) or raw.get("round") != r:
                raise CorruptCheckpoint(f"round record {path}: does not hold round {r}")
            out.append(raw)
        return out

    def latest(self) -> tuple[Checkpoint | None, list[str]]:
        """The newest checkpoint that passes its checks, and a message for every newer one that
        did not (those are reported, never loaded)."""
        problems: list[str] = []
        for round_ in reversed(self.rounds()):
            try:
                return self.load(round_), problems
            except CorruptCheckpoint as exc:
                problems.append(str(exc))
        return None, problems


def _serialise(value: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _verified(path: Path, sha256: Any, size: Any = None) -> Any:
    """The contents of ``path`` after checking its size and SHA-256, unpickled with
    ``weights_only`` (tensors and plain containers only)."""
    try:
        payload = path.read_bytes()
    except FileNotFoundError:
        raise CorruptCheckpoint(f"checkpoint {path}: the file is missing") from None
    if size is not None and len(payload) != size:
        raise CorruptCheckpoint(
            f"checkpoint {path}: {len(payload)} bytes, the record says {size} "
            "(truncated or overwritten)"
        )
    digest = hashlib.sha256(payload).hexdigest()
    if digest != sha256:
        raise CorruptCheckpoint(
            f"checkpoint {path}: SHA-256 {digest[:12]}… does not match the record's "
            f"{str(sha256)[:12]}… (the file was changed or damaged)"
        )
    try:
        return torch.load(io.BytesIO(payload), weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to decode is corruption
        raise CorruptCheckpoint(
            f"checkpoint {path}: cannot be decoded ({type(exc).__name__}: {exc})"
        ) from None


def table_record(frame: pd.DataFrame) -> dict[str, list]:
    """A table as plain column lists (what a round record holds)."""
    return {c: frame[c].tolist() for c in frame.columns}


def record_table(records: list[dict[str, Any]], name: str) -> pd.DataFrame | None:
    """Table ``name`` of every round record that has one, concatenated (None if none)."""
    frames = [pd.DataFrame(r[name]) for r in records if r.get(name) is not None]
    return pd.concat(frames, ignore_index=True) if frames else None


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to a checkpoint record")


# --------------------------------------------------------------------------- resumable runs
