"""From measurements to findings: each claim of a study tested on its Parquet tables.

A claim (config ``claims:``) names a test of the registry ``catalog.CLAIM_TESTS``, its
parameters, a threshold and the claim's side of it (``expect: above | below``). The test
computes one statistic per seed; the verdict comes from the 95% t-interval of the mean
over seeds:

- ``supported``: the interval lies entirely on the claim's side of the threshold;
- ``contradicted``: entirely on the other side (touching the threshold counts there);
- ``inconclusive``: it straddles the threshold, or fewer than 3 seeds have a statistic.

A seed's statistic is the mean over the group's runs with that seed (over the other grid
axes: models, datasets, inits, optimizers the filters keep); for two groups (A and B), the
mean of A's runs minus the mean of B's runs of that seed, over the seeds both have. A run
whose statistic is not finite (e.g. a diverged run's NaN weights) is left out and counted
(``n_dropped``); diverged runs are kept otherwise (their accuracy is what they reached) and
counted (``diverged``). Runs of perturb-and-retrain branches take part only in filters that
name their ``perturbation`` (and in ``perturbation_return``, which pairs them by the seed of
their source run).

Next to the claims, a training check per grid setting (model x dataset x init x optimizer):
its best test accuracy, mean over seeds, must reach the study's ``min_accuracy``; a model
marked ``expect_failure`` must stay below it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import atomic, catalog, columns, tables

VERDICTS = ("supported", "contradicted", "inconclusive")
CHECKS = ("passed", "failed", "unchecked")
COLUMNS = [
    "study",
    "claim",
    "statement",
    "group",
    "statistic",
    "n_seeds",
    "ci_low",
    "ci_high",
    "threshold",
    "verdict",
    "test",
    "expect",
    "kind",
    "n_runs",
    "n_dropped",
    "diverged",
    "seeds",
    "values",
    "note",
]
GRID = list(columns.CLAIM)
SETTING = list(columns.SETTING)  # a training check's grid setting
MIN_SEEDS = 3


class FindingsError(RuntimeError):
    pass


# --- statistics over seeds ------------------------------------------------------------------


def confidence_interval(values, level: float = 0.95) -> tuple[float, float, float, int]:
    """(mean, low, high, n) of the finite ``values``: the t-interval of the mean; the
    bounds are NaN with fewer than 2 values."""
    from scipy import stats  # here: seconds to import; `paramdyn findings` needs none of it

    x = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    n = len(x)
    if n == 0:
        return math.nan, math.nan, math.nan, 0
    mean = float(x.mean())
    if n < 2:
        return mean, math.nan, math.nan, n
    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))
    return mean, mean - half, mean + half, n


def verdict(low: float, high: float, n: int, threshold: float, expect: str) -> str:
    """``supported`` when [low, high] lies strictly on the ``expect`` side of ``threshold``,
    ``contradicted`` when it lies on the other side, else (or with < 3 seeds) inconclusive."""
    if n < MIN_SEEDS or not (np.isfinite(low) and np.isfinite(high)):
        return "inconclusive"
    if expect not in ("above", "below"):
        raise ValueError(f"expect must be 'above' or 'below', not {expect!r}")
    sign = 1.0 if expect == "above" else -1.0  # the claim's side: sign * (x - threshold) > 0
    lo, hi = sorted((sign * (low - threshold), sign * (high - threshold)))
    if lo > 0:
        return "supported"
    if hi <= 0:
        return "contradicted"
    return "inconclusive"


# --- selecting runs -------------------------------------------------------------------------


def select(df: pd.DataFrame, *filters: dict[str, Any]) -> pd.DataFrame:
    """The rows of ``df`` matching every filter ({column: value | [values]}); rows of
    perturbation branches only when a filter names ``perturbation``."""
    merged: dict[str, set[str]] = {}
    for f in filters:
        for k, v in (f or {}).items():
            values = {str(x) for x in (v if isinstance(v, list) else [v])}
            merged[k] = merged[k] & values if k in merged else values
    merged.setdefault("perturbation", {""})
    mask = pd.Series(True, index=df.index)
    for k, values in merged.items():
        if k not in df.columns:
            raise FindingsError(f"column '{k}' is not in the table (columns: {list(df.columns)})")
        mask &= df[k].fillna("").astype(str).isin(values)
    return df[mask]


def run_grid(history: pd.DataFrame, models: dict[str, str] | None = None) -> pd.DataFrame:
    """One row per run: its grid coordinates (``model_name`` from ``models``, label ->
    registry name, where the table lacks it), seed and whether it diverged."""
    h = history.copy()
    if "perturbation" not in h.columns:
        h["perturbation"] = ""
    h["perturbation"] = h["perturbation"].fillna("")
    if "model_name" not in h.columns:
        h["model_name"] = h["model"].map(lambda m: (models or {}).get(m, m))
    if "status" not in h.columns:
        h["status"] = "completed"
    h["diverged"] = h["status"] == "diverged"
    cols = [c for c in GRID if c in h.columns]
    g = h.groupby("run_id", sort=True).agg(
        {**{c: "first" for c in cols}, "seed": "first", "diverged": "any"}
    )
    return g.reset_index()


def _with_grid(df: pd.DataFrame, runs: pd.DataFrame, key: str = "run_id") -> pd.DataFrame:
    """``df`` with the grid columns it lacks (and ``diverged``) joined from ``runs``."""
    missing = [c for c in [*GRID, "seed", "diverged"] if c not in df.columns]
    if not missing:
        return df
    extra = runs.set_index("run_id")[missing]
    return df.join(extra, on=key)


# --- per-run statistics (one function per claim test) ---------------------------------------
# Each returns one row per run: the grid columns, ``seed``, ``diverged`` and ``value``.


def _depth_trend(t: dict[str, pd.DataFrame], runs: pd.DataFrame, p: dict) -> pd.DataFrame:
    d = t["distances"]
    d = d[(d["granularity"] == "block") & (d["reference"] == p["reference"])]
    d = select(_with_grid(d, runs), p["where"])
    rows = []
    for run_id, g in d.groupby("run_id", sort=True):
        if p["over"] == "final":
            g = g[g["step"] == g["step"].max()]
        how = "median" if p["over"] == "median" else "mean"
        y = g.groupby("depth")[p["metric"]].agg(how).sort_index()
        if p["exclude_ends"]:
            y = y.iloc[1:-1]
        rows.append({"run_id": run_id, "value": _slope(y, p["normalize"])})
    return _per_run(rows, runs)


def _slope(y: pd.Series, normalize: str) -> float:
    """Least-squares slope of ``y`` (indexed by depth) against relative depth in [0, 1]."""
    if len(y) < 2:
        return math.nan
    depth = y.index.to_numpy(dtype=float)
    x = (depth - depth.min()) / (depth.max() - depth.min())
    v = y.to_numpy(dtype=float)
    if normalize == "mean":
        m = v.mean()
        if not np.isfinite(m) or m == 0:
            return math.nan
        v = v / m
    elif normalize == "log":
        if (v <= 0).any():
            return math.nan
        v = np.log10(v)
    if not np.isfinite(v).all():
        return math.nan
    xc = x - x.mean()
    return float((xc * (v - v.mean())).sum() / (xc**2).sum())


def _accuracy(t: dict[str, pd.DataFrame], runs: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Best or final test accuracy of every run."""
    h = t["history"]
    h = h[h["split"] == "test"].sort_values(["run_id", "step", "epoch"], kind="stable")
    if metric == "best":
        value = h.groupby("run_id", sort=True)["accuracy"].max()
    else:  # the last evaluation's, NaN included
        value = h.groupby("run_id", sort=True).tail(1).set_index("run_id")["accuracy"]
    rows = [{"run_id": r, "value": v} for r, v in value.items()]
    return _per_run(rows, runs)


