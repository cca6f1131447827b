"""Parquet tables: atomic writes with paramdyn metadata, reads that name the bad file, and
the per-study aggregation of per-run tables."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

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
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


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


def aggregate(paths: list[Path | str], out: Path | str) -> pd.DataFrame:
    """Concatenate per-run tables into one; the metadata of the first is kept, with the list
    of runs added."""
    if not paths:
        raise TableError(f"{out}: nothing to aggregate")
    frames = [read_parquet(p) for p in paths]
    df = pd.concat(frames, ignore_index=True)
    meta = read_metadata(paths[0])
    meta.pop("run_id", None)
    meta["runs"] = len(paths)
    write_parquet(df, out, meta)
    return df
