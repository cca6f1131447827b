"""Data seeds, branches from a chosen checkpoint with size and data-order sweeps, and the
interpolation pairs of a study (config.py, runs.FinishedRun.checkpoint_at, jobs.train)."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from paramdyn import jobs
from paramdyn.checkpoints import read_checkpoint
from paramdyn.config import DEFAULT_SCHEMA, ConfigError, RunSpec, load_studies
from paramdyn.runs import FinishedRun
from paramdyn.train import train_run

torch.set_num_threads(1)

BASELINE = Path(__file__).parent / "fixtures" / "branches_baseline.json"

# synthetic: 512 training images, so 8 steps per epoch at batch 64; checkpoints 0, 4, 8
STUDY = {
    "models": ["lenet5"],
    "datasets": ["synthetic"],
    "inits": ["default"],
    "optimizers": [{"name": "sgd", "lr": 0.05}],
    "seeds": [0],
    "epochs": 1,
    "batch_size": 64,
    "checkpoint": {"every_epochs": 1, "every_steps": 4},
}
RUN = "lenet5_synthetic_default_sgd"  # the run ids' prefix


def _study(**changes):
    study = copy.deepcopy({**STUDY, **changes})
    return load_studies({"studies": {"b": study}}, DEFAULT_SCHEMA)["b"]


def _refused(**changes) -> str:
    with pytest.raises(ConfigError) as err:
        _study(**changes)
    return str(err.value)


def _digest(x) -> str:
    return hashlib.sha256(json.dumps(x).encode()).hexdigest()


# --- the runs of config.yaml do not change --------------------------------------------------


def test_the_shipped_studies_keep_their_run_ids_and_keys():
    """Every study and variant of config.yaml (as recorded, before data_seeds and branch
    sweeps existed) has the same runs, ids and hparams JSON: nothing retrains."""
    baseline = json.loads(BASELINE.read_text())
    config = yaml.safe_load(baseline["config_yaml"])
    for variant, studies in baseline["variants"].items():
        cfg = copy.deepcopy(config)
        cfg.update(variant=variant, run=list(cfg["studies"]), download=True)
        resolved = load_studies(cfg, DEFAULT_SCHEMA)
        assert set(resolved) == set(studies), variant
        for name, expected in studies.items():
            runs = resolved[name].runs
            assert len(runs) == expected["runs"], (variant, name)
            assert _digest(list(runs)) == expected["run_ids"], (variant, name)
            specs = [[rid, spec.to_json()] for rid, spec in runs.items()]
            assert _digest(specs) == expected["specs"], (variant, name)


# --- data seeds ------------------------------------------------------------------------------


def test_data_seeds_are_a_grid_axis_with_readable_ids():
    runs = _study(seeds=[0, 1], data_seeds=[0, 5]).runs
    assert list(runs) == [f"{RUN}_s0", f"{RUN}_s0-d5", f"{RUN}_s1-d0", f"{RUN}_s1-d5"]
    assert [(r.seed, r.data_seed, r.order_seed) for r in runs.values()] == [
        (0, None, 0),
        (0, 5, 5),
        (1, 0, 0),
        (1, 5, 5),
    ]
    # a data seed equal to the seed is the plain run: same id, same key (no data_seed)
    plain = _study().runs[f"{RUN}_s0"]
    assert runs[f"{RUN}_s0"].to_json() == plain.to_json()
    assert "data_seed" not in plain.to_dict() and "branch_step" not in plain.to_dict()
    assert json.loads(runs[f"{RUN}_s0-d5"].to_json())["data_seed"] == 5
    assert RunSpec.from_dict(runs[f"{RUN}_s1-d0"].to_dict()) == runs[f"{RUN}_s1-d0"]
    assert RunSpec(**{**plain.to_dict(), "data_seed": 0}).data_seed is None


def test_duplicated_data_seeds_are_refused():
    message = _refused(data_seeds=[1, 1])
    assert "studies/b/data_seeds" in message and "duplicated seeds" in message


def test_data_seeds_in_a_variant():
    study = {**STUDY, "variants": {"orders": {"data_seeds": [0, 3]}}}
    config = {"variant": "orders", "studies": {"b": copy.deepcopy(study)}}
    runs = load_studies(config, DEFAULT_SCHEMA)["b-orders"].runs
    assert [r.removeprefix(RUN) for r in runs] == ["_s0", "_s0-d3"]


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(path).tensors


def _same_tensors(a: Path, b: Path) -> bool:
    ta, tb = _tensors(a), _tensors(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def _checkpoints(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run_dir / "checkpoints").glob("step*"))}


def test_a_data_seed_changes_the_data_order_not_the_init(synthetic, tmp_path):
    plain = _study().runs[f"{RUN}_s0"]
    same = _study(data_seeds=[0]).runs[f"{RUN}_s0"]
    other = _study(data_seeds=[1]).runs[f"{RUN}_s0-d1"]
    for name, spec in (("plain", plain), ("same", same), ("other", other)):
        train_run(spec, synthetic, tmp_path / name, device="cpu")
    # data_seeds: [seed] is the run without data_seeds, byte for byte
    assert _checkpoints(tmp_path / "same") == _checkpoints(tmp_path / "plain")
    a, b = FinishedRun.read(tmp_path / "plain"), FinishedRun.read(tmp_path / "other")
    assert _same_tensors(a.first_checkpoint, b.first_checkpoint)  # one init
    assert not _same_tensors(a.checkpoint_at(4), b.checkpoint_at(4))  # other batches


# --- branches ---------------------------------------------------------------------------------


def test_an_entry_without_lists_names_its_branches_as_before():
    runs = _study(perturbations=[{"name": "offset", "epsilon": 1.0e-3}]).runs
    branch = runs[f"{RUN}_s0_offset"]
    assert branch.perturbation_options == {"name": "offset", "epsilon": 1.0e-3}
    assert branch.branch_step is None and branch.data_seed is None
    assert branch.seed == 1000 and branch.epochs == 1
    assert "branch_step" not in branch.to_dict() and "data_seed" not in branch.to_dict()


def test_an_epsilon_list_gives_one_branch_per_value():
    entry = {"name": "offset", "epsilon": [1.0e-6, 1.0e-3, 0.1, 2.0]}
    runs = _study(seeds=[0, 1], perturbations=[entry]).runs
    branches = {r: s for r, s in runs.items() if s.perturbation}
    expected = {
        f"{RUN}_s{seed}_offset-epsilon{text}": value
        for seed in (0, 1)
        for text, value in (("1e-06", 1e-6), ("0.001", 1e-3), ("0.1", 0.1), ("2", 2.0))
    }
    assert list(branches) == list(expected)
    for run_id, value in expected.items():
        assert branches[run_id].perturbation == "offset"
        assert branches[run_id].perturbation_options == {"name": "offset", "epsilon": value}
        assert "/" not in run_id


def test_each_swept_value_is_validated():
    message = _refused(perturbations=[{"name": "gaussian", "scale": [0.01, -1.0]}])
    assert "studies/b/perturbations/0" in message and "positive number, got -1.0" in message
    message = _refused(perturbations=[{"name": "offset", "epsilon": [0.1, 0.1]}])
    assert "perturbations/0/epsilon" in message and "twice" in message


def test_data_seeds_on_an_entry_give_one_branch_per_data_order():
    entry = {"name": "identity", "data_seeds": [3, 1000], "epochs": 2}
    runs = _study(perturbations=[entry]).runs
    a, b = runs[f"{RUN}_s0_identity-d3"], runs[f"{RUN}_s0_identity-d1000"]
    assert (a.seed, a.data_seed, a.order_seed) == (1000, 3, 3)
    assert (b.seed, b.data_seed, b.order_seed) == (1000, None, 1000)  # = its seed
    assert a.epochs == b.epochs == 2 and runs[f"{RUN}_s0"].epochs == 1


def test_branch_steps_and_where_together():
    entry = {"name": "identity", "at_epoch": [0, 1], "where": {"seed": 1}}
    runs = _study(seeds=[0, 1], perturbations=[entry]).runs
    branches = {r: s.branch_step for r, s in runs.items() if s.perturbation}
    assert branches == {f"{RUN}_s1_identity-k0": 0, f"{RUN}_s1_identity-k8": 8}
    entry = {"name": "identity", "at_step": 4}
    assert _study(perturbations=[entry]).runs[f"{RUN}_s0_identity-k4"].branch_step == 4


def test_a_step_the_source_does_not_save_is_refused_with_the_nearest():
    message = _refused(perturbations=[{"name": "identity", "label": "ctl", "at_step": 5}])
    assert "studies/b/perturbations/0/at_step" in message and "'ctl'" in message
    assert "no checkpoint at step 5" in message
    assert "nearest checkpoint steps: 0, 4, 8" in message and "every_steps" in message
    message = _refused(perturbations=[{"name": "identity", "at_epoch": 2}])
    assert "at_epoch 2" in message and "step 16" in message


def test_at_step_and_at_epoch_together_are_refused():
    message = _refused(perturbations=[{"name": "identity", "at_step": 4, "at_epoch": 1}])
    assert "studies/b/perturbations/0" in message and "not both" in message


def test_a_mid_epoch_step_needs_keep_steps():
    checkpoint = {"every_epochs": 1, "every_steps": 4, "keep_steps": False}
    message = _refused(checkpoint=checkpoint, perturbations=[{"name": "identity", "at_step": 4}])
    assert "at_step" in message and "keep_steps" in message
    # an epoch's end is always kept
    runs = _study(checkpoint=checkpoint, perturbations=[{"name": "identity", "at_step": 8}]).runs
    assert runs[f"{RUN}_s0_identity-k8"].branch_step == 8


def _fake_smk(spec: RunSpec, source: Path, dataset: Path, out: Path) -> SimpleNamespace:
    """The parts of Snakemake's object that jobs.train reads."""
    return SimpleNamespace(
        log=[str(out.parent / f"{spec.run_id}.log")],
        rule="train",
        config={"device": "cpu"},
        threads=1,
        input=SimpleNamespace(source=str(source / "run.json"), dataset=str(dataset)),
        output=SimpleNamespace(run_json=str(out / "run.json")),
        params=SimpleNamespace(
            hparams=spec.to_json(), work_dir=str(out.parent / f"{spec.run_id}.work"), code=None
        ),
    )


