"""Figures, drawn with seaborn from the per-study Parquet tables only."""

from __future__ import annotations

import functools
import itertools
import re
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import seaborn as sns  # noqa: E402

from . import atomic, tables  # noqa: E402
from .columns import RUN as GRID_COLUMNS  # noqa: E402

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


@functools.cache
def _t_quantile(n: int) -> float:
    from scipy import stats  # here, not at the top: seconds to import

    return float(stats.t.ppf(0.975, n - 1))


def t_interval(values) -> tuple[float, float]:
    """The 95% t-interval of the mean of ``values`` (the seeds at one point), as the
    findings compute it; a point with one value has no band. Seaborn's bootstrap of
    three values would be slower and no better."""
    x = np.asarray(values, dtype=float)
    mean = float(x.mean())
    if len(x) < 2:
        return mean, mean
    half = _t_quantile(len(x)) * float(x.std(ddof=1)) / np.sqrt(len(x))
    return mean - half, mean + half


def _save(fig, out: Path | str) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic.replacing(out, keep_suffix=True) as tmp:  # matplotlib reads the suffix
        fig.savefig(tmp, dpi=130, bbox_inches="tight")
        plt.close(fig)


def _empty(out: Path | str, text: str):
    fig, ax = plt.subplots(figsize=(5, 2))
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center")
    _save(fig, out)
    return fig


def _epoch_checkpoints(df: pd.DataFrame) -> list[int]:
    """Epoch-end checkpoints to show as columns: at most MAX_COLUMNS, evenly spread."""
    steps = sorted(set(df.loc[df["epoch_end"], "step"]))
    if len(steps) > MAX_COLUMNS:
        steps = [steps[int(round(i))] for i in np.linspace(0, len(steps) - 1, MAX_COLUMNS)]
    return steps


# --- layout: every figure stays legible with one panel as with many --------------------------


def _panel_size(panels: int) -> tuple[float, float]:
    """(height, aspect) of one facet: larger when the grid has few panels."""
    if panels <= 1:
        return 3.2, 1.45
    if panels <= 2:
        return 2.8, 1.35
    return 2.4, 1.25


def _setting(df: pd.DataFrame, keys=("optimizer", "init", "dataset")) -> tuple[pd.Series, str]:
    """The keys that vary, joined per row (for a facet; None when none varies), and the
    constant ones joined (for the title)."""
    varying = [k for k in keys if df[k].nunique() > 1]
    constant = " / ".join(str(df[k].iloc[0]) for k in keys if k not in varying)
    label = df[varying].astype(str).agg(" / ".join, axis=1) if varying else None
    return label, constant


def _wrap(text: str, width: int) -> str:
    return textwrap.fill(text, max(width, 12), break_on_hyphens=False, break_long_words=False)


def _axes_span(fig) -> tuple[float, float, float]:
    """Left, right (figure fraction) and bottom (figure fraction, tick labels and axis labels
    included) of the figure's visible axes."""
    renderer = fig.canvas.get_renderer()
    axes = [ax for ax in fig.axes if ax.get_visible() and ax.get_label() != "<colorbar>"]
    boxes = [ax.get_position() for ax in axes]
    bottom = min(ax.get_tightbbox(renderer).y0 for ax in axes) / fig.bbox.height
    return min(b.x0 for b in boxes), max(b.x1 for b in boxes), bottom


def _suptitle(fig, text: str) -> None:
    """A figure title above everything (panel titles included), centred on the panels and
    wrapped to their width (a one-panel figure is narrow)."""
    left, right, _ = _axes_span(fig)
    chars = int((right - left) * fig.get_size_inches()[0] * 12)
    renderer = fig.canvas.get_renderer()
    top = max(ax.get_tightbbox(renderer).y1 for ax in fig.axes) / fig.bbox.height
    fig.suptitle(_wrap(text, chars), x=(left + right) / 2, y=max(top, 1.0) + 0.01, va="bottom")


def _rotate_ticks(ax, max_chars: int = 8) -> None:
    """Long categorical tick labels: rotated 30 degrees, anchored at their right end."""
    labels = ax.get_xticklabels()
    if labels and max(len(t.get_text()) for t in labels) > max_chars:
        plt.setp(labels, rotation=30, ha="right", rotation_mode="anchor")


