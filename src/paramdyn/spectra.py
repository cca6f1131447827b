"""Weight spectra per layer: norms, ranks and the power-law exponent of the eigenvalue
spectrum of each weight matrix (issue 15; the statistics WeightWatcher reports, for every
checkpoint of a run).

A *layer* here is one weight tensor with at least two dimensions, seen as a matrix W:
linear weights as they are (out x in), convolution weights reshaped to out x (in*k*k) (the
matrix the convolution applies to each unrolled input patch). One-dimensional tensors
(biases, BatchNorm weights) have no spectrum and are skipped. From the singular values
sigma_1 >= ... of W (``torch.linalg.svdvals`` in float64, on the tall orientation of W:
the singular values of W and W^T are the same, and torch's LAPACK path is 6 times slower
on a 512 x 4608 matrix than on its transpose, one thread; more with two):

- ``spectral_norm`` sigma_1, ``frobenius_norm`` sqrt(sum sigma_i^2);
- ``stable_rank`` ||W||_F^2 / ||W||_2^2 (NaN for a zero matrix);
- ``effective_rank`` (Roy & Vetterli 2007): exp of the Shannon entropy of the normalised
  singular values p_i = sigma_i / sum_j sigma_j (``scipy.stats.entropy``);
- ``n_evals`` = min(out, in*k*k), the eigenvalues lambda_i = sigma_i^2 of W^T W (its
  empirical spectral density, ESD), and ``rank``: how many are not numerically zero
  (sigma_i > sigma_1 * max(out, in*k*k) * eps of the stored dtype, numpy's matrix_rank
  rule). Only those enter the fit.
- ``alpha``: the exponent of a power law p(lambda) ~ lambda^-alpha fitted to the tail
  lambda >= ``xmin`` of the ESD (continuous maximum likelihood, Clauset, Shalizi & Newman
  2009), with its quality: ``alpha_ks`` the Kolmogorov-Smirnov distance D between the tail
  and the fit, ``alpha_sigma`` the standard error (alpha - 1) / sqrt(n_tail), ``xmin``
  (in units of sigma^2 of the raw weights) and ``n_tail`` (eigenvalues >= xmin). A layer
  with fewer than :data:`MIN_EVALS` nonzero eigenvalues gets NaN with the ``reason``.

How xmin is chosen. Clauset's rule, as both the ``powerlaw`` package and WeightWatcher
(0.7.7, its own ``WWFit``) apply it: each distinct eigenvalue (but the two largest, as
``powerlaw.Fit`` does) is a candidate xmin; for each, alpha is the closed-form MLE of the
tail, 1 + n / sum log(lambda / xmin), and D the KS distance of that fit to the tail; the
candidate of least D among those with alpha > 1 wins. ``powerlaw.Fit`` runs this search by
building one distribution object per candidate, and its power law's default alpha range
is (0, 3]: candidates with a larger alpha (random and lightly trained layers have alpha of
5 to 50) are refitted numerically with scipy and then thrown out, so its default answer is
a different, range-limited xmin. We pass ``parameter_ranges={'alpha': [1, None]}``, which
makes its answer WeightWatcher's, and still it takes 0.2 s on 512 eigenvalues and seconds
on a few thousand. The default search (``search="clauset"``) is therefore written here:
the same criterion for all candidates at once with numpy (O(n^2) in blocks, milliseconds
for n = 512; tests/test_spectra.py checks it picks powerlaw's xmin). The reported alpha, D
and sigma then come from ``powerlaw.Fit(lambda, xmin=xmin)`` itself. ``search="powerlaw"``
runs the package's own search instead. Ties among eigenvalues (the empirical CDF of tied
values) are the one case where the two searches may differ; real spectra have none.

Scale: alpha and D do not change when W is scaled (xmin scales with it), so WeightWatcher's
normalisations (conv2d_norm, glorot fix) leave them alone. WeightWatcher's own treatment of
a convolution differs from ours on purpose: it stacks the eigenvalues of the k*k slices
W[:, :, i, j] (each out x in) into one ESD; we take the spectrum of the operator out x
(in*k*k). For linear layers both are the same matrix, and so are the alphas.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy.stats import entropy

from .checkpoints import read_checkpoint

MIN_EVALS = 10  # fewer nonzero eigenvalues than this: no power-law fit (WeightWatcher: 8)
ALPHA_RANGE = {"alpha": [1, None]}  # powerlaw's Power_Law range: any alpha > 1, as WW
_BLOCK_ENTRIES = 1 << 21  # entries of one block of the xmin search (16 MiB of float64)

COLUMNS = (
    "key", "layer", "shape", "rows", "cols", "n_evals", "rank",
    "spectral_norm", "frobenius_norm", "stable_rank", "effective_rank",
    "alpha", "alpha_ks", "alpha_sigma", "xmin", "n_tail", "reason",
)  # fmt: skip
_NO_FIT = {"alpha": math.nan, "alpha_ks": math.nan, "alpha_sigma": math.nan,
           "xmin": math.nan, "n_tail": 0}  # fmt: skip


# --- the matrix and its singular values --------------------------------------------------------


def weight_matrix(tensor: torch.Tensor) -> torch.Tensor:
    """The matrix of a weight tensor: out x (product of the other dimensions): a linear
    weight as it is, a convolution's out x (in*k*k). Raises ValueError below two dims."""
    if tensor.ndim < 2:
        raise ValueError(
            f"a tensor of shape {tuple(tensor.shape)} has no spectrum: spectra need a weight "
            "with at least 2 dimensions; leave biases and normalisation weights out"
        )
    return tensor.detach().reshape(tensor.shape[0], -1)


