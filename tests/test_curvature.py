"""Curvature (paramdyn.curvature) against Hessians known in closed form: linear models with
squared loss, H = 2 XᵀX / n, built with a chosen spectrum."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from paramdyn import curvature as C
from paramdyn.data import DeviceData
from paramdyn.features import probe_indices
from paramdyn.models import build_model

torch.set_num_threads(1)


def squared(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over samples of the squared error summed over outputs: H = 2 XᵀX / n."""
    return ((out - target) ** 2).sum(1).mean()


def design(n: int, spectrum, seed: int = 0, rotate: bool = True) -> np.ndarray:
    """An n x d design whose 2 XᵀX / n has eigenvalues ``spectrum`` (diagonal if not rotate)."""
    rng = np.random.default_rng(seed)
    d = len(spectrum)
    q, _ = np.linalg.qr(rng.standard_normal((n, d)))
    s = np.sqrt(np.asarray(spectrum, dtype=np.float64) * n / 2)
    x = q * s
    if rotate:
        v, _ = np.linalg.qr(rng.standard_normal((d, d)))
        x = x @ v.T
    return x


def hessian(x: np.ndarray) -> np.ndarray:
    return 2 * x.T @ x / len(x)


class TwoBlocks(nn.Module):
    """Two linear maps, ``a`` on the first ``da`` inputs and ``b`` on the rest, outputs
    concatenated: with squared loss the Hessian is block-diagonal, one block each."""

    def __init__(self, da: int, db: int):
        super().__init__()
        self.da = da
        self.a = nn.Linear(da, 1, bias=False).double()
        self.b = nn.Linear(db, 1, bias=False).double()

    def block_names(self) -> list[str]:
        return ["a", "b"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.a(x[:, : self.da]), self.b(x[:, self.da :])], 1)


def linear_case(spectrum, n=120, seed=0, rotate=True, split=(50,)):
    x = design(n, spectrum, seed, rotate)
    y = np.random.default_rng(seed + 1).standard_normal((n, 1))
    model = nn.Linear(len(spectrum), 1, bias=False).double()
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    cuts = [0, *split, n]
    batches = [(xs[a:b], ys[a:b]) for a, b in zip(cuts, cuts[1:], strict=False)]
    return model, batches, hessian(x)


# --- HVPs -----------------------------------------------------------------------------------


def test_hvp_equals_closed_form_hessian_times_v_over_uneven_batches():
    model, batches, H = linear_case(np.linspace(0.5, 7.0, 12), split=(17, 90))
    h = C.Hessian(model, batches, C.parameter_names(model), squared)
    v = np.random.default_rng(3).standard_normal(H.shape[0])
    np.testing.assert_allclose(h.matvec(v), H @ v, rtol=1e-12, atol=1e-12)
    assert h.hvps == 1


def test_unknown_or_empty_parameters_are_refused():
    model, batches, _ = linear_case([1.0, 2.0])
    with pytest.raises(ValueError, match="not trainable parameters"):
        C.top_eigenvalue(model, batches, ["nope"], loss_fn=squared)
    with pytest.raises(ValueError, match="no parameters"):
        C.hutchinson_trace(model, batches, [], loss_fn=squared)


# --- top eigenvalue -------------------------------------------------------------------------


def test_top_eigenvalue_matches_numpy_and_records_convergence():
    spectrum = [9.0, 4.0, 3.5, *np.linspace(0.1, 3.0, 27)]
    model, batches, H = linear_case(spectrum, seed=2)
    r = C.top_eigenvalue(model, batches, loss_fn=squared, tol=1e-3)
    assert r["value"] == pytest.approx(np.linalg.eigvalsh(H)[-1], rel=1e-6)
    assert r["converged"] is True and r["residual"] < 1e-3
    assert r["hvps"] == r["iterations"] + 1  # the residual's own HVP


def test_top_eigenvalue_is_largest_algebraic_not_largest_magnitude():
    # an indefinite Hessian: loss = mean(s_i (x_i·w)^2), s = +1 on the first half and -3 on
    # the second: H = 2 (AᵀA - 3 BᵀB) / n, whose largest-magnitude eigenvalue is negative
    x = design(200, np.linspace(1.0, 2.0, 6), seed=5)
    xs = torch.from_numpy(x)
    model = nn.Linear(6, 1, bias=False).double()
    sign = torch.ones(200, 1, dtype=torch.float64)
    sign[100:] = -3.0  # the second half enters with weight -3

    def signed(out, s):
        return (s * out**2).sum(1).mean()

    H = 2 * (x[:100].T @ x[:100] - 3 * x[100:].T @ x[100:]) / 200
    r = C.top_eigenvalue(model, [(xs, sign)], loss_fn=signed, tol=1e-6)
    ev = np.linalg.eigvalsh(H)
    assert abs(ev[0]) > abs(ev[-1])
    assert r["value"] == pytest.approx(ev[-1], rel=1e-5)