def _legend_below(fig, legend, groups=()) -> matplotlib.legend.Legend:
    """Move a grid's legend below its panels, one column per group of entries (seaborn
    puts each variable's name as an entry before its values: ``groups`` are those names)."""
    handles, labels = legend.legend_handles, [t.get_text() for t in legend.get_texts()]
    title = legend.get_title().get_text()
    columns, current = [], []
    for handle, label in zip(handles, labels, strict=True):
        if label in groups and current:
            columns.append(current)
            current = []
        current.append((handle, label))
    columns.append(current)
    if len(columns) == 1:  # one variable: its values side by side, its name as the title
        if current[0][1] in groups:
            title = current.pop(0)[1]
        columns = [[e] for e in current]
    rows = max(len(c) for c in columns)
    blank = matplotlib.patches.Patch(alpha=0, linewidth=0)
    entries = [e for c in columns for e in c + [(blank, "")] * (rows - len(c))]
    legend.remove()
    left, right, bottom = _axes_span(fig)
    return fig.legend(
        [h for h, _ in entries],
        [lab for _, lab in entries],
        loc="upper center",
        bbox_to_anchor=((left + right) / 2, bottom - 0.02),
        ncol=min(len(columns), 4),
        frameon=False,
        title=title or None,
    )


def _finish_grid(g, title: str, groups=()) -> None:
    """A seaborn grid's legend below the panels when the grid is narrow (two columns or
    fewer; the side legend then squeezes the panels), its title wrapped to its width."""
    if g.legend is not None and g._ncol <= 2:
        g._legend = _legend_below(g.figure, g.legend, groups)
    _suptitle(g.figure, title)


def distance_vs_depth(distances: Path | str, out: Path | str, reference: str, metric: str):
    """Block distance against depth, one column per epoch checkpoint, one row per
    optimizer / init / dataset (the parts that vary; the rest go in the title); colour =
    model, dashes = plain vs residual; band = 95% CI over seeds."""
    df = tables.read_parquet(distances)
    df = df[(df.granularity == "block") & (df.reference == reference)]
    if "perturbation" in df.columns:  # branches have their own figures
        df = df[df["perturbation"].fillna("") == ""]
    if df.empty:
        return _empty(out, f"no block distances against '{reference}'")
    df = df[df.step.isin(_epoch_checkpoints(df))].copy()
    setting, constant = _setting(df)
    df["setting"] = setting.map(lambda t: _wrap(t, 22)) if setting is not None else ""
    df["checkpoint"] = "epoch " + df["epoch"].astype(str)
    row = "setting" if setting is not None else None
    height, aspect = _panel_size(df["setting"].nunique() * df["checkpoint"].nunique())
    sns.set_theme(style="whitegrid", context="paper")
    g = sns.relplot(
        data=df,
        x="depth",
        y=metric,
        hue="model",
        style="shortcut",
        col="checkpoint",
        row=row,
        kind="line",
        errorbar=t_interval,
        marker="o",
        markersize=3,
        height=height,
        aspect=aspect,
        facet_kws={"sharey": "row", "margin_titles": True},
    )
    positive = (df[metric] > 0).all()
    if positive and df[metric].max() / max(df[metric].min(), 1e-300) > 100:
        g.set(yscale="log")
    g.set_axis_labels("depth (0 = stem, input side)", METRIC_LABELS.get(metric, metric))
    g.set_titles(row_template="{row_name}", col_template="{col_name}")
    _finish_grid(
        g,
        f"{METRIC_LABELS.get(metric, metric)} per block, against {reference} weights"
        f"{', ' + constant if constant else ''} (band: 95% CI over seeds)",
        ("model", "shortcut"),
    )
    _save(g.figure, out)
    return g.figure


def history_curves(history: Path | str, out: Path | str, measure: str):
    """Accuracy or loss against epoch, train and test, one panel per optimizer / init /
    dataset (the parts that vary; the rest go in the title). Perturb-and-retrain branches
    are left out: they start trained (their own figure is perturbations.png)."""
    df = tables.read_parquet(history).copy()
    if "perturbation" in df.columns:
        df = df[df["perturbation"].fillna("") == ""]
    setting, constant = _setting(df)
    df["setting"] = setting.map(lambda t: _wrap(t, 30)) if setting is not None else ""
    panels = df["setting"].nunique()
    height, aspect = _panel_size(panels)
    sns.set_theme(style="whitegrid", context="paper")
    g = sns.relplot(
        data=df,
        x="epoch",
        y=measure,
        hue="model",
        style="split",
        col="setting" if panels > 1 else None,
        col_wrap=min(4, panels) if panels > 1 else None,
        kind="line",
        errorbar=t_interval,
        height=height,
        aspect=aspect,
    )
    if measure == "loss" and (df[measure] > 0).all():
        g.set(yscale="log")
    if measure == "accuracy":
        g.set(ylim=(0, 1.02))
    for ax in g.axes.flat:
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    g.set_titles("{col_name}" if panels > 1 else "")
    suffix = f", {constant}" if constant else ""
    _finish_grid(g, f"{measure}{suffix} (band: 95% CI over seeds)", ("model", "split"))
    _save(g.figure, out)
    return g.figure


# --- representations and perturbations (study "dynamics") ------------------------------------