def singular_values(matrix: torch.Tensor) -> np.ndarray:
    """The singular values of ``matrix``, descending, in float64 (computed on the tall one
    of W and W^T: same values, and LAPACK through torch is several times faster on it)."""
    tall = matrix if matrix.shape[0] >= matrix.shape[1] else matrix.T
    return torch.linalg.svdvals(tall.to(torch.float64)).cpu().numpy()


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps if dtype.is_floating_point else torch.finfo(torch.float32).eps


def spectrum_stats(s: np.ndarray, shape: tuple[int, int], dtype: torch.dtype) -> dict[str, Any]:
    """Norms and ranks from the singular values ``s`` (descending) of a ``shape`` matrix
    whose entries were stored as ``dtype`` (its eps sets the numerical rank's tolerance)."""
    top = float(s[0]) if s.size else 0.0
    fro2 = float(np.sum(s**2))
    zero = top == 0.0
    return {
        "n_evals": int(s.size),
        "rank": int(np.sum(s > top * max(shape) * _eps(dtype))),
        "spectral_norm": top,
        "frobenius_norm": math.sqrt(fro2),
        "stable_rank": math.nan if zero else fro2 / top**2,
        "effective_rank": math.nan if zero else float(np.exp(entropy(s))),
    }


# --- the power-law fit -------------------------------------------------------------------------


def _candidates(x: np.ndarray) -> np.ndarray:
    """Indices (into ascending ``x``) of the candidate xmins powerlaw.Fit tries: the first
    occurrence of each distinct value below the maximum, less the last of them."""
    _, first = np.unique(x[x < x[-1]], return_index=True)
    return first[:-1]


