"""Per-tensor, per-layer and per-block distances between checkpoints of one run.

Each checkpoint after the first is compared with two references: the init (the first
checkpoint) and the checkpoint before it. With d = θ - θ_ref, every measure derives from
sums over the entries (Σ|d|, Σd², Σ|d|^p, Σθ·θ_ref, Σθ², the count of changed entries) and
one maximum (max |d|), so all of them come out of one pass over the data:

- The checkpoints are read once each, in step order; three are held at a time (the init,
  the previous and the current one). Time is linear in the number of checkpoints.
- The parameters are walked in slices of at most :data:`CHUNK` entries, and each slice by
  one call of a compiled kernel (:func:`_kernel`, numba) that reads the current slice and
  the same slice of each reference once and takes every statistic of both references in
  that one loop: d = θ - θ_ref once per entry, then |d|, d², θ·θ_ref, the powers, the
  maximum and the changed count from it. Nothing is cast to float64 element by element.
- Sums run in float32 over blocks of :data:`BLOCK` entries (vectorised into many partial
  sums, relative error about 1e-7) and accumulate in float64 across blocks. Tensors under
  :data:`SMALL` entries (BatchNorm weights, biases) are packed, many to a slice, and the
  kernel keeps one set of sums per tensor.
- The slices are shared out between torch's number of threads (``torch.get_num_threads``:
  a job's threads); the kernel releases the GIL. It is compiled on first use and cached
  next to the module (numba's cache), so later jobs load it in well under a second.
- Layer and block values are computed from the per-tensor sums (never averaged from
  ratios), so every granularity is exact. The table is built once, at the end.

Only trainable parameters are measured. Buffers (BatchNorm running statistics, counters)
stay in the checkpoints and are not parameters. A study's ``measures.exclude`` (glob
patterns on the parameters' keys, fnmatch) leaves parameters out of the layer and block
sums; they are still measured as tensor rows, with ``in_blocks`` false.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Iterable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numba
import numpy as np
import pandas as pd
import torch
from safetensors import safe_open

from . import tables
from .checkpoints import (
    Checkpoint,
    CheckpointError,
    list_checkpoints,
    read_checkpoint,
)
from .runs import FinishedRun

log = logging.getLogger("paramdyn.measures")

KEYS = ("epoch", "step", "epoch_end", "reference", "ref_epoch", "ref_step")
REFERENCES = ("init", "previous")

CHUNK = 1 << 16  # entries of one slice: one kernel call, shared out between threads
BLOCK = 512  # entries summed in float32 before they are added into float64
SMALL = 1 << 12  # tensors with fewer entries are packed, many to a slice


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
    in_blocks: np.ndarray  # bool per tensor: counted in its layer and block sums

    @classmethod
    def from_checkpoint(cls, ck: Checkpoint, exclude: Iterable[str] = ()) -> Layout:
        """The layout of ``ck``'s parameters; those whose key matches a pattern of
        ``exclude`` (fnmatch) are left out of the layer and block sums."""
        names = [k for k in ck.parameters if ck.tensors[k].numel() > 0]
        exclude = list(exclude)
        in_blocks = np.array(
            [not any(fnmatch.fnmatchcase(k, pat) for pat in exclude) for k in names], dtype=bool
        )
        for pat in exclude:
            if not any(fnmatch.fnmatchcase(k, pat) for k in names):
                log.warning("%s: measures.exclude pattern %r matches no parameter", ck.path, pat)
        numel = np.array([ck.tensors[k].numel() for k in names], dtype=np.int64)
        owners = [ck.owner(k) for k in names]
        block, depth = [b for b, _ in owners], [d for _, d in owners]
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
                continue
            if numel[pack].sum() + n > CHUNK:
                close_pack()
            pack.append(i)
        close_pack()
        depth = np.array(depth, dtype=np.int64)
        return cls(names, numel, layer, block, depth, regions, in_blocks)


@dataclass
class Point:
    """A checkpoint in the table: its position and per-tensor Σθ² (float64)."""

    epoch: int
    step: int
    epoch_end: bool
    sq: np.ndarray


def _regions(ck: Checkpoint, layout: Layout) -> list[np.ndarray]:
    """The checkpoint's parameters as float32 arrays, one per region of the layout (views of
    the checkpoint's tensors for single tensors, copies for packs)."""
    names = [k for k in ck.parameters if ck.tensors[k].numel() > 0]
    if names != layout.names:
        raise CheckpointError(f"{ck.path}: its parameters differ from the run's first checkpoint")
    flat = [ck.tensors[k].detach().float().numpy().reshape(-1) for k in names]
    for k, f, n in zip(names, flat, layout.numel, strict=True):
        if f.size != n:
            raise CheckpointError(
                f"{ck.path}: parameter {k} has {f.size} entries, {n} in the run's first checkpoint"
            )
    return [
        flat[idx[0]] if starts is None else np.concatenate([flat[i] for i in idx])
        for idx, starts in layout.regions
    ]


