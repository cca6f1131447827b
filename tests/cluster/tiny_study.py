"""The tiny end-to-end study of tests/cluster/tiny.yaml, and its two-run form: seed 0 and
none of its gradient records, perturbation branches, features settings or claims (the
study of the tests that need only its training jobs: the real-SLURM test, the profiles'
dry runs, the run lock).

usage: python tiny_study.py OUT.yaml    (writes the two-run form)
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

TINY = Path(__file__).resolve().with_name("tiny.yaml")
EXTRAS = ("gradients", "perturbations", "features", "analyses", "interpolation", "claims")


def load() -> dict:
    return yaml.safe_load(TINY.read_text())


def two_runs() -> dict:
    cfg = load()
    study = cfg["studies"]["tiny"]
    study["seeds"] = [0]
    for key in EXTRAS:
        study.pop(key, None)
    return cfg


if __name__ == "__main__":
    Path(sys.argv[1]).write_text(yaml.safe_dump(two_runs(), sort_keys=False))
