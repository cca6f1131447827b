"""Layer-wise representation similarity: linear CKA between every pair of blocks of two
runs (the layer-by-layer heatmaps of Kornblith et al. 2019: across seeds, plain against
residual) and between one block and itself across the checkpoints of a run (how early each
depth settles).

Representation of a block. Each building block of ``Classifier.block_names()`` (input to
output) is a submodule; a forward hook on it (``site="output"``, the default) records what
it returns, on a probe set, in eval mode, without gradients, batch by batch. ``site="input"``
records what the block receives instead (a forward pre-hook): the representation entering
it. The two agree for the ResNets and VGGs, whose block modules return the representation
the next block reads; they differ for ``models.ConvStack`` (the ``deepnet-*``, ``cnn5-*``
models), whose block module is only the residual branch f(x): the representation after
block i, relu(x + f(x)), is the *input* of block i + 1 (and of ``fc``, pooled).

Reduction of a conv map (N x C x H x W) to one row per example, a registry
(:data:`REDUCTIONS`); 2-D outputs (linear layers) are kept as they are:

- ``mean`` (default): the global average over H x W, one value per channel (p = C): the
  features a pooled head reads. It forgets where in the image a channel fires.
- ``pool2`` / ``pool4``: adaptive average pooling to a 2x2 / 4x4 grid, flattened
  (p = 4C / 16C): keeps coarse spatial layout at 4 or 16 times the width. Maps smaller
  than the grid are upsampled by repetition (adaptive pooling), which weights their pixels
  unequally. Full flattening (p = CHW) is not offered: at full resolution it is hundreds of
  thousands of units per block of a deep net.

Memory. Linear CKA needs, for a cross term between two blocks (of two runs, computed and
saved at different times), each block's centred kernel K = Xc Xc^T (n x n) or, equally
well, its centred features Xc (n x p): tr(Kc Lc) = ||Yc^T Xc||_F^2. A p x p matrix
X^T X is *not* enough (it has lost which example is which, so no cross term can be formed),
so the exact bound per block is n x min(n, p) floats, not min(n, p)^2. Each block keeps:

- ``form="features"`` when p <= n: the centred features Xc (n x p), rows appended batch by
  batch (exactly the whole-matrix result, streamed);
- ``form="gram"`` when p > n: the centred Gram Kc = Xc Xc^T (n x n), independent of the
  width beyond n.

What stays after the pass (and in a saved file) is that, per block, float64; the conv maps
themselves are reduced inside the hook and never kept. During the pass the reduced rows are
held as float32 until the pass ends (n x p per block): an exact Gram of a block wider than
n needs all n rows of it at once (its entries pair examples of different batches, and no
smaller summary of past rows can form them), and the reduced width is what keeps that
bounded (mean: C floats per example, against C x H x W for the maps).

CKA from these forms (:func:`cka`): biased, HSIC(K, L) = tr(Kc Lc), and unbiased, the
HSIC_1 of Song et al. 2012 on the kernels of the centred features, with exactly the
definitions of ``features.linear_cka`` (whose helpers are reused), so both agree to float
rounding on the same activations. Cross terms per pair of forms: features-features
||Y^T X||_F^2 (O(n p q)), features-gram sum(X * (L X)) (O(n^2 p)), gram-gram sum(K * L)
(O(n^2)); :func:`cka_matrix` forms each features block's Gram once (O(n^2 p), one n x n
alive at a time) for its pairs with Gram-form blocks, O(n^2) each. On two ResNet-18s
(width 16, n = 1,000; benchmarks/bench_layer_similarity.py) the matrix takes about 1% of
their forward passes with ``mean`` and about a quarter with ``pool4`` (widths near n: O(n p
q) ~ n^3 a pair), with numpy's BLAS on one thread: on a loaded machine its default threads
can make it 10-50 times slower, so a job should limit them to its cores (threadpoolctl).
Written here rather than taken from a CKA library: those compare two activation
matrices held in memory and do not keep a reusable, width-bounded per-block summary.

Files: :func:`save_grams` / :func:`load_grams` (safetensors, never pickle; float64; the
probe indices and their SHA-256 optional, as ``features.save_features``), so each
run/checkpoint is reduced once and compared in many pairs.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from .checkpoints import read_safetensors, write_safetensors
from .features import _CONSTANT_RTOL, _hsic_unbiased, _hsic_unbiased_terms

FORMAT = "paramdyn-grams/1"
FORMS = ("features", "gram")


class GramsError(RuntimeError):
    """An unreadable or inconsistent Grams file."""


# --- reductions -------------------------------------------------------------------------------


def _pooled(side: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def reduce(x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x, side).flatten(1)

    return reduce


REDUCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "mean": lambda x: x.mean(dim=(2, 3)),
    "pool2": _pooled(2),
    "pool4": _pooled(4),
}


def reduce_output(x: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """One row per example: a conv map (N x C x H x W) through ``REDUCTIONS[reduction]``, a
    2-D output as it is; a float32 CPU copy (a later in-place op cannot change it)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; choose one of {sorted(REDUCTIONS)}")
    if x.ndim == 4:
        x = REDUCTIONS[reduction](x)
    elif x.ndim != 2:
        raise ValueError(
            f"a block output of shape {tuple(x.shape)}: only 2-D (N x units) and 4-D "
            "(N x C x H x W) outputs can be reduced to one row per example"
        )
    return x.detach().to("cpu", torch.float32, copy=True)


