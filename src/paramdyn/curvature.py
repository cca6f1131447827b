"""Curvature of a checkpoint: the top Hessian eigenvalue and the Hutchinson trace of the
training loss, for the whole model and for each building block (issue 15).

The loss is the one the checkpoint defines: the mean ``loss_fn`` (default cross-entropy)
over a FIXED list of batches (a training subset, :func:`subset_batches`), with the model in
eval mode: BatchNorm normalises with its running statistics (so the loss is a sum over
samples and the Hessian does not depend on how the subset is batched) and Dropout is off.
Each function puts the model in eval mode for its duration and restores every module's
mode afterwards. ``loss_fn(output, target)`` must return the batch MEAN; the batches are
weighted by their sizes, so the loss is the mean over the whole subset.

Hessian-vector products (HVPs) are exact, with ``torch.func``: reverse-over-reverse,
``vjp(grad(loss))``, taken at the checkpoint's parameters with respect to all of them or a
subset (a block's: the keys that :func:`checkpoints.block_of` assigns to it); every other
parameter and buffer is a constant. One HVP is one pass over the batches (the sum of the
per-batch HVPs, weighted by batch size), in the model's dtype and on its device. Of the
three exact HVPs, on ResNet-18 on the 2-core CPU (benchmarks/bench_curvature.py prints
them) reverse-over-reverse took 0.70-0.93 of forward-over-reverse (``jvp(grad)``, the
torch.func docs' general recommendation) and double ``autograd.grad`` 0.87-1.0: the
fastest, so it is the one used. One HVP costs about 3-4 forward+backward passes.
``torch.func.linearize`` (which would cache the primal pass across HVPs) was tried:
tracing ResNet-18 took over a minute and the HVP was no faster on CPU.

Top eigenvalue: the Lanczos recurrence (:func:`_lanczos_top`), one HVP per step, from a
seeded random start, until its residual estimate ``β_j |s_j|`` is at most ``tol * |θ|``; we
then spend one more HVP to measure ``||Hv - θv|| / |θ|`` exactly, and record the Lanczos
steps, the HVPs in all, the residual and a converged flag. ARPACK's implicitly restarted
Lanczos (``scipy.sparse.linalg.eigsh``), which this module used first, took the same
number of steps on ResNet-18 (21 against 20) but spent about 0.28 s of its own per step at
11M parameters re-orthogonalising (a fifth of a 256-image HVP): the plain recurrence needs
two vector updates per step (benchmarks/bench_curvature.py: ratio 1.33 with ARPACK, 1.02
with it). Lanczos rather than PyHessian's power iteration: to reach the same residual,
power iteration needs many more HVPs (its error shrinks as (lambda2/lambda1)^k; Lanczos's as
a Chebyshev polynomial in the gap), which tests/test_curvature.py checks on a clustered
spectrum.

Trace: Hutchinson's estimator with Rademacher probes v, tr(H) = E[vᵀHv]. For block b,
E[v_bᵀ (Hv)_b] = tr(H_bb) for a probe over ALL parameters (the cross terms
E[v_b v_cᵀ] = 0 vanish in expectation), so one HVP per probe gives every block's trace
(and the model's, their sum) at once: :func:`block_traces`. Its variance is larger than
that of probes supported on the block alone (the cross terms add variance, not bias); each
estimate carries its standard error over the probes. :func:`hutchinson_trace` restricted
to a block (``params``) uses probes supported on that block instead.

HVPs are torch.func and the tridiagonal eigenproblem is scipy's; the Lanczos recurrence
(twenty lines, instead of ARPACK: see above) and the Hutchinson loop (no maintained library
offers it for torch.func HVPs of a parameter subset) are ours.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vjp

from .checkpoints import block_of
from .features import probe_indices

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Batch = tuple[torch.Tensor, torch.Tensor]


# --- the fixed training subset -------------------------------------------------------------


def subset_batches(data, size: int, batch_size: int = 128, seed: int = 0) -> list[Batch]:
    """A fixed training subset of a ``data.DeviceData``: ``size`` training images drawn by
    :func:`features.probe_indices` (seeded, without replacement, sorted; all of them when
    ``size`` is at least the split), normalised as evaluation batches are (no augmentation),
    as a list of (x, y) batches of at most ``batch_size`` on the data's device. Same data,
    size and seed, same subset: every checkpoint of a run is measured on the same loss."""
    indices = probe_indices(data.train_x.shape[0], size, seed)
    return data.subset_batches("train", indices, batch_size)


# --- Hessian-vector products ---------------------------------------------------------------


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode inside the block; every module's own mode restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.train(training)


def parameter_names(model: nn.Module, params: Sequence[str] | None = None) -> list[str]:
    """The trainable parameter names ``params`` (all when None), in the model's order;
    raises ValueError on a name that is not a trainable parameter, or an empty list."""
    names = [k for k, p in model.named_parameters() if p.requires_grad]
    if params is None:
        chosen = names
    else:
        unknown = sorted(set(params) - set(names))
        if unknown:
            raise ValueError(
                f"curvature: {unknown} are not trainable parameters of the model; pass keys "
                "of model.named_parameters() (a block's: those block_of assigns to it)"
            )
        chosen = [k for k in names if k in set(params)]
    if not chosen:
        raise ValueError("curvature: no parameters to differentiate (params is empty)")
    return chosen


class Hessian:
    """The Hessian of the mean loss over ``batches`` with respect to the parameters
    ``names`` at the model's current values, as HVPs (:meth:`hvp` on dicts of tensors,
    :meth:`matvec` on flat float64 numpy vectors). The caller puts the model in eval mode.
    ``hvps`` counts the products taken."""

    def __init__(self, model: nn.Module, batches: Sequence[Batch], names, loss_fn: LossFn):
        if not batches:
            raise ValueError("curvature: no batches (pass a non-empty list of (x, y))")
        self.model, self.loss_fn, self.names = model, loss_fn, list(names)
        named = dict(model.named_parameters())
        self.primal = {k: named[k].detach() for k in self.names}
        self.fixed = {k: p.detach() for k, p in named.items() if k not in self.primal}
        self.batches = list(batches)
        total = sum(int(y.shape[0]) for _, y in self.batches)
        self.weights = [int(y.shape[0]) / total for _, y in self.batches]
        self.numels = [self.primal[k].numel() for k in self.names]
        self.size = sum(self.numels)
        first = self.primal[self.names[0]]
        self.dtype, self.device = first.dtype, first.device
        self.hvps = 0

    def _loss(self, p: dict, x: torch.Tensor, y: torch.Tensor, w: float) -> torch.Tensor:
        return self.loss_fn(functional_call(self.model, {**self.fixed, **p}, (x,)), y) * w

    def hvp(self, v: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """H v: one pass over the batches, each batch's HVP weighted by its share."""
        out: dict[str, torch.Tensor] | None = None
        for (x, y), w in zip(self.batches, self.weights, strict=True):
            _, pull = vjp(lambda p, x=x, y=y, w=w: grad(self._loss)(p, x, y, w), self.primal)
            (hv,) = pull(v)
            if out is None:
                out = hv
            else:
                for k in out:
                    out[k].add_(hv[k])
        self.hvps += 1
        return out

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = torch.split(flat, self.numels)
        return {k: t.view_as(self.primal[k]) for k, t in zip(self.names, parts, strict=True)}

    def flatten(self, d: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([d[k].reshape(-1) for k in self.names])

    @property
    def numpy_dtype(self) -> type:
        """The numpy dtype of :meth:`matvec`'s vectors: float64 for a float64 model, float32
        otherwise (HVPs of a float32 model are no more accurate than that)."""
        return np.float64 if self.dtype == torch.float64 else np.float32

    def matvec(self, x: np.ndarray) -> np.ndarray:
        """H x for a flat numpy vector; the HVP in the model's dtype. On a CPU model whose
        dtype is :attr:`numpy_dtype`, x is used in place (the HVP only reads it)."""
        x = np.ascontiguousarray(x, dtype=self.numpy_dtype).reshape(-1)
        v = torch.from_numpy(x).to(device=self.device, dtype=self.dtype)
        hv = self.flatten(self.hvp(self.unflatten(v)))
        return hv.to(device="cpu", dtype=torch.from_numpy(x).dtype).numpy()


# --- top eigenvalue -------------------------------------------------------------------------


def top_eigenvalue(
    model: nn.Module,
    batches: Sequence[Batch],
    params: Sequence[str] | None = None,
    *,
    tol: float = 1e-3,
    max_iter: int = 100,
    seed: int = 0,
    loss_fn: LossFn = F.cross_entropy,
) -> dict:
    """The largest (algebraic) eigenvalue of the Hessian of the mean loss w.r.t. ``params``
    (all trainable parameters when None) by the Lanczos recurrence (:func:`_lanczos_top`)
    from a seeded random start, at most ``max_iter`` steps (memory: that many vectors of
    the parameters' size). Returns value, iterations (Lanczos steps = their HVPs), hvps (all,
    with the residual's), residual ``||Hv - value v|| / |value|`` (measured with one more
    HVP) and converged (the recurrence's estimate met ``tol`` and so does the measured
    residual)."""
    if tol <= 0 or max_iter < 1:
        raise ValueError(f"top_eigenvalue: need tol > 0 and max_iter >= 1, got {tol}, {max_iter}")
    with eval_mode(model):
        H = Hessian(model, batches, parameter_names(model, params), loss_fn)
        gen = torch.Generator().manual_seed(seed)
        start = torch.randn(H.size, generator=gen, dtype=torch.float64)
        value, vec, met = _lanczos_top(H, start.to(H.device, H.dtype), tol, max_iter)
        steps = H.hvps
        r = H.flatten(H.hvp(H.unflatten(vec))).double() - value * vec.double()
        residual = float(r.norm() / abs(value)) if value else math.inf
        return _eig_row(value, steps, H.hvps, residual, met and residual <= tol)


def _lanczos_top(
    H: Hessian, q: torch.Tensor, tol: float, max_steps: int
) -> tuple[float, torch.Tensor, bool]:
    """(θ, x, met): the largest Ritz value of the Lanczos recurrence on ``H`` from ``q``
    and its unit Ritz vector, stopping when the recurrence's residual estimate
    ``β_j |s_j| / |θ|`` is at most ``tol`` (met) or after ``max_steps`` HVPs.

    Written here rather than taken from ARPACK (``eigsh``), which this module used first:
    ARPACK re-orthogonalises every step against all its Lanczos vectors and restarts,
    about 0.2-0.3 s of memory traffic per step at 11M parameters on the 2-core CPU (a
    fifth of a 256-image HVP of ResNet-18), while the extreme eigenvalue needs neither:
    the plain three-term recurrence finds it as fast in steps (loss of orthogonality only
    adds spurious copies of converged Ritz values, never a wrong largest one; Paige 1980),
    at two vector updates per step. The tridiagonal's eigenproblem is scipy's
    ``eigh_tridiagonal``; the caller measures the residual of the returned vector exactly."""
    from scipy.linalg import eigh_tridiagonal

    q = q / q.norm()
    basis, alphas, betas = [], [], []
    prev, beta = None, 0.0
    theta, s, met = math.nan, np.ones(1), False
    for j in range(max_steps):
        basis.append(q)
        w = H.flatten(H.hvp(H.unflatten(q)))
        alpha = float(torch.dot(w.double(), q.double()))
        w.sub_(q, alpha=alpha)
        if prev is not None:
            w.sub_(prev, alpha=beta)
        alphas.append(alpha)
        beta = float(w.norm())
        vals, vecs = eigh_tridiagonal(
            np.array(alphas), np.array(betas), select="i", select_range=(j, j)
        )
        theta, s = float(vals[0]), vecs[:, 0]
        if theta and abs(beta * s[-1]) <= tol * abs(theta) or beta <= 1e-12 * abs(alpha):
            met = True
            break
        betas.append(beta)
        prev, q = q, w / beta
    x = torch.zeros_like(basis[0])
    for coef, v in zip(s, basis, strict=True):
        x.add_(v, alpha=float(coef))
    return theta, x / x.norm(), met


def _eig_row(value, iterations, hvps, residual, converged) -> dict:
    return {
        "value": value,
        "iterations": iterations,
        "hvps": hvps,
        "residual": residual,
        "converged": bool(converged),
    }


# --- Hutchinson trace -----------------------------------------------------------------------


def block_traces(
    model: nn.Module,
    batches: Sequence[Batch],
    groups: dict[str, Sequence[str]],
    *,
    samples: int = 64,
    seed: int = 0,
    loss_fn: LossFn = F.cross_entropy,
) -> dict[str, dict]:
    """Hutchinson estimates of tr(H_gg) for each group of parameter names, all from the
    same ``samples`` Rademacher probes over the union of the groups (one HVP per probe):
    the mean of v_gᵀ (Hv)_g, unbiased since the cross terms vanish in expectation.
    group name -> {value, stderr (over the probes; nan for one probe), samples}."""
    if samples < 1:
        raise ValueError(f"block_traces: samples must be at least 1, got {samples}")
    if not groups or any(len(keys) == 0 for keys in groups.values()):
        raise ValueError("block_traces: every group needs at least one parameter name")
    union = {k for keys in groups.values() for k in keys}
    gen = torch.Generator().manual_seed(seed)
    with eval_mode(model):
        H = Hessian(model, batches, parameter_names(model, sorted(union)), loss_fn)
        per_key = np.empty((samples, len(H.names)))
        for s in range(samples):
            flat = torch.randint(0, 2, (H.size,), generator=gen, dtype=torch.int8)
            flat = flat.to(device=H.device, dtype=H.dtype) * 2 - 1
            v = H.unflatten(flat)
            hv = H.hvp(v)
            per_key[s] = [float((v[k] * hv[k]).sum(dtype=torch.float64)) for k in H.names]
    col = {k: i for i, k in enumerate(H.names)}
    out = {}
    for name, keys in groups.items():
        est = per_key[:, [col[k] for k in keys]].sum(axis=1)
        stderr = float(est.std(ddof=1) / math.sqrt(samples)) if samples > 1 else math.nan
        out[name] = {"value": float(est.mean()), "stderr": stderr, "samples": samples}
    return out


def hutchinson_trace(
    model: nn.Module,
    batches: Sequence[Batch],
    params: Sequence[str] | None = None,
    *,
    samples: int = 64,
    seed: int = 0,
    loss_fn: LossFn = F.cross_entropy,
) -> dict:
    """Hutchinson's estimate of the trace of the Hessian w.r.t. ``params`` (all trainable
    parameters when None), Rademacher probes supported on those parameters only (one HVP
    each): {value, stderr, samples}."""
    names = parameter_names(model, params)
    return block_traces(
        model, batches, {"all": names}, samples=samples, seed=seed, loss_fn=loss_fn
    )["all"]


# --- one checkpoint, every scope ------------------------------------------------------------


def block_parameters(model: nn.Module, blocks: Sequence[str]) -> dict[str, list[str]]:
    """block name -> its trainable parameter names (``checkpoints.block_of``), input to
    output, blocks without parameters left out."""
    out: dict[str, list[str]] = {}
    for key in parameter_names(model):
        out.setdefault(block_of(key, blocks)[0], []).append(key)
    return {b: out[b] for b in blocks if b in out}


def checkpoint_curvature(
    model: nn.Module,
    batches: Sequence[Batch],
    blocks: Sequence[str] | None = None,
    *,
    tol: float = 1e-3,
    max_iter: int = 100,
    samples: int = 64,
    seed: int = 0,
    loss_fn: LossFn = F.cross_entropy,
) -> list[dict]:
    """Curvature rows of the model at its current parameters (load a checkpoint with
    ``checkpoints.load_into`` first): one row for the whole model (scope "model", depth
    None), then one per block with parameters (``blocks``: input to output, default
    ``model.block_names()``). Each row: scope, depth, top_eigenvalue, iterations, hvps,
    residual, converged (of its own Lanczos run, the block's Hessian H_bb), trace,
    trace_stderr (from ``samples`` probes over all parameters, shared by every row),
    n_params. Cost: one Lanczos run per row plus ``samples`` HVPs."""
    blocks = list(blocks if blocks is not None else model.block_names())
    groups = block_parameters(model, blocks)
    scopes = {"model": parameter_names(model), **groups}
    traces = block_traces(model, batches, scopes, samples=samples, seed=seed, loss_fn=loss_fn)
    sizes = {k: p.numel() for k, p in model.named_parameters()}
    rows = []
    for scope, keys in scopes.items():
        eig = top_eigenvalue(
            model, batches, keys, tol=tol, max_iter=max_iter, seed=seed, loss_fn=loss_fn
        )
        rows.append(
            {
                "scope": scope,
                "depth": None if scope == "model" else blocks.index(scope),
                "top_eigenvalue": eig["value"],
                "iterations": eig["iterations"],
                "hvps": eig["hvps"],
                "residual": eig["residual"],
                "converged": eig["converged"],
                "trace": traces[scope]["value"],
                "trace_stderr": traces[scope]["stderr"],
                "n_params": sum(sizes[k] for k in keys),
            }
        )
    return rows
