"""Layer-wise CKA: known answers (self-similarity 1, agreement with features.linear_cka and
with an explicit n x n Gram formula in every pair of stored forms, the invariances CKA has
and the one it lacks), streaming equal to the whole matrix, the hooks against the model's
own forward, the stored size per block of a deep net, checkpoints and files."""

import math

import numpy as np
import pytest
import torch

from paramdyn import layer_similarity as L
from paramdyn.features import linear_cka, probe_indices
from paramdyn.models import build_model

torch.set_num_threads(1)


def rand(n, p, seed):
    return np.random.default_rng(seed).normal(size=(n, p))


def orthogonal(p, seed):
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(p, p)))
    return q * np.sign(np.diag(r))


def related(n=40, seed=0):
    """X (n x 10, stored as features), Y (n x 60 > n, stored as a Gram), Z (n x 25)."""
    X = rand(n, 10, seed)
    Y = np.maximum(X @ rand(10, 60, seed + 1), 0.0) + rand(n, 60, seed + 2)
    Z = np.tanh(X[:, :5] @ rand(5, 25, seed + 3)) + 0.5 * rand(n, 25, seed + 4)
    return {"x": X, "y": Y, "z": Z}


def grams_of(acts):
    return {k: L.from_activations(k, v, d) for d, (k, v) in enumerate(acts.items())}


def gram_reference(X, Y, unbiased):
    """CKA written out with the n x n centred Gram matrices (biased) or Song et al.'s eq. 5
    on the Grams of the centred features (unbiased)."""
    n = len(X)
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    K, Lm = Xc @ Xc.T, Yc @ Yc.T

    def hsic(a, b):
        if not unbiased:
            return np.sum(a * b)
        a, b = a - np.diag(np.diag(a)), b - np.diag(np.diag(b))
        one = np.ones(n)
        return (
            np.trace(a @ b)
            + (one @ a @ one) * (one @ b @ one) / ((n - 1) * (n - 2))
            - 2.0 / (n - 2) * (one @ a @ b @ one)
        ) / (n * (n - 3))

    return hsic(K, Lm) / math.sqrt(hsic(K, K) * hsic(Lm, Lm))


# --- CKA from the stored forms ----------------------------------------------------------------


@pytest.mark.parametrize("unbiased", [False, True])
def test_matches_features_linear_cka_in_every_pair_of_forms(unbiased):
    acts = related()
    grams = grams_of(acts)
    assert [g.form for g in grams.values()] == ["features", "gram", "features"]
    for a, A in acts.items():
        for b, B in acts.items():
            ours = L.cka(grams[a], grams[b], unbiased)
            assert ours == pytest.approx(linear_cka(A, B, unbiased), abs=1e-12)
            assert ours == pytest.approx(gram_reference(A, B, unbiased), abs=1e-10)
    # the matrix (which forms the Gram of a features block once for its mixed-form pairs)
    df = L.cka_matrix(grams, grams, unbiased)
    for a, b, v in zip(df.block_a, df.block_b, df.cka, strict=True):
        assert v == pytest.approx(linear_cka(acts[a], acts[b], unbiased), abs=1e-12)
    # the pairs are far from 1 and from each other: the agreement is not a trivial one
    assert L.cka(grams["x"], grams["y"], unbiased) < 0.95
    assert abs(L.cka(grams["x"], grams["z"]) - L.cka(grams["y"], grams["z"])) > 0.02


@pytest.mark.parametrize("unbiased", [False, True])
def test_matrix_of_a_run_with_itself_unit_diagonal_symmetric(unbiased):
    grams = grams_of(related())
    df = L.cka_matrix(grams, grams, unbiased)
    assert len(df) == 9 and (df.note == "").all()
    m = df.pivot(index="depth_a", columns="depth_b", values="cka").to_numpy()
    assert np.array_equal(np.diag(m), np.ones(3))  # exactly: the same block is the same term
    np.testing.assert_allclose(m, m.T, atol=1e-12)
    assert (m[~np.eye(3, dtype=bool)] < 0.999).all()
    assert L.cka(grams["y"], grams["y"], unbiased) == 1.0


