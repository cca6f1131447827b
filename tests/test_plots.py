"""Figures: the data behind the depth study's step figure, and the layout of every figure
with one panel and with many (panel size, legend clear of the panels, panel count)."""

from __future__ import annotations

import itertools

import matplotlib
import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from paramdyn import plots

matplotlib.use("Agg")

MIN_PANEL_INCHES = 2.5  # a one-panel figure's axes: at least this wide, 3/4 of it tall
MIN_GRID_PANEL_INCHES = 1.6  # each panel of a grid


# --- synthetic tables ------------------------------------------------------------------------


def _grid(model: str, shortcut: str, dataset: str, seed: int, **extra) -> dict:
    run_id = f"{model}_{dataset}_kaiming-normal_adam_s{seed}"
    return dict(
        run_id=run_id,
        study="t",
        model=model,
        model_name=model,
        shortcut=shortcut,
        dataset=dataset,
        init="kaiming-normal",
        optimizer="adam",
        seed=seed,
        perturbation="",
        **extra,
    )


def _value(depth: int, step: int, seed: int, reference: str) -> float:
    """Known block distances: grow with step against init, flat against previous."""
    base = 0.01 * depth + 0.001 * seed
    return base * step if reference == "init" else base * (1 + 0.1 * seed)


def distances_table(
    families=("resnet18-basic-even",),
    datasets=("mnist",),
    seeds=(0, 1, 2),
    blocks=4,
    steps=(1, 2, 3, 4),
    every=1,
    branches=False,
) -> pd.DataFrame:
    """Block rows (depth 0 = stem, blocks + 1 = classifier) of plain and residual twins,
    checkpoints at ``steps`` (epoch ends every ``every``-th), against init and previous."""
    rows = []
    for family, dataset, shortcut, seed in itertools.product(
        families, datasets, ("plain", "residual"), seeds
    ):
        tokens = family.split("-")
        model = "-".join([*tokens[:2], shortcut, *tokens[2:]])
        n = blocks + (2 if family.startswith("resnet34") else 0)  # a deeper family
        for (k, step), depth, reference in itertools.product(
            enumerate(steps), range(n + 2), ("init", "previous")
        ):
            ref_step = 0 if reference == "init" or k == 0 else steps[k - 1]
            gap = step - ref_step if reference == "previous" else 1  # the table is not per step
            value = _value(depth, step, seed, reference) * gap
            for perturbation in ("", "sign-flip") if branches else ("",):
                row = _grid(
                    model,
                    shortcut,
                    dataset,
                    seed,
                    granularity="block",
                    name=f"b{depth}",
                    block=f"b{depth}",
                    depth=depth,
                    numel=10,
                    epoch=(k + 1) // every,
                    step=step,
                    epoch_end=(k + 1) % every == 0,
                    reference=reference,
                    ref_epoch=0,
                    ref_step=ref_step,
                    mean_abs=value + (5.0 if perturbation else 0.0),
                )
                row["l1"], row["l2"], row["ref_norm"] = 10 * row["mean_abs"], value, 1.0
                row["perturbation"] = perturbation
                rows.append(row)
    return pd.DataFrame(rows)


def history_table(models=("m-plain", "m-residual"), datasets=("mnist",)) -> pd.DataFrame:
    rows = [
        _grid(
            m,
            m.split("-")[-1],
            d,
            s,
            epoch=e,
            step=10 * e,
            split=split,
            loss=2.0 / (e + 1),
            accuracy=0.5 + 0.1 * e,
            lr=1e-3,
            seconds=1.0,
        )
        for m, d, s, e, split in itertools.product(
            models, datasets, (0, 1), range(3), ("train", "test")
        )
    ]
    return pd.DataFrame(rows)


def gradients_table(models=("m-plain", "m-residual"), datasets=("mnist",)) -> pd.DataFrame:
    rows = [
        _grid(
            m,
            m.split("-")[-1],
            d,
            s,
            step=step,
            epoch=0,
            granularity="block",
            name=f"b{depth}",
            block=f"b{depth}",
            depth=depth,
            numel=10,
            grad_rms=10.0**-depth,
            nans=0,
            infs=0,
        )
        for m, d, s, step, depth in itertools.product(models, datasets, (0, 1), (1, 2, 3), range(5))
    ]
    return pd.DataFrame(rows)


def frozen_table(models=("m-plain", "m-residual"), datasets=("mnist",)) -> pd.DataFrame:
    rows = [
        _grid(
            m,
            m.split("-")[-1],
            d,
            s,
            granularity="model",
            frac_changed_final=0.9,
            frac_never_moved=0.05,
            frac_never_reached=0.02,
        )
        for m, d, s in itertools.product(models, datasets, (0, 1))
    ]
    return pd.DataFrame(rows)


