"""Figures for a run (matplotlib, Agg backend): convergence, per-client global vs personal,
the personalisation gain per client and the group assignment over the rounds."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from fedmtl.eval.metrics import HIGHER_IS_BETTER, VARIANTS  # noqa: E402


def convergence(history: list[dict[str, float]], metric: str = "accuracy"):
    fig, ax = plt.subplots(figsize=(6, 4))
    rounds = list(range(1, len(history) + 1))
    pooled = bool(history) and f"personal/{metric}/mean" not in history[0]
    for variant in VARIANTS:
        key = f"{variant}/{metric}/{'pooled' if pooled else 'mean'}"
        if history and key in history[0]:
            ax.plot(rounds, [h.get(key) for h in history], marker=".", label=variant)
    ax.set_xlabel("round")
    ax.set_ylabel(f"pooled {metric} (all clients' rows)" if pooled else f"mean client {metric}")
    ax.set_title("Convergence (held-out splits)")
    ax.grid(alpha=0.3)
    if ax.get_lines():  # under DP only the final model's evaluation is released: nothing per round
        ax.legend()
    fig.tight_layout()
    return fig


def clients_global_vs_personal(records: pd.DataFrame, metric: str = "accuracy"):
    task = records["task"].iloc[0]
    pivot = records[records["task"] == task].pivot_table(
        index="client", columns="variant", values=metric
    )
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


def personalisation_gain_histogram(records: pd.DataFrame, metric: str | None = None):
    """Histogram over clients of personalised minus global ``metric`` (first task; sign flipped
    for error metrics, so right of zero is always "personalisation helped")."""
    task = records["task"].iloc[0]
    rows = records[records["task"] == task]
    if metric is None:
        metric = next(
            (m for m in HIGHER_IS_BETTER if m in rows.columns and rows[m].notna().any()), "accuracy"
        )
    pivot = rows.pivot_table(index="client", columns="variant", values=metric)
    fig, ax = plt.subplots(figsize=(6, 4))
    if {"personal", "global"} <= set(pivot.columns):
        gain = (pivot["personal"] - pivot["global"]).dropna()
        if not HIGHER_IS_BETTER.get(metric, True):
            gain = -gain
        ax.hist(gain, bins=min(20, max(5, len(gain))), color="tab:green", edgecolor="white")
        ax.axvline(0.0, color="grey", lw=0.8, ls="--")
        if len(gain):
            ax.axvline(float(gain.mean()), color="black", lw=1.2, label=f"mean {gain.mean():+.3f}")
            ax.legend()
    ax.set_xlabel(
        f"personalised − global {metric}"
        + ("" if HIGHER_IS_BETTER.get(metric, True) else " (negated)")
    )
    ax.set_ylabel("clients")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("Personalisation gain per client")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig


def group_assignment(assignments: pd.DataFrame):
    """Each client's group: a client × round heat map when there are several rounds, else a bar
    chart of the number of clients per group. ``assignments``: columns round, client, group."""
    table = assignments.assign(
        group=assignments["group"].map(lambda g: "none" if g is None or g != g else str(g))
    )
    groups = sorted(table["group"].unique())
    rounds = sorted(table["round"].unique())
    if len(rounds) <= 1:
        counts = table.groupby("group")["client"].nunique().reindex(groups)
        fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(groups) + 2), 4))
        ax.bar(
            range(len(groups)),
            counts.to_numpy(),
            color=plt.get_cmap("tab10")(np.arange(len(groups)) % 10),
        )
        ax.set_xticks(range(len(groups)), groups)
        ax.set_xlabel("group")
        ax.set_ylabel("clients")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title("Clients per group" + (f" (round {rounds[0]})" if rounds else ""))
        ax.grid(alpha=0.3, axis="y")
        fig.tight_layout()
        return fig
    code = {g: i for i, g in enumerate(groups)}
    grid = table.assign(code=table["group"].map(code)).pivot_table(
        index="client", columns="round", values="code", aggfunc="first"
    )
    grid = grid.reindex(columns=rounds)
    palette = "tab10" if len(groups) <= 10 else "tab20"
    cmap = ListedColormap(plt.get_cmap(palette)(np.arange(len(groups)) % 20))
    fig, ax = plt.subplots(
        figsize=(min(12, 3 + 0.25 * len(rounds)), min(12, 1.5 + 0.25 * len(grid)))
    )
    image = ax.imshow(
        np.ma.masked_invalid(grid.to_numpy(dtype=float)),
        aspect="auto",
        cmap=cmap,
        vmin=-0.5,
        vmax=len(groups) - 0.5,
        interpolation="nearest",
    )
    step = max(1, len(rounds) // 15)
    ax.set_xticks(range(0, len(rounds), step), [str(r) for r in rounds[::step]])
    ax.set_yticks(
        range(len(grid)), [str(c) for c in grid.index], fontsize=7 if len(grid) > 30 else 9
    )
    ax.set_xlabel("round")
    ax.set_ylabel("client")
    ax.set_title("Group assignment per round")
    bar = fig.colorbar(image, ax=ax, ticks=range(len(groups)))
    bar.ax.set_yticklabels(groups)
    bar.set_label("group")
    fig.tight_layout()
    return fig


def close(fig) -> None:
    plt.close(fig)