@pytest.mark.parametrize("p", [8, 70])  # stored as features, then as a Gram (n = 50)
def test_invariances(p):
    rng = np.random.default_rng(5)
    X, Y = rand(50, p, 1), rand(50, p, 2) + rand(50, p, 1)
    ref = L.from_activations("y", Y)
    base = L.cka(L.from_activations("x", X), ref)
    rotated = 3.7 * X @ orthogonal(p, 9) + 2.0  # isotropic scale, rotation, shift
    assert L.cka(L.from_activations("x", rotated), ref) == pytest.approx(base, abs=1e-12)
    assert L.cka(L.from_activations("x", X), L.from_activations("r", rotated)) == pytest.approx(
        1.0, abs=1e-12
    )
    # a non-isotropic scaling of the units changes CKA (it is not a rotation)
    stretched = X * np.geomspace(0.05, 20.0, p)[rng.permutation(p)]
    assert abs(L.cka(L.from_activations("x", stretched), ref) - base) > 0.05


def test_undefined_blocks_raise_or_record_nan():
    X = rand(20, 5, 0)
    dead = L.from_activations("dead", np.ones((20, 4)) * 3.0)
    ok = L.from_activations("ok", X)
    assert "constant" in dead.note
    with pytest.raises(ValueError, match="block dead: features are constant"):
        L.cka(ok, dead)
    df = L.cka_matrix({"ok": ok}, {"ok": ok, "dead": dead}, errors="nan")
    assert df.cka.iloc[0] == 1.0 and math.isnan(df.cka.iloc[1]) and "constant" in df.note.iloc[1]
    with pytest.raises(ValueError, match="same probe set"):
        L.cka(ok, L.from_activations("short", X[:10]))
    with pytest.raises(ValueError, match="at least 4 probe samples"):
        L.cka(L.from_activations("a", X[:3]), L.from_activations("b", X[:3]), unbiased=True)
    assert "NaN" in L.from_activations("nan", np.full((5, 2), np.nan)).note


# --- hooks and streaming ----------------------------------------------------------------------


def resnet():
    torch.manual_seed(0)
    return build_model("resnet18-basic-residual", "digits", {"width": 8})


def whole_outputs(model, x, reduction):
    """Each block's output on the whole probe set in one pass, reduced here."""
    outs = {}
    hooks = [
        model.get_submodule(b).register_forward_hook(
            lambda _m, _a, o, b=b: outs.__setitem__(b, o.clone())
        )
        for b in model.block_names()
    ]
    model.eval()
    with torch.no_grad():
        logits = model(x)
    for h in hooks:
        h.remove()
    red = {b: (L.REDUCTIONS[reduction](o) if o.ndim == 4 else o) for b, o in outs.items()}
    return red, logits


