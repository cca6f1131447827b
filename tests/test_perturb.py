"""Perturbations: exactly what each one changes (and what it leaves alone), seeding, option
validation, and the norms that compare a retrained model with the original."""

import math
import subprocess
import sys

import pytest
import torch

from paramdyn import perturb as P
from paramdyn.checkpoints import save_checkpoint
from paramdyn.inits import initialise
from paramdyn.models import build_model

RESNET = "resnet18-basic-residual"
SETTINGS = {"width": 4}


def trained(name=RESNET, dataset="mnist5k", settings=SETTINGS, seed=0):
    """A model whose every tensor looks trained: weights moved away from the init, BN
    affine parameters away from 1 / 0, running statistics set (variances positive)."""
    model = build_model(name, dataset, settings)
    initialise(model, "kaiming-normal", seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for k, t in model.state_dict().items():
            if k.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            elif k.endswith("num_batches_tracked"):
                t.fill_(123)
            else:
                t.add_(0.1 * torch.randn(t.shape, generator=gen))
    params = [k for k, _ in model.named_parameters()]
    return {k: v.clone() for k, v in model.state_dict().items()}, params


def buffers(state, params):
    return [k for k in state if k not in params]


def apply(state, params, name, options=None, **kw):
    kw.setdefault("seed", 0)
    return P.apply_perturbation(state, name, options, parameter_keys=params, **kw)


# --- sign flip -------------------------------------------------------------------------------


def test_sign_flip_negates_parameters_only():
    state, params = trained()
    before = {k: v.clone() for k, v in state.items()}
    out = apply(state, params, "sign_flip")
    assert set(out) == set(state)
    for k in params:
        assert torch.equal(out[k], -state[k])
    bufs = buffers(state, params)
    assert any(k.endswith("running_var") for k in bufs)
    for k in bufs:
        assert torch.equal(out[k], state[k])  # running_mean, running_var, the counter
        assert out[k] is not state[k]
    for k in state:  # the input is never modified
        assert torch.equal(state[k], before[k])


def test_sign_flip_with_buffers_never_negates_a_variance():
    state, params = trained()
    out = apply(state, params, "sign_flip", {"include_buffers": True})
    for k in buffers(state, params):
        if k.endswith("running_mean"):
            assert torch.equal(out[k], -state[k])
        else:
            assert torch.equal(out[k], state[k])
        if k.endswith("running_var"):
            assert (out[k] > 0).all()
    for k in params:
        assert torch.equal(out[k], -state[k])


def test_sign_flip_then_no_retraining_is_twice_the_norm():
    state, params = trained()
    start = apply(state, params, "sign_flip")
    s = P.perturbation_summary(state, start, start, params)  # zero epochs of retraining
    norm = math.sqrt(sum(float(state[k].double().square().sum()) for k in params))
    assert s["norm_theta1"] == pytest.approx(norm, rel=1e-14)
    assert s["dist_theta1_theta2"] == 2.0 * s["norm_theta1"]  # exact in float64
    assert s["dist_start_theta1"] == 2.0 * s["norm_theta1"]
    assert s["norm_theta2"] == s["norm_start"] == s["norm_theta1"]
    assert s["rel_dist_theta1_theta2"] == 2.0
    assert s["cosine_theta1_theta2"] == pytest.approx(-1.0, abs=1e-14)
    assert s["dist_start_theta2"] == 0.0
    assert s["numel"] == sum(state[k].numel() for k in params)


# --- offset and gaussian ---------------------------------------------------------------------


def test_offset_adds_epsilon_to_every_parameter_entry():
    state, params = trained()
    out = apply(state, params, "offset")  # default: the seed study's 1e-6
    numel = 0
    for k in params:
        assert torch.equal(out[k], state[k] + 1e-6)  # the float32 addition, entry by entry
        delta = out[k].double() - state[k].double()
        ulp = torch.finfo(torch.float32).eps * state[k].double().abs().clamp(min=1e-6)
        assert ((delta - 1e-6).abs() <= ulp).all()  # ε up to the entry's rounding
        numel += state[k].numel()
    for k in buffers(state, params):
        assert torch.equal(out[k], state[k])
    s = P.perturbation_summary(state, out, out, params)
    assert s["dist_start_theta1"] == pytest.approx(1e-6 * math.sqrt(numel), rel=0.02)
    out = apply(state, params, "offset", {"epsilon": -0.25})
    assert all(torch.equal(out[k], state[k] - 0.25) for k in params)


def test_gaussian_is_seeded_and_scaled():
    state, params = trained(name="lenet5", settings=None)
    a = apply(state, params, "gaussian", {"scale": 0.05}, seed=1)
    b = apply(dict(reversed(list(state.items()))), params, "gaussian", {"scale": 0.05}, seed=1)
    c = apply(state, params, "gaussian", {"scale": 0.05}, seed=2)
    assert all(torch.equal(a[k], b[k]) for k in state)  # the seed decides, not dict order
    assert not any(torch.equal(a[k], c[k]) for k in params)
    noise = torch.cat([(a[k].double() - state[k].double()).flatten() for k in params])
    assert noise.std().item() == pytest.approx(0.05, rel=0.02)
    assert abs(noise.mean().item()) < 0.002


def test_gaussian_relative_scale_follows_each_tensor():
    state, params = trained(name="lenet5", settings=None)
    state["fc1.weight"] *= 100.0
    state["fc3.bias"].zero_()
    out = apply(state, params, "gaussian", {"scale": 0.1, "relative": True}, seed=0)
    for k in ("fc1.weight", "conv2.weight", "fc2.weight"):
        rms = state[k].double().square().mean().sqrt()
        noise = (out[k].double() - state[k].double()).square().mean().sqrt()
        assert (noise / rms).item() == pytest.approx(0.1, rel=0.05)
    assert torch.equal(out["fc3.bias"], state["fc3.bias"])  # zeros stay zeros


def test_gaussian_leaves_buffers_alone():
    state, params = trained()
    out = apply(state, params, "gaussian", {"scale": 1.0}, seed=0)
    for k in buffers(state, params):
        assert torch.equal(out[k], state[k])


# --- reinit ----------------------------------------------------------------------------------


def test_reinit_changes_exactly_the_chosen_blocks():
    state, params = trained()
    blocks = ["layer4.1", "fc"]
    ctx = {"model_name": RESNET, "dataset": "mnist5k", "model_settings": SETTINGS}
    out = apply(
        state, params, "reinit", {"blocks": blocks, "init": "kaiming-uniform"}, seed=7, **ctx
    )
    chosen = [k for k in params if k.startswith(("layer4.1.", "fc."))]
    assert chosen and any(k.startswith("layer4.1.bn") for k in chosen)
    changed = {k for k in state if not torch.equal(out[k], state[k])}
    assert changed == set(chosen)
    fresh = initialise(build_model(RESNET, "mnist5k", SETTINGS), "kaiming-uniform", 7)
    for k in chosen:
        assert torch.equal(out[k], fresh.state_dict()[k])
    # the run's own seed and init rewind the block to its exact initial weights
    rewound = apply(
        state, params, "reinit", {"blocks": ["layer1.0"]}, seed=0, init="kaiming-normal", **ctx
    )
    init = initialise(build_model(RESNET, "mnist5k", SETTINGS), "kaiming-normal", 0).state_dict()
    for k in params:
        expected = init[k] if k.startswith("layer1.0.") else state[k]
        assert torch.equal(rewound[k], expected)
    # with buffers: the blocks' BatchNorm statistics are reset too, nothing else
    out = apply(
        state,
        params,
        "reinit",
        {"blocks": ["layer4.1"], "include_buffers": True},
        seed=7,
        init="default",
        **ctx,
    )
    changed = {k for k in state if not torch.equal(out[k], state[k])}
    assert changed == {k for k in state if k.startswith("layer4.1.")}
    assert torch.equal(out["layer4.1.bn1.running_var"], torch.ones(4 * 8))
    assert int(out["layer4.1.bn1.num_batches_tracked"]) == 0


def test_reinit_block_prefix_is_exact():
    state, params = trained(settings={"width": 2}, name="resnet68-basic-plain")
    ctx = {
        "model_name": "resnet68-basic-plain",
        "dataset": "mnist5k",
        "model_settings": {"width": 2},
        "init": "default",
    }
    out = apply(state, params, "reinit", {"blocks": ["layer3.1"]}, seed=3, **ctx)
    changed = {
        k.split(".")[0] + "." + k.split(".")[1] for k in state if not torch.equal(out[k], state[k])
    }
    assert changed == {"layer3.1"}  # not layer3.10 ... layer3.19


def test_reinit_errors_name_the_problem():
    state, params = trained()
    ctx = {"model_name": RESNET, "dataset": "mnist5k", "model_settings": SETTINGS}
    with pytest.raises(ValueError, match="'reinit': unknown block.*'layer5.0'.*valid: stem, "):
        apply(state, params, "reinit", {"blocks": ["layer5.0"]}, init="default", **ctx)
    with pytest.raises(ValueError, match="'reinit': needs model_name and dataset"):
        apply(state, params, "reinit", {"blocks": ["fc"]}, init="default")
    with pytest.raises(ValueError, match="'reinit': no init"):
        apply(state, params, "reinit", {"blocks": ["fc"]}, **ctx)
    ctx["model_settings"] = {"width": 8}
    with pytest.raises(ValueError, match="does not match the state_dict"):
        apply(state, params, "reinit", {"blocks": ["fc"]}, init="default", **ctx)


# --- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("signflip", {}, "unknown perturbation 'signflip'; valid: gaussian, identity, offset"),
        (
            "gaussian",
            {"sigma": 0.1},
            "perturbation 'gaussian': unknown option 'sigma'; valid: scale, relative",
        ),
        ("gaussian", {"scale": -1}, "'gaussian': option 'scale' must be a positive number"),
        ("gaussian", {"scale": 0.1, "relative": "yes"}, "option 'relative' must be true or false"),
        ("offset", {"epsilon": float("nan")}, "'offset': option 'epsilon' must be a finite"),
        ("offset", {"epsilon": True}, "option 'epsilon' must be a finite number"),
        ("sign_flip", {"include_buffers": 1}, "'sign_flip': option 'include_buffers' must be"),
        ("identity", {"scale": 1}, "'identity': unknown option 'scale'; valid: none"),
        ("reinit", {}, "'reinit': option 'blocks' is required"),
        ("reinit", {"blocks": "fc"}, "option 'blocks' must be a non-empty list"),
        ("reinit", {"blocks": []}, "option 'blocks' must be a non-empty list"),
        ("reinit", {"blocks": ["fc", "fc"]}, "names block\\(s\\) twice: fc"),
        ("reinit", {"blocks": ["fc"], "init": "he"}, "option 'init': unknown init 'he'; valid:"),
        ("gaussian", [("scale", 1)], "options must be a mapping"),
    ],
)
def test_bad_perturbations_are_named(name, options, message):
    with pytest.raises(ValueError, match=message):
        P.validate_perturbation(name, options)
    state, params = trained(name="lenet5", settings=None)
    with pytest.raises(ValueError, match=message):
        apply(state, params, name, options)


