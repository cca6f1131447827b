"""The measures against hand-computed values and against a plain per-tensor torch loop."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from paramdyn.checkpoints import CheckpointError, list_checkpoints, read_checkpoint, save_checkpoint
from paramdyn.measures import compare


class Tiny(nn.Module):
    """Block 'a' = one Linear(2 -> 1); block 'b' = Linear(1 -> 1, no bias) + BatchNorm1d(1)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(2, 1)
        self.b = nn.Sequential(nn.Linear(1, 1, bias=False), nn.BatchNorm1d(1))


def _set(model, a_w, a_b, b_w, bn_w, bn_b, running_mean=0.0):
    with torch.no_grad():
        model.a.weight.copy_(torch.tensor([a_w], dtype=torch.float32))
        model.a.bias.copy_(torch.tensor([a_b], dtype=torch.float32))
        model.b[0].weight.copy_(torch.tensor([[b_w]], dtype=torch.float32))
        model.b[1].weight.fill_(bn_w)
        model.b[1].bias.fill_(bn_b)
        model.b[1].running_mean.fill_(running_mean)


@pytest.fixture
def tiny_run(tmp_path):
    m = Tiny()
    states = [
        dict(a_w=[3.0, 4.0], a_b=0.0, b_w=1.0, bn_w=1.0, bn_b=0.0),
        dict(a_w=[3.0, 1.0], a_b=0.0, b_w=-1.0, bn_w=1.0, bn_b=0.5, running_mean=7.0),
        dict(a_w=[0.0, 1.0], a_b=2.0, b_w=-1.0, bn_w=1.0, bn_b=0.5, running_mean=9.0),
    ]
    for step, st in enumerate(states):
        _set(m, **st)
        save_checkpoint(
            tmp_path, m, epoch=step, step=step * 10, epoch_end=True, run_id="t", blocks=["a", "b"]
        )
    return tmp_path


def _row(df, **kw):
    sel = df
    for k, v in kw.items():
        sel = sel[sel[k] == v]
    assert len(sel) == 1, (kw, sel)
    return sel.iloc[0]


def test_hand_computed_against_init(tiny_run):
    df = compare(list_checkpoints(tiny_run), atol=0.0, rtol=0.0, minkowski_p=[3])
    # a.weight: [3, 4] -> [3, 1], d = [0, -3]
    r = _row(df, step=10, reference="init", granularity="tensor", name="a.weight")
    assert (r.l1, r.l2, r.linf, r.numel) == (3.0, 3.0, 3.0, 2)
    assert r.mean_abs == 1.5
    assert r.rms == pytest.approx(3 / math.sqrt(2))
    assert r.rel_l2 == pytest.approx(3 / 5)
    assert r.cosine == pytest.approx(13 / (5 * math.sqrt(10)))
    assert r.frac_changed == 0.5 and r.changed == 1
    assert r.minkowski_p3 == pytest.approx(3.0)
    assert (r.block, r.depth, r.epoch, r.ref_step) == ("a", 0, 1, 0)
    # a.bias did not move: distances 0, ratios to a zero reference undefined (NaN)
    r = _row(df, step=10, reference="init", granularity="tensor", name="a.bias")
    assert r.l1 == 0 and r.frac_changed == 0 and math.isnan(r.rel_l2) and math.isnan(r.cosine)
    # layer 'a' pools a.weight and a.bias from their sums
    r = _row(df, step=10, reference="init", granularity="layer", name="a")
    assert (r.numel, r.l1, r.l2) == (3, 3.0, 3.0)
    assert r.frac_changed == pytest.approx(1 / 3)
    assert r.rel_l2 == pytest.approx(3 / 5)
    # block 'b' = b.0.weight (1 -> -1) + b.1.weight (1 -> 1) + b.1.bias (0 -> 0.5)
    r = _row(df, step=10, reference="init", granularity="block", name="b")
    assert (r.numel, r.depth) == (3, 1)
    assert r.l1 == pytest.approx(2.5)
    assert r.l2 == pytest.approx(math.sqrt(4.25))
    assert r.linf == 2.0
    assert r.minkowski_p3 == pytest.approx((8 + 0.125) ** (1 / 3))
    assert r.rel_l2 == pytest.approx(math.sqrt(4.25) / math.sqrt(2))
    assert r.cosine == pytest.approx((-1 + 1 + 0) / (math.sqrt(2.25) * math.sqrt(2)))


def test_hand_computed_against_previous(tiny_run):
    df = compare(list_checkpoints(tiny_run), atol=0.0, rtol=0.0, minkowski_p=[3])
    # layer a: [3, 1, 0] -> [0, 1, 2], d = [-3, 0, 2]
    r = _row(df, step=20, reference="previous", granularity="layer", name="a")
    assert r.ref_step == 10 and r.epoch == 2
    assert r.l1 == 5.0 and r.linf == 3.0
    assert r.l2 == pytest.approx(math.sqrt(13))
    assert r.mean_abs == pytest.approx(5 / 3)
    assert r.minkowski_p3 == pytest.approx(35 ** (1 / 3))
    assert r.rel_l2 == pytest.approx(math.sqrt(13 / 10))
    assert r.cosine == pytest.approx(1 / math.sqrt(50))
    assert r.frac_changed == pytest.approx(2 / 3)
    # block b did not move between steps 10 and 20
    r = _row(df, step=20, reference="previous", granularity="block", name="b")
    assert r.l1 == 0 and r.frac_changed == 0 and r.cosine == pytest.approx(1.0)