# --- one block's representation ---------------------------------------------------------------


@dataclass(eq=False)
class BlockGram:
    """A block's representation of the probe set in the smaller exact form: ``features``
    (centred n x p, p <= n) or ``gram`` (centred n x n, p > n); float64. ``width`` is p (the
    reduced width), ``depth`` the block's index in ``block_names()``, ``note`` why the
    block's CKA is undefined ("" when it is defined)."""

    block: str
    depth: int
    form: str
    matrix: np.ndarray
    width: int
    note: str = ""

    @property
    def n(self) -> int:
        return int(self.matrix.shape[0])

    @property
    def nbytes(self) -> int:
        return int(self.matrix.nbytes)

    @cached_property
    def self_hsic(self) -> float:
        """tr(Kc Kc) = ||Xc^T Xc||_F^2."""
        m = self.matrix
        return _sq(m.T @ m) if self.form == "features" else _sq(m)

    @cached_property
    def unbiased_terms(self) -> dict[str, Any]:
        """diag(Kc), Kc~ 1 and 1^T Kc~ 1 (features._hsic_unbiased_terms)."""
        if self.form == "features":
            return _hsic_unbiased_terms(self.matrix)
        diag = np.diag(self.matrix).copy()
        return {
            "diag": diag,
            "k1": self.matrix.sum(axis=1) - diag,
            "sum": float(self.matrix.sum() - diag.sum()),
        }


def _sq_dot(K: np.ndarray, Lm: np.ndarray) -> float:
    """sum(K * L), i.e. tr(K L^T): one pass, no temporary."""
    return float(np.einsum("ij,ij->", K, Lm))


def _sq(m: np.ndarray) -> float:
    return _sq_dot(m, m)


def _note(X: np.ndarray, mean: np.ndarray, colsq: np.ndarray) -> str:
    """Why CKA is undefined for these features (features.linear_cka's rules), or ""."""
    if not np.isfinite(mean).all():
        return "features contain NaN or inf (a diverged model?)"
    if (colsq <= _CONSTANT_RTOL**2 * (colsq + X.shape[0] * mean**2)).all():
        return f"features are constant over the probe set (zero variance in all {X.shape[1]} units)"
    return ""


def from_activations(block: str, X, depth: int = 0) -> BlockGram:
    """The :class:`BlockGram` of activations X (n x p, rows = probe samples; numpy or
    torch): centred features when p <= n, else the centred Gram."""
    if hasattr(X, "detach"):
        X = X.detach().cpu().numpy()
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[0] < 2 or X.shape[1] < 1:
        raise ValueError(
            f"block {block}: activations of shape {X.shape}; need 2-D with at least 2 probe "
            "samples and 1 unit"
        )
    n, p = X.shape
    mean = X.mean(axis=0)
    Xc = X - mean
    note = _note(X, mean, np.einsum("ij,ij->j", Xc, Xc))
    if p <= n:
        return BlockGram(block, depth, "features", Xc, p, note)
    return BlockGram(block, depth, "gram", Xc @ Xc.T, p, note)


# --- CKA from the stored forms ----------------------------------------------------------------

_CROSS: dict[tuple[str, str], Callable[[np.ndarray, np.ndarray], float]] = {
    ("features", "features"): lambda X, Y: _sq(Y.T @ X),
    ("features", "gram"): lambda X, L: float(np.einsum("ij,ij->", X, L @ X)),
    ("gram", "features"): lambda K, Y: float(np.einsum("ij,ij->", Y, K @ Y)),
    ("gram", "gram"): lambda K, Lm: _sq_dot(K, Lm),
}


