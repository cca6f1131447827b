"""Per-tensor, per-layer and per-block distances between checkpoints of one run.

Each checkpoint after the first is compared with two references: the init (the first
checkpoint) and the checkpoint before it. With d = θ - θ_ref, every measure is a sum
(Σ|d|, Σd², Σ|d|^p, Σθ·θ_ref, Σθ², the count of changed entries) or a maximum (max |d|) over
the entries, so they are computed in one pass:

- The checkpoints are read once each, in step order, and only three are held: the init, the
  previous and the current one. Time is linear in the number of checkpoints.
- The parameters are walked in slices of at most :data:`CHUNK` entries. From one slice of
  the current checkpoint and the same slice of each reference, every statistic of both
  references is taken while the slice sits in the CPU cache: one subtraction per
  reference gives d, and the other statistics derive from it. The temporaries are
  allocated once per run, in float32; nothing is cast to float64 element-wise.
- Sums within a slice run in float32 with torch's cascade summation (its relative error
  stays around 1e-7 for 32k entries); across slices they accumulate in float64. Tensors
  smaller than :data:`SMALL` entries (BatchNorm weights, biases) are packed together so that
  one slice covers many of them; their per-tensor sums are segment reductions in float64.
- Layer and block values are computed from the per-tensor sums (never averaged from
  ratios), so every granularity is exact. The table is built once, at the end, from numpy
  arrays.

Only trainable parameters are measured. Buffers (BatchNorm running statistics, counters)
stay in the checkpoints and are not parameters.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from . import tables
from .checkpoints import Checkpoint, CheckpointError, list_checkpoints, read_checkpoint

RUN_COLUMNS = ("run_id", "study", "model", "model_name", "shortcut", "dataset", "init",
               "optimizer", "seed")  # fmt: skip
KEYS = ("epoch", "step", "epoch_end", "reference", "ref_epoch", "ref_step")
REFERENCES = ("init", "previous")

CHUNK = 1 << 15  # entries of one slice: its float32 temporaries fit in a core's L2 cache
SMALL = 1 << 12  # tensors below this size are packed, many to a slice


def _pow_name(p: float) -> str:
    return f"minkowski_p{p:g}"


@dataclass
class Layout:
    """The parameters of a run, in checkpoint order, and how they are walked.

    ``regions`` cut the parameters into runs of memory: a tensor of at least SMALL entries
    is a region of its own (walked in slices of CHUNK entries); consecutive smaller tensors
    are packed into regions of at most CHUNK entries, each one slice, whose tensors start
    at ``starts`` within the region.
    """

    names: list[str]  # parameter keys, in order
    numel: np.ndarray
    layer: list[str]
    block: list[str]
    depth: np.ndarray
    regions: list[tuple[np.ndarray, np.ndarray | None]]  # (tensor indices, starts or None)

    @classmethod
    def from_checkpoint(cls, ck: Checkpoint) -> Layout:
        names = [k for k in ck.parameters if ck.tensors[k].numel() > 0]
        numel = np.array([ck.tensors[k].numel() for k in names], dtype=np.int64)
        block, depth = [], []
        for k in names:
            hits = [(b, d) for d, b in enumerate(ck.blocks) if k.startswith(b + ".")]
            if len(hits) != 1:
                raise CheckpointError(f"{ck.path}: parameter {k} lies in blocks {hits}")
            block.append(hits[0][0])
            depth.append(hits[0][1])
        layer = [k.rsplit(".", 1)[0] for k in names]
        regions: list[tuple[np.ndarray, np.ndarray | None]] = []
        pack: list[int] = []

        def close_pack() -> None:
            if pack:
                starts = np.concatenate([[0], np.cumsum(numel[pack])[:-1]]).astype(np.intp)
                regions.append((np.array(pack, dtype=np.intp), starts))
                pack.clear()

        for i, n in enumerate(numel):
            if n >= SMALL:
                close_pack()
                regions.append((np.array([i], dtype=np.intp), None))
            else:
                if pack and numel[pack].sum() + n > CHUNK:
                    close_pack()
                pack.append(i)
        close_pack()
        return cls(names, numel, layer, block, np.array(depth, dtype=np.int64), regions)


@dataclass
class Params:
    """One checkpoint's parameters as float32 arrays, one per region of the layout."""

    epoch: int
    step: int
    epoch_end: bool
    regions: list[np.ndarray]
    sq: np.ndarray | None = None  # per-tensor Σθ² (float64), filled by the pass over it