def perturbations_table(models=("m-plain",), datasets=("mnist",)) -> pd.DataFrame:
    rows = [
        _grid(
            m,
            "plain",
            d,
            s,
            granularity="model",
            accuracy_before=0.9,
            accuracy_after=0.8,
            rel_dist_theta1_theta2=0.5 + 0.1 * s,
        )
        | {"perturbation": p}
        for m, d, s, p in itertools.product(models, datasets, (0, 1), ("sign-flip", "offset"))
    ]
    return pd.DataFrame(rows)


def similarity_table(runs: int) -> pd.DataFrame:
    ids = [f"m_mnist_kaiming-normal_adam_s{i}" for i in range(runs)]
    pairs = list(itertools.combinations(ids, 2)) or [(ids[0], ids[0])]
    return pd.DataFrame(
        [
            dict(run_a=a, run_b=b, kind="seeds", measure="cka_linear", value=0.8, note="")
            for a, b in pairs
        ]
    )


def _parquet(tmp_path, df: pd.DataFrame, name: str):
    path = tmp_path / f"{name}.parquet"
    df.to_parquet(path)
    return path


# --- the step figure's data ------------------------------------------------------------------


def test_step_frame_means_over_seeds_without_stem_classifier_or_branches():
    df = distances_table(seeds=(0, 1, 2), blocks=4, steps=(2, 4, 6), branches=True)
    frame = plots.distance_step_frame(df, "mean_abs")
    # blocks 1..4 only: the stem (0) and the classifier (5) are left out
    assert sorted(frame["depth"].unique()) == [1, 2, 3, 4]
    assert set(frame["n"]) == {3}
    assert (frame["family"] == "resnet18-basic-even").all()
    assert set(frame["shortcut"]) == {"plain", "residual"}
    init = frame[(frame["reference"] == "init") & (frame["shortcut"] == "plain")]
    for _, r in init.iterrows():  # mean over seeds 0, 1, 2 of (0.01 depth + 0.001 seed) step
        expected = np.mean([_value(r["depth"], r["step"], s, "init") for s in (0, 1, 2)])
        assert r["mean"] == pytest.approx(expected)  # no branch (+5) in the mean
        assert r["low"] < r["mean"] < r["high"]
    # against previous: per step, whatever the gap between checkpoints (2 here)
    prev = frame[(frame["reference"] == "previous") & (frame["depth"] == 2)]
    expected = np.mean([_value(2, 0, s, "previous") for s in (0, 1, 2)])
    assert prev["mean"].to_numpy() == pytest.approx(np.full(len(prev), expected))
    # position: 0 = first block after the stem, 1 = last before the classifier
    assert frame.groupby("depth")["position"].first().to_dict() == pytest.approx(
        {1: 0.0, 2: 1 / 3, 3: 2 / 3, 4: 1.0}
    )
    assert len(frame) == 2 * 2 * 4 * 3  # references x shortcuts x blocks x steps


def test_step_frame_ci_is_a_t_interval_and_absent_with_one_seed():
    from scipy import stats

    df = distances_table(seeds=(0, 1), blocks=2, steps=(1,))
    frame = plots.distance_step_frame(df, "mean_abs")
    r = frame[(frame["reference"] == "init") & (frame["depth"] == 1)].iloc[0]
    values = [_value(1, 1, s, "init") for s in (0, 1)]
    half = stats.t.ppf(0.975, 1) * np.std(values, ddof=1) / np.sqrt(2)
    assert (r["low"], r["high"]) == pytest.approx((np.mean(values) - half, np.mean(values) + half))
    single = plots.distance_step_frame(distances_table(seeds=(0,), blocks=2), "mean_abs")
    assert single["low"].isna().all() and single["high"].isna().all()
    assert (single["n"] == 1).all()


def test_step_frame_uses_the_named_metric(tmp_path):
    df = distances_table(seeds=(0,), blocks=2, steps=(1,))
    l1 = plots.distance_step_frame(df, "l1")
    mean_abs = plots.distance_step_frame(df, "mean_abs")
    assert l1["mean"].to_numpy() == pytest.approx(10 * mean_abs["mean"].to_numpy())
    # from the Parquet file: only the block rows and the columns it needs are read
    other = pd.concat([df, df.assign(granularity="tensor", mean_abs=99.0)])
    from_file = plots.distance_step_frame(_parquet(tmp_path, other, "d"), "mean_abs")
    pd.testing.assert_frame_equal(from_file, mean_abs)