def test_tolerance_and_buffers(tiny_run):
    # |d| = 3 on a reference of 4: changed only while 3 > atol + rtol * 4
    strict = compare(list_checkpoints(tiny_run), atol=0.0, rtol=0.5)
    loose = compare(list_checkpoints(tiny_run), atol=0.0, rtol=0.8)
    sel = dict(step=10, reference="init", granularity="tensor", name="a.weight")
    assert _row(strict, **sel).changed == 1
    assert _row(loose, **sel).changed == 0
    # BatchNorm running statistics moved, but they are buffers, not parameters
    assert not strict["name"].str.contains("running|num_batches").any()
    assert set(strict[strict.granularity == "block"].name) == {"a", "b"}


def test_matches_plain_torch_loop(tmp_path):
    """A straightforward per-tensor torch computation agrees on random checkpoints."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8, 5))
    blocks = ["0", "1", "3"]
    states = []
    for step in range(4):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        save_checkpoint(
            tmp_path, m, epoch=step, step=step, epoch_end=True, run_id="r", blocks=blocks
        )
        states.append({k: v.clone() for k, v in m.named_parameters()})
    df = compare(list_checkpoints(tmp_path), atol=1e-3, rtol=1e-2, minkowski_p=[1.5])
    df = df[df.granularity == "tensor"]
    assert len(df) == 3 * 2 * len(states[0])
    for step in (1, 2, 3):
        for reference, ref in (("init", states[0]), ("previous", states[step - 1])):
            for name, cur in states[step].items():
                d = (cur - ref[name]).double()
                r = _row(df, step=step, reference=reference, name=name)
                assert r.l1 == pytest.approx(d.abs().sum().item(), rel=1e-6)
                assert r.l2 == pytest.approx(d.norm().item(), rel=1e-6)
                assert r.linf == pytest.approx(d.abs().max().item(), rel=1e-6)
                assert r["minkowski_p1.5"] == pytest.approx(d.norm(p=1.5).item(), rel=1e-6)
                cos = torch.nn.functional.cosine_similarity(
                    cur.flatten().double(), ref[name].flatten().double(), dim=0
                )
                assert r.cosine == pytest.approx(cos.item(), rel=1e-6)
                thr = 1e-3 + 1e-2 * ref[name].abs()
                expect = ((cur - ref[name]).abs() > thr).double().mean().item()
                assert r.frac_changed == pytest.approx(expect)


def test_each_granularity_covers_all_parameters(tiny_run):
    df = compare(list_checkpoints(tiny_run))
    for gran in ("tensor", "layer", "block"):
        sel = df[(df.granularity == gran) & (df.step == 10) & (df.reference == "init")]
        assert sel.numel.sum() == 2 + 1 + 1 + 1 + 1
        assert sel.l1.sum() == pytest.approx(5.5)


def test_corrupt_checkpoint_names_the_file(tiny_run):
    path = list_checkpoints(tiny_run)[1]
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(CheckpointError, match=str(path)):
        read_checkpoint(path)
    with pytest.raises(CheckpointError, match=path.name):
        compare(list_checkpoints(tiny_run))


def test_distance_columns_types(tiny_run):
    df = compare(list_checkpoints(tiny_run), minkowski_p=[3])
    assert df["numel"].dtype == np.int64 and df["changed"].dtype == np.int64
    assert df["epoch_end"].dtype == bool
    for c in ("l1", "l2", "linf", "mean_abs", "rel_l2", "cosine", "frac_changed", "minkowski_p3"):
        assert pd.api.types.is_float_dtype(df[c]), c


class Wide(nn.Module):
    """Tensors larger than a slice (walked in several slices, the last one ragged) next to
    small ones (packed many to a slice)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(300, 300)  # 90,000 weights: several slices
        self.b = nn.Sequential(nn.Linear(300, 7), nn.BatchNorm1d(7))  # 2,100 + small ones
        self.c = nn.Linear(7, 5000)  # 35,000 weights, 5,000 biases


@pytest.fixture
def wide_run(tmp_path):
    torch.manual_seed(1)
    m = Wide()
    states = []
    for step in range(4):
        with torch.no_grad():
            for i, p in enumerate(m.parameters()):
                if step and not (step == 2 and i == 1):  # a.bias stays put at step 2
                    p.add_(torch.randn_like(p) * 0.01 * step)
        save_checkpoint(
            tmp_path, m, epoch=step, step=step, epoch_end=True, run_id="w", blocks=["a", "b", "c"]
        )
        states.append({k: v.clone() for k, v in m.named_parameters()})
    return tmp_path, states


