"""The per-study accuracy table against hand-computed values."""

import pandas as pd
import pytest

from paramdyn.tables import accuracy_table, write_parquet


def test_best_and_final_over_seeds(tmp_path):
    rows = []
    curves = {0: [0.1, 0.8, 0.6], 1: [0.1, 0.7, 0.9]}  # seed -> test accuracy per epoch
    for seed, accs in curves.items():
        for epoch, acc in enumerate(accs):
            for split in ("train", "test"):
                rows.append(
                    {
                        "run_id": f"m_d_i_o_s{seed}",
                        "model": "m",
                        "dataset": "d",
                        "init": "i",
                        "optimizer": "o",
                        "perturbation": "",
                        "seed": seed,
                        "epoch": epoch,
                        "step": epoch * 10,
                        "split": split,
                        "loss": 1.0,
                        "accuracy": acc if split == "test" else 0.0,
                        "status": "completed",
                    }
                )
    write_parquet(pd.DataFrame(rows), tmp_path / "h.parquet")
    df = accuracy_table(tmp_path / "h.parquet", tmp_path / "a.parquet", tmp_path / "a.md")
    (r,) = df.itertuples()
    assert r.seeds == 2 and r.diverged == 0
    assert r.final_mean == pytest.approx(0.75) and r.final_std == pytest.approx(0.2121320, rel=1e-5)
    assert r.best_mean == pytest.approx(0.85) and r.best_epoch_mean == pytest.approx(1.5)
    md = (tmp_path / "a.md").read_text()
    assert "| m | d | i | o | — | 2 | 0.7500 ± 0.2121 | 0.8500 ± 0.0707 | 1.5 | 0 |" in md
    assert pd.read_parquet(tmp_path / "a.parquet").equals(df)
