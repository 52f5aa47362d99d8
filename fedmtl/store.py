"""The per-client store: personal state (heads ψ_c, maybe a base θ_c), kept on the client and
never in the server state.

In simulation each client's store is a folder ``<root>/<client>/``; writes are atomic, so a
crash leaves the previous head or the new one, never half of one.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import torch

from fedmtl.data.manifest import atomic_write_bytes
from fedmtl.state import PersonalState

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
FILE = "personal.pt"


class ClientStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _path(self, client: str) -> Path:
        return self.root / _SAFE.sub("_", client) / FILE

    def load(self, client: str) -> PersonalState | None:
        path = self._path(client)
        if not path.exists():
            return None
        return PersonalState.from_dict(torch.load(path, weights_only=True))

    def save(self, client: str, personal: PersonalState) -> None:
        raw = {
            "heads": {t: v.detach().clone() for t, v in personal.heads.items()},
            "base": None if personal.base is None else personal.base.detach().clone(),
        }
        buffer = io.BytesIO()
        torch.save(raw, buffer)
        atomic_write_bytes(self._path(client), buffer.getvalue())

    def clients(self) -> list[str]:
        if not self.root.exists():
            return []
        return sorted(p.parent.name for p in self.root.glob(f"*/{FILE}"))
