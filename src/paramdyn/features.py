"""Penultimate-layer features on a probe subset of the test split, and how similar two
models' representations are (study "dynamics", REFERENCE.md).

Extraction: every model of ``models`` has ``.features(x)``, the input of its classifier
(LeNet-5: the ReLU of fc2, 84 units; ResNets: the globally pooled last stage,
``num_features`` units). Features are stored as safetensors (never pickle), one float32
matrix (probe samples x units) per file.

Similarity, each taking X (n x p) and Y (n x q), rows = the same probe samples in the same
order (numpy arrays or torch tensors; computed in float64 with numpy):

- :func:`linear_cka`: centred linear CKA (Kornblith et al. 2019), invariant to rotations
  and isotropic scaling of either set, so it does not depend on the order (or sign, or
  any orthogonal mixing) of units. Biased estimator or the unbiased HSIC of Song et al.
  2012. Both are computed in feature space (p x q products, O(n p q)), never with n x n
  Gram matrices.
- :func:`matched_correlation`: Pearson correlation between units, each unit of X matched
  to one unit of Y by the Hungarian algorithm (Li et al. 2015, "convergent learning").
- :func:`procrustes_distance`: orthogonal Procrustes distance (Ding et al. 2021).
- :func:`cross_correlation`: the unit-by-unit Pearson correlations behind the matching.
- Within one model: :func:`correlation_matrix` and :func:`correlation_summary`.

Undefined values raise ValueError with the reason (too few probe samples, constant
features, NaN features) instead of returning NaN; :func:`similarity_table` can record them
as NaN with a note instead (``errors="nan"``), so one dead model does not stop a study.
A unit is *constant* when its values over the probe set do not vary (a dead ReLU unit):
centred column norm <= 1e-9 x its raw norm.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from safetensors import safe_open

from . import tables
from .runs import FinishedRun

# torch, and the modules built on it (checkpoints, data, models), are imported inside the
# functions that extract, save and load features, not here: the similarity measures, the
# similarity table and the figures drawn from them need numpy alone (torch takes seconds
# to import in every job that does)

FORMAT = "paramdyn-features/1"
_CONSTANT_RTOL = 1e-9
MEASURES = ("cka_linear", "cka_linear_unbiased", "matched_correlation", "procrustes")


class FeatureError(RuntimeError):
    pass


# --- probe set and extraction ----------------------------------------------------------------


def probe_indices(n_test: int, size: int, seed: int = 0) -> np.ndarray:
    """A deterministic sorted subset of ``size`` indices of a test split of ``n_test``
    samples (the whole split, in order, when ``size >= n_test``), drawn without
    replacement by numpy's PCG64 seeded with ``seed``. int64."""
    if n_test < 1:
        raise ValueError(f"probe_indices: the test split is empty (n_test={n_test})")
    if size < 1:
        raise ValueError(f"probe_indices: size must be at least 1, got {size}")
    if size >= n_test:
        return np.arange(n_test, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_test, size=size, replace=False)).astype(np.int64)


def probe_batches(data, indices: Sequence[int] | np.ndarray, batch_size: int = 1000) -> Iterator:
    """Normalised float batches of the test images ``indices`` of a ``data.DeviceData``
    (on its device, normalised as its evaluation batches are)."""
    for x, _ in data.subset_batches("test", indices, batch_size):
        yield x


def extract_features(model, x_batches: Iterable) -> Any:
    """``model.features(x)`` over the batches (tensors, or (x, y) pairs), in eval mode and
    without gradients; returns one float32 CPU tensor (n x units). The model's train/eval
    mode is restored afterwards."""
    import torch

    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.no_grad():
            for batch in x_batches:
                x = batch[0] if isinstance(batch, tuple | list) else batch
                out.append(model.features(x).float().cpu())
    finally:
        model.train(was_training)
    if not out:
        raise ValueError("extract_features: no batches")
    return torch.cat(out)


def checkpoint_features(
    checkpoint: Path | str,
    dataset_path: Path | str,
    *,
    model_name: str,
    dataset: str,
    indices: Sequence[int] | np.ndarray,
    model_settings: Mapping[str, Any] | None = None,
    normalize: bool | Mapping[str, Any] = True,
    inputs: Mapping[str, Any] | None = None,
    batch_size: int = 1000,
    device: str = "cpu",
) -> Any:
    """The features of a checkpoint's model on the probe ``indices`` of a prepared dataset
    (``results/datasets/<name>.safetensors``). ``normalize`` and ``inputs`` must be the
    run's."""
    from .loaders import ModelForm, model_and_data

    form = ModelForm(model_name, dataset, model_settings, normalize, inputs)
    model, data = model_and_data(dataset_path, form, checkpoint, device)
    return extract_features(model, probe_batches(data, indices, batch_size))


