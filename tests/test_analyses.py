"""The offline analyses' registry (paramdyn.analyses): checkpoint selection, config checks,
and the per-run jobs on a tiny trained run against direct calls of the library functions."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from paramdyn import analyses, jobs, spectra
from paramdyn.checkpoints import load_into
from paramdyn.config import DEFAULT_SCHEMA, ConfigError, load_studies
from paramdyn.curvature import checkpoint_curvature, subset_batches
from paramdyn.data import DeviceData
from paramdyn.models import build_model
from paramdyn.runs import FinishedRun
from paramdyn.tables import read_parquet
from paramdyn.train import train_run

torch.set_num_threads(1)

# synthetic: 512 training images, 8 steps per epoch at batch 64; checkpoints every 4 steps
STUDY = {
    "models": ["lenet5"],
    "datasets": ["synthetic"],
    "inits": ["default"],
    "optimizers": [{"name": "sgd", "lr": 0.05}],
    "seeds": [0, 1],
    "epochs": 2,
    "batch_size": 64,
    "checkpoint": {"every_epochs": 1, "every_steps": 4},
}


def _study(**changes):
    return load_studies({"studies": {"a": copy.deepcopy({**STUDY, **changes})}}, DEFAULT_SCHEMA)[
        "a"
    ]


# --- checkpoint selection -------------------------------------------------------------------


@pytest.mark.parametrize("most", [2, 3, 4, 5, 7])
def test_log_steps_keep_0_and_final_within_max(most):
    steps = list(range(0, 1001, 8)) + [1003]
    chosen = analyses.select_steps(steps, "log_steps", 100, most)
    assert chosen[0] == 0 and chosen[-1] == 1003
    assert len(chosen) == most and chosen == sorted(set(chosen))
    assert set(chosen) <= set(steps)
    if most >= 4:  # log-spaced: the early steps are denser than the late ones
        gaps = np.diff(chosen[:-1])
        assert gaps[0] < gaps[-1]


def test_every_epoch_picks_epoch_ends_and_final():
    steps = [0, 4, 8, 12, 16, 20, 21]  # 8 steps per epoch; a diverged run stopped at 21
    assert analyses.select_steps(steps, "every_epoch", 8) == [0, 8, 16, 21]
    assert analyses.select_steps(steps, "final", 8) == [21]
    # mid-epoch checkpoints dropped (keep_steps: false): only epoch ends are candidates
    assert analyses.select_steps(steps, "log_steps", 8, 10, epoch_ends_only=True) == [0, 8, 16, 21]
    assert analyses.select_steps(steps, "every_epoch", 8, 2) == [0, 21]


def test_selection_errors_name_the_choices():
    with pytest.raises(ValueError, match="choose one of"):
        analyses.select_steps([0, 8], "sometimes", 8)


# --- config ---------------------------------------------------------------------------------


def test_analyses_are_off_by_default_and_not_in_run_specs():
    plain = _study()
    assert analyses.enabled(plain.analyses) == []
    on = _study(analyses={"spectra": {"enabled": True}, "curvature": {"enabled": True}})
    assert analyses.enabled(on.analyses) == ["curvature", "spectra"]
    assert {r: s.to_json() for r, s in on.runs.items()} == {
        r: s.to_json() for r, s in plain.runs.items()
    }
    assert on.analyses["curvature"]["subset"] == analyses.ANALYSES["curvature"].defaults["subset"]


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"curvature": {"enabled": True, "max_checkpoints": 1}}, "no room for step 0"),
        ({"spectra": {"enabled": True, "where": {"depth": 3}}}, "unknown columns"),
        ({"spectra": {"enabled": True, "where": {"seed": 7}}}, "matches none"),
        ({"spectra": {"enabled": True, "checkpoints": "often"}}, "analyses/spectra/checkpoints"),
        ({"layer_similarity": {"pairs": ["optimizers"]}}, "pairs"),
        ({"curvature": {"subset": 0}}, "subset"),
        ({"hessian": {"enabled": True}}, "Allowed keys here: curvature, layer_similarity"),
    ],
)
def test_config_errors(settings, message):
    with pytest.raises(ConfigError, match=message):
        _study(analyses=settings)


def test_pairs_of_seeds_and_shortcuts():
    study = _study(
        models=["resnet18-basic-residual-even", "resnet18-basic-plain-even"], seeds=[0, 1]
    )
    pairs = analyses.layer_pairs(study.runs, ["seeds", "shortcut"])
    kinds = pd.Series([k for _, _, k in pairs]).value_counts().to_dict()
    assert kinds == {"seeds": 2, "shortcut": 2}
    for a, b, kind in pairs:
        sa, sb = study.runs[a], study.runs[b]
        if kind == "shortcut":
            assert (sa.shortcut, sb.shortcut, sa.seed) == ("plain", "residual", sb.seed)
        else:
            assert sa.model == sb.model and sa.seed != sb.seed
    assert analyses.analysed_runs(study.runs, {"seed": 0}) == [
        r for r, s in study.runs.items() if s.seed == 0
    ]


# --- the per-run jobs on a trained run ------------------------------------------------------


@pytest.fixture(scope="module")
def trained(synthetic, tmp_path_factory):
    study = _study()
    root = tmp_path_factory.mktemp("runs")
    for run_id, spec in study.runs.items():
        train_run(spec, synthetic, root / run_id, device="cpu")
    return study, root


class _Files(list):
    """Snakemake's named lists: a list with attributes."""

    def __init__(self, **named):
        super().__init__(named.values())
        self.__dict__.update(named)