def _float64_row(cur, ref, atol, rtol, ps):
    d = (cur - ref).double()
    c, r = cur.double(), ref.double()
    out = {
        "l1": d.abs().sum().item(),
        "l2": d.norm().item(),
        "linf": d.abs().max().item(),
        "cosine": (c.flatten() @ r.flatten() / (c.norm() * r.norm())).item(),
        "norm": c.norm().item(),
        "ref_norm": r.norm().item(),
        "changed": int(((cur - ref).abs() > atol + rtol * ref.abs()).sum()),
    }
    for p in ps:
        out[f"minkowski_p{p:g}"] = d.norm(p=p).item()
    return out


@pytest.mark.parametrize("threads", [1, 2])
def test_sliced_and_packed_tensors_match_float64(wide_run, threads):
    """Every measure, at every granularity, within 1e-6 of a float64 computation, whether
    the slices run on one thread or are shared between two."""
    path, states = wide_run
    ps = [0.5, 1, 1.5, 2, 3, 4]  # every branch of the kernel's powers
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        df = compare(list_checkpoints(path), atol=1e-4, rtol=1e-3, minkowski_p=ps)
        assert torch.get_num_threads() == threads  # the pass leaves torch's threads as found
    finally:
        torch.set_num_threads(before)
    index = df.set_index(["step", "reference", "granularity", "name"]).sort_index()
    groups = {
        "layer": {"a": ["a"], "b.0": ["b.0"], "b.1": ["b.1"], "c": ["c"]},
        "block": {"a": ["a"], "b": ["b.0", "b.1"], "c": ["c"]},
    }
    for step in (1, 2, 3):
        for reference, ref in (("init", states[0]), ("previous", states[step - 1])):
            cur = states[step]
            rows = {("tensor", k): [k] for k in cur}
            for gran, members in groups.items():
                for name, prefixes in members.items():
                    rows[(gran, name)] = [k for k in cur if k.rsplit(".", 1)[0] in prefixes]
            for (gran, name), keys in rows.items():
                c = torch.cat([cur[k].flatten() for k in keys])
                r = torch.cat([ref[k].flatten() for k in keys])
                got = index.loc[(step, reference, gran, name)]
                assert got.numel == c.numel()
                for col, value in _float64_row(c, r, 1e-4, 1e-3, ps).items():
                    if col == "changed":
                        assert got[col] == value, (gran, name, col)
                    else:
                        expect = pytest.approx(value, rel=1e-6, nan_ok=True)
                        assert got[col] == expect, (gran, name, col)
    # a.bias did not move between steps 1 and 2
    r = _row(df, step=2, reference="previous", granularity="tensor", name="a.bias")
    assert r.l1 == 0 and r.changed == 0 and r.cosine == pytest.approx(1.0)


def test_one_pass_per_checkpoint_and_rows_in_order(wide_run):
    path, states = wide_run
    df = compare(list_checkpoints(path))
    n = len(states[0])
    assert list(df.granularity.unique()) == ["tensor", "layer", "block"]
    tensor = df[df.granularity == "tensor"]
    assert list(tensor.name[:n]) == list(states[0])  # checkpoint, reference, then tensor order
    assert list(tensor.reference[: 2 * n]) == ["init"] * n + ["previous"] * n
    assert list(tensor.step[:: 2 * n]) == [1, 2, 3]
    first = df[df.step == 1]  # against the init both ways: the same values
    a, b = first[first.reference == "init"], first[first.reference == "previous"]
    assert np.array_equal(a.l1.to_numpy(), b.l1.to_numpy())
    assert (b.ref_step == 0).all()


def test_parameters_must_match_the_first_checkpoint(tmp_path):
    for step, n_in in enumerate((3, 4)):
        m = nn.Sequential(nn.Linear(n_in, 2))
        save_checkpoint(
            tmp_path, m, epoch=step, step=step, epoch_end=True, run_id="x", blocks=["0"]
        )
    with pytest.raises(CheckpointError, match="0.weight has 8 entries, 6"):
        compare(list_checkpoints(tmp_path))


def test_a_diverged_tensor_spoils_only_its_own_rows(wide_run):
    path, _ = wide_run
    paths = list_checkpoints(path)
    ck = read_checkpoint(paths[-1])
    ck.tensors["c.bias"][3] = float("nan")
    df = compare([*paths[:-1], ck])
    last = df[df.step == 3]
    spoilt = last.l1.isna()
    assert set(last[spoilt].name) == {"c.bias", "c"}  # the tensor, its layer and its block
    assert last[spoilt].linf.isna().all() and not last[~spoilt].l1.isna().any()


def test_an_infinite_entry_gives_infinite_distances(wide_run):
    path, _ = wide_run
    paths = list_checkpoints(path)
    ck = read_checkpoint(paths[-1])
    ck.tensors["a.weight"][5, 7] = float("inf")
    df = compare([*paths[:-1], ck], minkowski_p=[3])
    last = df[(df.step == 3) & (df.name == "a.weight")]
    assert np.isinf(last.linf).all() and np.isinf(last.l1).all() and np.isinf(last.l2).all()
    assert (last.changed >= 1).all()
