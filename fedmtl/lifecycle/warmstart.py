"""Warm start: continue training from a trained personalised model instead of round 0.

:func:`state_from_bundle` turns a :class:`~fedmtl.bundle.PersonalizedBundle` (what the
registry's ``champion`` holds) into the server state to start from (shared base, global and
group heads, client → group assignment, round count) and the personal states to seed each
client's store with, so that both the shared and the personal parts continue. A bundle without
personal heads or bases (the default: ``tracking.bundle_personal_heads=false``, they stay on
the clients) gives no personal states: the shared part continues and each client fits its
personal part from it as in a fresh run.

Every tensor is checked against a freshly built state of the current settings and data; any
mismatch (features, tasks or classes, architecture, a head's size) raises
:class:`WarmStartError` naming it. Nothing is ever loaded partially.

Not carried over: the server optimiser's moments (FedAdam/FedYogi restart theirs; the bundle
does not hold them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from fedmtl.client.store import ClientStore
from fedmtl.state import Heads, PersonalState, ServerState

if TYPE_CHECKING:
    from fedmtl.bundle import PersonalizedBundle
    from fedmtl.federation import Federation

#: the settings of ``model`` that decide the shapes of the parameters
ARCHITECTURE_KEYS = ("base", "hidden", "cnn_channels")


class WarmStartError(ValueError):
    """The model to start from does not fit the current data or settings."""


def state_from_bundle(
    fed: "Federation",
    bundle: "PersonalizedBundle",
    source: str = "the model",
    hint: str = "train with training.warm_start=none",
    fresh: ServerState | None = None,
) -> tuple[ServerState, dict[str, PersonalState]]:
    """The server state to continue from and each client's personal state (only clients of
    the current data). ``source`` names the model in errors (e.g. "champion version 3 of
    'fedmtl-personalized'"), ``hint`` says what to do instead; ``fresh``: the round-0 state of
    ``fed`` if already built (the reference for every shape).

    Group heads: the groups of the current data (``grouping: column``; a group the model does
    not know starts from its global heads), or the model's learned groups (``cluster``), or the
    IFCA clusters of the model (a cluster it lacks keeps its fresh random heads). The client →
    group assignment is the model's, overridden by the data's group column where that decides.
    """
    fresh = fresh or fed.initial_state()

    def fail(what: str) -> WarmStartError:
        return WarmStartError(f"cannot warm-start from {source}: {what}: {hint}")

    check_compatible(fed, bundle, fail)
    base = _checked(bundle.base, fresh.base, "the shared base", fail)
    global_heads = _checked_heads(bundle.global_heads, fresh.global_heads, "global head", fail)
    known = {
        g: _checked_heads(h, fresh.global_heads, f"group '{g}' head", fail)
        for g, h in bundle.group_heads.items()
    }

    method = fed.grouping_method
    if method is None:
        group_heads: dict[str, Heads] = {}
    elif method == "cluster" and known:
        group_heads = known
    elif method == "ifca":
        group_heads = {g: known.get(g, fresh.group_heads[g]) for g in fresh.group_heads}
    else:  # column (and cluster without learned groups: its warm-up group)
        group_heads = {g: known.get(g, _copy(global_heads)) for g in fresh.group_heads}
    assignment = {c: g for c, g in bundle.client_groups.items() if g in group_heads}
    assignment.update(fresh.assignment)

    clients = set(fed.manifest.client_ids)
    personal: dict[str, PersonalState] = {}
    for client in sorted(clients & (set(bundle.personal_heads) | set(bundle.personal_bases))):
        heads = bundle.personal_heads.get(client) or {}
        if heads:
            heads = _checked_heads(
                heads, fresh.global_heads, f"personal head of client '{client}'", fail
            )
        own_base = bundle.personal_bases.get(client)
        if own_base is not None:
            own_base = _checked(own_base, fresh.base, f"personal base of client '{client}'", fail)
        personal[client] = PersonalState(heads, own_base)

    state = ServerState(int(bundle.round), base, group_heads, global_heads, assignment, {})
    return state, personal


def check_compatible(fed: "Federation", bundle: "PersonalizedBundle", fail) -> None:
    """Features, input shape, tasks and architecture of ``bundle`` against ``fed``'s."""
    features = list(fed.manifest.features)
    if len(bundle.features) != len(features):
        raise fail(f"it has {len(bundle.features)} features, the data has {len(features)}")
    if list(bundle.features) != features:
        diff = next(i for i, (a, b) in enumerate(zip(bundle.features, features)) if a != b)
        raise fail(
            f"feature {diff} is '{bundle.features[diff]}' in the model, "
            f"'{features[diff]}' in the data"
        )
    shape = list(fed.manifest.input_shape) if fed.manifest.input_shape else None
    theirs = list(bundle.input_shape) if bundle.input_shape else None
    if shape != theirs:
        raise fail(f"its input shape is {theirs}, the data's is {shape}")
    ours = {t.name: (t.kind, list(t.classes)) for t in fed.manifest.tasks}
    model_tasks = {t["name"]: (t["kind"], list(t["classes"])) for t in bundle.tasks}
    if set(ours) != set(model_tasks):
        raise fail(f"it has tasks {sorted(model_tasks)}, the data has {sorted(ours)}")
    for name, (kind, classes) in ours.items():
        their_kind, their_classes = model_tasks[name]
        if kind != their_kind:
            raise fail(f"task '{name}' is {their_kind} in the model, {kind} in the data")
        if kind == "classification" and classes != their_classes:
            raise fail(
                f"task '{name}' has classes {their_classes} in the model, {classes} in the data"
            )
    wanted = (
        fed.model_cfg.model_dump(mode="json")
        if hasattr(fed.model_cfg, "model_dump")
        else dict(fed.model_cfg)
    )
    for key in ARCHITECTURE_KEYS:
        if key in bundle.model_cfg and key in wanted and bundle.model_cfg[key] != wanted[key]:
            raise fail(
                f"model.{key} is {bundle.model_cfg[key]} in the model, "
                f"{wanted[key]} in the settings"
            )


def seed_store(store: ClientStore, personal: dict[str, PersonalState], round_: int) -> None:
    """Write each client's starting personal state into its store, as its version of ``round_``
    (the round the run starts from)."""
    for client, state in personal.items():
        store.save(client, state, round_)


def _checked(vector: Any, reference: torch.Tensor, what: str, fail) -> torch.Tensor:
    if not isinstance(vector, torch.Tensor):
        raise fail(f"{what} is not a tensor")
    if vector.shape != reference.shape:
        raise fail(
            f"{what} has {vector.numel()} parameters, the current settings need {reference.numel()}"
        )
    if not torch.isfinite(vector).all():
        raise fail(f"{what} holds NaN or inf")
    return vector.detach().to(reference.dtype).clone()


def _checked_heads(heads: dict[str, Any], reference: Heads, what: str, fail) -> Heads:
    if set(heads) != set(reference):
        raise fail(f"the {what} covers tasks {sorted(heads)}, the data has {sorted(reference)}")
    return {
        t: _checked(heads[t], reference[t], f"the {what} for task '{t}'", fail) for t in reference
    }


def _copy(heads: Heads) -> Heads:
    return {t: v.clone() for t, v in heads.items()}
