"""Gradient recording against plain autograd on a small net."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from paramdyn import gradients
from paramdyn.gradients import GradientRecorder
from paramdyn.models import build_model

# the masks by the torch form only, and by the compiled passes from the first prune on
ENGINES = pytest.mark.parametrize("fused_from", [None, 0], ids=["torch", "compiled"])


def _backward(model, seed=0):
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    x = torch.randn(8, 1, 12, 12)
    y = torch.randint(0, 4, (8,))
    nn.functional.cross_entropy(model(x), y).backward()


def test_matches_autograd():
    model = build_model("lenet5", "synthetic")
    rec = GradientRecorder(model, every=2, track_reached=True)
    _backward(model, 0)
    rec.after_backward(1)  # not a recorded step (every 2), but tracked for 'reached'
    _backward(model, 1)
    with torch.no_grad():  # exact zeros and non-finite values must be counted
        model.fc1.weight.grad[:3] = 0
        model.conv1.bias.grad[0] = float("nan")
        model.conv1.bias.grad[1] = float("inf")
    expected = {n: q.grad.detach().clone() for n, q in model.named_parameters()}
    rec.after_backward(2)
    df = rec.table(model.block_of(), lambda s: 0)
    assert list(df[df.granularity == "tensor"].step.unique()) == [2]
    for name, g in expected.items():
        r = df[(df.granularity == "tensor") & (df.name == name)].iloc[0]
        finite = g[torch.isfinite(g)].double()
        if torch.isfinite(g).all():
            assert r.grad_l2 == pytest.approx(g.double().norm().item(), rel=1e-6)
            assert r.grad_max_abs == pytest.approx(g.abs().max().item(), rel=1e-6)
            assert r.grad_rms == pytest.approx(r.grad_l2 / math.sqrt(g.numel()))
        assert r.zeros == int((g == 0).sum()) and r.numel == g.numel()
        assert r.nans == int(torch.isnan(g).sum()) and r.infs == int(torch.isinf(g).sum())
        assert len(finite) >= 0
    conv1 = df[(df.granularity == "tensor") & (df.name == "conv1.bias")].iloc[0]
    assert (conv1.nans, conv1.infs) == (1, 1) and math.isnan(conv1.grad_l2)
    assert df[(df.name == "fc1.weight")].iloc[0].zeros >= 3 * 400
    # block rows pool their tensors: sqrt of summed squares, summed counts
    fc2 = df[(df.granularity == "block") & (df.name == "fc2")].iloc[0]
    w, b = expected["fc2.weight"].double(), expected["fc2.bias"].double()
    assert fc2.grad_l2 == pytest.approx(math.sqrt(w.square().sum() + b.square().sum()), rel=1e-6)
    assert fc2.numel == w.numel() + b.numel() and fc2.depth == 3


def test_reached_tracks_exact_zero_gradients():
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1))
    model.block_names = lambda: ["0", "2"]
    with torch.no_grad():
        model[0].weight[0], model[0].bias[0] = 1.0, 0.1  # unit 0 is alive on positive inputs
        model[2].weight.fill_(1.0)
        model[0].weight[1] = -10.0  # unit 1 is dead on positive inputs: no gradient ever
        model[0].bias[1] = -10.0
    rec = GradientRecorder(model, every=None, track_reached=True)
    for seed in range(3):
        torch.manual_seed(seed)
        model.zero_grad()
        model(torch.rand(4, 3)).sum().backward()
        rec.after_backward(seed + 1)
    reached = dict(zip(rec.names, rec.reached, strict=True))
    assert reached["0.weight"][0].all() and not reached["0.weight"][1].any()
    assert not reached["2.weight"][0, 1]  # the dead unit's outgoing weight sees input 0
    assert np.array_equal(reached["0.bias"].numpy(), [True, False])


def test_no_records_keep_the_columns(tmp_path):
    from paramdyn.tables import aggregate, write_parquet

    model = build_model("lenet5", "synthetic")
    empty = GradientRecorder(model, every=None, track_reached=False).table(model.block_of(), int)
    recorded = GradientRecorder(model, every=1, track_reached=False)
    _backward(model)
    recorded.after_backward(1)
    full = recorded.table(model.block_of(), lambda s: 0)
    assert list(empty.columns) == list(full.columns) and empty.empty
    write_parquet(empty, tmp_path / "a.parquet")
    write_parquet(full, tmp_path / "b.parquet")
    flags = {"vanish_below": 1e-7, "explode_above": 1e3}
    df = aggregate([tmp_path / "a.parquet", tmp_path / "b.parquet"], tmp_path / "g.parquet", flags)
    assert len(df) == len(full) and {"vanishing", "exploding"} <= set(df.columns)
    assert df["step"].dtype == "int64" and not df["exploding"].any()


@ENGINES
def test_reached_and_moved_equal_the_per_step_masks(monkeypatch, fused_from):
    """The running maxima (with pruning of complete tensors) and the compiled passes give
    exactly the masks of the plain definition, `g != 0` and `θ != θ0` or-ed over every
    step, on a net with dead units, exact zero updates, a NaN gradient, and a snapshot
    round trip midway."""
    monkeypatch.setattr(gradients, "FUSED_MIN_ENTRIES", fused_from)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.Linear(4, 3))
    with torch.no_grad():
        model[0].weight[:2] = -5.0  # two units dead on positive inputs
        model[0].bias[:2] = -5.0
    params = list(model.parameters())
    init = [q.detach().clone() for q in params]
    ref_r = [torch.zeros_like(q, dtype=torch.bool) for q in params]
    ref_m = [torch.zeros_like(q, dtype=torch.bool) for q in params]
    rec = GradientRecorder(model, every=None, track_reached=True)
    opt = torch.optim.SGD(params, lr=0.1)
    for step in range(1, 21):
        opt.zero_grad(set_to_none=True)
        model(torch.rand(4, 6)).sum().backward()
        with torch.no_grad():
            params[2].grad[0, 4] = 0.0 if step < 20 else float("nan")  # NaN at the last step
            params[3].grad.zero_()  # the last bias never gets a gradient, never moves
        for q, r in zip(params, ref_r, strict=True):
            r |= q.grad != 0
        rec.after_backward(step)
        opt.step()
        for q, q0, m in zip(params, init, ref_m, strict=True):
            m |= q.detach() != q0
        rec.after_step()
        if step == 10:  # continue in a fresh recorder from a snapshot of this one
            state, now = rec.state_dict(), [q.detach().clone() for q in params]
            with torch.no_grad():  # built on the initial weights, as Run.build does
                for q, q0 in zip(params, init, strict=True):
                    q.copy_(q0)
                rec = GradientRecorder(model, every=None, track_reached=True)
                for q, q1 in zip(params, now, strict=True):
                    q.copy_(q1)
            rec.load_state_dict(state)
    for got, want in ((rec.reached, ref_r), (rec.moved, ref_m)):
        for g, w in zip(got, want, strict=True):
            assert torch.equal(g, w)
    assert not ref_r[0][:2].any() and ref_r[2][0, 4] and not ref_m[3].any()
    rec.reach.prune()  # the complete tensors are the ones dropped from the update
    assert rec.reach.open_reached == [i for i, r in enumerate(ref_r) if not r.all()]
    assert rec.reach.open_moved == [i for i, m in enumerate(ref_m) if not m.all()]
    assert len(rec.reach.open_reached) < len(params)
    assert bool(rec.reach.fused) == (fused_from is not None)  # the open ones went over


@ENGINES
def test_reach_follows_float_equality_not_bits(monkeypatch, fused_from):
    """-0.0 is no gradient and no move from +0.0; a sign flip of a non-zero value is a
    move; NaN counts as both; float64 and float16 tensors are tracked as float32 ones
    (float16 stays in the torch form: the compiled passes take float32 and float64)."""
    from paramdyn.gradients import Reach

    monkeypatch.setattr(gradients, "FUSED_MIN_ENTRIES", fused_from)
    for dtype in (torch.float32, torch.float64, torch.float16):
        q = torch.tensor([0.0, 0.5, 1.0, 0.0, 2.0, -0.0], dtype=dtype)
        reach = Reach([q])
        steps = [  # (gradient, value after the step); the first prune is after step 1
            ([-0.0, 0.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.5, 1.0, 0.0, 2.0, -0.0]),  # no change
            ([-0.0, 0.0, -0.0, 0.0, 0.0, 0.0], [-0.0, -0.5, 1.0, 0.0, 2.0, 0.0]),
            ([0.0, 0.0, 1e-3, float("nan"), 0.0, -0.0], [0.0, -0.5, 1.0, 0.0, float("nan"), 0.0]),
            ([0.0, 0.0, 0.0, 0.0, 0.0, 0.0], [-0.0, 0.5, 1.0, 0.0, 2.0, -0.0]),
        ]
        for g, v in steps:
            q.grad = torch.tensor(g, dtype=dtype)
            reach.after_backward()
            q.copy_(torch.tensor(v, dtype=dtype))
            reach.after_step()
        assert reach.reached[0].tolist() == [False, False, True, True, False, False]
        assert reach.moved[0].tolist() == [False, True, False, False, True, False]
        assert bool(reach.fused) == (fused_from is not None and dtype != torch.float16)


@ENGINES
def test_reach_in_channels_last_and_odd_gradient_layouts(monkeypatch, fused_from):
    """Conv weights in channels_last (the compiled passes walk memory order, so the masks
    must come back in the tensor's own order), a gradient laid out unlike its parameter,
    and weight decay (entries that move without a gradient): the masks equal the plain
    definition step by step."""
    monkeypatch.setattr(gradients, "FUSED_MIN_ENTRIES", fused_from)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3))
    model.to(memory_format=torch.channels_last)
    params = list(model.parameters())
    init = [q.detach().clone() for q in params]
    ref_r = [torch.zeros_like(q, dtype=torch.bool) for q in params]
    ref_m = [torch.zeros_like(q, dtype=torch.bool) for q in params]
    reach = gradients.Reach(params)
    opt = torch.optim.SGD(params, lr=0.1, weight_decay=0.01)
    for step in range(1, 7):
        opt.zero_grad(set_to_none=True)
        x = torch.rand(2, 3, 3, 3).to(memory_format=torch.channels_last)
        model(x).sum().backward()
        with torch.no_grad():
            w = params[2]
            w.grad[:, :, 0, :] = 0.0  # a row of taps never reached (moves by decay)
            if step == 3:  # the same values, laid out contiguously, not as the weight
                w.grad = w.grad.contiguous()
        for q, r in zip(params, ref_r, strict=True):
            r |= q.grad != 0
        with torch.no_grad():
            reach.after_backward()
        opt.step()
        for q, q0, m in zip(params, init, ref_m, strict=True):
            m |= q.detach() != q0
        with torch.no_grad():
            reach.after_step()
    assert params[2].grad is not None and not ref_r[2][:, :, 0, :].any()
    for got, want in ((reach.reached, ref_r), (reach.moved, ref_m)):
        for g, w in zip(got, want, strict=True):
            assert torch.equal(g, w)
    assert (2 in reach.fused) == (fused_from is not None)
