"""The mechanisms behind the `faithful` variants: init options (mode, layers, bias), the
measures' exclude patterns, and the per-dataset input transform, each checked against the
original studies' recipes (REFERENCE.md) and against a plain recomputation."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import yaml
from torch import nn

from paramdyn.checkpoints import list_checkpoints, read_checkpoint, save_checkpoint
from paramdyn.config import DEFAULT_SCHEMA, ConfigError, RunSpec, load_studies
from paramdyn.data import DeviceData
from paramdyn.inits import initialise
from paramdyn.measures import compare, frozen_table, run_distances
from paramdyn.models import build_model
from paramdyn.runs import FinishedRun

# the dynamics study's faithful init (config.yaml): the original's
# kaiming_normal_(w, nonlinearity='relu') on conv and linear weights, linear biases 0
FAN_IN = {"mode": "fan_in", "layers": ["conv", "linear"], "bias": {"conv": "default"}}
# the depth study's faithful init: kaiming normal fan_out on the convs, BN 1/0, the
# classifier at PyTorch's default
CONVS_ONLY = {"layers": ["conv", "norm"]}
DEPTH_EXCLUDE = ["*.bn*", "stem.1.*"]


def _config() -> dict:
    with open(DEFAULT_SCHEMA.parents[1] / "config.yaml") as f:
        return yaml.safe_load(f)


# --- inits ---------------------------------------------------------------------------------


def _original_dynamics_init(model: nn.Module, seed: int, fn) -> nn.Module:
    """The dynamics original's recipe, literally: PyTorch's default init of the freshly
    built model (seeded), then ``fn(w, nonlinearity='relu')`` on every conv and linear
    weight, linear biases zeroed, conv biases kept."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "reset_parameters") and m is not model:
                m.reset_parameters()
        for m in model.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                fn(m.weight, nonlinearity="relu")
                if isinstance(m, nn.Linear):
                    nn.init.zeros_(m.bias)
    return model


def _lenet():
    return build_model("lenet5", "mnist", inputs={"pad_to": 32, "channels": 3})


@pytest.mark.parametrize(
    ("init", "fn"),
    [("kaiming-normal", nn.init.kaiming_normal_), ("kaiming-uniform", nn.init.kaiming_uniform_)],
)
def test_fan_in_inits_equal_the_original_recipe(init, fn):
    ours = initialise(_lenet(), init, 5, options=FAN_IN).state_dict()
    theirs = _original_dynamics_init(_lenet(), 5, fn).state_dict()
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k


def test_lenet_output_layer_std_fan_in_vs_fan_out():
    """REFERENCE: the original's LeNet-5 output layer has std 0.156 (fan_in), not 0.444."""

    def fc3_std(seed, options=None):
        model = initialise(_lenet(), "kaiming-normal", seed, options=options)
        return float(model.fc3.weight.detach().std())

    stds_in = [fc3_std(seed, FAN_IN) for seed in range(5)]
    stds_out = [fc3_std(seed) for seed in range(5)]
    fan_in, fan_out = 84, 10
    assert sum(stds_in) / 5 == pytest.approx(math.sqrt(2 / fan_in), rel=0.05)  # 0.154
    assert sum(stds_out) / 5 == pytest.approx(math.sqrt(2 / fan_out), rel=0.05)  # 0.447
    model = initialise(_lenet(), "kaiming-normal", 0, options=FAN_IN)
    # each layer: std sqrt(2 / fan_in), fan_in = in_features (x kernel area for convs)
    for layer, fan in (("conv1", 3 * 25), ("conv2", 6 * 25), ("fc1", 400), ("fc2", 120)):
        w = getattr(model, layer).weight.detach()
        assert float(w.std()) == pytest.approx(math.sqrt(2 / fan), rel=0.1), layer