# --- layout ----------------------------------------------------------------------------------


def _axes(fig):
    return [ax for ax in fig.axes if ax.get_visible() and ax.get_label() != "<colorbar>"]


def _legends(fig):
    return list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend()]


def assert_legible(fig, panels: int) -> None:
    """``panels`` axes; each at least MIN_PANEL_INCHES when there is one; no legend and no
    title over any panel."""
    FigureCanvasAgg(fig)  # the figure was closed after saving: draw it again
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    axes = _axes(fig)
    assert len(axes) == panels
    for ax in axes:  # no panel squeezed flat (by a long margin title or a side legend)
        box = ax.get_window_extent(renderer)
        least = MIN_PANEL_INCHES if panels == 1 else MIN_GRID_PANEL_INCHES
        assert box.width / fig.dpi >= least and box.height / fig.dpi >= least * 0.75
    for legend, ax in itertools.product(_legends(fig), axes):
        assert not legend.get_window_extent(renderer).overlaps(ax.get_window_extent(renderer))
    titles = [t for t in (getattr(fig, "_suptitle", None),) if t is not None and t.get_text()]
    for text, ax in itertools.product(titles, axes):
        assert not text.get_window_extent(renderer).overlaps(ax.get_window_extent(renderer))
    texts = [  # panel titles, margin titles, axis labels
        (ax, t)
        for ax in axes
        for t in [ax.title, *ax.texts, ax.xaxis.label, ax.yaxis.label]
        if t.get_visible() and t.get_text()
    ]
    for ax, text in texts:
        if text in (ax.xaxis.label, ax.yaxis.label):  # axis labels clear of their own panel
            box = text.get_window_extent(renderer)
            assert not box.overlaps(ax.get_window_extent(renderer)), text.get_text()
    for (ax, text), other in itertools.product(texts, axes):
        if other is not ax:
            box = text.get_window_extent(renderer)
            assert not box.overlaps(other.get_window_extent(renderer)), text.get_text()
    for (_, text), (_, other) in itertools.combinations(texts, 2):
        box = text.get_window_extent(renderer)
        assert not box.overlaps(other.get_window_extent(renderer)), (
            text.get_text(),
            other.get_text(),
        )


FAMILIES = ("resnet18-basic-even", "resnet34-basic-even", "resnet26-bottleneck-even")


@pytest.mark.parametrize("reference", ["init", "previous"])
def test_step_figure_one_panel_per_family_and_shortcut(tmp_path, reference):
    df = distances_table(families=FAMILIES, datasets=("mnist", "cifar10"), steps=(1, 2, 3))
    fig = plots.distance_vs_step(df, tmp_path / "f.png", reference, "mean_abs")
    assert (tmp_path / "f.png").stat().st_size > 0
    assert_legible(fig, len(FAMILIES) * 2 * 2)
    axes = np.array(_axes(fig)).reshape(3, 4)
    # rows by number of blocks, then name; columns: each dataset's plain then residual
    assert [ax.get_title() for ax in axes[0]] == [
        "cifar10: plain",
        "cifar10: residual",
        "mnist: plain",
        "mnist: residual",
    ]
    assert [ax.texts[-1].get_text().split("\n")[0] for ax in axes[:, -1]] == [
        "resnet18-basic-even",
        "resnet26-bottleneck-even",
        "resnet34-basic-even",
    ]
    # one line per block (4 building blocks, 6 for the deeper resnet34 family)
    assert [len(ax.get_lines()) for ax in axes[:, 0]] == [4, 4, 6]


def test_step_figure_one_family_one_dataset(tmp_path):
    fig = plots.distance_vs_step(distances_table(), tmp_path / "f.png", "init", "mean_abs")
    assert_legible(fig, 2)
    assert [ax.get_title() for ax in _axes(fig)] == ["plain", "residual"]
    line = _axes(fig)[0].get_lines()[0]  # block 1, plain: the mean over seeds per step
    expected = [np.mean([_value(1, st, s, "init") for s in (0, 1, 2)]) for st in (1, 2, 3, 4)]
    assert line.get_ydata() == pytest.approx(expected)


def test_step_figure_without_blocks_is_a_note(tmp_path):
    df = distances_table()
    fig = plots.distance_vs_step(df[df["depth"] == 0], tmp_path / "f.png", "init", "mean_abs")
    assert (tmp_path / "f.png").exists() and len(fig.axes) == 1