def cka(a: BlockGram, b: BlockGram, unbiased: bool = False, *, cross: float | None = None) -> float:
    """Linear CKA of two blocks' representations of the same probe samples: HSIC(K, L) /
    sqrt(HSIC(K, K) HSIC(L, L)), biased (tr(Kc Lc)) or unbiased (Song et al. 2012), as
    ``features.linear_cka`` defines them. ``cross``: tr(Kc Lc) when already computed.
    Raises ValueError when it is undefined."""
    if a.n != b.n:
        raise ValueError(
            f"blocks {a.block} and {b.block} have {a.n} and {b.n} probe samples: Grams must "
            "come from the same probe set"
        )
    for g in (a, b):
        if g.note:
            raise ValueError(f"block {g.block}: {g.note}; the similarity is undefined")
    if a is b:
        xy = a.self_hsic
    elif cross is not None:
        xy = cross
    else:
        xy = _CROSS[(a.form, b.form)](a.matrix, b.matrix)
    xx, yy = a.self_hsic, b.self_hsic
    if not unbiased:
        return xy / math.sqrt(xx * yy)
    n = a.n
    if n < 4:
        raise ValueError(f"unbiased HSIC needs at least 4 probe samples, got {n}")
    ta, tb = a.unbiased_terms, b.unbiased_terms
    hxx, hyy = _hsic_unbiased(xx, ta, ta, n), _hsic_unbiased(yy, tb, tb, n)
    for h, sq, g in ((hxx, xx, a), (hyy, yy, b)):
        # not positive, or lost in the rounding of terms of size sq / (n (n - 3))
        if not h > 1e-10 * sq / (n * (n - 3)):
            raise ValueError(
                f"block {g.block}: unbiased HSIC with itself is {h:.3g}, not positive, with "
                f"{n} probe samples: too few for the estimate; raise the probe size"
            )
    hxy = hxx if a is b else _hsic_unbiased(xy, ta, tb, n)
    return hxy / math.sqrt(hxx * hyy)


def _value(
    a: BlockGram, b: BlockGram, unbiased: bool, errors: str, cross: float | None = None
) -> tuple[float, str]:
    try:
        return float(cka(a, b, unbiased, cross=cross)), ""
    except ValueError as e:
        if errors == "raise":
            raise
        return math.nan, str(e)


def _mixed_cross_terms(
    blocks_a: Sequence[BlockGram], blocks_b: Sequence[BlockGram]
) -> dict[tuple[int, int], float]:
    """tr(Kc Lc) of every pair of a features-form block with a Gram-form block, by
    (index in a, index in b): each features block's Gram is formed once (O(n^2 p), one n x n
    matrix alive at a time) and met with every Gram of the other side (O(n^2) a pair),
    instead of O(n^2 p) a pair."""
    out: dict[tuple[int, int], float] = {}
    for mine, other, flip in ((blocks_a, blocks_b, False), (blocks_b, blocks_a, True)):
        grams = [(j, g) for j, g in enumerate(other) if g.form == "gram"]
        for i, f in enumerate(mine):
            if f.form != "features" or not grams or f.n != grams[0][1].n:
                continue
            K = f.matrix @ f.matrix.T
            for j, g in grams:
                out[(j, i) if flip else (i, j)] = _sq_dot(K, g.matrix)
            del K
    return out


def _check_errors(errors: str) -> None:
    if errors not in ("raise", "nan"):
        raise ValueError(f"errors must be 'raise' or 'nan', got {errors!r}")


def cka_matrix(
    grams_a: Mapping[str, BlockGram],
    grams_b: Mapping[str, BlockGram],
    unbiased: bool = False,
    *,
    errors: str = "raise",
) -> pd.DataFrame:
    """The layer-by-layer CKA matrix of two runs (or of a run with itself): one row per
    (block of a, block of b), columns ``block_a, depth_a, block_b, depth_b, cka, note``.
    ``errors="nan"`` records an undefined value (a dead block) as NaN with the reason in
    ``note`` instead of raising."""
    _check_errors(errors)
    mixed = _mixed_cross_terms(list(grams_a.values()), list(grams_b.values()))
    rows = []
    for i, a in enumerate(grams_a.values()):
        for j, b in enumerate(grams_b.values()):
            value, note = _value(a, b, unbiased, errors, mixed.get((i, j)))
            rows.append((a.block, a.depth, b.block, b.depth, value, note))
    return pd.DataFrame(rows, columns=["block_a", "depth_a", "block_b", "depth_b", "cka", "note"])