def _accuracy_gap(t, runs, p):
    return _accuracy(t, runs, p["metric"])


def _share_unchanged(t, runs, p):
    f = t["frozen"]
    f = select(_with_grid(f[f["granularity"] == "model"], runs), p["where"])
    column = {
        "unchanged": "frac_changed_final",
        "changed": "frac_changed_final",
        "never_moved": "frac_never_moved",
        "never_reached": "frac_never_reached",
    }
    v = f[column[p["measure"]]].astype(float)
    f = f.assign(value=1.0 - v if p["measure"] == "unchanged" else v)
    return f[[*GRID, "run_id", "seed", "diverged", "value"]].reset_index(drop=True)


SIMILARITY_MEASURES = ("cka_linear", "cka_linear_unbiased", "matched_correlation", "procrustes")


def _perturbation_return(t, runs, p):
    pt = t["perturbations"]
    if "granularity" in pt.columns:
        pt = pt[pt["granularity"] == "model"]
    # the grid columns the table lacks are its source run's; diverged: the branch's own
    missing = [c for c in ("model_name", "shortcut") if c not in pt.columns]
    pt = pt.join(runs.set_index("run_id")[missing], on="source_run")
    pt = pt.assign(diverged=pt["status"] == "diverged" if "status" in pt.columns else False)
    if p["measure"] in SIMILARITY_MEASURES:
        s = t["similarity"]
        s = s[(s["kind"] == "perturbations") & (s["measure"] == p["measure"])]
        sim = {(a, b): v for a, b, v in zip(s["run_a"], s["run_b"], s["value"], strict=True)}
        pt = pt.assign(
            value=[
                sim.get((a, b), math.nan)
                for a, b in zip(pt["source_run"], pt["run_id"], strict=True)
            ]
        )
    else:
        pt = pt.assign(value=pt[p["measure"]].astype(float))
    branch = select(pt, p["where"], {"perturbation": p["branch"]})
    if p.get("control"):
        control = select(pt, p["where"], {"perturbation": p["control"]})
        c = control.set_index("source_run")["value"]
        other = branch["source_run"].map(c).astype(float)
        if p["contrast"] == "ratio":
            with np.errstate(divide="ignore", invalid="ignore"):
                value = branch["value"].to_numpy(float) / other.to_numpy(float)
        else:
            value = branch["value"].to_numpy(float) - other.to_numpy(float)
        branch = branch.assign(value=value)
        ctrl_div = branch["source_run"].map(control.set_index("source_run")["diverged"]).eq(True)
        branch = branch.assign(diverged=branch["diverged"] | ctrl_div)
    # a branch's seed is its source run's: branches pair with the other runs of that seed
    out = branch.assign(seed=branch["source_seed"].astype("int64"))
    return out[[*GRID, "run_id", "seed", "diverged", "value"]].reset_index(drop=True)