def _smk(rule, run_dir, dataset, tmp, options, outputs):
    return SimpleNamespace(
        rule=rule,
        input=_Files(run_json=str(run_dir / "run.json"), dataset=str(dataset)),
        output=_Files(**{k: str(tmp / v) for k, v in outputs.items()}),
        params=SimpleNamespace(options=options, keep_steps=True),
        log=[str(tmp / f"{rule}.log")],
        wildcards=SimpleNamespace(run_id=run_dir.name),
    )


def test_curvature_job_equals_the_library(trained, synthetic, tmp_path):
    study, root = trained
    run_id = next(iter(study.runs))
    options = {"enabled": True, "checkpoints": "log_steps", "max_checkpoints": 3, "subset": 64,
               "samples": 4, "max_iter": 30}  # fmt: skip
    jobs.analysis(
        _smk("curvature", root / run_id, synthetic, tmp_path, options, {"o": "c.parquet"})
    )
    df = read_parquet(tmp_path / "c.parquet")
    run = FinishedRun.read(root / run_id)
    assert sorted(df["step"].unique()) == [0, 4, 16]  # log1p midpoint 3.1: step 4
    assert set(df["run_id"]) == {run_id} and (df["lr"] == 0.05).all()
    spec = run.spec
    model = build_model(spec.model_name, spec.dataset, spec.model_settings, spec.inputs)
    data = DeviceData.load(synthetic, "cpu", normalize=spec.normalize, augment=False)
    load_into(model, run.checkpoint_at(4))
    full = {**analyses.ANALYSES["curvature"].defaults, **options}
    batches = subset_batches(data, 64, full["batch_size"], seed=0)
    direct = pd.DataFrame(
        checkpoint_curvature(model, batches, tol=full["tol"], max_iter=30, samples=4, seed=0)
    )
    got = df[df["step"] == 4].reset_index(drop=True)
    assert list(got["scope"]) == list(direct["scope"])
    np.testing.assert_allclose(got["top_eigenvalue"], direct["top_eigenvalue"], rtol=1e-6)
    np.testing.assert_allclose(got["trace"], direct["trace"], rtol=1e-6)


def test_curvature_without_block_eigenvalues_keeps_the_model_row(trained, synthetic, tmp_path):
    study, root = trained
    run = FinishedRun.read(root / next(iter(study.runs)))
    options = {**analyses.ANALYSES["curvature"].defaults, "checkpoints": "final", "subset": 64,
               "samples": 4, "max_iter": 30}  # fmt: skip
    full = analyses.run_curvature(run, synthetic, options, tmp_path / "a.parquet")
    fast = analyses.run_curvature(
        run, synthetic, {**options, "block_eigenvalues": False}, tmp_path / "b.parquet"
    )
    model_rows = [d[d["scope"] == "model"].iloc[0] for d in (full, fast)]
    assert math.isclose(model_rows[0]["top_eigenvalue"], model_rows[1]["top_eigenvalue"])
    np.testing.assert_allclose(full["trace"], fast["trace"])  # the same probes
    assert fast.loc[fast["scope"] != "model", "top_eigenvalue"].isna().all()


def test_spectra_job_equals_the_library(trained, synthetic, tmp_path):
    study, root = trained
    run_id = next(iter(study.runs))
    options = {"enabled": True, "checkpoints": "every_epoch"}
    jobs.analysis(_smk("spectra", root / run_id, synthetic, tmp_path, options, {"o": "s.parquet"}))
    df = read_parquet(tmp_path / "s.parquet")
    assert sorted(df["step"].unique()) == [0, 8, 16]
    run = FinishedRun.read(root / run_id)
    direct = spectra.checkpoint_spectra(run.checkpoint_at(16))
    got = df[df["step"] == 16].reset_index(drop=True)
    for c in ("spectral_norm", "stable_rank", "effective_rank", "alpha"):
        np.testing.assert_allclose(got[c], direct[c], rtol=1e-12, equal_nan=True)


def test_layer_similarity_of_a_run_with_itself_has_a_unit_diagonal(trained, synthetic, tmp_path):
    study, root = trained
    options = {"enabled": True, "checkpoints": "every_epoch", "probe_size": 64}
    grams, tables = {}, []
    for run_id in study.runs:
        out = {"grams": f"{run_id}.safetensors", "table": f"{run_id}.parquet"}
        jobs.analysis(_smk("layer_grams", root / run_id, synthetic, tmp_path, options, out))
        grams[run_id] = tmp_path / out["grams"]
        tables.append(tmp_path / out["table"])
    a, b = list(study.runs)
    pairs = [(a, a, "self"), (a, b, "seeds")]
    df = analyses.study_layer_similarity(grams, tables, pairs, tmp_path / "ls.parquet")
    own = df[df["kind"] == "self"]
    diag = own[own["block_a"] == own["block_b"]]
    assert len(diag) == own["block_a"].nunique() > 1
    np.testing.assert_allclose(diag["cka"], 1.0, rtol=1e-12)
    over = df[df["kind"] == "over_checkpoints"]
    assert sorted(over["step"].unique()) == [0, 8, 16]
    np.testing.assert_allclose(over.loc[over["step"] == 16, "cka"], 1.0, rtol=1e-12)
    seeds = df[df["kind"] == "seeds"]
    assert len(seeds) == len(own) and (seeds["cka"] < 1 - 1e-6).any()  # two seeds differ
