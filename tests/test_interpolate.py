"""Linear interpolation between checkpoints (paramdyn.interpolate): exact ends, BatchNorm
re-estimation against statistics computed directly, and barriers with known values."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from torch import nn

from paramdyn import interpolate as ip
from paramdyn.data import DeviceData
from paramdyn.models import build_model
from paramdyn.train import evaluate

MODEL, SETTINGS = "resnet18-cifar", {"width": 8}
BATCH = 64


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(synthetic):
    d = DeviceData.load(synthetic, "cpu")
    d.channels_last = True  # as training lays out conv nets' batches
    return d


def _model(name=MODEL, settings=SETTINGS, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(name, "synthetic", dict(settings))


def _trained(data, seed: int) -> dict[str, torch.Tensor]:
    """A few SGD epochs from seed ``seed``: running statistics of its own."""
    model = _model(seed=seed).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(2):
        for x, y in data.train_batches(BATCH, gen):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def pair(data):
    return _trained(data, 0), _trained(data, 1)


@pytest.fixture(scope="module")
def subsets(data):
    # 200 BN images in batches of 64: 64, 64, 64, 8 (a short last batch); the whole train
    # (512) and test (128) splits for evaluation, so train.evaluate can be the reference
    return ip.path_subsets(
        data, bn_size=200, eval_size=512, bn_batch_size=BATCH, eval_batch_size=BATCH, seed=3
    )


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _bn_stats(model):
    return [(m.running_mean.clone(), m.running_var.clone()) for m in ip.batchnorm_layers(model)]


# --- interpolate_state ------------------------------------------------------------------------


def test_interpolate_state_ends_are_bit_exact_and_integer_buffers_from_a(pair):
    a, b = (dict(s) for s in pair)
    a["fc.bias"] = a["fc.bias"].clone()
    a["fc.bias"][0] = -0.0  # lerp's formula would give +0.0 here
    b = {**b, "stem.1.num_batches_tracked": torch.tensor(12345)}
    for alpha, ref in ((0.0, a), (1.0, b)):
        out = ip.interpolate_state(a, b, alpha)
        for k, v in out.items():
            want = a[k] if not v.is_floating_point() else ref[k]
            assert v.dtype == want.dtype and torch.equal(_bits(v), _bits(want)), (alpha, k)
    mid = ip.interpolate_state(a, b, 0.25)
    assert mid["stem.1.num_batches_tracked"].item() == a["stem.1.num_batches_tracked"].item()
    for k, v in mid.items():
        if v.is_floating_point():
            torch.testing.assert_close(v, 0.75 * a[k] + 0.25 * b[k])
    same = ip.interpolate_state(a, a, 0.3)  # a path from a state to itself stays there
    assert all(torch.equal(same[k], a[k]) for k in a)  # by value (-0.0 becomes +0.0)


def test_interpolate_state_refuses_different_models(pair):
    a, b = pair
    with pytest.raises(ValueError, match="differ in keys"):
        ip.interpolate_state(a, {k: v for k, v in b.items() if k != "fc.bias"}, 0.5)
    with pytest.raises(ValueError, match="fc.bias"):
        ip.interpolate_state(a, {**b, "fc.bias": torch.zeros(7)}, 0.5)


# --- BatchNorm re-estimation ---------------------------------------------------------------------


def _direct_stats(model, batches):
    """Each BatchNorm's input captured by a hook in a train-mode forward: the mean over
    batches of each batch's per-channel mean and unbiased variance (float64)."""
    layers = ip.batchnorm_layers(model)
    seen = {id(m): [] for m in layers}

    def hook(m, args):
        x = args[0].double().transpose(0, 1).flatten(1)  # channels x (N*H*W)
        seen[id(m)].append((x.mean(1), x.var(1, unbiased=True)))

    handles = [m.register_forward_pre_hook(hook) for m in layers]
    model.train()
    with torch.no_grad():
        for x, _ in batches:
            model(x)
    for h in handles:
        h.remove()
    return [
        (
            torch.stack([s[0] for s in seen[id(m)]]).mean(0),
            torch.stack([s[1] for s in seen[id(m)]]).mean(0),
        )
        for m in layers
    ]


def test_reestimated_statistics_are_the_mean_of_batch_statistics(pair, subsets):
    a, b = pair
    bn_batches, splits = subsets
    ref = _model()
    ref.load_state_dict(a)
    want = _direct_stats(ref, bn_batches)
    model = _model(seed=7)
    ip.evaluate_path(model, a, b, [0.0], bn_batches=bn_batches, splits={"test": splits["test"]})
    got = _bn_stats(model)
    assert len(got) == len(want) == 20  # stem, 2 x 8 in the blocks, 3 projections
    for (gm, gv), (wm, wv) in zip(got, want, strict=True):
        torch.testing.assert_close(gm.double(), wm, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gv.double(), wv, rtol=1e-5, atol=1e-6)
    assert all(m.num_batches_tracked.item() == 4 for m in ip.batchnorm_layers(model))
    # the statistics the state carried play no part
    carried = {
        k: (v + 100.0 if k.endswith("running_mean") else v * 1e3 if k.endswith("var") else v)
        for k, v in a.items()
    }
    carried = {k: torch.tensor(999) if k.endswith("tracked") else v for k, v in carried.items()}
    ip.evaluate_path(model, carried, b, [0.0], bn_batches=bn_batches, splits=splits)
    for (gm, gv), (m2, v2) in zip(got, _bn_stats(model), strict=True):
        assert torch.equal(gm, m2) and torch.equal(gv, v2)


