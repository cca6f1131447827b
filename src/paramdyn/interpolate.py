"""Linear interpolation between two checkpoints, and the loss and error barriers along it
(issue 14, "same solution or not": linear mode connectivity, Frankle et al. 2020).

The path is θ(α) = (1 − α)·θa + α·θb for α in [0, 1] (:func:`alphas`), over every floating
tensor of the two state_dicts, BatchNorm running statistics included; integer buffers
(``num_batches_tracked``) are a's (:func:`interpolate_state`). Interpolation is
``torch.lerp``, in each tensor's own dtype (its two-sided formula, a + α(b − a) below
α = 0.5 and b − (1 − α)(b − a) from there, is the most accurate near either end); α = 0
and α = 1 are copies of a and b, bit for bit (lerp itself would turn a −0.0 into +0.0).

BatchNorm. A network between two solutions is a new network: the running statistics that
either endpoint (or their average) carries do not describe its activations, and evaluating
with them measures a barrier that is partly an artefact (Jordan et al. 2022, "REPAIR").
So by default (``bn="reestimate"``) every α's BatchNorm statistics are estimated afresh on
one fixed subset of the training split (:func:`reestimate_batchnorm`); ``bn="interpolate"``
keeps the interpolated statistics, for comparison. The modes are a registry
(:data:`BN_MODES`).

Re-estimation resets every BatchNorm's running statistics, sets ``momentum=None``
(PyTorch's cumulative moving average) and forwards the subset with *only the BatchNorm
layers* in train mode (dropout and the rest in eval mode) under ``no_grad``. The result
is, per channel, the plain mean over the B batches of each batch's statistics of that
layer's input: running_mean = (1/B) Σ_b mean_b, running_var = (1/B) Σ_b var_b with var_b
the *unbiased* (n_b − 1) variance over the batch's N·H·W values, every batch weighted
alike whatever its size (a short last batch counts as much as a full one), and
``num_batches_tracked`` = B. Each layer sees its input as computed with batch statistics
in the layers before it, as in training. Momentum and every module's train/eval flag are
restored afterwards. ``torch.optim.swa_utils.update_bn`` does the same reset and average
but puts the whole model in train mode (dropout active) and restores only the top-level
flag, hence this function.

Subsets (:func:`subset_indices`, :meth:`data.DeviceData.subset_batches`, :func:`path_subsets`): the images
for re-estimation, train evaluation and test evaluation are fixed by a seed and
materialised once as normalised batches on the data's device, so every α and every pair of
models sees the same images in the same batches. The re-estimation subset is in a seeded
random order (a split stored class by class would otherwise give one-class batches, whose
variances underestimate the layer's); the evaluation subsets are sorted.

Cost (:func:`evaluate_path`): per α one ``load_state_dict`` into the one model instance,
one re-estimation pass (when re-estimating and the model has BatchNorm) and one evaluation
pass per split, reading back once per split; no model is rebuilt or copied.

Barriers (:func:`barriers`): per split (and any other grouping column), the largest excess
of loss (and of error) over the straight line between the endpoint values,
max over 0 < α < 1 of v(α) − ((1 − α)·v(0) + α·v(1)), and the α where it occurs. The
endpoints are left out (their excess is 0 by construction), so the value is signed: zero
or negative when the path never rises above the line, the depth below it at its highest.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

State = Mapping[str, torch.Tensor]
Batches = Sequence[tuple[torch.Tensor, torch.Tensor]]

PATH_COLUMNS = ("alpha", "split", "loss", "error")
METRICS = ("loss", "error")


def alphas(points: int = 21) -> np.ndarray:
    """``points`` evenly spaced α from 0 to 1, both included (float64)."""
    if points < 2:
        raise ValueError(f"alphas: a path needs at least 2 points (its ends), got {points}")
    return np.linspace(0.0, 1.0, points)


# --- the interpolated state -------------------------------------------------------------------


def interpolate_state(a: State, b: State, alpha: float) -> dict[str, torch.Tensor]:
    """θ(α) = (1 − α)·a + α·b for every floating tensor (parameters and BatchNorm running
    statistics), in its dtype, exact at α = 0 and 1; other tensors (integer buffers such
    as ``num_batches_tracked``) are a's. The two states must have the same keys, shapes
    and dtypes."""
    if a.keys() != b.keys():
        only_a, only_b = sorted(a.keys() - b.keys()), sorted(b.keys() - a.keys())
        raise ValueError(
            f"interpolate_state: the states differ in keys (only in a: {only_a[:5]}, only "
            f"in b: {only_b[:5]}); interpolate two checkpoints of the same model"
        )
    weight = float(alpha)
    out = {}
    for k, ta in a.items():
        tb = b[k]
        if ta.shape != tb.shape or ta.dtype != tb.dtype:
            raise ValueError(
                f"interpolate_state: '{k}' is {tuple(ta.shape)} {ta.dtype} in a but "
                f"{tuple(tb.shape)} {tb.dtype} in b; interpolate two checkpoints of the same "
                "model"
            )
        out[k] = _lerp(ta, tb.to(ta.device), weight) if ta.is_floating_point() else ta
    return out


def _lerp(a: torch.Tensor, b: torch.Tensor, weight: float) -> torch.Tensor:
    # the ends are copies: lerp's formula is exact there except for the sign of a zero
    # (-0.0 + 0.0 = +0.0) and non-finite values; bit for bit means copying
    if weight == 0.0:
        return a.clone()
    if weight == 1.0:
        return b.clone()
    return torch.lerp(a, b, weight)


# --- BatchNorm re-estimation ----------------------------------------------------------------------


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The model's BatchNorm layers (any dimension) that keep running statistics."""
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]