def _feature_correlation_gap(t, runs, p):
    s = t["similarity"]
    s = s[(s["kind"] == "within") & (s["measure"] == p["measure"])]
    rows = [{"run_id": r, "value": v} for r, v in zip(s["run_a"], s["value"], strict=True)]
    return _per_run(rows, runs)


def _gradient_ratio(t, runs, p):
    g = t["gradients"]
    g = select(_with_grid(g[g["granularity"] == "block"], runs), p["where"])
    rows = []
    for run_id, r in g.groupby("run_id", sort=True):
        if p["measure"] in ("vanishing", "exploding", "flagged"):
            flags = {
                "vanishing": ["vanishing"],
                "exploding": ["exploding"],
                "flagged": ["vanishing", "exploding"],
            }[p["measure"]]
            missing = [c for c in flags if c not in r.columns]
            if missing:
                raise FindingsError(f"gradients table has no column {missing[0]}")
            per_step = r.assign(flag=r[flags].any(axis=1)).groupby("step")["flag"].any()
            rows.append({"run_id": run_id, "value": float(per_step.mean())})
            continue
        depths = sorted(r["depth"].unique())
        if p["exclude_ends"]:
            depths = depths[1:-1]
        if len(depths) < 2:
            rows.append({"run_id": run_id, "value": math.nan})
            continue
        by_step = r.pivot_table(index="step", columns="depth", values="grad_rms", aggfunc="first")
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.log10(
                by_step[depths[0]].to_numpy(float) / by_step[depths[-1]].to_numpy(float)
            )
        ratio = ratio[np.isfinite(ratio)]
        value = float(ratio.mean()) if len(ratio) else math.nan
        if p["measure"] == "ratio":
            value = 10.0**value
        rows.append({"run_id": run_id, "value": value})
    return _per_run(rows, runs)