def test_kaiming_uniform_fan_in_bound():
    model = initialise(_lenet(), "kaiming-uniform", 0, options=FAN_IN)
    w = model.fc1.weight.detach()
    bound = math.sqrt(6 / 400)
    assert float(w.abs().max()) <= bound and float(w.abs().max()) > 0.99 * bound
    assert float(w.std()) == pytest.approx(bound / math.sqrt(3), rel=0.05)


def test_conv_bias_default_linear_bias_zero():
    model = initialise(_lenet(), "kaiming-normal", 0, options=FAN_IN)
    for layer, fan_in in (("conv1", 3 * 25), ("conv2", 6 * 25)):
        b = getattr(model, layer).bias.detach()
        assert bool((b != 0).all()), layer
        assert float(b.abs().max()) <= 1 / math.sqrt(fan_in), layer
    for layer in ("fc1", "fc2", "fc3"):
        assert bool((getattr(model, layer).bias == 0).all()), layer
    # the plain init zeroes every bias, as before
    plain = initialise(_lenet(), "kaiming-normal", 0)
    assert all(bool((getattr(plain, x).bias == 0).all()) for x in ("conv1", "conv2", "fc3"))


def test_depth_head_left_at_pytorch_default():
    """REFERENCE (depth): only the convs get kaiming normal fan_out, BN weight 1 bias 0; the
    classifier keeps PyTorch's default (std about 0.05, non-zero bias)."""
    name = "resnet18-basic-residual-even"
    model = initialise(build_model(name, "cifar10"), "kaiming-normal", 3, options=CONVS_ONLY)
    model.requires_grad_(False)
    reference = build_model(name, "cifar10")
    torch.manual_seed(3)
    with torch.no_grad():
        for m in reference.modules():
            if hasattr(m, "reset_parameters") and m is not reference:
                m.reset_parameters()
    assert torch.equal(model.fc.weight, reference.fc.weight)
    assert torch.equal(model.fc.bias, reference.fc.bias)
    fan_in = model.fc.in_features  # 128
    assert bool((model.fc.bias != 0).all())
    assert float(model.fc.bias.abs().max()) <= 1 / math.sqrt(fan_in)
    assert float(model.fc.weight.std()) == pytest.approx(1 / math.sqrt(3 * fan_in), rel=0.1)
    assert 0.04 < float(model.fc.weight.std()) < 0.06
    conv = model.layer2[0].conv1
    fan_out = conv.out_channels * 9
    assert float(conv.weight.std()) == pytest.approx(math.sqrt(2 / fan_out), rel=0.05)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert bool((m.weight == 1).all()) and bool((m.bias == 0).all())
    # today's plain init: the head is kaiming too, bias 0
    plain = initialise(build_model(name, "cifar10"), "kaiming-normal", 3)
    assert bool((plain.fc.bias == 0).all())
    assert float(plain.fc.weight.detach().std()) > 0.3  # fan_out 10: sqrt(0.2)


def test_explicit_defaults_are_the_plain_init():
    a = initialise(_lenet(), "kaiming-normal", 1).state_dict()
    b = initialise(
        _lenet(),
        "kaiming-normal",
        1,
        options={"mode": "fan_out", "layers": ["conv", "linear", "norm"], "bias": "zero"},
    ).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- config: init options, inputs, exclude ---------------------------------------------------

BASE = {
    "models": ["lenet5"],
    "datasets": ["synthetic"],
    "inits": ["kaiming-normal"],
    "optimizers": ["sgd"],
    "seeds": [0],
    "epochs": 1,
    "batch_size": 64,
}


def _runs(**changes) -> dict[str, RunSpec]:
    return load_studies({"studies": {"s": {**copy.deepcopy(BASE), **changes}}}, DEFAULT_SCHEMA)[
        "s"
    ].runs


