"""Claims as outputs: each claim test on small hand-built tables with a known answer, the
verdicts, the training check, findings.md, and the validation of `claims` in the config."""

from __future__ import annotations

import copy
import math

import numpy as np
import pandas as pd
import pytest

from paramdyn import catalog, findings
from paramdyn.config import DEFAULT_SCHEMA, ConfigError, load_studies
from paramdyn.tables import read_parquet, write_parquet

T975_2 = 4.302652729911275  # scipy.stats.t.ppf(0.975, 2): the 95% interval with 3 seeds


def _ci3(values):
    """Hand-computed 95% t-interval of 3 values."""
    m, s = np.mean(values), np.std(values, ddof=1)
    return m, m - T975_2 * s / math.sqrt(3), m + T975_2 * s / math.sqrt(3)


def _run(model, seed, *, shortcut="residual", optimizer="sgd", perturbation="", dataset="d"):
    rid = f"{model}_{dataset}_init_{optimizer}_s{seed}" + (
        f"_{perturbation}" if perturbation else ""
    )
    return {
        "run_id": rid,
        "study": "t",
        "model": model,
        "dataset": dataset,
        "init": "init",
        "optimizer": optimizer,
        "seed": seed,
        "shortcut": shortcut,
        "perturbation": perturbation,
    }


def _history(best: dict[tuple, float], statuses=None) -> pd.DataFrame:
    """Test rows of each run (keyed by _run's arguments): epoch 0 at 0.1, epoch 1 at its
    best, epoch 2 a little below (final = best - 0.01)."""
    rows = []
    for (model, seed, shortcut, optimizer), acc in best.items():
        r = _run(model, seed, shortcut=shortcut, optimizer=optimizer)
        for epoch, a in ((0, 0.1), (1, acc), (2, acc - 0.01)):
            for split in ("train", "test"):
                rows.append(
                    {
                        **r,
                        "epoch": epoch,
                        "step": 10 * epoch,
                        "split": split,
                        "loss": 1.0,
                        "accuracy": a if split == "test" else 0.5,
                        "status": (statuses or {}).get(r["run_id"], "completed"),
                    }
                )
    return pd.DataFrame(rows)


def _claim(test, threshold=0.0, expect="above", note="", **params):
    spec = catalog.CLAIM_TESTS[test]
    full = {k: p.default for k, p in spec.params.items()} | params
    return {
        "id": f"c-{test}",
        "statement": "a claim",
        "test": test,
        "params": full,
        "threshold": threshold,
        "expect": expect,
        "note": note,
    }


def _write(tmp_path, **frames):
    paths = {}
    for name, df in frames.items():
        paths[name] = tmp_path / f"{name}.parquet"
        write_parquet(df, paths[name])
    return paths


RES, PLAIN = {"shortcut": "residual"}, {"shortcut": "plain"}
GAP_BEST = {
    **{("res", s, "residual", "sgd"): a for s, a in enumerate([0.90, 0.92, 0.94])},
    **{("plain", s, "plain", "sgd"): a for s, a in enumerate([0.50, 0.60, 0.70])},
}


# --- verdicts ----------------------------------------------------------------------------


def test_confidence_interval_and_verdicts():
    mean, lo, hi, n = findings.confidence_interval([0.4, 0.32, 0.24])
    assert (mean, n) == (pytest.approx(0.32), 3)
    assert (lo, hi) == pytest.approx(_ci3([0.4, 0.32, 0.24])[1:])
    assert findings.verdict(lo, hi, n, 0.0, "above") == "supported"
    assert findings.verdict(lo, hi, n, 0.0, "below") == "contradicted"
    assert findings.verdict(lo, hi, n, 0.3, "above") == "inconclusive"  # straddles
    assert findings.verdict(lo, hi, 2, 0.0, "above") == "inconclusive"  # too few seeds
    assert findings.verdict(0.0, 0.0, 3, 0.0, "above") == "contradicted"  # touching: not above
    m1, lo1, hi1, n1 = findings.confidence_interval([0.5, float("nan")])
    assert (m1, n1) == (0.5, 1) and math.isnan(lo1) and math.isnan(hi1)
    assert findings.verdict(lo1, hi1, n1, 0.0, "above") == "inconclusive"


