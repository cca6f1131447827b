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
from .checkpoints import BlockError, block_of


def global_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> [N, C], the mean over the spatial axes: on a CPU bit for bit
    ``flatten(adaptive_avg_pool2d(x, 1), 1)`` (forward and backward), and with a
    deterministic CUDA backward, which adaptive_avg_pool2d lacks (under
    ``deterministic: true`` its backward raises)."""
    return x.mean((2, 3))


class Classifier(nn.Module):
    """A model whose building blocks are named, ordered input -> output."""

    def block_names(self) -> list[str]:
        raise NotImplementedError

    def block_of(self) -> dict[str, tuple[str, int]]:
        """state_dict key -> (block name, depth). Raises if a key belongs to no block."""
        names = self.block_names()
        out: dict[str, tuple[str, int]] = {}
        for key in self.state_dict():
            try:
                out[key] = block_of(key, names)
            except BlockError as e:
                raise AssertionError(
                    f"{type(self).__name__}: {key} is in blocks {e.hits}"
                ) from None
        return out


# --- LeNet-5 ---------------------------------------------------------------------------------


class LeNet5(Classifier):
    """LeNet-5 with ReLU and max-pooling; inputs smaller than 32x32 are zero-padded to 32
    here, i.e. after normalisation (a border of the mean colour); a run's ``inputs:
    {pad_to: 32}`` pads in pixel space instead (black), before normalisation."""

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
        return global_avg_pool(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class CifarResNet(ResNet):
    """ResNet in CIFAR form: a 3x3 stride-1 stem (conv, BN, ReLU), no max-pool."""

    def __init__(self, block, layers, residual, in_channels, num_classes, width=None):
        super().__init__(block, layers, residual, False, in_channels, num_classes, width)
        width = width or 64
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )


class TorchvisionResNet(Classifier):
    """torchvision's ResNet itself (its module names inside the stages), regrouped into
    stem / layer blocks / fc, in torchvision's parameter order: ImageNet weights load by
    position (``pretrained``)."""

    def __init__(self, arch: str, in_channels: int, num_classes: int):
        super().__init__()
        import torchvision  # here: seconds to import, for these models only

        tv = getattr(torchvision.models, arch)(weights=None)
        if in_channels != 3:
            tv.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.stem = nn.Sequential(tv.conv1, tv.bn1, tv.relu, tv.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            tv.layer1,
            tv.layer2,
            tv.layer3,
            tv.layer4,
        )
        self.fc = nn.Linear(tv.fc.in_features, num_classes)
        self.num_features = tv.fc.in_features
        self._blocks = [
            f"layer{i}.{j}" for i in range(1, 5) for j in range(len(getattr(tv, f"layer{i}")))
        ]

    block_names = ResNet.block_names
    features = ResNet.features
    forward = ResNet.forward


# torchvision's VGG configurations, one row each (kept in rows: the `fmt: skip` below)
_VGG_CFG = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
         512, 512, 512, 512, "M"],
}  # fmt: skip


class VGG(Classifier):
    """VGG, each conv (with its BatchNorm and ReLU) one unit ``features_stack.<i>``.
    ``cifar`` form: the conv stack, a global average pool to 512 features, one linear head
    (the penultimate layer is the 512-wide feature stack, never the logits). ``imagenet``
    form: torchvision's architecture (7x7 adaptive pool, 4096-4096 classifier with
    dropout; same parameters in the same order, so ImageNet weights load by position), its
    last layer sized for the dataset; inputs smaller than 32x32 are zero-padded to 32.
    Blocks: each conv unit, then each linear layer."""

    def __init__(self, depth, batch_norm, form, in_channels, num_classes, image_size):
        super().__init__()
        self.form = form
        self.pad = max(0, 32 - image_size) if form == "imagenet" else 0
        units: list[nn.Module] = []
        c = in_channels
        for v in _VGG_CFG[depth]:
            if v == "M":
                units.append(nn.MaxPool2d(2, 2, ceil_mode=form == "cifar"))
                continue
            unit = [nn.Conv2d(c, v, 3, padding=1)]
            if batch_norm:
                unit.append(nn.BatchNorm2d(v))
            units.append(nn.Sequential(*unit, nn.ReLU(inplace=True)))
            c = v
        self.features_stack = nn.Sequential(*units)
        if form == "imagenet":
            self.classifier = nn.Sequential(
                nn.Linear(512 * 7 * 7, 4096),
                nn.ReLU(True),
                nn.Dropout(),
                nn.Linear(4096, 4096),
                nn.ReLU(True),
                nn.Dropout(),
                nn.Linear(4096, num_classes),
            )
            self.num_features = 4096
        else:
            self.classifier = nn.Sequential(nn.Linear(512, num_classes))
            self.num_features = 512
        convs = [i for i, m in enumerate(units) if isinstance(m, nn.Sequential)]
        linears = [i for i, m in enumerate(self.classifier) if isinstance(m, nn.Linear)]
        self._blocks = [f"features_stack.{i}" for i in convs] + [f"classifier.{i}" for i in linears]

    def block_names(self) -> list[str]:
        return self._blocks

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad:
            x = F.pad(x, (self.pad // 2, self.pad - self.pad // 2) * 2)
        x = self.features_stack(x)
        if self.form == "imagenet":
            return self.classifier[:-1](torch.flatten(F.adaptive_avg_pool2d(x, 7), 1))
        return global_avg_pool(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier[-1](self.features(x))


class ConvStack(Classifier):
    """A stem conv, then ``depth`` blocks of 3x3 'same' convs with ReLU, residual (x +
    f(x)) or plain; no normalisation unless ``norm``. ``widths`` alternate per block;
    a residual block is [conv widths[i], ReLU, conv ``width``] + x, then ReLU (seed 004);
    the head is ``flatten`` + linear (seed 004) or global average pool + linear."""

    def __init__(
        self,
        residual,
        in_channels,
        num_classes,
        image_size,
        depth=20,
        width=16,
        inner=None,
        norm=False,
        head="flatten",
    ):
        super().__init__()
        inner = inner or width
        self.residual, self.head_kind = residual, head
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1)
        blocks = []
        for _ in range(depth):
            mods = [nn.Conv2d(width, inner, 3, padding=1)]
            if norm:
                mods.append(nn.BatchNorm2d(inner))
            mods += [nn.ReLU(), nn.Conv2d(inner, width, 3, padding=1)]
            if norm:
                mods.append(nn.BatchNorm2d(width))
            blocks.append(nn.Sequential(*mods))
        self.blocks = nn.ModuleList(blocks)
        feats = width * image_size * image_size if head == "flatten" else width
        self.fc = nn.Linear(feats, num_classes)
        self.num_features = feats

    def block_names(self) -> list[str]:
        return ["stem", *[f"blocks.{i}" for i in range(len(self.blocks))], "fc"]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        for b in self.blocks:
            x = F.relu(x + b(x)) if self.residual else F.relu(b(x))
        if self.head_kind == "flatten":
            return x.flatten(1)
        return global_avg_pool(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


# --- registry ----------------------------------------------------------------------------------

Builder = Callable[..., Classifier]

BUILDERS: dict[str, Builder] = {
    "lenet": lambda channels, size, classes, **kw: LeNet5(channels, classes, size, **kw),
    "resnet": lambda channels, size, classes, **kw: ResNet(
        in_channels=channels, num_classes=classes, **kw
    ),
    "resnet-cifar": lambda channels, size, classes, **kw: CifarResNet(
        in_channels=channels, num_classes=classes, **kw
    ),
    "resnet-torchvision": lambda channels, size, classes, **kw: TorchvisionResNet(
        in_channels=channels, num_classes=classes, **kw
    ),
    "vgg": lambda channels, size, classes, **kw: VGG(
        in_channels=channels, num_classes=classes, image_size=size, **kw
    ),
    "convstack": lambda channels, size, classes, **kw: ConvStack(
        in_channels=channels, num_classes=classes, image_size=size, **kw
    ),
}


def build_model(
    name: str,
    dataset: str,
    settings: dict[str, Any] | None = None,
    inputs: dict[str, Any] | None = None,
) -> Classifier:
    """Build registered model ``name`` for the channels, size and classes of ``dataset``,
    after the input transform ``inputs`` ({pad_to, channels}: a RunSpec's ``inputs``, as
    ``data.DeviceData`` applies it)."""
    spec = catalog.MODELS[name]
    ds = catalog.DATASETS[dataset]
    inputs = inputs or {}
    channels, size = inputs.get("channels", ds.channels), inputs.get("pad_to", ds.size)
    return BUILDERS[spec.family](channels, size, ds.classes, **{**spec.options, **(settings or {})})