SIMILARITY_LABELS = {
    "cka_linear": ("linear CKA", 1.0, (0.0, 1.0)),
    "cka_linear_unbiased": ("linear CKA (unbiased HSIC)", 1.0, (0.0, 1.0)),
    "matched_correlation": ("mean correlation of matched units", 1.0, (0.0, 1.0)),
    "procrustes": ("Procrustes distance (0 = same up to rotation)", 0.0, (0.0, 2.0)),
}  # measure -> (label, value of a run with itself, colour range)
ANNOTATE_MAX = 12  # annotate heatmap cells up to this many runs


def _short_labels(runs: list[str]) -> tuple[list[str], str]:
    """Run ids without the '_'-separated tokens they all share, and those tokens."""
    tokens = [r.split("_") for r in runs]
    common = [t for t in tokens[0] if all(t in ts for ts in tokens[1:])] if len(runs) > 1 else []
    short = [
        "_".join(t for t in ts if t not in common) or r for ts, r in zip(tokens, runs, strict=True)
    ]
    if len(set(short)) < len(runs):
        return list(runs), ""
    return short, "_".join(common)


def cka_heatmap(similarity, out: Path | str, measure: str = "cka_linear") -> None:
    """Runs x runs heatmap of one measure of a similarity table (a DataFrame or Parquet path
    with columns run_a, run_b, measure, value, as ``features.similarity_table`` writes).
    Symmetric; the diagonal is the value of a run with itself (1 for similarities, 0 for
    Procrustes) unless the table has it; pairs not in the table are blank; a pair listed
    more than once shows its mean. Cells are annotated up to ANNOTATE_MAX runs."""
    df = similarity if isinstance(similarity, pd.DataFrame) else tables.read_parquet(similarity)
    df = df[df["measure"] == measure]
    if df.empty:
        _empty(out, f"no '{measure}' values in the similarity table")
        return
    label, self_value, (vmin, vmax) = SIMILARITY_LABELS.get(
        measure, (measure, np.nan, (None, None))
    )
    runs = sorted(set(df["run_a"]) | set(df["run_b"]))
    pos = {r: i for i, r in enumerate(runs)}
    m = np.full((len(runs), len(runs)), np.nan)
    np.fill_diagonal(m, self_value)
    for (a, b), v in df.groupby(["run_a", "run_b"])["value"].mean().items():
        m[pos[a], pos[b]] = m[pos[b], pos[a]] = v
    short, common = _short_labels(runs)
    side = 0.55 * len(runs)
    fig, ax = plt.subplots(figsize=(max(4.5, side + 2.5), max(3.5, side + 1.5)))
    sns.heatmap(
        pd.DataFrame(m, index=short, columns=short),
        ax=ax,
        vmin=vmin,
        vmax=vmax,
        square=True,
        cmap="viridis_r" if measure == "procrustes" else "viridis",
        annot=len(runs) <= ANNOTATE_MAX,
        fmt=".2f",
        annot_kws={"size": 7},
        cbar_kws={"label": label},
        linewidths=0.5,
        linecolor="white",
    )
    ax.set_xlabel("")
    ax.set_ylabel("")
    ax.tick_params(axis="x", labelrotation=90, labelsize=7)
    ax.tick_params(axis="y", labelrotation=0, labelsize=7)
    ax.set_title(f"{label}\n{common}" if common else label, fontsize=9)
    _save(fig, out)
    return fig


def _cluster_order(corr: np.ndarray) -> np.ndarray:
    """Units ordered for display: average-linkage clustering on 1 - |corr| (leaf order),
    units with undefined correlation (constant: NaN rows) last."""
    # scipy here, not at the top: seconds to import, for two figures only
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform

    live = np.flatnonzero(~np.isnan(np.diag(corr)))
    dead = np.flatnonzero(np.isnan(np.diag(corr)))
    if live.size < 3:
        return np.concatenate([live, dead])
    dist = 1.0 - np.abs(corr[np.ix_(live, live)])
    np.fill_diagonal(dist, 0.0)
    dist = np.clip((dist + dist.T) / 2.0, 0.0, None)
    order = leaves_list(linkage(squareform(dist, checks=False), method="average"))
    return np.concatenate([live[order], dead])


