"""The per-client store: personal state (heads ψ_c, maybe a base θ_c), kept on the client and
never in the server state.

In simulation each client's store is a folder under ``root``, named from the client id made
safe for a file system plus a hash of the exact id (``../x`` cannot leave ``root``, and ids
that differ only by case or by an unsafe character never share a folder); the exact id is kept
next to the state. The state is versioned by round: ``save(client, state, round_)`` writes
``personal-r<round>.pt`` and ``load(client, at_most=r)`` returns the newest version written in
round r or before. A run resumed from its checkpoint of round r therefore reads exactly what the
clients held after round r, even if the interrupted round had already written newer versions
for some of them (the resumed round rewrites those). Each save keeps the version it replaces
(the newest older one) and drops the rest, so a client holds at most two. Writes are atomic: a
crash leaves the previous version or the new one, never half of one. Loading unpickles with
``torch.load(weights_only=True)``: tensors and containers, no code.

Other per-client records (one tensor each, e.g. DP-SGD's privacy ledger ``dp_sgd``) are kept the
same way with :meth:`ClientStore.save_record` and :meth:`ClientStore.load_record`:
``<name>-r<round>.pt``, versioned, atomic and pruned like the personal state.
"""

from __future__ import annotations

import hashlib
import io
import re
from pathlib import Path

import torch

from fedmtl.data.manifest import atomic_write_bytes
from fedmtl.state import PersonalState

_SAFE = re.compile(r"[^A-Za-z0-9_-]+")
_VERSION = re.compile(r"^personal-r(\d{6})\.pt$")
_RECORD = re.compile(r"^[a-z][a-z0-9_]*$")
ID_FILE = "client-id.txt"


def client_folder(client: str) -> str:
    """A folder name for ``client``: its safe characters (at most 40) and 10 hex digits of the
    SHA-256 of the exact id."""
    if not isinstance(client, str) or not client:
        raise ValueError(f"a client id must be a non-empty string, got {client!r}")
    digest = hashlib.sha256(client.encode()).hexdigest()[:10]
    return f"{_SAFE.sub('_', client)[:40].strip('_') or 'client'}-{digest}"


class CorruptState(ValueError):
    """A client's stored personal state that cannot be read (damaged, or not tensors only)."""


class ClientStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _dir(self, client: str) -> Path:
        return self.root / client_folder(client)

    def _versions(self, client: str, pattern: re.Pattern = _VERSION) -> list[tuple[int, Path]]:
        folder = self._dir(client)
        if not folder.is_dir():
            return []
        return sorted(
            (int(m.group(1)), p) for p in folder.iterdir() if (m := pattern.match(p.name))
        )

    def load(self, client: str, at_most: int | None = None) -> PersonalState | None:
        """The client's newest personal state, or the newest written in round ``at_most`` or
        before; None when there is none."""
        versions = [(r, p) for r, p in self._versions(client) if at_most is None or r <= at_most]
        if not versions:
            return None
        path = versions[-1][1]
        try:
            return PersonalState.from_dict(torch.load(path, weights_only=True))
        except Exception as exc:  # noqa: BLE001 - damaged or tampered: never loaded, always named
            raise CorruptState(
                f"client '{client}': its personal state {path} cannot be read "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
            ) from None

    def save(self, client: str, personal: PersonalState, round_: int) -> None:
        """Write the client's state as its version for round ``round_``."""
        if round_ < 0:
            raise ValueError(f"round must be non-negative, got {round_}")
        raw = {
            "heads": {t: v.detach().clone() for t, v in personal.heads.items()},
            "base": None if personal.base is None else personal.base.detach().clone(),
            "extra": {k: v.detach().clone() for k, v in personal.extra.items()},
        }
        buffer = io.BytesIO()
        torch.save(raw, buffer)
        folder = self._dir(client)
        if not (folder / ID_FILE).exists():
            atomic_write_bytes(folder / ID_FILE, client.encode())
        atomic_write_bytes(folder / f"personal-r{round_:06d}.pt", buffer.getvalue())
        older = [p for r, p in self._versions(client) if r < round_]
        for path in older[:-2]:  # keep what a resume from either kept checkpoint reads
            path.unlink(missing_ok=True)

    def clients(self) -> list[str]:
        """The ids of the clients holding some personal state."""
        if not self.root.exists():
            return []
        return sorted(
            p.read_text()
            for p in self.root.glob(f"*/{ID_FILE}")
            if any(_VERSION.match(q.name) for q in p.parent.iterdir())
        )

    # other per-client records, versioned by round like the personal state -----------------

    @staticmethod
    def _record_pattern(name: str) -> re.Pattern:
        if not _RECORD.match(name) or name == "personal":
            raise ValueError(
                "a record name must be lower-case letters, digits and _, not 'personal'; "
                f"got {name!r}"
            )
        return re.compile(rf"^{name}-r(\d{{6}})\.pt$")

    def save_record(self, client: str, name: str, value: torch.Tensor, round_: int) -> None:
        """Write the tensor ``value`` as the client's record ``name`` for round ``round_``
        (atomic, versioned and pruned as :meth:`save`; e.g. DP-SGD's privacy ledger)."""
        pattern = self._record_pattern(name)
        if round_ < 0:
            raise ValueError(f"round must be non-negative, got {round_}")
        buffer = io.BytesIO()
        torch.save(value.detach().clone(), buffer)
        folder = self._dir(client)
        if not (folder / ID_FILE).exists():
            atomic_write_bytes(folder / ID_FILE, client.encode())
        atomic_write_bytes(folder / f"{name}-r{round_:06d}.pt", buffer.getvalue())
        older = [p for r, p in self._versions(client, pattern) if r < round_]
        for path in older[:-2]:
            path.unlink(missing_ok=True)

    def load_record(
        self, client: str, name: str, at_most: int | None = None
    ) -> torch.Tensor | None:
        """The client's newest record ``name`` (written in round ``at_most`` or before), or None."""
        pattern = self._record_pattern(name)
        versions = [
            (r, p) for r, p in self._versions(client, pattern) if at_most is None or r <= at_most
        ]
        if not versions:
            return None
        path = versions[-1][1]
        try:
            value = torch.load(path, weights_only=True)
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"holds {type(value).__name__}, not a tensor")
            return value
        except Exception as exc:  # noqa: BLE001 - damaged or tampered: never loaded, always named
            raise CorruptState(
                f"client '{client}': its record {path} cannot be read "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
            ) from None