def _representation_change(t, runs, p):
    s = t["layer_similarity"]
    s = s[s["kind"] == "over_checkpoints"]
    rows = []
    for run_id, g in s.groupby("run_a", sort=True):
        first = g[g["step"] == g["step"].min()]
        depths = sorted(first["depth_a"].unique())
        if p["exclude_ends"]:
            depths = depths[1:-1]
        values = first.loc[first["depth_a"].isin(depths), "cka"].astype(float)
        rows.append({"run_id": run_id, "value": float(values.mean()) if len(values) else math.nan})
    return _per_run(rows, runs)


def _pair_barriers(t, runs, p) -> pd.DataFrame:
    """One row per pair of ``barriers.parquet`` matching the claim's kind, branch, size,
    alignment and split, with ``value`` its barrier; ``run_id`` is its run_b (the branch)
    and ``seed`` its run_a's (a branch's source seed)."""
    b = t["barriers"]
    b = b[(b["kind"] == p["kind"]) & (b["alignment"] == p["alignment"])]
    b = b[b["split"] == p["split"]].drop_duplicates("pair")
    if p.get("size") is not None:
        b = b[np.isclose(b["perturbation_value"].astype(float), float(p["size"]), rtol=1e-9)]
    filters = [p["where"]]
    if p.get("branch"):
        filters.append({"perturbation": p["branch"]})
    elif p["kind"] in ("branches", "instability"):
        filters.append({"perturbation": sorted(set(b["perturbation"]))})
    b = select(b.assign(diverged=b["status"] == "diverged"), *filters)
    return b.assign(run_id=b["run_b"], value=b[p["measure"]].astype(float))


def _barrier(t, runs, p):
    b = _pair_barriers(t, runs, p)
    return b[[*GRID, "run_id", "seed", "diverged", "value"]].reset_index(drop=True)


def _barrier_step_change(t, runs, p):
    b = _pair_barriers(t, runs, p)
    rows = []
    for _, g in b.groupby([*GRID, "seed"], sort=True, dropna=False):
        by_step = g.groupby("branch_step")["value"].mean().sort_index()
        value = by_step.iloc[-1] - by_step.iloc[0] if len(by_step) > 1 else math.nan
        rows.append({**g.iloc[0][[*GRID, "run_id", "seed"]].to_dict(), "value": value})
        rows[-1]["diverged"] = bool(g["diverged"].any())
    return pd.DataFrame(rows, columns=[*GRID, "run_id", "seed", "diverged", "value"])


def _per_run(rows: list[dict], runs: pd.DataFrame) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=["run_id", "value"])
    df = df.merge(runs, on="run_id", how="left")
    return df[[*GRID, "run_id", "seed", "diverged", "value"]]


STATISTICS: dict[str, Callable[[dict, pd.DataFrame, dict], pd.DataFrame]] = {
    "depth_trend": _depth_trend,
    "accuracy_gap": _accuracy_gap,
    "share_unchanged": _share_unchanged,
    "perturbation_return": _perturbation_return,
    "feature_correlation_gap": _feature_correlation_gap,
    "gradient_ratio": _gradient_ratio,
    "representation_change": _representation_change,
    "barrier": _barrier,
    "barrier_step_change": _barrier_step_change,
}
PAIRED = {"accuracy_gap", "feature_correlation_gap"}  # tests of group A against group B
# tests whose statistic selects its own rows (branches included)
SELECTED = {"perturbation_return", "barrier", "barrier_step_change"}


# --- claims -> rows ---------------------------------------------------------------------------