def correlation_heatmap(X, out: Path | str, title: str, Y=None) -> None:
    """Pearson correlation between feature units (X: samples x units), units reordered by
    hierarchical clustering so correlated groups sit together; constant (dead) units are
    last and blank. With ``Y`` (a second model's features on the same samples): the X x Y
    correlations, X's units in X's cluster order and each X unit's matched Y unit
    (``features.matched_correlation``) in the same position, so matched pairs lie on the
    diagonal; Y's unmatched units follow."""
    # here, not at the top: only this figure needs the feature measures, so an edit of
    # features.py redraws it alone (each rule's code hash follows what its job runs)
    from .features import (
        correlation_matrix,
        correlation_summary,
        cross_correlation,
        matched_correlation,
    )

    within = correlation_matrix(X)
    order_x = _cluster_order(within)
    if Y is None:
        corr = within[np.ix_(order_x, order_x)]
        s = correlation_summary(X) if (~np.isnan(np.diag(within))).sum() >= 2 else None
        note = (
            f"mean |r| off-diagonal {s['mean_abs_offdiag']:.3f}, effective rank "
            f"{s['effective_rank']:.1f} of {s['units']}, {s['constant_units']} constant units"
            if s
            else "fewer than 2 non-constant units"
        )
        xlabel = ylabel = "unit (clustered order)"
    else:
        cross = cross_correlation(X, Y)
        mean, _, assignment = matched_correlation(X, Y)
        matched = [int(assignment[i]) for i in order_x if assignment[i] >= 0]
        rest = [j for j in range(cross.shape[1]) if j not in set(matched)]
        rows = [i for i in order_x if assignment[i] >= 0] + [
            i for i in order_x if assignment[i] < 0
        ]
        corr = cross[np.ix_(rows, matched + rest)]
        note = f"matched units on the diagonal: mean r {mean:.3f}"
        xlabel, ylabel = "second model's unit (matched order)", "unit (clustered order)"
    size = min(9.0, 3.0 + 0.04 * max(corr.shape))
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    sns.heatmap(
        corr,
        ax=ax,
        vmin=-1.0,
        vmax=1.0,
        center=0.0,
        cmap="vlag",
        square=corr.shape[0] == corr.shape[1],
        xticklabels=False,
        yticklabels=False,
        cbar_kws={"label": "Pearson r"},
    )
    ax.set_facecolor("0.75")  # NaN cells: constant units, correlation undefined
    if np.isnan(corr).any():
        note += "; grey: constant units"
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{title}\n{note}", fontsize=9)
    _save(fig, out)
    return fig


def perturbation_bars(perturbations, out: Path | str):
    """For each perturbation: ‖θ1 - θ2‖ / ‖θ1‖ (the retrained weights against the original
    trained ones) and test accuracy before (the original run) and after retraining.

    ``perturbations``: a DataFrame or Parquet path, one row per retrained run, with columns
    ``perturbation``, ``accuracy_before``, ``accuracy_after`` and either
    ``rel_dist_theta1_theta2`` or ``dist_theta1_theta2`` and ``norm_theta1`` (the keys of
    ``perturb.perturbation_summary``); optional ``model`` and ``dataset`` make one row of
    panels per setting (titled above the row). Bars are means, whiskers 95% CIs over the
    rows (seeds)."""
    df = (
        perturbations
        if isinstance(perturbations, pd.DataFrame)
        else tables.read_parquet(perturbations)
    )
    if "granularity" in df.columns:  # the whole-model rows (the table also has blocks)
        df = df[df["granularity"] == "model"]
    if df.empty:
        return _empty(out, "no perturbation results")
    df = df.copy()
    if "rel_dist_theta1_theta2" not in df:
        df["rel_dist_theta1_theta2"] = df["dist_theta1_theta2"] / df["norm_theta1"]
    keys = [k for k in ("model", "dataset") if k in df]
    df["setting"] = df[keys].astype(str).agg(" / ".join, axis=1) if keys else ""
    settings = sorted(df["setting"].unique())
    order = sorted(df["perturbation"].unique())
    sns.set_theme(style="whitegrid", context="paper")
    width = max(7.5, 1.3 * len(order) + 4.5)
    fig = plt.figure(figsize=(width, 3.0 * len(settings) + 0.6), layout="constrained")
    for sub_fig, setting in zip(
        np.atleast_1d(fig.subfigures(len(settings), 1)), settings, strict=True
    ):
        sub = df[df["setting"] == setting]
        if setting:
            sub_fig.suptitle(_wrap(setting, int(width * 12)), fontsize=9, fontweight="bold")
        _perturbation_row(sub_fig.subplots(1, 2), sub, order)
    handles, labels = fig.axes[1].get_legend_handles_labels()
    for ax in fig.axes:
        if ax.get_legend() is not None:
            ax.get_legend().remove()
    fig.legend(
        handles, labels, loc="outside lower center", ncol=2, frameon=False, title="test accuracy"
    )
    fig.suptitle("perturb and retrain (bars: mean; whiskers: 95% CI over seeds)")
    _save(fig, out)
    return fig


