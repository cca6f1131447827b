"""Resuming and publishing a run: its work directory, its training state and snapshots of it.

A run trains in a work directory outside the rule's declared outputs
(:func:`paramdyn.paths.work_dir`), keyed by :func:`run_key` (its hyper-parameters and the
code that trains it): a directory made under another key is discarded.

- :class:`TrainState` is everything needed to continue exactly (model, optimizer, learning
  rate schedule, RNG and data-order state, gradient records, :class:`Progress` with the
  history so far); ``state_dict()`` / ``load_state_dict()`` give and take it as one plain
  dict, which :func:`write_snapshot` stores atomically as one safetensors file;
- when training is complete, :meth:`WorkDir.finish` writes run.json (last) and publishes
  the files (hard-linked) into the run directory; a forced rerun with the same key
  republishes them (:meth:`WorkDir.publish`) instead of retraining.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from . import __version__, atomic, checkpoints, paths
from .config import RunSpec
from .gradients import GradientRecorder

log = logging.getLogger("paramdyn.train")

SNAPSHOT = "snapshot.safetensors"


def run_key(spec: RunSpec, code: str | None = None) -> str:
    """What a trained run depends on: its hyper-parameters and the code that trains it."""
    text = spec.to_json() + "\0" + (code or __version__)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


@dataclass
class Progress:
    """Where training stands: enough, with the model and optimizer, to continue exactly."""

    step: int = 0
    epoch: int = 0  # completed epochs
    batch: int = 0  # batches done in the current epoch
    epoch_rng: torch.Tensor | None = None  # data-order generator state at the epoch's start
    loss_sum: float = 0.0
    correct: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    saved: list[int] = field(default_factory=list)
    status: str = "running"
    diverged_at_step: int | None = None


@dataclass
class TrainState:
    """What a snapshot holds: with it, a killed run continues bitwise identically."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    gen: torch.Generator  # data order (and augmentation)
    grads: GradientRecorder
    progress: Progress = field(default_factory=Progress)

    def state_dict(self) -> dict[str, Any]:
        p = self.progress
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "gradients": self.grads.state_dict(),
            "rng": {
                "data": self.gen.get_state(),
                "epoch": p.epoch_rng if p.epoch_rng is not None else self.gen.get_state(),
                "torch": torch.get_rng_state(),
            },
            "progress": {k: v for k, v in p.__dict__.items() if k != "epoch_rng"},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        # load_state_dict moves each state tensor to its parameter's device; the memory
        # layout (channels_last) must follow the parameter's too: fused optimizers walk them
        # as flat arrays side by side
        self.optimizer.load_state_dict(state["optimizer"])
        for q, st in self.optimizer.state.items():
            for name, v in st.items():
                if torch.is_tensor(v) and v.shape == q.shape and v.stride() != q.stride():
                    st[name] = torch.empty_like(q, dtype=v.dtype).copy_(v)
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.grads.load_state_dict(state["gradients"])
        self.gen.set_state(state["rng"]["data"])
        torch.set_rng_state(state["rng"]["torch"])
        self.progress = Progress(**state["progress"], epoch_rng=state["rng"]["epoch"])


def write_snapshot(path: Path, key: str, state: dict[str, Any]) -> None:
    """A :meth:`TrainState.state_dict` as one safetensors file (tensors by prefixed name,
    the rest as JSON metadata), atomically."""
    tensors = {f"model.{k}": v for k, v in state["model"].items()}
    tensors.update(state["gradients"])  # already named grad.*, reached.*, moved.*
    for idx, st in state["optimizer"]["state"].items():
        tensors.update({f"opt.{idx}.{name}": v for name, v in st.items()})
    tensors.update({f"rng.{k}": v for k, v in state["rng"].items()})
    meta = {
        "key": key,
        "param_groups": json.dumps(state["optimizer"]["param_groups"]),
        "sched": json.dumps(state["lr_scheduler"]),
        "progress": json.dumps(state["progress"], allow_nan=True),
    }
    checkpoints.write_safetensors(tensors, path, meta)