# --- each claim test: supported, contradicted, inconclusive, one seed ----------------------


@pytest.fixture
def gap_tables(tmp_path):
    return _write(tmp_path, history=_history(GAP_BEST))


@pytest.mark.parametrize(
    "threshold, expect, verdict",
    [(0.0, "above", "supported"), (0.0, "below", "contradicted"), (0.3, "above", "inconclusive")],
)
def test_accuracy_gap(gap_tables, threshold, expect, verdict):
    claim = _claim("accuracy_gap", threshold, expect, a=RES, b=PLAIN)
    df = findings.findings([claim], gap_tables, study="t")
    row = df[df.kind == "claim"].iloc[0]
    mean, lo, hi = _ci3([0.40, 0.32, 0.24])
    assert row.statistic == pytest.approx(mean) and row.n_seeds == 3
    assert (row.ci_low, row.ci_high) == pytest.approx((lo, hi))
    assert row.verdict == verdict and row.group == "all"
    assert row["values"] == pytest.approx([0.40, 0.32, 0.24]) and list(row.seeds) == [0, 1, 2]


def test_accuracy_gap_final_and_one_seed(tmp_path):
    one = {k: v for k, v in GAP_BEST.items() if k[1] == 0}
    paths = _write(tmp_path, history=_history(one))
    claim = _claim("accuracy_gap", a=RES, b=PLAIN, metric="final")
    row = findings.findings([claim], paths).iloc[0]
    assert row.statistic == pytest.approx(0.40)  # (0.90 - 0.01) - (0.50 - 0.01)
    assert row.n_seeds == 1 and math.isnan(row.ci_low) and math.isnan(row.ci_high)
    assert row.verdict == "inconclusive" and "1 seed" in row.note


def test_accuracy_gap_by_group_and_seed_means(tmp_path):
    best = dict(GAP_BEST)  # a second residual model: the seed's residual mean is averaged
    best |= {("res2", s, "residual", "sgd"): a for s, a in enumerate([0.80, 0.82, 0.84])}
    paths = _write(tmp_path, history=_history(best))
    claim = _claim("accuracy_gap", a=RES, b=PLAIN)
    row = findings.findings([claim], paths).iloc[0]
    assert row["values"] == pytest.approx([0.35, 0.27, 0.19])
    by = _claim("accuracy_gap", a={"model": ["res", "res2"]}, b={"model": "plain"}, by=["dataset"])
    row = findings.findings([by], paths).iloc[0]
    assert row.group == "dataset=d" and row.statistic == pytest.approx(0.27)


def _distances(values_by_seed: dict[int, list[float]], shortcut="residual") -> pd.DataFrame:
    """Block rows of one run per seed, depths 0..4 (stem 0 and head 4 far off: excluded),
    at two checkpoints (step 5 twice as far as step 10, so the median is their mean)."""
    rows = []
    for seed, mid in values_by_seed.items():
        r = _run("m", seed, shortcut=shortcut) | {"model_name": "m-name"}
        for step, scale in ((5, 2.0), (10, 1.0), (15, 0.0)):
            for depth, v in enumerate([100.0, *mid, 1000.0]):
                for reference in ("init", "previous"):
                    rows.append(
                        {
                            **r,
                            "step": step,
                            "reference": reference,
                            "granularity": "block",
                            "depth": depth,
                            "name": f"b{depth}",
                            "mean_abs": v * (1 + scale) / 2 if step != 15 else v,
                            "status": "completed",
                        }
                    )
    return pd.DataFrame(rows)


