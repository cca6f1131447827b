"""Same basin or not: one pair of checkpoints, evaluated along the straight line between
them, before and after permutation alignment, and their distances.

A pair (``config.Study.interpolation_pairs``) names two runs and which end of each (its
``init`` or its ``final`` checkpoint). For each pair this module:

- evaluates the models θ(α) = (1−α)θa + αθb at the study's ``interpolation.points`` values
  of α on fixed subsets of the training and test splits (:mod:`paramdyn.interpolate`; the
  BatchNorm statistics are re-estimated at each α on a fixed training subset unless the
  study asks to keep them interpolated), and takes each path's loss and error barrier;
- with ``interpolation.align`` (the default), aligns θb to θa by weight matching first
  (:mod:`paramdyn.alignment`: the permutation structure comes from the model's own graph)
  and evaluates that path too: column ``alignment`` is ``none`` or ``weight_matching``;
- measures the distance between the two ends, aligned and not, with the measures of
  ``distances.parquet`` (:func:`paramdyn.measures.compare`, tensor/layer/block rows).

The subsets are drawn once per pair from ``interpolation.subset_seed`` (the same images
for every α, every pair and both alignments): ``bn_size`` training images for the
BatchNorm statistics, ``eval_size`` images of each split for the evaluation.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from . import alignment, interpolate, paths, tables
from .checkpoints import Checkpoint, read_checkpoint
from .loaders import run_model_and_data
from .measures import compare
from .runs import FinishedRun

log = logging.getLogger("paramdyn.basins")

ALIGNMENTS = ("none", "weight_matching")
SPLITS = ("train", "test")
# the pair's columns in barriers.parquet and pair_distances.parquet, before the grid's
PAIR_COLUMNS = ("pair", "kind", "run_a", "end_a", "run_b", "end_b")
# the grid coordinates of a pair: run_a's, and run_b's branch (its label, size and step)
GRID_COLUMNS = ("model", "model_name", "shortcut", "dataset", "init", "optimizer", "seed")


def _end(run: FinishedRun, end: str) -> Path:
    return {"init": run.first_checkpoint, "final": run.final_checkpoint}[end]


def branch_value(options: dict[str, Any] | None) -> float:
    """The numeric size of a branch's perturbation (ε, scale), NaN when it has none."""
    numbers = [
        v
        for k, v in (options or {}).items()
        if k != "name" and isinstance(v, int | float) and not isinstance(v, bool)
    ]
    return float(numbers[0]) if len(numbers) == 1 else math.nan


def _base(run: FinishedRun) -> FinishedRun:
    """The run a branch comes from (a run is its own): its grid coordinates and seed are the
    pair's, so an instability pair (two branches) counts as its source's seed."""
    if not run.spec.perturbation:
        return run
    study, run_id = paths.source_run(run.spec.init_source)
    return FinishedRun.read(run.dir.parents[2] / study / "runs" / run_id)


def pair_columns(pair: dict[str, Any], a: FinishedRun, b: FinishedRun) -> dict[str, Any]:
    """The columns identifying a pair: its id and ends, the grid coordinates of run_a (of its
    source, when run_a is a branch), and run_b's branch (perturbation label, size, branching
    step; '' / NaN / -1 for a run)."""
    step = b.spec.branch_step
    return {
        **{c: pair[c] for c in PAIR_COLUMNS},
        **_base(a).coordinates(GRID_COLUMNS),
        "perturbation": b.spec.perturbation,
        "perturbation_value": branch_value(b.spec.perturbation_options),
        "branch_step": -1 if step is None else int(step),
        "status": "diverged" if "diverged" in (a.status, b.status) else "completed",
    }


def _finite(state: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in state.values() if t.is_floating_point())


def _ends(a: Checkpoint, b: Checkpoint, model, example, align: bool) -> dict[str, dict]:
    """θb as stored, and aligned to θa by weight matching (when asked and both are finite)."""
    out = {"none": b.tensors}
    if align and _finite(a.tensors) and _finite(b.tensors):
        spec = alignment.permutation_spec(model, example)
        perms = alignment.weight_matching(spec, a.tensors, b.tensors)
        out["weight_matching"] = alignment.apply_permutation(spec, perms, b.tensors)
    return out


def _distances(a: Checkpoint, ends: dict[str, dict], measures: dict[str, Any]) -> pd.DataFrame:
    frames = []
    for name, state in ends.items():
        b = Checkpoint(a.path, 1, 1, True, a.run_id, a.parameters, a.blocks, state)
        df = compare(
            [a, b],
            atol=measures.get("atol", 1e-8),
            rtol=measures.get("rtol", 1e-5),
            minkowski_p=measures.get("minkowski_p", []),
            exclude=measures.get("exclude", []),
        )
        df = df[df["reference"] == "init"].drop(
            columns=["epoch", "step", "epoch_end", "reference", "ref_epoch", "ref_step"]
        )
        df.insert(0, "alignment", name)
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def pair_analysis(
    pair: dict[str, Any],
    dir_a: Path | str,
    dir_b: Path | str,
    dataset_path: Path | str,
    settings: dict[str, Any],
    out_path: Path | str,
    out_distances: Path | str,
    device: str = "auto",
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Write a pair's path table (alignment, alpha, split, loss, error, and the path's
    barriers) and its distance table; ``settings`` is the study's ``interpolation``."""
    a_run, b_run = FinishedRun.read(dir_a), FinishedRun.read(dir_b)
    spec = a_run.spec
    model, data = run_model_and_data(spec, dataset_path, device)
    bn, splits = interpolate.path_subsets(
        data,
        bn_size=settings["bn_size"],
        eval_size=settings["eval_size"],
        bn_batch_size=spec.batch_size,
        eval_batch_size=spec.eval_batch_size,
        seed=settings["subset_seed"],
    )
    a = read_checkpoint(_end(a_run, pair["end_a"]))
    b = read_checkpoint(_end(b_run, pair["end_b"]))
    ends = _ends(a, b, model, bn[0][0][:2], settings["align"])
    alphas = interpolate.alphas(settings["points"])
    paths = []
    for name, state in ends.items():
        df = interpolate.evaluate_path(
            model, a.tensors, state, alphas, bn_batches=bn, splits=splits, bn=settings["bn"]
        )
        df.insert(0, "alignment", name)
        paths.append(df)
    path = pd.concat(paths, ignore_index=True)
    path = path.merge(interpolate.barriers(path), on=["alignment", "split"], how="left")
    info = pair_columns(pair, a_run, b_run)
    for i, (c, v) in enumerate(info.items()):
        path.insert(i, c, v)
    dist = _distances(a, ends, spec.measures)
    for i, (c, v) in enumerate(info.items()):
        dist.insert(i, c, v)
    meta = {"pair": pair["pair"], **{k: settings[k] for k in ("points", "bn", "bn_size")}}
    tables.write_parquet(path, out_path, {**meta, "eval_size": settings["eval_size"]})
    tables.write_parquet(dist, out_distances, {"pair": pair["pair"], "measures": spec.measures})
    log.info("pair %s: %d path rows, %d distance rows", pair["pair"], len(path), len(dist))
    return path, dist
