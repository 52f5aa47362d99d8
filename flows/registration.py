"""The end of a training run: plots, the per-client table, the registered personalised model
(its bundle, a synthetic input example and its privacy tags) and the DVC metrics file."""

from __future__ import annotations

import json
from typing import Any

import pandas as pd

from fedmtl.config import Config
from fedmtl.data.manifest import atomic_write_bytes
from fedmtl.eval import plots
from fedmtl.federation import Federation
from fedmtl.state import ServerState
from models.personalized import CLIENT_COLUMN, PersonalizedBundle
from tasks.registry import log_personalized_model
from tasks.tracking import RunTracker


def finish(
    fed, state, clients, records, history, assignments, cfg, tracker, tags
) -> dict[str, Any]:
    """Plots, the per-client table, the registered model and the DVC metrics file."""
    fig = plots.convergence(history)
    tracker.log_figure(fig, "plots/convergence.png")
    plots.close(fig)
    if cfg.privacy.per_client_metrics:  # per-client figures and tables: not with privacy on
        fig = plots.clients_global_vs_personal(records)
        tracker.log_figure(fig, "plots/clients_global_vs_personal.png")
        plots.close(fig)
        fig = plots.personalisation_gain_histogram(records)
        tracker.log_figure(fig, "plots/personalisation_gain.png")
        plots.close(fig)
        tracker.log_table(records, "clients_final.csv")
    if (
        fed.grouping_method is not None
        and assignments is not None
        and cfg.privacy.per_client_metrics
    ):
        assigned = assignments
        tracker.log_table(assigned, "groups/assignment.csv")
        if not assigned.empty:
            fig = plots.group_assignment(assigned)
            tracker.log_figure(fig, "plots/group_assignment.png")
            plots.close(fig)

    version = None
    model_uri = None
    bundle = None
    if cfg.tracking.register_model:
        bundle = make_bundle(fed, state, cfg)
        example = input_example(fed)  # synthetic: never a client's rows
        model_uri, version = log_personalized_model(
            tracker.run_id,
            bundle,
            example,
            cfg.tracking.registered_model,
            tags={
                "data_version": tags["data_version"],
                "git_commit": tags["git_commit"],
                **version_privacy_tags(cfg, tracker),
            },
        )
        tracker.set_tags(
            {"registered_model": cfg.tracking.registered_model, "model_version": version or ""}
        )

    final = history[-1]
    pooled = not cfg.privacy.per_client_metrics  # then only pooled figures exist (no worst-10 %)
    stat = "pooled" if pooled else "mean"
    metrics = {
        "global_accuracy": final.get(f"global/accuracy/{stat}"),
        "group_accuracy": final.get(f"group/accuracy/{stat}"),
        "personal_accuracy": final.get(f"personal/accuracy/{stat}"),
        "global_f1": final.get(f"global/f1/{stat}"),
        "group_f1": final.get(f"group/f1/{stat}"),
        "personal_f1": final.get(f"personal/f1/{stat}"),
        "personal_accuracy_worst10": final.get("personal/accuracy/worst10"),
        "global_accuracy_worst10": final.get("global/accuracy/worst10"),
        "group_accuracy_worst10": final.get("group/accuracy/worst10"),
        "personalisation_gain": final.get(
            "personalisation_gain/accuracy" + ("/pooled" if pooled else "")
        ),
        "grouping_ari": final.get("grouping/ari"),
        "evaluation": ("pooled through a secure sum" if cfg.privacy.secure else "pooled")
        if pooled
        else "mean over clients",
        "rounds": state.round,
        "clients": len(clients),
        "mlflow_run_id": tracker.run_id,
        "model_version": version,
        "data_version": tags["data_version"],
    }
    metrics = {k: v for k, v in metrics.items() if v is not None}
    atomic_write_bytes(cfg.tracking.metrics_file, (json.dumps(metrics, indent=2) + "\n").encode())
    return {
        **metrics,
        "model_uri": model_uri,
        "registered_model": cfg.tracking.registered_model,
        "tracking_uri": tracker.tracking_uri,
        "history": history,
        "bundle": bundle,
    }


def version_privacy_tags(cfg: Config, tracker: RunTracker) -> dict[str, str]:
    """The model version's privacy tags: the mechanism and, under DP, the ε spent (at δ)."""
    out = {"privacy": cfg.privacy.mechanism}
    if cfg.privacy.insecure_seeded_noise:  # noise replayable from training.seed: no ε holds
        out["privacy_epsilon_void"] = "true"
    if cfg.privacy.dp_fedavg.enabled or cfg.privacy.sample_level:
        tags = tracker.client.get_run(tracker.run_id).data.tags
    if cfg.privacy.dp_fedavg.enabled:
        out.update(
            {
                "privacy_epsilon": tags.get("privacy_epsilon", ""),
                "privacy_delta": f"{cfg.privacy.dp_fedavg.delta:g}",
            }
        )
    if cfg.privacy.sample_level:
        out.update(
            {
                k: tags[k]
                for k in ("privacy_dp_sgd_epsilon_max", "privacy_dp_sgd_delta")
                if k in tags
            }
        )
    return out


def make_bundle(fed: Federation, state: ServerState, cfg: Config) -> PersonalizedBundle:
    """The model to register: the shared base, global and group heads and the client → group
    routing. Personal heads and bases stay on the clients (each fits and keeps its own, e.g.
    ``fedmtl personalize``) unless ``tracking.bundle_personal_heads`` opts in, which the
    settings refuse under DP-FedAvg and DP-SGD (they are fitted outside ε)."""
    personal, bases = {}, {}
    if cfg.tracking.bundle_personal_heads and (
        cfg.privacy.dp_fedavg.enabled or cfg.privacy.sample_level
    ):
        raise ValueError(
            "tracking.bundle_personal_heads=true with DP-FedAvg or DP-SGD: personal heads "
            "are fitted outside the DP guarantee and would be published in the registered model; "
            "set tracking.bundle_personal_heads=false"
        )
    if cfg.tracking.bundle_personal_heads:
        for client in fed.manifest.client_ids:
            kept = fed.store.load(client)
            if kept is None:
                continue
            if kept.heads:
                personal[client] = kept.heads
            if kept.base is not None:
                bases[client] = kept.base
    return PersonalizedBundle(
        model_cfg=cfg.model.model_dump(mode="json"),
        features=list(fed.manifest.features),
        tasks=[
            {"name": t.name, "kind": t.kind, "classes": list(t.classes)} for t in fed.manifest.tasks
        ],
        input_shape=fed.manifest.input_shape,
        base=state.base,
        global_heads=state.global_heads,
        group_heads=state.group_heads,
        client_groups={c: g for c, g in state.assignment.items() if g in state.group_heads},
        personal_heads=personal,
        personal_bases=bases,
        coldstart=cfg.coldstart.model_dump(mode="json"),
        round=state.round,
    )


EXAMPLE_CLIENT = "example-client"


def input_example(fed: Federation, rows: int = 2) -> pd.DataFrame:
    """The input example stored with the registered model (``input_example.json``,
    ``serving_input_example.json``, the signature): synthetic, for every run. ``rows`` rows of
    zeros under the feature columns and a client id no client has (so it is answered by the
    global heads, as an unknown client without labels is); never a client's rows or statistics."""
    client = EXAMPLE_CLIENT
    while client in set(fed.manifest.client_ids):
        client += "-x"
    frame = pd.DataFrame(0.0, index=range(rows), columns=list(fed.manifest.features))
    frame.insert(0, CLIENT_COLUMN, client)
    return frame
