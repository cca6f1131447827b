"""Config validation: each mistake stops with a message naming the key and the fix."""

import copy

import pytest
import yaml

from paramdyn.config import DEFAULT_SCHEMA, ConfigError, RunSpec, load_studies

GOOD = {
    "studies": {
        "s": {
            "models": ["lenet5", {"name": "resnet18-basic-plain-even", "width": 8}],
            "datasets": ["synthetic"],
            "inits": ["default", "kaiming-normal"],
            "optimizers": ["adam", {"name": "sgd", "lr": 0.1, "momentum": 0.5}],
            "seeds": [0, 1],
            "epochs": 2,
            "batch_size": 64,
        }
    }
}


def _load(cfg):
    return load_studies(copy.deepcopy(cfg), DEFAULT_SCHEMA)


def _with(path, value):
    cfg = copy.deepcopy(GOOD)
    node = cfg
    *parents, last = path.split("/")
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node[p]
    if value is DELETE:
        del node[last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return cfg


DELETE = object()


def test_grid_expands_with_readable_ids():
    study = _load(GOOD)["s"]
    assert len(study.runs) == 2 * 1 * 2 * 2 * 2
    assert "resnet18-basic-plain-even_synthetic_kaiming-normal_sgd_s1" in study.runs
    spec = study.runs["resnet18-basic-plain-even_synthetic_kaiming-normal_sgd_s1"]
    assert spec.model_settings == {"width": 8}
    assert spec.optimizer_settings == {
        "lr": 0.1,
        "momentum": 0.5,
        "weight_decay": 0.0,
        "nesterov": False,
    }
    assert spec.shortcut == "plain"
    assert spec.checkpoint_every_epochs == 1  # schema default
    assert spec.measures == {"minkowski_p": [], "atol": 1e-8, "rtol": 1e-5}
    assert RunSpec.from_dict(spec.to_dict()) == spec


def test_precedence_study_optimizer_model():
    cfg = _with("studies/s/lr", 0.5)
    cfg["studies"]["s"]["models"][0] = {"name": "lenet5", "lr": 0.002}
    runs = _load(cfg)["s"].runs
    assert runs["lenet5_synthetic_default_adam_s0"].optimizer_settings["lr"] == 0.002
    assert (
        runs["resnet18-basic-plain-even_synthetic_default_adam_s0"].optimizer_settings["lr"] == 0.5
    )
    assert (
        runs["resnet18-basic-plain-even_synthetic_default_sgd_s0"].optimizer_settings["lr"] == 0.1
    )


def test_run_ids_are_stable():
    a = _load(GOOD)["s"].runs
    b = _load(GOOD)["s"].runs
    assert list(a) == list(b) and all(a[k].to_json() == b[k].to_json() for k in a)


BAD = [
    # (path, value, words the message must contain)
    ("studies/s/epoch", 3, ["studies/s", "'epoch' was unexpected", "epochs"]),
    (
        "studies/s/models/0",
        "resnet19",
        ["studies/s/models/0", "unknown model 'resnet19'", "lenet5"],
    ),
    ("studies/s/datasets/0", "cifar11", ["unknown dataset 'cifar11'", "cifar10", "mnist5k"]),
    ("studies/s/inits/0", "he", ["unknown init 'he'", "kaiming-normal"]),
    ("studies/s/optimizers/0", "adagrad", ["unknown optimizer 'adagrad'", "adamw", "sgd"]),
    ("studies/s/schedule", "linear", ["unknown schedule 'linear'", "cosine"]),
    ("studies/s/epochs", "two", ["studies/s/epochs", "'two' is not of type 'integer'"]),
    ("studies/s/epochs", 0, ["studies/s/epochs", "less than the minimum of 1"]),
    ("studies/s/batch_size", -5, ["studies/s/batch_size", "minimum"]),
    ("studies/s/batch_size", 100000, ["batch_size", "larger than the 512 training images"]),
    ("studies/s/seeds", [0, 0], ["studies/s/seeds", "duplicated seeds"]),
    ("studies/s/seeds", [], ["studies/s/seeds", "should be non-empty"]),
    ("studies/s/models", [], ["studies/s/models", "should be non-empty"]),
    ("studies/s/seeds", DELETE, ["'seeds' is a required property"]),
    ("studies/s/checkpoint", {"every_epochs": 5}, ["every_epochs", "never fires in 2 epochs"]),
    ("studies/s/checkpoint", {"every_steps": 10**6}, ["every_steps", "never fires"]),
    ("studies/s/checkpoint", {}, ["studies/s/checkpoint", "every_epochs and/or every_steps"]),
    ("studies/s/checkpoint", {"every_epoch": 1}, ["'every_epoch' was unexpected", "every_epochs"]),
    (
        "studies/s/optimizers/0",
        {"name": "adam", "momentum": 0.9},
        ["optimizers/0/momentum", "optimizer 'adam' has no setting 'momentum'", "betas"],
    ),
    (
        "studies/s/optimizers/1",
        {"name": "sgd", "lr": -1},
        ["studies/s/optimizers/1/lr", "less than or equal to the minimum of 0"],
    ),
    (
        "studies/s/models/0",
        {"name": "lenet5", "width": 8},
        ["models/0/width", "model 'lenet5' has no setting 'width'"],
    ),
    ("studies/s/models/0", {"name": "lenet5", "layers": 8}, ["'layers' was unexpected", "width"]),
    (
        "studies/s/models/0",
        "resnet18-basic-plain-even",
        ["studies/s/models", "listed more than once", "label"],
    ),
    ("studies/s/measures", {"atol": -1}, ["studies/s/measures/atol", "minimum"]),
    ("studies/s/measures", {"tolerance": 0.1}, ["'tolerance' was unexpected", "atol", "rtol"]),
    ("studies/s/figures", {"metric": "l3"}, ["studies/s/figures/metric", "'l3' is not one of"]),
    ("run", ["t"], ["config key 'run'", "no study named 't'"]),
    (
        "studies/s/perturbations",
        [{"name": "gaussian", "sigma": 1}],
        ["studies/s/perturbations/0", "perturbation 'gaussian': unknown option 'sigma'", "scale"],
    ),
    (
        "studies/s/perturbations",
        [{"name": "rotate"}],
        ["studies/s/perturbations/0", "'rotate'", "sign_flip"],
    ),
    (
        "studies/s/normalize",
        {"synthetic": {"mean": [0.5, 0.5], "std": [0.5, 0.5]}},
        ["studies/s/normalize/synthetic", "give 1 value(s)"],
    ),
    ("studies/s/variants", {"demo": {"epoch": 1}}, ["variant", "'epoch' was unexpected"]),
    ("device", "tpu", ["config key 'device'", "'tpu' is not one of"]),
    ("studiez", {}, ["'studiez' was unexpected"]),
]


@pytest.mark.parametrize(
    ("path", "value", "words"), BAD, ids=[f"{b[0]}={b[1]!r}"[:60] for b in BAD]
)
def test_bad_config_is_named(path, value, words):
    with pytest.raises(ConfigError) as e:
        _load(_with(path, value))
    msg = str(e.value)
    for w in words:
        assert w in msg, f"{w!r} not in:\n{msg}"


def test_all_problems_reported_together():
    cfg = _with("studies/s/models/0", "resnet19")
    cfg["studies"]["s"]["inits"][0] = "he"
    with pytest.raises(ConfigError, match="2 problems") as e:
        _load(cfg)
    assert "resnet19" in str(e.value) and "'he'" in str(e.value)


def test_empty_config():
    with pytest.raises(ConfigError, match="'studies' mapping"):
        load_studies({}, DEFAULT_SCHEMA)


def test_shipped_config_is_valid():
    with open(DEFAULT_SCHEMA.parents[1] / "config.yaml") as f:
        cfg = yaml.safe_load(f)
    cfg["run"] = list(cfg["studies"])
    studies = load_studies(cfg, DEFAULT_SCHEMA)
    assert len(studies["demo"].runs) == 6
    assert len(studies["depth"].runs) == 12 * 4 * 3


def test_perturbations_branch_from_the_runs_their_where_selects():
    with open(DEFAULT_SCHEMA.parents[1] / "config.yaml") as f:
        cfg = yaml.safe_load(f)
    cfg["run"], cfg["variant"] = ["dynamics"], "demo"
    runs = load_studies(cfg, DEFAULT_SCHEMA)["dynamics-demo"].runs
    branches = [r for r in runs.values() if r.perturbation]
    # 2 models x 2 optimizers x 3 seeds; the three perturbations branch from the SGD runs
    assert len(runs) - len(branches) == 12
    # the study's three from the 6 SGD runs; the sweep (2 sizes) and the instability
    # branches (2 steps x 2 data orders) from the 3 SGD LeNets
    assert len(branches) == 3 * 6 + 2 * 3 + 4 * 3
    assert {r.optimizer for r in branches} == {"sgd"}
    assert {r.model for r in branches if r.perturbation in ("offset-sweep", "instability")} == {
        "lenet5"
    }
    assert all("where" not in r.perturbation_options for r in branches)
    # the default study: the three branch from every run
    cfg["variant"] = "default"
    runs = load_studies(cfg, DEFAULT_SCHEMA)["dynamics"].runs
    three = [r for r in runs.values() if r.perturbation in ("identity", "sign-flip", "offset")]
    assert len(three) == 3 * sum(not r.perturbation for r in runs.values())


@pytest.mark.parametrize(
    "where, message",
    [
        ({"optimiser": "sgd"}, "unknown field 'optimiser'; filter on model, model_name"),
        ({"optimizer": "sgdd"}, "matches no run of the study"),
    ],
)
def test_a_bad_perturbation_where_is_refused(where, message):
    cfg = _with("studies/s/perturbations", [{"name": "identity", "where": where}])
    with pytest.raises(ConfigError) as e:
        _load(cfg)
    assert "config key 'studies/s/perturbations/0/where'" in str(e.value)
    assert message in str(e.value)


def test_offline_with_a_missing_preplaced_dataset(tmp_path):
    cfg = _with("studies/s/datasets", ["cifar10"])
    cfg["download"] = False
    cfg["data_dir"] = str(tmp_path)
    with pytest.raises(ConfigError) as e:
        _load(cfg)
    msg = str(e.value)
    assert "config key 'download'" in msg and "'cifar10'" in msg
    assert str(tmp_path / "cifar-10-batches-py" / "data_batch_1") in msg
    assert "set download: true" in msg
    for rel in (
        "data_batch_1",
        "data_batch_2",
        "data_batch_3",
        "data_batch_4",
        "data_batch_5",
        "test_batch",
    ):
        (tmp_path / "cifar-10-batches-py").mkdir(exist_ok=True)
        (tmp_path / "cifar-10-batches-py" / rel).write_bytes(b"x")
    assert len(_load(cfg)["s"].runs) == 16  # all there now: valid


def test_model_setting_the_model_lacks():
    with pytest.raises(ConfigError, match="model 'lenet5' has no setting 'depth'"):
        _load(_with("studies/s/models/0", {"name": "lenet5", "depth": 8}))


def test_variant_overrides_and_renames():
    cfg = _with("studies/s/variants", {"quick": {"epochs": 1, "seeds": [5]}})
    cfg["variant"] = "quick"
    studies = _load(cfg)
    assert list(studies) == ["s-quick"]
    run = next(iter(studies["s-quick"].runs.values()))
    assert (run.epochs, run.seed, run.study) == (1, 5, "s-quick")


def _with_variants():
    """GOOD with a second study ``t`` that defines the variants quick and wide (``s`` none)."""
    cfg = copy.deepcopy(GOOD)
    cfg["studies"]["t"] = copy.deepcopy(cfg["studies"]["s"])
    cfg["studies"]["t"]["variants"] = {"quick": {"epochs": 1}, "wide": {"seeds": [0, 1, 2]}}
    return cfg


def test_unknown_variant_is_refused_naming_the_variants():
    cfg = _with_variants() | {"variant": "quik"}
    with pytest.raises(ConfigError) as e:
        _load(cfg)
    msg = str(e.value)
    assert "config key 'variant'" in msg and "'quik'" in msg
    assert "Variants in this config: default, quick, wide" in msg
    assert "the config has 1 problem:" in msg  # the default recipes are not checked instead


def test_variant_of_an_unselected_study_only_is_refused():
    cfg = _with_variants() | {"variant": "quick", "run": ["s"]}
    with pytest.raises(ConfigError) as e:
        _load(cfg)
    msg = str(e.value)
    assert "no study selected by 'run' (s) defines a variant 'quick'" in msg
    assert "'quick' is a variant of t: add it to 'run'" in msg


def test_a_selected_study_without_the_variant_runs_as_written():
    # as `make demo`: study demo has no variants, the others run their demo variant
    studies = _load(_with_variants() | {"variant": "quick", "run": ["s", "t"]})
    assert list(studies) == ["s", "t-quick"]
    assert studies["s"].runs == _load(GOOD)["s"].runs
    assert {r.epochs for r in studies["t-quick"].runs.values()} == {1}


def test_unknown_variant_stops_the_snakemake_cli(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(_with_variants()))
    snakemake = str(Path(sys.executable).parent / "snakemake")
    cmd = [snakemake, "-s", str(repo / "Snakefile"), "--directory", str(tmp_path), "-n"]
    cmd += ["--configfile", str(tmp_path / "config.yaml"), "--config", "variant=wdie"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert "config key 'variant'" in out and "'wdie'" in out, out[-3000:]
    assert "Variants in this config: default, quick, wide" in out