def _perturbation_row(axes, sub: pd.DataFrame, order: list[str]) -> None:
    ax_d, ax_a = axes
    sns.barplot(
        data=sub,
        x="perturbation",
        y="rel_dist_theta1_theta2",
        order=order,
        errorbar=t_interval,
        ax=ax_d,
        color="C0",
    )
    values = sub["rel_dist_theta1_theta2"]
    if (values > 0).all() and values.max() / values.min() > 100:
        ax_d.set_yscale("log")
    ax_d.set_ylabel("‖θ1 - θ2‖ / ‖θ1‖")
    ax_d.set_title("retrained vs original weights", fontsize=9)
    acc = sub.melt(
        id_vars=["perturbation"],
        value_vars=["accuracy_before", "accuracy_after"],
        var_name="when",
        value_name="accuracy",
    )
    acc["when"] = acc["when"].map(
        {"accuracy_before": "before perturbation", "accuracy_after": "after retraining"}
    )
    sns.barplot(
        data=acc,
        x="perturbation",
        y="accuracy",
        hue="when",
        order=order,
        hue_order=["before perturbation", "after retraining"],
        errorbar=t_interval,
        ax=ax_a,
    )
    ax_a.set_ylim(0.0, 1.0)
    ax_a.set_ylabel("test accuracy")
    ax_a.set_title("test accuracy", fontsize=9)
    for ax in (ax_d, ax_a):
        ax.set_xlabel("")
        _rotate_ticks(ax, 10)


# --- gradients, averages ---------------------------------------------------------------------


def _spread(values: list, n: int) -> list:
    values = sorted(set(values))
    if len(values) <= n:
        return values
    return [values[int(round(i))] for i in np.linspace(0, len(values) - 1, n)]


def gradient_vs_depth(gradients, out: Path | str, vanish: float, explode: float):
    """Gradient RMS per block against depth on a log scale, at a few recorded steps through
    training; colour = model, dashes = plain vs residual, band = 95% CI over seeds. Dotted
    lines: the vanishing and exploding thresholds; blocks beyond them are counted in the
    title (NaN/Inf gradients count as exploding)."""
    df = tables.read_parquet(gradients)
    df = df[df["granularity"] == "block"].copy()
    if "perturbation" in df.columns:  # branches start trained: the runs only
        df = df[df["perturbation"].fillna("") == ""]
    if df.empty:
        return _empty(out, "no gradients recorded (set gradients.every_steps)")
    df["exploding"] = (df["grad_rms"] > explode) | (df["nans"] + df["infs"] > 0)
    df["vanishing"] = df["grad_rms"] < vanish
    n_van, n_exp = int(df["vanishing"].sum()), int(df["exploding"].sum())
    df = df[df["step"].isin(_spread(df["step"].tolist(), 4))]
    setting, constant = _setting(df)
    df["setting"] = setting.map(lambda t: _wrap(t, 22)) if setting is not None else ""
    df["checkpoint"] = "step " + df["step"].astype(str)
    df["grad_rms"] = df["grad_rms"].where(np.isfinite(df["grad_rms"]) & (df["grad_rms"] > 0))
    height, aspect = _panel_size(df["setting"].nunique() * df["checkpoint"].nunique())
    sns.set_theme(style="whitegrid", context="paper")
    g = sns.relplot(
        data=df,
        x="depth",
        y="grad_rms",
        hue="model",
        style="shortcut",
        col="checkpoint",
        row="setting" if setting is not None else None,
        kind="line",
        errorbar=t_interval,
        marker="o",
        markersize=3,
        height=height,
        aspect=aspect,
        facet_kws={"margin_titles": True},
    )
    g.set(yscale="log")
    for ax in g.axes.flat:
        ax.axhline(vanish, ls=":", c="grey")
        ax.axhline(explode, ls=":", c="grey")
    g.set_axis_labels("depth (0 = input side)", "gradient RMS (‖g‖ / √numel)")
    g.set_titles(row_template="{row_name}", col_template="{col_name}")
    _finish_grid(
        g,
        f"gradient magnitude per block{', ' + constant if constant else ''}; flagged "
        f"block-steps: {n_van} vanishing (< {vanish:g}), {n_exp} exploding (> {explode:g} "
        "or NaN/Inf)",
        ("model", "shortcut"),
    )
    _save(g.figure, out)
    return g.figure