def _params(ck: Checkpoint, layout: Layout) -> Params:
    names = [k for k in ck.parameters if ck.tensors[k].numel() > 0]
    if names != layout.names:
        raise CheckpointError(f"{ck.path}: its parameters differ from the run's first checkpoint")
    flat = [ck.tensors[k].detach().float().numpy().reshape(-1) for k in names]
    for k, f, n in zip(names, flat, layout.numel, strict=True):
        if f.size != n:
            raise CheckpointError(
                f"{ck.path}: parameter {k} has {f.size} entries, {n} in the run's first checkpoint"
            )
    regions = [
        flat[idx[0]] if starts is None else np.concatenate([flat[i] for i in idx])
        for idx, starts in layout.regions
    ]
    return Params(ck.epoch, ck.step, ck.epoch_end, regions)


@dataclass
class Stats:
    """The additive statistics of one checkpoint against its references, per tensor.

    ``sums[r, s, t]``: statistic ``s`` (|d|, d², θ·θ_ref, then |d|^p for each p) of tensor
    ``t`` against reference ``r``; ``linf`` and ``changed`` are indexed ``[r, t]``."""

    sums: np.ndarray
    linf: np.ndarray
    changed: np.ndarray


class _Pass:
    """One pass over a checkpoint against zero, one or two references.

    Holds the slice temporaries (allocated once per run). Rows of ``rows``: 0 is θ²; then,
    for reference ``r``, rows ``1 + r * per`` onwards hold |d|, d², θ·θ_ref and |d|^p."""

    def __init__(self, layout: Layout, atol: float, rtol: float, ps: list[float]):
        self.layout, self.atol, self.rtol, self.ps = layout, atol, rtol, ps
        self.per = 3 + len(ps)
        self.rows = np.empty((1 + 2 * self.per, CHUNK), dtype=np.float32)
        self.rows_t = torch.from_numpy(self.rows)  # the same memory, for torch's reductions
        self.thr = np.empty(CHUNK, dtype=np.float32)
        self.mask = np.empty((2, CHUNK), dtype=bool)

    def run(self, cur: Params, refs: list[Params]) -> Stats:
        """Fill ``cur.sq`` and return the statistics of ``cur`` against each of ``refs``."""
        n_t, n_r = len(self.layout.names), len(refs)
        sq = np.zeros(n_t)
        sums = np.zeros((n_r, self.per, n_t))
        linf = np.zeros((n_r, n_t))
        changed = np.zeros((n_r, n_t), dtype=np.int64)
        a_rows = slice(1, 1 + n_r * self.per, self.per)  # the |d| row of each reference
        for g, (idx, starts) in enumerate(self.layout.regions):
            c_all = cur.regions[g]
            for lo in range(0, c_all.size, CHUNK):
                hi = min(lo + CHUNK, c_all.size)
                k = hi - lo
                self._slice(c_all[lo:hi], [r.regions[g][lo:hi] for r in refs], k)
                n_rows = 1 + n_r * self.per
                if starts is None:  # one tensor: float32 cascade sums, float64 accumulation
                    i = idx[0]
                    s = self.rows_t[:n_rows, :k].sum(1).numpy().astype(np.float64)
                    sq[i] += s[0]
                    sums[:, :, i] += s[1:].reshape(n_r, self.per)
                    if n_r:
                        m = self.rows_t[a_rows, :k].amax(1).numpy()
                        linf[:, i] = np.maximum(linf[:, i], m)
                        for j in range(n_r):
                            changed[j, i] += np.count_nonzero(self.mask[j, :k])
                else:  # a pack of small tensors: float64 segment sums
                    s = np.add.reduceat(self.rows[:n_rows, :k], starts, axis=1, dtype=np.float64)
                    sq[idx] = s[0]
                    sums[:, :, idx] = s[1:].reshape(n_r, self.per, len(idx))
                    if n_r:
                        linf[:, idx] = np.maximum.reduceat(self.rows[a_rows, :k], starts, axis=1)
                        changed[:, idx] = np.add.reduceat(
                            self.mask[:n_r, :k], starts, axis=1, dtype=np.int64
                        )
        cur.sq = sq
        return Stats(sums, linf, changed)

    def _slice(self, c: np.ndarray, refs: list[np.ndarray], k: int) -> None:
        """Every element-wise quantity of one slice, written into the temporaries."""
        rows = self.rows[:, :k]
        np.multiply(c, c, out=rows[0])
        thr = self.thr[:k]
        for j, r in enumerate(refs):
            a, d2, dot = rows[1 + j * self.per : 4 + j * self.per]
            np.subtract(c, r, out=a)
            np.abs(a, out=a)
            np.multiply(a, a, out=d2)
            np.multiply(c, r, out=dot)
            for m, p in enumerate(self.ps):
                _abs_power(a, d2, p, out=rows[4 + j * self.per + m])
            # changed: |d| > atol + rtol * |θ_ref|, the threshold in float32
            np.abs(r, out=thr)
            np.multiply(thr, self.rtol, out=thr)
            np.add(thr, self.atol, out=thr)
            np.greater(a, thr, out=self.mask[j, :k])


