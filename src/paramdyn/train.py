"""Training: one run of a study's grid, from its :class:`~paramdyn.config.RunSpec`.

The whole dataset sits on the training device as uint8 (``data.DeviceData``); batches are
normalised there. Loss and accuracy accumulate on the device and are read back once per
epoch, so the loop never waits on the GPU per step. Checkpoints are written at step 0 (the
init), at the configured cadence, and at the end.

Reliability. A run trains in a work directory outside the rule's declared outputs
(``results/.work/<study>/<run_id>``), keyed by the run's hyper-parameters and the code
that trains it:

- a snapshot (model, optimizer, schedule, RNG and data-order state, the history so far) is
  written atomically once ``snapshot_seconds`` have passed since the last one (looked at
  after every step and epoch end; a short run may write none);
  a killed job started again continues from it and ends bitwise identical (on CPU) to an
  uninterrupted run;
- when training is complete, the files are published (hard-linked) into the run directory;
  a forced rerun with the same key (``--forceall``) republishes them instead of retraining;
- a NaN or Inf loss stops the run early: it is marked ``diverged`` in run.json and history,
  and its checkpoints, history and measures still come out.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from safetensors import safe_open

from . import __version__, catalog, checkpoints, tables
from .config import RunSpec
from .data import DeviceData
from .inits import initialise
from .models import build_model

log = logging.getLogger("paramdyn.train")

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": lambda params, lr, momentum, weight_decay, nesterov, **kw: torch.optim.SGD(
        params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov, **kw
    ),
    "adam": lambda params, lr, weight_decay, betas, eps, **kw: torch.optim.Adam(
        params, lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps, **kw
    ),
    "adamw": lambda params, lr, weight_decay, betas, eps, **kw: torch.optim.AdamW(
        params, lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps, **kw
    ),
}


def make_optimizer(name: str, params, settings: dict[str, Any]) -> torch.optim.Optimizer:
    """The registered optimizer, with PyTorch's fused kernel where the device has one (one
    kernel per step for all parameters: Adam's step is 7x faster on a CPU); else the
    default implementation."""
    params = list(params)
    try:
        return OPTIMIZERS[name](params, **settings, fused=True)
    except (RuntimeError, ValueError, TypeError):
        return OPTIMIZERS[name](params, **settings)


# step -> multiplier of the base learning rate, given the total number of steps
SCHEDULES: dict[str, Callable[[int, int], float]] = {
    "constant": lambda step, total: 1.0,
    "cosine": lambda step, total: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total)),
    "step": lambda step, total: 0.1 ** ((step >= total // 2) + (step >= (3 * total) // 4)),
}

DIVERGENCE_CHECK_STEPS = 10  # a non-finite loss is looked for every N steps (one sync)
SNAPSHOT = "snapshot.safetensors"


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch sees no CUDA device")
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(requested)


def set_deterministic(enabled: bool) -> None:
    """Deterministic GPU kernels (cuDNN and cuBLAS): bitwise repeatable GPU runs, at a cost
    in speed (no cuDNN autotuning; some ops fall back to slower deterministic kernels)."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = enabled
    torch.use_deterministic_algorithms(enabled, warn_only=False)


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: DeviceData, split: str, batch_size: int, stride=1):
    model.eval()
    loss = torch.zeros((), device=data.train_x.device, dtype=torch.float64)
    correct = torch.zeros((), device=data.train_x.device, dtype=torch.int64)
    n = 0
    for x, y in data.eval_batches(split, batch_size, stride):
        out = model(x)
        loss += F.cross_entropy(out, y, reduction="sum").double()
        correct += (out.argmax(1) == y).sum()
        n += y.shape[0]
    return loss.item() / n, correct.item() / n