def test_reestimation_keeps_dropout_off_and_restores_modes_and_momentum():
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, momentum=0.3)
    model = nn.Sequential(conv, nn.Dropout(0.5), bn, nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    batches = [torch.randn(16, 1, 8, 8) for _ in range(3)]
    with torch.no_grad():  # what the BatchNorm sees when dropout is off: conv's output
        outs = [conv(x).double().transpose(0, 1).flatten(1) for x in batches]
    want_mean = torch.stack([o.mean(1) for o in outs]).mean(0)
    want_var = torch.stack([o.var(1) for o in outs]).mean(0)
    model.train()
    model[1].eval()  # a mixed state, restored as it was
    modes = [m.training for m in model.modules()]
    assert ip.reestimate_batchnorm(model, batches) == 3
    torch.testing.assert_close(bn.running_mean.double(), want_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var.double(), want_var, rtol=1e-5, atol=1e-6)
    assert [m.training for m in model.modules()] == modes and bn.momentum == 0.3
    model.eval()
    ip.reestimate_batchnorm(model, [(x, None) for x in batches])  # (x, y) pairs too
    torch.testing.assert_close(bn.running_var.double(), want_var, rtol=1e-5, atol=1e-6)
    assert not any(m.training for m in model.modules())
    with pytest.raises(ValueError, match="no batches"):
        ip.reestimate_batchnorm(model, [])


# --- along the path --------------------------------------------------------------------------


def test_network_with_itself_has_zero_barrier(pair, subsets):
    a, _ = pair
    bn_batches, splits = subsets
    for bn in ip.BN_MODES:
        df = ip.evaluate_path(
            _model(), a, a, [0, 0.1, 0.3, 0.7, 1], bn_batches=bn_batches, splits=splits, bn=bn
        )
        assert list(df.columns) == ["alpha", "split", "loss", "error"] and len(df) == 10
        for _, g in df.groupby("split"):
            assert g["loss"].nunique() == 1 and g["error"].nunique() == 1  # every α alike
        out = ip.barriers(df)
        assert sorted(out["split"]) == ["test", "train"]
        assert (out[["loss_barrier", "error_barrier"]] == 0.0).all().all()


def test_endpoints_reproduce_each_endpoints_own_evaluation(pair, subsets, data):
    a, b = pair
    bn_batches, splits = subsets
    model = _model()
    re = ip.evaluate_path(model, a, b, [0.0, 0.5, 1.0], bn_batches=bn_batches, splits=splits)
    kept = ip.evaluate_path(
        model, a, b, [0.0, 0.5, 1.0], splits=splits, bn="interpolate", bn_batches=None
    )
    for alpha, state in ((0.0, a), (1.0, b)):
        own = _model(seed=5)
        own.load_state_dict(state)
        stored = {s: evaluate(own, data, s, BATCH) for s in splits}  # as stored
        ip.reestimate_batchnorm(own, bn_batches)
        fresh = {s: evaluate(own, data, s, BATCH) for s in splits}  # re-estimated
        for df, ref in ((re, fresh), (kept, stored)):
            rows = df[df["alpha"] == alpha].set_index("split")
            for s, (loss, acc) in ref.items():
                assert rows.loc[s, "loss"] == loss and rows.loc[s, "error"] == 1.0 - acc


def test_each_alpha_costs_one_bn_pass_and_one_pass_per_split(pair, subsets):
    a, b = pair
    bn_batches, splits = subsets
    eval_batches = sum(len(v) for v in splits.values())
    for name, settings, per_alpha in (
        (MODEL, SETTINGS, len(bn_batches) + eval_batches),
        ("deepnet-plain", {"depth": 2, "width": 8}, eval_batches),  # no BatchNorm
    ):
        model = _model(name, settings)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        other = a if name == MODEL else state
        calls = []
        model.register_forward_hook(lambda *_, c=calls: c.append(1))
        ip.evaluate_path(model, state, other, ip.alphas(3), bn_batches=bn_batches, splits=splits)
        assert len(calls) == 3 * per_alpha, name


def test_bn_modes_differ_for_batchnorm_nets_and_agree_without(pair, subsets):
    bn_batches, splits = subsets
    kw = {"bn_batches": bn_batches, "splits": {"test": splits["test"]}}
    a, b = pair
    re = ip.evaluate_path(_model(), a, b, [0.5], **kw)
    kept = ip.evaluate_path(_model(), a, b, [0.5], bn="interpolate", **kw)
    assert abs(re["loss"].iloc[0] - kept["loss"].iloc[0]) > 1e-3
    plain = [_model("deepnet-plain", {"depth": 2, "width": 8}, seed=s) for s in (0, 1)]
    sa, sb = ({k: v.clone() for k, v in m.state_dict().items()} for m in plain)
    model = plain[0]
    assert ip.reestimate_batchnorm(model, bn_batches) == 0
    paths = [
        ip.evaluate_path(model, sa, sb, ip.alphas(3), bn=bn, **kw)
        for bn in ("reestimate", "interpolate")
    ]
    pd.testing.assert_frame_equal(paths[0], paths[1], check_exact=True)
    assert paths[0]["loss"].nunique() == 3  # a real path: the ends differ


def test_evaluate_path_explains_bad_arguments(pair, subsets):
    a, b = pair
    bn_batches, splits = subsets
    with pytest.raises(ValueError, match="unknown bn mode 'average'"):
        ip.evaluate_path(_model(), a, b, [0.0], bn_batches=bn_batches, splits=splits, bn="average")
    with pytest.raises(ValueError, match="list of batches"):
        ip.evaluate_path(_model(), a, b, [0.0], bn_batches=iter(bn_batches), splits=splits)
    with pytest.raises(ValueError, match="no splits"):
        ip.evaluate_path(_model(), a, b, [0.0], bn_batches=bn_batches, splits={})


def test_subsets_are_fixed_by_the_seed(data):
    bn1, s1 = ip.path_subsets(data, bn_size=100, eval_size=50, seed=4)
    bn2, s2 = ip.path_subsets(data, bn_size=100, eval_size=50, seed=4)
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(bn1, bn2, strict=True))
    for split in ("train", "test"):
        assert all(torch.equal(x, y) for (x, _), (y, _) in zip(s1[split], s2[split], strict=True))
    other, _ = ip.path_subsets(data, bn_size=100, eval_size=50, seed=5)
    assert not torch.equal(bn1[0][0], other[0][0])
    idx = ip.subset_indices(512, 100, 4, shuffled=True)
    assert len(set(idx.tolist())) == 100 and (idx != sorted(idx)).any()
    assert (ip.subset_indices(512, 100, 4) == sorted(idx)).all()
    assert (ip.subset_indices(10, 50, 0) == range(10)).all()
    with pytest.raises(ValueError, match="unknown split"):
        data.subset_batches("valid", [0], 8)