def test_plain_names_keep_their_run_ids_and_keys():
    (plain,) = _runs().values()
    (spelled,) = _runs(
        inits=[{"name": "kaiming-normal", "mode": "fan_out", "bias": {"conv": "zero"}}]
    ).values()
    assert plain.run_id == spelled.run_id == "lenet5_synthetic_kaiming-normal_sgd_s0"
    assert plain.to_json() == spelled.to_json()
    hp = json.loads(plain.to_json())
    assert "init_options" not in hp and "inputs" not in hp and "exclude" not in hp["measures"]
    (fan_in,) = _runs(inits=[{"name": "kaiming-normal", "mode": "fan_in"}]).values()
    assert fan_in.run_id == plain.run_id and fan_in.to_json() != plain.to_json()
    assert fan_in.init_options == {"mode": "fan_in"}
    assert RunSpec.from_dict(json.loads(fan_in.to_json())) == fan_in
    labelled = _runs(
        inits=["kaiming-normal", {"name": "kaiming-normal", "mode": "fan_in", "label": "he-in"}]
    )
    assert "lenet5_synthetic_he-in_sgd_s0" in labelled


def test_shipped_faithful_variants_resolve_to_the_original_recipe():
    cfg = _config()
    cfg["run"], cfg["variant"] = ["depth", "dynamics"], "faithful"
    studies = load_studies(cfg, DEFAULT_SCHEMA)
    for run in studies["dynamics-faithful"].runs.values():
        assert run.normalize is False
        if run.dataset in ("mnist", "fashionmnist"):
            assert run.inputs == {"pad_to": 32, "channels": 3} and run.input_shape == (3, 32)
        else:
            assert run.inputs == {}
        if run.init.startswith("kaiming"):
            resolved = {"mode": "fan_in", **run.init_options}
            assert resolved == {
                "mode": "fan_in",
                "layers": ["conv", "linear"],
                "bias": {"conv": "default", "linear": "zero"},
            }
    for run in studies["depth-faithful"].runs.values():
        assert run.init_options == {"layers": ["conv", "norm"]}
        assert run.measures["exclude"] == DEPTH_EXCLUDE
    # the default variant uses none of the new keys: its runs keep their keys
    cfg = _config()
    cfg["run"] = list(cfg["studies"])
    for study in load_studies(cfg, DEFAULT_SCHEMA).values():
        for run in study.runs.values():
            hp = json.loads(run.to_json())
            assert "init_options" not in hp and "inputs" not in hp, run.run_id


BAD = [
    # (study key, value, words the message must contain)
    (
        "inits",
        [{"name": "xavier", "mode": "fan_in"}],
        ["studies/s/inits/0/mode", "init 'xavier' has no option 'mode'", "kaiming-normal"],
    ),
    (
        "inits",
        [{"name": "default", "layers": ["conv"]}],
        ["studies/s/inits/0/layers", "init 'default' has no option 'layers'", "none"],
    ),
    (
        "inits",
        [{"name": "kaiming-normal", "mode": "fan_avg"}],
        ["studies/s/inits/0/mode", "'fan_avg' is not one of"],
    ),
    (
        "inits",
        [{"name": "kaiming-normal", "layers": ["conv", "bn"]}],
        ["studies/s/inits/0/layers/1", "'bn' is not one of"],
    ),
    (
        "inits",
        [{"name": "kaiming-normal", "layers": []}],
        ["studies/s/inits/0/layers", "should be non-empty"],
    ),
    ("inits", [{"name": "kaiming-normal", "bias": "random"}], ["studies/s/inits/0/bias"]),
    (
        "inits",
        [{"name": "kaiming-normal", "bias": {"norm": "default"}}],
        ["studies/s/inits/0/bias", "'norm' was unexpected"],
    ),
    (
        "inits",
        [{"name": "kaiming-normal", "layers": ["conv"], "bias": {"linear": "default"}}],
        ["studies/s/inits/0/bias/linear", "does not touch linear layers", "add it to 'layers'"],
    ),
    (
        "inits",
        ["kaiming-normal", {"name": "kaiming-normal", "mode": "fan_in"}],
        ["studies/s/inits", "kaiming-normal listed more than once", "'label'"],
    ),
    (
        "inputs",
        {"synthetic": {"pad_to": 8}},
        ["studies/s/inputs/synthetic/pad_to", "smaller than the 12x12", "at least 12"],
    ),
    (
        "inputs",
        {"synthetic": {"channels": 2}},
        ["studies/s/inputs/synthetic/channels", "is not one of"],
    ),
    (
        "inputs",
        {"mnist": {"pad_to": 32}},
        ["studies/s/inputs/mnist", "not among the study's datasets"],
    ),
    ("inputs", {"synthetic": {}}, ["studies/s/inputs/synthetic", "should be non-empty"]),
    ("inputs", {"synthetic": {"pad": 16}}, ["'pad' was unexpected", "pad_to"]),
    ("measures", {"exclude": "*bn*"}, ["studies/s/measures/exclude", "not of type 'array'"]),
]


