"""What the server checks of each client update before any aggregation: shapes and finite
values (:func:`check_update`), and bounded influence (:func:`screen_norms`): an update whose L2
norm exceeds ``server.max_norm_ratio`` times the round's lower median norm is refused, so that a
lying client cannot take the model anywhere (docs/reliability.md)."""

from __future__ import annotations

import math

import torch

from fedmtl.state import ClientFailure, ClientUpdate, ServerState


class RejectedUpdate(ValueError):
    """A client update that must never reach a model (non-finite or wrong shape)."""

    failure_kind = "rejected"  # it would be rejected again: not retried


def check_update(update: ClientUpdate, state: ServerState) -> None:
    """Reject an update whose shapes do not match the server's or that holds NaN/inf."""
    parts = {}
    if update.delta_base is not None:
        parts["base"] = (update.delta_base, state.base)
    ref_heads = state.heads_for(update.group)
    if update.delta_heads and set(update.delta_heads) != set(ref_heads):
        raise RejectedUpdate(
            f"client '{update.client}': update has heads {sorted(update.delta_heads)}, "
            f"expected {sorted(ref_heads)}"
        )
    parts.update({f"head '{t}'": (update.delta_heads[t], ref_heads[t]) for t in update.delta_heads})
    for name, (delta, ref) in parts.items():
        if delta.shape != ref.shape:
            raise RejectedUpdate(
                f"client '{update.client}': {name} update has shape {tuple(delta.shape)}, "
                f"expected {tuple(ref.shape)}"
            )
        if not torch.isfinite(delta).all():
            raise RejectedUpdate(f"client '{update.client}': {name} update holds NaN or inf")


def update_norm(update: ClientUpdate) -> float:
    """The L2 norm of everything ``update`` releases (base and heads together), in float64."""
    parts = ([update.delta_base] if update.delta_base is not None else []) + list(
        update.delta_heads.values()
    )
    return math.sqrt(sum(float(torch.sum(p.to(torch.float64) ** 2)) for p in parts))


def screen_norms(
    updates: list[ClientUpdate], ratio: float | None
) -> tuple[list[ClientUpdate], dict[str, ClientFailure]]:
    """(kept updates, refused client -> why): with ``ratio``, an update whose L2 norm exceeds
    ``ratio`` × the round's lower median norm (a minority cannot inflate it) is refused."""
    if ratio is None or not updates:
        return list(updates), {}
    norms = {u.client: update_norm(u) for u in updates}
    ordered = sorted(norms.values())
    median = ordered[(len(ordered) - 1) // 2]
    bound = ratio * median
    kept, refused = [], {}
    for u in updates:
        if norms[u.client] > bound:
            refused[u.client] = ClientFailure.of(
                RejectedUpdate(
                    f"client '{u.client}': update norm {norms[u.client]:.4g} exceeds "
                    f"server.max_norm_ratio={ratio:g} × the round's median update norm {median:.4g}"
                )
            )
        else:
            kept.append(u)
    return kept, refused
