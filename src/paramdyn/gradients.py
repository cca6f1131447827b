"""Gradient recording during training: per-tensor statistics every N steps, and per entry
whether any step gave it a non-zero gradient ('reached') or moved it ('moved').

The run's ``gradients.parquet`` is :meth:`GradientRecorder.table`; the masks go to its
``grad_reached.safetensors``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import checkpoints

GRAD_STATS = ("grad_l2", "grad_max_abs", "zeros", "nans", "infs")


PRUNE_STEPS = 16  # after the first steps, how often the complete masks are looked for


def _differ(his: list[torch.Tensor], los: list[torch.Tensor]) -> list[torch.Tensor]:
    return [h != lo for h, lo in zip(his, los, strict=True)]


class GradientRecorder:
    """Per-tensor gradient statistics every ``every`` steps (L2 norm, max |g|, exact zeros,
    NaN and Inf counts), computed on the device right after ``backward()`` and kept there:
    they are read back only at the loop's sync points (epoch ends, snapshots), so recording
    adds no device synchronisation. With ``track_reached`` it also keeps, per entry,
    whether any step ever gave it a non-zero gradient ('reached') and whether it ever left
    its initial value ('moved').

    The masks are kept as running extremes: the largest and smallest gradient so far (from
    0) and the largest and smallest value so far (from θ0), updated in place by four
    ``torch._foreach`` calls a step for all tensors (where a mask per tensor took two ops
    and a temporary per tensor: the step's small ops are what a CPU step pays for). An
    entry is reached (moved) exactly when its two extremes differ: some g != 0 (some
    θ != θ0) made one of them leave the start, and a NaN makes both NaN. A tensor whose
    entries are all reached (moved) cannot change any more, so it is dropped from the
    update: exact, and with SGD or Adam nearly every tensor is complete after the first
    step. The complete ones are looked for after steps 1, 2, 4, 8, then every PRUNE_STEPS
    (one read back of one flag per tensor)."""

    def __init__(self, model: torch.nn.Module, every: int | None, track_reached: bool):
        named = list(model.named_parameters())
        self.names = [n for n, _ in named]
        self.params = [q for _, q in named]
        self.every = every
        self.pending: list[tuple[int, torch.Tensor]] = []
        self.steps: list[int] = []
        self.stats: list[torch.Tensor] = []  # each (n_tensors, len(GRAD_STATS)), float64, CPU
        self.track = track_reached
        if track_reached:
            self.grad_hi = [torch.zeros_like(q) for q in self.params]
            self.grad_lo = [torch.zeros_like(q) for q in self.params]
            self.value_hi = [q.detach().clone() for q in self.params]
            self.value_lo = [q.detach().clone() for q in self.params]
        self.open_reached = self.open_moved = list(range(len(self.params)))
        self.seen = 0

    @property
    def active(self) -> bool:
        return bool(self.every) or self.track

    @property
    def reached(self) -> list[torch.Tensor] | None:
        """Per tensor, the entries that got a non-zero gradient at some step (a bool mask)."""
        return _differ(self.grad_hi, self.grad_lo) if self.track else None

    @property
    def moved(self) -> list[torch.Tensor] | None:
        """Per tensor, the entries that differed from their initial value after some step."""
        return _differ(self.value_hi, self.value_lo) if self.track else None

    @torch.no_grad()
    def after_backward(self, step: int) -> None:
        """``step``: the optimizer step about to be taken (1 = the first)."""
        grads = [q.grad if q.grad is not None else torch.zeros_like(q) for q in self.params]
        if self.track and self.open_reached:
            seen = [grads[i] for i in self.open_reached]
            torch._foreach_maximum_([self.grad_hi[i] for i in self.open_reached], seen)
            torch._foreach_minimum_([self.grad_lo[i] for i in self.open_reached], seen)
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
        if not self.track:
            return
        if self.open_moved:
            values = [self.params[i] for i in self.open_moved]
            torch._foreach_maximum_([self.value_hi[i] for i in self.open_moved], values)
            torch._foreach_minimum_([self.value_lo[i] for i in self.open_moved], values)
        self.seen += 1
        if self.seen in (1, 2, 4, 8) or self.seen % PRUNE_STEPS == 0:
            self.prune()

    def prune(self) -> None:
        """Stop updating the tensors whose masks are complete (one read back)."""
        if not self.track or not (self.open_reached or self.open_moved):
            return
        pairs = [(self.grad_hi[i], self.grad_lo[i]) for i in self.open_reached]
        pairs += [(self.value_hi[i], self.value_lo[i]) for i in self.open_moved]
        complete = torch.stack([(h != lo).all() for h, lo in pairs]).tolist()
        done_r, done_m = complete[: len(self.open_reached)], complete[len(self.open_reached) :]
        self.open_reached = [i for i, d in zip(self.open_reached, done_r, strict=True) if not d]
        self.open_moved = [i for i, d in zip(self.open_moved, done_m, strict=True) if not d]

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
        if self.track:
            for n, r, m in zip(self.names, self.reached, self.moved, strict=True):
                out[f"reached.{n}"], out[f"moved.{n}"] = r.cpu(), m.cpu()
        return out

    def load_state_dict(self, t: dict[str, torch.Tensor]) -> None:
        """Continue from :meth:`state_dict`'s records, in a recorder built on the run's
        initial weights (as ``train.Run.build`` does, before a snapshot is restored)."""
        self.steps = t["grad.steps"].tolist()
        self.stats = list(t["grad.stats"].unbind(0))
        if self.track:  # a True entry as extremes that differ for good: 1 and 0, +inf and θ0
            for i, n in enumerate(self.names):
                reached, moved = (
                    t[k].to(self.params[i].device) for k in (f"reached.{n}", f"moved.{n}")
                )
                self.grad_hi[i].copy_(reached)
                self.grad_lo[i].zero_()
                self.value_hi[i].copy_(self.value_lo[i].masked_fill(moved, math.inf))
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