@dataclass
class Stats:
    """Per-tensor statistics of one pass over a checkpoint (or of one thread's share of it).

    ``sq[t]``: Σθ² of tensor ``t``. ``sums[r, s, t]``: statistic ``s`` (Σ|d|, Σd², Σθ·θ_ref,
    then Σ|d|^p for each p) against reference ``r``. ``linf`` and ``changed`` are indexed
    ``[r, t]``."""

    sq: np.ndarray
    sums: np.ndarray
    linf: np.ndarray
    changed: np.ndarray

    @classmethod
    def zeros(cls, n_refs: int, n_stats: int, n_tensors: int) -> Stats:
        return cls(
            np.zeros(n_tensors),
            np.zeros((n_refs, n_stats, n_tensors)),
            np.zeros((n_refs, n_tensors)),
            np.zeros((n_refs, n_tensors), dtype=np.int64),
        )

    def merge(self, other: Stats) -> None:
        self.sq += other.sq
        self.sums += other.sums
        self.linf = np.maximum(self.linf, other.linf)
        self.changed += other.changed


class _Pass:
    """One pass over a checkpoint against its references, slice by slice.

    The slices of the layout's regions are shared out between ``threads`` threads (the
    kernel releases the GIL); each thread sums into its own :class:`Stats`, merged at the
    end."""

    def __init__(self, layout: Layout, atol: float, rtol: float, ps: list[float], threads: int):
        self.layout, self.ps = layout, np.asarray(ps, dtype=np.float64)
        self.atol, self.rtol = np.float32(atol), np.float32(rtol)
        self.per = 3 + len(ps)
        sizes = [int(layout.numel[idx].sum()) for idx, _ in layout.regions]
        slices = [
            (g, lo, min(lo + CHUNK, n)) for g, n in enumerate(sizes) for lo in range(0, n, CHUNK)
        ]
        # each slice's segments (bounds within the slice) and their tensors: one for a slice
        # of one tensor, each tensor of a pack
        self.segments = [
            (
                np.append([0] if starts is None else starts, hi - lo).astype(np.int64),
                idx.astype(np.int64),
            )
            for g, lo, hi in slices
            for idx, starts in [layout.regions[g]]
        ]
        threads = max(1, min(threads, len(slices)))
        numbered = [(i, *sl) for i, sl in enumerate(slices)]
        self.shares = [numbered[w::threads] for w in range(threads)]

    def measure(
        self, cur: list[np.ndarray], refs: list[list[np.ndarray]], pool: Executor | None
    ) -> Stats:
        """Σθ² of ``cur`` and its statistics against each of ``refs`` (none, one or two
        checkpoints, each a list of regions like ``cur``)."""
        if pool is None or len(self.shares) == 1:
            parts = [self._share(cur, refs, share) for share in self.shares]
        else:
            parts = list(pool.map(lambda share: self._share(cur, refs, share), self.shares))
        total = parts[0]
        for part in parts[1:]:
            total.merge(part)
        return total

    def _share(
        self,
        cur: list[np.ndarray],
        refs: list[list[np.ndarray]],
        slices: list[tuple[int, int, int, int]],
    ) -> Stats:
        """One thread's slices ``(index, region, start, stop)``: the kernel's per-segment
        statistics, added into per-tensor ones."""
        n_refs = len(refs)
        st = Stats.zeros(n_refs, self.per, len(self.layout.names))
        buf = np.empty(BLOCK, dtype=np.float32)
        for s, g, lo, hi in slices:
            c = cur[g][lo:hi]
            r0 = refs[0][g][lo:hi] if n_refs else c
            r1 = refs[1][g][lo:hi] if n_refs > 1 else r0
            bounds, tensors = self.segments[s]
            _kernel(
                c,
                r0,
                r1,
                n_refs,
                bounds,
                tensors,
                self.atol,
                self.rtol,
                self.ps,
                buf,
                st.sq,
                st.sums,
                st.linf,
                st.changed,
            )
        return st