# --- barriers ----------------------------------------------------------------------------------


def test_barriers_known_values():
    rows = []
    # pair p: loss 1, 2, 3.5, 2, 3 over the line 1, 1.5, 2, 2.5, 3: excess .5, 1.5, -.5
    # error .5, .25, .25, .25, .5 under the flat line .5: -.25 everywhere, first at .25
    for alpha, loss, error in zip(
        [0, 0.25, 0.5, 0.75, 1], [1, 2, 3.5, 2, 3], [0.5, 0.25, 0.25, 0.25, 0.5], strict=True
    ):
        rows.append(("p", alpha, "test", loss, error))
    # pair q (rows shuffled): loss 4, 1, 0 -> line 2 at .5, excess -1; error 0, .5, 1 -> 0
    for alpha, loss, error in ((1.0, 0.0, 1.0), (0.0, 4.0, 0.0), (0.5, 1.0, 0.5)):
        rows.append(("q", alpha, "test", loss, error))
    # pair r: flat at 1/3 and 0.1, where (1 - α)·v + α·v is not v at every α of alphas()
    for alpha in ip.alphas():
        rows.append(("r", alpha, "test", 1 / 3, 0.1))
    df = pd.DataFrame(rows, columns=["pair", "alpha", "split", "loss", "error"])
    out = ip.barriers(df).set_index("pair")
    assert out.loc["r", "loss_barrier"] == 0.0 and out.loc["r", "error_barrier"] == 0.0
    assert list(out.columns) == [
        "split",
        "loss_barrier",
        "loss_barrier_alpha",
        "error_barrier",
        "error_barrier_alpha",
    ]
    assert out.loc["p", "loss_barrier"] == 1.5 and out.loc["p", "loss_barrier_alpha"] == 0.5
    assert out.loc["p", "error_barrier"] == -0.25 and out.loc["p", "error_barrier_alpha"] == 0.25
    assert out.loc["q", "loss_barrier"] == -1.0 and out.loc["q", "loss_barrier_alpha"] == 0.5
    assert out.loc["q", "error_barrier"] == 0.0
    with pytest.raises(ValueError, match="pair='q'"):
        ip.barriers(df[~((df["pair"] == "q") & (df["alpha"] == 1.0))])
    with pytest.raises(ValueError, match="repeated alphas"):
        ip.barriers(pd.concat([df, df.iloc[:1]]))


def test_alphas():
    a = ip.alphas()
    assert len(a) == 21 and a[0] == 0.0 and a[-1] == 1.0 and a[10] == 0.5
    assert abs(a - [i / 20 for i in range(21)]).max() < 1e-15
    assert ip.alphas(3).tolist() == [0.0, 0.5, 1.0]
    with pytest.raises(ValueError, match="at least 2"):
        ip.alphas(1)
