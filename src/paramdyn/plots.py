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
    if "perturbation" in df.columns:  # branches have their own figures
        df = df[df["perturbation"].fillna("") == ""]
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
        pd.DataFrame(m, index=short, columns=short), ax=ax, vmin=vmin, vmax=vmax, square=True,
        cmap="viridis_r" if measure == "procrustes" else "viridis",
        annot=len(runs) <= ANNOTATE_MAX, fmt=".2f", annot_kws={"size": 7},
        cbar_kws={"label": label}, linewidths=0.5, linecolor="white",
    )  # fmt: skip
    ax.set_xlabel("")
    ax.set_ylabel("")
    ax.tick_params(axis="x", labelrotation=90, labelsize=7)
    ax.tick_params(axis="y", labelrotation=0, labelsize=7)
    ax.set_title(f"{label}\n{common}" if common else label, fontsize=9)
    _save(fig, out)


def _cluster_order(corr: np.ndarray) -> np.ndarray:
    """Units ordered for display: average-linkage clustering on 1 - |corr| (leaf order),
    units with undefined correlation (constant: NaN rows) last."""
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
    from . import features

    within = features.correlation_matrix(X)
    order_x = _cluster_order(within)
    if Y is None:
        corr = within[np.ix_(order_x, order_x)]
        s = features.correlation_summary(X) if (~np.isnan(np.diag(within))).sum() >= 2 else None
        note = (
            f"mean |r| off-diagonal {s['mean_abs_offdiag']:.3f}, effective rank "
            f"{s['effective_rank']:.1f} of {s['units']}, {s['constant_units']} constant units"
            if s
            else "fewer than 2 non-constant units"
        )
        xlabel = ylabel = "unit (clustered order)"
    else:
        cross = features.cross_correlation(X, Y)
        mean, _, assignment = features.matched_correlation(X, Y)
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
        corr, ax=ax, vmin=-1.0, vmax=1.0, center=0.0, cmap="vlag", square=corr.shape[0] == corr.shape[1],
        xticklabels=False, yticklabels=False, cbar_kws={"label": "Pearson r"},
    )  # fmt: skip
    ax.set_facecolor("0.75")  # NaN cells: constant units, correlation undefined
    if np.isnan(corr).any():
        note += "; grey: constant units"
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{title}\n{note}", fontsize=9)
    _save(fig, out)


def perturbation_bars(perturbations, out: Path | str) -> None:
    """For each perturbation: ‖θ1 - θ2‖ / ‖θ1‖ (the retrained weights against the original
    trained ones) and test accuracy before (the original run) and after retraining.

    ``perturbations``: a DataFrame or Parquet path, one row per retrained run, with columns
    ``perturbation``, ``accuracy_before``, ``accuracy_after`` and either
    ``rel_dist_theta1_theta2`` or ``dist_theta1_theta2`` and ``norm_theta1`` (the keys of
    ``perturb.perturbation_summary``); optional ``model`` and ``dataset`` make one row of
    panels per setting. Bars are means, whiskers 95% CIs over the rows (seeds)."""
    df = (
        perturbations
        if isinstance(perturbations, pd.DataFrame)
        else tables.read_parquet(perturbations)
    )
    if "granularity" in df.columns:  # the whole-model rows (the table also has blocks)
        df = df[df["granularity"] == "model"]
    if df.empty:
        _empty(out, "no perturbation results")
        return
    df = df.copy()
    if "rel_dist_theta1_theta2" not in df:
        df["rel_dist_theta1_theta2"] = df["dist_theta1_theta2"] / df["norm_theta1"]
    keys = [k for k in ("model", "dataset") if k in df]
    df["setting"] = df[keys].astype(str).agg(" / ".join, axis=1) if keys else ""
    settings = sorted(df["setting"].unique())
    order = sorted(df["perturbation"].unique())
    sns.set_theme(style="whitegrid", context="paper")
    fig, axes = plt.subplots(
        len(settings), 2, figsize=(max(7.0, 1.3 * len(order) + 4.0), 2.8 * len(settings)),
        squeeze=False,
    )  # fmt: skip
    for (ax_d, ax_a), setting in zip(axes, settings, strict=True):
        sub = df[df["setting"] == setting]
        sns.barplot(data=sub, x="perturbation", y="rel_dist_theta1_theta2", order=order,
                    errorbar=("ci", 95), ax=ax_d, color="C0")  # fmt: skip
        values = sub["rel_dist_theta1_theta2"]
        if (values > 0).all() and values.max() / values.min() > 100:
            ax_d.set_yscale("log")
        ax_d.set_ylabel("‖θ1 - θ2‖ / ‖θ1‖")
        ax_d.set_title(f"{setting}: retrained vs original weights".lstrip(": "), fontsize=9)
        acc = sub.melt(id_vars=["perturbation"], value_vars=["accuracy_before", "accuracy_after"],
                       var_name="when", value_name="accuracy")  # fmt: skip
        acc["when"] = acc["when"].str.removeprefix("accuracy_")
        sns.barplot(data=acc, x="perturbation", y="accuracy", hue="when", order=order,
                    hue_order=["before", "after"], errorbar=("ci", 95), ax=ax_a)  # fmt: skip
        ax_a.set_ylim(0.0, 1.0)
        sns.move_legend(ax_a, "upper left", bbox_to_anchor=(1.0, 1.0), title="", frameon=False)
        ax_a.set_ylabel("test accuracy")
        ax_a.set_title("before perturbation / after retraining", fontsize=9)
        for ax in (ax_d, ax_a):
            ax.set_xlabel("")
            ax.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    _save(fig, out)


