"""Compare the outputs of the same study built twice (locally and through SLURM): the
per-study tables (all columns but the timings `seconds`), every checkpoint's tensors and
metadata, and run.json's hyper-parameters, checkpoints and results. Exit 1 on a difference.

usage: python compare_outputs.py LOCAL_DIR SLURM_DIR STUDY
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from safetensors import safe_open

TIMINGS = {"seconds"}


def table(path: Path) -> pd.DataFrame:
    df = pq.read_table(path).to_pandas()
    df = df.drop(columns=[c for c in df.columns if c in TIMINGS])
    keys = [c for c in df.columns if not pd.api.types.is_float_dtype(df[c])]
    return df.sort_values(keys).reset_index(drop=True)


def compare_table(a: Path, b: Path) -> str:
    da, db = table(a), table(b)
    try:
        pd.testing.assert_frame_equal(da, db, check_exact=True)
        return "bitwise equal"
    except AssertionError:
        # not bitwise: say so, and accept only float noise
        pd.testing.assert_frame_equal(da, db, check_exact=False, rtol=1e-6, atol=1e-9)
        return "equal within rtol 1e-6 (NOT bitwise)"


def compare_checkpoint(a: Path, b: Path) -> bool:
    """True when bitwise equal; raises when not even close."""
    with safe_open(str(a), framework="np") as fa, safe_open(str(b), framework="np") as fb:
        assert fa.metadata() == fb.metadata(), f"{a.name}: metadata differ"
        assert set(fa.keys()) == set(fb.keys()), f"{a.name}: tensors differ"
        exact = True
        for key in sorted(fa.keys()):
            ta, tb = fa.get_tensor(key), fb.get_tensor(key)
            if not np.array_equal(ta, tb):
                exact = False
                np.testing.assert_allclose(ta, tb, rtol=1e-6, atol=1e-9, err_msg=key)
        return exact


def main(local: str, slurm: str, study: str) -> None:
    a, b = Path(local) / "results" / study, Path(slurm) / "results" / study
    for name in ("distances", "history"):
        print(f"{name}.parquet: {compare_table(a / f'{name}.parquet', b / f'{name}.parquet')}")
    runs = sorted(p.name for p in (a / "runs").iterdir())
    assert runs == sorted(p.name for p in (b / "runs").iterdir()), "different runs"
    assert runs, "no runs"
    n_ckpt, n_exact = 0, 0
    for run in runs:
        ja = json.loads((a / "runs" / run / "run.json").read_text())
        jb = json.loads((b / "runs" / run / "run.json").read_text())
        for key in ("run_id", "status", "hparams", "derived", "checkpoints", "result"):
            assert ja[key] == jb[key], f"{run}: run.json {key} differ"
        for ckpt in ja["checkpoints"]:
            n_ckpt += 1
            n_exact += compare_checkpoint(
                a / "runs" / run / "checkpoints" / ckpt, b / "runs" / run / "checkpoints" / ckpt
            )
    print(f"{len(runs)} runs: run.json equal; {n_exact} of {n_ckpt} checkpoints bitwise equal")


if __name__ == "__main__":
    main(*sys.argv[1:])
