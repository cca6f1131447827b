"""Models: builders keyed by the ``family`` of each entry of ``catalog.MODELS``.

Every model is a :class:`Classifier`: it lists its building blocks in order from the input
(depth 0) to the output, and every parameter and buffer belongs to exactly one block. The
measures read that order from the checkpoints' metadata, so they never rebuild the model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import catalog


class Classifier(nn.Module):
    """A model whose building blocks are named, ordered input -> output."""

    def block_names(self) -> list[str]:
        raise NotImplementedError

    def block_of(self) -> dict[str, tuple[str, int]]:
        """state_dict key -> (block name, depth). Raises if a key belongs to no block."""
        names = self.block_names()
        out: dict[str, tuple[str, int]] = {}
        for key in self.state_dict():
            hits = [(n, d) for d, n in enumerate(names) if key.startswith(n + ".")]
            if len(hits) != 1:
                raise AssertionError(f"{type(self).__name__}: {key} is in blocks {hits}")
            out[key] = hits[0]
        return out


# --- LeNet-5 ---------------------------------------------------------------------------------


class LeNet5(Classifier):
    """LeNet-5 with ReLU and max-pooling; inputs smaller than 32x32 are zero-padded to 32."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int):
        super().__init__()
        self.pad = max(0, 32 - image_size)
        self.conv1 = nn.Conv2d(in_channels, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        side = ((max(image_size, 32) - 4) // 2 - 4) // 2
        self.fc1 = nn.Linear(16 * side * side, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def block_names(self) -> list[str]:
        return ["conv1", "conv2", "fc1", "fc2", "fc3"]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad:
            x = F.pad(x, (self.pad // 2, self.pad - self.pad // 2) * 2)
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.relu(self.fc2(F.relu(self.fc1(x.flatten(1)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.features(x))


# --- the depth study's ResNet family ---------------------------------------------------------


def _shortcut(inplanes: int, outplanes: int, stride: int, residual: bool) -> nn.Module | None:
    """Identity, a 1x1 projection when the shape changes, or nothing at all for plain blocks
    (a plain block owns no unused projection whose zero change would enter the measures)."""
    if not residual:
        return None
    if stride == 1 and inplanes == outplanes:
        return nn.Identity()
    return nn.Sequential(
        nn.Conv2d(inplanes, outplanes, 1, stride=stride, bias=False), nn.BatchNorm2d(outplanes)
    )


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int, residual: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(inplanes, planes, stride, residual)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.shortcut is not None:
            out = out + self.shortcut(x)
        return F.relu(out)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, residual: bool):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.shortcut = _shortcut(inplanes, out, stride, residual)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.shortcut is not None:
            out = out + self.shortcut(x)
        return F.relu(out)


BLOCKS: dict[str, type[nn.Module]] = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNet(Classifier):
    """ImageNet-style stem (7x7/2 conv, BN, ReLU, 3x3/2 max-pool), four stages, global
    average pool, linear head. ``even`` (the depth study's variant): a stem half as wide as
    the stages (64 for the default width 128), then every stage ``width`` wide with no
    stride; otherwise torchvision's ResNet: stem ``width`` (default 64), stages ``width`` x
    (1, 2, 4, 8) with strides (1, 2, 2, 2)."""

    def __init__(
        self,
        block: str,
        layers: list[int],
        residual: bool,
        even: bool,
        in_channels: int,
        num_classes: int,
        width: int | None = None,
    ):
        super().__init__()
        cls = BLOCKS[block]
        width = width or (128 if even else 64)
        planes = [width] * 4 if even else [width, 2 * width, 4 * width, 8 * width]
        strides = [1, 1, 1, 1] if even else [1, 2, 2, 2]
        stem = max(1, width // 2) if even else width
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, stem, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(stem),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        inplanes = stem
        self._blocks: list[str] = []
        for i, (n, p, s) in enumerate(zip(layers, planes, strides, strict=True), start=1):
            stage = []
            for j in range(n):
                stage.append(cls(inplanes, p, s if j == 0 else 1, residual))
                inplanes = p * cls.expansion
                self._blocks.append(f"layer{i}.{j}")
            setattr(self, f"layer{i}", nn.Sequential(*stage))
        self.fc = nn.Linear(inplanes, num_classes)
        self.num_features = inplanes

    def block_names(self) -> list[str]:
        return ["stem", *self._blocks, "fc"]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


# --- registry ----------------------------------------------------------------------------------

Builder = Callable[..., Classifier]

BUILDERS: dict[str, Builder] = {
    "lenet": lambda channels, size, classes, **kw: LeNet5(channels, classes, size, **kw),
    "resnet": lambda channels, size, classes, **kw: ResNet(
        in_channels=channels, num_classes=classes, **kw
    ),
}


def build_model(name: str, dataset: str, settings: dict[str, Any] | None = None) -> Classifier:
    """Build registered model ``name`` for the channels, size and classes of ``dataset``."""
    spec = catalog.MODELS[name]
    ds = catalog.DATASETS[dataset]
    return BUILDERS[spec.family](
        ds.channels, ds.size, ds.classes, **spec.options, **(settings or {})
    )