def _group_label(by: list[str], key: Any) -> str:
    if not by:
        return "all"
    key = key if isinstance(key, tuple) else (key,)
    return ", ".join(f"{c}={k}" for c, k in zip(by, key, strict=True))


def _groups(df: pd.DataFrame, by: list[str]):
    if not by:
        yield (), df
        return
    yield from df.groupby(by, sort=True, dropna=False)


def _seed_means(df: pd.DataFrame) -> pd.Series:
    finite = df[np.isfinite(df["value"].astype(float))]
    return finite.groupby("seed", sort=True)["value"].mean()


def claim_rows(claim: dict[str, Any], t: dict[str, pd.DataFrame], runs: pd.DataFrame, study=""):
    """The rows of one claim: one per group (``by``), each with its per-seed statistics."""
    p = claim["params"]
    base = {
        "study": study,
        "claim": claim["id"],
        "statement": claim["statement"],
        "threshold": float(claim["threshold"]),
        "test": claim["test"],
        "expect": claim["expect"],
        "kind": "claim",
    }
    if claim.get("note"):
        return [_row(base, "all", pd.Series(dtype=float), 0, 0, 0, f"not tested: {claim['note']}")]
    per_run = STATISTICS[claim["test"]](t, runs, p)
    by = list(p.get("by") or [])
    out = []
    if claim["test"] in PAIRED:
        a = select(per_run, p["where"], p["a"])
        b = select(per_run, p["where"], p["b"])
        keys = sorted({k for k, _ in _groups(a, by)} & {k for k, _ in _groups(b, by)}, key=str)
        ga, gb = dict(_groups(a, by)), dict(_groups(b, by))
        if not keys:
            return [
                _row(base, "all", pd.Series(dtype=float), 0, 0, 0, "groups A and B share no group")
            ]
        for k in keys:
            xa, xb = ga[k], gb[k]
            diff = (_seed_means(xa) - _seed_means(xb)).dropna()
            both = pd.concat([xa, xb])
            dropped = int((~np.isfinite(both["value"].astype(float))).sum())
            note = "" if len(diff) else "A and B have no seed in common"
            out.append(
                _row(
                    base,
                    _group_label(by, k),
                    diff,
                    len(both),
                    dropped,
                    int(both["diverged"].fillna(False).sum()),
                    note,
                )
            )
        return out
    per_run = per_run if claim["test"] in SELECTED else select(per_run, p["where"], {})
    if per_run.empty:
        return [_row(base, "all", pd.Series(dtype=float), 0, 0, 0, "no run matches")]
    for k, g in _groups(per_run, by):
        dropped = int((~np.isfinite(g["value"].astype(float))).sum())
        out.append(
            _row(
                base,
                _group_label(by, k),
                _seed_means(g),
                len(g),
                dropped,
                int(g["diverged"].fillna(False).sum()),
                "",
            )
        )
    return out


def _row(base, group, per_seed: pd.Series, n_runs, n_dropped, diverged, note):
    mean, low, high, n = confidence_interval(per_seed.to_numpy(float))
    if 0 < n < MIN_SEEDS and not note:
        note = f"{n} seed{'s' * (n > 1)}: at least {MIN_SEEDS} are needed for a verdict"
    return {
        **base,
        "group": group,
        "statistic": mean,
        "n_seeds": n,
        "ci_low": low,
        "ci_high": high,
        "verdict": verdict(low, high, n, base["threshold"], base["expect"]),
        "n_runs": int(n_runs),
        "n_dropped": int(n_dropped),
        "diverged": int(diverged),
        "seeds": [int(s) for s in per_seed.index],
        "values": [float(v) for v in per_seed],
        "note": note,
    }


