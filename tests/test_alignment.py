"""Permutation alignment (paramdyn.alignment): the spec derived from every registered model,
and weight matching, checked on permuted copies, whose answer is known.

Every name of ``catalog.MODELS`` is a case (the deep stacks with a ``norm`` setting twice:
with and without BatchNorm), built small on ``digits`` (8x8x1, 10 classes; ``width`` 8 and
``depth`` 3 where the model's ``settings`` allow) and made to look trained: BatchNorm
weights and biases drawn at random, running stats moved by a few train-mode forwards.

- A copy with every group shuffled computes the same outputs (eval mode), is far from the
  original, and weight matching brings it back exactly: the recovered permutations are
  the inverses of the ones applied (random weights: every unit is distinct).
- The spec fixes exactly the input channels (the first layer's weight axis 1) and the
  classes (the last layer's axis 0) and covers every other conv/linear axis.

VGG has no ``width`` setting (512-wide stacks): weight matching runs on the smallest depth
of each form (VGG-11, ~1.5 s each); the deeper ones get every check but matching (same
structure, more 512-wide convs). The ImageNet form's 4096-4096 classifier is narrowed to
16 units in these cases (its 4096 x 4096 assignments and 25088 x 4096 products take
tens of seconds, its permuted copy ~5 s); :func:`test_full_width_vgg_imagenet_spec` checks
the spec of the real one (groups of 4096, the flattened 512 x 7 x 7 map read in blocks of
49).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from paramdyn import alignment as al
from paramdyn import catalog
from paramdyn.models import build_model

DATASET = "digits"
SMALL = {"width": 8, "depth": 3}
VGG_MATCHED_DEPTH = min(s.options["depth"] for s in catalog.MODELS.values() if s.family == "vgg")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the 2-core machine is shared
    yield
    torch.set_num_threads(threads)


def _cases() -> list[tuple[str, dict]]:
    cases = []
    for name, spec in catalog.MODELS.items():
        settings = {k: v for k, v in SMALL.items() if k in spec.settings}
        cases.append((name, settings))
        if "norm" in spec.settings:
            cases.append((name, {**settings, "norm": True}))
    return cases


CASES = _cases()
IDS = [name + ("-norm" if s.get("norm") else "") for name, s in CASES]


def _input(batch: int = 1, seed: int = 0) -> torch.Tensor:
    ds = catalog.DATASETS[DATASET]
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, ds.channels, ds.size, ds.size, generator=gen)


def _narrow_imagenet_classifier(model: nn.Module, hidden: int = 16) -> None:
    """VGG's ImageNet classifier (Linear 25088->4096->4096->classes) narrowed to ``hidden``."""
    linears = [i for i, m in enumerate(model.classifier) if isinstance(m, nn.Linear)]
    first, *middle, last = linears
    model.classifier[first] = nn.Linear(model.classifier[first].in_features, hidden)
    for i in middle:
        model.classifier[i] = nn.Linear(hidden, hidden)
    model.classifier[last] = nn.Linear(hidden, model.classifier[last].out_features)


def _trained_looking(name: str, settings: dict, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if catalog.MODELS[name].options.get("form") == "imagenet":
        with torch.device("meta"):  # no seconds spent drawing the 120M weights replaced
            model = build_model(name, DATASET, settings)
        _narrow_imagenet_classifier(model)
        model = model.to_empty(device="cpu")
        for m in model.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
    else:
        model = build_model(name, DATASET, settings)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for bn in bns:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0.0, 0.1)
        model.train()
        for i in range(3):
            model(_input(8, seed=100 + i) + 0.5)
    return model.eval()


def _shuffle(spec: al.PermutationSpec, seed: int) -> dict[str, torch.Tensor]:
    """A random permutation of every group, none of them the identity."""
    perms = al.random_permutation(spec, seed)
    for g, p in perms.items():
        if len(p) > 1 and torch.equal(p, torch.arange(len(p))):
            perms[g] = torch.roll(p, 1)
    return perms


def _params_distance(spec, a, b) -> float:
    return sum(((a[k] - b[k]).double() ** 2).sum().item() for k in spec.params) ** 0.5


def _params_norm(spec, a) -> float:
    return sum((a[k].double() ** 2).sum().item() for k in spec.params) ** 0.5


