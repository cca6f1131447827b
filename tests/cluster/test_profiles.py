"""The profiles as Snakemake reads them, in dry runs (no SLURM needed; the real SLURM run is
tests/cluster/run_slurm.sh): one GPU per training job and no global GPU limit on SLURM,
grouped per-run jobs, option names the installed SLURM plugin knows."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml
from tiny_study import two_runs

REPO = Path(__file__).resolve().parents[2]
SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")


def profile(name: str) -> dict:
    return yaml.safe_load((REPO / "profiles" / name / "config.yaml").read_text())


def dry_run(tmp_path: Path, name: str, *args: str) -> str:
    cmd = [SNAKEMAKE, "--profile", str(REPO / "profiles" / name), "--workflow-profile", "none"]
    cmd += ["-s", str(REPO / "Snakefile"), "--directory", str(tmp_path)]
    config = tmp_path / "tiny.yaml"  # the tiny study's two runs
    config.write_text(yaml.safe_dump(two_runs()))
    cmd += ["--configfile", str(config), "-n", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout + r.stderr


def job_resources(out: str) -> dict[str, list[dict[str, str]]]:
    """{rule: [each job's resources]} from a dry run's job listing (group members too)."""
    jobs: dict[str, list[dict[str, str]]] = {}
    rule = None
    for line in out.splitlines():
        if m := re.match(r"\s*(?:local)?rule (\w+):$", line):
            rule = m[1]
        elif (m := re.match(r"\s*resources: (.*)$", line)) and rule:
            jobs.setdefault(rule, []).append(dict(kv.split("=", 1) for kv in m[1].split(", ")))
            rule = None
    return jobs


def test_slurm_profile(tmp_path):
    p = profile("slurm")
    assert p["executor"] == "slurm"
    assert "resources" not in p  # a global gpu limit would cap the whole cluster's GPU jobs
    assert p["rerun-incomplete"] is True
    out = dry_run(tmp_path, "slurm")
    train = job_resources(out)["train"]
    assert len(train) == 2
    for res in train:
        got = [res[k] for k in ("gpu", "cpus_per_task", "mem_mb", "runtime")]
        assert got == ["1", "4", "16000", "720"]
    assert "Group job distances" in out and "Group job prepare" in out
    for rule, jobs in job_resources(out).items():
        if rule != "all":
            assert all("runtime" in r and "mem_mb" in r for r in jobs), rule


def test_slurm_profile_options_exist():
    """Every slurm-* option of the profile, commented ones included, is a flag of the
    installed plugin."""
    text = (REPO / "profiles" / "slurm" / "config.yaml").read_text()
    options = set(re.findall(r"^#?\s*(slurm-[a-z-]+):", text, re.M))
    assert "slurm-status-command" in options
    r = subprocess.run([SNAKEMAKE, "--help"], capture_output=True, text=True, timeout=120)
    flags = set(re.findall(r"--(slurm-[a-z-]+)", r.stdout))
    assert options <= flags, options - flags
    for flag in ("slurm-no-account", "slurm-init-seconds-before-status-checks"):
        assert flag in flags  # used by tests/cluster/run_slurm.sh


def test_local_profile(tmp_path):
    p = profile("local")
    assert p["rerun-incomplete"] is True and p["resources"]["gpu"] >= 1
    dry_run(tmp_path, "local")


def test_batches_of_all(tmp_path):
    out = dry_run(tmp_path, "local", "--batch", "all=1/2")
    assert "Considering only batch 1/2 (rule all)" in out