@pytest.mark.parametrize(("key", "value", "words"), BAD, ids=[f"{b[0]}={b[1]!r}"[:60] for b in BAD])
def test_bad_new_keys_are_named(key, value, words):
    with pytest.raises(ConfigError) as e:
        _runs(**{key: value})
    msg = str(e.value)
    for w in words:
        assert w in msg, f"{w!r} not in:\n{msg}"


def test_channels_only_repeat_one_channel():
    with pytest.raises(ConfigError) as e:
        _runs(datasets=["cifar10"], inputs={"cifar10": {"channels": 1}})
    assert "studies/s/inputs/cifar10/channels" in str(e.value)
    assert "only repeated from 1 channel to 3" in str(e.value)


def test_normalize_counts_the_transformed_channels():
    three = {"synthetic": {"channels": 3}}
    with pytest.raises(ConfigError) as e:
        _runs(inputs=three, normalize={"synthetic": {"mean": [0.5], "std": [0.5]}})
    msg = str(e.value)
    assert "studies/s/normalize/synthetic" in msg and "give 3 value(s)" in msg
    assert "inputs/synthetic/channels" in msg
    ok = _runs(inputs=three, normalize={"synthetic": {"mean": [0.5] * 3, "std": [0.5] * 3}})
    assert next(iter(ok.values())).normalize == {"mean": [0.5] * 3, "std": [0.5] * 3}
    (run,) = _runs(normalize={"synthetic": False}).values()
    assert run.normalize is False
    with pytest.raises(ConfigError, match="nothing for dataset 'synthetic'"):
        _runs(normalize={"mnist5k": True})


def test_no_op_inputs_are_left_out():
    (run,) = _runs(inputs={"synthetic": {"pad_to": 12, "channels": 1}}).values()
    assert run.inputs == {} and "inputs" not in json.loads(run.to_json())


# --- inputs: on the device, in pixel space --------------------------------------------------


PAD3 = {"pad_to": 32, "channels": 3}


def _check_padded(x: torch.Tensor, raw: torch.Tensor) -> None:
    """``x``: a batch in pixel space [0, 1] padded 28 -> 32 and repeated to 3 channels;
    ``raw``: the same images as stored (uint8, 1 x 28 x 28)."""
    assert x.shape[1:] == (3, 32, 32)
    for c in (1, 2):
        assert torch.equal(x[:, c], x[:, 0])
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert float(x[:, :, border].abs().max()) < 1e-6  # black
    assert torch.allclose(x[:, 0, 2:30, 2:30], raw[:, 0].float() / 255.0, atol=1e-6)


def test_padded_mnist_without_normalisation_has_black_borders(mnist5k):
    data = DeviceData.load(mnist5k, "cpu", normalize=False, inputs=PAD3)
    assert data.shape == (3, 32, 32)
    raw = DeviceData.load(mnist5k, "cpu", normalize=False)
    x, y = next(data.eval_batches("test", 64))
    _check_padded(x, raw.test_x[:64])
    xb, yb = next(data.train_batches(64, torch.Generator().manual_seed(0)))
    assert xb.shape == (64, 3, 32, 32)
    border = xb.clone()
    border[:, :, 2:30, 2:30] = 0
    assert float(border.abs().max()) == 0.0