def test_an_instability_pair_trains_from_the_chosen_step(synthetic, tmp_path):
    """identity + at_step 4 + two data seeds, trained through jobs.train: both branches
    start from the source's step-4 weights and separate."""
    entry = {"name": "identity", "at_step": 4, "data_seeds": [1, 2]}
    study = _study(perturbations=[entry], interpolation={"enabled": True, "pairs": ["instability"]})
    source = tmp_path / "source"
    train_run(study.runs[f"{RUN}_s0"], synthetic, source, device="cpu")
    step4 = FinishedRun.read(source).checkpoint_at(4)
    finals = []
    for data_seed in (1, 2):
        spec = study.runs[f"{RUN}_s0_identity-k4-d{data_seed}"]
        out = tmp_path / spec.run_id
        jobs.train(_fake_smk(spec, source, synthetic, out))
        branch = FinishedRun.read(out)
        assert _same_tensors(branch.first_checkpoint, step4)
        finals.append(branch.final_checkpoint)
    assert not _same_tensors(*finals)
    assert [(p["run_a"], p["run_b"]) for p in study.interpolation_pairs] == [
        (f"{RUN}_s0_identity-k4-d1", f"{RUN}_s0_identity-k4-d2")
    ]


def test_checkpoint_at_on_a_run_dir(tmp_path):
    spec = _study().runs[f"{RUN}_s0"]
    names = [f"step{s:08d}.safetensors" for s in (0, 4, 8)]
    info = {"run_id": spec.run_id, "hparams": spec.to_dict(), "checkpoints": names}
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "run.json").write_text(json.dumps(info))
    for name in names[:2]:
        (tmp_path / "checkpoints" / name).write_bytes(b"x")
    run = FinishedRun.read(tmp_path)
    assert run.checkpoint_at(4) == tmp_path / "checkpoints" / "step00000004.safetensors"
    assert run.checkpoint_at(0) == run.first_checkpoint
    with pytest.raises(ValueError, match="no checkpoint at step 5.*steps 0, 4, 8"):
        run.checkpoint_at(5)
    with pytest.raises(ValueError, match="step00000008.safetensors is missing"):
        run.checkpoint_at(8)


