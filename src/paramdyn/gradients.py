"""Gradient recording during training: per-tensor statistics every N steps, and per entry
whether any step gave it a non-zero gradient ('reached') or moved it ('moved').

The run's ``gradients.parquet`` is :meth:`GradientRecorder.table`; the masks go to its
``grad_reached.safetensors``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import checkpoints

GRAD_STATS = ("grad_l2", "grad_max_abs", "zeros", "nans", "infs")


PRUNE_STEPS = 16  # how often a CPU run stops updating the masks that are complete


class GradientRecorder:
    """Per-tensor gradient statistics every ``every`` steps (L2 norm, max |g|, exact zeros,
    NaN and Inf counts), computed on the device right after ``backward()`` and kept there:
    they are read back only at the loop's sync points (epoch ends, snapshots), so recording
    adds no device synchronisation. With ``track_reached`` it also keeps, per entry,
    whether any step ever gave it a non-zero gradient."""

    def __init__(self, model: torch.nn.Module, every: int | None, track_reached: bool):
        named = list(model.named_parameters())
        self.names = [n for n, _ in named]
        self.params = [q for _, q in named]
        self.every = every
        self.pending: list[tuple[int, torch.Tensor]] = []
        self.steps: list[int] = []
        self.stats: list[torch.Tensor] = []  # each (n_tensors, len(GRAD_STATS)), float64, CPU
        self.reached = (
            [torch.zeros_like(q, dtype=torch.bool) for q in self.params] if track_reached else None
        )
        # entries that ever left their initial value (exact, at every step)
        self.moved = (
            [torch.zeros_like(q, dtype=torch.bool) for q in self.params] if track_reached else None
        )
        self.initial = [q.detach().clone() for q in self.params] if track_reached else None
        # tensors whose masks are not yet all True (a full mask cannot change any more, so
        # it is skipped: exact); pruned at the sync points, and every PRUNE_STEPS on a CPU
        self.open_reached = self.open_moved = list(range(len(self.params)))
        self.prune_every = PRUNE_STEPS if all(q.device.type == "cpu" for q in self.params) else 0
        self.seen = 0

    @property
    def active(self) -> bool:
        return bool(self.every) or self.reached is not None

    @torch.no_grad()
    def after_backward(self, step: int) -> None:
        """``step``: the optimizer step about to be taken (1 = the first)."""
        grads = [q.grad if q.grad is not None else torch.zeros_like(q) for q in self.params]
        if self.reached is not None:
            for i in self.open_reached:
                self.reached[i].logical_or_(grads[i] != 0)
        if self.every and step % self.every == 0:
            cols = [
                torch.stack(torch._foreach_norm(grads)),
                torch.stack(torch._foreach_norm(grads, ord=float("inf"))),
                torch.stack([(g == 0).sum() for g in grads]),
                torch.stack([torch.isnan(g).sum() for g in grads]),
                torch.stack([torch.isinf(g).sum() for g in grads]),
            ]
            self.pending.append((step, torch.stack([c.double() for c in cols], dim=1)))

    @torch.no_grad()
    def after_step(self) -> None:
        if self.moved is not None:
            for i in self.open_moved:
                self.moved[i].logical_or_(self.params[i] != self.initial[i])
            self.seen += 1
            if self.prune_every and self.seen % self.prune_every == 0:
                self.prune()

    def prune(self) -> None:
        """Stop updating the masks that are all True (reads them: a sync on a GPU)."""
        if self.reached is not None:
            self.open_reached = [i for i in self.open_reached if not bool(self.reached[i].all())]
            self.open_moved = [i for i in self.open_moved if not bool(self.moved[i].all())]

    def flush(self) -> None:
        self.prune()
        for step, st in self.pending:
            self.steps.append(step)
            self.stats.append(st.cpu())
        self.pending.clear()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The records and masks so far, as flat named CPU tensors (for a snapshot)."""
        self.flush()
        out = {"grad.steps": torch.tensor(self.steps, dtype=torch.int64)}
        out["grad.stats"] = (
            torch.stack(self.stats) if self.stats else torch.zeros(0, len(self.names), 5)
        ).double()
        if self.reached is not None:
            for n, r, m in zip(self.names, self.reached, self.moved, strict=True):
                out[f"reached.{n}"], out[f"moved.{n}"] = r.cpu(), m.cpu()
        return out

    def load_state_dict(self, t: dict[str, torch.Tensor]) -> None:
        self.steps = t["grad.steps"].tolist()
        self.stats = list(t["grad.stats"].unbind(0))
        if self.reached is not None:
            for i, n in enumerate(self.names):
                self.reached[i].copy_(t[f"reached.{n}"])
                self.moved[i].copy_(t[f"moved.{n}"])
            self.open_reached = self.open_moved = list(range(len(self.params)))
            self.prune()

    def table(self, layout: dict[str, tuple[str, int]], epoch_of) -> pd.DataFrame:
        """Rows per (step, tensor) and per (step, block), as in distances.parquet."""
        self.flush()
        cols = ["step", "epoch", "granularity", "name", "block", "depth", "numel", *GRAD_STATS]
        if not self.steps:  # nothing recorded: the same columns, no rows
            ints = ("step", "epoch", "depth", "numel", "zeros", "nans", "infs")
            strs = ("granularity", "name", "block")
            return pd.DataFrame(
                {
                    c: pd.Series(dtype="int64" if c in ints else object if c in strs else "float64")
                    for c in (*cols, "grad_rms", "zero_frac")
                }
            )
        numel = np.array([q.numel() for q in self.params], dtype=np.int64)
        stats = torch.stack(self.stats).numpy()  # (steps, tensors, 5)
        m, n = stats.shape[:2]
        df = pd.DataFrame(
            {
                "step": np.repeat(self.steps, n),
                "name": np.tile(self.names, m),
                "numel": np.tile(numel, m),
                **{c: stats[:, :, i].ravel() for i, c in enumerate(GRAD_STATS)},
            }
        )
        df["block"] = df["name"].map(lambda k: layout[k][0])
        df["depth"] = df["name"].map(lambda k: layout[k][1]).astype("int64")
        df["granularity"] = "tensor"
        df["sq"] = df["grad_l2"] ** 2
        blocks = (
            df.groupby(["step", "block"], sort=False)
            .agg(
                depth=("depth", "first"),
                numel=("numel", "sum"),
                sq=("sq", "sum"),
                grad_max_abs=("grad_max_abs", "max"),
                zeros=("zeros", "sum"),
                nans=("nans", "sum"),
                infs=("infs", "sum"),
            )
            .reset_index()
        )
        blocks["grad_l2"] = np.sqrt(blocks["sq"])
        blocks["name"] = blocks["block"]
        blocks["granularity"] = "block"
        df = pd.concat([df, blocks], ignore_index=True).drop(columns="sq")
        df["epoch"] = df["step"].map(epoch_of).astype("int64")
        for c in ("zeros", "nans", "infs"):
            df[c] = df[c].astype("int64")
        df["grad_rms"] = df["grad_l2"] / np.sqrt(df["numel"])
        df["zero_frac"] = df["zeros"] / df["numel"]
        return df[[*cols, "grad_rms", "zero_frac"]].sort_values(
            ["step", "granularity", "depth"], kind="stable", ignore_index=True
        )

    def write_masks(self, path: Path, run_id: str) -> None:
        """The 'reached' and 'moved' masks (with ``track_reached``) as one safetensors file."""
        masks = {f"reached.{n}": r for n, r in zip(self.names, self.reached, strict=True)}
        masks.update({f"moved.{n}": m for n, m in zip(self.names, self.moved, strict=True)})
        checkpoints.write_safetensors(
            masks,
            path,
            {
                "run_id": run_id,
                "reached": "the entry received a non-zero gradient at some step",
                "moved": "the entry differed from its initial value after some step",
            },
        )
