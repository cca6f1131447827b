"""Features: probe set, extraction, files, and every similarity measure against known
answers (invariances, independent sets, an explicit n x n Gram-matrix reference)."""

import math

import numpy as np
import pytest
import torch

from paramdyn import features as F
from paramdyn.models import build_model


def rand(n, p, seed):
    return np.random.default_rng(seed).normal(size=(n, p))


def orthogonal(p, seed):
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(p, p)))
    return q * np.sign(np.diag(r))


def hsic_unbiased_gram(K, L):
    """Song et al. 2012, eq. 5, written out with the n x n Gram matrices."""
    n = K.shape[0]
    K, L = K.copy(), L.copy()
    np.fill_diagonal(K, 0.0)
    np.fill_diagonal(L, 0.0)
    one = np.ones(n)
    return (
        np.trace(K @ L)
        + (one @ K @ one) * (one @ L @ one) / ((n - 1) * (n - 2))
        - 2.0 / (n - 2) * (one @ K @ L @ one)
    ) / (n * (n - 3))


def cka_gram(X, Y, unbiased):
    if unbiased:
        K, L = X @ X.T, Y @ Y.T
        h = hsic_unbiased_gram
    else:
        H = np.eye(len(X)) - 1.0 / len(X)
        K, L = H @ X @ X.T @ H, H @ Y @ Y.T @ H

        def h(a, b):
            return np.sum(a * b)

    return h(K, L) / math.sqrt(h(K, K) * h(L, L))


# --- probe set -------------------------------------------------------------------------------


def test_probe_indices_deterministic_sorted_subset():
    a = F.probe_indices(1000, 200, seed=3)
    assert np.array_equal(a, F.probe_indices(1000, 200, seed=3))
    assert not np.array_equal(a, F.probe_indices(1000, 200, seed=4))
    assert len(a) == 200 and len(set(a.tolist())) == 200
    assert np.all(np.diff(a) > 0) and a.min() >= 0 and a.max() < 1000
    assert a.dtype == np.int64
    assert np.array_equal(F.probe_indices(100, 500), np.arange(100))
    with pytest.raises(ValueError, match="at least 1"):
        F.probe_indices(100, 0)


# --- CKA -------------------------------------------------------------------------------------


@pytest.mark.parametrize("unbiased", [False, True])
def test_cka_matches_gram_matrix_reference(unbiased):
    rng = np.random.default_rng(0)
    X = rand(60, 7, 1) + 3.0  # not centred: both estimators must centre / be invariant
    Y = X @ rng.normal(size=(7, 5)) + rng.normal(size=(60, 5)) - 1.0
    assert F.linear_cka(X, Y, unbiased=unbiased) == pytest.approx(
        cka_gram(X, Y, unbiased), rel=1e-10
    )
    assert F.linear_cka(X, Y, unbiased=unbiased) == pytest.approx(
        F.linear_cka(Y, X, unbiased=unbiased), rel=1e-12
    )


@pytest.mark.parametrize("unbiased", [False, True])
def test_cka_invariant_to_rotation_and_scale(unbiased):
    X = rand(300, 16, 0)
    XQ = X @ orthogonal(16, 1)
    assert F.linear_cka(X, XQ, unbiased=unbiased) == pytest.approx(1.0, abs=1e-10)
    assert F.linear_cka(X, 3.7 * X, unbiased=unbiased) == pytest.approx(1.0, abs=1e-10)
    assert F.linear_cka(X, X + 5.0, unbiased=unbiased) == pytest.approx(1.0, abs=1e-10)
    # a unit order (permutation) and signs are rotations too
    perm = np.random.default_rng(2).permutation(16)
    assert F.linear_cka(X, -X[:, perm], unbiased=unbiased) == pytest.approx(1.0, abs=1e-10)


def test_cka_of_independent_sets_is_small():
    # E[biased CKA] ~ sqrt(p q) / n = 0.01 here (measured over 50 seeds: mean 0.0099, max
    # 0.0114); the unbiased estimate is centred on 0 (measured |value| < 0.0016).
    for seed in range(5):
        X, Y = rand(2000, 20, 2 * seed), rand(2000, 20, 2 * seed + 1)
        assert 0.0 < F.linear_cka(X, Y) < 0.03
        assert abs(F.linear_cka(X, Y, unbiased=True)) < 0.005
    # and the biased one grows with p / n while the unbiased one does not
    X, Y = rand(100, 50, 10), rand(100, 50, 11)
    assert F.linear_cka(X, Y) > 0.3
    assert abs(F.linear_cka(X, Y, unbiased=True)) < 0.05