def _layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]


def _check_fixed_and_covered(model: nn.Module, spec: al.PermutationSpec) -> None:
    """Input channels and classes fixed; every other conv/linear axis in a group."""
    state = model.state_dict()
    assert set(spec.axes) == set(state)
    layers = _layers(model)
    for name in layers:
        axes = spec.axes[f"{name}.weight"]
        assert (axes[0] is None) == (name == layers[-1]), (name, axes)
        assert (axes[1] is None) == (name == layers[0]), (name, axes)
        assert all(a is None for a in axes[2:]), (name, axes)  # kernel axes
        if f"{name}.bias" in state:
            assert spec.axes[f"{name}.bias"] == axes[:1]
    for key, axes in spec.axes.items():
        assert len(axes) == state[key].dim()
        if key.endswith("num_batches_tracked"):
            assert axes == ()
        for g, block, n in zip(axes, spec.blocks[key], state[key].shape, strict=True):
            assert g is None or spec.groups[g] * block == n
    assert all(
        k in spec.params for k in state if not k.split(".")[-1].startswith(("running", "num"))
    )


@pytest.mark.parametrize("name, settings", CASES, ids=IDS)
def test_permuted_copy_computes_the_same_function(name, settings):
    model = _trained_looking(name, settings)
    spec = al.permutation_spec(model, _input())
    _check_fixed_and_covered(model, spec)
    state = model.state_dict()
    before = {k: v.clone() for k, v in state.items()}
    perms = _shuffle(spec, seed=1)
    permuted = al.apply_permutation(spec, perms, state)
    assert all(torch.equal(before[k], state[k]) for k in state)  # input untouched
    for key, axes in spec.axes.items():  # parameters and running stats alike
        if any(g is not None and spec.groups[g] > 1 for g in axes):
            assert not torch.equal(permuted[key], state[key]), key
    twin = copy.deepcopy(model)
    twin.load_state_dict(permuted)
    x = _input(8, seed=7)
    with torch.no_grad():
        out, out_twin = model(x), twin.eval()(x)
    torch.testing.assert_close(out_twin, out, rtol=1e-4, atol=1e-5 * out.abs().max().item())
    assert _params_distance(spec, state, permuted) > 0.3 * _params_norm(spec, state)


def _matching_skip(name: str) -> str | None:
    spec = catalog.MODELS[name]
    if spec.family == "vgg" and spec.options["depth"] != VGG_MATCHED_DEPTH:
        return (
            f"VGG-{spec.options['depth']}: VGG-{VGG_MATCHED_DEPTH} of the same form is matched "
            "(no width setting: more 512-wide convs only add seconds)"
        )
    return None


MATCHING_CASES = [
    pytest.param(name, s, id=i, marks=[pytest.mark.skip(reason=_matching_skip(name))])
    if _matching_skip(name)
    else pytest.param(name, s, id=i)
    for (name, s), i in zip(CASES, IDS, strict=True)
]


@pytest.mark.parametrize("name, settings", MATCHING_CASES)
def test_weight_matching_undoes_a_permutation(name, settings):
    model = _trained_looking(name, settings)
    spec = al.permutation_spec(model, _input())
    state = model.state_dict()
    perms = _shuffle(spec, seed=2)
    permuted = al.apply_permutation(spec, perms, state)
    found = al.weight_matching(spec, state, permuted)
    aligned = al.apply_permutation(spec, found, permuted)
    assert _params_distance(spec, state, aligned) == 0.0
    assert all(torch.equal(aligned[k], state[k]) for k in state)  # running stats too
    expected = al.inverse(perms)
    for g, n in spec.groups.items():
        if n > 1:
            assert torch.equal(found[g], expected[g]), g


# --- hand-checked specs ---------------------------------------------------------------------


def _bn(prefix: str) -> set[tuple[str, int]]:
    return {(f"{prefix}.{s}", 0) for s in ("weight", "bias", "running_mean", "running_var")}


