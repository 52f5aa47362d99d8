"""The per-client store: personal heads ψ_c, kept on the client and never in the server state.

In simulation each client's store is a folder ``<root>/<client>/``; writes are atomic, so a
crash leaves the previous head or the new one, never half of one.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import torch

from fedmtl.data.manifest import atomic_write_bytes
from fedmtl.state import Heads

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


class ClientStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _path(self, client: str) -> Path:
        return self.root / _SAFE.sub("_", client) / "personal_heads.pt"

    def load(self, client: str) -> Heads | None:
        path = self._path(client)
        if not path.exists():
            return None
        return torch.load(path, weights_only=True)

    def save(self, client: str, heads: Heads) -> None:
        buffer = io.BytesIO()
        torch.save({t: v.detach().clone() for t, v in heads.items()}, buffer)
        atomic_write_bytes(self._path(client), buffer.getvalue())

    def clients(self) -> list[str]:
        if not self.root.exists():
            return []
        return sorted(p.parent.name for p in self.root.glob("*/personal_heads.pt"))