# --- files ---------------------------------------------------------------------------------


def save_features(
    path: Path | str,
    feats,
    metadata: Mapping[str, Any] | None = None,
    *,
    indices: Sequence[int] | np.ndarray | None = None,
) -> Path:
    """Write features (n x units, stored float32) to a safetensors file atomically and
    byte-reproducibly (``checkpoints.write_safetensors``).
    ``metadata`` (JSON-serialisable) is kept; ``indices`` (the probe indices), when given,
    are stored too and their SHA-256 is added to the metadata as ``probe_sha256``, so two
    files can be checked to hold the same probe samples."""
    import torch

    from .checkpoints import write_safetensors

    path = Path(path)
    t = torch.as_tensor(feats).detach().to("cpu", torch.float32).contiguous()
    if t.ndim != 2:
        raise ValueError(f"{path}: features must be 2-D (samples x units), got {tuple(t.shape)}")
    meta = dict(metadata or {})
    tensors = {"features": t}
    if indices is not None:
        idx = np.ascontiguousarray(np.asarray(indices, dtype=np.int64))
        if idx.shape != (t.shape[0],):
            raise ValueError(f"{path}: {idx.size} probe indices for {t.shape[0]} feature rows")
        tensors["indices"] = torch.from_numpy(idx.copy())
        meta["probe_sha256"] = hashlib.sha256(idx.tobytes()).hexdigest()
    header = {"format": FORMAT, "paramdyn": json.dumps(meta, sort_keys=True)}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(tensors, path, header)  # byte-reproducible, atomic (tmp + rename)
    return path


def load_features(path: Path | str) -> tuple[Any, dict[str, Any]]:
    """Read a features file: (float32 tensor n x units, metadata). The metadata holds what
    was saved, plus ``indices`` (int64 tensor) when the file has the probe indices. Raises
    FeatureError naming the file when it is unreadable, truncated or not a features file."""
    from .checkpoints import read_safetensors

    path = Path(path)
    header, tensors = read_safetensors(
        path, what="features file", fix="delete it to rebuild", error=FeatureError
    )
    if header.get("format") != FORMAT or "features" not in tensors:
        raise FeatureError(
            f"{path}: not a paramdyn features file (format {header.get('format')!r})"
        )
    try:
        meta = json.loads(header.get("paramdyn", "{}"))
    except ValueError as e:
        raise FeatureError(f"{path}: corrupt metadata ({e}); delete it to rebuild") from e
    feats = tensors["features"]
    if feats.ndim != 2:
        raise FeatureError(f"{path}: features are {feats.ndim}-D, expected 2-D")
    if "indices" in tensors:
        meta["indices"] = tensors["indices"]
    return feats, meta


# --- similarity ----------------------------------------------------------------------------


def _as_array(X, name: str) -> np.ndarray:
    if hasattr(X, "detach"):  # a torch tensor
        X = X.detach().cpu().double().numpy()
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"features {name} must be 2-D (samples x units), got shape {X.shape}")
    if X.shape[0] < 2 or X.shape[1] < 1:
        raise ValueError(
            f"features {name} have shape {X.shape}: need at least 2 probe samples and 1 "
            "unit (raise features.probe_size)"
        )
    return X


def _pair(X, Y) -> tuple[np.ndarray, np.ndarray]:
    X, Y = _as_array(X, "X"), _as_array(Y, "Y")
    if X.shape[0] != Y.shape[0]:
        raise ValueError(
            f"X has {X.shape[0]} probe samples and Y {Y.shape[0]}: rows must be the same samples"
        )
    return X, Y


def _centred(X: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A column-centred copy of X and its column means. Raises for NaN or inf (a column
    mean is finite exactly when its column is, barring overflow)."""
    mean = X.mean(axis=0)
    if not np.isfinite(mean).all():
        raise ValueError(f"features {name} contain NaN or inf (a diverged model?)")
    return X - mean, mean


def _constant(colsq: np.ndarray, mean: np.ndarray, n: int, name: str) -> np.ndarray:
    """The constant units, from the centred columns' squared norms (the raw squared norm is
    that plus n x mean^2). Raises when every unit is constant."""
    constant = colsq <= _CONSTANT_RTOL**2 * (colsq + n * mean**2)
    if constant.all():
        raise ValueError(
            f"features {name} are constant over the probe set (zero variance in all "
            f"{colsq.size} units: a dead model?); the similarity is undefined"
        )
    return constant


def _standardised(X: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit-norm centred columns of the non-constant units, those units' indices, and the
    centred X."""
    Xc, mean = _centred(X, name)
    colsq = np.einsum("ij,ij->j", Xc, Xc)
    live = np.flatnonzero(~_constant(colsq, mean, X.shape[0], name))
    return Xc[:, live] / np.sqrt(colsq[live]), live, Xc