def test_depth_trend(tmp_path):
    # mid blocks [a, 2, 4 - a]: divided by their mean 2, the slope against (0, .5, 1) is 2 - a
    d = _distances({0: [3.0, 2.0, 1.0], 1: [4.0, 2.0, 0.0], 2: [3.5, 2.0, 0.5]})
    paths = _write(
        tmp_path,
        distances=d,
        history=_history({("m", s, "residual", "sgd"): 0.9 for s in range(3)}),
    )
    below = _claim("depth_trend", 0.0, "below", where=RES)
    row = findings.findings([below], paths).iloc[0]
    assert row["values"] == pytest.approx([-1.0, -2.0, -1.5])
    assert row.statistic == pytest.approx(-1.5) and row.verdict == "supported"
    final = _claim("depth_trend", 0.0, "above", where=RES, over="final", reference="previous")
    assert findings.findings([final], paths).iloc[0].verdict == "contradicted"
    raw = _claim("depth_trend", where=RES, normalize="none", exclude_ends=False)
    assert findings.findings([raw], paths).iloc[0].statistic > 0  # the head dominates
    none = _claim("depth_trend", where=PLAIN)
    assert findings.findings([none], paths).iloc[0].note == "no run matches"


def test_share_unchanged(tmp_path):
    rows = []
    for seed, changed in enumerate([0.30, 0.35, 0.40]):
        r = _run("resnet", seed) | {"model_name": "resnet18-torchvision"}
        rows.append(
            {
                **r,
                "granularity": "model",
                "name": "model",
                "frac_changed_final": changed,
                "frac_never_moved": 0.5,
                "frac_never_reached": 0.1,
                "status": "completed",
            }
        )
        rows.append(
            {
                **r,
                "granularity": "block",
                "name": "b1",
                "frac_changed_final": 1.0,
                "frac_never_moved": 0.0,
                "frac_never_reached": 0.0,
                "status": "completed",
            }
        )
    paths = _write(
        tmp_path,
        frozen=pd.DataFrame(rows),
        history=_history({("resnet", s, "residual", "sgd"): 0.9 for s in range(3)}),
    )
    row = findings.findings([_claim("share_unchanged", 0.6, "above")], paths).iloc[0]
    assert row.statistic == pytest.approx(0.65) and row.verdict == "inconclusive"
    lo, hi = _ci3([0.70, 0.65, 0.60])[1:]
    assert (row.ci_low, row.ci_high) == pytest.approx((lo, hi))
    moved = _claim("share_unchanged", 0.6, "above", measure="never_moved")
    assert findings.findings([moved], paths).iloc[0].verdict == "contradicted"
    reached = _claim(
        "share_unchanged",
        0.2,
        "below",
        measure="never_reached",
        where={"model_name": "resnet18-torchvision"},
    )
    assert findings.findings([reached], paths).iloc[0].verdict == "supported"


def _perturbations():
    rows, sim = [], []
    offset = [0.20, 0.22, 0.24]
    for seed in range(3):
        src = _run("m", seed)
        for label, rel, cka in (
            ("identity", 0.20, 0.95),
            ("offset", offset[seed], 0.90),
            ("sign-flip", 2.0, 0.3),
        ):
            b = _run("m", seed, perturbation=label)
            row = {
                **b,
                "seed": seed + 1000,
                "source_run": src["run_id"],
                "source_seed": seed,
                "perturbation_name": label,
                "status": "completed",
                "granularity": "model",
                "rel_dist_theta1_theta2": rel,
                "best_accuracy_after": 0.9,
            }
            row.pop("shortcut")
            rows.append(row)
            rows.append({**row, "granularity": "block", "rel_dist_theta1_theta2": 99.0})
            sim.append(
                {
                    "run_a": src["run_id"],
                    "run_b": b["run_id"],
                    "kind": "perturbations",
                    "measure": "cka_linear",
                    "value": cka,
                    "note": "",
                }
            )
    best = {("m", s, "residual", "sgd"): 0.9 for s in range(3)}
    h = _history(best)
    branches = h.assign(
        run_id=h.run_id + "_offset", perturbation="offset", seed=h.seed + 1000
    )  # the branches' own history rows (their seed is the source's + 1000)
    return pd.DataFrame(rows), pd.DataFrame(sim), pd.concat([h, branches])


