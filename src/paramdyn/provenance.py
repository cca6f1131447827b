"""Code hashes: a change to the package code that makes an artifact reruns that artifact.

A rule's glue in ``jobs.py`` counts by its own function (``jobs:train``), so editing one
rule's glue reruns only that rule.

Snakemake's ``code`` rerun trigger covers a rule's own script file only, not the package
the script imports. Each rule therefore puts ``code_hash(<modules it uses>)`` into its
``params``; editing one of those modules changes the params, which triggers a rerun of
that rule's jobs (and of everything downstream), and of nothing else.
"""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def _source(name: str) -> bytes:
    """A module's source, or with ``module:function`` that one top-level function's."""
    module, _, function = name.partition(":")
    path = PACKAGE_DIR / f"{module}.py"
    if not path.is_file():
        raise FileNotFoundError(f"code_hash: no module {path}")
    text = path.read_text()
    if not function:
        return text.encode()
    for node in ast.parse(text).body:
        if isinstance(node, ast.FunctionDef) and node.name == function:
            return ast.get_source_segment(text, node).encode()
    raise LookupError(f"code_hash: no function {function} in {path}")


def code_hash(*modules: str) -> str:
    """SHA-256 (first 16 hex digits) over the source of the named package modules; a name
    ``module:function`` takes that function only (e.g. ``jobs:train``, a rule's glue)."""
    h = hashlib.sha256()
    for name in sorted(set(modules)):
        h.update(name.encode() + b"\0" + _source(name) + b"\0")
    return h.hexdigest()[:16]
