"""Figures of the offline analyses (:mod:`paramdyn.analyses`), from the study tables
``curvature.parquet``, ``spectra.parquet`` and ``layer_similarity.parquet``:

- ``sharpness_vs_step``: the whole model's top Hessian eigenvalue against step, one panel per
  model (lines: seeds), with the 2/lr line of the run's optimizer (dashed). For SGD (with or
  without momentum, the momentum-free edge) 2/lr is the edge of stability; for Adam it is
  only the SGD value, Adam's edge is preconditioned (the caption says so).
- ``spectra_vs_depth``: per-layer power-law alpha and stable rank against block depth, one
  line per checkpoint step (colour), one column per model, means over seeds.
- ``layer_cka_pairs``: layer-by-layer CKA heatmaps, one pair per panel: the first pair of
  each (kind, model) (e.g. seed 0 vs seed 1; plain vs residual at one seed).
- ``layer_cka_over_steps``: each block's CKA with itself at the final checkpoint against
  step, one panel per model, mean over seeds.

:data:`FIGURES` maps a figure name to its function (table path, output path)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from . import tables
from .plots import _empty, _save


def _read(table) -> pd.DataFrame:
    return table if isinstance(table, pd.DataFrame) else tables.read_parquet(table)


def _grid(n: int, width: float = 3.4, height: float = 2.8, cols: int = 4):
    cols = max(1, min(cols, n))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, list(axes.flat)


def sharpness_vs_step(table, out: Path | str):
    """Top eigenvalue of the whole model's Hessian against step, per model, with 2/lr."""
    df = _read(table)
    df = df[df["scope"] == "model"] if not df.empty else df
    if df.empty:
        return _empty(out, "no curvature rows")
    models = sorted(df["model"].unique())
    fig, axes = _grid(len(models))
    for ax, model in zip(axes, models, strict=False):
        sub = df[df["model"] == model]
        for (opt, seed), run in sub.groupby(["optimizer", "seed"]):
            run = run.sort_values("step")
            ax.plot(run["step"], run["top_eigenvalue"], marker="o", ms=3, label=f"{opt} s{seed}")
        for (opt, _name), lr in sub.groupby(["optimizer", "optimizer_name"])["lr"].first().items():
            if lr > 0:
                ax.axhline(2 / lr, ls="--", lw=1, color="grey")
                ax.annotate(f"2/lr ({opt})", (0, 2 / lr), fontsize=7, color="grey")
        ax.set_yscale("log")
        ax.set_title(model, fontsize=8)
        ax.set_xlabel("step")
        ax.set_ylabel("top Hessian eigenvalue")
        ax.legend(fontsize=6)
    fig.tight_layout()
    _save(fig, out)
    return fig


def spectra_vs_depth(table, out: Path | str):
    """Mean alpha and stable rank per block depth, one line per step, per model."""
    df = _read(table)
    if df.empty:
        return _empty(out, "no spectra rows")
    models = sorted(df["model"].unique())
    fig, axes = plt.subplots(2, len(models), figsize=(3.4 * len(models), 5.4), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for j, model in enumerate(models):
        sub = df[df["model"] == model]
        steps = sorted(sub["step"].unique())
        for k, step in enumerate(steps):
            at = sub[sub["step"] == step].groupby("depth")[["alpha", "stable_rank"]].mean()
            color = cmap(k / max(1, len(steps) - 1))
            axes[0][j].plot(at.index, at["alpha"], color=color, marker=".", label=f"step {step}")
            axes[1][j].plot(at.index, at["stable_rank"], color=color, marker=".")
        axes[0][j].set_title(model, fontsize=8)
        axes[0][j].set_ylabel("power-law alpha")
        axes[1][j].set_ylabel("stable rank")
        axes[1][j].set_xlabel("block depth")
        axes[0][j].legend(fontsize=5)
    fig.tight_layout()
    _save(fig, out)
    return fig


def layer_cka_pairs(table, out: Path | str):
    """One heatmap per (kind, model_a): the first such pair's layer-by-layer CKA."""
    df = _read(table)
    df = df[df["kind"] != "over_checkpoints"] if not df.empty else df
    if df.empty:
        return _empty(out, "no cross-run layer similarity pairs")
    firsts = df.drop_duplicates(["kind", "model_a", "model_b"])[["kind", "run_a", "run_b"]]
    fig, axes = _grid(len(firsts), width=3.3, height=3.0)
    for ax, (_, pair) in zip(axes, firsts.iterrows(), strict=False):
        sub = df[(df["run_a"] == pair["run_a"]) & (df["run_b"] == pair["run_b"])]
        m = sub.pivot_table(index="depth_a", columns="depth_b", values="cka", dropna=False)
        im = ax.imshow(m.to_numpy(), vmin=0, vmax=1, origin="lower", cmap="magma")
        ax.set_title(f"{pair['kind']}\n{pair['run_a']}\nvs {pair['run_b']}", fontsize=5)
        ax.set_xlabel("block of b (depth)")
        ax.set_ylabel("block of a (depth)")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    _save(fig, out)
    return fig


def layer_cka_over_steps(table, out: Path | str):
    """Each block's CKA with its final-checkpoint self against step (mean over seeds)."""
    df = _read(table)
    df = df[df["kind"] == "over_checkpoints"] if not df.empty else df
    if df.empty:
        return _empty(out, "no layer similarity over checkpoints")
    models = sorted(df["model"].unique())
    fig, axes = _grid(len(models))
    cmap = plt.get_cmap("plasma")
    for ax, model in zip(axes, models, strict=False):
        sub = df[df["model"] == model]
        depths = sorted(sub["depth_a"].unique())
        for depth in depths:
            at = sub[sub["depth_a"] == depth].groupby("step")["cka"].mean()
            color = cmap(depths.index(depth) / max(1, len(depths) - 1))
            ax.plot(np.asarray(at.index) + 1, at.to_numpy(), color=color, marker=".", lw=1)
        ax.set_xscale("log")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{model} (colour: depth 0 → {int(depths[-1])})", fontsize=7)
        ax.set_xlabel("step + 1")
        ax.set_ylabel("CKA with final checkpoint")
    fig.tight_layout()
    _save(fig, out)
    return fig


FIGURES: dict[str, Callable] = {
    "sharpness_vs_step": sharpness_vs_step,
    "spectra_vs_depth": spectra_vs_depth,
    "layer_cka_pairs": layer_cka_pairs,
    "layer_cka_over_steps": layer_cka_over_steps,
}
