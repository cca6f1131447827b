"""A finished run as the jobs after training read it: its ``run.json`` as a typed record.

Torch-free: the record holds the run's :class:`~paramdyn.config.RunSpec` (``hparams``),
status and the names of its checkpoints; the measures, features and perturbation jobs take
their grid coordinates and checkpoint paths from it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import paths
from .config import RunSpec

# a checkpoint's file name (checkpoints.checkpoint_name: step<8 digits>.safetensors), parsed
# here rather than imported: that module needs torch, this one does not
_CHECKPOINT_NAME = re.compile(r"step(\d+)\.safetensors")


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
    def checkpoint_steps(self) -> dict[int, str]:
        """The step of each checkpoint the run saved: ``{step: file name}``, in step order."""
        steps = {}
        for name in self.checkpoints:
            match = _CHECKPOINT_NAME.fullmatch(name)
            if match:
                steps[int(match.group(1))] = name
        return steps

    def checkpoint_at(self, step: int) -> Path:
        """The run's checkpoint at ``step`` (a branch's start, ``RunSpec.branch_step``).
        Raises ValueError listing the steps it has when it saved none there (a diverged run
        stops early; ``checkpoint.keep_steps: false`` deletes mid-epoch ones)."""
        steps = self.checkpoint_steps
        if step not in steps:
            raise ValueError(
                f"run {self.run_id} has no checkpoint at step {step} (status {self.status}); "
                f"its checkpoints are at steps {', '.join(map(str, steps)) or 'none'}"
            )
        path = self.checkpoint_dir / steps[step]
        if not path.is_file():
            raise ValueError(
                f"run {self.run_id}'s checkpoint at step {step} is listed in its run.json but "
                f"{path} is missing (deleted by checkpoint.keep_steps: false?)"
            )
        return path

    @property
    def measures(self) -> dict[str, Any]:
        """The study's ``measures`` settings (tolerances, Minkowski p, exclude)."""
        return self.spec.measures

    def coordinates(self, columns: tuple[str, ...] | list[str]) -> dict[str, Any]:
        """The run's grid coordinates ``columns`` (fields of its RunSpec)."""
        return {c: getattr(self.spec, c) for c in columns}