def test_cka_takes_torch_tensors_and_float32():
    X = rand(100, 8, 0)
    Y = rand(100, 6, 1)
    ref = F.linear_cka(X, Y)
    assert F.linear_cka(torch.from_numpy(X).float(), torch.from_numpy(Y)) == pytest.approx(
        ref, rel=1e-5
    )


@pytest.mark.parametrize("n", [1, 2, 3])
def test_unbiased_cka_needs_four_samples(n):
    X, Y = rand(n, 5, 0), rand(n, 5, 1)
    with pytest.raises(ValueError, match=f"at least 4 probe samples, got {n}.*probe_size"):
        F.linear_cka(X, Y, unbiased=True)


def test_unbiased_cka_refuses_a_zero_self_hsic():
    # HSIC_1(K, K) is exactly 0 for this 4-sample set; shifted and scaled, rounding leaves
    # it about 1e-17: refused both times instead of a ratio of rounding errors
    X = np.array([[3.0], [-1.0], [-1.0], [-1.0]])
    Y = rand(4, 2, 0)
    for Z in (X, 0.1 * X + 5.0):
        with pytest.raises(ValueError, match="HSIC of X with itself.*not positive.*probe_size"):
            F.linear_cka(Z, Y, unbiased=True)
    assert 0.0 < F.linear_cka(X, Y) <= 1.0  # the biased estimator is defined


def test_unbiased_cka_never_nan_with_few_samples():
    # with 4..10 samples and many features the estimate is defined or refused, never NaN
    for n in range(4, 11):
        for seed in range(20):
            X, Y = rand(n, 30, seed), rand(n, 30, seed + 100)
            try:
                v = F.linear_cka(X, Y, unbiased=True)
            except ValueError as e:
                assert "probe_size" in str(e)
            else:
                assert math.isfinite(v)


def test_constant_features_raise_not_nan():
    X = rand(50, 4, 0)
    for const in (np.zeros((50, 3)), np.full((50, 3), 0.1)):
        for unbiased in (False, True):
            with pytest.raises(ValueError, match="features Y are constant"):
                F.linear_cka(X, const, unbiased=unbiased)
        with pytest.raises(ValueError, match="features X are constant"):
            F.procrustes_distance(const, X)
        with pytest.raises(ValueError, match="constant"):
            F.matched_correlation(X, const)
    bad = X.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        F.linear_cka(X, bad)
    with pytest.raises(ValueError, match="same samples"):
        F.linear_cka(X, X[:40])
    # some dead units are fine: CKA ignores them
    dead = np.hstack([X, np.zeros((50, 2))])
    assert F.linear_cka(X, dead) == pytest.approx(1.0, abs=1e-12)


# --- matched correlation and Procrustes ------------------------------------------------------


def test_matched_correlation_recovers_a_permutation():
    X = rand(500, 12, 0)
    perm = np.random.default_rng(1).permutation(12)
    mean, per_unit, assignment = F.matched_correlation(X, X[:, perm])
    assert mean == pytest.approx(1.0, abs=1e-12)
    assert np.allclose(per_unit, 1.0)
    # X's unit i is Y's unit j where perm[j] == i
    assert np.array_equal(perm[assignment], np.arange(12))
    # signed by default: a negated copy is not a match; absolute matching finds it
    assert F.matched_correlation(X, -X[:, perm])[0] < 0.2
    mean_abs, _, assignment_abs = F.matched_correlation(X, -X[:, perm], absolute=True)
    assert mean_abs == pytest.approx(1.0, abs=1e-12)
    assert np.array_equal(perm[assignment_abs], np.arange(12))


def test_matched_correlation_unequal_widths_and_dead_units():
    X = rand(400, 6, 0)
    Y = np.hstack([X[:, ::-1], rand(400, 3, 1), np.zeros((400, 1))])  # 10 units, 1 dead
    mean, per_unit, assignment = F.matched_correlation(X, Y)
    assert mean == pytest.approx(1.0, abs=1e-12)
    assert np.array_equal(assignment, np.arange(5, -1, -1))
    # from Y's side: 9 live units, 6 matched, the dead unit and 3 others unmatched
    mean_y, per_unit_y, assignment_y = F.matched_correlation(Y, X)
    assert np.isnan(per_unit_y[9]) and assignment_y[9] == -1
    assert (assignment_y >= 0).sum() == 6
    assert mean_y == pytest.approx(1.0, abs=1e-12)


