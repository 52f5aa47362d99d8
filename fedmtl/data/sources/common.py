"""What the sources share (and the partitioner uses too): client ids, and numpy scalars as the
plain values that messages quote."""

from __future__ import annotations

from typing import Any

import numpy as np


def client_ids(n_clients: int) -> list[str]:
    """``c000``, ``c001``, ... zero-padded to width 3, or wider when there are more clients."""
    width = max(3, len(str(n_clients - 1)))
    return [f"c{i:0{width}d}" for i in range(n_clients)]


def plain_value(value: Any) -> Any:
    """A numpy scalar as the Python value it holds (for messages: ``1e+300``, not
    ``np.float64(1e+300)``)."""
    return value.item() if isinstance(value, np.generic) else value
