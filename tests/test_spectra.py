"""Weight spectra against matrices with known spectra, numpy's norms, synthetic power laws
of known exponent and the powerlaw package's own xmin search."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import ortho_group
from torch import nn

from paramdyn.checkpoints import save_checkpoint
from paramdyn.spectra import (
    COLUMNS,
    MIN_EVALS,
    checkpoint_spectra,
    fit_power_law,
    layer_spectra,
)

torch.set_num_threads(1)


def known(s, rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """U diag(s) V^T with random orthogonal U (rows x rows) and V (cols x cols)."""
    rng = np.random.default_rng(seed)
    u = ortho_group.rvs(rows, random_state=rng)
    v = ortho_group.rvs(cols, random_state=rng)
    sigma = np.zeros((rows, cols))
    sigma[np.arange(len(s)), np.arange(len(s))] = s
    return torch.tensor(u @ sigma @ v.T, dtype=torch.float64)


def one(tensor: torch.Tensor, **kw) -> dict:
    (row,) = layer_spectra({"w.weight": tensor}, **kw)
    return row


def test_equal_singular_values_give_stable_and_effective_rank_r():
    r = 7
    row = one(known([3.0] * r, 20, 30), fit=False)
    assert row["rank"] == r and row["n_evals"] == 20
    assert row["stable_rank"] == pytest.approx(r, rel=1e-12)
    assert row["effective_rank"] == pytest.approx(r, rel=1e-12)
    assert row["spectral_norm"] == pytest.approx(3.0, rel=1e-12)


def test_one_dominant_singular_value():
    s = np.array([10.0, 1.0, 1.0, 0.5, 0.25])
    row = one(known(s, 12, 9), fit=False)
    assert row["stable_rank"] == pytest.approx(np.sum(s**2) / 100.0, rel=1e-12)  # 1.053125
    p = s / s.sum()
    assert row["effective_rank"] == pytest.approx(math.exp(-np.sum(p * np.log(p))), rel=1e-12)
    assert 1.0 < row["effective_rank"] < 2.5  # one direction dominates: far below rank 5


def test_norms_equal_numpys_and_are_permutation_invariant():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(40, 25, generator=g)
    row = one(w, fit=False)
    a = w.double().numpy()
    assert row["spectral_norm"] == pytest.approx(np.linalg.norm(a, 2), rel=1e-12)
    assert row["frobenius_norm"] == pytest.approx(np.linalg.norm(a, "fro"), rel=1e-12)
    shuffled = one(w[torch.randperm(40, generator=g)][:, torch.randperm(25, generator=g)].T)
    ref = one(w)
    for k in ("spectral_norm", "frobenius_norm", "stable_rank", "effective_rank", "alpha"):
        assert shuffled[k] == pytest.approx(ref[k], rel=1e-10), k


def test_conv_weight_is_reshaped_out_by_in_k_k():
    out, cin, k = 16, 3, 3
    s = np.linspace(4.0, 1.0, out)  # a full-rank 16 x 27 operator with this spectrum
    w = known(s, out, cin * k * k, seed=2).reshape(out, cin, k, k).float()
    row = one(w)
    assert (row["rows"], row["cols"], row["shape"]) == (16, 27, [16, 3, 3, 3])
    assert row["spectral_norm"] == pytest.approx(4.0, rel=1e-6)
    assert row["stable_rank"] == pytest.approx(np.sum(s**2) / 16.0, rel=1e-5)
    assert row["n_evals"] == row["rank"] == 16
    # not the spectrum of any k x k slice (what WeightWatcher pools): the operator's own
    slice_top = np.linalg.norm(w[:, :, 0, 0].double().numpy(), 2)
    assert slice_top < 4.0 - 0.5


@pytest.mark.parametrize("alpha", [2.5, 3.0, 4.0])
def test_power_law_fit_recovers_the_exponent(alpha):
    """2,000 Pareto(alpha) eigenvalues from xmin = 1 under a bulk of 1,000 uniform on
    [0.1, 1): the fit must find the tail (xmin near 1, n_tail near 2,000) and alpha within
    3 of its standard errors (alpha - 1) / sqrt(n_tail) (Clauset et al. 2009, eq. 3.2; a
    correct estimator misses that by chance 0.3% of the time)."""
    rng = np.random.default_rng(7)
    tail = (1.0 - rng.random(2000)) ** (-1.0 / (alpha - 1.0))
    bulk = rng.uniform(0.1, 1.0, 1000)
    fit = fit_power_law(rng.permutation(np.concatenate([bulk, tail])))
    assert fit["reason"] is None
    se = (fit["alpha"] - 1.0) / math.sqrt(fit["n_tail"])
    assert fit["alpha_sigma"] == pytest.approx(se, rel=1e-9)
    assert abs(fit["alpha"] - alpha) < 3 * se
    assert 0.9 <= fit["xmin"] <= 2.0
    assert 500 <= fit["n_tail"] <= 2000 + 120  # the tail, plus at most the bulk's top
    assert 0.0 < fit["alpha_ks"] < 0.05


def test_alpha_does_not_change_with_scale():
    w = torch.randn(200, 120, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    a, b = one(w), one(7.0 * w)
    assert b["alpha"] == pytest.approx(a["alpha"], rel=1e-9)
    assert b["xmin"] == pytest.approx(49.0 * a["xmin"], rel=1e-9)
    assert b["n_tail"] == a["n_tail"]


@pytest.mark.parametrize("kind", ["pareto", "gaussian"])
def test_xmin_search_picks_powerlaws_xmin(kind):
    """Our vectorised search against powerlaw.Fit's own (alpha allowed above 3)."""
    rng = np.random.default_rng(11)
    if kind == "pareto":
        x = np.concatenate([rng.uniform(0.2, 1.0, 100), (1 - rng.random(200)) ** (-1 / 2.2)])
    else:  # the eigenvalues of a random matrix: a Marchenko-Pastur bulk, alpha >> 3
        w = rng.normal(size=(300, 150))
        x = np.linalg.svd(w, compute_uv=False) ** 2
    ours, theirs = fit_power_law(x), fit_power_law(x, search="powerlaw")
    assert ours["xmin"] == theirs["xmin"]
    assert ours["alpha"] == pytest.approx(theirs["alpha"], rel=1e-12)
    assert ours["n_tail"] == theirs["n_tail"]