# --- interpolation pairs ------------------------------------------------------------------


def _pairs(study) -> list[tuple[str, str, str, str, str]]:
    def short(run_id: str) -> str:
        return run_id.removeprefix(RUN + "_")

    return [
        (p["kind"], short(p["run_a"]), p["end_a"], short(p["run_b"]), p["end_b"])
        for p in study.interpolation_pairs
    ]


def test_interpolation_defaults_and_off_by_default():
    study = _study(seeds=[0, 1])
    assert study.interpolation == {
        "enabled": False,
        "points": 21,
        "pairs": ["seeds", "data_seeds", "branches", "instability", "init_final"],
        "bn": "reestimate",
        "bn_size": 1000,
        "eval_size": 1000,
        "subset_seed": 0,
        "align": True,
        "where": {},
    }
    assert study.interpolation_pairs == ()
    message = _refused(interpolation={"points": 1})
    assert "interpolation/points" in message
    message = _refused(interpolation={"pairs": ["seed"]})
    assert "interpolation/pairs/0" in message


def test_seed_data_seed_and_init_final_pairs():
    on = {"enabled": True}
    study = _study(seeds=[0, 1], data_seeds=[0, 5], interpolation=on)
    assert _pairs(study) == [
        ("seeds", "s0", "final", "s1-d0", "final"),  # one data order, two inits
        ("seeds", "s0-d5", "final", "s1-d5", "final"),
        ("data_seeds", "s0", "final", "s0-d5", "final"),  # one init, two data orders
        ("data_seeds", "s1-d0", "final", "s1-d5", "final"),
        ("init_final", "s0", "init", "s0", "final"),
        ("init_final", "s0-d5", "init", "s0-d5", "final"),
        ("init_final", "s1-d0", "init", "s1-d0", "final"),
        ("init_final", "s1-d5", "init", "s1-d5", "final"),
    ]
    ids = [p["pair"] for p in study.interpolation_pairs]
    assert len(set(ids)) == len(ids)
    assert ids[0] == f"seeds_{RUN}_s0_vs_{RUN}_s1-d0" and ids[-1] == f"init_final_{RUN}_s1-d5"
    # the similarity pairs follow the same rule: s0 and s1 differ in their data order too
    assert [p[:2] for p in study.similarity_pairs] == [
        (f"{RUN}_s0", f"{RUN}_s1-d0"),
        (f"{RUN}_s0-d5", f"{RUN}_s1-d5"),
    ]
    # without data_seeds the data order follows the seed: every two seeds pair
    study = _study(seeds=[0, 1, 2], interpolation={**on, "pairs": ["seeds", "data_seeds"]})
    assert _pairs(study) == [
        ("seeds", "s0", "final", "s1", "final"),
        ("seeds", "s0", "final", "s2", "final"),
        ("seeds", "s1", "final", "s2", "final"),
    ]


