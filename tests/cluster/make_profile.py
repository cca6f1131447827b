"""Write the cluster test's profile: profiles/slurm/config.yaml as it is, with only what a
one-node, GPU-less test SLURM needs changed (printed). A command-line flag would replace a
whole top-level key of the profile (e.g. all of `set-resources`), hence a derived copy.

usage: python make_profile.py REPO OUT_DIR CPUS
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml


def derive(profile: dict, cpus: int) -> dict:
    p = dict(profile)
    # the test SLURM: no accounting (status from squeue), no accounts, a quick first check
    p |= {
        "slurm-status-command": "squeue",
        "slurm-no-account": True,
        "slurm-init-seconds-before-status-checks": 1,
        "slurm-keep-successful-logs": True,
        "cores": min(int(p.get("cores", cpus)), cpus),  # a group job fits the node
        "retries": 0,  # a failure fails the test
    }
    small = {"mem_mb": 500, "cpus_per_task": 1}  # several jobs at once on a small node
    p["default-resources"] = {**p.get("default-resources", {}), **small}
    rules = {}
    for rule, res in p.get("set-resources", {}).items():
        res = {k: v for k, v in res.items() if k not in ("gpu_model", "slurm_partition")}
        res |= small
        if "gpu" in res:
            res["gpu"] = 0  # no GRES on the test node
        rules[rule] = res
    p["set-resources"] = rules
    return p


def changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += changes(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def main(repo: str, out_dir: str, cpus: str) -> None:
    profile = yaml.safe_load((Path(repo) / "profiles" / "slurm" / "config.yaml").read_text())
    test = derive(profile, int(cpus))
    if profile.get("executor") != "slurm" or "resources" in profile:
        sys.exit("profiles/slurm must use the slurm executor and set no global resources")
    if profile["set-resources"]["train"].get("gpu") != 1:
        sys.exit("profiles/slurm must ask for one GPU per training job")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(test, sort_keys=False))
    print("test profile = profiles/slurm with:")
    for line in changes(profile, test):
        print(f"  {line}")


if __name__ == "__main__":
    main(*sys.argv[1:])
