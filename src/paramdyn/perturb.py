"""Perturbations of a trained model's state_dict, and the norms that compare a retrained
model with the original (study "dynamics", REFERENCE.md).

Each perturbation maps a state_dict to a new one (the input is never modified; every tensor
of the result is a fresh copy). They act on the trainable parameters only (the keys listed
in a checkpoint's ``parameters`` metadata); BatchNorm running statistics and counters are
buffers and stay as they are unless a perturbation's ``include_buffers`` option asks
otherwise. Start from the run's final checkpoint (the seed study restarted from its
best-epoch weights, a flaw not to copy).

The option schemas are plain data (:data:`PERTURBATION_OPTIONS`) and
:func:`validate_perturbation` needs neither torch nor numpy, so a config can be checked by
the scheduler in milliseconds; torch is imported only by the functions that move tensors.

Registry (:data:`PERTURBATIONS`), name: options (defaults):

- ``identity``: no options. The control: retraining the unperturbed weights with the same
  recipe measures how far retraining alone moves them.
- ``sign_flip``: ``include_buffers`` (false). θ -> -θ for every parameter. With
  ``include_buffers``, every floating-point buffer except variances (buffers whose name
  ends in ``var``) is negated too: a BatchNorm's ``running_mean`` follows the negated
  pre-activations (conv without bias, weights negated: its outputs are exactly negated,
  their mean too, their variance not), so ``running_var`` is never negated (a variance must stay positive; the seed study negated
  it, a flaw not to copy) and ``num_batches_tracked`` (an integer counter) is untouched.
  With ReLU networks -θ computes a different function: nothing here assumes a symmetry.
- ``offset``: ``epsilon`` (1e-6, the seed study's "distortion"). θ -> θ + ε for every
  parameter entry, buffers untouched. The addition is done in the tensor's own dtype: in
  float32 the realised change of an entry is ε rounded to that entry's precision (for
  |θ| about 1, ε ± 6e-8); :func:`perturbation_summary`'s ``dist_start_theta1`` reports the
  realised size.
- ``gaussian``: ``scale`` (0.01), ``relative`` (false). θ + N(0, σ²), σ = ``scale``, or
  ``scale`` x the tensor's RMS when ``relative`` (a tensor of zeros then gets no noise). The
  noise comes from a CPU generator seeded by ``seed``, drawn tensor by tensor in sorted key
  order, so the result depends on the seed only, not on the dict's order or the device.
- ``reinit``: ``blocks`` (required: building-block names, e.g. ``["layer4.1", "fc"]``),
  ``init`` (default: the ``init`` argument of :func:`apply_perturbation`, i.e. the run's
  own init, with its init options), ``include_buffers`` (false). A fresh model is built
  (``models.build_model``, for the run's input shape) and initialised (``inits.initialise`` with ``seed``); the chosen
  blocks' parameters (a key belongs to block b when it starts with ``b + "."``) are copied
  from it. With ``include_buffers`` the blocks' buffers are reset too (fresh BatchNorm
  statistics: mean 0, variance 1, counter 0). Passing the run's own seed and init rewinds
  the blocks to their exact initial weights; another seed draws new ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from . import catalog, columns

# torch, pandas and the modules built on them are imported inside the functions that need
# them, not here: the scheduler imports this module (validate_perturbation) torch-free

# name -> option -> (kind, default, help). kind: "bool", "number", "positive", "init",
# "blocks". A default of REQUIRED means the option must be given.
REQUIRED = object()

PERTURBATION_OPTIONS: dict[str, dict[str, tuple[str, Any, str]]] = {
    "identity": {},
    "sign_flip": {
        "include_buffers": (
            "bool",
            False,
            "also negate floating buffers (BatchNorm running_mean), never variances",
        ),
    },
    "offset": {
        "epsilon": ("number", 1e-6, "added to every parameter entry"),
    },
    "gaussian": {
        "scale": ("positive", 0.01, "noise standard deviation (absolute, or x RMS if relative)"),
        "relative": ("bool", False, "scale is relative to each tensor's RMS"),
    },
    "reinit": {
        "blocks": ("blocks", REQUIRED, "building blocks to re-initialise, e.g. [layer4.1, fc]"),
        "init": ("init", None, "a registered init; default: the run's own init"),
        "include_buffers": ("bool", False, "also reset the blocks' BatchNorm statistics"),
    },
}


def _fail(name: str, message: str) -> ValueError:
    return ValueError(f"perturbation '{name}': {message}")


def _check_option(name: str, key: str, kind: str, value: Any) -> Any:
    if kind == "bool":
        if not isinstance(value, bool):
            raise _fail(name, f"option '{key}' must be true or false, got {value!r}")
        return value
    if kind in ("number", "positive"):
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not ok or not math.isfinite(value) or (kind == "positive" and value <= 0):
            what = "a positive number" if kind == "positive" else "a finite number"
            raise _fail(name, f"option '{key}' must be {what}, got {value!r}")
        return float(value)
    if kind == "init":
        if value is None:
            return None
        if value not in catalog.INITS:
            raise _fail(
                name,
                f"option '{key}': unknown init {value!r}; valid: {catalog.describe(catalog.INITS)}",
            )
        return value
    if kind == "blocks":
        if (
            isinstance(value, str)
            or not isinstance(value, list | tuple)
            or not value
            or not all(isinstance(b, str) and b for b in value)
        ):
            raise _fail(
                name,
                f"option '{key}' must be a non-empty list of block names "
                f"(e.g. ['layer4.1', 'fc']), got {value!r}",
            )
        dupes = sorted({b for b in value if list(value).count(b) > 1})
        if dupes:
            raise _fail(name, f"option '{key}' names block(s) twice: {', '.join(dupes)}")
        return list(value)
    raise AssertionError(kind)


def validate_perturbation(
    name: str, options: Mapping[str, Any] | None = None, *, block_names: Iterable[str] | None = None
) -> dict[str, Any]:
    """Check a perturbation's name and options; return the options with defaults filled in.

    Raises ValueError naming the perturbation and the bad, missing or unknown option. Pure
    Python (no torch). ``block_names``, when given (the model's blocks, input to output),
    also checks ``reinit``'s blocks against them."""
    if name not in PERTURBATION_OPTIONS:
        raise ValueError(
            f"unknown perturbation {name!r}; valid: {catalog.describe(PERTURBATION_OPTIONS)}"
        )
    options = {} if options is None else options
    if not isinstance(options, Mapping):
        raise _fail(name, f"options must be a mapping, got {type(options).__name__}")
    schema = PERTURBATION_OPTIONS[name]
    for key in options:
        if key not in schema:
            valid = ", ".join(schema) if schema else "none (this perturbation takes no options)"
            raise _fail(name, f"unknown option {key!r}; valid: {valid}")
    resolved: dict[str, Any] = {}
    for key, (kind, default, help_) in schema.items():
        if key in options:
            resolved[key] = _check_option(name, key, kind, options[key])
        elif default is REQUIRED:
            raise _fail(name, f"option '{key}' is required ({help_})")
        else:
            resolved[key] = default
    if block_names is not None and "blocks" in resolved:
        known = list(block_names)
        unknown = [b for b in resolved["blocks"] if b not in known]
        if unknown:
            raise _fail(
                name,
                f"unknown block(s) {', '.join(map(repr, unknown))}; valid: {', '.join(known)}",
            )
    return resolved


# --- the perturbations ---------------------------------------------------------------------
# Each: fn(state, parameter_keys, options, context) -> new state. ``state`` is already a
# fresh copy (every tensor cloned), so a perturbation may modify its tensors in place.


def _identity(state, keys, options, ctx):
    return state


def _sign_flip(state, keys, options, ctx):
    for k in keys:
        state[k].neg_()
    if options["include_buffers"]:
        for k, t in state.items():
            variance = k.rsplit(".", 1)[-1].endswith("var")  # running_var: stays positive
            if k in keys or not t.is_floating_point() or variance:
                continue
            t.neg_()
    return state


def _offset(state, keys, options, ctx):
    for k in keys:
        state[k].add_(options["epsilon"])
    return state


def _gaussian(state, keys, options, ctx):
    import torch

    gen = torch.Generator().manual_seed(ctx["seed"])
    for k in sorted(keys):
        t = state[k]
        noise = torch.randn(t.shape, generator=gen, dtype=torch.float64)
        sigma = options["scale"]
        if options["relative"]:
            sigma *= float(t.double().pow(2).mean().sqrt()) if t.numel() else 0.0
        t.add_((noise * sigma).to(device=t.device, dtype=t.dtype))
    return state


def _reinit(state, keys, options, ctx):
    from .inits import initialise
    from .models import build_model

    name = "reinit"
    if ctx["model_name"] is None or ctx["dataset"] is None:
        raise _fail(name, "needs model_name and dataset (to build a fresh model)")
    init = options["init"] or ctx["init"]
    if init is None:
        raise _fail(name, "no init: set the option 'init' or pass the run's init")
    _check_option(name, "init", "init", init)
    # the run's own init takes the run's init options; another init its defaults
    init_options = None if options["init"] else ctx["init_options"]
    model = build_model(ctx["model_name"], ctx["dataset"], ctx["model_settings"], ctx["inputs"])
    known = model.block_names()
    validate_perturbation(name, options | {"init": init}, block_names=known)
    initialise(model, init, ctx["seed"], options=init_options)
    fresh = model.state_dict()
    if set(fresh) != set(state) or any(fresh[k].shape != state[k].shape for k in state):
        diff = sorted(set(fresh) ^ set(state)) or [
            k for k in state if fresh[k].shape != state[k].shape
        ]
        raise _fail(
            name,
            f"model {ctx['model_name']!r} on {ctx['dataset']!r} (settings "
            f"{ctx['model_settings'] or {}}) does not match the state_dict: "
            f"{', '.join(diff[:5])}{' …' if len(diff) > 5 else ''}",
        )
    chosen, owner = set(options["blocks"]), model.block_of()
    for k, t in state.items():
        if owner[k][0] in chosen and (k in keys or options["include_buffers"]):
            t.copy_(fresh[k])
    return state


PERTURBATIONS: dict[str, Callable[..., Any]] = {
    "identity": _identity,
    "sign_flip": _sign_flip,
    "offset": _offset,
    "gaussian": _gaussian,
    "reinit": _reinit,
}


def apply_perturbation(
    state_dict: Mapping[str, Any],
    name: str,
    options: Mapping[str, Any] | None = None,
    *,
    seed: int,
    parameter_keys: Iterable[str],
    model_name: str | None = None,
    dataset: str | None = None,
    model_settings: Mapping[str, Any] | None = None,
    init: str | None = None,
    init_options: Mapping[str, Any] | None = None,
    inputs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Perturbation ``name`` of ``state_dict`` (tensors); returns a new state_dict.

    ``parameter_keys``: the trainable parameters (a checkpoint's ``parameters``); every
    other key is a buffer. ``seed`` seeds ``gaussian`` and ``reinit``. ``model_name``,
    ``dataset``, ``model_settings`` and ``init`` (the run's; the default of ``reinit``'s
    option ``init``; ``init_options`` and ``inputs`` the run's too) are needed by ``reinit``
    only. Raises ValueError naming the perturbation and the problem."""
    resolved = validate_perturbation(name, options)
    keys = list(parameter_keys)
    missing = [k for k in keys if k not in state_dict]
    if missing:
        raise _fail(name, f"parameter key(s) not in the state_dict: {', '.join(missing[:5])}")
    not_float = [k for k in keys if not state_dict[k].is_floating_point()]
    if not_float:
        raise _fail(name, f"parameter(s) not floating-point: {', '.join(not_float[:5])}")
    state = {k: v.detach().clone() for k, v in state_dict.items()}
    ctx = {
        "seed": int(seed),
        "model_name": model_name,
        "dataset": dataset,
        "model_settings": dict(model_settings or {}),
        "init": init,
        "init_options": dict(init_options or {}),
        "inputs": dict(inputs or {}),
    }
    return PERTURBATIONS[name](state, frozenset(keys), resolved, ctx)


def perturb_checkpoint(
    path,
    name: str,
    options: Mapping[str, Any] | None = None,
    *,
    seed: int,
    model_name: str | None = None,
    dataset: str | None = None,
    model_settings: Mapping[str, Any] | None = None,
    init: str | None = None,
    init_options: Mapping[str, Any] | None = None,
    inputs: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """Read a checkpoint (``checkpoints.read_checkpoint``) and perturb it. Returns the new
    state_dict and the checkpoint's parameter keys (load the state into a model built with
    ``models.build_model`` to retrain it)."""
    from .checkpoints import read_checkpoint

    ckpt = read_checkpoint(path)
    state = apply_perturbation(
        ckpt.tensors,
        name,
        options,
        seed=seed,
        parameter_keys=ckpt.parameters,
        model_name=model_name,
        dataset=dataset,
        model_settings=model_settings,
        init=init,
        init_options=init_options,
        inputs=inputs,
    )
    return state, list(ckpt.parameters)


# --- comparison ------------------------------------------------------------------------------


def perturbation_summary(
    original: Mapping[str, Any],
    perturbed_start: Mapping[str, Any],
    retrained: Mapping[str, Any],
    parameter_keys: Iterable[str],
) -> dict[str, float]:
    """Norms over the parameters (float64 accumulation, buffers excluded) of θ1 (the
    original trained weights), θ_start (the perturbed weights retraining started from) and
    θ2 (the retrained weights):

    ``norm_theta1`` ‖θ1‖, ``norm_theta2`` ‖θ2‖, ``dist_theta1_theta2`` ‖θ1 - θ2‖,
    ``rel_dist_theta1_theta2`` ‖θ1 - θ2‖ / ‖θ1‖, ``cosine_theta1_theta2``,
    ``norm_start`` ‖θ_start‖, ``dist_start_theta1`` ‖θ_start - θ1‖ (the realised size of the
    perturbation), ``dist_start_theta2`` ‖θ2 - θ_start‖ (how far retraining moved), and
    ``numel``. A ratio whose denominator is 0 is NaN."""
    import torch

    keys = list(parameter_keys)
    if not keys:
        raise ValueError("perturbation_summary: no parameter keys")
    for label, sd in (
        ("original", original),
        ("perturbed_start", perturbed_start),
        ("retrained", retrained),
    ):
        missing = [k for k in keys if k not in sd]
        if missing:
            raise ValueError(f"perturbation_summary: {label} lacks {', '.join(missing[:5])}")
    zero = torch.zeros((), dtype=torch.float64)
    sums = {k: zero.clone() for k in ("n1", "n2", "ns", "d12", "ds1", "ds2", "dot12")}
    numel = 0
    for k in keys:
        a = original[k].detach().to("cpu", torch.float64)
        s = perturbed_start[k].detach().to("cpu", torch.float64)
        b = retrained[k].detach().to("cpu", torch.float64)
        if not (a.shape == s.shape == b.shape):
            raise ValueError(
                f"perturbation_summary: {k} has shapes {tuple(a.shape)}, {tuple(s.shape)}, "
                f"{tuple(b.shape)}"
            )
        numel += a.numel()
        sums["n1"] += a.square().sum()
        sums["n2"] += b.square().sum()
        sums["ns"] += s.square().sum()
        sums["d12"] += (a - b).square().sum()
        sums["ds1"] += (s - a).square().sum()
        sums["ds2"] += (b - s).square().sum()
        sums["dot12"] += (a * b).sum()
    v = {k: float(t) for k, t in sums.items()}
    n1, n2 = math.sqrt(v["n1"]), math.sqrt(v["n2"])
    d12 = math.sqrt(v["d12"])
    return {
        "norm_theta1": n1,
        "norm_theta2": n2,
        "dist_theta1_theta2": d12,
        "rel_dist_theta1_theta2": d12 / n1 if n1 > 0 else math.nan,
        "cosine_theta1_theta2": v["dot12"] / (n1 * n2) if n1 > 0 and n2 > 0 else math.nan,
        "norm_start": math.sqrt(v["ns"]),
        "dist_start_theta1": math.sqrt(v["ds1"]),
        "dist_start_theta2": math.sqrt(v["ds2"]),
        "numel": numel,
    }


# --- the workflow's table of a branch ---------------------------------------------------------


def branch_table(source_dir, branch_dir, out) -> Any:
    """``perturbation.parquet`` of one perturb-and-retrain branch: a ``model`` row with the
    :func:`perturbation_summary` norms of θ1 (the source run's final weights, or its
    checkpoint at the branch's ``branch_step``), θ_start (the
    branch's step 0: the perturbed weights) and θ2 (the branch's final weights), the test
    accuracy before (the source run) and after (the branch), and the grid coordinates; then
    one ``block`` row per building block with the same distances over that block's
    parameters (``dist_theta1_theta2``, ``rel_dist_theta1_theta2``,
    ``cosine_theta1_theta2``, ``dist_start_theta1``, ``dist_start_theta2``, ``numel``)."""
    # here, not at the top: the scheduler imports this module (validate_perturbation) and
    # must stay free of numpy, pandas and torch; and runs imports config, which imports this
    import pandas as pd

    from . import tables
    from .checkpoints import read_checkpoint
    from .measures import compare
    from .runs import FinishedRun

    src, br = FinishedRun.read(source_dir), FinishedRun.read(branch_dir)
    step = br.spec.branch_step  # a branch from a chosen step: θ1 is the source there
    theta1 = read_checkpoint(src.final_checkpoint if step is None else src.checkpoint_at(step))
    start = read_checkpoint(br.first_checkpoint)
    theta2 = read_checkpoint(br.final_checkpoint)
    summary = perturbation_summary(theta1.tensors, start.tensors, theta2.tensors, theta1.parameters)
    options = br.spec.perturbation_options
    row = {
        "run_id": br.run_id,
        "source_run": src.run_id,
        "perturbation": br.spec.perturbation,
        "perturbation_name": options["name"],
        **br.coordinates(columns.BRANCH),
        "source_seed": src.spec.seed,
        "status": br.status,
        "accuracy_before": src.result["final_test_accuracy"],
        "accuracy_after": br.result["final_test_accuracy"],
        "best_accuracy_after": br.result["best_test_accuracy"],
        **summary,
    }
    d = compare([theta1, start, theta2])
    d = d[d["granularity"] == "block"]
    vs1 = d[d["reference"] == "init"]
    at_start = vs1[vs1["step"] == start.step].set_index("name")
    at_end = vs1[vs1["step"] == theta2.step].set_index("name")
    moved = d[(d["reference"] == "previous") & (d["step"] == theta2.step)].set_index("name")
    blocks = pd.DataFrame(
        {
            "block": at_end.index,
            "depth": at_end["depth"].to_numpy(),
            "numel": at_end["numel"].to_numpy(),
            "dist_theta1_theta2": at_end["l2"].to_numpy(),
            "rel_dist_theta1_theta2": at_end["rel_l2"].to_numpy(),
            "cosine_theta1_theta2": at_end["cosine"].to_numpy(),
            "dist_start_theta1": at_start.loc[at_end.index, "l2"].to_numpy(),
            "dist_start_theta2": moved.loc[at_end.index, "l2"].to_numpy(),
        }
    )
    ids = [
        "run_id",
        "source_run",
        "perturbation",
        "perturbation_name",
        *columns.BRANCH,
        "source_seed",
        "status",
    ]
    for i, k in enumerate(ids):
        blocks.insert(i, k, row[k])
    blocks.insert(len(ids), "granularity", "block")
    model_row = pd.DataFrame([{**row, "granularity": "model", "block": "", "depth": -1}])
    df = pd.concat([model_row, blocks], ignore_index=True)
    tables.write_parquet(df, out, {"options": options})
    return df
