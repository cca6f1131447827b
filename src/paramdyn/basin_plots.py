"""Figures of the same-basin analysis, from ``barriers.parquet`` and ``pair_distances.parquet``
(:mod:`paramdyn.basins`): the loss or error along the straight path between two checkpoints,
the barrier heights, and the distance of each pair before and after permutation alignment.

A figure's panels: one row per model, one column per pair group (the pair's kind, and for a
branch its perturbation, size and branching step); lines and points are means over the
pairs of a group (one per seed), bands and whiskers their 95% t-interval
(:func:`paramdyn.plots.t_interval`, as the findings compute it)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from . import tables
from .plots import _empty, _finish_grid, _panel_size, _save, t_interval

KIND_LABELS = {
    "seeds": "two init seeds",
    "data_seeds": "two data orders",
    "branches": "branch vs source",
    "instability": "instability pair",
    "init_final": "init → final",
}
ALIGNMENT_LABELS = {"none": "as trained", "weight_matching": "aligned (weight matching)"}
METRICS = {"error": "error (1 − accuracy)", "loss": "cross-entropy loss"}


def _number(x: float) -> str:
    return f"{x:g}"


def group_label(row) -> str:
    """A pair's group, for people: its kind, and a branch's perturbation, size and step."""
    label = KIND_LABELS.get(row["kind"], row["kind"])
    if row["kind"] in ("branches", "instability") and row["perturbation"]:
        label += f"\n{row['perturbation']}"
        if not math.isnan(row["perturbation_value"]):
            label += f" {_number(row['perturbation_value'])}"
        if row["branch_step"] >= 0:
            label += f" @ step {row['branch_step']}"
    return label


def _read(table) -> pd.DataFrame:
    df = table if isinstance(table, pd.DataFrame) else tables.read_parquet(table)
    if df.empty:
        return df
    df = df.copy()
    df["group"] = df.apply(group_label, axis=1)
    df["aligned"] = df["alignment"].map(ALIGNMENT_LABELS).fillna(df["alignment"])
    return df.sort_values(["kind", "perturbation", "perturbation_value", "branch_step"])


def _facets(df: pd.DataFrame) -> dict:
    """One panel per (model, pair group), wrapped four to a row: a study with many kinds,
    branches and sizes stays readable."""
    if df["model"].nunique() > 1:
        df["panel"] = df["model"].astype(str) + "\n" + df["group"]
    else:
        df["panel"] = df["group"]
    panels = df["panel"].nunique()
    height, aspect = _panel_size(panels)
    return {"col": "panel", "col_wrap": min(4, panels), "height": height, "aspect": aspect}


def barrier_path(barriers, out: Path | str, metric: str = "error"):
    """``metric`` (error or loss) against α from θa (α = 0) to θb (α = 1), test split solid
    and train split dashed, as trained and after alignment."""
    df = _read(barriers)
    if df.empty:
        return _empty(out, "no interpolation pairs")
    sns.set_theme(style="whitegrid", context="paper")
    g = sns.relplot(
        data=df,
        x="alpha",
        y=metric,
        hue="aligned",
        style="split",
        style_order=["test", "train"],
        kind="line",
        errorbar=t_interval,
        **_facets(df),
    )
    g.set_axis_labels("α (θ = (1−α)·θa + α·θb)", METRICS[metric])
    # an error is a share and a loss is positive: a t-band of two seeds may say otherwise
    g.set(ylim=(0.0, 1.0) if metric == "error" else (0.0, None))
    g.set_titles(col_template="{col_name}")
    _finish_grid(
        g,
        f"{METRICS[metric]} along the straight path between two checkpoints "
        "(mean and 95% CI over seeds)",
        groups=("aligned", "split"),
    )
    _save(g.figure, out)
    return g.figure


def barrier_heights(barriers, out: Path | str, split: str = "test"):
    """Each pair's error barrier on ``split`` (one dot per pair, i.e. per seed), mean and
    95% CI per group, as trained and after alignment."""
    df = _read(barriers)
    if df.empty:
        return _empty(out, "no interpolation pairs")
    per_pair = df[df["split"] == split].drop_duplicates(["pair", "alignment"])
    sns.set_theme(style="whitegrid", context="paper")
    groups = per_pair["group"].nunique()
    g = sns.catplot(
        data=per_pair,
        y="group",
        x="error_barrier",
        hue="aligned",
        kind="point",
        errorbar=t_interval,
        dodge=0.4,
        linestyle="none",
        col="model" if per_pair["model"].nunique() > 1 else None,
        height=max(2.6, 0.55 * groups + 1.0),
        aspect=max(0.9, 4.2 / max(2.6, 0.55 * groups + 1.0)),
    )
    for ax in g.axes.flat:
        ax.axvline(0.0, color="0.3", linewidth=0.8)
    g.set_axis_labels(f"error barrier ({split} split)", "")
    _finish_grid(g, "error barrier per pair (mean and 95% CI over seeds)", groups=("aligned",))
    _save(g.figure, out)
    return g.figure


def pair_distances(distances, out: Path | str):
    """‖θb − θa‖ / ‖θa‖ per block against depth, as trained and after alignment."""
    df = _read(distances)
    if df.empty:
        return _empty(out, "no interpolation pairs")
    df = df[df["granularity"] == "block"]
    sns.set_theme(style="whitegrid", context="paper")
    g = sns.relplot(
        data=df,
        x="depth",
        y="rel_l2",
        hue="aligned",
        kind="line",
        marker="o",
        errorbar=t_interval,
        facet_kws={"sharey": False},  # a branch that blew up would flatten every panel
        **_facets(df),
    )
    g.set_axis_labels("block depth (0 = input)", "‖θb − θa‖ / ‖θa‖")
    g.set_titles(col_template="{col_name}")
    _finish_grid(g, "distance between the two ends of each pair, per block", groups=("aligned",))
    _save(g.figure, out)
    return g.figure


FIGURES = {
    "barrier_path_error": lambda t, out: barrier_path(t, out, "error"),
    "barrier_path_loss": lambda t, out: barrier_path(t, out, "loss"),
    "barrier_heights": barrier_heights,
}


def plot_all(barriers: Path | str, distances: Path | str, outs: dict[str, str]) -> None:
    """Every figure of the analysis, ``outs``: figure name -> path."""
    df = tables.read_parquet(barriers)
    for name, draw in FIGURES.items():
        draw(df, outs[name])
        plt.close("all")
    pair_distances(distances, outs["pair_distances"])
    plt.close("all")
