"""The registry side of champion/challenger promotion and rollback (MLflow).

Aliases: ``challenger`` (set by every training run on its new version) and ``champion`` (the
version in use). The decision itself is pure (``fedmtl/lifecycle/promotion.py``); this package
reads the facts it needs from the registry (:mod:`~tasks.promotion.facts`), records every
decision, and moves the alias (:mod:`~tasks.promotion.decisions`, which says in what order and
under which lock). :class:`Registry` does both.
"""

from __future__ import annotations

from tasks.promotion.decisions import (
    CHAMPION_MOVED_TAG,
    LEGACY_CHAMPION_MOVED_TAG,
    LOCK_TIMEOUT,
    PREVIOUS_CHAMPION,
    STALE_ON_PROMOTION,
    ChampionChanged,
    Registry,
    actor_name,
    now,
)
from tasks.promotion.facts import RegistryError, RegistryReader
from tasks.registry import CHALLENGER, CHAMPION

__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "CHAMPION_MOVED_TAG",
    "PREVIOUS_CHAMPION",
    "ChampionChanged",
    "Registry",
    "RegistryError",
    "actor_name",
    # also public, beyond the names listed before the split
    "LEGACY_CHAMPION_MOVED_TAG",
    "LOCK_TIMEOUT",
    "STALE_ON_PROMOTION",
    "RegistryReader",
    "now",
]
