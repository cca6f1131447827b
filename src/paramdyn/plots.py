"""Figures, drawn with seaborn from the per-study Parquet tables only."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from . import tables  # noqa: E402

METRIC_LABELS = {
    "l1": "L1 distance (sum |Δθ|)",
    "l2": "L2 distance",
    "linf": "max |Δθ|",
    "mean_abs": "mean |Δθ| (L1 / numel)",
    "rms": "RMS Δθ (L2 / √numel)",
    "rel_l2": "‖Δθ‖ / ‖θ_ref‖",
    "cosine": "cosine(θ, θ_ref)",
    "frac_changed": "share of entries changed",
}
MAX_COLUMNS = 6


def _save(fig, out: Path | str) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".tmp" + out.suffix)
    fig.savefig(tmp, dpi=130, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(out)


def _empty(out: Path | str, text: str) -> None:
    fig, ax = plt.subplots(figsize=(5, 2))
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center")
    _save(fig, out)


def _epoch_checkpoints(df: pd.DataFrame) -> list[int]:
    """Epoch-end checkpoints to show as columns: at most MAX_COLUMNS, evenly spread."""
    steps = sorted(set(df.loc[df["epoch_end"], "step"]))
    if len(steps) > MAX_COLUMNS:
        steps = [steps[int(round(i))] for i in np.linspace(0, len(steps) - 1, MAX_COLUMNS)]
    return steps


def distance_vs_depth(distances: Path | str, out: Path | str, reference: str, metric: str):
    """Block distance against depth, one column per epoch checkpoint, one row per
    optimizer / init; colour = model, dashes = plain vs residual; band = 95% CI over seeds."""
    df = tables.read_parquet(distances)
    df = df[(df.granularity == "block") & (df.reference == reference)]
    if df.empty:
        _empty(out, f"no block distances against '{reference}'")
        return
    df = df[df.step.isin(_epoch_checkpoints(df))].copy()
    df["setting"] = df["optimizer"] + " / " + df["init"] + " / " + df["dataset"]
    df["checkpoint"] = "epoch " + df["epoch"].astype(str)
    sns.set_theme(style="whitegrid", context="paper")
    g = sns.relplot(
        data=df, x="depth", y=metric, hue="model", style="shortcut", col="checkpoint",
        row="setting", kind="line", errorbar=("ci", 95), marker="o", markersize=3,
        height=2.4, aspect=1.25, facet_kws={"sharey": "row", "margin_titles": True},
    )  # fmt: skip
    positive = (df[metric] > 0).all()
    if positive and df[metric].max() / max(df[metric].min(), 1e-300) > 100:
        g.set(yscale="log")
    g.set_axis_labels("depth (0 = stem, input side)", METRIC_LABELS.get(metric, metric))
    g.set_titles(row_template="{row_name}", col_template="{col_name}")
    g.figure.suptitle(
        f"{METRIC_LABELS.get(metric, metric)} per block, against {reference} weights"
        f" (band: 95% CI over seeds)", y=1.02,
    )  # fmt: skip
    _save(g.figure, out)


def history_curves(history: Path | str, out: Path | str, measure: str):
    """Accuracy or loss against epoch, train and test, one panel per optimizer / init."""
    df = tables.read_parquet(history)
    df = df.copy()
    df["setting"] = df["optimizer"] + " / " + df["init"] + " / " + df["dataset"]
    sns.set_theme(style="whitegrid", context="paper")
    g = sns.relplot(
        data=df, x="epoch", y=measure, hue="model", style="split", col="setting",
        col_wrap=min(4, df["setting"].nunique()), kind="line", errorbar=("ci", 95),
        height=2.6, aspect=1.2,
    )  # fmt: skip
    if measure == "loss" and (df[measure] > 0).all():
        g.set(yscale="log")
    g.set_titles("{col_name}")
    g.figure.suptitle(f"{measure} (band: 95% CI over seeds)", y=1.02)
    _save(g.figure, out)