def test_perturbation_return(tmp_path):
    pt, sim, hist = _perturbations()
    paths = _write(tmp_path, perturbations=pt, similarity=sim, history=hist)
    ratio = _claim(
        "perturbation_return", 1.5, "below", branch="offset", control="identity", contrast="ratio"
    )
    row = findings.findings([ratio], paths).iloc[0]
    assert row["values"] == pytest.approx([1.0, 1.1, 1.2]) and list(row.seeds) == [0, 1, 2]
    assert row.verdict == "supported"
    diff = _claim(
        "perturbation_return",
        -0.1,
        "above",
        branch="offset",
        control="identity",
        measure="cka_linear",
    )
    row = findings.findings([diff], paths).iloc[0]
    assert row.statistic == pytest.approx(-0.05) and row.verdict == "supported"
    flip = _claim("perturbation_return", 1.0, "above", branch="sign-flip", by=["shortcut"])
    row = findings.findings([flip], paths).iloc[0]
    assert row.statistic == pytest.approx(2.0) and row.group == "shortcut=residual"
    assert row.verdict == "supported"  # zero spread: the interval is the point 2.0


def _barrier_rows(pair, kind, seed, perturbation, value, step, error_barrier, alignment="none"):
    base = _run("res", seed, perturbation="")
    rows = []
    for split in ("train", "test"):
        for alpha in (0.0, 0.5, 1.0):
            rows.append(
                {
                    **{k: base[k] for k in ("model", "dataset", "init", "optimizer", "shortcut")},
                    "model_name": "res",
                    "seed": seed,
                    "pair": pair,
                    "kind": kind,
                    "run_a": base["run_id"],
                    "run_b": f"{base['run_id']}_{pair}",
                    "perturbation": perturbation,
                    "perturbation_value": value,
                    "branch_step": step,
                    "status": "completed",
                    "alignment": alignment,
                    "alpha": alpha,
                    "split": split,
                    # the train split's barrier is 10x the test one's: the split is chosen
                    "error_barrier": error_barrier * (10 if split == "train" else 1),
                    "loss_barrier": 1.0,
                }
            )
    return rows


def test_barrier_and_its_change_with_the_branching_step(tmp_path):
    rows = []
    for seed, (early, late) in enumerate([(0.30, 0.10), (0.20, 0.05), (0.25, 0.15)]):
        for step, value in ((0, early), (100, late)):
            for d in (1, 2):  # the instability pairs at each step: one per seed here
                if d == 1:
                    pair = f"i{seed}-{step}"
                    rows += _barrier_rows(pair, "instability", seed, "inst", np.nan, step, value)
        # an offset sweep: 1e-6 returns (barrier 0.01), 1.0 does not (0.4)
        rows += _barrier_rows(f"o{seed}a", "branches", seed, "offset", 1e-6, -1, 0.01)
        rows += _barrier_rows(f"o{seed}b", "branches", seed, "offset", 1.0, -1, 0.4)
        rows += _barrier_rows(
            f"o{seed}c", "branches", seed, "offset", 1.0, -1, 0.9, "weight_matching"
        )
    b = pd.DataFrame(rows)
    hist = _history({("res", s, "residual", "sgd"): 0.9 for s in range(3)})
    paths = _write(tmp_path, barriers=b, history=hist)
    small = _claim("barrier", 0.02, "below", kind="branches", branch="offset", size=1e-6)
    row = findings.findings([small], paths).iloc[0]
    assert row.statistic == pytest.approx(0.01) and row.verdict == "supported"
    large = _claim("barrier", 0.02, "below", kind="branches", branch="offset", size=1.0)
    row = findings.findings([large], paths).iloc[0]
    assert row.statistic == pytest.approx(0.4) and row.verdict == "contradicted"
    aligned = _claim(
        "barrier", 0.5, "above", kind="branches", branch="offset", alignment="weight_matching"
    )
    assert findings.findings([aligned], paths).iloc[0].statistic == pytest.approx(0.9)
    train = _claim(
        "barrier", 0.0, "above", kind="branches", branch="offset", size=1.0, split="train"
    )
    assert findings.findings([train], paths).iloc[0].statistic == pytest.approx(4.0)
    change = _claim("barrier_step_change", 0.0, "below", kind="instability", branch="inst")
    row = findings.findings([change], paths).iloc[0]
    m, lo, hi = _ci3([-0.20, -0.15, -0.10])
    assert row["values"] == pytest.approx([-0.20, -0.15, -0.10])
    assert (row.statistic, row.ci_low, row.ci_high) == pytest.approx((m, lo, hi))
    assert row.verdict == "supported"