def _inputs(batches: Iterable) -> Iterable[torch.Tensor]:
    for batch in batches:
        yield batch[0] if isinstance(batch, tuple | list) else batch


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, batches: Iterable) -> int:
    """Re-estimate every BatchNorm's running statistics on ``batches`` (input tensors, or
    (x, y) pairs); see the module docstring for the exact statistic. Returns the number of
    batches forwarded: 0, and nothing done, for a model without BatchNorm."""
    layers = batchnorm_layers(model)
    if not layers:
        return 0
    modes = [(m, m.training) for m in model.modules()]
    momenta = [(m, m.momentum) for m in layers]
    n = 0
    try:
        model.eval()  # dropout and everything else off ...
        for m in layers:  # ... but the BatchNorm layers, averaging cumulatively
            m.reset_running_stats()
            m.momentum = None
            m.train()
        for x in _inputs(batches):
            model(x)
            n += 1
    finally:
        for m, momentum in momenta:
            m.momentum = momentum
        for m, training in modes:
            m.training = training
    if n == 0:
        raise ValueError(
            "reestimate_batchnorm: no batches, so the running statistics were left reset; "
            "pass a non-empty list of training batches (path_subsets builds one)"
        )
    return n


def _bn_reestimate(model: nn.Module, bn_batches) -> None:
    reestimate_batchnorm(model, bn_batches)


def _bn_interpolate(model: nn.Module, bn_batches) -> None:
    """The interpolated running statistics stay as loaded."""


# bn mode -> what happens to the BatchNorm statistics once θ(α) is loaded
BN_MODES: dict[str, Callable[[nn.Module, Sequence | None], None]] = {
    "reestimate": _bn_reestimate,
    "interpolate": _bn_interpolate,
}


# --- fixed subsets ----------------------------------------------------------------------------


def subset_indices(n: int, size: int, seed: int = 0, *, shuffled: bool = False) -> np.ndarray:
    """``size`` distinct indices of ``range(n)`` drawn by numpy's PCG64 seeded with
    ``seed`` (all of them when ``size >= n``), sorted (the same draw as
    ``features.probe_indices``) or, ``shuffled``, in the draw's random order. int64."""
    if n < 1 or size < 1:
        raise ValueError(f"subset_indices: need n >= 1 and size >= 1, got n={n}, size={size}")
    rng = np.random.default_rng(seed)
    if size >= n:
        idx = rng.permutation(n) if shuffled else np.arange(n)
    else:
        idx = rng.choice(n, size=size, replace=False)
    return (idx if shuffled else np.sort(idx)).astype(np.int64)


def path_subsets(
    data,
    *,
    bn_size: int = 512,
    eval_size: int = 1024,
    bn_batch_size: int = 128,
    eval_batch_size: int = 512,
    seed: int = 0,
) -> tuple[list[tuple], dict[str, list[tuple]]]:
    """The fixed subsets of a path evaluation: ``bn_size`` training images in a seeded
    random order, batched by ``bn_batch_size`` (use the run's training batch size: the
    statistics are per batch), and ``eval_size`` sorted images of each of the training
    and test splits. Seeds ``seed``, ``seed + 1`` and ``seed + 2`` draw the three, so the
    BatchNorm and train-evaluation subsets are two independent draws."""
    n_train, n_test = data.train_x.shape[0], data.test_x.shape[0]
    bn = subset_indices(n_train, bn_size, seed, shuffled=True)
    splits = {
        "train": subset_indices(n_train, eval_size, seed + 1),
        "test": subset_indices(n_test, eval_size, seed + 2),
    }
    return (
        data.subset_batches("train", bn, bn_batch_size),
        {s: data.subset_batches(s, idx, eval_batch_size) for s, idx in splits.items()},
    )


# --- along the path ---------------------------------------------------------------------------


@torch.no_grad()
def evaluate_batches(model: nn.Module, batches: Batches) -> tuple[float, float]:
    """Mean cross-entropy and error (1 − accuracy) of ``model`` in eval mode over the
    (x, y) batches, summed on the device in float64 and read back once (as
    ``train.evaluate`` does). The model's mode is restored."""
    was_training = model.training
    model.eval()
    loss = correct = None
    n = 0
    try:
        for x, y in batches:
            out = model(x)
            batch_loss = F.cross_entropy(out, y, reduction="sum").double()
            batch_correct = (out.argmax(1) == y).sum()
            loss = batch_loss if loss is None else loss + batch_loss
            correct = batch_correct if correct is None else correct + batch_correct
            n += y.shape[0]
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("evaluate_batches: no batches to evaluate")
    return loss.item() / n, 1.0 - correct.item() / n