@numba.njit(nogil=True, cache=True, fastmath={"reassoc", "nsz"})
def _kernel(c, r0, r1, n_refs, bounds, tensors, atol, rtol, ps, buf, sq, sums, linf, changed):
    """The statistics of the segments ``c[bounds[s]:bounds[s + 1]]`` against the same
    entries of ``r0`` and ``r1`` (the first ``n_refs`` of them), added into tensor
    ``tensors[s]`` of the arrays of :class:`Stats`: Σθ² into ``sq``; per reference Σ|d|,
    Σd², Σθ·θ_ref and Σ|d|^p for each p into ``sums``, max |d| into ``linf`` and the count of
    |d| > atol + rtol·|θ_ref| into ``changed``.

    One read of each array: a segment is walked in blocks of BLOCK entries; a block's sums
    run in float32 (vectorised, many partial sums) and are added into float64. |d| of the
    block goes to ``buf`` (in the cache) for the powers and the maximum, which is taken on
    the bit patterns as integers: the same order for non-negative floats, and NaN sorts
    above inf, so it propagates."""
    n_p = ps.shape[0]
    bits = buf.view(np.int32)
    for s in range(bounds.shape[0] - 1):
        t = tensors[s]
        lo, hi = bounds[s], bounds[s + 1]
        for b in range(lo, hi, BLOCK):
            e = min(b + BLOCK, hi)
            m = e - b
            x = c[b:e]
            acc = np.float32(0.0)
            for i in range(m):
                acc += x[i] * x[i]
            sq[t] += acc
            for j in range(n_refs):
                y = r0[b:e] if j == 0 else r1[b:e]
                l1 = np.float32(0.0)
                l2 = np.float32(0.0)
                dot = np.float32(0.0)
                count = 0
                for i in range(m):
                    d = abs(x[i] - y[i])
                    buf[i] = d
                    l1 += d
                    l2 += d * d
                    dot += x[i] * y[i]
                    count += d > atol + rtol * abs(y[i])
                sums[j, 0, t] += l1
                sums[j, 1, t] += l2
                sums[j, 2, t] += dot
                changed[j, t] += count
                for q in range(n_p):
                    p = ps[q]
                    acc = np.float32(0.0)
                    if p == 1.0:
                        acc = l1
                    elif p == 2.0:
                        acc = l2
                    elif p == 3.0:
                        for i in range(m):
                            acc += buf[i] * buf[i] * buf[i]
                    elif p == 4.0:
                        for i in range(m):
                            acc += (buf[i] * buf[i]) * (buf[i] * buf[i])
                    else:
                        pf = np.float32(p)
                        for i in range(m):
                            acc += buf[i] ** pf
                    sums[j, 3 + q, t] += acc
                top = np.int32(0)
                for i in range(m):
                    top = max(top, bits[i])
                bits[0] = top
                v = np.float64(buf[0])
                if v > linf[j, t] or v != v:
                    linf[j, t] = v