def distance_average(distances, out: Path | str, metric: str):
    """The average over models and datasets: at each run's last epoch checkpoint, each
    block's distance divided by the run's mean over its blocks (so models of any size and
    depth compare), against relative depth (0 = input, 1 = output) in ten bins; plain vs
    residual, init and previous; band = 95% CI over runs."""
    df = tables.read_parquet(distances)
    df = df[(df["granularity"] == "block") & df["epoch_end"]].copy()
    if "perturbation" in df.columns:
        df = df[df["perturbation"].fillna("") == ""]
    if df.empty:
        return _empty(out, "no block distances")
    last = df.groupby("run_id")["step"].transform("max")
    df = df[df["step"] == last]
    df["relative depth"] = df["depth"] / df.groupby("run_id")["depth"].transform("max")
    df["relative depth"] = (df["relative depth"] * 9).round() / 9
    df["relative distance"] = df[metric] / df.groupby(["run_id", "reference"])[metric].transform(
        "mean"
    )
    height, aspect = _panel_size(df["reference"].nunique())
    sns.set_theme(style="whitegrid", context="paper")
    g = sns.relplot(
        data=df,
        x="relative depth",
        y="relative distance",
        hue="shortcut",
        col="reference",
        kind="line",
        errorbar=t_interval,
        marker="o",
        height=height,
        aspect=aspect,
    )
    g.set_titles("against {col_name}")
    g.set_axis_labels("relative depth (0 = stem, 1 = classifier)", "distance / run's mean")
    models, datasets = df["model"].nunique(), df["dataset"].nunique()
    _finish_grid(
        g,
        f"{METRIC_LABELS.get(metric, metric)} relative to each run's mean over blocks, "
        f"averaged over {models} model{'s' * (models > 1)} and {datasets} "
        f"dataset{'s' * (datasets > 1)} (band: 95% CI over runs)",
        ("shortcut",),
    )
    _save(g.figure, out)
    return g.figure


def frozen_shares(frozen, out: Path | str):
    """For each model: the share of its parameters changed between the init and the end
    (the study's tolerance), never moved from their initial value at any step, and never
    reached by a non-zero gradient (the last two need ``gradients.track_reached``); one
    panel per dataset / optimizer / init (those that vary), whiskers 95% CI over seeds."""
    df = tables.read_parquet(frozen)
    df = df[(df["granularity"] == "model") & (df["perturbation"].fillna("") == "")]
    if df.empty:
        return _empty(out, "no runs")
    long = df.melt(
        id_vars=["model", "dataset", "optimizer", "init", "seed"],
        value_vars=["frac_changed_final", "frac_never_moved", "frac_never_reached"],
        var_name="share",
        value_name="value",
    )
    long["share"] = long["share"].map(
        {
            "frac_changed_final": "changed (tolerance)",
            "frac_never_moved": "never moved",
            "frac_never_reached": "never reached by a gradient",
        }
    )
    setting, constant = _setting(long, ("dataset", "optimizer", "init"))
    long["panel"] = setting.map(lambda t: _wrap(t, 30)) if setting is not None else ""
    panels = long["panel"].nunique()
    height, aspect = _panel_size(panels)
    sns.set_theme(style="whitegrid", context="paper")
    g = sns.catplot(
        data=long,
        x="model",
        y="value",
        hue="share",
        col="panel" if panels > 1 else None,
        col_wrap=min(3, panels) if panels > 1 else None,
        kind="bar",
        errorbar=t_interval,
        height=height,
        aspect=max(aspect, 0.3 * long["model"].nunique()),
    )
    g.set(ylim=(0, 1.02))
    g.set_axis_labels("", "share of parameters")
    g.set_titles("{col_name}" if panels > 1 else "")
    for ax in g.axes.flat:
        _rotate_ticks(ax)
    suffix = f", {constant}" if constant else ""
    _finish_grid(g, f"how much of each network moved{suffix} (whiskers: 95% CI over seeds)")
    _save(g.figure, out)
    return g.figure


def change_by_setting(distances, out: Path | str):
    """‖θ_k − θ_{k−1}‖ / ‖θ_{k−1}‖ of the whole network between consecutive epoch-end
    checkpoints (seed 002's ‖θ5 − θ0‖, ‖θ10 − θ5‖, …), per model, dataset, init and
    optimizer; band = 95% CI over seeds."""
    df = tables.read_parquet(distances)
    df = df[(df["granularity"] == "block") & (df["perturbation"].fillna("") == "")]
    df = df[df["epoch_end"]].copy()
    # against the previous checkpoint: the previous epoch end when the study saves no
    # mid-epoch checkpoints (as seed 002: every 5 epochs)
    df["l2sq"], df["refsq"] = df["l2"] ** 2, df["ref_norm"] ** 2
    keys = ["run_id", "model", "dataset", "init", "optimizer", "seed", "epoch", "step", "reference"]
    whole = df.groupby(keys, as_index=False)[["l2sq", "refsq"]].sum()
    whole = whole[whole["reference"] == "previous"]
    if whole.empty:
        return _empty(out, "no epoch-end checkpoints")
    whole["relative change"] = np.sqrt(whole["l2sq"] / whole["refsq"])
    rows = "dataset" if whole["dataset"].nunique() > 1 else None
    height, aspect = _panel_size(whole["model"].nunique() * whole["dataset"].nunique())
    sns.set_theme(style="whitegrid", context="paper")
    g = sns.relplot(
        data=whole,
        x="epoch",
        y="relative change",
        hue="init",
        style="optimizer",
        col="model",
        row=rows,
        kind="line",
        errorbar=t_interval,
        marker="o",
        height=height,
        aspect=aspect,
        facet_kws={"margin_titles": True, "sharey": False},
    )
    g.set_titles(row_template="{row_name}", col_template="{col_name}")
    for ax in g.axes.flat:
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    suffix = "" if rows else f", {whole['dataset'].iloc[0]}"
    _finish_grid(
        g,
        "relative change of all parameters since the previous checkpoint"
        f"{suffix} (band: 95% CI over seeds)",
        ("init", "optimizer"),
    )
    _save(g.figure, out)
    return g.figure


