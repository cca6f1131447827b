"""Initialisations, keyed by the names in ``catalog.INITS``. Each one is deterministic given
the seed: :func:`initialise` seeds torch's generator before touching any weight.

``pretrained`` reads torchvision's ImageNet weights from the local torch hub cache only
(with ``torch.load(weights_only=True)``: no code runs from the file) and never downloads;
``from_run`` starts from another run's final checkpoint, an explicit edge of the DAG.

The layerwise inits (``kaiming-uniform``, ``kaiming-normal``, ``xavier``, ``orthogonal``)
take options (a config's init entry; their defaults in ``catalog.INITS``): ``mode``
(``fan_in`` | ``fan_out``, the kaiming inits only), ``layers`` (the layer kinds the init
touches: ``conv``, ``linear``, ``norm``; the others keep PyTorch's seeded default) and
``bias`` (``zero``, ``default`` or per kind ``{conv: ..., linear: ...}``)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import catalog
from .checkpoints import read_checkpoint

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.LayerNorm)


def layer_kind(m: nn.Module) -> str | None:
    """The kind of a layer an init's ``layers`` option names (``catalog.INIT_LAYER_KINDS``):
    ``conv``, ``linear``, ``norm``, or None for every other module."""
    if isinstance(m, _CONVS):
        return "conv"
    if isinstance(m, nn.Linear):
        return "linear"
    if isinstance(m, _NORMS):
        return "norm"
    return None


WeightFn = Callable[[torch.Tensor, dict[str, Any]], None]

# the weight initialisation of each layerwise init; the options are the init's resolved
# options (``catalog.INITS[name].defaults`` updated with the config entry's)
WEIGHT_INITS: dict[str, WeightFn] = {
    "kaiming-uniform": lambda w, o: nn.init.kaiming_uniform_(
        w, mode=o["mode"], nonlinearity="relu"
    ),
    "kaiming-normal": lambda w, o: nn.init.kaiming_normal_(w, mode=o["mode"], nonlinearity="relu"),
    "xavier": lambda w, o: nn.init.xavier_uniform_(w),
    "orthogonal": lambda w, o: nn.init.orthogonal_(w, gain=math.sqrt(2.0)),
}


def resolve_options(name: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The init's options: its registry defaults updated with ``options``; ``bias`` as a
    mapping {conv: zero|default, linear: zero|default}."""
    o = {**catalog.INITS[name].defaults, **(options or {})}
    if "bias" in o and not isinstance(o["bias"], dict):
        o["bias"] = dict.fromkeys(catalog.INIT_BIAS_KINDS, o["bias"])
    elif "bias" in o:
        o["bias"] = {**dict.fromkeys(catalog.INIT_BIAS_KINDS, "zero"), **o["bias"]}
    return o


def _layerwise(name: str, model: nn.Module, options: dict[str, Any] | None) -> None:
    """Init ``name`` on the layers of the kinds in its ``layers`` option: conv and linear
    weights by the init, their biases zeroed (``bias: zero``) or kept (``default``), norm
    layers weight 1, bias 0. When a layer kind is untouched or a bias is kept, every layer
    first gets PyTorch's default from the seeded generator, so what the init leaves alone
    is PyTorch's seeded default (and the init's draws come after it)."""
    o = resolve_options(name, options)
    layers, bias = set(o["layers"]), o["bias"]
    if layers != set(catalog.INIT_LAYER_KINDS) or "default" in bias.values():
        _default(model)
    weight_fn = WEIGHT_INITS[name]
    for m in model.modules():
        kind = layer_kind(m)
        if kind not in layers:
            continue
        if kind == "norm":
            if m.weight is not None:
                nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
            continue
        weight_fn(m.weight, o)
        if m.bias is not None and bias[kind] == "zero":
            nn.init.zeros_(m.bias)


def _default(model: nn.Module) -> None:
    for m in model.modules():
        if hasattr(m, "reset_parameters") and m is not model:
            m.reset_parameters()


def _initializer(name: str) -> Callable[[nn.Module], None]:
    return lambda model: _layerwise(name, model, None)