def _group(keys: list[str], keep: np.ndarray) -> tuple[list[str], list[np.ndarray]]:
    """The distinct keys of the kept tensors in order of first appearance, and the kept
    tensor indices of each."""
    order = list(dict.fromkeys(g for g, k in zip(keys, keep, strict=True) if k))
    members: dict[str, list[int]] = {g: [] for g in order}
    for i, (g, k) in enumerate(zip(keys, keep, strict=True)):
        if k:
            members[g].append(i)
    return order, [np.array(members[g], dtype=np.intp) for g in order]


def _table(
    layout: Layout, init: Point, points: list[tuple[Point, Point, Stats]], ps: list[float]
) -> pd.DataFrame:
    """The distances table from the per-tensor statistics of every checkpoint: tensor rows,
    then layer rows, then block rows; within each, checkpoint, reference, name order."""
    n_k, n_t = len(points), len(layout.names)
    sums = np.stack([st.sums for _, _, st in points])  # (checkpoint, reference, stat, tensor)
    linf = np.stack([st.linf for _, _, st in points])
    changed = np.stack([st.changed for _, _, st in points])
    cur_sq = np.stack([[cur.sq, cur.sq] for cur, _, _ in points])
    ref_sq = np.stack([[init.sq, prev.sq] for _, prev, _ in points])

    layers, layer_members = _group(layout.layer, layout.in_blocks)
    blocks, block_members = _group(layout.block, layout.in_blocks)
    levels = [
        ("tensor", layout.names, [np.array([i]) for i in range(n_t)], layout.in_blocks),
        ("layer", layers, layer_members, np.ones(len(layers), dtype=bool)),
        ("block", blocks, block_members, np.ones(len(blocks), dtype=bool)),
    ]
    cols: dict[str, list[Any]] = {c: [] for c in (*KEYS, "granularity", "name", "block")}
    num: dict[str, list[np.ndarray]] = {}

    def add(name: str, values: np.ndarray) -> None:
        num.setdefault(name, []).append(values.reshape(-1))

    for gran, names, members, in_blocks in levels:
        n_g = len(names)
        if not n_g:  # every tensor excluded from the sums
            continue

        def total(x: np.ndarray, reduce=np.sum, members=members) -> np.ndarray:
            """``x`` (..., tensor) reduced over each group's tensors: (..., group)."""
            return np.stack([reduce(x[..., m], axis=-1) for m in members], axis=-1)

        g_sums = total(sums)  # (checkpoint, reference, stat, group)
        g_linf = total(linf, np.max)
        g_changed = total(changed)
        numel = np.array([layout.numel[m].sum() for m in members], dtype=np.int64)
        first = [m[0] for m in members]
        depth = layout.depth[first]
        block = [layout.block[i] for i in first]
        shape = (n_k, 2, n_g)
        for col, per_point in (
            ("epoch", [p.epoch for p, _, _ in points]),
            ("step", [p.step for p, _, _ in points]),
            ("epoch_end", [p.epoch_end for p, _, _ in points]),
            ("ref_epoch", [[init.epoch, prev.epoch] for _, prev, _ in points]),
            ("ref_step", [[init.step, prev.step] for _, prev, _ in points]),
        ):
            v = np.asarray(per_point)
            v = v[:, None, None] if v.ndim == 1 else v[:, :, None]
            add(col, np.broadcast_to(v, shape))
        add("depth", np.broadcast_to(depth, shape))
        add("in_blocks", np.broadcast_to(in_blocks, shape))
        add("numel", np.broadcast_to(numel, shape))
        add("l1", g_sums[:, :, 0])
        add("l2sq", g_sums[:, :, 1])
        add("dot", g_sums[:, :, 2])
        for m, p in enumerate(ps):
            add(f"pow{p:g}", g_sums[:, :, 3 + m])
        add("linf", g_linf)
        add("changed", g_changed)
        add("cur_sq", total(cur_sq))
        add("ref_sq", total(ref_sq))
        cols["reference"] += [r for _ in range(n_k) for r in REFERENCES for _ in range(n_g)]
        cols["granularity"] += [gran] * (n_k * 2 * n_g)
        cols["name"] += list(names) * (n_k * 2)
        cols["block"] += block * (n_k * 2)

    v = {name: np.concatenate(parts) for name, parts in num.items()}
    return _derived(v, cols, ps)


