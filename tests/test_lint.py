"""The code stays clean: ruff, snakefmt and snakemake --lint, as CI runs them."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PY_DIRS = ["src", "scripts", "tests", "benchmarks"]

CHECKS = {
    "ruff check": [str(BIN / "ruff"), "check", *PY_DIRS],
    "ruff format": [str(BIN / "ruff"), "format", "--check", *PY_DIRS],
    "snakefmt": [str(BIN / "snakefmt"), "--check", "Snakefile", "rules"],
    "snakemake --lint": [str(BIN / "snakemake"), "--lint"],
}


@pytest.mark.parametrize("name", CHECKS)
def test_clean(name):
    r = subprocess.run(CHECKS[name], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{name}:\n{r.stdout}\n{r.stderr}"
    if name == "snakemake --lint":
        assert "Congratulations" in r.stdout + r.stderr