@pytest.mark.parametrize(
    "normalize", [True, {"mean": [0.1307] * 3, "std": [0.3081] * 3}], ids=["train-stats", "given"]
)
def test_padding_happens_before_normalisation(mnist5k, normalize):
    data = DeviceData.load(mnist5k, "cpu", normalize=normalize, inputs=PAD3)
    raw = DeviceData.load(mnist5k, "cpu", normalize=False)
    x, _ = next(data.eval_batches("test", 64))
    _check_padded(x * data.std + data.mean, raw.test_x[:64])  # back to pixel space
    if normalize is True:  # the statistics of the transformed training images
        pixels = data.train_x.float() / 255.0
        assert torch.allclose(data.mean.flatten(), pixels.mean(dim=(0, 2, 3)), atol=1e-5)
        assert torch.allclose(data.std.flatten(), pixels.std(dim=(0, 2, 3)), atol=1e-4)


def test_models_are_built_for_the_transformed_shape(mnist5k):
    data = DeviceData.load(mnist5k, "cpu", normalize=False, inputs=PAD3)
    x, _ = next(data.eval_batches("test", 8))
    lenet = build_model("lenet5", "mnist5k", inputs=PAD3)
    assert lenet.pad == 0 and lenet.conv1.in_channels == 3  # no grey padding inside
    resnet = build_model("resnet18-torchvision", "mnist5k", inputs=PAD3)
    assert resnet.stem[0].in_channels == 3
    for model in (lenet, resnet):
        assert model.eval()(x).shape == (8, 10)
    assert build_model("lenet5", "mnist5k").conv1.in_channels == 1


def test_a_run_with_inputs_and_init_options_end_to_end(synthetic, tmp_path):
    """Train (and perturb with reinit) a run whose images are padded and repeated and whose
    init keeps the conv biases: every place that builds the model agrees on its shape."""
    from paramdyn.features import run_features
    from paramdyn.perturb import perturb_checkpoint
    from paramdyn.train import train_run

    (spec,) = _runs(
        inits=[{"name": "kaiming-normal", **FAN_IN}],
        inputs={"synthetic": {"pad_to": 16, "channels": 3}},
        normalize={"synthetic": False},
        batch_size=128,
    ).values()
    info = train_run(spec, synthetic, tmp_path / "run", device="cpu")
    assert info["hparams"]["inputs"] == {"pad_to": 16, "channels": 3}
    first = read_checkpoint(list_checkpoints(tmp_path / "run" / "checkpoints")[0])
    assert tuple(first.tensors["conv1.weight"].shape) == (6, 3, 5, 5)
    assert bool((first.tensors["conv1.bias"] != 0).all())
    assert bool((first.tensors["fc3.bias"] == 0).all())
    assert float(first.tensors["fc3.weight"].std()) == pytest.approx(math.sqrt(2 / 84), rel=0.15)
    feats = run_features(
        tmp_path / "run",
        synthetic,
        tmp_path / "f.safetensors",
        probe_size=16,
        probe_seed=0,
        device="cpu",
    )
    assert feats.exists()
    state, _ = perturb_checkpoint(
        list_checkpoints(tmp_path / "run" / "checkpoints")[-1],
        "reinit",
        {"blocks": ["conv1"]},
        seed=spec.seed,
        model_name=spec.model_name,
        dataset=spec.dataset,
        model_settings=spec.model_settings,
        init=spec.init,
        init_options=spec.init_options,
        inputs=spec.inputs,
    )
    # the run's own seed and init (with its options) rewind the block to its initial weights
    assert torch.equal(state["conv1.weight"], first.tensors["conv1.weight"])
    assert torch.equal(state["conv1.bias"], first.tensors["conv1.bias"])


# --- measures: exclude ---------------------------------------------------------------------


