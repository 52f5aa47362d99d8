"""Figures for a run (matplotlib, Agg backend): convergence and per-client global vs personal."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from fedmtl.evaluation import VARIANTS  # noqa: E402


def convergence(history: list[dict[str, float]], metric: str = "accuracy"):
    fig, ax = plt.subplots(figsize=(6, 4))
    rounds = list(range(1, len(history) + 1))
    for variant in VARIANTS:
        key = f"{variant}/{metric}/mean"
        if history and key in history[0]:
            ax.plot(rounds, [h.get(key) for h in history], marker=".", label=variant)
    ax.set_xlabel("round")
    ax.set_ylabel(f"mean client {metric}")
    ax.set_title("Convergence (held-out splits)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def clients_global_vs_personal(records: pd.DataFrame, metric: str = "accuracy"):
    task = records["task"].iloc[0]
    pivot = records[records["task"] == task].pivot_table(index="client", columns="variant", values=metric)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(pivot["global"], pivot["personal"], s=18)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.set_xlabel(f"global model {metric}")
    ax.set_ylabel(f"personalised model {metric}")
    ax.set_title("Per client: global vs personalised")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    fig.tight_layout()
    return fig


def close(fig) -> None:
    plt.close(fig)
