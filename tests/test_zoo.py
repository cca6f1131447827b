"""The model zoo of the four studies: parameter and block counts pinned, torchvision forms
checked against torchvision, and the 'pretrained' and 'from_run' inits."""

import pytest
import torch
import torchvision

from paramdyn import catalog
from paramdyn.checkpoints import save_checkpoint
from paramdyn.config import DEFAULT_SCHEMA, ConfigError, load_studies
from paramdyn.inits import InitError, initialise, pretrained_file
from paramdyn.models import build_model

# (model, dataset) -> (parameters, blocks)
PINNED = {
    ("lenet5", "mnist5k"): (61_706, 5),
    ("resnet18-cifar", "cifar10"): (11_173_962, 10),
    ("resnet18-torchvision", "cifar10"): (11_181_642, 10),
    ("vgg11", "cifar10"): (9_225_610, 9),
    ("vgg19", "cifar10"): (20_029_514, 17),
    ("vgg19-bn", "cifar10"): (20_040_522, 17),
    ("cnn5-plain", "mnist5k"): (436_010, 7),
    ("cnn5", "mnist5k"): (576_330, 4),
    ("cnn5-residual", "cifar10"): (513_386, 7),
    ("deepnet-plain", "mnist5k"): (93_130, 22),
    ("resnet50-bottleneck-plain-even", "cifar10"): (None, 18),
}


@pytest.mark.parametrize(("model", "dataset"), PINNED)
def test_pinned_counts(model, dataset):
    params, blocks = PINNED[(model, dataset)]
    m = build_model(model, dataset)
    if params is not None:
        assert sum(p.numel() for p in m.parameters()) == params
    assert len(m.block_names()) == blocks
    assert set(m.block_of()) == set(m.state_dict())


@pytest.mark.parametrize("name", sorted(n for n in catalog.MODELS if "imagenet" not in n))
def test_every_model_runs_on_every_input_shape(name):
    m = build_model(
        name, "digits", {"width": 4} if "width" in catalog.MODELS[name].settings else {}
    )
    assert m(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    assert m.features(torch.randn(2, 1, 8, 8)).shape == (
        2,
        m.num_features if hasattr(m, "num_features") else 84,
    )
    names = m.block_names()
    assert len(set(names)) == len(names)
    for key, (block, depth) in m.block_of().items():
        assert key.startswith(block + ".") and names[depth] == block


@pytest.mark.parametrize("depth", [11])
def test_vgg_imagenet_form_matches_torchvision(depth):
    for bn in ("", "_bn"):
        ours = build_model(f"vgg{depth}{bn.replace('_', '-')}-imagenet", "cifar10")
        ref = getattr(torchvision.models, f"vgg{depth}{bn}")(num_classes=10)
        assert [t.shape for t in ours.state_dict().values()] == [
            t.shape for t in ref.state_dict().values()
        ]
        assert ours.features(torch.randn(1, 3, 32, 32)).shape == (1, 4096)


def test_deepnet_depth_setting():
    m = build_model("deepnet-residual", "mnist5k", {"depth": 50, "width": 8})
    assert len(m.block_names()) == 52


def test_pretrained_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path = pretrained_file("resnet18")
    assert path == tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    model = build_model("resnet18-torchvision", "mnist5k")
    with pytest.raises(InitError) as e:
        initialise(model, "pretrained", 0, pretrained="resnet18")
    assert str(path) in str(e.value) and "weights='IMAGENET1K_V1'" in str(e.value)
    torch.manual_seed(123)
    tv = torchvision.models.resnet18()
    path.parent.mkdir(parents=True)
    torch.save(tv.state_dict(), path)
    initialise(model, "pretrained", 0, pretrained="resnet18")
    assert torch.equal(model.layer3[1].conv2.weight, tv.layer3[1].conv2.weight)
    assert torch.equal(model.stem[1].running_var, tv.bn1.running_var)
    # grey input: the RGB filters summed over channels
    assert torch.allclose(model.stem[0].weight, tv.conv1.weight.sum(1, keepdim=True))
    assert model.fc.weight.shape == (10, 512)  # a fresh head sized for the dataset
    assert not torch.equal(model.fc.weight[:10], tv.fc.weight[:10, :])


def test_from_run_checkpoint(tmp_path):
    src = initialise(build_model("lenet5", "mnist5k"), "kaiming-normal", 0)
    save_checkpoint(
        tmp_path, src, epoch=1, step=5, epoch_end=True, run_id="a", blocks=src.block_names()
    )
    # transfer to a dataset with another class count: all but the head copied
    dst = initialise(
        build_model("lenet5", "synthetic"),
        "from_run",
        1,
        source=tmp_path / "step00000005.safetensors",
    )
    assert torch.equal(dst.conv2.weight, src.conv2.weight) and torch.equal(
        dst.fc2.bias, src.fc2.bias
    )
    assert dst.fc3.weight.shape == (4, 84)


STUDY = {
    "models": ["lenet5"],
    "datasets": ["synthetic"],
    "inits": ["default"],
    "optimizers": ["sgd"],
    "seeds": [0],
    "epochs": 1,
    "batch_size": 64,
}


def test_from_run_config():
    cfg = {
        "run": ["ft"],
        "studies": {
            "base": STUDY,
            "ft": {
                **STUDY,
                "datasets": ["digits"],
                "inits": [
                    {
                        "name": "from_run",
                        "run": "base/lenet5_synthetic_default_sgd_s0",
                        "label": "ft",
                    }
                ],
            },
        },
    }
    studies = load_studies(cfg, DEFAULT_SCHEMA)
    (run,) = studies["ft"].runs.values()
    assert run.run_id == "lenet5_digits_ft_sgd_s0" and run.init_name == "from_run"
    assert run.init_source == "base/lenet5_synthetic_default_sgd_s0"
    assert studies["base"].target is False  # trained because ft needs it, not a target


@pytest.mark.parametrize(
    ("init", "words"),
    [
        ({"name": "from_run", "run": "base/nope"}, ["from_run names no run 'base/nope'"]),
        ({"name": "from_run"}, ["from_run needs 'run'"]),
        ({"name": "xavier", "run": "x"}, ["'run' is only for from_run"]),
        ("pretrained", ["model 'lenet5' has no pretrained weights", "resnet18-torchvision"]),
    ],
)
def test_bad_inits(init, words):
    cfg = {"studies": {"base": {**STUDY, "inits": [init]}}}
    with pytest.raises(ConfigError) as e:
        load_studies(cfg, DEFAULT_SCHEMA)
    for w in words:
        assert w in str(e.value)


def test_from_run_needs_the_same_model():
    cfg = {
        "studies": {
            "base": STUDY,
            "ft": {
                **STUDY,
                "models": ["cnn5-plain"],
                "inits": [{"name": "from_run", "run": "base/lenet5_synthetic_default_sgd_s0"}],
            },
        }
    }
    with pytest.raises(ConfigError, match="from_run needs the same model"):
        load_studies(cfg, DEFAULT_SCHEMA)