def _abs_power(a: np.ndarray, a2: np.ndarray, p: float, out: np.ndarray) -> None:
    """|d|^p from |d| and d²: products for p = 1 to 4, ``np.power`` otherwise."""
    if p == 1:
        np.copyto(out, a)
    elif p == 2:
        np.copyto(out, a2)
    elif p == 3:
        np.multiply(a2, a, out=out)
    elif p == 4:
        np.multiply(a2, a2, out=out)
    else:
        np.power(a, p, out=out)


def _group(keys: list[str]) -> tuple[list[str], list[np.ndarray]]:
    """The distinct keys in order of first appearance, and the tensor indices of each."""
    order = list(dict.fromkeys(keys))
    members: dict[str, list[int]] = {g: [] for g in order}
    for i, g in enumerate(keys):
        members[g].append(i)
    return order, [np.array(members[g], dtype=np.intp) for g in order]


def _table(
    layout: Layout,
    points: list[tuple[Params, list[Params], Stats]],
    ps: list[float],
) -> pd.DataFrame:
    """The distances table from the per-tensor statistics of every checkpoint: tensor rows,
    then layer rows, then block rows; within each, checkpoint, reference, name order."""
    n_k, n_t = len(points), len(layout.names)
    sums = np.stack([st.sums for _, _, st in points])  # (checkpoint, reference, stat, tensor)
    linf = np.stack([st.linf for _, _, st in points])
    changed = np.stack([st.changed for _, _, st in points])
    cur_sq = np.stack([[cur.sq, cur.sq] for cur, _, _ in points])
    ref_sq = np.stack([[r.sq for r in refs] for _, refs, _ in points])

    layers, layer_members = _group(layout.layer)
    blocks, block_members = _group(layout.block)
    levels = [
        ("tensor", layout.names, [np.array([i]) for i in range(n_t)]),
        ("layer", layers, layer_members),
        ("block", blocks, block_members),
    ]
    cols: dict[str, list[Any]] = {c: [] for c in (*KEYS, "granularity", "name", "block")}
    num: dict[str, list[np.ndarray]] = {}

    def add(name: str, values: np.ndarray) -> None:
        num.setdefault(name, []).append(values.reshape(-1))

    for gran, names, members in levels:
        n_g = len(names)
        # sums over the group's tensors by an indicator matrix; maxima group by group
        ind = np.zeros((n_t, n_g))
        for g, m in enumerate(members):
            ind[m, g] = 1.0
        g_sums = sums @ ind  # (checkpoint, reference, stat, group)
        g_linf = np.stack([linf[..., m].max(-1) for m in members], axis=-1)
        g_changed = np.stack([changed[..., m].sum(-1) for m in members], axis=-1)
        numel = np.array([layout.numel[m].sum() for m in members], dtype=np.int64)
        first = [m[0] for m in members]
        depth = layout.depth[first]
        block = [layout.block[i] for i in first]
        shape = (n_k, 2, n_g)
        for col, per_point in (
            ("epoch", [p.epoch for p, _, _ in points]),
            ("step", [p.step for p, _, _ in points]),
            ("epoch_end", [p.epoch_end for p, _, _ in points]),
            ("ref_epoch", [[r.epoch for r in refs] for _, refs, _ in points]),
            ("ref_step", [[r.step for r in refs] for _, refs, _ in points]),
        ):
            v = np.asarray(per_point)
            v = v[:, None, None] if v.ndim == 1 else v[:, :, None]
            add(col, np.broadcast_to(v, shape))
        add("depth", np.broadcast_to(depth, shape))
        add("numel", np.broadcast_to(numel, shape))
        add("l1", g_sums[:, :, 0])
        add("l2sq", g_sums[:, :, 1])
        add("dot", g_sums[:, :, 2])
        for m, p in enumerate(ps):
            add(f"pow{p:g}", g_sums[:, :, 3 + m])
        add("linf", g_linf)
        add("changed", g_changed)
        add("cur_sq", cur_sq @ ind)
        add("ref_sq", ref_sq @ ind)
        cols["reference"] += [r for _ in range(n_k) for r in REFERENCES for _ in range(n_g)]
        cols["granularity"] += [gran] * (n_k * 2 * n_g)
        cols["name"] += list(names) * (n_k * 2)
        cols["block"] += block * (n_k * 2)

    v = {name: np.concatenate(parts) for name, parts in num.items()}
    numel = v["numel"]
    with np.errstate(divide="ignore", invalid="ignore"):
        l2 = np.sqrt(v["l2sq"])
        out = {
            "epoch": v["epoch"].astype(np.int64),
            "step": v["step"].astype(np.int64),
            "epoch_end": v["epoch_end"].astype(bool),
            "reference": cols["reference"],
            "ref_epoch": v["ref_epoch"].astype(np.int64),
            "ref_step": v["ref_step"].astype(np.int64),
            "granularity": cols["granularity"],
            "name": cols["name"],
            "block": cols["block"],
            "depth": v["depth"].astype(np.int64),
            "numel": numel,
            "l1": v["l1"],
            "l2": l2,
            "linf": v["linf"].astype(np.float64),
            "mean_abs": v["l1"] / numel,
            "rms": l2 / np.sqrt(numel),
            "rel_l2": l2 / np.sqrt(v["ref_sq"]),
            "cosine": v["dot"] / np.sqrt(v["cur_sq"] * v["ref_sq"]),
            "frac_changed": v["changed"] / numel,
            "changed": v["changed"].astype(np.int64),
            "norm": np.sqrt(v["cur_sq"]),
            "ref_norm": np.sqrt(v["ref_sq"]),
        }
        for p in ps:
            out[_pow_name(p)] = v[f"pow{p:g}"] ** (1.0 / p)
    return pd.DataFrame(out)


