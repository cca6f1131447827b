"""Every registered model: block count, depth order, shapes, and parameter counts pinned
against torchvision's reference implementations."""

import pytest
import torch
import torchvision

from paramdyn import catalog
from paramdyn.inits import initialise
from paramdyn.models import ResNet, build_model

RESNETS = [n for n, s in catalog.MODELS.items() if s.family == "resnet"]


@pytest.mark.parametrize("name", RESNETS)
def test_resnet_blocks_in_depth_order(name):
    spec = catalog.MODELS[name]
    model = build_model(name, "mnist5k", {"width": 4})
    names = model.block_names()
    n_blocks = sum(spec.options["layers"])
    assert len(names) == n_blocks + 2  # stem, the building blocks, the classifier
    expected = (
        ["stem"]
        + [f"layer{i}.{j}" for i, n in enumerate(spec.options["layers"], start=1) for j in range(n)]
        + ["fc"]
    )
    assert names == expected
    layout = model.block_of()
    assert set(layout) == set(model.state_dict())  # every key in exactly one block
    assert layout["stem.0.weight"] == ("stem", 0)
    assert layout["fc.weight"] == ("fc", n_blocks + 1)
    # plain blocks own no shortcut at all; residual ones project where the shape changes
    blocks = [b for i in range(1, 5) for b in getattr(model, f"layer{i}")]
    if spec.shortcut == "plain":
        assert all(b.shortcut is None for b in blocks)
        assert not any(".shortcut." in k for k in layout)
    else:
        assert all(b.shortcut is not None for b in blocks)
        # a projection wherever the shape changes (every variant has at least one)
        assert any(".shortcut.0.weight" in k for k in layout)
    out = model(torch.randn(2, 1, 28, 28))
    assert out.shape == (2, 10)


def test_depth_study_block_counts():
    counts = {d: sum(layers) for d, (_, layers) in catalog.RESNET_DEPTHS.items()}
    assert counts == {18: 8, 26: 8, 34: 16, 50: 16, 68: 33, 101: 33}


@pytest.mark.parametrize("depth", [18, 50])
def test_standard_resnet_matches_torchvision(depth):
    block = catalog.RESNET_DEPTHS[depth][0]
    ours = build_model(f"resnet{depth}-{block}-residual", "cifar10")
    ref = getattr(torchvision.models, f"resnet{depth}")(num_classes=10)
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in ref.parameters())
    assert count == {18: 11_181_642, 50: 23_528_522}[depth]


def test_even_variant_widths():
    m = build_model("resnet26-bottleneck-plain-even", "cifar10")
    assert isinstance(m, ResNet)
    assert m.layer4[-1].conv3.out_channels == 512  # expansion 4 on width 128
    assert m.fc.in_features == 512
    x = torch.randn(1, 3, 32, 32)
    assert m.layer1(m.stem(x)).shape[-1] == 8  # 32 -> 8 after the stem, then no stride
    assert m.features(x).shape == (1, 512)
    # stem 64 wide, then 128: the first block projects 64 -> 128 when residual
    b = build_model("resnet18-basic-residual-even", "mnist5k")
    assert b.stem[0].out_channels == 64 and b.fc.in_features == 128
    assert sum(p.numel() for p in b.parameters()) == 2_302_666
    p = build_model("resnet18-basic-plain-even", "mnist5k")
    assert sum(p.numel() for p in p.parameters()) == 2_302_666 - 64 * 128 - 2 * 128


@pytest.mark.parametrize("dataset", ["mnist5k", "digits", "cifar100"])
def test_lenet_adapts_to_dataset(dataset):
    ds = catalog.DATASETS[dataset]
    m = build_model("lenet5", dataset)
    assert m(torch.randn(3, ds.channels, ds.size, ds.size)).shape == (3, ds.classes)
    assert m.block_names() == ["conv1", "conv2", "fc1", "fc2", "fc3"]


def test_lenet_parameter_count():
    m = build_model("lenet5", "mnist5k")
    assert sum(p.numel() for p in m.parameters()) == 61_706


@pytest.mark.parametrize("init", sorted(set(catalog.INITS) - {"pretrained", "from_run"}))
def test_inits_are_seeded(init):
    a = initialise(build_model("lenet5", "synthetic"), init, seed=3)
    b = initialise(build_model("lenet5", "synthetic"), init, seed=3)
    c = initialise(build_model("lenet5", "synthetic"), init, seed=4)
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), k
    assert any(not torch.equal(x, z) for x, z in zip(a.parameters(), c.parameters(), strict=True))
    if init != "default":
        assert all(float(m.bias.detach().abs().sum()) == 0 for m in (a.conv1, a.fc1))


def test_kaiming_normal_scale():
    m = initialise(build_model("resnet18-basic-plain-even", "cifar10"), "kaiming-normal", 0)
    w = m.layer2[0].conv1.weight
    fan_out = w.shape[0] * w.shape[2] * w.shape[3]
    assert float(w.std()) == pytest.approx((2 / fan_out) ** 0.5, rel=0.05)


@pytest.mark.parametrize("shape", [(8, 16, 4, 4), (5, 7, 13, 11), (4, 32, 1, 1)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_global_avg_pool_is_adaptive_avg_pool_bit_for_bit(shape, channels_last):
    """The models' global pool (a mean, deterministic on CUDA) gives the values and
    gradients of flatten(adaptive_avg_pool2d(x, 1), 1) exactly on a CPU."""
    from paramdyn.models import global_avg_pool

    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya = torch.flatten(torch.nn.functional.adaptive_avg_pool2d(a, 1), 1)
    yb = global_avg_pool(b)
    g = torch.randn(ya.shape, generator=torch.Generator().manual_seed(1))
    ya.backward(g)
    yb.backward(g)
    assert torch.equal(ya, yb) and torch.equal(a.grad, b.grad)
