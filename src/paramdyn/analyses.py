"""Offline analyses: measures of a run's checkpoints that need the model and data, not only
the weights (issue 15), run after training as rules of the DAG, at no cost to training.

A registry (:data:`ANALYSES`): name -> :class:`Analysis` (the per-run function, its options
with defaults, the per-run files it writes and the study table they aggregate into). A study
turns each on under ``analyses:`` in config.yaml (schemas/config.schema.yaml fills the
defaults in; :func:`config._resolve_study` checks the options). Analyses are not
hyper-parameters of a run: they never enter its RunSpec, so enabling one reruns no training.

- ``curvature`` (:mod:`paramdyn.curvature`): per selected checkpoint, on a fixed training
  subset (``subset`` images, ``subset_seed``), the top Hessian eigenvalue (Lanczos on
  HVPs, ``tol``, ``max_iter``) of the whole model and, with ``block_eigenvalues``, of each
  block's parameters, and Hutchinson traces per block (``samples`` probes). Per run:
  ``curvature.parquet``; column ``lr`` is the run's optimizer lr (the 2/lr line).
- ``spectra`` (:mod:`paramdyn.spectra`): per layer and selected checkpoint: norms, stable and
  effective rank, power-law alpha with its fit quality. Per run: ``spectra.parquet``.
- ``layer_similarity`` (:mod:`paramdyn.layer_similarity`): each block's representation of a
  probe set of ``probe_size`` test images (conv maps reduced by ``reduction``), at each
  selected checkpoint. Per run: ``grams.safetensors`` (the final checkpoint's Grams, for the
  cross-run matrices) and ``layer_cka.parquet`` (each block at each checkpoint against
  itself at the final one: kind ``over_checkpoints``). Per study, rule layer_similarity adds
  the layer-by-layer matrices of the ``pairs`` (:func:`layer_pairs`): ``seeds`` (two runs
  differing only in their seed) and ``shortcut`` (plain against residual, same everything
  else). Block site: a block's *output*, except for ``models.ConvStack`` (deepnet-*, cnn5-*)
  whose block module returns only its residual branch f(x): there the representation is the
  *input* of each block (``site="input"``, what the previous block handed on), so its row
  ``i`` is the representation after block ``i - 1`` (row 0: the stem's input, the image).

Checkpoint selection (:data:`SELECTIONS`, option ``checkpoints``), among the run's saved
steps (a study with ``checkpoint.keep_steps: false`` loses its mid-epoch checkpoints once
measured, so only epoch ends are candidates there):

- ``final``: the last checkpoint;
- ``every_epoch``: every epoch end (steps that are multiples of the steps per epoch: 0
  included) and the final one;
- ``log_steps``: ``max_checkpoints`` steps log-spaced over the saved steps (the saved step
  nearest in log(1 + step) to each of ``max_checkpoints`` evenly spaced targets), always
  with step 0 and the final step.

``max_checkpoints`` caps every selection (thinned log-spaced, 0 and final kept). Branches
(perturbation runs) are not analysed: the analyses follow the grid's own runs.

Torch-free at import (the rules read the registry); the per-run functions import torch and
the measure modules when called.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

log = logging.getLogger("paramdyn.analyses")


# --- checkpoint selection -------------------------------------------------------------------


def _log_spaced(steps: Sequence[int], count: int) -> list[int]:
    """Up to ``count`` of the sorted ``steps``: the first, the last, and those nearest in
    log(1 + step) to evenly spaced targets between them."""
    steps = sorted(set(int(s) for s in steps))
    if count >= len(steps):
        return steps
    if count <= 1:
        return [steps[-1]]
    logs = np.log1p(np.asarray(steps, dtype=np.float64))
    targets = np.linspace(logs[0], logs[-1], count)
    picked = {steps[0], steps[-1]}
    for t in targets[1:-1]:
        free = [i for i, s in enumerate(steps) if s not in picked]
        if not free:
            break
        picked.add(steps[min(free, key=lambda i: abs(logs[i] - t))])
    return sorted(picked)


def _every_epoch(steps: Sequence[int], steps_per_epoch: int) -> list[int]:
    ends = [s for s in steps if s % steps_per_epoch == 0]
    return sorted(set(ends) | {max(steps)})


SELECTIONS: dict[str, Callable[[Sequence[int], int, int | None], list[int]]] = {
    "final": lambda steps, per_epoch, most: [max(steps)],
    "every_epoch": lambda steps, per_epoch, most: _every_epoch(steps, per_epoch),
    "log_steps": lambda steps, per_epoch, most: _log_spaced(steps, most or len(steps)),
}


def select_steps(
    steps: Sequence[int],
    how: str,
    steps_per_epoch: int,
    max_checkpoints: int | None = None,
    *,
    epoch_ends_only: bool = False,
) -> list[int]:
    """The steps of ``steps`` (a run's saved checkpoints) an analysis reads: ``how`` of
    :data:`SELECTIONS`, at most ``max_checkpoints`` (thinned log-spaced, 0 and final kept);
    ``epoch_ends_only``: candidates are epoch ends (and the final step) only."""
    if how not in SELECTIONS:
        raise ValueError(
            f"unknown checkpoint selection {how!r}; choose one of {sorted(SELECTIONS)}"
        )
    if not steps:
        raise ValueError("select_steps: the run saved no checkpoints")
    if max_checkpoints is not None and max_checkpoints < 1:
        raise ValueError(f"max_checkpoints must be at least 1, got {max_checkpoints}")
    steps = sorted(set(int(s) for s in steps))
    if epoch_ends_only:
        steps = _every_epoch(steps, steps_per_epoch)
    chosen = SELECTIONS[how](steps, steps_per_epoch, max_checkpoints)
    if max_checkpoints is not None and len(chosen) > max_checkpoints:
        chosen = _log_spaced(chosen, max_checkpoints)
    return chosen


def run_checkpoints(run, options: Mapping[str, Any], keep_steps: bool = True) -> dict[int, Path]:
    """{step: checkpoint path} of a ``runs.FinishedRun`` that an analysis with ``options``
    reads (``checkpoints``, ``max_checkpoints``)."""
    steps = select_steps(
        list(run.checkpoint_steps),
        options["checkpoints"],
        run.spec.steps_per_epoch,
        options.get("max_checkpoints"),
        epoch_ends_only=not keep_steps,
    )
    return {s: run.checkpoint_at(s) for s in steps}


# --- pairs of runs for the layer-by-layer matrices -------------------------------------------


def _key(spec, drop: Sequence[str]) -> str:
    d = spec.to_dict()
    for f in ("run_id", *drop):
        d.pop(f, None)
    return json.dumps(d, sort_keys=True, default=str)


PAIR_KEYS: dict[str, Callable[[Any], str]] = {
    # two runs differing only in their seed (and so their data order)
    "seeds": lambda s: _key(s, ("seed", "data_seed")),
    # the same setting without and with shortcuts: model names equal but for the shortcut
    "shortcut": lambda s: (
        _key(s, ("model", "model_name", "shortcut")) + s.model_name.replace(s.shortcut, "")
    ),
}
PAIR_DIFFER: dict[str, Callable[[Any], Any]] = {
    "seeds": lambda s: s.seed,
    "shortcut": lambda s: s.shortcut,
}


def layer_pairs(runs: Mapping[str, Any], kinds: Sequence[str]) -> list[tuple[str, str, str]]:
    """(run_a, run_b, kind) for each pair of the study's runs (RunSpecs, branches left out)
    of each kind in ``kinds`` (:data:`PAIR_KEYS`); ``shortcut`` pairs are (plain, residual)."""
    unknown = sorted(set(kinds) - set(PAIR_KEYS))
    if unknown:
        raise ValueError(
            f"unknown layer_similarity pairs {unknown}; choose from {sorted(PAIR_KEYS)}"
        )
    base = [s for s in runs.values() if not s.perturbation]
    pairs = []
    for kind in kinds:
        groups: dict[str, list] = {}
        for spec in base:
            groups.setdefault(PAIR_KEYS[kind](spec), []).append(spec)
        for members in groups.values():
            if kind == "shortcut":
                members = sorted(members, key=lambda s: s.shortcut != "plain")
            for i, a in enumerate(members):
                for b in members[i + 1 :]:
                    if PAIR_DIFFER[kind](a) != PAIR_DIFFER[kind](b):
                        pairs.append((a.run_id, b.run_id, kind))
    return pairs


def matches(spec, where: Mapping[str, Any] | None) -> bool:
    """Whether a RunSpec's grid coordinates match ``where`` ({column: value or [values]},
    compared as strings, so ``seed: 0`` matches seed 0)."""
    return all(
        str(getattr(spec, k)) in {str(x) for x in (v if isinstance(v, list) else [v])}
        for k, v in (where or {}).items()
    )


def analysed_runs(runs: Mapping[str, Any], where: Mapping[str, Any] | None = None) -> list[str]:
    """The run ids an analysis reads: the grid's runs (branches left out) matching ``where``
    ({grid column: value or [values]}, as interpolation's; {} or None = all)."""
    return [r for r, s in runs.items() if not s.perturbation and matches(s, where)]


# --- the per-run functions ---------------------------------------------------------------------


def _write(df: pd.DataFrame, run, out: Path | str, meta: Mapping[str, Any]) -> pd.DataFrame:
    from .tables import insert_run_columns, write_parquet

    insert_run_columns(df, run.run_id, run.spec, run.status)
    write_parquet(df, out, {"run_id": run.run_id, **meta})
    return df


def _step_columns(df: pd.DataFrame, ck) -> None:
    df.insert(0, "step", int(ck.step))
    df.insert(0, "epoch", int(ck.epoch))
    df["epoch_end"] = bool(ck.epoch_end)


def curvature_rows(model, batches, options: Mapping[str, Any]) -> list[dict]:
    """:func:`curvature.checkpoint_curvature` with the analysis' options; without
    ``block_eigenvalues`` only the whole model's top eigenvalue is computed (blocks keep
    their traces, top_eigenvalue NaN): one Lanczos run instead of one per block."""
    from . import curvature

    kw = {k: options[k] for k in ("tol", "max_iter", "samples")}
    kw["seed"] = options["subset_seed"]
    if options["block_eigenvalues"]:
        return curvature.checkpoint_curvature(model, batches, **kw)
    blocks = list(model.block_names())
    groups = curvature.block_parameters(model, blocks)
    scopes = {"model": curvature.parameter_names(model), **groups}
    traces = curvature.block_traces(model, batches, scopes, samples=kw["samples"], seed=kw["seed"])
    eig = curvature.top_eigenvalue(
        model, batches, tol=kw["tol"], max_iter=kw["max_iter"], seed=kw["seed"]
    )
    none = {"value": math.nan, "iterations": 0, "hvps": 0, "residual": math.nan,
            "converged": False}  # fmt: skip
    sizes = {k: p.numel() for k, p in model.named_parameters()}
    rows = []
    for scope, keys in scopes.items():
        e = eig if scope == "model" else none
        rows.append({
            "scope": scope, "depth": None if scope == "model" else blocks.index(scope),
            "top_eigenvalue": e["value"], "iterations": e["iterations"], "hvps": e["hvps"],
            "residual": e["residual"], "converged": e["converged"],
            "trace": traces[scope]["value"], "trace_stderr": traces[scope]["stderr"],
            "n_params": sum(sizes[k] for k in keys),
        })  # fmt: skip
    return rows


def run_curvature(run, dataset_path, options, out, *, keep_steps=True, device="cpu"):
    """curvature.parquet of a run: one row per (checkpoint, scope) of :func:`curvature_rows`,
    with its step, epoch and the run's optimizer lr (column ``lr``; NaN without one)."""
    from .checkpoints import load_into
    from .curvature import subset_batches
    from .loaders import run_model_and_data

    model, data = run_model_and_data(run.spec, dataset_path, device)
    batches = subset_batches(
        data, options["subset"], options["batch_size"], seed=options["subset_seed"]
    )
    frames = []
    for step, path in run_checkpoints(run, options, keep_steps).items():
        ck = load_into(model, path)
        df = pd.DataFrame(curvature_rows(model, batches, options))
        df["depth"] = df["depth"].astype("float64")  # the model row's depth: NaN
        _step_columns(df, ck)
        frames.append(df)
        log.info("curvature of %s at step %d: %d rows", run.run_id, step, len(df))
    df = pd.concat(frames, ignore_index=True)
    df["lr"] = float(run.spec.optimizer_settings.get("lr", math.nan))
    df["optimizer_name"] = run.spec.optimizer_name
    return _write(df, run, out, {"analysis": "curvature", "options": dict(options)})


def run_spectra(run, dataset_path, options, out, *, keep_steps=True, device="cpu"):
    """spectra.parquet of a run: :func:`spectra.checkpoint_spectra` of each selected
    checkpoint (its run_id column replaced by the run's grid columns)."""
    from .spectra import checkpoint_spectra

    frames = []
    for path in run_checkpoints(run, options, keep_steps).values():
        df = checkpoint_spectra(path, fit=options["fit"], search=options["search"])
        frames.append(df.drop(columns=["run_id"]))
    df = pd.concat(frames, ignore_index=True)
    df["shape"] = df["shape"].map(lambda s: "x".join(map(str, s)))
    return _write(df, run, out, {"analysis": "spectra", "options": dict(options)})


def block_site(model) -> str:
    """``input`` for a ConvStack (its block modules return only f(x)), else ``output``."""
    from .models import ConvStack

    return "input" if isinstance(model, ConvStack) else "output"


def run_grams(run, dataset_path, options, out_grams, out_table, *, keep_steps=True, device="cpu"):
    """grams.safetensors (the final checkpoint's Grams on the probe set) and layer_cka.parquet
    (each block at each selected checkpoint against the final one) of a run. One
    checkpoint's Grams in memory at a time, besides the final one's."""
    from .checkpoints import load_into
    from .features import probe_batches, probe_indices
    from .layer_similarity import block_grams, cka_over_checkpoints, save_grams
    from .loaders import run_model_and_data

    model, data = run_model_and_data(run.spec, dataset_path, device)
    idx = probe_indices(data.test_x.shape[0], options["probe_size"], options["probe_seed"])
    site = block_site(model)
    chosen = run_checkpoints(run, options, keep_steps)
    final = max(chosen)

    def grams(path):
        load_into(model, path)
        return block_grams(
            model, probe_batches(data, idx, 500), None, options["reduction"], site=site
        )

    ref = grams(chosen[final])
    frames = []
    for step, path in chosen.items():
        g = ref if step == final else grams(path)
        frames.append(cka_over_checkpoints({step: g, final: ref}, final, errors="nan"))
    df = pd.concat(frames, ignore_index=True)
    df = df[df["step"].isin(chosen)].drop_duplicates(["block", "step"])
    df = df.sort_values(["depth", "step"], kind="stable").reset_index(drop=True)
    df.insert(0, "kind", "over_checkpoints")
    df["reference_step"] = final
    df["site"] = site
    meta = {"run_id": run.run_id, "step": final, "site": site, "reduction": options["reduction"]}
    save_grams(out_grams, ref, meta, indices=idx)
    return _write(df, run, out_table, {"analysis": "layer_similarity", "options": dict(options)})


# --- the study table of layer similarity -------------------------------------------------------

PAIR_COLUMNS = ("kind", "run_a", "run_b", "model_a", "model_b", "shortcut_a", "shortcut_b")


def pair_matrix(grams_a, grams_b, kind: str, info_a, info_b, unbiased=False) -> pd.DataFrame:
    """The layer-by-layer CKA matrix of two runs' Grams with the pair's columns."""
    from .layer_similarity import cka_matrix

    df = cka_matrix(grams_a, grams_b, unbiased, errors="nan")
    values = (kind, info_a["run_id"], info_b["run_id"], info_a["model"], info_b["model"],
              info_a["shortcut"], info_b["shortcut"])  # fmt: skip
    for i, (c, v) in enumerate(zip(PAIR_COLUMNS, values, strict=True)):
        df.insert(i, c, v)
    return df


def study_layer_similarity(
    grams: Mapping[str, Path | str],
    run_tables: Sequence[Path | str],
    pairs: Sequence[Sequence[str]],
    out: Path | str,
    unbiased: bool = False,
) -> pd.DataFrame:
    """layer_similarity.parquet: the matrices of ``pairs`` ((run_a, run_b, kind), from
    {run_id: grams file}) and the runs' over-checkpoints rows (``run_tables``), one table
    with column ``kind`` (seeds, shortcut, over_checkpoints). Grams are loaded per pair."""
    from .layer_similarity import load_grams
    from .tables import read_parquet, write_parquet

    runs = pd.concat([read_parquet(p) for p in run_tables], ignore_index=True)
    info = runs.drop_duplicates("run_id").set_index("run_id", drop=False)
    frames = []
    for a, b, kind in pairs:
        ga, _ = load_grams(grams[a])
        gb, _ = load_grams(grams[b])
        frames.append(pair_matrix(ga, gb, kind, info.loc[a], info.loc[b], unbiased))
    over = runs.rename(columns={"run_id": "run_a", "block": "block_a", "depth": "depth_a"})
    over["run_b"], over["block_b"], over["depth_b"] = (
        over["run_a"],
        over["block_a"],
        over["depth_a"],
    )
    df = pd.concat([*frames, over], ignore_index=True)
    write_parquet(df, out, {"pairs": [list(p) for p in pairs], "runs": len(run_tables)})
    return df


# --- the registry ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Analysis:
    """One offline analysis: its per-run ``function`` (run, dataset_path, options, *outs,
    keep_steps=, device=), the ``defaults`` of its options (as the schema fills them in),
    the per-run files it writes (``run_files``, in the order ``function`` takes them) and
    the study table they go into."""

    function: Callable[..., pd.DataFrame]
    defaults: dict[str, Any]
    run_files: tuple[str, ...]
    study_table: str


_SELECT = {"enabled": False, "max_checkpoints": None, "where": {}}

ANALYSES: dict[str, Analysis] = {
    "curvature": Analysis(
        run_curvature,
        {
            **_SELECT,
            "checkpoints": "log_steps",
            "max_checkpoints": 6,
            "subset": 256,
            "subset_seed": 0,
            "batch_size": 128,
            "samples": 20,
            "tol": 1.0e-3,
            "max_iter": 100,
            "block_eigenvalues": True,
        },  # fmt: skip
        ("curvature.parquet",),
        "curvature",
    ),
    "spectra": Analysis(
        run_spectra,
        {**_SELECT, "checkpoints": "every_epoch", "fit": True, "search": "clauset"},
        ("spectra.parquet",),
        "spectra",
    ),
    "layer_similarity": Analysis(
        run_grams,
        {
            **_SELECT,
            "checkpoints": "log_steps",
            "max_checkpoints": 6,
            "probe_size": 500,
            "probe_seed": 0,
            "reduction": "mean",
            "pairs": ["seeds", "shortcut"],
            "unbiased": False,
        },  # fmt: skip
        ("grams.safetensors", "layer_cka.parquet"),
        "layer_similarity",
    ),
}


def enabled(settings: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The names of the analyses a study's ``analyses`` settings turn on, registry order."""
    return [name for name in ANALYSES if (settings.get(name) or {}).get("enabled")]


# the rule of rules/analyses.smk that runs each analysis per run
RULE_ANALYSIS = {"curvature": "curvature", "spectra": "spectra", "layer_grams": "layer_similarity"}