def _derived(v: dict[str, np.ndarray], cols: dict[str, list[Any]], ps: list[float]) -> pd.DataFrame:
    """The table's columns from the summed statistics ``v`` (Σ|d|, Σd², Σθ·θ_ref, Σθ²,
    Σ|d|^p, counts, one entry per row) and the label columns ``cols``."""
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
            "in_blocks": v["in_blocks"].astype(bool),
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


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Torch's intra-op threads set to ``n`` for a while (the pass runs its own threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def compare(
    checkpoints: Iterable[Checkpoint | Path],
    *,
    atol: float = 1e-8,
    rtol: float = 1e-5,
    minkowski_p: list[float] | None = None,
    exclude: Iterable[str] = (),
) -> pd.DataFrame:
    """Distances of every checkpoint after the first against the first ('init') and against
    the one before it ('previous'), at tensor, layer and block granularity.

    ``checkpoints`` are in step order: :class:`Checkpoint` objects or paths (read one at a
    time). ``exclude``: glob patterns (fnmatch) on parameter keys left out of the layer and
    block rows (their tensor rows stay, ``in_blocks`` false). Returns one row per
    (checkpoint, reference, granularity, name)."""
    ps = [float(p) for p in (minkowski_p or [])]
    it = iter(checkpoints)
    first = next(it)
    first = first if isinstance(first, Checkpoint) else read_checkpoint(first)
    layout = Layout.from_checkpoint(first, exclude)
    threads = torch.get_num_threads()
    walk = _Pass(layout, atol, rtol, ps, threads)
    points: list[tuple[Point, Point, Stats]] = []
    with _torch_threads(1), ThreadPoolExecutor(threads) as pool:
        init_regions = _regions(first, layout)
        sq = walk.measure(init_regions, [], pool).sq
        init = prev = Point(first.epoch, first.step, first.epoch_end, sq)
        prev_regions = init_regions
        del first
        for item in it:
            ck = item if isinstance(item, Checkpoint) else read_checkpoint(item)
            regions = _regions(ck, layout)
            if prev is init:  # the first comparison: both references are the init
                st = walk.measure(regions, [init_regions], pool)
                st.sums, st.linf, st.changed = (
                    np.concatenate([a, a]) for a in (st.sums, st.linf, st.changed)
                )
            else:
                st = walk.measure(regions, [init_regions, prev_regions], pool)
            cur = Point(ck.epoch, ck.step, ck.epoch_end, st.sq)
            del ck
            points.append((cur, prev, st))
            prev, prev_regions = cur, regions
    if not points:
        raise CheckpointError("a run needs at least two checkpoints to measure distances")
    return _table(layout, init, points, ps)


def run_distances(checkpoint_dir: Path | str, run: FinishedRun, out: Path | str) -> pd.DataFrame:
    """Measure one run from its checkpoints and write ``distances.parquet``."""
    m = run.measures
    atol, rtol, ps = m.get("atol", 1e-8), m.get("rtol", 1e-5), m.get("minkowski_p", [])
    exclude = m.get("exclude", [])
    df = compare(
        list_checkpoints(checkpoint_dir), atol=atol, rtol=rtol, minkowski_p=ps, exclude=exclude
    )
    tables.insert_run_columns(df, run.run_id, run.spec, run.status)
    meta = {"run_id": run.run_id, "atol": atol, "rtol": rtol, "minkowski_p": ps}
    tables.write_parquet(df, out, {**meta, "exclude": exclude} if exclude else meta)
    return df


