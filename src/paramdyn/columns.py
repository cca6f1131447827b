"""The grid coordinates of a run: the columns every per-run table starts with, and the subsets
other tables, claims and filters use. Pure data (the scheduler checks claims and
perturbation filters against it while it parses the config)."""

from __future__ import annotations

# Every per-run table (distances, frozen, history, gradients) starts with these, in this
# order (fields of config.RunSpec): the label and registry name of the model, its
# shortcut kind, and the branch's perturbation label ('' for a run).
RUN = (
    "run_id",
    "study",
    "model",
    "model_name",
    "shortcut",
    "dataset",
    "init",
    "optimizer",
    "seed",
    "perturbation",
)

# What a claim may filter on (`where`, `a`, `b`) and group by (`by`).
CLAIM = tuple(c for c in RUN if c not in ("run_id", "study", "seed"))

# What a perturbation's `where` may filter on (branches come from runs, never branches).
BRANCH_FILTERS = tuple(c for c in RUN if c not in ("run_id", "study", "perturbation"))

# A grid setting: the runs of one setting differ only in their seed (the training check).
SETTING = ("model", "dataset", "init", "optimizer")

# The rows of the accuracy table: a setting, and the branch's perturbation.
ACCURACY = (*SETTING, "perturbation")

# The grid coordinates of a branch's row in perturbations.parquet (after its run ids).
BRANCH = ("study", "model", "dataset", "init", "optimizer", "seed")