def _check_reiterable(name: str, batches) -> None:
    if batches is None or iter(batches) is batches:
        raise ValueError(
            f"evaluate_path: {name} must be a list of batches, read once per α (got "
            f"{type(batches).__name__}); materialise it with list(...) or path_subsets"
        )


def evaluate_path(
    model: nn.Module,
    state_a: State,
    state_b: State,
    alphas: Iterable[float],
    *,
    bn_batches: Sequence | None = None,
    splits: Mapping[str, Batches],
    bn: str = "reestimate",
) -> pd.DataFrame:
    """Loss and error of θ(α) on each split, for each α: a DataFrame with columns alpha,
    split, loss (mean cross-entropy), error (1 − accuracy), in the order of ``alphas``
    then ``splits``. ``model`` (built for the states' architecture) is loaded with each
    θ(α) in turn and ends holding the last one, in its original train/eval mode.
    ``bn``: a :data:`BN_MODES` name; ``bn_batches`` (training batches) is needed to
    re-estimate."""
    if bn not in BN_MODES:
        raise ValueError(f"evaluate_path: unknown bn mode '{bn}'; valid: {sorted(BN_MODES)}")
    if not splits:
        raise ValueError("evaluate_path: no splits to evaluate; pass e.g. {'test': batches}")
    if bn == "reestimate" and batchnorm_layers(model):
        _check_reiterable("bn_batches", bn_batches)
    for name, batches in splits.items():
        _check_reiterable(f"splits['{name}']", batches)
    device = next(iter(model.state_dict().values())).device
    # copied once (not per α): a state may alias the model's own tensors (its state_dict)
    a = {k: v.to(device, copy=True) for k, v in state_a.items()}
    b = {k: v.to(device, copy=True) for k, v in state_b.items()}
    rows = []
    for alpha in alphas:
        model.load_state_dict(interpolate_state(a, b, alpha))
        BN_MODES[bn](model, bn_batches)
        for name, batches in splits.items():
            loss, error = evaluate_batches(model, batches)
            rows.append((float(alpha), name, loss, error))
    return pd.DataFrame(rows, columns=list(PATH_COLUMNS))


# --- barriers --------------------------------------------------------------------------------


def _line(v0: float, v1: float, alpha: np.ndarray) -> np.ndarray:
    """The straight line from v0 to v1, two-sided like torch.lerp: exactly v0 and v1 at the
    ends, and exactly v0 everywhere when v0 == v1."""
    d = v1 - v0
    return np.where(alpha < 0.5, v0 + alpha * d, v1 - (1.0 - alpha) * d)


def _group_barriers(g: pd.DataFrame, where: str) -> dict[str, float]:
    g = g.sort_values("alpha", kind="stable")
    alpha = g["alpha"].to_numpy(dtype=np.float64)
    if len(np.unique(alpha)) != len(alpha):
        raise ValueError(f"barriers: {where} has repeated alphas; one row per α and split")
    at0, at1 = alpha == 0.0, alpha == 1.0
    inner = (alpha > 0.0) & (alpha < 1.0)
    if not at0.any() or not at1.any() or not inner.any():
        raise ValueError(
            f"barriers: {where} needs rows at α = 0, α = 1 and at least one α between them "
            f"(got {sorted(alpha.tolist())}); evaluate the path at alphas()"
        )
    out = {}
    for m in METRICS:
        v = g[m].to_numpy(dtype=np.float64)
        excess = v[inner] - _line(v[at0][0], v[at1][0], alpha[inner])
        i = int(np.argmax(excess))  # the first α of the largest excess
        out[f"{m}_barrier"] = float(excess[i])
        out[f"{m}_barrier_alpha"] = float(alpha[inner][i])
    return out


def barriers(path_df: pd.DataFrame) -> pd.DataFrame:
    """The loss and error barriers of each path in ``path_df`` (:func:`evaluate_path`'s
    rows, with any extra grouping columns, e.g. the pair or the bn mode): per group of
    every column other than alpha, loss and error, the signed max over 0 < α < 1 of
    v(α) − ((1 − α)·v(0) + α·v(1)) and its α (the first, on ties). Columns: the group
    columns, loss_barrier, loss_barrier_alpha, error_barrier, error_barrier_alpha."""
    missing = [c for c in PATH_COLUMNS if c not in path_df.columns and c != "split"]
    if missing:
        raise ValueError(
            f"barriers: path_df lacks columns {missing}; pass evaluate_path's DataFrame"
        )
    groups = [c for c in path_df.columns if c not in ("alpha", *METRICS)]
    if not groups:
        return pd.DataFrame([_group_barriers(path_df, "the path")])
    rows = []
    for key, g in path_df.groupby(groups, sort=False, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        where = ", ".join(f"{c}={k!r}" for c, k in zip(groups, key, strict=True))
        rows.append({**dict(zip(groups, key, strict=True)), **_group_barriers(g, where)})
    return pd.DataFrame(rows)