def test_representation_change(tmp_path):
    rows = []
    for seed, cka in enumerate([0.9, 0.8, 0.7]):
        r = _run("res", seed)
        for depth, block in enumerate(["stem", "b1", "b2", "fc"]):
            for step, value in ((0, cka + 0.01 * depth), (5, 0.95), (10, 1.0)):
                rows.append(
                    {
                        **r,
                        "kind": "over_checkpoints",
                        "run_a": r["run_id"],
                        "block_a": block,
                        "depth_a": depth,
                        "step": step,
                        "cka": value,
                    }
                )
    lsim = pd.DataFrame(rows).drop(columns=["run_id"])
    hist = _history({("res", s, "residual", "sgd"): 0.9 for s in range(3)})
    paths = _write(tmp_path, layer_similarity=lsim, history=hist)
    inner = _claim("representation_change", 0.5, "above")  # stem and fc left out
    row = findings.findings([inner], paths).iloc[0]
    assert row["values"] == pytest.approx([0.915, 0.815, 0.715])
    every = _claim("representation_change", 0.5, "above", exclude_ends=False)
    assert findings.findings([every], paths).iloc[0]["values"][0] == pytest.approx(0.915)


def test_feature_correlation_gap(tmp_path):
    best = {
        (m, s, "residual", o): 0.9 for m in ("a", "b") for s in range(3) for o in ("adam", "sgd")
    }
    hist = _history(best)
    values = {
        ("adam", "a"): [0.30, 0.32, 0.34],
        ("sgd", "a"): [0.10, 0.10, 0.10],
        ("adam", "b"): [0.10, 0.10, 0.10],
        ("sgd", "b"): [0.11, 0.09, 0.12],
    }
    sim = []
    for (opt, model), vs in values.items():
        for seed, v in enumerate(vs):
            rid = _run(model, seed, optimizer=opt)["run_id"]
            sim += [
                {"run_a": rid, "run_b": rid, "kind": "within", "measure": m, "value": x, "note": ""}
                for m, x in (("mean_abs_offdiag_corr", v), ("effective_rank", 5.0))
            ]
    paths = _write(tmp_path, similarity=pd.DataFrame(sim), history=hist)
    claim = _claim(
        "feature_correlation_gap", a={"optimizer": "adam"}, b={"optimizer": "sgd"}, by=["model"]
    )
    df = findings.findings([claim], paths)
    rows = df[df.kind == "claim"].set_index("group")
    assert rows.loc["model=a", "statistic"] == pytest.approx(0.22)
    assert rows.loc["model=a", "verdict"] == "supported"
    assert rows.loc["model=b", "values"] == pytest.approx([-0.01, 0.01, -0.02])
    assert rows.loc["model=b", "verdict"] == "inconclusive"


def _gradients(first: list[float], shortcut: str, vanish: bool = False) -> pd.DataFrame:
    rows = []
    for seed, g in enumerate(first):
        r = _run(shortcut, seed, shortcut=shortcut)
        for step in (2, 4):
            for depth, rms in enumerate([5.0, g, 0.01, 0.1, 7.0]):  # stem, 3 blocks, head
                rows.append(
                    {
                        **r,
                        "step": step,
                        "granularity": "block",
                        "depth": depth,
                        "name": f"b{depth}",
                        "grad_rms": rms,
                        "vanishing": vanish and step == 4 and depth == 1,
                        "exploding": False,
                        "status": "completed",
                    }
                )
    return pd.DataFrame(rows)


