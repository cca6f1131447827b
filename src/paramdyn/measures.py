"""Per-tensor, per-layer and per-block distances between checkpoints of one run.

Each checkpoint of a run is read once, in step order, and compared with two references:
the init (step 0) and the previous checkpoint. All parameters are laid end to end in one
flat vector, so one subtraction gives the difference of every tensor, and per-tensor sums
come from segment reductions (``np.add.reduceat``). Layer and block values are computed
from the per-tensor sums (sums of |d|, d^2, |d|^p, counts, dot products), never averaged
from ratios, so every granularity is exact.

Only trainable parameters are measured. Buffers (BatchNorm running statistics, counters)
stay in the checkpoints and are not parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import tables
from .checkpoints import Checkpoint, CheckpointError, list_checkpoints, read_checkpoint

RUN_COLUMNS = ("run_id", "study", "model", "model_name", "shortcut", "dataset", "init",
               "optimizer", "seed")  # fmt: skip
SUMS = ("l1", "l2sq", "changed", "cur_sq", "ref_sq", "dot")  # additive over tensors


@dataclass
class Flat:
    """All parameters of one checkpoint, laid end to end (float32)."""

    epoch: int
    step: int
    epoch_end: bool
    values: np.ndarray
    sq: np.ndarray  # per-tensor sum of squares (float64)


@dataclass
class Layout:
    names: list[str]  # parameter keys, in order
    numel: np.ndarray
    offsets: np.ndarray
    layer: list[str]
    block: list[str]
    depth: np.ndarray

    @classmethod
    def from_checkpoint(cls, ck: Checkpoint) -> Layout:
        names = [k for k in ck.parameters if ck.tensors[k].numel() > 0]
        numel = np.array([ck.tensors[k].numel() for k in names], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(numel)[:-1]]).astype(np.int64)
        block, depth = [], []
        for k in names:
            hits = [(b, d) for d, b in enumerate(ck.blocks) if k.startswith(b + ".")]
            if len(hits) != 1:
                raise CheckpointError(f"{ck.path}: parameter {k} lies in blocks {hits}")
            block.append(hits[0][0])
            depth.append(hits[0][1])
        layer = [k.rsplit(".", 1)[0] for k in names]
        return cls(names, numel, offsets, layer, block, np.array(depth, dtype=np.int64))


def _flatten(ck: Checkpoint, layout: Layout) -> Flat:
    if [k for k in ck.parameters if ck.tensors[k].numel() > 0] != layout.names:
        raise CheckpointError(f"{ck.path}: its parameters differ from the run's first checkpoint")
    values = np.concatenate([ck.tensors[k].detach().float().numpy().ravel() for k in layout.names])
    sq = np.add.reduceat(np.square(values, dtype=np.float64), layout.offsets)
    return Flat(ck.epoch, ck.step, ck.epoch_end, values, sq)


def _tensor_sums(
    cur: Flat, ref: Flat, layout: Layout, atol: float, rtol: float, ps: list[float]
) -> dict[str, np.ndarray]:
    """Additive per-tensor statistics of d = cur - ref, plus linf (a max)."""
    off = layout.offsets
    d = np.abs(cur.values - ref.values).astype(np.float64)
    out = {
        "l1": np.add.reduceat(d, off),
        "l2sq": np.add.reduceat(d * d, off),
        "linf": np.maximum.reduceat(d, off),
        "changed": np.add.reduceat((d > atol + rtol * np.abs(ref.values)).astype(np.int64), off),
        "cur_sq": cur.sq,
        "ref_sq": ref.sq,
        "dot": np.add.reduceat(cur.values.astype(np.float64) * ref.values, off),
    }
    for p in ps:
        out[f"pow{p:g}"] = np.add.reduceat(d**p, off)
    return out


def _finish(df: pd.DataFrame, ps: list[float]) -> pd.DataFrame:
    """Distances from the summed statistics (undefined ratios are NaN, not errors)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        df["l2"] = np.sqrt(df["l2sq"])
        df["mean_abs"] = df["l1"] / df["numel"]
        df["rms"] = df["l2"] / np.sqrt(df["numel"])
        df["rel_l2"] = df["l2"] / np.sqrt(df["ref_sq"])
        df["cosine"] = df["dot"] / np.sqrt(df["cur_sq"] * df["ref_sq"])
        df["frac_changed"] = df["changed"] / df["numel"]
        df["norm"] = np.sqrt(df["cur_sq"])
        df["ref_norm"] = np.sqrt(df["ref_sq"])
        for p in ps:
            df[f"minkowski_p{p:g}"] = df[f"pow{p:g}"] ** (1.0 / p)
    df["changed"] = df["changed"].astype(np.int64)
    drop = ["l2sq", "cur_sq", "ref_sq", "dot", *[f"pow{p:g}" for p in ps]]
    return df.drop(columns=drop)