def test_validation_fills_defaults_and_needs_no_torch():
    assert P.validate_perturbation("gaussian", None) == {"scale": 0.01, "relative": False}
    assert P.validate_perturbation("offset", {}) == {"epsilon": 1e-6}
    assert P.validate_perturbation("reinit", {"blocks": ["fc"]}, block_names=["stem", "fc"]) == {
        "blocks": ["fc"],
        "init": None,
        "include_buffers": False,
    }
    assert set(P.PERTURBATIONS) == set(P.PERTURBATION_OPTIONS)
    code = (
        "import sys; from paramdyn.perturb import validate_perturbation as v; "
        "v('gaussian', {'scale': 0.1}); v('reinit', {'blocks': ['fc']}); "
        "assert 'torch' not in sys.modules and 'numpy' not in sys.modules, 'heavy import'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_identity_is_a_copy():
    state, params = trained(name="lenet5", settings=None)
    out = apply(state, params, "identity")
    assert all(torch.equal(out[k], state[k]) and out[k] is not state[k] for k in state)


def test_parameter_keys_must_exist():
    state, params = trained(name="lenet5", settings=None)
    with pytest.raises(ValueError, match="'offset': parameter key\\(s\\) not in the state_dict: x"):
        apply(state, [*params, "x"], "offset")


# --- summary and checkpoints -----------------------------------------------------------------


def test_perturbation_summary_by_hand():
    a = {"w": torch.tensor([3.0, 0.0]), "b": torch.tensor([4.0])}
    s = {"w": torch.tensor([0.0, 0.0]), "b": torch.tensor([0.0])}
    b = {"w": torch.tensor([0.0, 2.0]), "b": torch.tensor([0.0]), "buf": torch.tensor([9.0])}
    out = P.perturbation_summary(a, s, b, ["w", "b"])
    assert out["norm_theta1"] == 5.0 and out["norm_theta2"] == 2.0
    assert out["dist_theta1_theta2"] == pytest.approx(math.sqrt(29.0))
    assert out["rel_dist_theta1_theta2"] == pytest.approx(math.sqrt(29.0) / 5.0)
    assert out["cosine_theta1_theta2"] == 0.0
    assert out["norm_start"] == 0.0 and out["dist_start_theta1"] == 5.0
    assert out["dist_start_theta2"] == 2.0 and out["numel"] == 3
    with pytest.raises(ValueError, match="retrained lacks w"):
        P.perturbation_summary(a, s, {"b": b["b"]}, ["w", "b"])
    with pytest.raises(ValueError, match="w has shapes"):
        P.perturbation_summary(a, s, {"w": torch.zeros(3), "b": b["b"]}, ["w", "b"])


def test_perturb_checkpoint(tmp_path):
    model = build_model(RESNET, "mnist5k", SETTINGS)
    initialise(model, "kaiming-normal", 0)
    path = save_checkpoint(
        tmp_path, model, epoch=3, step=30, epoch_end=True, run_id="r", blocks=model.block_names()
    )
    state, params = P.perturb_checkpoint(path, "sign_flip", seed=0)
    assert params == [k for k, _ in model.named_parameters()]
    sd = model.state_dict()
    for k in sd:
        assert torch.equal(state[k], -sd[k] if k in params else sd[k])
    fresh = build_model(RESNET, "mnist5k", SETTINGS)
    fresh.load_state_dict(state)  # loads back into the model to retrain


def test_perturbation_bars(tmp_path):
    import pandas as pd

    from paramdyn import plots

    rows = []
    for seed in range(3):
        for name, rel, after in (
            ("identity", 0.2, 0.98),
            ("offset", 0.21, 0.98),
            ("sign_flip", 1.9, 0.11),
        ):
            for model in ("lenet5", "resnet18-basic-residual"):
                rows.append(
                    {
                        "perturbation": name,
                        "model": model,
                        "dataset": "mnist",
                        "seed": seed,
                        "dist_theta1_theta2": rel * 10 + seed,
                        "norm_theta1": 10.0,
                        "accuracy_before": 0.98,
                        "accuracy_after": after,
                    }
                )
    out = tmp_path / "perturbations.png"
    plots.perturbation_bars(pd.DataFrame(rows), out)
    assert out.stat().st_size > 10000
    plots.perturbation_bars(pd.DataFrame(rows[:0]), tmp_path / "empty.png")
    assert (tmp_path / "empty.png").exists()