def test_gradient_ratio(tmp_path):
    g = pd.concat(
        [
            _gradients([1e-3, 1e-4, 1e-5], "plain", vanish=True),
            _gradients([0.1, 0.1, 0.1], "residual"),
        ]
    )
    hist = _history({(s, i, s, "sgd"): 0.9 for s in ("plain", "residual") for i in range(3)})
    paths = _write(tmp_path, gradients=g, history=hist)
    plain = _claim("gradient_ratio", 0.0, "below", where=PLAIN)
    row = findings.findings([plain], paths).iloc[0]
    assert row["values"] == pytest.approx([-2.0, -3.0, -4.0])  # log10(first / last = 0.1)
    assert (row.ci_low, row.ci_high) == pytest.approx(_ci3([-2.0, -3.0, -4.0])[1:])
    assert row.verdict == "supported"  # [-5.48, -0.52]: below 0, straddles -1
    res = _claim("gradient_ratio", 0.5, "above", where=RES, measure="ratio")
    row = findings.findings([res], paths).iloc[0]
    assert row.statistic == pytest.approx(1.0) and row.verdict == "supported"
    share = _claim("gradient_ratio", 0.0, "above", measure="vanishing", by=["shortcut"])
    df = findings.findings([share], paths)
    rows = df[df.kind == "claim"].set_index("group")
    assert rows.loc["shortcut=plain", "statistic"] == pytest.approx(0.5)  # 1 of 2 steps
    assert rows.loc["shortcut=residual", "verdict"] == "contradicted"  # never flagged


def test_diverged_runs_are_kept_and_nan_statistics_dropped(tmp_path):
    d = _distances({0: [3.0, 2.0, 1.0], 1: [4.0, 2.0, 0.0], 2: [3.5, 2.0, 0.5]})
    d.loc[d.seed == 2, "mean_abs"] = np.nan  # a diverged run's NaN weights
    hist = _history(
        {("m", s, "residual", "sgd"): 0.9 for s in range(3)},
        statuses={_run("m", 2)["run_id"]: "diverged"},
    )
    paths = _write(tmp_path, distances=d, history=hist)
    row = findings.findings([_claim("depth_trend", 0.0, "below")], paths).iloc[0]
    assert (row.n_seeds, row.n_runs, row.n_dropped, row.diverged) == (2, 3, 1, 1)
    assert row.statistic == pytest.approx(-1.5) and row.verdict == "inconclusive"


# --- training check, untested claims, outputs ----------------------------------------------


def test_training_check_and_expected_failure(tmp_path):
    paths = _write(tmp_path, history=_history(GAP_BEST))
    df = findings.findings([], paths, min_accuracy=0.9)
    train = df[df.kind == "training"].set_index("group")
    res = train.loc["model=res, dataset=d, init=init, optimizer=sgd"]
    assert res.statistic == pytest.approx(0.92) and res.verdict == "passed"
    assert train.loc["model=plain, dataset=d, init=init, optimizer=sgd", "verdict"] == "failed"
    df = findings.findings([], paths, min_accuracy=0.9, expect_failure=["plain"])
    plain = df.set_index("group").loc["model=plain, dataset=d, init=init, optimizer=sgd"]
    assert plain.verdict == "passed" and plain.expect == "below"
    assert "fails to train" in plain.statement
    df = findings.findings([], paths)
    assert set(df.verdict) == {"unchecked"} and df.threshold.isna().all()