REFERENCES: dict[str, Callable[[Sequence[int]], int]] = {"final": max, "first": min}


def cka_over_checkpoints(
    grams_by_step: Mapping[int, Mapping[str, BlockGram]],
    reference: str | int = "final",
    unbiased: bool = False,
    *,
    errors: str = "raise",
) -> pd.DataFrame:
    """Each block at each checkpoint against the same block at the ``reference`` checkpoint
    (``"final"``: the last step, ``"first"``: the first, or a step number): columns
    ``block, depth, step, cka, note``, one row per (block, step). A block that reaches CKA
    near 1 early has settled early."""
    _check_errors(errors)
    if not grams_by_step:
        raise ValueError("cka_over_checkpoints: no checkpoints")
    steps = sorted(int(s) for s in grams_by_step)
    if isinstance(reference, str):
        if reference not in REFERENCES:
            raise ValueError(
                f"unknown reference {reference!r}; choose one of {sorted(REFERENCES)} or a step"
            )
        ref_step = REFERENCES[reference](steps)
    elif int(reference) in steps:
        ref_step = int(reference)
    else:
        raise ValueError(f"reference step {reference} is not among the checkpoints {steps}")
    ref = grams_by_step[ref_step]
    rows = []
    for step in steps:
        grams = grams_by_step[step]
        if set(grams) != set(ref):
            raise ValueError(
                f"step {step} has blocks {sorted(grams)}, the reference step {ref_step} "
                f"{sorted(ref)}: compute every checkpoint's Grams for the same blocks"
            )
        for name, g in ref.items():
            value, note = _value(grams[name], g, unbiased, errors)
            rows.append((name, g.depth, step, value, note))
    df = pd.DataFrame(rows, columns=["block", "depth", "step", "cka", "note"])
    return df.sort_values(["depth", "step"], kind="stable").reset_index(drop=True)


# --- streaming over a model's blocks ----------------------------------------------------------

SITES = ("output", "input")


def _register(module: torch.nn.Module, site: str, record: Callable[[torch.Tensor], None]):
    if site == "output":
        return module.register_forward_hook(lambda _m, _args, out: record(out))
    return module.register_forward_pre_hook(lambda _m, args: record(args[0]))


def _blocks_of(model, blocks: Sequence[str] | None) -> list[tuple[str, int]]:
    names = list(model.block_names())
    wanted = names if blocks is None else list(blocks)
    unknown = [b for b in wanted if b not in names]
    if unknown:
        raise ValueError(f"blocks {unknown} are not blocks of this model; its blocks: {names}")
    return sorted(((b, names.index(b)) for b in dict.fromkeys(wanted)), key=lambda t: t[1])