def _clauset_xmin(x: np.ndarray) -> float:
    """Clauset's xmin for ascending positive ``x``: the candidate whose closed-form MLE
    alpha (> 1) fits the tail with the least KS distance; NaN when none qualifies."""
    cand = _candidates(x)
    if cand.size == 0:
        return math.nan
    logx = np.log(x)
    suffix = np.cumsum(logx[::-1])[::-1]  # sum of log x[j] for j >= i
    n_tail = (x.size - cand).astype(np.float64)
    with np.errstate(divide="ignore"):
        alpha = 1.0 + n_tail / (suffix[cand] - n_tail * logx[cand])
    dist = np.full(cand.size, np.inf)
    j = np.arange(x.size)
    step = max(1, _BLOCK_ENTRIES // x.size)
    for lo in range(0, cand.size, step):
        i = cand[lo : lo + step, None]
        a = alpha[lo : lo + step, None]
        with np.errstate(over="ignore", invalid="ignore"):
            theory = -np.expm1((1.0 - a) * (logx[None, :] - logx[i]))  # 1 - (x / xmin)^(1-a)
        gap = np.abs(theory - (j[None, :] - i) / n_tail[lo : lo + step, None])
        dist[lo : lo + step] = np.where(j[None, :] >= i, gap, 0.0).max(axis=1)
    dist[~(alpha > 1.0) | ~np.isfinite(alpha)] = np.inf
    return math.nan if not np.isfinite(dist).any() else float(x[cand[np.argmin(dist)]])


def _powerlaw_xmin(x: np.ndarray) -> float:
    """powerlaw.Fit's own xmin search (alpha allowed above 3, as WeightWatcher)."""
    import powerlaw  # here: 2 s to import (matplotlib), for fits only

    return float(powerlaw.Fit(x, parameter_ranges=ALPHA_RANGE, verbose=False).xmin)


XMIN_SEARCH: dict[str, Callable[[np.ndarray], float]] = {
    "clauset": _clauset_xmin,
    "powerlaw": _powerlaw_xmin,
}


def fit_power_law(evals: np.ndarray, *, search: str = "clauset") -> dict[str, Any]:
    """Fit a power law to the tail of the eigenvalues ``evals`` (nonzero ones; any order):
    ``alpha``, ``alpha_ks`` (KS distance D), ``alpha_sigma``, ``xmin``, ``n_tail`` and
    ``reason`` (None when fitted, else why alpha is NaN). ``search`` picks the xmin search
    (:data:`XMIN_SEARCH`)."""
    if search not in XMIN_SEARCH:
        raise ValueError(f"unknown xmin search {search!r}: use one of {sorted(XMIN_SEARCH)}")
    x = np.sort(np.asarray(evals, dtype=np.float64))
    x = x[x > 0]
    if x.size < MIN_EVALS:
        return {**_NO_FIT, "reason": f"too few nonzero eigenvalues ({x.size} < {MIN_EVALS})"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # powerlaw warns on every fit it finds noisy
        xmin = XMIN_SEARCH[search](x)
        if math.isnan(xmin):
            return {**_NO_FIT, "reason": "no xmin gives a power law with alpha > 1"}
        import powerlaw

        fit = powerlaw.Fit(x, xmin=xmin, parameter_ranges=ALPHA_RANGE, verbose=False)
        law = fit.power_law
    return {
        "alpha": float(law.alpha),
        "alpha_ks": float(law.D),
        "alpha_sigma": float(law.standard_err),
        "xmin": float(fit.xmin),
        "n_tail": int(fit.n_tail),
        "reason": None,
    }


# --- layers, state_dicts and checkpoints -------------------------------------------------------


def _spectral_keys(state_dict: Mapping[str, torch.Tensor], layers: Iterable[str] | None):
    if layers is None:
        return [k for k, t in state_dict.items() if t.ndim >= 2 and t.dtype.is_floating_point]
    keys = list(layers)
    missing = [k for k in keys if k not in state_dict]
    if missing:
        raise ValueError(f"layers {missing} are not in the state_dict; pick keys from it")
    flat = [k for k in keys if state_dict[k].ndim < 2]
    if flat:
        raise ValueError(f"layers {flat} have fewer than 2 dimensions: no spectrum; leave them out")
    return keys


def layer_spectra(
    state_dict: Mapping[str, torch.Tensor],
    layers: Iterable[str] | None = None,
    *,
    fit: bool = True,
    search: str = "clauset",
) -> list[dict[str, Any]]:
    """One row per weight matrix of ``state_dict`` (:data:`COLUMNS`): every floating tensor
    with at least 2 dimensions, or the keys ``layers``. ``fit=False`` skips the power-law
    fit (alpha NaN, reason 'not fitted'); ``search`` picks its xmin search."""
    rows = []
    for key in _spectral_keys(state_dict, layers):
        tensor = state_dict[key]
        matrix = weight_matrix(tensor)
        s = singular_values(matrix)
        stats = spectrum_stats(s, tuple(matrix.shape), tensor.dtype)
        nonzero = s[: stats["rank"]] ** 2
        power = (
            fit_power_law(nonzero, search=search) if fit else {**_NO_FIT, "reason": "not fitted"}
        )
        rows.append({
            "key": key,
            "layer": key.rsplit(".", 1)[0],
            "shape": list(tensor.shape),
            "rows": int(matrix.shape[0]),
            "cols": int(matrix.shape[1]),
            **stats,
            **power,
        })  # fmt: skip
    return rows


def checkpoint_spectra(
    path: Path | str, *, fit: bool = True, search: str = "clauset"
) -> pd.DataFrame:
    """:func:`layer_spectra` of a checkpoint's trainable parameters, as a table with its
    ``run_id``, ``epoch`` and ``step``, and each layer's ``block`` and ``depth`` (from the
    checkpoint's block names; None / -1 when it lists none)."""
    ck = read_checkpoint(path)
    keys = [k for k in ck.parameters if ck.tensors[k].ndim >= 2]
    table = pd.DataFrame(layer_spectra(ck.tensors, keys, fit=fit, search=search), columns=COLUMNS)
    owners = [ck.owner(key) if ck.blocks else (None, -1) for key in table["key"]]
    table.insert(2, "block", [b for b, _ in owners])
    table.insert(3, "depth", np.array([d for _, d in owners], dtype=np.int64))
    for i, (name, value) in enumerate(
        (("run_id", ck.run_id), ("epoch", ck.epoch), ("step", ck.step))
    ):
        table.insert(i, name, value)
    return table
