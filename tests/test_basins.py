"""The pair job of the same-basin analysis (paramdyn.basins.pair_analysis) on real trained
runs: a network against a randomly permuted copy of itself, and against itself."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from paramdyn import alignment, paths
from paramdyn.basins import pair_analysis
from paramdyn.checkpoints import FORMAT, read_checkpoint, write_safetensors
from paramdyn.config import load_studies
from paramdyn.models import build_model
from paramdyn.runs import FinishedRun
from paramdyn.train import train_run

SETTINGS = {
    "points": 5,
    "bn": "reestimate",
    "bn_size": 64,
    "eval_size": 64,
    "subset_seed": 0,
    "align": True,
}


@pytest.fixture(scope="module")
def runs(synthetic, tmp_path_factory):
    """A trained BatchNorm ResNet (run a) and a copy whose every unit group is shuffled
    (run b: the same function, other weights)."""
    torch.set_num_threads(1)
    config = {
        "run": ["s"],
        "studies": {
            "s": {
                "models": [{"name": "resnet18-cifar", "width": 4}],
                "datasets": ["synthetic"],
                "inits": ["kaiming-normal"],
                "optimizers": [{"name": "sgd", "lr": 0.05, "momentum": 0.9}],
                "seeds": [0],
                "epochs": 2,
                "batch_size": 64,
            }
        },
    }
    spec = next(iter(load_studies(config)["s"].runs.values()))
    root = tmp_path_factory.mktemp("basins")
    a_dir = root / paths.run_dir("s", spec.run_id)
    train_run(spec, synthetic, a_dir, device="cpu")
    a = FinishedRun.read(a_dir)
    b_dir = a_dir.parent / "permuted"
    shutil.copytree(a_dir, b_dir)
    info = json.loads((b_dir / paths.RUN_JSON).read_text())
    (b_dir / paths.RUN_JSON).write_text(json.dumps({**info, "run_id": "permuted"}))
    final = read_checkpoint(a.final_checkpoint)
    model = build_model(spec.model_name, spec.dataset, spec.model_settings)
    pspec = alignment.permutation_spec(model, torch.zeros(2, 1, 12, 12))
    permuted = alignment.apply_permutation(
        pspec, alignment.random_permutation(pspec, 7), final.tensors
    )
    target = b_dir / paths.CHECKPOINTS / a.final_checkpoint.name
    target.unlink()  # a hard link of run a's file: write a new one
    meta = {
        "format": FORMAT,
        "epoch": str(final.epoch),
        "step": str(final.step),
        "epoch_end": "1",
        "run_id": "permuted",
        "parameters": json.dumps(final.parameters),
        "blocks": json.dumps(final.blocks),
    }
    write_safetensors(permuted, target, meta)
    return a_dir, b_dir, synthetic, root


def _pair(run_a: str, run_b: str) -> dict:
    return {
        "pair": "p",
        "kind": "seeds",
        "run_a": run_a,
        "end_a": "final",
        "run_b": run_b,
        "end_b": "final",
    }


def _model_distance(dist, alignment_name: str) -> float:
    t = dist[(dist.granularity == "tensor") & (dist.alignment == alignment_name)]
    return float(np.sqrt((t.l2**2).sum()) / np.sqrt((t.ref_norm**2).sum()))


def test_a_permuted_copy_is_one_basin_after_alignment(runs, tmp_path):
    a_dir, b_dir, dataset, _ = runs
    path, dist = pair_analysis(
        _pair(a_dir.name, "permuted"),
        a_dir,
        b_dir,
        dataset,
        SETTINGS,
        tmp_path / "path.parquet",
        tmp_path / "distances.parquet",
        device="cpu",
    )
    assert _model_distance(dist, "none") > 0.3  # far apart in weight space
    assert _model_distance(dist, "weight_matching") < 1e-6  # the same weights once aligned
    aligned = path[path.alignment == "weight_matching"]
    assert (aligned.loss_barrier.abs() < 1e-6).all() and (aligned.error_barrier == 0).all()
    # both ends compute one function: the unaligned path's ends agree, its middle does not
    plain = path[path.alignment == "none"]
    for _, g in plain.groupby("split"):
        ends = g.set_index("alpha").loss
        assert ends[0.0] == pytest.approx(ends[1.0], rel=1e-5)
    assert plain.loss_barrier.max() > 1e-3
    # the pair's columns: its id and ends, run a's grid coordinates, no branch
    row = path.iloc[0]
    assert (row.pair, row.kind, row.model_name, row.seed, row.perturbation) == (
        "p",
        "seeds",
        "resnet18-cifar",
        0,
        "",
    )
    assert row.branch_step == -1 and np.isnan(row.perturbation_value)


def test_a_network_with_itself_has_no_barrier(runs, tmp_path):
    a_dir, _, dataset, _ = runs
    path, dist = pair_analysis(
        _pair(a_dir.name, a_dir.name),
        a_dir,
        a_dir,
        dataset,
        SETTINGS,
        tmp_path / "path.parquet",
        tmp_path / "distances.parquet",
        device="cpu",
    )
    assert (path.loss_barrier == 0).all() and (path.error_barrier == 0).all()
    assert (dist.l2 == 0).all()
    for _, g in path.groupby(["alignment", "split"]):
        assert g.loss.nunique() == 1  # every point is the same network