def test_branch_and_instability_pairs():
    perturbations = [
        {"name": "identity", "label": "ctl", "at_step": [0, 4], "data_seeds": [1, 2]},
        {"name": "offset", "epsilon": [1.0e-3, 0.1], "data_seeds": [1, 2], "where": {"seed": 1}},
        {"name": "sign_flip"},  # one branch per run: no instability pair
    ]
    on = {"enabled": True, "pairs": ["branches", "instability"]}
    study = _study(seeds=[0, 1], perturbations=perturbations, interpolation=on)
    pairs = _pairs(study)
    branches = [(a, b) for kind, a, _, b, _ in pairs if kind == "branches"]
    # the branches of an instability pair are compared with each other, not their source
    assert branches == [("s0", "s0_sign-flip"), ("s1", "s1_sign-flip")]
    assert all(p[2] == p[4] == "final" for p in pairs)
    instability = [(a, b) for kind, a, _, b, _ in pairs if kind == "instability"]
    assert instability == [
        ("s0_ctl-k0-d1", "s0_ctl-k0-d2"),
        ("s0_ctl-k4-d1", "s0_ctl-k4-d2"),
        ("s1_ctl-k0-d1", "s1_ctl-k0-d2"),
        ("s1_ctl-k4-d1", "s1_ctl-k4-d2"),
        ("s1_offset-epsilon0.001-d1", "s1_offset-epsilon0.001-d2"),
        ("s1_offset-epsilon0.1-d1", "s1_offset-epsilon0.1-d2"),
    ]