def _hsic_unbiased_terms(X: np.ndarray) -> dict[str, Any]:
    """The pieces of Song et al.'s unbiased HSIC for the linear kernel K = X X^T, computed
    without K: diag(K), K~1 (K with zero diagonal, times 1) and 1^T K~ 1."""
    diag = np.einsum("ij,ij->i", X, X)
    colsum = X.sum(axis=0)
    k1 = X @ colsum - diag
    return {"diag": diag, "k1": k1, "sum": float(colsum @ colsum - diag.sum())}


def _hsic_unbiased(xty_sq: float, a: dict[str, Any], b: dict[str, Any], n: int) -> float:
    """HSIC_1 of Song et al. 2012 (eq. 5): [tr(K~L~) + 1'K~1 1'L~1 / ((n-1)(n-2))
    - 2/(n-2) 1'K~L~1] / (n(n-3)), with tr(K~L~) = ||X^T Y||_F^2 - sum_i K_ii L_ii."""
    trace = xty_sq - float(a["diag"] @ b["diag"])
    return (
        trace + a["sum"] * b["sum"] / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * float(a["k1"] @ b["k1"])
    ) / (n * (n - 3))


def linear_cka(X, Y, unbiased: bool = False) -> float:
    """Centred linear CKA of X (n x p) and Y (n x q), in [0, 1] (the unbiased estimate may
    fall slightly below 0 for unrelated sets).

    Biased: ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F) with column-centred Xc, Yc.
    Unbiased: HSIC_1(K, L) / sqrt(HSIC_1(K, K) HSIC_1(L, L)) for the linear kernels of the
    centred features (Song et al. 2012), needing n >= 4 samples. Raises ValueError for
    too few samples, constant or non-finite features, or an unbiased self-HSIC that is not
    positive (too few samples for the estimate)."""
    if unbiased and min(len(X), len(Y)) < 4:
        raise ValueError(
            f"unbiased HSIC needs at least 4 probe samples, got {min(len(X), len(Y))}: "
            "raise features.probe_size"
        )
    X, Y = _pair(X, Y)
    n = X.shape[0]
    Xc, mx = _centred(X, "X")
    Yc, my = _centred(Y, "Y")
    xtx = Xc.T @ Xc  # numpy computes a.T @ a with one symmetric rank-k update (syrk)
    yty = Yc.T @ Yc
    ytx = Yc.T @ Xc
    _constant(np.diag(xtx), mx, n, "X")
    _constant(np.diag(yty), my, n, "Y")
    xy, xx, yy = (float(np.einsum("ij,ij->", m, m)) for m in (ytx, xtx, yty))
    if not unbiased:
        return xy / math.sqrt(xx * yy)
    a, b = _hsic_unbiased_terms(Xc), _hsic_unbiased_terms(Yc)
    hxy = _hsic_unbiased(xy, a, b, n)
    hxx = _hsic_unbiased(xx, a, a, n)
    hyy = _hsic_unbiased(yy, b, b, n)
    for h, sq, name in ((hxx, xx, "X"), (hyy, yy, "Y")):
        # not positive, or lost in the rounding of terms of size sq / (n (n - 3))
        if not h > 1e-10 * sq / (n * (n - 3)):
            raise ValueError(
                f"unbiased HSIC of {name} with itself is {h:.3g}, not positive, with {n} probe "
                "samples: too few for the estimate; raise features.probe_size"
            )
    return hxy / math.sqrt(hxx * hyy)


def matched_correlation(X, Y, absolute: bool = False) -> tuple[float, np.ndarray, np.ndarray]:
    """Pearson correlation between the units of X and Y, with each unit of X matched to at
    most one unit of Y by the Hungarian algorithm (scipy's ``linear_sum_assignment``)
    maximising the total correlation.

    Signed by default (cost = -corr): the features are post-ReLU activations, so a unit
    anti-correlated with another is a different feature, not a relabelled copy; with
    ``absolute`` the matching maximises |corr| and reports |corr|. Constant units (dead
    ReLUs: Pearson correlation undefined) take part in no match; min(live p, live q) pairs
    are matched. Returns (mean over matched pairs, per_unit, assignment): ``per_unit[i]`` is
    the correlation of X's unit i with its match (NaN when unmatched) and ``assignment[i]``
    the index of that Y unit (-1 when unmatched). A column-permuted copy gives 1.0 and
    recovers the permutation."""
    from scipy.optimize import linear_sum_assignment  # here: a second to import, used once

    X, Y = _pair(X, Y)
    Zx, live_x, _ = _standardised(X, "X")
    Zy, live_y, _ = _standardised(Y, "Y")
    corr = np.clip(Zx.T @ Zy, -1.0, 1.0)
    score = np.abs(corr) if absolute else corr
    rows, cols = linear_sum_assignment(-score)
    per_unit = np.full(X.shape[1], np.nan)
    assignment = np.full(X.shape[1], -1, dtype=np.int64)
    per_unit[live_x[rows]] = score[rows, cols]
    assignment[live_x[rows]] = live_y[cols]
    return float(score[rows, cols].mean()), per_unit, assignment


