"""Parquet tables: atomic writes with paramdyn metadata, reads that name the bad file, and
the per-study aggregation of per-run tables."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from . import atomic, columns
from .config import RunSpec

META_KEY = b"paramdyn"


class TableError(RuntimeError):
    pass


def write_parquet(df: pd.DataFrame, path: Path | str, metadata: dict[str, Any] | None = None):
    """Write ``df`` to ``path`` atomically; ``metadata`` goes to the schema under 'paramdyn'."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pandas(df, preserve_index=False)
    meta = dict(table.schema.metadata or {})
    meta[META_KEY] = json.dumps(metadata or {}, sort_keys=True).encode()
    table = table.replace_schema_metadata(meta)
    with atomic.replacing(path) as tmp:
        pq.write_table(table, tmp)


def insert_run_columns(df: pd.DataFrame, run_id: str, spec: RunSpec, status: str) -> None:
    """Prefix a run's table with its grid coordinates (:data:`columns.RUN`, from its
    RunSpec) and suffix it with the run's ``status``, in place."""
    for i, c in enumerate(columns.RUN):
        value = run_id if c == "run_id" else getattr(spec, c)
        df.insert(i, c, pd.Series([value] * len(df), dtype="int64" if c == "seed" else object))
    df["status"] = status


def read_parquet(path: Path | str) -> pd.DataFrame:
    try:
        return pq.read_table(path).to_pandas()
    except (pa.ArrowException, OSError) as e:
        raise TableError(f"{path}: unreadable Parquet file ({e}); delete it to rebuild") from e


def read_metadata(path: Path | str) -> dict[str, Any]:
    try:
        meta = pq.read_schema(path).metadata or {}
    except (pa.ArrowException, OSError) as e:
        raise TableError(f"{path}: unreadable Parquet file ({e}); delete it to rebuild") from e
    return json.loads(meta.get(META_KEY, b"{}"))


def aggregate(
    paths: list[Path | str], out: Path | str, gradient_flags: dict | None = None
) -> pd.DataFrame:
    """Concatenate per-run tables into one; the metadata of the first is kept, with the
    number of runs added. ``gradient_flags`` ({"vanish_below", "explode_above"}): add the
    boolean columns ``vanishing`` (grad_rms below) and ``exploding`` (grad_rms above, or
    any NaN/Inf) to a gradients table, the thresholds going to the metadata."""
    if not paths:
        raise TableError(f"{out}: nothing to aggregate")
    frames = [read_parquet(p) for p in paths]
    df = pd.concat(frames, ignore_index=True)
    meta = read_metadata(paths[0])
    meta.pop("run_id", None)
    meta["runs"] = len(paths)
    if gradient_flags is not None:
        vanish, explode = gradient_flags["vanish_below"], gradient_flags["explode_above"]
        df["vanishing"] = df["grad_rms"] < vanish
        df["exploding"] = (df["grad_rms"] > explode) | (df["nans"] + df["infs"] > 0)
        meta.update(vanish_below=vanish, explode_above=explode)
    write_parquet(df, out, meta)
    return df


def accuracy_table(history: Path | str, out_parquet: Path | str, out_markdown: Path | str):
    """Best and final test accuracy per grid setting (the epoch of the best too), mean and
    spread over seeds, as Parquet and Markdown. Both are reported because a final number
    alone hides overfitting (seed 004 reported only its final, overfit CIFAR-10 accuracy)."""
    h = read_parquet(history)
    test = h[h["split"] == "test"].copy()
    for c in columns.ACCURACY:
        if c not in test.columns:
            test[c] = ""
    per_run = []
    for run_id, g in test.groupby("run_id", sort=False):
        g = g.sort_values("step")
        best = g.loc[g["accuracy"].idxmax()] if g["accuracy"].notna().any() else g.iloc[-1]
        per_run.append(
            {
                **{c: g[c].iloc[0] for c in columns.ACCURACY},
                "run_id": run_id,
                "final": g["accuracy"].iloc[-1],
                "best": best["accuracy"],
                "best_epoch": int(best["epoch"]),
                "diverged": bool((g.get("status", pd.Series(["completed"])) == "diverged").any()),
            }
        )
    runs = pd.DataFrame(per_run)
    df = (
        runs.groupby(list(columns.ACCURACY), sort=False, dropna=False)
        .agg(
            seeds=("run_id", "count"),
            final_mean=("final", "mean"),
            final_std=("final", "std"),
            best_mean=("best", "mean"),
            best_std=("best", "std"),
            best_epoch_mean=("best_epoch", "mean"),
            diverged=("diverged", "sum"),
        )
        .reset_index()
    )
    df["diverged"] = df["diverged"].astype("int64")
    write_parquet(df, out_parquet, {"what": "test accuracy over seeds (std: sample std)"})
    lines = [
        "| model | dataset | init | optimizer | perturbation | seeds | final | best | best epoch | diverged |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in df.itertuples(index=False):

        def pm(m, s):
            return f"{m:.4f}" if pd.isna(s) else f"{m:.4f} ± {s:.4f}"

        lines.append(
            f"| {r.model} | {r.dataset} | {r.init} | {r.optimizer} | {r.perturbation or '—'} | "
            f"{r.seeds} | {pm(r.final_mean, r.final_std)} | {pm(r.best_mean, r.best_std)} | "
            f"{r.best_epoch_mean:.1f} | {r.diverged} |"
        )
    text = "\n".join(lines) + "\n\nMean ± sample standard deviation over seeds.\n"
    atomic.write_text(out_markdown, text)
    return df
