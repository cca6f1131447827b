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


# the integer type of each float size: a tensor's bit patterns, viewed without a copy
_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}

# open entries on a CPU, after a prune, from which the compiled passes track them
# (paramdyn.reach_kernels: a fraction of the time a step, 0.2 s to import numba once);
# None: never
FUSED_MIN_ENTRIES: int | None = 1 << 20


def flat(t: torch.Tensor) -> np.ndarray | None:
    """``t``'s memory as a 1-D array without a copy, in memory order (its dimensions
    sorted by stride: the same order for every tensor with ``t``'s strides); None when
    its entries are not one dense block."""
    dims = sorted(range(t.dim()), key=lambda d: t.stride(d), reverse=True)
    p = t.detach().permute(dims)
    return p.view(-1).numpy() if p.is_contiguous() else None


def fusable(q: torch.Tensor) -> bool:
    """Whether the compiled passes can track ``q``: a dense float32/float64 CPU tensor."""
    return (
        q.device.type == "cpu"
        and q.dtype in (torch.float32, torch.float64)
        and (flat(q) is not None)
    )


def _laid_out(t: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``t`` (taken, not copied) when it has ``q``'s strides; else a copy that has them."""
    if t.stride() == q.stride():
        return t
    return torch.empty_like(q, dtype=t.dtype).copy_(t)


class FusedMasks:
    """One CPU tensor's masks kept by the compiled passes (:mod:`paramdyn.reach_kernels`):
    the two masks as bools and θ0, laid out as the tensor (one memory order for all)."""

    def __init__(self, q: torch.Tensor, reached, moved, theta0: torch.Tensor):
        from . import reach_kernels  # numba: only for a tracker with this much to track

        self.kernels, self.q = reach_kernels, q
        self.reached, self.moved = _laid_out(reached, q), _laid_out(moved, q)
        self.theta0 = _laid_out(theta0, q)
        self._reached, self._moved = flat(self.reached), flat(self.moved)
        self._theta0 = flat(self.theta0)

    def add_gradient(self, g: torch.Tensor) -> None:
        if g.stride() == self.q.stride():
            self.kernels.mark_nonzero(flat(g), self._reached)
        else:  # a gradient laid out unlike its parameter: the torch form, this once
            self.reached |= g != 0

    def add_value(self) -> None:
        self.kernels.mark_changed(flat(self.q), self._theta0, self._moved)


class Reach:
    """Per entry of every parameter tensor: did any step give it a non-zero gradient
    ('reached'), and did it ever differ from its initial value ('moved'). Exact, and
    cheap: a CPU step pays for every extra op (tens of microseconds each, in the middle
    of a step) and every extra pass over the weights (on a 32x32 ResNet-18, two thirds of
    the weights are never reached and stay in the update).

    - reached: the OR of the gradients' bit patterns (one in-place integer op a tensor
      after ``backward()``) has a magnitude bit set: some g != 0 (-0.0 has the sign bit
      only, a NaN its exponent bits);
    - moved: the largest and smallest value so far, from θ0 (two ``torch._foreach`` calls
      after the optimizer step, for all tensors), differ: some θ_t != θ0 (+0.0 and -0.0
      compare equal; a NaN makes both NaN, which differ).

    A tensor whose entries are all reached (moved) cannot change any more, so it is
    dropped from the update (exact; with SGD or Adam nearly every tensor is complete
    after the first step, or never). The complete ones are looked for after steps 1, 4,
    16, 64, ... (powers of four: each look is a few passes over the open tensors, and one
    read back of one flag per tensor) and after a snapshot is restored. When the open
    tensors on a CPU then hold :data:`FUSED_MIN_ENTRIES` entries or more, they go over to
    :class:`FusedMasks` (one compiled pass each a step instead of three ops; the same
    masks). Its updates are called under ``torch.no_grad()`` (as
    :class:`GradientRecorder` calls them)."""

    def __init__(self, params: list[torch.Tensor]):
        self.params = params
        self.grad_or = [torch.zeros_like(q, dtype=_BITS[q.element_size()]) for q in params]
        self.magnitude = [torch.iinfo(b.dtype).max for b in self.grad_or]  # all but the sign
        self.value_hi = [q.detach().clone() for q in params]
        self.value_lo = [q.detach().clone() for q in params]
        self.fused: dict[int, FusedMasks] = {}
        self._set_open(list(range(len(params))), list(range(len(params))))
        self.seen = 0

    def _set_open(self, reached: list[int], moved: list[int]) -> None:
        """The tensors still tracked, and the torch form's lists for the hot path."""
        self.open_reached, self.open_moved = reached, moved
        self._or = [(self.grad_or[i], self.params[i]) for i in reached if i not in self.fused]
        torch_moved = [i for i in moved if i not in self.fused]
        self._values = [self.params[i] for i in torch_moved]
        self._hi = [self.value_hi[i] for i in torch_moved]
        self._lo = [self.value_lo[i] for i in torch_moved]
        self._fused_reached = [self.fused[i] for i in reached if i in self.fused]
        self._fused_moved = [self.fused[i] for i in moved if i in self.fused]

    def after_backward(self) -> None:
        for acc, q in self._or:
            if q.grad is not None:  # no gradient: a zero one
                acc.bitwise_or_(q.grad.view(acc.dtype))
        for f in self._fused_reached:
            if f.q.grad is not None:
                f.add_gradient(f.q.grad)

    def after_step(self) -> None:
        if self._values:  # called under no_grad
            torch._foreach_maximum_(self._hi, self._values)
            torch._foreach_minimum_(self._lo, self._values)
        for f in self._fused_moved:
            f.add_value()
        self.seen += 1
        if self.seen & (self.seen - 1) == 0 and self.seen.bit_length() % 2:  # 1, 4, 16, ...
            self.prune()

    def _reached(self, i: int) -> torch.Tensor:
        """Tensor ``i``'s mask: the live one of a compiled-form tensor, else a new one."""
        if i in self.fused:
            return self.fused[i].reached
        return self.grad_or[i].bitwise_and(self.magnitude[i]) != 0

    def _moved(self, i: int) -> torch.Tensor:
        if i in self.fused:
            return self.fused[i].moved
        return self.value_hi[i] != self.value_lo[i]

    @property
    def reached(self) -> list[torch.Tensor]:
        return self._masks(self._reached, self.open_reached)

    @property
    def moved(self) -> list[torch.Tensor]:
        return self._masks(self._moved, self.open_moved)

    def _masks(self, mask, open_: list[int]) -> list[torch.Tensor]:
        """Per tensor, a copy of ``mask(i)``; all True for a dropped (complete) one,
        without a pass. Only a compiled-form mask needs copying (it keeps changing)."""
        out = []
        for i, q in enumerate(self.params):
            if i not in open_:
                out.append(torch.ones_like(q, dtype=torch.bool))
            else:
                out.append(mask(i).clone() if i in self.fused else mask(i))
        return out

    def _all_reached(self, i: int) -> torch.Tensor:
        if i in self.fused:
            return self.fused[i].reached.all()
        # in place (no temporary): the sign bit never mattered, later ORs add bits
        return self.grad_or[i].bitwise_and_(self.magnitude[i]).all()

    def prune(self) -> None:
        """Stop updating the tensors whose masks are complete. The moved mask is looked at
        only in tensors whose entries are all reached (an entry never reached rarely moves;
        one that does, under weight decay, stays tracked: also exact). Two read backs.
        Then the open CPU tensors go over to the compiled passes when they are many."""
        reached = self.open_reached
        if reached:
            done = torch.stack([self._all_reached(i) for i in reached]).tolist()
            reached = [i for i, d in zip(reached, done, strict=True) if not d]
        unreached = set(reached)
        look = [i for i in self.open_moved if i not in unreached]
        complete = set()
        if look:
            flags = torch.stack([self._moved(i).all() for i in look]).tolist()
            complete = {i for i, d in zip(look, flags, strict=True) if d}
        moved = [i for i in self.open_moved if i not in complete]
        for i in set(self.fused) - set(reached) - set(moved):
            del self.fused[i]  # complete
        self._fuse(set(reached) | set(moved))
        self._set_open(reached, moved)

    def _fuse(self, open_: set[int]) -> None:
        """The open tensors to :class:`FusedMasks`, when they hold at least
        :data:`FUSED_MIN_ENTRIES` entries on a CPU (θ0: the largest value so far, which
        is θ0 wherever the entry has not moved, and does not matter where it has)."""
        todo = [i for i in sorted(open_) if i not in self.fused and fusable(self.params[i])]
        entries = sum(self.params[i].numel() for i in todo) + sum(
            self.params[i].numel() for i in self.fused
        )
        if not todo or FUSED_MIN_ENTRIES is None or entries < FUSED_MIN_ENTRIES:
            return
        for i in todo:
            self.fused[i] = FusedMasks(
                self.params[i], self._reached(i), self._moved(i), self.value_hi[i]
            )
            self.grad_or[i] = self.value_hi[i] = self.value_lo[i] = None  # memory back

    def load_masks(self, reached: list[torch.Tensor], moved: list[torch.Tensor]) -> None:
        """Continue from masks (a snapshot's), in a tracker built on the initial weights:
        a reached entry as a gradient bit 1, a moved one as a largest value of +inf."""
        if self.seen or self.fused:
            raise RuntimeError("Reach.load_masks: only into a tracker built on the initial weights")
        for i, (r, m) in enumerate(zip(reached, moved, strict=True)):
            r, m = r.to(self.grad_or[i].device), m.to(self.grad_or[i].device)
            self.grad_or[i].copy_(r)
            self.value_hi[i].masked_fill_(m, math.inf)
        self._set_open(list(range(len(self.params))), list(range(len(self.params))))
        self.prune()


class GradientRecorder:
    """Per-tensor gradient statistics every ``every`` steps (L2 norm, max |g|, exact zeros,
    NaN and Inf counts), computed on the device right after ``backward()`` and kept there:
    they are read back only at the loop's sync points (epoch ends, snapshots), so recording
    adds no device synchronisation. With ``track_reached`` it also keeps, per entry,
    whether any step ever gave it a non-zero gradient and whether it ever left its initial
    value (:class:`Reach`)."""

    def __init__(self, model: torch.nn.Module, every: int | None, track_reached: bool):
        named = list(model.named_parameters())
        self.names = [n for n, _ in named]
        self.params = [q for _, q in named]
        self.every = every
        self.pending: list[tuple[int, torch.Tensor]] = []
        self.steps: list[int] = []
        self.stats: list[torch.Tensor] = []  # each (n_tensors, len(GRAD_STATS)), float64, CPU
        self.reach = Reach(self.params) if track_reached else None

    @property
    def track(self) -> bool:
        return self.reach is not None

    @property
    def active(self) -> bool:
        return bool(self.every) or self.track

    @property
    def reached(self) -> list[torch.Tensor] | None:
        """Per tensor, the entries that got a non-zero gradient at some step (a bool mask)."""
        return self.reach.reached if self.track else None

    @property
    def moved(self) -> list[torch.Tensor] | None:
        """Per tensor, the entries that differed from their initial value after some step."""
        return self.reach.moved if self.track else None

    @torch.no_grad()
    def after_backward(self, step: int) -> None:
        """``step``: the optimizer step about to be taken (1 = the first)."""
        if self.track:
            self.reach.after_backward()
        if self.every and step % self.every == 0:
            grads = [q.grad if q.grad is not None else torch.zeros_like(q) for q in self.params]
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
        if self.track:
            self.reach.after_step()

    def flush(self) -> None:
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
        if self.track:
            self.reach.load_masks(
                [t[f"reached.{n}"] for n in self.names], [t[f"moved.{n}"] for n in self.names]
            )

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
