"""End to end: the real snakemake CLI on a tiny config in a temporary directory."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from safetensors import safe_open

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")

# the tiny study, richer than a grid: seeds, a perturbation branch, gradients, features, claims
TINY = yaml.safe_load((REPO / "tests" / "cluster" / "tiny.yaml").read_text())
BASE = [
    f"resnet18-basic-{s}-even_synthetic_kaiming-normal_sgd_s{seed}"
    for s in ("residual", "plain")
    for seed in (0, 1)
]
RUNS = BASE + [f"{r}_sign-flip" for r in BASE]


def snakemake(workdir: Path, config: Path, *args: str, env: dict | None = None):
    cmd = [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--directory", str(workdir)]
    cmd += ["--configfile", str(config), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)


def job_counts(out: str) -> dict[str, int]:
    """The 'Job stats' table of a dry run, as {rule: count}."""
    if "Nothing to be done" in out:
        return {}
    table = out.split("Job stats:", 1)[1]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)} | {}


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    work = tmp_path_factory.mktemp("tiny")
    cfg = write_config(work / "tiny.yaml", TINY)
    r = snakemake(work, cfg, "--cores", "2")
    assert r.returncode == 0, r.stderr[-4000:]
    return work, cfg


def test_dry_run_lists_the_grid(tmp_path):
    cfg = write_config(tmp_path / "tiny.yaml", TINY)
    r = snakemake(tmp_path, cfg, "-n")
    assert r.returncode == 0, r.stderr
    counts = job_counts(r.stdout + r.stderr)
    assert counts["train"] == 8 and counts["distances"] == 8 and counts["aggregate"] == 1
    assert counts["features"] == 8 and counts["perturbation"] == 4
    assert counts["prepare_dataset"] == 1 and counts["plot_distances"] == 1
    assert counts["findings"] == 1
    # 2 seed pairs (residual, plain) and 4 branches against their sources
    assert counts["interpolate"] == 6 and counts["plot_barriers"] == 1
    # analyses of the 4 runs (not branches): curvature of seed 0 only
    assert counts["curvature"] == 2 and counts["spectra"] == 4 and counts["layer_grams"] == 4
    assert counts["layer_similarity"] == 1 and counts["plot_analysis"] == 4


def test_run_outputs(tiny):
    work, _ = tiny
    study = work / "results" / "tiny"
    for run_id in RUNS:
        info = json.loads((study / "runs" / run_id / "run.json").read_text())
        assert info["run_id"] == run_id and info["status"] == "completed"
        branch = run_id.endswith("_sign-flip")  # a branch trains with seed + 1000
        assert info["hparams"]["seed"] == int(run_id.split("_")[4][1:]) + 1000 * branch
        assert info["hparams"]["model_settings"] == {"width": 4}
        ckpts = sorted((study / "runs" / run_id / "checkpoints").glob("step*.safetensors"))
        # 512 images / 128 = 4 steps per epoch: steps 0, 3, 4, 6, 8
        assert [p.name for p in ckpts] == [f"step{s:08d}.safetensors" for s in (0, 3, 4, 6, 8)]
        assert info["checkpoints"] == [p.name for p in ckpts]
        with safe_open(str(ckpts[2]), framework="pt") as f:
            meta = f.metadata()
            keys = set(f.keys())
        assert (meta["epoch"], meta["step"], meta["epoch_end"]) == ("1", "4", "1")
        assert "layer1.0.bn1.running_var" in keys  # buffers are kept
        assert "layer1.0.bn1.running_var" not in json.loads(meta["parameters"])


def test_distances_schema(tiny):
    work, _ = tiny
    path = work / "results" / "tiny" / "distances.parquet"
    schema = pq.read_schema(path)
    types = {n: str(schema.field(n).type) for n in schema.names}
    expected = {
        "run_id": "large_string",
        "model": "large_string",
        "dataset": "large_string",
        "init": "large_string",
        "optimizer": "large_string",
        "seed": "int64",
        "epoch": "int64",
        "step": "int64",
        "reference": "large_string",
        "granularity": "large_string",
        "name": "large_string",
        "depth": "int64",
        "numel": "int64",
        "l1": "double",
        "l2": "double",
        "linf": "double",
        "mean_abs": "double",
        "rel_l2": "double",
        "cosine": "double",
        "frac_changed": "double",
        "minkowski_p3": "double",
    }
    for col, t in expected.items():
        assert types.get(col, "").replace("large_", "") == t.replace("large_", ""), col
    meta = json.loads(schema.metadata[b"paramdyn"])
    assert meta["atol"] == 1e-8 and meta["rtol"] == 1e-5 and meta["runs"] == 8
    df = pq.read_table(path).to_pandas()
    assert set(df.run_id) == set(RUNS)
    assert set(df.reference) == {"init", "previous"}
    assert set(df.granularity) == {"tensor", "layer", "block"}
    blocks = df[(df.granularity == "block") & (df.run_id == RUNS[0])]
    assert sorted(blocks.depth.unique()) == list(range(10))  # stem, 8 blocks, fc
    assert not df.name.str.contains("running_|num_batches").any()
    # DuckDB reads it as it is
    n = duckdb.sql(f"select count(*) from '{path}' where granularity = 'block'").fetchall()[0][0]
    assert n == len(df[df.granularity == "block"])


def test_history_schema(tiny):
    work, _ = tiny
    df = pq.read_table(work / "results" / "tiny" / "history.parquet").to_pandas()
    for col in ("run_id", "epoch", "step", "split", "loss", "accuracy", "lr", "seconds"):
        assert col in df.columns
    assert set(df.split) == {"train", "test"}
    assert sorted(df.epoch.unique()) == [0, 1, 2]
    assert len(df) == 8 * 3 * 2
    assert df.accuracy.between(0, 1).all()


def test_figures(tiny):
    import matplotlib.image as mpimg

    work, _ = tiny
    figures = work / "results" / "tiny" / "figures"
    names = [f"distance_vs_depth_{n}" for n in ("init", "previous", "init_raw", "previous_raw")]
    names += ["distance_vs_depth_average", "accuracy", "loss", "gradients_vs_depth", "cka"]
    names += ["feature_correlation", "perturbations", "frozen", "change"]
    names += ["barrier_path_error", "barrier_path_loss", "barrier_heights", "pair_distances"]
    names += ["sharpness_vs_step", "spectra_vs_depth", "layer_cka_pairs", "layer_cka_over_steps"]
    for name in names:
        png = figures / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        img = mpimg.imread(png)
        assert img.shape[0] > 200 and img.shape[1] > 300
        assert img.std() > 0.01  # not a blank canvas


def test_second_run_has_nothing_to_do(tiny):
    work, cfg = tiny
    r = snakemake(work, cfg, "-n")
    assert "Nothing to be done" in r.stdout + r.stderr, r.stdout


def test_changing_one_model_reruns_only_its_jobs(tiny):
    work, _ = tiny
    changed = json.loads(json.dumps(TINY))
    changed["studies"]["tiny"]["models"][1]["width"] = 6
    cfg = write_config(work / "changed.yaml", changed)
    r = snakemake(work, cfg, "-n")
    counts = job_counts(r.stdout + r.stderr)
    assert counts["train"] == 4 and counts["distances"] == 4, counts  # 2 runs, 2 branches
    assert "prepare_dataset" not in counts
    assert "resnet18-basic-residual-even_synthetic" not in r.stdout.split("Job stats")[0]


def test_editing_the_measures_module_reruns_measures_not_training(tiny, tmp_path):
    work, cfg = tiny
    shutil.copytree(REPO / "src" / "paramdyn", tmp_path / "paramdyn")
    env = os.environ | {"PYTHONPATH": str(tmp_path)}
    same = snakemake(work, cfg, "-n", env=env)
    assert "Nothing to be done" in same.stdout + same.stderr  # a copy alone changes nothing
    with open(tmp_path / "paramdyn" / "measures.py", "a") as f:
        f.write("\n# an edit\n")
    r = snakemake(work, cfg, "-n", env=env)
    counts = job_counts(r.stdout + r.stderr)
    assert counts.get("distances") == 8, counts
    assert "train" not in counts and "prepare_dataset" not in counts


def test_bad_config_stops_before_any_job(tmp_path):
    bad = json.loads(json.dumps(TINY))
    bad["studies"]["tiny"]["models"][0]["name"] = "resnet19"
    bad["studies"]["tiny"]["epochs"] = "two"
    cfg = write_config(tmp_path / "bad.yaml", bad)
    r = snakemake(tmp_path, cfg, "--cores", "1")
    assert r.returncode != 0
    assert "config key 'studies/tiny/epochs'" in r.stderr
    assert "'two' is not of type 'integer'" in r.stderr
    assert not (tmp_path / "results").exists()
    bad["studies"]["tiny"]["epochs"] = 2
    r = snakemake(tmp_path, write_config(cfg, bad), "--cores", "1")
    assert r.returncode != 0
    assert "unknown model 'resnet19'" in r.stderr and "resnet18-basic-plain" in r.stderr
    assert not (tmp_path / "results").exists()


def test_perturbations_and_similarity(tiny):
    work, _ = tiny
    study = work / "results" / "tiny"
    table = pq.read_table(study / "perturbations.parquet").to_pandas()
    blocks = table[table.granularity == "block"]
    p = table[table.granularity == "model"]
    assert sorted(p.run_id) == sorted(RUNS[4:])
    # per block: the sign flip moved each block by 2‖θ1_block‖; the blocks add up
    for run_id, b in blocks.groupby("run_id"):
        assert len(b) == 10
        whole = p[p.run_id == run_id].iloc[0]
        assert (b.dist_theta1_theta2**2).sum() == pytest.approx(whole.dist_theta1_theta2**2)
        assert b.numel.sum() == whole.numel
    assert (p.perturbation == "sign-flip").all()
    # the branch restarts from the source's final weights, negated: ‖θ_start − θ1‖ = 2‖θ1‖
    assert (p.dist_start_theta1 - 2 * p.norm_theta1).abs().max() < 1e-6 * p.norm_theta1.max()
    assert p.accuracy_before.between(0, 1).all() and p.accuracy_after.between(0, 1).all()
    s = pq.read_table(study / "similarity.parquet").to_pandas()
    assert {"run_a", "run_b", "measure", "value"} <= set(s.columns)
    assert {"cka_linear", "cka_linear_unbiased", "matched_correlation", "procrustes"} <= set(
        s.measure
    )
    assert set(s.kind) == {"within", "seeds", "perturbations"}
    cka = s[s.measure == "cka_linear"]
    assert cka.value.between(0, 1 + 1e-9).all()
    g = pq.read_table(study / "gradients.parquet").to_pandas()
    assert {"grad_l2", "grad_rms", "zero_frac", "nans", "infs"} <= set(g.columns)
    assert (g[g.granularity == "block"].groupby(["run_id", "step"]).depth.nunique() == 10).all()
    acc = (study / "accuracy.md").read_text()
    assert "sign-flip" in acc and "± " in acc


def test_report(tiny):
    work, cfg = tiny
    r = snakemake(work, cfg, "--report", str(work / "report.html"))
    assert r.returncode == 0, r.stderr[-3000:]
    html = (work / "report.html").read_text(errors="replace")
    for name in ("distance_vs_depth_init.png", "gradients_vs_depth.png", "cka.png"):
        assert name in html
    # the findings' category sorts first in the report's menu (a leading no-break space)
    assert "findings.md" in html and "\\u00a0Findings" in html


def test_findings(tiny):
    work, _ = tiny
    study = work / "results" / "tiny"
    f = pq.read_table(study / "findings.parquet").to_pandas()
    documented = "study claim statement group statistic n_seeds ci_low ci_high threshold verdict"
    documented = documented.split()
    assert list(f.columns[: len(documented)]) == documented
    claims = f[f.kind == "claim"]
    assert list(dict.fromkeys(claims.claim)) == ["gap", "trend", "flip", "flip-basin"]
    assert sorted(claims[claims.claim == "trend"].group) == ["shortcut=plain", "shortcut=residual"]
    assert (claims.n_seeds == 2).all() and claims.statistic.notna().all()
    assert (claims.verdict == "inconclusive").all()  # 2 seeds: too few for a verdict
    assert claims.ci_low.notna().all()  # but the interval is there
    flip = claims[claims.claim == "flip"].iloc[0]
    assert flip.statistic > 1  # θ2 is about −θ1 away: ‖θ1 − θ2‖ ≈ 2‖θ1‖
    basin = claims[claims.claim == "flip-basin"].iloc[0]
    assert basin.n_seeds == 2 and math.isfinite(basin.statistic)
    train = f[f.kind == "training"]
    assert len(train) == 2 and (train.verdict == "unchecked").all()  # no min_accuracy
    md = (study / "findings.md").read_text()
    assert "| gap | residual trains better |" in md and "## Training check" in md


def test_barriers_and_pair_distances(tiny):
    work, _ = tiny
    study = work / "results" / "tiny"
    b = pq.read_table(study / "barriers.parquet").to_pandas()
    assert set(b.kind) == {"seeds", "branches"} and b.pair.nunique() == 6
    assert set(b.alignment) == {"none", "weight_matching"} and set(b.split) == {"train", "test"}
    per_path = b.groupby(["pair", "alignment", "split"])
    assert (per_path.size() == 5).all()  # 5 points, alpha 0 to 1
    assert (per_path.alpha.min() == 0).all() and (per_path.alpha.max() == 1).all()
    # one barrier per path, repeated on its rows; the sign flip's branches keep their label
    assert (per_path.error_barrier.nunique() == 1).all()
    assert set(b[b.kind == "branches"].perturbation) == {"sign-flip"}
    assert b.loss.notna().all() and b.error.between(0, 1).all()
    d = pq.read_table(study / "pair_distances.parquet").to_pandas()
    sq = d[d.granularity == "tensor"].assign(sq=lambda x: x.l2**2)
    total = sq.groupby(["pair", "alignment"]).sq.sum().unstack()
    # weight matching only ever improves on the identity permutation
    assert (total["weight_matching"] <= total["none"] * (1 + 1e-6)).all()


def test_analyses_tables(tiny):
    work, _ = tiny
    study = work / "results" / "tiny"
    c = pq.read_table(study / "curvature.parquet").to_pandas()
    assert set(c.seed) == {0} and c.run_id.nunique() == 2 and (c.step == 8).all()
    model = c[c.scope == "model"]
    assert len(model) == 2 and (model.top_eigenvalue > 0).all()
    s = pq.read_table(study / "spectra.parquet").to_pandas()
    assert s.run_id.nunique() == 4 and set(s.step) == {0, 4, 8}  # every epoch's end
    assert (s.stable_rank >= 1 - 1e-9).all() and (s.stable_rank <= s[["rows", "cols"]].min(1)).all()
    lsim = pq.read_table(study / "layer_similarity.parquet").to_pandas()
    assert set(lsim.kind) == {"seeds", "shortcut", "over_checkpoints"}
    final = lsim[(lsim.kind == "over_checkpoints") & (lsim.step == 8)]
    assert np.allclose(final.cka, 1.0)  # each block against itself at the reference


def test_frozen_shares(tiny):
    work, _ = tiny
    f = pq.read_table(work / "results" / "tiny" / "frozen.parquet").to_pandas()
    model = f[f.granularity == "model"]
    assert sorted(model.run_id) == sorted(RUNS)
    for col in ("frac_changed_final", "frac_never_moved", "frac_never_reached", "change_rate"):
        assert model[col].between(0, 1).all(), col
    # SGD without weight decay: an entry no gradient ever reached never moved
    assert (model.never_moved >= model.never_reached).all()
    blocks = f[(f.granularity == "block") & (f.run_id == RUNS[0])]
    assert blocks.numel.sum() == model[model.run_id == RUNS[0]].numel.iloc[0]
