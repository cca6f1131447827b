"""Initialisations, keyed by the names in ``catalog.INITS``. Each one is deterministic given
the seed: :func:`initialise` seeds torch's generator before touching any weight."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.LayerNorm)


def _apply(weight_fn: Callable[[torch.Tensor], None]) -> Callable[[nn.Module], None]:
    def init(model: nn.Module) -> None:
        for m in model.modules():
            if isinstance(m, _WEIGHTED):
                weight_fn(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, _NORMS) and m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    return init


def _default(model: nn.Module) -> None:
    for m in model.modules():
        if hasattr(m, "reset_parameters") and m is not model:
            m.reset_parameters()


INITIALIZERS: dict[str, Callable[[nn.Module], None]] = {
    "default": _default,
    "kaiming-uniform": _apply(
        lambda w: nn.init.kaiming_uniform_(w, mode="fan_in", nonlinearity="relu")
    ),
    "kaiming-normal": _apply(
        lambda w: nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu")
    ),
    "xavier": _apply(nn.init.xavier_uniform_),
    "orthogonal": _apply(lambda w: nn.init.orthogonal_(w, gain=math.sqrt(2.0))),
}


def initialise(model: nn.Module, name: str, seed: int) -> nn.Module:
    """Initialise ``model`` in place with init ``name`` from a generator seeded by ``seed``."""
    torch.manual_seed(seed)
    with torch.no_grad():
        INITIALIZERS[name](model)
    return model