INITIALIZERS: dict[str, Callable[[nn.Module], None]] = {
    "default": _default,
    **{name: _initializer(name) for name in WEIGHT_INITS},
}


class InitError(RuntimeError):
    pass


def pretrained_file(arch: str) -> Path:
    """Where torchvision keeps the ImageNet weights of ``arch`` (the torch hub cache)."""
    import torchvision  # here: seconds to import, for the pretrained init only

    url = torchvision.models.get_model_weights(arch)["IMAGENET1K_V1"].url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[1]


def _copy_by_position(model: nn.Module, source: dict[str, torch.Tensor], what: str) -> None:
    """Copy ``source`` (same architecture, possibly other key names) into ``model`` entry by
    entry. A first conv with other input channels gets the source summed over channels (a
    grey image repeated to RGB); a head of another size keeps its fresh initialisation."""
    ours = model.state_dict()
    if len(ours) != len(source):
        raise InitError(f"{what}: {len(source)} tensors, the model has {len(ours)}")
    new = {}
    for i, ((k, t), (sk, s)) in enumerate(zip(ours.items(), source.items(), strict=True)):
        if t.shape == s.shape:
            new[k] = s.to(t.dtype)
        elif i == 0 and t.dim() == 4 and t.shape[1] != s.shape[1] and t.shape[0] == s.shape[0]:
            new[k] = s.sum(dim=1, keepdim=True).repeat(1, t.shape[1], 1, 1) / t.shape[1]
        elif i >= len(ours) - 2:  # the classifier's weight and bias: sized for the dataset
            new[k] = t
        else:
            raise InitError(f"{what}: {sk} has shape {tuple(s.shape)}, {k} {tuple(t.shape)}")
    model.load_state_dict(new)


def load_pretrained(model: nn.Module, arch: str) -> None:
    path = pretrained_file(arch)
    if not path.is_file():
        raise InitError(
            f"init 'pretrained': the ImageNet weights of {arch} are not in the torch hub cache "
            f"({path}); nothing is downloaded on a compute node. Fetch them once on a machine "
            f'with internet: .venv/bin/python -c "import torchvision; '
            f"torchvision.models.{arch}(weights='IMAGENET1K_V1')\" and copy the file there "
            "(or point TORCH_HOME at a folder that has hub/checkpoints/ with it)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InitError(
            f"{path}: unreadable pretrained weights ({e}); delete and fetch again"
        ) from e
    _copy_by_position(model, state, str(path))


def load_from_run(model: nn.Module, checkpoint: Path | str) -> None:
    """Start from another run's final checkpoint (fine-tuning, transfer): a head of another
    size keeps its fresh initialisation."""
    tensors = read_checkpoint(checkpoint).tensors
    missing = [k for k in model.state_dict() if k not in tensors]
    if missing:
        raise InitError(f"{checkpoint}: not a checkpoint of this model (no {missing[0]})")
    _copy_by_position(model, {k: tensors[k] for k in model.state_dict()}, str(checkpoint))


def initialise(
    model: nn.Module,
    name: str,
    seed: int,
    *,
    options: dict[str, Any] | None = None,
    pretrained: str | None = None,
    source: Path | str | None = None,
) -> nn.Module:
    """Initialise ``model`` in place with init ``name`` from a generator seeded by ``seed``.
    ``options``: the init's options (``mode``, ``layers``, ``bias``; a RunSpec's
    ``init_options``), for the layerwise inits. ``pretrained``: the torchvision
    architecture for init 'pretrained'; ``source``: the checkpoint for init 'from_run'.
    Both start from PyTorch's default (seeded) for the head."""
    torch.manual_seed(seed)
    with torch.no_grad():
        if name == "pretrained":
            _default(model)
            load_pretrained(model, pretrained)
        elif name == "from_run":
            _default(model)
            load_from_run(model, source)
        elif name in WEIGHT_INITS:
            _layerwise(name, model, options)
        else:
            INITIALIZERS[name](model)
    return model