def compare(
    checkpoints: Iterable[Checkpoint | Path],
    *,
    atol: float = 1e-8,
    rtol: float = 1e-5,
    minkowski_p: list[float] | None = None,
) -> pd.DataFrame:
    """Distances of every checkpoint after the first against the first ('init') and against
    the one before it ('previous'), at tensor, layer and block granularity.

    ``checkpoints`` are in step order: :class:`Checkpoint` objects or paths (read one at a
    time). Returns one row per (checkpoint, reference, granularity, name)."""
    ps = [float(p) for p in (minkowski_p or [])]
    it = iter(checkpoints)
    first = next(it)
    first = first if isinstance(first, Checkpoint) else read_checkpoint(first)
    layout = Layout.from_checkpoint(first)
    walk = _Pass(layout, atol, rtol, ps)
    init = _params(first, layout)
    walk.run(init, [])  # Σθ² of the init
    del first
    prev = init
    points: list[tuple[Params, list[Params], Stats]] = []
    for item in it:
        ck = item if isinstance(item, Checkpoint) else read_checkpoint(item)
        cur = _params(ck, layout)
        del ck
        if prev is init:  # the first comparison: both references are the init
            st = walk.run(cur, [init])
            st = Stats(*(np.concatenate([a, a]) for a in (st.sums, st.linf, st.changed)))
        else:
            st = walk.run(cur, [init, prev])
        points.append((cur, [init, prev], st))
        if prev is not init:
            prev.regions = []  # no longer a reference: free its memory
        prev = cur
    if not points:
        raise CheckpointError("a run needs at least two checkpoints to measure distances")
    return _table(layout, points, ps)


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