@pytest.fixture
def depth_run(tmp_path):
    """Three checkpoints of a narrow depth-study ResNet (residual: it has a shortcut BN),
    every parameter moved by a different random amount."""
    torch.manual_seed(0)
    model = build_model("resnet18-basic-residual-even", "mnist5k", {"width": 4})
    blocks = model.block_names()
    for step in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.01 * step)
        save_checkpoint(
            tmp_path, model, epoch=step, step=step, epoch_end=True, run_id="d", blocks=blocks
        )
    return tmp_path


def test_excluded_tensors_are_rows_but_not_in_the_sums(depth_run):
    df = compare(list_checkpoints(depth_run), exclude=DEPTH_EXCLUDE)
    tensors = df[df.granularity == "tensor"]
    names = set(tensors.name)
    excluded = set(tensors[~tensors.in_blocks].name)
    # every main-path BN and the stem's BN are out; the shortcut's BN and the convs are in
    assert "layer1.0.bn1.weight" in excluded and "stem.1.bias" in excluded
    assert {n for n in names if ".bn" in n or n.startswith("stem.1.")} == excluded
    assert "layer1.0.shortcut.1.weight" in names - excluded
    assert "layer1.0.shortcut.0.weight" in names - excluded and "fc.bias" in names - excluded
    assert df[df.granularity != "tensor"].in_blocks.all()
    layers = set(df[df.granularity == "layer"].name)
    assert "layer1.0.bn1" not in layers and "stem.1" not in layers
    assert "layer1.0.shortcut.1" in layers
    kept = tensors[tensors.in_blocks]
    for gran in ("block", "layer"):
        rows = df[df.granularity == gran]
        key = "block" if gran == "block" else kept.name.str.rsplit(".", n=1).str[0]
        sums = kept.groupby([kept.step, kept.reference, key])[["l1", "numel"]].sum()
        for r in rows.itertuples():
            expect = sums.loc[(r.step, r.reference, r.name)]
            assert r.l1 == pytest.approx(expect.l1, rel=1e-12, abs=1e-12), (gran, r.name)
            assert r.numel == expect.numel
    # without exclusion every tensor counts, and the tensor rows are the same
    full = compare(list_checkpoints(depth_run))
    assert full.in_blocks.all()
    ft = full[full.granularity == "tensor"].reset_index(drop=True)
    cols = ["name", "step", "reference", "l1", "l2", "numel"]
    assert ft[cols].equals(tensors.reset_index(drop=True)[cols])
    b = "layer1.0"
    sel = dict(step=2, reference="init", granularity="block", name=b)
    q = " & ".join(f"{k} == {v!r}" for k, v in sel.items())
    assert float(full.query(q).l1.iloc[0]) > float(df.query(q).l1.iloc[0])


def test_run_distances_and_frozen_with_exclude(depth_run, tmp_path):
    (spec,) = _runs(measures={"exclude": DEPTH_EXCLUDE}).values()
    info = FinishedRun(depth_run.parent, "d", "completed", spec, checkpoints=(), result={})
    df = run_distances(depth_run, info, tmp_path / "distances.parquet")
    from paramdyn.tables import read_metadata

    assert read_metadata(tmp_path / "distances.parquet")["exclude"] == DEPTH_EXCLUDE
    frozen = frozen_table(df, None, info, tmp_path / "frozen.parquet")
    model = build_model("resnet18-basic-residual-even", "mnist5k", {"width": 4})
    every = sum(p.numel() for p in model.parameters())
    # the model row counts every parameter; a block row what its distances row covers
    assert int(frozen[frozen.granularity == "model"].numel.iloc[0]) == every
    final = df[(df.reference == "init") & (df.step == 2) & (df.granularity == "block")]
    blocks = frozen[frozen.granularity == "block"].set_index("name").numel
    assert blocks.to_dict() == final.set_index("name").numel.to_dict()
    assert blocks.sum() < every
