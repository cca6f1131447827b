"""The registries agree with the code that builds their entries, and each rule's code hash
covers the package code its job runs."""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import pytest

from paramdyn import catalog, columns, data, findings, inits, models, perturb, train
from paramdyn.provenance import PACKAGE_DIR

REPO = Path(__file__).resolve().parents[1]

# --- every catalog name has a builder, every builder a catalog name ---------------------------

# inits that the initialise function handles itself, not by a registered initializer
SPECIAL_INITS = {"pretrained", "from_run"}


@pytest.mark.parametrize(
    "names, builders",
    [
        ({s.family for s in catalog.MODELS.values()}, set(models.BUILDERS)),
        (set(catalog.INITS) - SPECIAL_INITS, set(inits.INITIALIZERS)),
        (set(catalog.OPTIMIZERS), set(train.OPTIMIZER_BUILDERS)),
        (set(catalog.SCHEDULES), set(train.SCHEDULE_BUILDERS)),
        (set(catalog.DATASETS), set(data.READERS)),
        (set(perturb.PERTURBATION_OPTIONS), set(perturb.PERTURBATIONS)),
        (set(catalog.CLAIM_TESTS), set(findings.STATISTICS)),
    ],
    ids=["models", "inits", "optimizers", "schedules", "datasets", "perturbations", "claims"],
)
def test_every_registered_name_has_a_builder(names, builders):
    assert names == builders


def test_optimizer_settings_are_the_builders_arguments():
    """Each optimizer's catalog defaults are exactly what its builder takes."""
    for name, spec in catalog.OPTIMIZERS.items():
        code = train.OPTIMIZER_BUILDERS[name].__code__
        args = set(code.co_varnames[: code.co_argcount]) - {"params"}
        assert set(spec.defaults) == args, name


def test_grid_columns_are_run_fields():
    from dataclasses import fields

    from paramdyn.config import RunSpec

    names = {f.name for f in fields(RunSpec)}
    for group in (columns.RUN, columns.CLAIM, columns.BRANCH_FILTERS, columns.ACCURACY):
        assert set(group) <= names
    assert set(columns.CLAIM) | set(columns.BRANCH_FILTERS) <= set(columns.RUN)


# --- each rule's code hash covers the modules its job runs -----------------------------------

# Package modules a job may run whose edits deliberately rerun nothing. What they decide for
# a job either reaches it through the rule's params or does not change what it computes.
NOT_HASHED = {
    "config": "validation and grid expansion (torch-free): what it resolves for a job (the "
    "run's hyper-parameters, the claims, the model's options) is in the rule's params, so a "
    "change that matters changes the params; hashing it would rerun everything for an edited "
    "error message",
    "catalog": "the registries (pure data): a run's model options and hyper-parameters are "
    "in its params (as for config)",
    "paths": "file locations: a change moves the rules' inputs and outputs, which Snakemake "
    "follows by itself",
    "devices": "where a job runs (CPU or CUDA), an execution setting: moving a study from CPU "
    "to GPU does not rerun it (README)",
    "gpus": "which GPU a training job leases: execution only",
    "atomic": "how a file is written (a temporary name, then a rename), not what it holds",
    "__init__": "the package's version string",
}


@cache
def _module(name: str) -> ast.Module:
    return ast.parse((PACKAGE_DIR / f"{name}.py").read_text())


def _imports(node: ast.AST) -> list[tuple[str, frozenset[str] | None]]:
    """The package modules imported anywhere in ``node``: (module, names imported from it,
    or None for the whole module)."""
    out = []
    for n in ast.walk(node):
        if isinstance(n, ast.ImportFrom) and n.level == 1:
            if n.module:
                out.append((n.module, frozenset(a.name for a in n.names)))
            else:  # from . import x, y: whole modules (or names of the package itself)
                for a in n.names:
                    if (PACKAGE_DIR / f"{a.name}.py").is_file():
                        out.append((a.name, None))
                    else:
                        out.append(("__init__", frozenset([a.name])))
        elif isinstance(n, ast.ImportFrom | ast.Import):
            targets = [n.module] if isinstance(n, ast.ImportFrom) else [a.name for a in n.names]
            assert not any(t and t.startswith("paramdyn") for t in targets), "relative imports"
    return out


