"""Resume after SIGKILL, determinism, divergence, and republishing instead of retraining."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from paramdyn.config import DEFAULT_SCHEMA, load_studies
from paramdyn.train import train_run

STUDY = {
    "models": [{"name": "resnet18-basic-residual-even", "width": 4}],
    "datasets": ["synthetic"],
    "inits": ["kaiming-normal"],
    "optimizers": [{"name": "sgd", "lr": 0.05}],
    "seeds": [0],
    "epochs": 3,
    "batch_size": 32,
    "augment": True,
    "checkpoint": {"every_epochs": 1, "every_steps": 5},
    "gradients": {"every_steps": 3, "track_reached": True},
}


def make_spec(**changes):
    study = {**STUDY, **changes}
    studies = load_studies({"studies": {"r": study}}, DEFAULT_SCHEMA)
    (spec,) = studies["r"].runs.values()
    return spec


def ckpt_bytes(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run_dir / "checkpoints").glob("step*"))}


def history_without_time(run_dir: Path) -> pd.DataFrame:
    return pd.read_parquet(run_dir / "history.parquet").drop(columns=["seconds"])


@pytest.fixture(scope="module")
def reference(synthetic, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    info = train_run(make_spec(), synthetic, run_dir, device="cpu")
    return run_dir, info


def test_same_seed_is_bitwise_identical(synthetic, reference, tmp_path):
    ref_dir, info = reference
    assert info["status"] == "completed"
    again = tmp_path / "again"
    train_run(make_spec(), synthetic, again, device="cpu")
    assert ckpt_bytes(again) == ckpt_bytes(ref_dir)
    pd.testing.assert_frame_equal(history_without_time(again), history_without_time(ref_dir))
    other = tmp_path / "other"
    train_run(make_spec(seeds=[1]), synthetic, other, device="cpu")
    a, b = ckpt_bytes(other), ckpt_bytes(ref_dir)
    assert a.keys() == b.keys() and all(a[k] != b[k] for k in a)


KILL_SCRIPT = """
import json, sys
from paramdyn.config import RunSpec
from paramdyn.train import train_run
spec = RunSpec.from_dict(json.loads(open(sys.argv[1]).read()))
train_run(spec, sys.argv[2], sys.argv[3], device="cpu", snapshot_seconds=0)
"""


def _run_and_kill(spec_file, synthetic, run_dir, after_checkpoints: int) -> bool:
    """Start training in a real process; SIGKILL it once the work directory holds
    ``after_checkpoints`` checkpoints. Returns whether it was killed before finishing."""
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, spec_file, synthetic, run_dir])
    ckpts = Path(str(run_dir) + ".work") / "checkpoints"
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if ckpts.is_dir() and len(list(ckpts.glob("step*.safetensors"))) >= after_checkpoints:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.005)
    proc.wait()
    return False


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_resume_after_sigkill_is_bitwise_identical(synthetic, reference, tmp_path, optimizer):
    ref_dir, _ = reference
    spec = make_spec()
    if optimizer == "adam":  # its own uninterrupted reference
        spec = make_spec(optimizers=[{"name": "adam", "lr": 0.002}])
        ref_dir = tmp_path / "reference"
        train_run(spec, synthetic, ref_dir, device="cpu")
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(spec.to_json())
    run_dir = tmp_path / "killed"
    killed = [_run_and_kill(str(spec_file), str(synthetic), str(run_dir), n) for n in (2, 5, 8)]
    assert any(killed), "training finished before any kill: make it longer"
    assert not (run_dir / "run.json").exists()
    info = train_run(spec, synthetic, run_dir, device="cpu")  # the same command again
    assert info["status"] == "completed"
    assert ckpt_bytes(run_dir) == ckpt_bytes(ref_dir)
    pd.testing.assert_frame_equal(history_without_time(run_dir), history_without_time(ref_dir))
    pd.testing.assert_frame_equal(
        pd.read_parquet(run_dir / "gradients.parquet"),
        pd.read_parquet(ref_dir / "gradients.parquet"),
    )
    reached = run_dir / "grad_reached.safetensors"
    assert reached.read_bytes() == (ref_dir / "grad_reached.safetensors").read_bytes()


def test_forced_rerun_republishes_instead_of_retraining(synthetic, tmp_path):
    spec = make_spec(epochs=1)
    run_dir = tmp_path / "run"
    train_run(spec, synthetic, run_dir, device="cpu", code="v1")
    first = {p.name: p.stat().st_ino for p in (run_dir / "checkpoints").iterdir()}
    # what Snakemake does before a forced rerun: delete the outputs
    for p in (run_dir / "checkpoints").iterdir():
        p.unlink()
    (run_dir / "run.json").unlink()
    t = time.perf_counter()
    train_run(spec, synthetic, run_dir, device="cpu", code="v1")
    assert time.perf_counter() - t < 5
    assert {p.name: p.stat().st_ino for p in (run_dir / "checkpoints").iterdir()} == first
    # other code (or other hyper-parameters) trains again
    train_run(spec, synthetic, run_dir, device="cpu", code="v2")
    assert {p.name: p.stat().st_ino for p in (run_dir / "checkpoints").iterdir()} != first


def test_divergence_stops_and_is_flagged(synthetic, tmp_path):
    from paramdyn.checkpoints import list_checkpoints
    from paramdyn.measures import compare

    spec = make_spec(models=["lenet5"], optimizers=[{"name": "sgd", "lr": 100.0}], augment=False)
    info = train_run(spec, synthetic, tmp_path / "run", device="cpu")
    assert info["status"] == "diverged"
    assert info["diverged_at_step"] < info["derived"]["total_steps"]
    hist = pd.read_parquet(tmp_path / "run" / "history.parquet")
    assert (hist.status == "diverged").all()
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["checkpoints"][-1] == f"step{info['diverged_at_step']:08d}.safetensors"
    # its measures still come out
    df = compare(list_checkpoints(tmp_path / "run" / "checkpoints"))
    assert len(df) > 0


def test_disk_estimate_counts_checkpoints(capsys):
    from paramdyn.cli import main

    repo = Path(__file__).resolve().parents[1]
    assert main(["disk", str(repo / "config.yaml"), "--run", "demo"]) == 0
    out = capsys.readouterr().out.splitlines()
    demo = next(line for line in out if line.startswith("demo")).split()
    # 6 runs x 37 checkpoints: steps 0, 10, ..., 310 and the 5 epoch ends (63, ..., 315),
    # of which 31 are mid-epoch
    assert demo[1:4] == ["6", "222", "186"]
    spec = make_spec()  # 512 images, batch 32: 16 steps per epoch; every 5 steps and epochs
    assert spec.checkpoint_steps() == sorted({*range(0, 49, 5), 16, 32, 48})


def test_drop_step_checkpoints_keeps_epoch_ends(synthetic, reference, tmp_path):
    import shutil

    from paramdyn.checkpoints import drop_step_checkpoints

    ref_dir, _ = reference
    run = tmp_path / "run"
    shutil.copytree(ref_dir / "checkpoints", run / "checkpoints")
    work = tmp_path / "work"
    shutil.copytree(ref_dir / "checkpoints", work / "checkpoints")
    dropped = drop_step_checkpoints(run / "checkpoints", work)
    left = sorted(p.name for p in (run / "checkpoints").glob("step*"))
    assert left == [f"step{s:08d}.safetensors" for s in (0, 16, 32, 48)]
    assert dropped == 9  # steps 5, 10, 15, 20, 25, 30, 35, 40, 45
    assert sorted(p.name for p in (work / "checkpoints").glob("step*")) == left


def test_no_pickle_anywhere():
    """Checkpoints and tables never go through pickle; torch.load only with weights_only."""
    import re

    src = Path(__file__).resolve().parents[1] / "src" / "paramdyn"
    for path in src.glob("*.py"):
        text = path.read_text()
        for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
            assert "weights_only=True" in m.group(1), path
        if path.name != "data.py":  # data.py: CIFAR's own format, via a numpy-only unpickler
            assert not re.search(r"\bpickle\.(loads?|Unpickler)\b", text), path


@pytest.mark.parametrize("schedule", ["constant", "step", "cosine"])
def test_history_lr_follows_the_schedule(synthetic, tmp_path, schedule):
    """The learning rate in the history is the base rate times the schedule's multiplier
    at the steps done (the schedule is stepped after every optimizer step, and not at all
    when it is constant)."""
    from paramdyn.train import SCHEDULE_BUILDERS

    spec = make_spec(models=["lenet5"], schedule=schedule, epochs=4, augment=False, gradients={})
    info = train_run(spec, synthetic, tmp_path / "run", device="cpu")
    total = info["derived"]["total_steps"]
    hist = history_without_time(tmp_path / "run")
    assert len(hist) == 10 and (hist.step.diff().fillna(0) >= 0).all()
    for step, lr in zip(hist.step, hist.lr, strict=True):
        assert lr == 0.05 * SCHEDULE_BUILDERS[schedule](int(step), total)
    assert (hist.lr.nunique() == 1) == (schedule == "constant")