def test_residual_streams_by_hand():
    """resnet18-cifar (width 8): one group per stage's residual stream, written by the stem
    or the stage's first projection and every block's last conv, one per block's inner
    conv; the plain form shares nothing."""
    model = build_model("resnet18-cifar", DATASET, {"width": 8})
    spec = al.permutation_spec(model, _input())
    assert spec.groups == {
        "stem.0": 8, "layer1.0.conv1": 8, "layer1.1.conv1": 8,
        "layer2.0.conv1": 16, "layer2.0.conv2": 16, "layer2.1.conv1": 16,
        "layer3.0.conv1": 32, "layer3.0.conv2": 32, "layer3.1.conv1": 32,
        "layer4.0.conv1": 64, "layer4.0.conv2": 64, "layer4.1.conv1": 64,
    }  # fmt: skip
    assert spec.members("stem.0") == {
        ("stem.0.weight", 0), *_bn("stem.1"),
        ("layer1.0.conv1.weight", 1), ("layer1.0.conv2.weight", 0), *_bn("layer1.0.bn2"),
        ("layer1.1.conv1.weight", 1), ("layer1.1.conv2.weight", 0), *_bn("layer1.1.bn2"),
        ("layer2.0.conv1.weight", 1), ("layer2.0.shortcut.0.weight", 1),
    }  # fmt: skip
    assert spec.members("layer2.0.conv2") == {
        ("layer2.0.conv2.weight", 0), *_bn("layer2.0.bn2"),
        ("layer2.0.shortcut.0.weight", 0), *_bn("layer2.0.shortcut.1"),
        ("layer2.1.conv1.weight", 1), ("layer2.1.conv2.weight", 0), *_bn("layer2.1.bn2"),
        ("layer3.0.conv1.weight", 1), ("layer3.0.shortcut.0.weight", 1),
    }  # fmt: skip
    assert spec.members("layer1.0.conv1") == {
        ("layer1.0.conv1.weight", 0),
        *_bn("layer1.0.bn1"),
        ("layer1.0.conv2.weight", 1),
    }
    assert ("fc.weight", 1) in spec.members("layer4.0.conv2")
    assert spec.axes["fc.weight"][0] is None and spec.axes["fc.bias"] == (None,)
    assert spec.axes["stem.0.weight"][1] is None

    plain = al.permutation_spec(
        build_model("resnet18-cifar-plain", DATASET, {"width": 8}), _input()
    )
    assert len(plain.groups) == 17  # the stem and each of the 16 convs of the blocks
    assert plain.members("stem.0") == {
        ("stem.0.weight", 0),
        *_bn("stem.1"),
        ("layer1.0.conv1.weight", 1),
    }


def test_flattened_map_is_permuted_in_blocks():
    """LeNet-5 on 8x8 digits (padded to 32): fc1 reads conv2's 16 maps of 5x5, each
    channel's 25 features contiguous; a channel permutation moves them as one block."""
    model = build_model("lenet5", DATASET)
    spec = al.permutation_spec(model, _input())
    assert spec.axes["fc1.weight"] == ("fc1", "conv2")
    assert spec.blocks["fc1.weight"] == (1, 25)
    perm = torch.arange(16).roll(1)
    perms = {g: torch.arange(n) for g, n in spec.groups.items()} | {"conv2": perm}
    out = al.apply_permutation(spec, perms, model.state_dict())
    w = model.state_dict()["fc1.weight"].reshape(120, 16, 25)
    assert torch.equal(out["fc1.weight"].reshape(120, 16, 25), w[:, perm])


def test_full_width_vgg_imagenet_spec():
    model = build_model(f"vgg{VGG_MATCHED_DEPTH}-imagenet", DATASET)
    spec = al.permutation_spec(model, _input())
    _check_fixed_and_covered(model, spec)
    first, last = "classifier.0.weight", "classifier.6.weight"
    assert spec.blocks[first] == (1, 49)  # 512 maps, padded to 32 then pooled to 7x7
    assert spec.groups[spec.axes[first][0]] == 4096
    assert spec.axes[last] == (None, "classifier.3")


# --- errors and small contracts --------------------------------------------------------------


class _Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        x = torch.cat([self.conv(x), self.conv(x)], 1)
        return self.fc(x.mean((2, 3)))


class _LayerNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(64, 8), nn.LayerNorm(8), nn.Linear(8, 2)

    def forward(self, x):
        return self.fc2(self.norm(self.fc1(x.flatten(1))))