GRAD_STATS = ("grad_l2", "grad_max_abs", "zeros", "nans", "infs")


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

    @property
    def active(self) -> bool:
        return bool(self.every) or self.reached is not None

    @torch.no_grad()
    def after_backward(self, step: int) -> None:
        """``step``: the optimizer step about to be taken (1 = the first)."""
        grads = [q.grad if q.grad is not None else torch.zeros_like(q) for q in self.params]
        if self.reached is not None:
            for r, g in zip(self.reached, grads, strict=True):
                r.logical_or_(g != 0)
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
            for m, q, q0 in zip(self.moved, self.params, self.initial, strict=True):
                m.logical_or_(q != q0)

    def flush(self) -> None:
        for step, st in self.pending:
            self.steps.append(step)
            self.stats.append(st.cpu())
        self.pending.clear()

    def state(self) -> dict[str, torch.Tensor]:
        self.flush()
        out = {"grad.steps": torch.tensor(self.steps, dtype=torch.int64)}
        out["grad.stats"] = (
            torch.stack(self.stats) if self.stats else torch.zeros(0, len(self.names), 5)
        ).double()
        if self.reached is not None:
            for n, r, m in zip(self.names, self.reached, self.moved, strict=True):
                out[f"reached.{n}"], out[f"moved.{n}"] = r.cpu(), m.cpu()
        return out

    def load(self, t: dict[str, torch.Tensor]) -> None:
        self.steps = t["grad.steps"].tolist()
        self.stats = list(t["grad.stats"].unbind(0))
        if self.reached is not None:
            for i, n in enumerate(self.names):
                self.reached[i].copy_(t[f"reached.{n}"])
                self.moved[i].copy_(t[f"moved.{n}"])

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
        blocks = df.groupby(["step", "block"], sort=False).agg(
            depth=("depth", "first"), numel=("numel", "sum"), sq=("sq", "sum"),
            grad_max_abs=("grad_max_abs", "max"), zeros=("zeros", "sum"),
            nans=("nans", "sum"), infs=("infs", "sum"),
        ).reset_index()  # fmt: skip
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


def _write_snapshot(path: Path, key: str, model, optimizer, sched, gen, p: Progress, grads) -> None:
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors.update(grads.state())
    opt = optimizer.state_dict()
    for idx, st in opt["state"].items():
        for name, v in st.items():
            tensors[f"opt.{idx}.{name}"] = v.detach().cpu().contiguous()
    tensors["rng.data"] = gen.get_state()
    tensors["rng.epoch"] = p.epoch_rng if p.epoch_rng is not None else gen.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {
        "key": key,
        "param_groups": json.dumps(opt["param_groups"]),
        "sched": json.dumps(sched.state_dict()),
        "progress": json.dumps(
            {k: v for k, v in p.__dict__.items() if k != "epoch_rng"}, allow_nan=True
        ),
    }
    checkpoints.write_safetensors(tensors, path, meta)


def _read_snapshot(path: Path, key: str, model, optimizer, sched, gen, grads) -> Progress | None:
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
    model.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("model.")})
    state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in t.items():
        if k.startswith("opt."):
            _, idx, name = k.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    # load_state_dict moves each state tensor to its parameter's device; the memory layout
    # (channels_last) must follow the parameter's too: fused optimizers walk them as flat
    # arrays side by side
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    for q, st in optimizer.state.items():
        for name, v in st.items():
            if torch.is_tensor(v) and v.shape == q.shape and v.stride() != q.stride():
                st[name] = torch.empty_like(q, dtype=v.dtype).copy_(v)
    sched.load_state_dict(json.loads(meta["sched"]))
    grads.load(t)
    gen.set_state(t["rng.data"])
    torch.set_rng_state(t["rng.torch"])
    p = Progress(**json.loads(meta["progress"]))
    p.epoch_rng = t["rng.epoch"]
    return p


def _publish(work: Path, run_dir: Path) -> None:
    """Hard-link (or copy, across file systems) the finished run into its run directory."""
    out = run_dir / "checkpoints"
    out.mkdir(parents=True, exist_ok=True)
    names = [
        (work / "checkpoints" / p.name, out / p.name) for p in (work / "checkpoints").iterdir()
    ]
    extra = [n for n in ("gradients.parquet", "grad_reached.safetensors") if (work / n).exists()]
    if not (work / "grad_reached.safetensors").exists():  # none from an earlier training
        (run_dir / "grad_reached.safetensors").unlink(missing_ok=True)
    names += [(work / n, run_dir / n) for n in (*extra, "history.parquet", "run.json")]
    for src, dst in names:
        tmp = dst.with_name(dst.name + ".tmp")
        tmp.unlink(missing_ok=True)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copy2(src, tmp)
        os.replace(tmp, dst)