# --- distance against training step (the depth study's main figure) -------------------------

SHORTCUT_ORDER = ("plain", "residual", "none")
STEP_CMAP = matplotlib.colors.ListedColormap(plt.get_cmap("viridis")(np.linspace(0.0, 0.9, 256)))
STEP_KEYS = [
    "reference",
    "dataset",
    "optimizer",
    "init",
    "family",
    "shortcut",
    "model",
    "blocks",
    "depth",
    "position",
    "step",
]


def _natural(text: str) -> list:
    """Sort key: numbers by value (resnet18 before resnet101)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def _family(model: str, shortcut: str) -> str:
    """The model's label without its shortcut token: resnet18-basic-plain-even ->
    resnet18-basic-even, so plain and residual twins share a row."""
    return "-".join(t for t in model.split("-") if t != shortcut) or model


def _block_rows(path: Path | str, metric: str) -> pd.DataFrame:
    """The block rows of a distances table, only the columns the step figure needs (the
    table's tensor and layer rows can be millions with a checkpoint every step)."""
    grid = [c for c in GRID_COLUMNS if c not in ("study", "model_name")]
    wanted = [*grid, "granularity", "depth", "reference", "step", "ref_step", metric]
    try:
        table = pq.read_table(path, columns=wanted, filters=[("granularity", "==", "block")])
    except (pa.ArrowException, OSError) as e:
        raise tables.TableError(
            f"{path}: unreadable Parquet file ({e}); delete it to rebuild"
        ) from e
    return table.to_pandas()


def distance_step_frame(distances, metric: str) -> pd.DataFrame:
    """The data of ``distance_vs_step``: one row per (reference, setting, model, block, step)
    with ``mean``, ``low``, ``high`` (95% t-interval over seeds; NaN with one seed) and ``n``
    (seeds). Block rows of runs only (perturbation branches left out), without the stem
    (depth 0) and the classifier (each run's last depth). Against ``previous`` the value is
    per step: the distance divided by the steps between the two checkpoints (1 when every
    step is checkpointed). ``position``: 0 = first block after the stem, 1 = last block
    before the classifier; ``blocks``: the model's number of building blocks."""
    df = distances if isinstance(distances, pd.DataFrame) else _block_rows(distances, metric)
    df = df[df["granularity"] == "block"].reset_index(drop=True)
    if "perturbation" in df.columns:
        df = df[df["perturbation"].fillna("") == ""]
    last = df.groupby("run_id")["depth"].transform("max")
    df = df[(df["depth"] > 0) & (df["depth"] < last)].copy()
    last = last.loc[df.index]
    df["blocks"] = last - 1
    df["position"] = ((df["depth"] - 1) / (last - 2).clip(lower=1)).astype(float)
    df["family"] = [_family(m, s) for m, s in zip(df["model"], df["shortcut"], strict=True)]
    gap = (df["step"] - df["ref_step"]).clip(lower=1).where(df["reference"] == "previous", 1)
    df["value"] = df[metric] / gap
    out = df.groupby(STEP_KEYS, as_index=False)["value"].agg(["mean", "std", "count"])
    out = out.rename(columns={"count": "n"})
    t = out["n"].clip(lower=2).map(_t_quantile).to_numpy()
    half = np.where(out["n"] > 1, t * out["std"] / np.sqrt(out["n"]), np.nan)
    out["low"], out["high"] = out["mean"] - half, out["mean"] + half
    return out.drop(columns="std").sort_values(STEP_KEYS, ignore_index=True)


def _step_facets(df: pd.DataFrame) -> tuple[pd.DataFrame, list[str], list[str]]:
    """Row and column keys of the step figure: rows = model family (ordered by number of
    blocks), with optimizer / init when the study has several; columns = plain | residual,
    per dataset when there are several (a dataset's plain and residual side by side)."""
    df = df.copy()
    setting = df["optimizer"] + " / " + df["init"]
    df["row"] = df["family"] + (" · " + setting if setting.nunique() > 1 else "")
    many = df["dataset"].nunique() > 1
    df["col"] = (df["dataset"] + ": " if many else "") + df["shortcut"]
    first = df.groupby("row")["blocks"].max()
    rows = sorted(first.index, key=lambda r: (first[r], _natural(r)))
    rank = {s: i for i, s in enumerate(SHORTCUT_ORDER)}
    cols = sorted(
        df["col"].unique(),
        key=lambda c: (c.rsplit(": ", 1)[0] if many else "", rank.get(c.rsplit(": ", 1)[-1], 9)),
    )
    return df, rows, cols


def _step_panel(ax, sub: pd.DataFrame) -> None:
    """One line per block coloured by its position, band = 95% CI over seeds (clipped at 0:
    distances are not negative)."""
    for (_, position), line in sub.groupby(["depth", "position"], sort=True):
        colour = STEP_CMAP(position)
        if line["low"].notna().any():
            ax.fill_between(
                line["step"],
                line["low"].clip(lower=0),
                line["high"],
                color=colour,
                alpha=0.12,
                linewidth=0,
            )
        ax.plot(line["step"], line["mean"], color=colour, linewidth=0.9)


def _step_colorbar(fig, axes, blocks: list[int], columns: int) -> None:
    """The depth colorbar below the panels: block numbers when every model has as many
    blocks, else the relative position (0 = first block, 1 = last)."""
    single = len(blocks) == 1 and blocks[0] > 1
    norm = matplotlib.colors.Normalize(1, blocks[0]) if single else None
    bar = fig.colorbar(
        matplotlib.cm.ScalarMappable(norm=norm, cmap=STEP_CMAP),
        ax=axes,
        location="bottom",
        shrink=min(0.5, 0.25 * columns + 0.3),
        aspect=35 + 5 * columns,
        pad=0.02,
    )
    if single:
        bar.ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        bar.set_label("block depth (1 = first block after the stem; stem and classifier left out)")
    else:
        bar.set_ticks([0, 0.5, 1], labels=["first block", "middle", "last block"])
        bar.set_label("block depth, relative (stem and classifier left out)")


def distance_vs_step(distances, out: Path | str, reference: str, metric: str):
    """Block distance against training step, one line per building block coloured by its
    depth (sequential colormap, 0 = first block, 1 = last; the stem and the classifier are
    left out), plain and residual side by side; rows = model family. Band: 95% CI over
    seeds. Against ``previous``: per step (see ``distance_step_frame``)."""
    df = distance_step_frame(distances, metric)
    df = df[df["reference"] == reference]
    if df.empty:
        return _empty(
            out, f"no block distances against '{reference}' (stem and classifier excluded)"
        )
    df, rows, cols = _step_facets(df)
    few = len(rows) * len(cols) <= 2
    width, height = (3.6, 2.7) if few else (2.6, 1.9)
    sns.set_theme(style="whitegrid", context="paper")
    fig, axes = plt.subplots(
        len(rows),
        len(cols),
        figsize=(width * len(cols) + 0.8, height * len(rows) + 1.4),
        sharex=True,
        sharey="row",
        squeeze=False,
        layout="constrained",
    )
    for (i, row), (j, col) in itertools.product(enumerate(rows), enumerate(cols)):
        ax, sub = axes[i, j], df[(df["row"] == row) & (df["col"] == col)]
        _step_panel(ax, sub)
        if sub.empty:
            ax.text(0.5, 0.5, "no runs", ha="center", va="center", transform=ax.transAxes)
        if i == 0:
            ax.set_title(col, fontsize=9)
        if j == len(cols) - 1:  # the row's name in the right margin, as seaborn's
            blocks = int(df.loc[df["row"] == row, "blocks"].max())
            ax.annotate(
                f"{_wrap(row, int(height * 9))}\n({blocks} blocks)",
                (1.03, 0.5),
                xycoords="axes fraction",
                rotation=270,
                ha="left",
                va="center",
                fontsize=8,
            )
        if i == len(rows) - 1:
            ax.set_xlabel("training step")
    positive = (df["mean"] > 0).all()
    if positive and df["mean"].max() / df["mean"].min() > 100:
        for ax in axes.flat:
            ax.set_yscale("log")
    label = METRIC_LABELS.get(metric, metric) + (" per step" if reference == "previous" else "")
    fig.supylabel(label, fontsize=9)
    _step_colorbar(fig, axes, sorted(df["blocks"].unique()), len(cols))
    since = "the init" if reference == "init" else "the previous checkpoint"
    title = (
        f"{label} of each building block from {since}, through training (band: 95% CI over seeds)"
    )
    fig.suptitle(_wrap(title, int(fig.get_size_inches()[0] * 11)), fontsize=10)
    _save(fig, out)
    return fig