def test_not_converged_is_recorded_when_the_budget_is_too_small():
    model, batches, _ = linear_case(np.linspace(1.0, 1.05, 40), seed=4)
    r = C.top_eigenvalue(model, batches, loss_fn=squared, tol=1e-10, max_iter=1)
    assert r["converged"] is False and r["residual"] > 1e-10 and math.isfinite(r["value"])


def test_lanczos_needs_fewer_hvps_than_power_iteration_on_a_clustered_spectrum():
    spectrum = [10.0, 9.5, 9.0, *np.linspace(0.5, 8.5, 37)]
    model, batches, H = linear_case(spectrum, seed=6)
    r = C.top_eigenvalue(model, batches, loss_fn=squared, tol=1e-3)
    assert r["converged"]
    h = C.Hessian(model, batches, C.parameter_names(model), squared)
    v = np.random.default_rng(0).standard_normal(H.shape[0])
    v /= np.linalg.norm(v)
    for _ in range(2000):  # PyHessian's power iteration, to the same residual
        hv = h.matvec(v)
        lam = v @ hv
        if np.linalg.norm(hv - lam * v) / abs(lam) <= 1e-3:
            break
        v = hv / np.linalg.norm(hv)
    assert r["hvps"] * 2 < h.hvps


def test_single_parameter_scope():
    model, batches, H = linear_case([4.0], n=30)
    r = C.top_eigenvalue(model, batches, loss_fn=squared)
    assert r["value"] == pytest.approx(H[0, 0]) and r["converged"]


# --- Hutchinson trace -----------------------------------------------------------------------


def test_hutchinson_is_exact_for_a_diagonal_hessian():
    spectrum = np.linspace(0.3, 5.0, 25)
    model, batches, H = linear_case(spectrum, rotate=False)
    t = C.hutchinson_trace(model, batches, loss_fn=squared, samples=5)
    assert t["value"] == pytest.approx(spectrum.sum(), rel=1e-10)
    assert t["stderr"] < 1e-9 and t["samples"] == 5


def test_hutchinson_trace_within_its_interval_and_tighter_with_more_samples():
    model, batches, H = linear_case(np.linspace(0.3, 5.0, 25), seed=7)
    few = C.hutchinson_trace(model, batches, loss_fn=squared, samples=20, seed=1)
    many = C.hutchinson_trace(model, batches, loss_fn=squared, samples=400, seed=1)
    for t in (few, many):
        assert abs(t["value"] - np.trace(H)) < 4 * t["stderr"]
    assert many["stderr"] < few["stderr"] / 2
    assert many["stderr"] > 0  # a rotated Hessian: vᵀHv varies


def test_block_traces_from_full_probes_are_the_diagonal_blocks_traces():
    # a dense, rotated Hessian: cross terms exist and must vanish in expectation
    x = design(150, np.linspace(0.5, 6.0, 20), seed=8)
    model = TwoBlocks(8, 12)
    y = torch.zeros(150, 2, dtype=torch.float64)

    def coupled(out, _):  # (x·w_a + x·w_b)^2: H = 2 XᵀX/n, not block-diagonal
        return (out.sum(1) ** 2).mean()

    H = hessian(x)
    t = C.block_traces(
        model, [(torch.from_numpy(x), y)], {"a": ["a.weight"], "b": ["b.weight"]},
        samples=300, loss_fn=coupled,
    )  # fmt: skip
    for name, sl in (("a", slice(0, 8)), ("b", slice(8, 20))):
        assert abs(t[name]["value"] - np.trace(H[sl, sl])) < 4 * t[name]["stderr"]


# --- blocks ---------------------------------------------------------------------------------


def two_block_case(spec_a, spec_b, n=160):
    da = len(spec_a)
    xa, xb = design(n, spec_a, seed=10), design(n, spec_b, seed=11)
    x = torch.from_numpy(np.concatenate([xa, xb], 1))
    y = torch.from_numpy(np.random.default_rng(12).standard_normal((n, 2)))
    return TwoBlocks(da, len(spec_b)), [(x[:80], y[:80]), (x[80:], y[80:])]