def test_too_small_or_zero_layers_get_nan_alpha_with_a_reason():
    small = one(torch.randn(5, 8, generator=torch.Generator().manual_seed(4)))
    assert math.isnan(small["alpha"]) and "too few" in small["reason"]
    assert small["n_evals"] == 5 < MIN_EVALS and small["spectral_norm"] > 0
    low_rank = one(known([2.0, 1.0, 0.5], 30, 40).float())  # 30 eigenvalues, 3 nonzero
    assert low_rank["rank"] == 3 and "too few" in low_rank["reason"]
    zero = one(torch.zeros(30, 40))
    assert zero["rank"] == 0 and zero["spectral_norm"] == 0.0
    assert math.isnan(zero["stable_rank"]) and math.isnan(zero["alpha"])
    assert one(torch.randn(30, 40), fit=False)["reason"] == "not fitted"


def test_layer_selection():
    m = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.Flatten(), nn.Linear(20, 12))
    sd = m.state_dict()
    assert [r["key"] for r in layer_spectra(sd, fit=False)] == ["0.weight", "3.weight"]
    with pytest.raises(ValueError, match="fewer than 2 dimensions"):
        layer_spectra(sd, ["0.bias"])
    with pytest.raises(ValueError, match="not in the state_dict"):
        layer_spectra(sd, ["nope.weight"])
    with pytest.raises(ValueError, match="unknown xmin search"):
        fit_power_law(np.arange(1.0, 30.0), search="nope")


def test_checkpoint_spectra_adds_block_and_depth(tmp_path):
    m = nn.Sequential(
        nn.Sequential(nn.Linear(12, 40), nn.ReLU()), nn.Sequential(nn.Linear(40, 30, bias=False))
    )
    path = save_checkpoint(
        tmp_path, m, epoch=1, step=5, epoch_end=True, run_id="r", blocks=["0", "1"]
    )
    table = checkpoint_spectra(path)
    assert list(table.columns) == ["run_id", "epoch", "step", "key", "layer", "block", "depth",
                                   *COLUMNS[2:]]  # fmt: skip
    assert table["key"].tolist() == ["0.0.weight", "1.0.weight"]
    assert table["block"].tolist() == ["0", "1"] and table["depth"].tolist() == [0, 1]
    assert table["layer"].tolist() == ["0.0", "1.0"]
    assert (table["step"] == 5).all() and table["alpha"].notna().all()
    w = m[1][0].weight.detach().double().numpy()
    assert table["spectral_norm"].iloc[1] == pytest.approx(np.linalg.norm(w, 2), rel=1e-6)