def _definitions(tree: ast.Module) -> dict[str, ast.AST]:
    """Top-level functions, classes and assignments of a module, by name."""
    defs: dict[str, ast.AST] = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            defs[node.name] = node
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                if isinstance(t, ast.Name):
                    defs[t.id] = node
    return defs


def _names(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def _runs_at_import(tree: ast.Module) -> list[ast.AST]:
    """What runs when a module is imported, besides defining names: its top-level imports
    and statements, and the calls in its top-level assignments."""
    out: list[ast.AST] = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            continue
        if isinstance(node, ast.Assign | ast.AnnAssign):
            out += [n for n in ast.walk(node) if isinstance(n, ast.Call)]
        else:
            out.append(node)
    return out


def modules_run_by(entry: str) -> set[str]:
    """The package modules whose code ``module:function`` may run (a static walk): the
    modules it imports, where a module's import-time code runs, and from the names imported
    (``from .x import f``) the top-level functions, classes and tables of ``x`` they name,
    recursively, with their own imports (lazy ones too); ``from . import x`` counts all of
    ``x``. Modules of NOT_HASHED are recorded, not followed."""
    start, _, function = entry.partition(":")
    found: set[str] = set()
    done: set[tuple[str, str | None]] = set()
    todo: list[tuple[str, str | None]] = [(start, function)]
    while todo:
        module, name = todo.pop()
        if (module, name) in done:
            continue
        done.add((module, name))
        found.add(module)
        if module in NOT_HASHED:
            continue
        tree = _module(module)
        if name is None:
            nodes: list[ast.AST] = [tree]
        else:
            defs = _definitions(tree)
            nodes = [] if module == start else _runs_at_import(tree)
            queue = [name, *(n for node in nodes for n in _names(node))]
            seen: set[str] = set()
            while queue:
                n = queue.pop()
                if n in defs and n not in seen:
                    seen.add(n)
                    nodes.append(defs[n])
                    queue += _names(defs[n])
        for node in nodes:
            for target, names in _imports(node):
                todo += [(target, n) for n in (sorted(names) if names else [None])]
    return found - {start}


def _code_hashes() -> dict[str, list[str]]:
    """{rule: the arguments of its code_hash(...)}, from rules/*.smk."""
    out = {}
    for smk in sorted((REPO / "rules").glob("*.smk")):
        for rule, body in re.findall(
            r"^rule (\w+):\n(.*?)(?=^\S|\Z)", smk.read_text(), re.M | re.S
        ):
            call = re.search(r"code=code_hash\((.*?)\)", body, re.S)
            if call:
                out[rule] = re.findall(r'"([\w:]+)"', call[1])
    return out


def test_every_rule_hashes_its_code():
    hashes = _code_hashes()
    assert {"train", "distances", "features", "findings", "plot_similarity"} <= set(hashes)
    for rule, hashed in hashes.items():
        (job,) = [h for h in hashed if h.startswith("jobs:")]
        needed = modules_run_by(job) - set(NOT_HASHED)
        missing = needed - set(hashed)
        assert not missing, f"rule {rule}: code_hash lacks {sorted(missing)} ({job} runs them)"


def test_the_walk_follows_lazy_and_top_level_imports():
    # features reaches torch code through lazy imports in the function the job calls
    assert {"features", "checkpoints", "models", "data"} <= modules_run_by("jobs:features")
    # the training job runs the perturbations (a branch's start), not the branch table
    assert "perturb" in modules_run_by("jobs:train")
    assert "measures" not in modules_run_by("jobs:train")
    assert modules_run_by("jobs:download_dataset") >= {"data"}