def test_outputs_columns_and_markdown(tmp_path):
    paths = _write(tmp_path, history=_history(GAP_BEST))
    claims = [
        _claim("accuracy_gap", a=RES, b=PLAIN),
        _claim(
            "feature_correlation_gap",
            note="no run of t-demo matches {'optimizer': 'adam'}",
            a={"optimizer": "adam"},
            b={"optimizer": "sgd"},
        ),
    ]
    claims[1]["id"] = "untested"
    df = findings.findings(claims, paths, study="t", min_accuracy=0.9)  # no similarity table
    findings.write_findings(df, tmp_path / "f.parquet", tmp_path / "f.md", "t")
    back = read_parquet(tmp_path / "f.parquet")
    documented = "study claim statement group statistic n_seeds ci_low ci_high threshold verdict"
    documented = documented.split()
    assert list(back.columns[: len(documented)]) == documented
    assert list(back.columns) == findings.COLUMNS
    untested = back[back.claim == "untested"].iloc[0]
    assert untested.verdict == "inconclusive" and untested.note.startswith("not tested")
    md = (tmp_path / "f.md").read_text()
    assert "| c-accuracy_gap | a claim | accuracy_gap | all | 0.32 |" in md
    assert "**supported**" in md and "> 0" in md and "## Training check" in md
    assert "min_accuracy 0.9" in md and "**failed**" in md
    text = findings.summary(back)
    assert "c-accuracy_gap" in text and "supported" in text and "1 passed, 1 failed" in text


def test_a_claim_needs_its_tables(tmp_path):
    paths = _write(tmp_path, history=_history(GAP_BEST))
    with pytest.raises(findings.FindingsError, match="no distances table"):
        findings.findings([_claim("depth_trend")], paths)


# --- config ------------------------------------------------------------------------------

CFG = {
    "studies": {
        "s": {
            "models": [
                {"name": "resnet18-cifar", "width": 4},
                {"name": "resnet18-cifar-plain", "width": 4, "expect_failure": True},
            ],
            "datasets": ["synthetic"],
            "inits": ["kaiming-normal"],
            "optimizers": ["sgd"],
            "seeds": [0, 1, 2],
            "epochs": 1,
            "batch_size": 64,
            "min_accuracy": 0.9,
            "gradients": {"every_steps": 2},
            "perturbations": [{"name": "identity"}],
            "claims": [
                {
                    "id": "gap",
                    "statement": "residual beats plain",
                    "test": "accuracy_gap",
                    "params": {"a": {"shortcut": "residual"}, "b": {"shortcut": "plain"}},
                    "threshold": 0,
                    "expect": "above",
                },
                {
                    "id": "trend",
                    "statement": "residual: input blocks move more",
                    "test": "depth_trend",
                    "params": {"where": {"shortcut": "residual"}},
                    "threshold": 0,
                    "expect": "below",
                },
                {
                    "id": "adam",
                    "statement": "Adam correlates features",
                    "test": "feature_correlation_gap",
                    "params": {"a": {"optimizer": "adam"}, "b": {"optimizer": "sgd"}},
                    "threshold": 0,
                    "expect": "above",
                },
            ],
            "variants": {"wide": {"optimizers": ["sgd", "adam"]}},
        }
    }
}


def _load(cfg, variant="default"):
    cfg = copy.deepcopy(cfg)
    cfg["variant"] = variant
    return load_studies(cfg, DEFAULT_SCHEMA)


def _claims_with(**changes):
    cfg = copy.deepcopy(CFG)
    cfg["studies"]["s"]["claims"][0].update(changes)
    return cfg


def test_claims_resolve_with_defaults_notes_and_marks():
    study = _load(CFG)["s"]
    gap, trend, adam = study.claims
    assert gap["params"]["metric"] == "best" and gap["params"]["by"] == [] and gap["note"] == ""
    assert trend["params"]["reference"] == "init" and trend["threshold"] == 0.0
    # adam is an optimizer of a variant, not of this one: reported as not tested
    assert "no run of s matches" in adam["note"]
    assert _load(CFG, "wide")["s-wide"].claims[2]["note"] == ""
    assert study.min_accuracy == 0.9 and study.expect_failure == ("resnet18-cifar-plain",)