def _one_and_many(kind: str, tmp_path, many: bool):
    """Render figure ``kind`` from a synthetic table with one panel, or with many."""
    datasets = ("mnist", "cifar10", "fashionmnist") if many else ("mnist",)
    models = ("a-plain", "a-residual", "b-plain") if many else ("a-plain",)
    out = tmp_path / f"{kind}.png"
    if kind == "distance_vs_depth":
        df = distances_table(datasets=datasets, steps=(1, 2, 3) if many else (1,))
        path = _parquet(tmp_path, df, "d")
        return plots.distance_vs_depth(path, out, "init", "mean_abs"), 3 * 3 if many else 1
    if kind == "history":
        path = _parquet(tmp_path, history_table(models, datasets), "h")
        return plots.history_curves(path, out, "accuracy"), len(datasets)
    if kind == "gradients":
        path = _parquet(tmp_path, gradients_table(models, datasets), "g")
        return plots.gradient_vs_depth(path, out, 1e-7, 1e3), 3 * 3 if many else 3
    if kind == "frozen":
        path = _parquet(tmp_path, frozen_table(models, datasets), "f")
        return plots.frozen_shares(path, out), len(datasets)
    if kind == "change":
        families = ("resnet18-basic-even", "resnet34-basic-even") if many else FAMILIES[:1]
        df = distances_table(families=families, datasets=datasets, seeds=(0, 1))
        df = df[df["shortcut"] == "plain"] if not many else df
        return plots.change_by_setting(_parquet(tmp_path, df, "c"), out), 4 * 3 if many else 1
    if kind == "average":
        df = distances_table(families=FAMILIES if many else FAMILIES[:1], datasets=datasets)
        return plots.distance_average(_parquet(tmp_path, df, "a"), out, "mean_abs"), 2
    if kind == "perturbations":
        long = tuple(f"resnet18-basic-{m}-even" for m in models)  # long titles
        df = perturbations_table(long, datasets)
        return plots.perturbation_bars(df, out), 2 * len(models) * len(datasets)
    if kind == "cka":
        return plots.cka_heatmap(similarity_table(12 if many else 1), out), 1
    raise ValueError(kind)


KINDS = [
    "distance_vs_depth",
    "history",
    "gradients",
    "frozen",
    "change",
    "average",
    "perturbations",
    "cka",
]


@pytest.mark.parametrize("many", [False, True], ids=["one", "many"])
@pytest.mark.parametrize("kind", KINDS)
def test_figure_layout(tmp_path, kind, many):
    fig, panels = _one_and_many(kind, tmp_path, many)
    assert (tmp_path / f"{kind}.png").stat().st_size > 0
    assert_legible(fig, panels)


def test_narrow_grid_puts_its_legend_below(tmp_path):
    path = _parquet(tmp_path, history_table(), "h")
    fig = plots.history_curves(path, tmp_path / "a.png", "accuracy")
    FigureCanvasAgg(fig)
    fig.canvas.draw()
    (legend,) = fig.legends
    (ax,) = _axes(fig)
    assert legend.get_window_extent().y1 < ax.get_window_extent().y0
    # one column per variable: model (2 values) and split (2 values)
    assert legend._ncols == 2


def test_constant_setting_goes_to_the_title_not_a_facet(tmp_path):
    path = _parquet(tmp_path, distances_table(steps=(1,)), "d")
    fig = plots.distance_vs_depth(path, tmp_path / "d.png", "init", "mean_abs")
    (ax,) = _axes(fig)
    assert "adam / kaiming-normal / mnist" in fig._suptitle.get_text().replace("\n", " ")
    assert not [t for t in ax.texts if t.get_text()]  # no row title beside the one panel


def test_dry_run_draws_the_step_figures(tmp_path):
    from test_workflow import TINY, job_counts, snakemake, write_config

    r = snakemake(tmp_path, write_config(tmp_path / "tiny.yaml", TINY), "-n")
    assert r.returncode == 0, r.stderr[-3000:]
    assert job_counts(r.stdout + r.stderr)["plot_distance_steps"] == 1
    for reference in ("init", "previous"):
        assert f"results/tiny/figures/distance_vs_step_{reference}.png" in r.stdout + r.stderr


def test_bands_are_the_findings_t_interval():
    from paramdyn.plots import t_interval

    low, high = t_interval([1.0, 2.0, 3.0])  # mean 2, sd 1, t(0.975, 2) = 4.302653
    assert low == pytest.approx(2 - 4.302653 / 3**0.5, rel=1e-6)
    assert high == pytest.approx(2 + 4.302653 / 3**0.5, rel=1e-6)
    assert t_interval([5.0]) == (5.0, 5.0)