def frozen_table(
    distances: pd.DataFrame, masks: Path | str | None, run: FinishedRun, out: Path | str
) -> pd.DataFrame:
    """``frozen.parquet`` of a run: how much of the network never moved, per tensor, layer,
    block and the whole ``model``.

    - ``frac_changed_final``: the share of entries changed (``atol``/``rtol``) between the
      init and the final checkpoint (from ``distances``);
    - ``change_rate``: ‖θ_T − θ_0‖ / ‖θ_T‖, the ratio seed 002 plotted;
    - ``frac_never_moved``: the share of entries equal to their initial value after every
      step (exact; from the training's masks, ``gradients.track_reached``; else NaN);
    - ``frac_never_reached``: the share of entries that never received a non-zero gradient
      (exact zeros at every step; same masks).

    Block rows cover the tensors their distances rows cover (``measures.exclude`` left out);
    the ``model`` row counts every parameter."""
    d = distances[(distances["reference"] == "init")]
    final = d[d["step"] == d["step"].max()]
    final = final[final["granularity"] != "layer"]
    rows = final[["granularity", "name", "block", "depth", "numel", "changed", "l2", "norm"]].copy()
    tensors = rows[rows["granularity"] == "tensor"]
    whole = pd.DataFrame(
        {
            "granularity": ["model"],
            "name": ["model"],
            "block": [""],
            "depth": [-1],
            "numel": [tensors["numel"].sum()],
            "changed": [tensors["changed"].sum()],
            "l2": [np.sqrt((tensors["l2"] ** 2).sum())],
            "norm": [np.sqrt((tensors["norm"] ** 2).sum())],
        }
    )
    rows = pd.concat([rows, whole], ignore_index=True)
    rows["frac_changed_final"] = rows["changed"] / rows["numel"]
    with np.errstate(divide="ignore", invalid="ignore"):
        rows["change_rate"] = rows["l2"] / rows["norm"]
    rows["never_moved"] = np.nan
    rows["never_reached"] = np.nan
    if masks is not None and Path(masks).exists():
        counts = {}
        with safe_open(str(masks), framework="pt") as f:
            for name in tensors["name"]:
                moved = f.get_tensor(f"moved.{name}")
                reached = f.get_tensor(f"reached.{name}")
                counts[name] = (int((~moved).sum()), int((~reached).sum()))
        t = tensors.assign(
            never_moved=[counts[n][0] for n in tensors["name"]],
            never_reached=[counts[n][1] for n in tensors["name"]],
        )
        if "in_blocks" in final:  # block rows sum what the distances' block rows cover
            kept = final[final["granularity"] == "tensor"].set_index("name")["in_blocks"]
            in_blocks = t["name"].map(kept).astype(bool)
        else:
            in_blocks = pd.Series(True, index=t.index)
        by_block = t[in_blocks].groupby("block")[["never_moved", "never_reached"]].sum()
        for col in ("never_moved", "never_reached"):
            rows.loc[rows["granularity"] == "tensor", col] = rows["name"].map(
                t.set_index("name")[col]
            )
            rows.loc[rows["granularity"] == "block", col] = rows["name"].map(by_block[col])
            rows.loc[rows["granularity"] == "model", col] = t[col].sum()
    rows["frac_never_moved"] = rows["never_moved"] / rows["numel"]
    rows["frac_never_reached"] = rows["never_reached"] / rows["numel"]
    rows = rows.drop(columns=["changed", "l2", "norm"])
    tables.insert_run_columns(rows, run.run_id, run.spec, run.status)
    m = run.measures
    tables.write_parquet(
        rows, out, {"run_id": run.run_id, "atol": m.get("atol"), "rtol": m.get("rtol")}
    )
    return rows