def test_block_diagonal_hessian_per_block_eigenvalues_and_model_is_the_max():
    spec_a, spec_b = [3.0, *np.linspace(0.1, 1.0, 9)], [7.0, *np.linspace(0.2, 2.0, 14)]
    model, batches = two_block_case(spec_a, spec_b)
    rows = C.checkpoint_curvature(model, batches, ["a", "b"], loss_fn=squared, samples=4)
    by = {r["scope"]: r for r in rows}
    assert [r["scope"] for r in rows] == ["model", "a", "b"]
    assert by["a"]["top_eigenvalue"] == pytest.approx(3.0, rel=1e-5)
    assert by["b"]["top_eigenvalue"] == pytest.approx(7.0, rel=1e-5)
    assert by["model"]["top_eigenvalue"] == pytest.approx(7.0, rel=1e-5)
    # separable and each design's columns rotated: traces from shared probes, within CI
    assert abs(by["a"]["trace"] - sum(spec_a)) < 4 * by["a"]["trace_stderr"] + 1e-9
    assert by["model"]["trace"] == pytest.approx(by["a"]["trace"] + by["b"]["trace"])
    assert [by[s]["depth"] for s in ("model", "a", "b")] == [None, 0, 1]
    assert [by[s]["n_params"] for s in ("model", "a", "b")] == [25, 10, 15]
    assert all(r["converged"] and r["residual"] < 1e-3 for r in rows)


def test_block_row_equals_model_row_when_only_that_block_has_parameters():
    model, batches = two_block_case([5.0, 2.0, 1.0, 0.5], [9.0, 1.0, 0.2])
    model.b.weight.requires_grad_(False)  # block b: no trainable parameters
    rows = C.checkpoint_curvature(model, batches, ["a", "b"], loss_fn=squared, samples=8)
    assert [r["scope"] for r in rows] == ["model", "a"]
    m, a = rows
    assert m["top_eigenvalue"] == pytest.approx(a["top_eigenvalue"], rel=1e-9)
    assert m["top_eigenvalue"] == pytest.approx(5.0, rel=1e-5)
    assert m["trace"] == pytest.approx(a["trace"]) and m["n_params"] == a["n_params"] == 4


# --- real classifiers -----------------------------------------------------------------------


def random_batches(shape, classes, sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g))
        for n in sizes
    ]


def test_lenet_rows_one_per_block_and_model_bounds_every_block():
    torch.manual_seed(0)
    model = build_model("lenet5", "digits")
    model.train()
    batches = random_batches((1, 8, 8), 10, (48, 48))
    rows = C.checkpoint_curvature(model, batches, samples=6, tol=1e-2)
    assert [r["scope"] for r in rows] == ["model", *model.block_names()]
    for r in rows:
        assert all(math.isfinite(r[k]) for k in ("top_eigenvalue", "residual", "trace"))
    top = rows[0]["top_eigenvalue"]
    # a block's Hessian is a principal submatrix: its top eigenvalue is at most the model's
    assert all(r["top_eigenvalue"] <= top * (1 + 2e-2) for r in rows[1:])
    assert rows[0]["trace"] == pytest.approx(sum(r["trace"] for r in rows[1:]), rel=1e-5)
    assert rows[0]["n_params"] == sum(p.numel() for p in model.parameters())
    assert model.training  # the mode is restored


def test_batchnorm_uses_running_statistics_so_batching_does_not_matter():
    torch.manual_seed(0)
    model = build_model("resnet18-cifar", "synthetic", {"width": 8})
    with torch.no_grad():  # running statistics that are not the init's 0/1
        for x, _ in random_batches((1, 12, 12), 4, (32, 32), seed=1):
            model(x * 2 + 0.5)
    whole = random_batches((1, 12, 12), 4, (32,), seed=2)
    (x, y) = whole[0]
    halves = [(x[:12], y[:12]), (x[12:], y[12:])]
    a = C.top_eigenvalue(model, whole, ["fc.weight", "fc.bias"], tol=1e-6)
    b = C.top_eigenvalue(model, halves, ["fc.weight", "fc.bias"], tol=1e-6)
    assert a["value"] == pytest.approx(b["value"], rel=1e-4)
    ta = C.hutchinson_trace(model, whole, ["layer4.1.conv2.weight"], samples=3)
    tb = C.hutchinson_trace(model, halves, ["layer4.1.conv2.weight"], samples=3)
    assert ta["value"] == pytest.approx(tb["value"], rel=1e-4)


# --- the fixed subset -----------------------------------------------------------------------


def test_subset_batches_are_the_seeded_training_images_normalised(synthetic):
    data = DeviceData.load(synthetic, "cpu")
    batches = C.subset_batches(data, 50, batch_size=16, seed=3)
    assert [len(y) for _, y in batches] == [16, 16, 16, 2]
    idx = probe_indices(data.train_x.shape[0], 50, seed=3)
    x = torch.cat([b[0] for b in batches])
    expect = (data.train_x[idx].float() / 255.0 - data.mean) / data.std
    torch.testing.assert_close(x, expect)
    assert torch.equal(torch.cat([b[1] for b in batches]), data.train_y[idx])
    again = C.subset_batches(data, 50, batch_size=16, seed=3)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again, strict=True))
    other = C.subset_batches(data, 50, batch_size=16, seed=4)
    assert not torch.equal(torch.cat([b[0] for b in other]), x)