def read_snapshot(path: Path, key: str) -> dict[str, Any] | None:
    """The state dict :func:`write_snapshot` stored; None when the file is for another key
    or unreadable (cut short by a kill)."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("key") != key:
                log.info("snapshot %s is for other hyper-parameters or code: ignored", path)
                return None
            t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except Exception as e:  # a snapshot cut short by a kill: start over
        log.warning("snapshot %s unreadable (%s): starting from the init", path, e)
        return None
    opt: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in t.items():
        if k.startswith("opt."):
            _, idx, name = k.split(".", 2)
            opt.setdefault(int(idx), {})[name] = v
    return {
        "model": {k[6:]: v for k, v in t.items() if k.startswith("model.")},
        "optimizer": {"state": opt, "param_groups": json.loads(meta["param_groups"])},
        "lr_scheduler": json.loads(meta["sched"]),
        "gradients": {k: v for k, v in t.items() if k.startswith(("grad.", "reached.", "moved."))},
        "rng": {k[4:]: v for k, v in t.items() if k.startswith("rng.")},
        "progress": json.loads(meta["progress"]),
    }


class WorkDir:
    """Where one run trains: ``checkpoints/``, the snapshot, the tables and run.json, and a
    ``key`` file naming the hyper-parameters and code they were made with."""

    def __init__(self, path: Path | str, key: str):
        self.path, self.key = Path(path), key
        self.checkpoints = self.path / paths.CHECKPOINTS
        self.snapshot = self.path / SNAPSHOT

    def open(self) -> bool:
        """Discard the directory if another key made it; True when it holds a finished run
        (to publish, not train), else make it ready for training."""
        key_file = self.path / "key"
        if self.path.exists() and (not key_file.exists() or key_file.read_text() != self.key):
            log.info("discarding %s: made for other hyper-parameters or code", self.path)
            shutil.rmtree(self.path)
        if (self.path / paths.RUN_JSON).exists():
            return True
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        key_file.write_text(self.key)
        return False

    def restore(self, state: TrainState) -> bool:
        """Load the snapshot, if there is a usable one, into ``state``; True if loaded."""
        saved = read_snapshot(self.snapshot, self.key) if self.snapshot.exists() else None
        if saved is not None:
            state.load_state_dict(saved)
        return saved is not None

    def save(self, state: TrainState) -> None:
        write_snapshot(self.snapshot, self.key, state.state_dict())

    def finish(self, info: dict[str, Any], run_dir: Path) -> None:
        """Write run.json (the mark of a finished run), drop the snapshot, publish."""
        atomic.write_text(self.path / paths.RUN_JSON, json.dumps(info, indent=2, sort_keys=True))
        self.snapshot.unlink(missing_ok=True)  # the finished run needs no snapshot
        self.publish(run_dir)

    def publish(self, run_dir: Path) -> None:
        """Hard-link (or copy, across file systems) the finished run into its run directory."""
        work = self.path
        out = run_dir / paths.CHECKPOINTS
        out.mkdir(parents=True, exist_ok=True)
        names = [(p, out / p.name) for p in self.checkpoints.iterdir()]
        extra = [n for n in ("gradients.parquet", paths.GRAD_REACHED) if (work / n).exists()]
        if not (work / paths.GRAD_REACHED).exists():  # none from an earlier training
            (run_dir / paths.GRAD_REACHED).unlink(missing_ok=True)
        names += [(work / n, run_dir / n) for n in (*extra, "history.parquet", paths.RUN_JSON)]
        for src, dst in names:
            with atomic.replacing(dst) as tmp:
                tmp.unlink(missing_ok=True)
                try:
                    os.link(src, tmp)
                except OSError:
                    shutil.copy2(src, tmp)