@pytest.mark.parametrize(
    "model, op", [(_Concat(), "torch.cat"), (_LayerNormNet(), "module LayerNorm")]
)
def test_unknown_op_is_named(model, op):
    with pytest.raises(al.AlignmentError, match=rf"unknown op .*{op}"):
        al.permutation_spec(model, _input())


def test_spec_leaves_the_model_untouched():
    model = _trained_looking("resnet18-basic-residual", {"width": 8}).train()
    before = copy.deepcopy(model.state_dict())
    al.permutation_spec(model, _input(4))
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_inverse_and_wrong_inputs():
    model = _trained_looking("cnn5-residual", {})
    spec = al.permutation_spec(model, _input())
    state = model.state_dict()
    perms = _shuffle(spec, seed=3)
    back = al.apply_permutation(spec, al.inverse(perms), al.apply_permutation(spec, perms, state))
    assert all(torch.equal(back[k], state[k]) for k in state)
    with pytest.raises(al.AlignmentError, match="missing"):
        al.apply_permutation(spec, perms, {k: v for k, v in state.items() if k != "fc.bias"})
    with pytest.raises(al.AlignmentError, match="wrong size"):
        al.apply_permutation(spec, {**perms, "stem": torch.arange(3)}, state)


def test_align_brings_independent_networks_closer():
    """Two independent initialisations: aligning b to a can only lower their distance."""
    a = _trained_looking("resnet18-cifar", {"width": 8}, seed=0)
    b = _trained_looking("resnet18-cifar", {"width": 8}, seed=1)
    spec = al.permutation_spec(a, _input())
    sa, sb = a.state_dict(), b.state_dict()
    aligned, perms = al.align(a, _input(), sa, sb)
    assert set(perms) == set(spec.groups)
    assert _params_distance(spec, sa, aligned) < 0.99 * _params_distance(spec, sa, sb)
    # the aligned copy is the same function as b
    twin = copy.deepcopy(b)
    twin.load_state_dict(aligned)
    x = _input(4, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(twin.eval()(x), b(x), rtol=1e-4, atol=1e-6)


def _group_similarity(spec, a, b, g) -> torch.Tensor:
    """sum over the parameters touching group g of A B^T, g's axis first (blocks kept
    together), written here from the spec alone."""
    n = spec.groups[g]
    sim = torch.zeros(n, n, dtype=torch.float64)
    for key, axis in spec.members(g):
        if key in spec.params:
            block = spec.blocks[key][axis]
            ta, tb = (
                t[key].double().unflatten(axis, (n, block)).movedim(axis, 0).reshape(n, -1)
                for t in (a, b)
            )
            sim += ta @ tb.T
    return sim


@pytest.mark.parametrize("name", ["resnet18-cifar", "lenet5"])
def test_matching_ends_where_no_group_can_improve(name):
    """Independent networks (no known answer): at the result, each group's permutation is
    the best assignment given all the others (the coordinate descent's fixed point)."""
    from scipy.optimize import linear_sum_assignment

    a = _trained_looking(name, {"width": 8} if name != "lenet5" else {}, seed=0)
    b = _trained_looking(name, {"width": 8} if name != "lenet5" else {}, seed=1)
    spec = al.permutation_spec(a, _input())
    sa, sb = a.state_dict(), b.state_dict()
    perms = al.weight_matching(spec, sa, sb, seed=4)
    for g, n in spec.groups.items():
        others = {**perms, g: torch.arange(n)}
        sim = _group_similarity(spec, sa, al.apply_permutation(spec, others, sb), g).numpy()
        best = sim[linear_sum_assignment(sim, maximize=True)].sum()
        assert sim[range(n), perms[g].numpy()].sum() >= best * (1 - 1e-9), g


class _ChannelMean(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 4, 3), nn.Linear(6, 2)

    def forward(self, x):  # the mean over channels, not a pool: the channel axis is gone
        return self.fc(self.conv(x).mean(1).flatten(1)[:, :6])


def test_a_mean_over_channels_is_refused():
    with pytest.raises(al.AlignmentError, match="spatial axes"):
        al.permutation_spec(_ChannelMean(), _input())