def training_rows(
    t: dict[str, pd.DataFrame],
    runs: pd.DataFrame,
    min_accuracy: float | None,
    expect_failure: list[str] | tuple[str, ...] = (),
    study: str = "",
) -> list[dict]:
    """The training check: per grid setting of the runs (not branches), the best test
    accuracy over seeds against ``min_accuracy``; ``passed``/``failed`` by its mean (below
    it for a model in ``expect_failure``), ``unchecked`` without a ``min_accuracy``."""
    acc = select(_accuracy(t, runs, "best"), {})
    out = []
    threshold = math.nan if min_accuracy is None else float(min_accuracy)
    for key, g in acc.groupby(SETTING, sort=False):
        failure = key[0] in set(expect_failure)
        base = {
            "study": study,
            "claim": "training",
            "test": "training",
            "kind": "training",
            "statement": (
                f"{key[0]} fails to train (the studied effect)" if failure else f"{key[0]} trains"
            ),
            "threshold": threshold,
            "expect": "below" if failure else "above",
        }
        row = _row(
            base,
            _group_label(SETTING, key),
            _seed_means(g),
            len(g),
            int((~np.isfinite(g["value"].astype(float))).sum()),
            int(g["diverged"].fillna(False).sum()),
            "",
        )
        m = row["statistic"]
        if min_accuracy is None or not np.isfinite(m):
            row["verdict"] = "unchecked"
        else:
            row["verdict"] = (
                "passed" if (m < threshold if failure else m >= threshold) else "failed"
            )
        row["note"] = ""
        out.append(row)
    return out


def findings(
    claims: list[dict[str, Any]],
    table_paths: dict[str, Path | str],
    *,
    study: str = "",
    models: dict[str, str] | None = None,
    min_accuracy: float | None = None,
    expect_failure: list[str] | tuple[str, ...] = (),
) -> pd.DataFrame:
    """Every claim's rows, then the training check, as one table (``COLUMNS``). ``claims``
    are the study's resolved claims (``Study.claims``); ``table_paths`` maps table names
    (``history`` always, and those the claims' tests read) to Parquet files."""
    t = {name: tables.read_parquet(path) for name, path in table_paths.items()}
    if "history" not in t:
        raise FindingsError("the findings need the history table (run coordinates, accuracy)")
    runs = run_grid(t["history"], models)
    rows = []
    for claim in claims:
        need = [x for x in catalog.CLAIM_TESTS[claim["test"]].tables if x not in t]
        if need and not claim.get("note"):
            raise FindingsError(f"claim {claim['id']}: no {need[0]} table was given")
        rows += claim_rows(claim, t, runs, study)
    rows += training_rows(t, runs, min_accuracy, expect_failure, study)
    df = pd.DataFrame(rows, columns=COLUMNS)
    for c in ("n_seeds", "n_runs", "n_dropped", "diverged"):
        df[c] = df[c].astype("int64")
    for c in ("statistic", "ci_low", "ci_high", "threshold"):
        df[c] = df[c].astype(float)
    return df


# --- output ----------------------------------------------------------------------------------


def _num(x: float) -> str:
    return "—" if x is None or not np.isfinite(x) else f"{x:.4g}"


def _ci(low: float, high: float) -> str:
    return "—" if not (np.isfinite(low) and np.isfinite(high)) else f"[{_num(low)}, {_num(high)}]"