def procrustes_distance(X, Y) -> float:
    """Orthogonal Procrustes distance (Ding et al. 2021): centre each set, scale it to unit
    Frobenius norm, then min over orthogonal Q of ||X - Y Q||_F^2 = 2 - 2 ||X^T Y||_* (the
    nuclear norm; Y is zero-padded when q < p). In [0, 2]: 0 for a rotated (or reflected,
    or rescaled) copy, near 2 for unrelated sets with few units. Raises ValueError for
    constant or non-finite features."""
    X, Y = _pair(X, Y)
    n = X.shape[0]
    (Xc, mx), (Yc, my) = _centred(X, "X"), _centred(Y, "Y")
    for Z, mean, name in ((Xc, mx, "X"), (Yc, my, "Y")):
        colsq = np.einsum("ij,ij->j", Z, Z)
        _constant(colsq, mean, n, name)
        Z /= math.sqrt(colsq.sum())
    nuclear = float(np.linalg.svd(Xc.T @ Yc, compute_uv=False).sum())
    return float(min(2.0, max(0.0, 2.0 - 2.0 * nuclear)))


def cross_correlation(X, Y) -> np.ndarray:
    """Pearson correlation between every unit of X and every unit of Y (p x q); rows of
    constant units of X and columns of constant units of Y are NaN."""
    X, Y = _pair(X, Y)
    Zx, live_x, _ = _standardised(X, "X")
    Zy, live_y, _ = _standardised(Y, "Y")
    out = np.full((X.shape[1], Y.shape[1]), np.nan)
    out[np.ix_(live_x, live_y)] = np.clip(Zx.T @ Zy, -1.0, 1.0)
    return out


def correlation_matrix(X) -> np.ndarray:
    """Pearson correlation between the units of X (p x p). Rows and columns of constant
    units (correlation undefined) are NaN."""
    X = _as_array(X, "X")
    Zx, live, _ = _standardised(X, "X")
    out = np.full((X.shape[1], X.shape[1]), np.nan)
    out[np.ix_(live, live)] = np.clip(Zx.T @ Zx, -1.0, 1.0)
    out[live, live] = 1.0
    return out


def correlation_summary(X) -> dict[str, float]:
    """Within one model: ``mean_abs_offdiag`` (the mean |Pearson correlation| between
    distinct non-constant units), ``effective_rank`` (exp of the entropy of the normalised
    eigenvalues of the covariance, Roy & Vetterli 2007: between 1 and the unit count),
    ``units`` and ``constant_units``. Raises ValueError with fewer than 2 non-constant
    units."""
    X = _as_array(X, "X")
    Zx, live, Xc = _standardised(X, "X")
    if live.size < 2:
        raise ValueError(
            f"features X have {live.size} non-constant unit(s) of {X.shape[1]}: "
            "correlations between units are undefined"
        )
    corr = np.clip(Zx.T @ Zx, -1.0, 1.0)
    k = live.size
    mean_abs = float((np.abs(corr).sum() - np.trace(np.abs(corr))) / (k * (k - 1)))
    eig = np.clip(np.linalg.eigvalsh(Xc.T @ Xc / (X.shape[0] - 1)), 0.0, None)
    p = eig[eig > 0] / eig.sum()
    return {
        "mean_abs_offdiag": mean_abs,
        "effective_rank": float(np.exp(-(p * np.log(p)).sum())),
        "units": int(X.shape[1]),
        "constant_units": int(X.shape[1] - k),
    }