def test_expect_failure_changes_no_run():
    unmarked = copy.deepcopy(CFG)
    del unmarked["studies"]["s"]["models"][1]["expect_failure"]
    del unmarked["studies"]["s"]["claims"]
    a, b = _load(CFG)["s"], _load(unmarked)["s"]
    assert a.runs == b.runs and b.claims == () and b.expect_failure == ()


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"test": "depth_trends"},
            "unknown claim test 'depth_trends'. Valid claim tests: accuracy_gap, barrier, barrier_step_change, depth_trend",
        ),
        (
            {"params": {"a": {}, "b": {}, "group": "x"}},
            "test 'accuracy_gap' has no parameter "
            "'group' (its parameters: a, b, where, by, metric)",
        ),
        ({"expect": "more"}, "config key 'studies/s/claims/0/expect'"),
        ({"params": {"a": {"shortcut": "residual"}}}, "test 'accuracy_gap' needs 'b'"),
        ({"params": {"a": {"modle": "x"}, "b": {}}}, "claims/0/params/a/modle': unknown column"),
        (
            {"params": {"a": {"model": "resnet19"}, "b": {}}},
            "'resnet19' is no model of this study or its variants",
        ),
        ({"params": {"a": {}, "b": {}, "metric": "worst"}}, "'worst' is not one of best, final"),
        ({"params": {"a": {}, "b": {}, "by": ["colour"]}}, "give a list of columns among"),
        ({"id": "trend"}, "claim id 'trend' is used twice"),
        (
            {"test": "perturbation_return", "params": {"branch": "sign-flip"}},
            "no perturbation labelled 'sign-flip' in this study or its variants (labels: identity)",
        ),
        (
            {"test": "share_unchanged", "params": {"measure": "never_reached"}},
            "needs gradients.track_reached: true",
        ),
        ({"threshold": "zero"}, "config key 'studies/s/claims/0/threshold'"),
    ],
)
def test_bad_claims_stop_before_any_job(change, message):
    with pytest.raises(ConfigError) as e:
        _load(_claims_with(**change))
    assert message in str(e.value)


def test_gradient_ratio_needs_gradient_records():
    cfg = _claims_with(test="gradient_ratio", params={})
    cfg["studies"]["s"]["gradients"] = {}
    with pytest.raises(ConfigError, match="test gradient_ratio needs gradient records"):
        _load(cfg)


def test_min_accuracy_and_expect_failure_types():
    cfg = copy.deepcopy(CFG)
    cfg["studies"]["s"]["min_accuracy"] = 1.5
    with pytest.raises(ConfigError, match="min_accuracy"):
        _load(cfg)
    cfg = copy.deepcopy(CFG)
    cfg["studies"]["s"]["models"][0]["expect_failure"] = "yes"
    with pytest.raises(ConfigError, match="expect_failure"):
        _load(cfg)


def test_every_claim_of_config_yaml_resolves_in_every_variant():
    import yaml

    from paramdyn.config import DEFAULT_SCHEMA as schema

    raw = yaml.safe_load((schema.parents[1] / "config.yaml").read_text())
    for variant in ("default", "faithful", "demo"):
        cfg = copy.deepcopy(raw) | {"run": list(raw["studies"]), "variant": variant}
        for name, study in load_studies(cfg, schema).items():
            ids = [c["id"] for c in study.claims]
            assert study.claims, f"{name} lists no claims"
            assert len(ids) == len(set(ids))
            for c in study.claims:
                assert c["test"] in catalog.CLAIM_TESTS and c["statement"], (name, c["id"])


def test_cli_prints_each_studys_verdicts(tmp_path, capsys):
    import yaml

    from paramdyn.cli import main

    cfg = copy.deepcopy(CFG) | {"variant": "wide"}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    results = tmp_path / "results"
    assert main(["findings", str(tmp_path / "config.yaml"), "--results", str(results)]) == 1
    assert "no " in capsys.readouterr().out  # not built yet
    paths = _write(tmp_path, history=_history(GAP_BEST))
    df = findings.findings([_claim("accuracy_gap", a=RES, b=PLAIN)], paths, min_accuracy=0.9)
    findings.write_findings(df, results / "s-wide" / "findings.parquet", tmp_path / "f.md")
    assert main(["findings", str(tmp_path / "config.yaml"), "--results", str(results)]) == 0
    out = capsys.readouterr().out
    assert "== s-wide" in out and "c-accuracy_gap" in out and "supported" in out
    assert "failed: model=plain" in out