def sync(p: Progress, loss_sum, correct, bad) -> bool:
    """Read the epoch's accumulators back from the device (one synchronisation); True when
    the loss went non-finite."""
    p.loss_sum, p.correct = loss_sum.item(), int(correct.item())
    return bool(bad.item())


def run_key(spec: RunSpec, code: str | None = None) -> str:
    """What a trained run depends on: its hyper-parameters and the code that trains it."""
    text = spec.to_json() + "\0" + (code or __version__)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def train_run(
    spec: RunSpec,
    dataset_path: Path | str,
    run_dir: Path | str,
    *,
    work_dir: Path | str | None = None,
    code: str | None = None,
    device: str = "auto",
    threads: int = 1,
    snapshot_seconds: float = 300.0,
    deterministic: bool = False,
    init_checkpoint: Path | str | None = None,
) -> dict[str, Any]:
    """Train one run (or continue it, or republish it). Writes ``checkpoints/``,
    ``history.parquet`` and ``run.json`` (last) in ``run_dir``; returns run.json's content.

    ``work_dir`` (default: ``<run_dir>.work``) holds the run while it trains; ``code``
    identifies the training code (a snapshot or finished run made by other code or other
    hyper-parameters is discarded). ``init_checkpoint``: the checkpoint that init
    'from_run' starts from."""
    run_dir = Path(run_dir)
    work = Path(work_dir) if work_dir is not None else run_dir.with_name(run_dir.name + ".work")
    key = run_key(spec, code)
    key_file = work / "key"
    if work.exists() and (not key_file.exists() or key_file.read_text() != key):
        log.info("discarding %s: made for other hyper-parameters or code", work)
        shutil.rmtree(work)
    if (work / "run.json").exists():
        log.info("run %s already trained with this key: publishing %s", spec.run_id, work)
        _publish(work, run_dir)
        return json.loads((run_dir / "run.json").read_text())
    (work / "checkpoints").mkdir(parents=True, exist_ok=True)
    key_file.write_text(key)

    torch.set_num_threads(threads)
    set_deterministic(deterministic)
    dev = resolve_device(device)
    t0 = time.perf_counter()

    data = DeviceData.load(
        dataset_path, dev, normalize=spec.normalize, augment=spec.augment, inputs=spec.inputs
    )
    model = build_model(spec.model_name, spec.dataset, spec.model_settings, spec.inputs)
    if spec.perturbation:  # a branch: the source run's final weights, perturbed
        from .perturb import perturb_checkpoint

        options = dict(spec.perturbation_options)
        state, _ = perturb_checkpoint(
            init_checkpoint, options.pop("name"), options, seed=spec.seed,
            model_name=spec.model_name, dataset=spec.dataset,
            model_settings=spec.model_settings, init=spec.init,
            init_options=spec.init_options, inputs=spec.inputs,
        )  # fmt: skip
        model.load_state_dict(state)
    else:
        initialise(
            model,
            spec.init_name or spec.init,
            spec.seed,
            options=spec.init_options,
            pretrained=catalog.MODELS[spec.model_name].pretrained,
            source=init_checkpoint,
        )
    model.to(dev)
    conv = any(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    if conv:  # NHWC: faster convolutions on CPU (oneDNN) and GPU (tensor cores)
        model.to(memory_format=torch.channels_last)
    data.channels_last = conv
    blocks = model.block_names()
    forward = torch.compile(model) if spec.compile else model
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=spec.precision == "bf16")

    opt_settings = dict(spec.optimizer_settings)
    optimizer = make_optimizer(spec.optimizer_name, model.parameters(), opt_settings)
    n_train = data.train_x.shape[0]
    steps_per_epoch = -(-n_train // spec.batch_size)
    total = steps_per_epoch * spec.epochs
    schedule = SCHEDULES[spec.schedule]
    lr_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: schedule(s, total))
    gen = torch.Generator().manual_seed(spec.seed)  # data order (and augmentation)
    grads = GradientRecorder(model, spec.gradients_every_steps, spec.track_grad_reached)

    snap = work / SNAPSHOT
    p = _read_snapshot(snap, key, model, optimizer, lr_sched, gen, grads) if snap.exists() else None
    resumed = p is not None
    if p is None:
        p = Progress()
    else:
        log.info("resuming %s at step %d (epoch %d, batch %d)", spec.run_id, p.step, p.epoch,
                 p.batch)  # fmt: skip
    last_snapshot = time.monotonic()

    def snapshot() -> None:
        nonlocal last_snapshot
        _write_snapshot(snap, key, model, optimizer, lr_sched, gen, p, grads)
        last_snapshot = time.monotonic()

    def save(step: int) -> None:
        if p.saved and p.saved[-1] == step:
            return
        checkpoints.save_checkpoint(
            work / "checkpoints",
            model,
            epoch=step // steps_per_epoch,
            step=step,
            epoch_end=step % steps_per_epoch == 0,
            run_id=spec.run_id,
            blocks=blocks,
        )
        p.saved.append(step)

    def record(epoch: int, split: str, loss: float, acc: float) -> None:
        p.history.append(
            {
                "epoch": epoch,
                "step": p.step,
                "split": split,
                "loss": loss,
                "accuracy": acc,
                "lr": optimizer.param_groups[0]["lr"],
                "seconds": time.perf_counter() - t0,
            }
        )

    if not resumed:
        log.info("run %s on %s: %d params, %d steps", spec.run_id, dev,
                 sum(q.numel() for q in model.parameters()), total)  # fmt: skip
        save(0)
        # the init on the training split: every k-th image, about as many as the test split
        # has (the full pass would cost a third of an epoch on a large dataset)
        stride = max(1, n_train // data.test_x.shape[0])
        record(0, "train", *evaluate(model, data, "train", spec.eval_batch_size, stride))
        record(0, "test", *evaluate(model, data, "test", spec.eval_batch_size))

    while p.epoch < spec.epochs and p.status == "running":
        epoch = p.epoch + 1
        if p.batch == 0:  # a fresh epoch (else: continue the one a snapshot stopped in)
            p.epoch_rng, p.loss_sum, p.correct = gen.get_state(), 0.0, 0
        else:
            gen.set_state(p.epoch_rng)
        model.train()
        loss_sum = torch.tensor(p.loss_sum, device=dev, dtype=torch.float64)
        correct = torch.tensor(p.correct, device=dev, dtype=torch.int64)
        bad = torch.zeros((), device=dev, dtype=torch.bool)
        seen = p.batch * spec.batch_size

        acc = (loss_sum, correct, bad)
        for i, (x, y) in enumerate(data.train_batches(spec.batch_size, gen)):
            if i < p.batch:  # replay the data order (and augmentation draws) up to here
                continue
            with autocast:
                out = forward(x)
                loss = F.cross_entropy(out.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grads.active:
                grads.after_backward(p.step + 1)
            optimizer.step()
            if grads.moved is not None:
                grads.after_step()
            lr_sched.step()
            p.step, p.batch, seen = p.step + 1, i + 1, seen + y.shape[0]
            with torch.no_grad():
                loss_sum += loss.detach().double() * y.shape[0]
                correct += (out.argmax(1) == y).sum()
                bad |= ~torch.isfinite(loss.detach())
            if p.step % DIVERGENCE_CHECK_STEPS == 0 and sync(p, *acc):
                break
            if spec.checkpoint_every_steps and p.step % spec.checkpoint_every_steps == 0:
                save(p.step)
            if time.monotonic() - last_snapshot >= snapshot_seconds:
                sync(p, *acc)
                snapshot()
        if sync(p, *acc):
            p.status, p.diverged_at_step = "diverged", p.step
            log.warning("run %s diverged (non-finite loss) by step %d: stopping", spec.run_id,
                        p.step)  # fmt: skip
            record(epoch, "train", p.loss_sum / seen, p.correct / seen)
            save(p.step)
            break
        record(epoch, "train", p.loss_sum / n_train, p.correct / n_train)
        test_loss, test_acc = evaluate(model, data, "test", spec.eval_batch_size)
        record(epoch, "test", test_loss, test_acc)
        if (
            spec.checkpoint_every_epochs and epoch % spec.checkpoint_every_epochs == 0
        ) or epoch == spec.epochs:
            save(p.step)
        p.epoch, p.batch = epoch, 0
        log.info(
            "epoch %d/%d step %d: train loss %.4f acc %.4f | test loss %.4f acc %.4f | %.1fs",
            epoch, spec.epochs, p.step, p.history[-2]["loss"], p.history[-2]["accuracy"],
            test_loss, test_acc, time.perf_counter() - t0,
        )  # fmt: skip
        if time.monotonic() - last_snapshot >= snapshot_seconds:
            snapshot()
    if p.status == "running":
        p.status = "completed"
    grad_table = grads.table(model.block_of(), lambda s: s // steps_per_epoch)
    _write_run_table(grad_table, spec, p.status, work / "gradients.parquet")
    if grads.reached is not None:
        masks = {f"reached.{n}": r for n, r in zip(grads.names, grads.reached, strict=True)}
        masks.update({f"moved.{n}": m for n, m in zip(grads.names, grads.moved, strict=True)})
        checkpoints.write_safetensors(
            masks,
            work / "grad_reached.safetensors",
            {
                "run_id": spec.run_id,
                "reached": "the entry received a non-zero gradient at some step",
                "moved": "the entry differed from its initial value after some step",
            },
        )
    return _finish(spec, p, work, run_dir, dev, threads, steps_per_epoch, total, t0)


RUN_COLUMNS = ("run_id", "study", "model", "dataset", "init", "optimizer", "seed", "shortcut",
               "perturbation")  # fmt: skip


def _write_run_table(df: pd.DataFrame, spec: RunSpec, status: str, path: Path) -> None:
    """Prefix the grid coordinates, suffix the run's status, write atomically."""
    for i, k in enumerate(RUN_COLUMNS):
        df.insert(
            i, k, pd.Series([getattr(spec, k)] * len(df), dtype=object if k != "seed" else "int64")
        )
    df["status"] = status
    tables.write_parquet(df, path, {"run_id": spec.run_id})


def _finish(spec, p: Progress, work, run_dir, dev, threads, steps_per_epoch, total, t0):
    hist = pd.DataFrame(p.history)
    _write_run_table(hist, spec, p.status, work / "history.parquet")
    test_rows = hist[hist.split == "test"]
    best = test_rows.loc[test_rows.accuracy.idxmax()] if test_rows.accuracy.notna().any() else None
    info = {
        "run_id": spec.run_id,
        "status": p.status,
        "diverged_at_step": p.diverged_at_step,
        "hparams": spec.to_dict(),
        "derived": {
            "steps_per_epoch": steps_per_epoch,
            "total_steps": total,
            "steps_done": p.step,
        },
        "checkpoints": [checkpoints.checkpoint_name(s) for s in p.saved],
        "result": {
            "final_test_accuracy": float(test_rows.accuracy.iloc[-1]),
            "best_test_accuracy": None if best is None else float(best.accuracy),
            "best_epoch": None if best is None else int(best.epoch),
        },
        "execution": {
            "device": str(dev),
            "threads": threads,
            "seconds": time.perf_counter() - t0,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "host": platform.node(),
        },
    }
    tmp = work / "run.json.tmp"
    tmp.write_text(json.dumps(info, indent=2, sort_keys=True))
    os.replace(tmp, work / "run.json")
    (work / SNAPSHOT).unlink(missing_ok=True)  # the finished run needs no snapshot
    _publish(work, run_dir)
    return info