def similarity_table(
    features: Mapping[str, Any],
    pairs: Iterable[tuple[str, str]],
    unbiased: bool = False,
    *,
    errors: str = "raise",
) -> pd.DataFrame:
    """One row per (pair, measure): columns ``run_a``, ``run_b``, ``measure``
    (``cka_linear``, ``cka_linear_unbiased`` when ``unbiased``, ``matched_correlation``,
    ``procrustes``), ``value`` and ``note`` (empty, or why the value is NaN).

    ``features``: run id -> X (n x units), every X on the same probe samples. ``errors``:
    ``"raise"`` (a measure that is undefined raises ValueError naming the pair) or
    ``"nan"`` (it is recorded as NaN with the reason in ``note``)."""
    if errors not in ("raise", "nan"):
        raise ValueError(f"similarity_table: errors must be 'raise' or 'nan', got {errors!r}")
    pairs = [tuple(p) for p in pairs]
    for pair in pairs:
        if len(pair) != 2:
            raise ValueError(f"similarity_table: a pair must be (run_a, run_b), got {pair!r}")
        for run in pair:
            if run not in features:
                raise ValueError(f"similarity_table: no features for run {run!r}")
    arrays: dict[str, np.ndarray] = {}
    for run in sorted({r for p in pairs for r in p}):
        X = features[run]
        if hasattr(X, "detach"):
            X = X.detach().cpu().double().numpy()
        arrays[run] = np.asarray(X, dtype=np.float64)
    if len({a.shape[0] for a in arrays.values()}) > 1:
        sizes = {r: a.shape[0] for r, a in arrays.items()}
        raise ValueError(f"similarity_table: runs have different probe sizes: {sizes}")
    measures = {"cka_linear": linear_cka}
    if unbiased:
        measures["cka_linear_unbiased"] = lambda x, y: linear_cka(x, y, unbiased=True)
    measures["matched_correlation"] = lambda x, y: matched_correlation(x, y)[0]
    measures["procrustes"] = procrustes_distance
    rows = []
    for a, b in pairs:
        for measure, fn in measures.items():
            note = ""
            try:
                value = float(fn(arrays[a], arrays[b]))
            except ValueError as e:
                if errors == "raise":
                    raise ValueError(f"{measure} of {a} and {b}: {e}") from e
                value, note = math.nan, str(e)
            rows.append({"run_a": a, "run_b": b, "measure": measure, "value": value, "note": note})
    return pd.DataFrame(rows, columns=["run_a", "run_b", "measure", "value", "note"])


# --- the workflow's jobs -----------------------------------------------------------------------


def run_features(run_dir, dataset_path, out, *, probe_size: int, probe_seed: int, device="auto"):
    """Features of a run's final checkpoint on the study's probe set, to ``out``."""
    run = FinishedRun.read(run_dir)
    spec = run.spec
    with safe_open(str(dataset_path), framework="pt") as f:
        n_test = f.get_slice("test_y").get_shape()[0]
    indices = probe_indices(n_test, min(probe_size, n_test), probe_seed)
    feats = checkpoint_features(
        run.final_checkpoint,
        dataset_path,
        model_name=spec.model_name,
        dataset=spec.dataset,
        indices=indices,
        model_settings=spec.model_settings,
        normalize=spec.normalize,
        inputs=spec.inputs,
        device=device,
    )
    meta = {"run_id": run.run_id, "status": run.status, "probe_seed": probe_seed}
    return save_features(out, feats, meta, indices=indices)


def study_similarity(feature_files: Mapping[str, Path | str], pairs, out, *, unbiased=False):
    """``similarity.parquet`` of a study: the cross-run measures of every pair (run_a, run_b,
    kind) and, per run, the within-model summary of its correlation matrix (rows with run_b
    = run_a: mean_abs_offdiag_corr, effective_rank). Undefined values are NaN with a note."""
    feats = {run: load_features(p)[0] for run, p in feature_files.items()}
    rows = []
    for run, X in feats.items():
        try:
            s = correlation_summary(X.double().numpy())
            values, note = (s["mean_abs_offdiag"], s["effective_rank"]), ""
        except ValueError as e:
            values, note = (np.nan, np.nan), str(e)
        for measure, v in zip(("mean_abs_offdiag_corr", "effective_rank"), values, strict=True):
            rows.append(
                {
                    "run_a": run,
                    "run_b": run,
                    "kind": "within",
                    "measure": measure,
                    "value": v,
                    "note": note,
                }
            )
    kind = {(a, b): k for a, b, k in pairs}
    cross = similarity_table(feats, [(a, b) for a, b, _ in pairs], unbiased, errors="nan")
    cross.insert(2, "kind", [kind[(a, b)] for a, b in zip(cross.run_a, cross.run_b, strict=True)])
    df = pd.concat([pd.DataFrame(rows), cross], ignore_index=True)
    tables.write_parquet(df, out, {"unbiased": unbiased, "pairs": len(pairs)})
    return df