@pytest.mark.parametrize("reduction", ["mean", "pool4"])
def test_streamed_equals_whole_matrix(reduction):
    model, x = resnet(), torch.randn(60, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    streamed = L.block_grams(
        model, [(x[i : i + 7], None) for i in range(0, 60, 7)], None, reduction
    )
    whole, _ = whole_outputs(model, x, reduction)
    forms = set()
    for b, g in streamed.items():
        ref = L.from_activations(b, whole[b])
        assert (g.form, g.matrix.shape, g.width) == (ref.form, ref.matrix.shape, ref.width)
        np.testing.assert_allclose(
            g.matrix, ref.matrix, rtol=1e-5, atol=1e-5 * np.abs(ref.matrix).max()
        )
        forms.add(g.form)
    assert forms == {"features", "gram"}  # both exercised: layer4's 64 channels > 60 samples
    assert list(streamed) == model.block_names()
    assert [g.depth for g in streamed.values()] == list(range(len(streamed)))


def test_hooks_capture_the_blocks_outputs():
    model = resnet()
    x = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    model.train()
    grams = L.block_grams(model, [x[:20], x[20:]])
    assert model.training  # mode restored
    assert all(not m._forward_hooks for m in model.modules())  # hooks removed
    model.eval()
    with torch.no_grad():
        feats, logits, stem = model.features(x), model(x), model.stem(x).mean(dim=(2, 3))

    def centred(t):
        t = t.double().numpy()
        return t - t.mean(0)

    # a pooled head reads the mean-reduced output of the last stage's last block: 64 units
    # for 32 samples, stored as the centred Gram of model.features(x)
    assert grams["layer4.1"].form == "gram" and grams["layer4.1"].width == 64
    np.testing.assert_allclose(
        grams["layer4.1"].matrix, centred(feats) @ centred(feats).T, atol=1e-5
    )
    np.testing.assert_allclose(grams["fc"].matrix, centred(logits), atol=1e-5)
    np.testing.assert_allclose(grams["stem"].matrix, centred(stem), atol=1e-5)
    assert grams["fc"].width == 10 and grams["stem"].width == 8


def test_input_site_is_the_representation_of_a_convstack():
    torch.manual_seed(0)
    model = build_model("deepnet-residual", "synthetic", {"depth": 3, "width": 6})
    x = torch.randn(24, 1, 12, 12, generator=torch.Generator().manual_seed(3))
    out = L.block_grams(model, [x], ["blocks.0", "blocks.1"])
    inp = L.block_grams(model, [x], ["blocks.1", "fc"], site="input")
    model.eval()
    with torch.no_grad():
        h0 = torch.relu(model.stem(x))
        branch = model.blocks[0](h0)
        h1 = torch.relu(h0 + branch)
        feats = model.features(x)

    def centred(t):
        t = t.double().numpy()
        return t - t.mean(0)

    # the ConvStack block module returns the residual branch only ...
    np.testing.assert_allclose(out["blocks.0"].matrix, centred(branch.mean(dim=(2, 3))), atol=1e-6)
    # ... and the representation after it is the next block's input
    np.testing.assert_allclose(inp["blocks.1"].matrix, centred(h1.mean(dim=(2, 3))), atol=1e-6)
    np.testing.assert_allclose(inp["fc"].matrix, centred(feats), atol=1e-6)
    assert L.cka(out["blocks.1"], inp["blocks.1"]) < 0.99


def test_memory_per_block_is_bounded_by_n_min_n_p():
    torch.manual_seed(0)
    model = build_model("deepnet-residual", "synthetic", {"depth": 20, "width": 8})
    n = 48
    x = torch.randn(n, 1, 12, 12, generator=torch.Generator().manual_seed(4))
    batches = [x[i : i + 16] for i in range(0, n, 16)]
    for reduction, width, form in (("mean", 8, "features"), ("pool4", 128, "gram")):
        grams = L.block_grams(model, batches, reduction=reduction)
        assert len(grams) == 22  # stem, 20 blocks, fc
        for b, g in grams.items():
            p = 4 if b == "fc" else width  # fc: the 4 classes' logits
            expected = (n, p) if b == "fc" else ((n, p) if form == "features" else (n, n))
            assert g.matrix.shape == expected and g.width == p
            assert g.matrix.dtype == np.float64 and g.nbytes == 8 * n * min(n, p)
            assert set(vars(g)) <= {"block", "depth", "form", "matrix", "width", "note"}
        # the whole state is 22 small matrices, not the 48 x 8 x 12 x 12 maps per block
        assert sum(g.nbytes for g in grams.values()) <= 22 * 8 * n * min(n, width)
        # lazy CKA terms are scalars or n-vectors: no per-pair state grows with the width
        L.cka_matrix(grams, grams, unbiased=True)
        for g in grams.values():
            assert g.self_hsic > 0 and g.unbiased_terms["diag"].shape == (n,)


def test_bad_arguments():
    model = resnet()
    x = torch.randn(8, 1, 8, 8)
    with pytest.raises(ValueError, match="not blocks of this model"):
        L.block_grams(model, [x], ["layer9.0"])
    with pytest.raises(ValueError, match="unknown reduction"):
        L.block_grams(model, [x], reduction="flatten")
    with pytest.raises(ValueError, match="unknown site"):
        L.block_grams(model, [x], site="middle")
    with pytest.raises(ValueError, match="no batches"):
        L.block_grams(model, [])
    with pytest.raises(ValueError, match="2-D"):
        L.reduce_output(torch.zeros(3, 4, 5))


# --- over checkpoints -------------------------------------------------------------------------


def test_cka_over_checkpoints_rises_to_one_at_the_reference():
    final = {"a": rand(60, 6, 0), "b": rand(60, 80, 1)}
    by_step = {}
    for step, noise in ((0, 3.0), (10, 1.0), (20, 0.3), (30, 0.0)):
        acts = {k: v + noise * rand(*v.shape, 100 + step) for k, v in final.items()}
        by_step[step] = grams_of(acts)
    df = L.cka_over_checkpoints(by_step)
    assert list(df.columns) == ["block", "depth", "step", "cka", "note"]
    for block in ("a", "b"):
        s = df[df.block == block].sort_values("step").cka.to_numpy()
        assert s[-1] == 1.0 and np.all(np.diff(s) > 0) and s[0] < 0.8
    first = L.cka_over_checkpoints(by_step, reference="first")
    assert (first[first.step == 0].cka == 1.0).all()
    mid = L.cka_over_checkpoints(by_step, reference=20, unbiased=True)
    assert (mid[mid.step == 20].cka == 1.0).all()
    with pytest.raises(ValueError, match="not among the checkpoints"):
        L.cka_over_checkpoints(by_step, reference=5)
    with pytest.raises(ValueError, match="unknown reference"):
        L.cka_over_checkpoints(by_step, reference="middle")
    del by_step[10]["b"]
    with pytest.raises(ValueError, match="same blocks"):
        L.cka_over_checkpoints(by_step)


# --- files and checkpoints --------------------------------------------------------------------


def test_save_load_round_trip_reproducible(tmp_path):
    grams = grams_of(related())
    idx = np.arange(40) * 2
    a = L.save_grams(tmp_path / "a.safetensors", grams, {"run_id": "r1", "step": 3}, indices=idx)
    b = L.save_grams(tmp_path / "b.safetensors", grams, {"run_id": "r1", "step": 3}, indices=idx)
    assert a.read_bytes() == b.read_bytes()
    loaded, meta = L.load_grams(a)
    assert meta["run_id"] == "r1" and meta["step"] == 3 and len(meta["probe_sha256"]) == 64
    assert np.array_equal(meta["indices"].numpy(), idx)
    for k, g in grams.items():
        h = loaded[k]
        assert (h.block, h.depth, h.form, h.width, h.note) == (
            g.block,
            g.depth,
            g.form,
            g.width,
            g.note,
        )
        assert np.array_equal(h.matrix, g.matrix)
    pd_a, pd_b = L.cka_matrix(grams, grams, True), L.cka_matrix(loaded, loaded, True)
    assert pd_a.equals(pd_b)
    a.write_bytes(a.read_bytes()[:100])
    with pytest.raises(L.GramsError, match="unreadable Grams file"):
        L.load_grams(a)
    with pytest.raises(ValueError, match="probe indices"):
        L.save_grams(tmp_path / "c.safetensors", grams, indices=idx[:5])


def test_checkpoint_grams_on_a_prepared_dataset(tmp_path, synthetic):
    from paramdyn.checkpoints import save_checkpoint
    from paramdyn.data import DeviceData
    from paramdyn.features import probe_batches

    torch.manual_seed(0)
    model = build_model("lenet5", "synthetic")
    ckpt = save_checkpoint(
        tmp_path / "ckpt", model, epoch=0, step=0, epoch_end=True, run_id="r",
        blocks=model.block_names(),
    )  # fmt: skip
    idx = probe_indices(128, 40, seed=1)
    grams = L.checkpoint_grams(
        ckpt, synthetic, model_name="lenet5", dataset="synthetic", indices=idx, batch_size=16
    )
    direct = L.block_grams(model, probe_batches(DeviceData.load(synthetic, "cpu"), idx, 40))
    assert list(grams) == ["conv1", "conv2", "fc1", "fc2", "fc3"]
    for b, g in grams.items():
        np.testing.assert_allclose(g.matrix, direct[b].matrix, atol=1e-5)
    assert grams["fc2"].form == "gram" and grams["fc2"].width == 84  # 84 units > 40 samples
