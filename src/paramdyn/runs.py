"""A finished run as the jobs after training read it: its ``run.json`` as a typed record.

Torch-free: the record holds the run's :class:`~paramdyn.config.RunSpec` (``hparams``),
status and the names of its checkpoints; the measures, features and perturbation jobs take
their grid coordinates and checkpoint paths from it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import paths
from .config import RunSpec


def read_info(run_dir: Path | str) -> dict[str, Any]:
    """The content of a run directory's run.json, as written by the training job."""
    return json.loads((Path(run_dir) / paths.RUN_JSON).read_text())


@dataclass(frozen=True)
class FinishedRun:
    """A trained run: what its run.json says, and where its checkpoints are."""

    dir: Path
    run_id: str
    status: str  # "completed" or "diverged"
    spec: RunSpec  # every hyper-parameter (run.json's "hparams")
    checkpoints: tuple[str, ...]  # file names, in step order
    result: dict[str, Any]  # final and best test accuracy, best epoch

    @classmethod
    def read(cls, run_dir: Path | str) -> FinishedRun:
        """The run whose run.json is in ``run_dir`` (a path to run.json itself is taken as
        its folder)."""
        run_dir = Path(run_dir)
        if run_dir.name == paths.RUN_JSON:
            run_dir = run_dir.parent
        return cls.from_info(read_info(run_dir), run_dir)

    @classmethod
    def from_info(cls, info: dict[str, Any], run_dir: Path | str) -> FinishedRun:
        return cls(
            dir=Path(run_dir),
            run_id=info["run_id"],
            status=info.get("status", "completed"),
            spec=RunSpec.from_dict(info["hparams"]),
            checkpoints=tuple(info.get("checkpoints", ())),
            result=dict(info.get("result") or {}),
        )

    @property
    def checkpoint_dir(self) -> Path:
        return self.dir / paths.CHECKPOINTS

    @property
    def first_checkpoint(self) -> Path:
        """The run's step 0: its init (a branch: its perturbed start)."""
        return self.checkpoint_dir / self.checkpoints[0]

    @property
    def final_checkpoint(self) -> Path:
        return self.checkpoint_dir / self.checkpoints[-1]

    @property
    def measures(self) -> dict[str, Any]:
        """The study's ``measures`` settings (tolerances, Minkowski p, exclude)."""
        return self.spec.measures

    def coordinates(self, columns: tuple[str, ...] | list[str]) -> dict[str, Any]:
        """The run's grid coordinates ``columns`` (fields of its RunSpec)."""
        return {c: getattr(self.spec, c) for c in columns}