def test_procrustes_distance():
    X = rand(400, 10, 0)
    Q = orthogonal(10, 3)
    assert F.procrustes_distance(X, 2.5 * X @ Q + 1.0) == pytest.approx(0.0, abs=1e-10)
    assert F.procrustes_distance(X, X) == pytest.approx(0.0, abs=1e-10)
    for seed in range(3):
        d = F.procrustes_distance(rand(2000, 20, seed), rand(2000, 20, seed + 10))
        assert 0.5 < d <= 2.0
    # fewer units in Y: zero-padded; a copy of a subset is closer than an unrelated set
    sub = F.procrustes_distance(X, X[:, :5])
    assert 0.0 < sub < F.procrustes_distance(X, rand(400, 5, 9))


# --- within one model ------------------------------------------------------------------------


def test_correlation_matrix_and_summary():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(1000, 3))
    X = np.hstack([base, base[:, :1] * 2 + 0.01 * rng.normal(size=(1000, 1)), np.ones((1000, 1))])
    C = F.correlation_matrix(X)
    assert C.shape == (5, 5)
    assert np.all(np.isnan(C[4])) and np.all(np.isnan(C[:, 4]))
    assert np.allclose(np.diag(C)[:4], 1.0)
    assert C[0, 3] > 0.99 and np.allclose(C[:4, :4], C[:4, :4].T)
    s = F.correlation_summary(X)
    assert s["units"] == 5 and s["constant_units"] == 1
    offdiag = np.abs(C[:4, :4])[~np.eye(4, dtype=bool)]
    assert s["mean_abs_offdiag"] == pytest.approx(offdiag.mean())
    # isotropic: effective rank = the unit count; one direction: 1
    white = rand(20000, 8, 1)
    assert F.correlation_summary(white)["effective_rank"] == pytest.approx(8.0, rel=0.01)
    line = rand(100, 1, 2) @ np.ones((1, 6))
    assert F.correlation_summary(line)["effective_rank"] == pytest.approx(1.0, abs=1e-9)
    with pytest.raises(ValueError, match="1 non-constant unit"):
        F.correlation_summary(np.hstack([rand(10, 1, 0), np.zeros((10, 3))]))


def test_similarity_table():
    X = rand(200, 8, 0)
    feats = {"a": X, "b": X @ orthogonal(8, 1), "c": rand(200, 8, 2), "dead": np.zeros((200, 8))}
    df = F.similarity_table(feats, [("a", "b"), ("a", "c")], unbiased=True)
    assert list(df.columns) == ["run_a", "run_b", "measure", "value", "note"]
    assert set(df.measure) == set(F.MEASURES)
    v = df.set_index(["run_a", "run_b", "measure"]).value
    assert v["a", "b", "cka_linear"] == pytest.approx(1.0)
    assert v["a", "b", "cka_linear_unbiased"] == pytest.approx(1.0)
    assert v["a", "b", "procrustes"] == pytest.approx(0.0, abs=1e-10)
    assert v["a", "c", "cka_linear"] < 0.2
    assert "cka_linear_unbiased" not in set(F.similarity_table(feats, [("a", "b")]).measure)
    with pytest.raises(ValueError, match="cka_linear of a and dead: features Y are constant"):
        F.similarity_table(feats, [("a", "dead")])
    nan = F.similarity_table(feats, [("a", "dead")], errors="nan")
    assert nan.value.isna().all() and nan.note.str.contains("constant").all()
    with pytest.raises(ValueError, match="no features for run 'zz'"):
        F.similarity_table(feats, [("a", "zz")])
    with pytest.raises(ValueError, match="different probe sizes"):
        F.similarity_table({"a": X, "b": X[:100]}, [("a", "b")])


def test_biased_cka_is_fast_in_feature_space():
    # n = 10,000 is far beyond what n x n Gram matrices allow (800 MB each); this must run
    X = np.random.default_rng(0).normal(size=(10_000, 64)).astype(np.float32)
    assert F.linear_cka(X, X[:, ::-1]) == pytest.approx(1.0, abs=1e-9)
    assert F.linear_cka(X, X[:, :32], unbiased=True) == pytest.approx(
        F.linear_cka(X[:2000], X[:2000, :32], unbiased=True), abs=0.05
    )


# --- extraction and files --------------------------------------------------------------------


def test_extract_features_shapes_and_mode():
    torch.manual_seed(0)
    x = torch.randn(10, 1, 28, 28)
    lenet = build_model("lenet5", "mnist5k")
    feats = F.extract_features(lenet, [x[:4], (x[4:], torch.zeros(6))])
    assert feats.shape == (10, 84) and feats.dtype == torch.float32
    assert lenet.training  # mode restored
    assert torch.allclose(feats, lenet.features(x), atol=1e-6)
    resnet = build_model("resnet18-basic-residual", "mnist5k", {"width": 8})
    resnet.eval()
    feats = F.extract_features(resnet, [x[:3], x[3:]])
    assert feats.shape == (10, resnet.num_features) and resnet.num_features == 64
    assert not resnet.training
    assert not feats.requires_grad