# --- gradients, averages ---------------------------------------------------------------------


def _spread(values: list, n: int) -> list:
    values = sorted(set(values))
    if len(values) <= n:
        return values
    return [values[int(round(i))] for i in np.linspace(0, len(values) - 1, n)]


def gradient_vs_depth(gradients, out: Path | str, vanish: float, explode: float) -> None:
    """Gradient RMS per block against depth on a log scale, at a few recorded steps through
    training; colour = model, dashes = plain vs residual, band = 95% CI over seeds. Dotted
    lines: the vanishing and exploding thresholds; blocks beyond them are counted in the
    title (NaN/Inf gradients count as exploding)."""
    df = tables.read_parquet(gradients)
    df = df[df["granularity"] == "block"].copy()
    if df.empty:
        _empty(out, "no gradients recorded (set gradients.every_steps)")
        return
    df["exploding"] = (df["grad_rms"] > explode) | (df["nans"] + df["infs"] > 0)
    df["vanishing"] = df["grad_rms"] < vanish
    n_van, n_exp = int(df["vanishing"].sum()), int(df["exploding"].sum())
    df = df[df["step"].isin(_spread(df["step"].tolist(), 4))]
    df["setting"] = df["optimizer"] + " / " + df["init"] + " / " + df["dataset"]
    df["checkpoint"] = "step " + df["step"].astype(str)
    df["grad_rms"] = df["grad_rms"].where(np.isfinite(df["grad_rms"]) & (df["grad_rms"] > 0))
    sns.set_theme(style="whitegrid", context="paper")
    g = sns.relplot(
        data=df, x="depth", y="grad_rms", hue="model", style="shortcut", col="checkpoint",
        row="setting", kind="line", errorbar=("ci", 95), marker="o", markersize=3,
        height=2.4, aspect=1.25, facet_kws={"margin_titles": True},
    )  # fmt: skip
    g.set(yscale="log")
    for ax in g.axes.flat:
        ax.axhline(vanish, ls=":", c="grey")
        ax.axhline(explode, ls=":", c="grey")
    g.set_axis_labels("depth (0 = input side)", "gradient RMS (‖g‖ / √numel)")
    g.set_titles(row_template="{row_name}", col_template="{col_name}")
    g.figure.suptitle(
        f"gradient magnitude per block; flagged block-steps: {n_van} vanishing (< {vanish:g}),"
        f" {n_exp} exploding (> {explode:g} or NaN/Inf)", y=1.02,
    )  # fmt: skip
    _save(g.figure, out)