def compare(
    checkpoints: list[Checkpoint] | list[Path],
    *,
    atol: float = 1e-8,
    rtol: float = 1e-5,
    minkowski_p: list[float] | None = None,
) -> pd.DataFrame:
    """Distances of every checkpoint after the first against the first ('init') and against
    the one before it ('previous'), at tensor, layer and block granularity."""
    ps = [float(p) for p in (minkowski_p or [])]
    it = iter(checkpoints)
    first = next(it)
    first = first if isinstance(first, Checkpoint) else read_checkpoint(first)
    layout = Layout.from_checkpoint(first)
    init = prev = _flatten(first, layout)
    rows = []
    for item in it:
        ck = item if isinstance(item, Checkpoint) else read_checkpoint(item)
        cur = _flatten(ck, layout)
        for reference, ref in (("init", init), ("previous", prev)):
            s = _tensor_sums(cur, ref, layout, atol, rtol, ps)
            frame = pd.DataFrame(
                {
                    "name": layout.names,
                    "layer": layout.layer,
                    "block": layout.block,
                    "depth": layout.depth,
                    "numel": layout.numel,
                    **s,
                }
            )
            frame["epoch"], frame["step"], frame["epoch_end"] = cur.epoch, cur.step, cur.epoch_end
            frame["reference"], frame["ref_epoch"], frame["ref_step"] = (
                reference,
                ref.epoch,
                ref.step,
            )
            rows.append(frame)
        prev = cur
    if not rows:
        raise CheckpointError("a run needs at least two checkpoints to measure distances")
    tensor = pd.concat(rows, ignore_index=True)
    keys = ["epoch", "step", "epoch_end", "reference", "ref_epoch", "ref_step"]
    agg = {c: "sum" for c in (*SUMS, "numel", *[f"pow{p:g}" for p in ps])}
    agg["linf"] = "max"
    agg["depth"] = "first"
    layer = tensor.groupby([*keys, "layer"], sort=False).agg({**agg, "block": "first"})
    layer = layer.reset_index().rename(columns={"layer": "name"})
    block = tensor.groupby([*keys, "block"], sort=False).agg(agg).reset_index()
    block["name"] = block["block"]
    tensor = tensor.drop(columns=["layer"])
    parts = []
    for gran, df in (("tensor", tensor), ("layer", layer), ("block", block)):
        df = df.copy()
        df["granularity"] = gran
        parts.append(df)
    out = _finish(pd.concat(parts, ignore_index=True), ps)
    cols = [*keys, "granularity", "name", "block", "depth", "numel", "l1", "l2", "linf",
            "mean_abs", "rms", "rel_l2", "cosine", "frac_changed", "changed", "norm",
            "ref_norm", *[f"minkowski_p{p:g}" for p in ps]]  # fmt: skip
    return out[cols]


def run_distances(
    checkpoint_dir: Path | str, run_info: dict[str, Any], out: Path | str
) -> pd.DataFrame:
    """Measure one run from its checkpoints and write ``distances.parquet``."""
    hp = run_info["hparams"]
    m = hp.get("measures", {})
    atol, rtol, ps = m.get("atol", 1e-8), m.get("rtol", 1e-5), m.get("minkowski_p", [])
    df = compare(list_checkpoints(checkpoint_dir), atol=atol, rtol=rtol, minkowski_p=ps)
    for i, c in enumerate(RUN_COLUMNS):
        df.insert(i, c, hp[c] if c != "run_id" else run_info["run_id"])
    tables.write_parquet(
        df, out, {"run_id": run_info["run_id"], "atol": atol, "rtol": rtol, "minkowski_p": ps}
    )
    return df