def test_features_round_trip(tmp_path):
    feats = torch.randn(30, 7)
    idx = F.probe_indices(100, 30)
    path = F.save_features(
        tmp_path / "f" / "run.safetensors", feats, {"run_id": "r", "k": 2}, indices=idx
    )
    assert not list(path.parent.glob("*.tmp"))
    back, meta = F.load_features(path)
    assert torch.equal(back, feats)
    assert meta["run_id"] == "r" and meta["k"] == 2
    assert np.array_equal(meta["indices"].numpy(), idx)
    _, meta2 = F.load_features(F.save_features(tmp_path / "g.safetensors", feats, indices=idx))
    assert meta2["probe_sha256"] == meta["probe_sha256"]
    with pytest.raises(ValueError, match="2-D"):
        F.save_features(tmp_path / "h.safetensors", torch.randn(3, 4, 5))
    # byte-reproducible: the same features and metadata give the same file
    again = F.save_features(
        tmp_path / "again.safetensors", feats, {"k": 2, "run_id": "r"}, indices=idx
    )
    assert again.read_bytes() == path.read_bytes()


def test_truncated_features_file_refused(tmp_path):
    path = F.save_features(tmp_path / "run.safetensors", torch.randn(50, 9), {"run_id": "r"})
    data = path.read_bytes()
    for cut in (len(data) - 10, 20, 3):
        path.write_bytes(data[:cut])
        with pytest.raises(F.FeatureError, match=f"{path}.*unreadable"):
            F.load_features(path)
    other = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    save_file({"features": torch.zeros(2, 2)}, str(other))
    with pytest.raises(F.FeatureError, match="not a paramdyn features file"):
        F.load_features(other)


def test_checkpoint_features_on_a_prepared_dataset(tmp_path, synthetic):
    from paramdyn.checkpoints import save_checkpoint
    from paramdyn.data import DeviceData

    dataset = synthetic
    model = build_model("lenet5", "synthetic")
    ckpt = save_checkpoint(
        tmp_path / "ckpt",
        model,
        epoch=0,
        step=0,
        epoch_end=True,
        run_id="r",
        blocks=model.block_names(),
    )
    idx = F.probe_indices(128, 40, seed=1)
    feats = F.checkpoint_features(
        ckpt, dataset, model_name="lenet5", dataset="synthetic", indices=idx, batch_size=16
    )
    data = DeviceData.load(dataset, "cpu")
    x = next(data.eval_batches("test", 128))[0][torch.from_numpy(idx)]
    model.eval()
    with torch.no_grad():
        assert torch.allclose(feats, model.features(x), atol=1e-6)
    assert feats.shape == (40, 84)
    with pytest.raises(ValueError, match="out of range"):
        list(F.probe_batches(data, [0, 128]))


def test_similarity_figures(tmp_path):
    from paramdyn import plots, tables

    rng = np.random.default_rng(0)
    base = rng.normal(size=(300, 12))
    feats = {
        f"lenet5_mnist_kaiming-normal_sgd_s{s}_{p}": base @ orthogonal(12, s)
        + (1.0 if p == "sign_flip" else 0.2) * rng.normal(size=(300, 12))
        for s in range(2)
        for p in ("identity", "sign_flip")
    }
    runs = sorted(feats)
    pairs = [(a, b) for i, a in enumerate(runs) for b in runs[i + 1 :]]
    df = F.similarity_table(feats, pairs, unbiased=True)
    path = tmp_path / "similarity.parquet"
    tables.write_parquet(df, path)
    for measure in F.MEASURES:
        out = tmp_path / f"{measure}.png"
        plots.cka_heatmap(path, out, measure=measure)
        assert out.stat().st_size > 5000
    plots.cka_heatmap(df, tmp_path / "none.png", measure="nope")  # an explanatory empty figure
    assert (tmp_path / "none.png").exists()
    X = np.hstack([base[:, :6], base[:, :3] + 0.1 * rng.normal(size=(300, 3)), np.zeros((300, 2))])
    plots.correlation_heatmap(X, tmp_path / "within.png", "lenet5 s0")
    plots.correlation_heatmap(X, tmp_path / "between.png", "s0 vs s1", Y=X[:, ::-1] + 0.1)
    assert (tmp_path / "within.png").stat().st_size > 5000
    assert (tmp_path / "between.png").stat().st_size > 5000
    assert not list(tmp_path.glob("*.tmp*"))