def distance_average(distances, out: Path | str, metric: str) -> None:
    """The average over models and datasets: at each run's last epoch checkpoint, each
    block's distance divided by the run's mean over its blocks (so models of any size and
    depth compare), against relative depth (0 = input, 1 = output) in ten bins; plain vs
    residual, init and previous; band = 95% CI over runs."""
    df = tables.read_parquet(distances)
    df = df[(df["granularity"] == "block") & df["epoch_end"]].copy()
    if "perturbation" in df.columns:
        df = df[df["perturbation"].fillna("") == ""]
    if df.empty:
        _empty(out, "no block distances")
        return
    last = df.groupby("run_id")["step"].transform("max")
    df = df[df["step"] == last]
    df["relative depth"] = df["depth"] / df.groupby("run_id")["depth"].transform("max")
    df["relative depth"] = (df["relative depth"] * 9).round() / 9
    df["relative distance"] = df[metric] / df.groupby(["run_id", "reference"])[metric].transform(
        "mean"
    )
    sns.set_theme(style="whitegrid", context="paper")
    g = sns.relplot(
        data=df, x="relative depth", y="relative distance", hue="shortcut", col="reference",
        kind="line", errorbar=("ci", 95), marker="o", height=3, aspect=1.3,
    )  # fmt: skip
    g.figure.suptitle(
        f"{METRIC_LABELS.get(metric, metric)} relative to each run's mean over blocks, "
        f"averaged over {df['model'].nunique()} models and {df['dataset'].nunique()} datasets",
        y=1.04,
    )
    _save(g.figure, out)


def frozen_shares(frozen, out: Path | str) -> None:
    """For each model: the share of its parameters changed between the init and the end
    (the study's tolerance), never moved from their initial value at any step, and never
    reached by a non-zero gradient (the last two need ``gradients.track_reached``); one
    panel per dataset and optimizer, bars per init, whiskers 95% CI over seeds."""
    df = tables.read_parquet(frozen)
    df = df[(df["granularity"] == "model") & (df["perturbation"].fillna("") == "")]
    if df.empty:
        _empty(out, "no runs")
        return
    long = df.melt(
        id_vars=["model", "dataset", "optimizer", "init", "seed"],
        value_vars=["frac_changed_final", "frac_never_moved", "frac_never_reached"],
        var_name="share", value_name="value",
    )  # fmt: skip
    long["share"] = long["share"].map(
        {
            "frac_changed_final": "changed (tolerance)",
            "frac_never_moved": "never moved",
            "frac_never_reached": "never reached by a gradient",
        }
    )
    long["panel"] = long["dataset"] + " / " + long["optimizer"] + " / " + long["init"]
    sns.set_theme(style="whitegrid", context="paper")
    g = sns.catplot(
        data=long, x="model", y="value", hue="share", col="panel",
        col_wrap=min(3, long["panel"].nunique()), kind="bar", errorbar=("ci", 95),
        height=2.8, aspect=1.3,
    )  # fmt: skip
    g.set(ylim=(0, 1.02))
    g.set_axis_labels("", "share of parameters")
    g.set_titles("{col_name}")
    for ax in g.axes.flat:
        ax.tick_params(axis="x", rotation=30)
    g.figure.suptitle("how much of each network moved (band: 95% CI over seeds)", y=1.03)
    _save(g.figure, out)


def change_by_setting(distances, out: Path | str) -> None:
    """‖θ_k − θ_{k−1}‖ / ‖θ_{k−1}‖ of the whole network between consecutive epoch-end
    checkpoints (seed 002's ‖θ5 − θ0‖, ‖θ10 − θ5‖, …), per model, dataset, init and
    optimizer; band = 95% CI over seeds."""
    df = tables.read_parquet(distances)
    df = df[(df["granularity"] == "block") & (df["perturbation"].fillna("") == "")]
    df = df[df["epoch_end"]].copy()
    # against the previous checkpoint: the previous epoch end when the study saves no
    # mid-epoch checkpoints (as seed 002: every 5 epochs)
    df["l2sq"], df["refsq"] = df["l2"] ** 2, df["ref_norm"] ** 2
    keys = ["run_id", "model", "dataset", "init", "optimizer", "seed", "epoch", "step",
            "reference"]  # fmt: skip
    whole = df.groupby(keys, as_index=False)[["l2sq", "refsq"]].sum()
    whole = whole[whole["reference"] == "previous"]
    if whole.empty:
        _empty(out, "no epoch-end checkpoints")
        return
    whole["relative change"] = np.sqrt(whole["l2sq"] / whole["refsq"])
    sns.set_theme(style="whitegrid", context="paper")
    g = sns.relplot(
        data=whole, x="epoch", y="relative change", hue="init", style="optimizer",
        col="model", row="dataset", kind="line", errorbar=("ci", 95), marker="o",
        height=2.4, aspect=1.3, facet_kws={"margin_titles": True, "sharey": False},
    )  # fmt: skip
    g.set_titles(row_template="{row_name}", col_template="{col_name}")
    g.figure.suptitle(
        "relative change of all parameters since the previous checkpoint "
        "(band: 95% CI over seeds)", y=1.03,
    )  # fmt: skip
    _save(g.figure, out)
