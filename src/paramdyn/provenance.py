"""Code hashes: a change to the package code that makes an artifact reruns that artifact.

Snakemake's ``code`` rerun trigger covers a rule's own script file only, not the package
the script imports. Each rule therefore puts ``code_hash(<modules it uses>)`` into its
``params``; editing one of those modules changes the params, which triggers a rerun of
that rule's jobs (and of everything downstream), and of nothing else.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def code_hash(*modules: str) -> str:
    """SHA-256 (first 16 hex digits) over the source of the named package modules."""
    h = hashlib.sha256()
    for name in sorted(set(modules)):
        path = PACKAGE_DIR / f"{name}.py"
        if not path.is_file():
            raise FileNotFoundError(f"code_hash: no module {path}")
        h.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]