def _side(expect: str, threshold: float) -> str:
    return (
        "—"
        if not np.isfinite(threshold)
        else f"{'>' if expect == 'above' else '<'} {_num(threshold)}"
    )


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(df: pd.DataFrame, study: str = "") -> str:
    """findings.md: the claims' verdict table, then the training check."""
    claims = df[df["kind"] == "claim"]
    train = df[df["kind"] == "training"]
    lines = [f"# Findings: {study}" if study else "# Findings", ""]
    if claims.empty:
        lines += ["No claims are listed for this study (config key `claims`).", ""]
    else:
        lines += [
            "| claim | statement | test | group | statistic | 95% CI | seeds | threshold | verdict |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in claims.itertuples(index=False):
            lines.append(
                f"| {_cell(r.claim)} | {_cell(r.statement)} | {r.test} | {_cell(r.group)} | "
                f"{_num(r.statistic)} | {_ci(r.ci_low, r.ci_high)} | {r.n_seeds} | "
                f"{_side(r.expect, r.threshold)} | **{r.verdict}** |"
            )
        counts = claims["verdict"].value_counts()
        lines += ["", ", ".join(f"{counts.get(v, 0)} {v}" for v in VERDICTS) + "."]
        notes = [
            f"- {r.claim} ({r.group}): {r.note}"
            + (f"; {r.n_dropped} run(s) without a finite statistic left out" if r.n_dropped else "")
            for r in claims.itertuples(index=False)
            if r.note or r.n_dropped
        ]
        lines += ["", *notes] if notes else []
        lines += [
            "",
            "Statistic: the mean over seeds of each seed's statistic (the test's: see "
            "below); 95% CI: t-interval over seeds. A claim is *supported* when the interval "
            "lies entirely on its side of the threshold, *contradicted* when entirely on the "
            f"other side, *inconclusive* otherwise or with fewer than {MIN_SEEDS} seeds.",
            "",
        ]
        for name in dict.fromkeys(claims["test"]):
            lines.append(f"- `{name}`: {catalog.CLAIM_TESTS[name].statistic}.")
        lines.append("")
    lines += ["## Training check", ""]
    if train.empty:
        lines += ["No runs.", ""]
    else:
        thr = train["threshold"].iloc[0]
        lines += [
            (
                f"Best test accuracy, mean over seeds, against min_accuracy {_num(thr)} (a "
                "model marked expect_failure must stay below it)."
                if np.isfinite(thr)
                else "Best test accuracy, mean over seeds (no min_accuracy: unchecked)."
            ),
            "",
            "| setting | expected | best test accuracy | 95% CI | seeds | diverged | check |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in train.itertuples(index=False):
            expected = "fails" if r.expect == "below" else "trains"
            lines.append(
                f"| {_cell(r.group)} | {expected} | {_num(r.statistic)} | "
                f"{_ci(r.ci_low, r.ci_high)} | {r.n_seeds} | {r.diverged} | **{r.verdict}** |"
            )
        counts = train["verdict"].value_counts()
        lines += ["", ", ".join(f"{counts.get(v, 0)} {v}" for v in CHECKS) + ".", ""]
    return "\n".join(lines)


def write_findings(df: pd.DataFrame, out_parquet, out_markdown, study: str = "") -> None:
    tables.write_parquet(df, out_parquet, {"study": study, "min_seeds": MIN_SEEDS, "level": 0.95})
    atomic.write_text(out_markdown, markdown(df, study))


def summary(df: pd.DataFrame) -> str:
    """A compact plain-text verdict table (for the terminal, ``paramdyn findings``)."""
    claims = df[df["kind"] == "claim"]
    lines = []
    if not claims.empty:
        w = max(len("claim"), *(len(c) for c in claims["claim"]))
        g = max(len("group"), *(len(c) for c in claims["group"]))
        lines.append(
            f"  {'claim':<{w}}  {'group':<{g}}  {'statistic':>10}  {'95% CI':<22} "
            f"{'n':>2}  {'threshold':<10} verdict"
        )
        for r in claims.itertuples(index=False):
            lines.append(
                f"  {r.claim:<{w}}  {r.group:<{g}}  {_num(r.statistic):>10}  "
                f"{_ci(r.ci_low, r.ci_high):<22} {r.n_seeds:>2}  "
                f"{_side(r.expect, r.threshold):<10} {r.verdict}"
            )
    else:
        lines.append("  no claims")
    train = df[df["kind"] == "training"]
    counts = train["verdict"].value_counts()
    text = ", ".join(f"{counts.get(v, 0)} {v}" for v in CHECKS if counts.get(v, 0))
    lines.append(f"  training check ({len(train)} settings): {text or 'no runs'}")
    for r in train[train["verdict"] == "failed"].itertuples(index=False):
        expected = "below" if r.expect == "below" else "at least"
        lines.append(
            f"    failed: {r.group}: best test accuracy {_num(r.statistic)}, expected "
            f"{expected} {_num(r.threshold)}"
        )
    return "\n".join(lines)