def block_grams(
    model,
    batches: Iterable,
    blocks: Sequence[str] | None = None,
    reduction: str = "mean",
    *,
    site: str = "output",
) -> dict[str, BlockGram]:
    """The :class:`BlockGram` of each block (default: all of ``model.block_names()``), in
    order input -> output, on the probe batches (tensors, or (x, y) pairs, on the model's
    device). Hooks record each block's ``site`` (``"output"`` or ``"input"``) reduced by
    ``reduction`` (``REDUCTIONS``); eval mode, no gradients; the model's mode is restored
    and the hooks removed afterwards."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; choose one of {sorted(REDUCTIONS)}")
    if site not in SITES:
        raise ValueError(f"unknown site {site!r}; choose one of {list(SITES)}")
    chosen = _blocks_of(model, blocks)
    rows: dict[str, list[torch.Tensor]] = {b: [] for b, _ in chosen}
    handles = [
        _register(
            model.get_submodule(b),
            site,
            lambda out, b=b: rows[b].append(reduce_output(out, reduction)),
        )
        for b, _ in chosen
    ]
    was_training, n = model.training, 0
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                x = batch[0] if isinstance(batch, tuple | list) else batch
                model(x)
                n += x.shape[0]
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if n == 0:
        raise ValueError("block_grams: no batches")
    out = {}
    for b, depth in chosen:
        got = sum(r.shape[0] for r in rows[b])
        if got != n:
            raise ValueError(
                f"block {b} recorded {got} rows for {n} probe samples (a module called "
                "more or less than once per forward pass): it cannot be a block here"
            )
        # one block at a time: its float32 rows become its float64 stored form, then go
        out[b] = from_activations(b, torch.cat(rows.pop(b)), depth)
    return out


def checkpoint_grams(
    checkpoint: Path | str,
    dataset_path: Path | str,
    *,
    model_name: str,
    dataset: str,
    indices: Sequence[int] | np.ndarray,
    model_settings: Mapping[str, Any] | None = None,
    normalize: bool | Mapping[str, Any] = True,
    inputs: Mapping[str, Any] | None = None,
    blocks: Sequence[str] | None = None,
    reduction: str = "mean",
    site: str = "output",
    batch_size: int = 500,
    device: str = "cpu",
) -> dict[str, BlockGram]:
    """:func:`block_grams` of a checkpoint's model on the probe ``indices`` of a prepared
    dataset (as ``features.checkpoint_features``; ``normalize`` and ``inputs`` must be the
    run's)."""
    from .features import probe_batches
    from .loaders import ModelForm, model_and_data

    form = ModelForm(model_name, dataset, model_settings, normalize, inputs)
    model, data = model_and_data(dataset_path, form, checkpoint, device)
    batches = probe_batches(data, indices, batch_size)
    return block_grams(model, batches, blocks, reduction, site=site)


# --- files ------------------------------------------------------------------------------------


def save_grams(
    path: Path | str,
    grams: Mapping[str, BlockGram],
    metadata: Mapping[str, Any] | None = None,
    *,
    indices: Sequence[int] | np.ndarray | None = None,
) -> Path:
    """Write the blocks' stored matrices (float64) to a safetensors file, atomically and
    byte-reproducibly; ``metadata`` (JSON-serialisable) is kept, and ``indices`` (the probe
    indices), when given, are stored with their SHA-256 as ``probe_sha256``."""
    path = Path(path)
    if not grams:
        raise ValueError(f"{path}: no blocks to save")
    ns = sorted({g.n for g in grams.values()})
    if len(ns) != 1:
        raise ValueError(f"{path}: blocks have different probe sizes {ns}")
    tensors = {
        f"block/{name}": torch.from_numpy(np.ascontiguousarray(g.matrix))
        for name, g in grams.items()
    }
    meta = dict(metadata or {})
    if indices is not None:
        idx = np.ascontiguousarray(np.asarray(indices, dtype=np.int64))
        if idx.shape != (ns[0],):
            raise ValueError(f"{path}: {idx.size} probe indices for {ns[0]} probe samples")
        tensors["indices"] = torch.from_numpy(idx.copy())
        meta["probe_sha256"] = hashlib.sha256(idx.tobytes()).hexdigest()
    blocks = [
        {"block": g.block, "depth": g.depth, "form": g.form, "width": g.width, "note": g.note}
        for g in grams.values()
    ]
    header = {
        "format": FORMAT,
        "paramdyn": json.dumps(meta, sort_keys=True),
        "blocks": json.dumps(blocks),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(tensors, path, header)
    return path


def _block_from_file(path: Path, info: Mapping[str, Any], tensors) -> BlockGram:
    name = info["block"]
    t = tensors.get(f"block/{name}")
    if t is None or info["form"] not in FORMS:
        raise GramsError(f"{path}: block {name} is missing or has form {info['form']!r}")
    m = t.numpy()
    n = m.shape[0]
    expected = (n, info["width"]) if info["form"] == "features" else (n, n)
    if m.ndim != 2 or m.shape != expected:
        raise GramsError(f"{path}: block {name} has shape {m.shape}, expected {expected}")
    return BlockGram(name, int(info["depth"]), info["form"], m, int(info["width"]), info["note"])


def load_grams(path: Path | str) -> tuple[dict[str, BlockGram], dict[str, Any]]:
    """Read a Grams file: ({block: BlockGram}, metadata); the metadata holds what was saved,
    plus ``indices`` (int64 tensor) when the file has them. Raises GramsError naming the
    file when it is unreadable, truncated or not a Grams file."""
    path = Path(path)
    header, tensors = read_safetensors(
        path, what="Grams file", fix="delete it to rebuild", error=GramsError
    )
    if header.get("format") != FORMAT:
        raise GramsError(f"{path}: not a paramdyn Grams file (format {header.get('format')!r})")
    try:
        meta = json.loads(header.get("paramdyn", "{}"))
        blocks = json.loads(header["blocks"])
        grams = {b["block"]: _block_from_file(path, b, tensors) for b in blocks}
    except (KeyError, TypeError, ValueError) as e:
        raise GramsError(f"{path}: corrupt metadata ({e}); delete it to rebuild") from e
    if len({g.n for g in grams.values()}) > 1:
        raise GramsError(f"{path}: blocks have different probe sizes")
    if "indices" in tensors:
        meta["indices"] = tensors["indices"]
    return grams, meta
