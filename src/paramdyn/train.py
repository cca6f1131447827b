"""Training: one run of a study's grid, from its :class:`~paramdyn.config.RunSpec`.

The whole dataset sits on the training device, normalised once (``data.DeviceData``): a
batch is a gather. Each step's loss and logits are kept on the device and summed when the
divergence check reads them (every 10 steps), so the loop never waits on the GPU per step.
On a CPU every small op in a step costs tens of microseconds, so a step does no more than
it must. Checkpoints are written at step 0 (the init), at the configured cadence, and at
the end.

:func:`train_run` builds a :class:`Run` and calls :func:`train_one_epoch` until done; what
happens every so many steps (the schedule, gradient records, the divergence check, step
checkpoints, snapshots) is a list of :class:`Callback` objects, called in order after every
step.

Reliability (the work directory and snapshots: :mod:`paramdyn.resume`):

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

import logging
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F

from . import catalog, checkpoints, paths, tables
from .config import RunSpec
from .data import DeviceData
from .devices import resolve_device
from .gradients import GradientRecorder
from .inits import initialise
from .models import build_model
from .perturb import perturb_checkpoint
from .resume import Progress, TrainState, WorkDir, run_key
from .runs import read_info

log = logging.getLogger("paramdyn.train")

# catalog.OPTIMIZERS name -> the function that builds it
OPTIMIZER_BUILDERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
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
        return OPTIMIZER_BUILDERS[name](params, **settings, fused=True)
    except (RuntimeError, ValueError, TypeError):
        return OPTIMIZER_BUILDERS[name](params, **settings)


# catalog.SCHEDULES name -> (step, total steps) -> multiplier of the base learning rate
SCHEDULE_BUILDERS: dict[str, Callable[[int, int], float]] = {
    "constant": lambda step, total: 1.0,
    "cosine": lambda step, total: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total)),
    "step": lambda step, total: 0.1 ** ((step >= total // 2) + (step >= (3 * total) // 4)),
}

DIVERGENCE_CHECK_STEPS = 10  # a non-finite loss is looked for every N steps (one sync)


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


def initial_model(spec: RunSpec, init_checkpoint: Path | str | None) -> torch.nn.Module:
    """The run's model at step 0: built and initialised by its init, or (a perturbation
    branch) the source run's final weights (or its checkpoint at ``branch_step``), perturbed."""
    model = build_model(spec.model_name, spec.dataset, spec.model_settings, spec.inputs)
    if spec.perturbation:
        options = dict(spec.perturbation_options)
        state, _ = perturb_checkpoint(
            init_checkpoint,
            options.pop("name"),
            options,
            seed=spec.seed,
            model_name=spec.model_name,
            dataset=spec.dataset,
            model_settings=spec.model_settings,
            init=spec.init,
            init_options=spec.init_options,
            inputs=spec.inputs,
        )
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
    return model


@dataclass
class Meter:
    """The epoch's summed loss and correct count. A step only keeps its loss, logits and
    labels (no arithmetic: every small op costs a CPU step tens of microseconds); the sums
    are taken when read (:meth:`sync`: the divergence check every 10 steps, snapshots,
    the epoch's end), the loss in float64 in step order, as the per-step sum did."""

    loss_sum: float
    correct: int
    kept: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)

    @classmethod
    def resume(cls, p: Progress) -> Meter:
        """Continuing the sums ``p`` holds (zero at an epoch's start)."""
        return cls(p.loss_sum, p.correct)

    def add(self, loss: torch.Tensor, out: torch.Tensor, y: torch.Tensor) -> None:
        self.kept.append((loss.detach(), out.detach(), y))

    @torch.no_grad()
    def sync(self, p: Progress) -> bool:
        """Add the kept steps to the sums and into ``p`` (one read back); True when the
        loss went non-finite (it stays so: no finite float32 losses overflow the sum)."""
        if self.kept:
            losses, outs, ys = zip(*self.kept, strict=True)
            for loss, y in zip(torch.stack(losses).tolist(), ys, strict=True):
                self.loss_sum += loss * y.shape[0]  # exact product, the same float64 adds
            self.correct += int((torch.cat(outs).argmax(1) == torch.cat(ys)).sum())
            self.kept.clear()
        p.loss_sum, p.correct = self.loss_sum, self.correct
        return not math.isfinite(self.loss_sum)


@dataclass
class Run:
    """One run being trained: what :func:`train_one_epoch` and the callbacks share."""

    spec: RunSpec
    device: torch.device
    data: DeviceData
    state: TrainState  # model, optimizer, schedule, RNG, gradient records, progress
    forward: Callable[[torch.Tensor], torch.Tensor]  # the model, compiled or not
    autocast: torch.autocast
    blocks: list[str]
    checkpoint_dir: Path
    t0: float  # perf_counter at the start: the history's and run.json's seconds
    meter: Meter | None = None  # the current epoch's

    @classmethod
    def build(
        cls,
        spec: RunSpec,
        dataset_path: Path | str,
        device: torch.device,
        checkpoint_dir: Path,
        init_checkpoint: Path | str | None = None,
    ) -> Run:
        """The dataset on the device, the initialised model, its optimizer and schedule."""
        t0 = time.perf_counter()
        data = DeviceData.load(
            dataset_path, device, normalize=spec.normalize, augment=spec.augment, inputs=spec.inputs
        )
        model = initial_model(spec, init_checkpoint).to(device)
        conv = any(isinstance(m, torch.nn.Conv2d) for m in model.modules())
        if conv:  # NHWC: faster convolutions on CPU (oneDNN) and GPU (tensor cores)
            model.to(memory_format=torch.channels_last)
        data.channels_last = conv
        data.hold_normalised()  # each batch a gather, each evaluation batch a slice
        optimizer = make_optimizer(
            spec.optimizer_name, model.parameters(), dict(spec.optimizer_settings)
        )
        total = -(-data.train_x.shape[0] // spec.batch_size) * spec.epochs
        schedule = SCHEDULE_BUILDERS[spec.schedule]
        state = TrainState(
            model=model,
            optimizer=optimizer,
            lr_scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: schedule(s, total)),
            gen=torch.Generator().manual_seed(spec.order_seed),  # data order, augmentation
            grads=GradientRecorder(model, spec.gradients_every_steps, spec.track_grad_reached),
        )
        bf16 = spec.precision == "bf16"
        return cls(
            spec=spec,
            device=device,
            data=data,
            state=state,
            forward=torch.compile(model) if spec.compile else model,
            autocast=torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16),
            blocks=model.block_names(),
            checkpoint_dir=checkpoint_dir,
            t0=t0,
        )

    @property
    def n_train(self) -> int:
        return self.data.train_x.shape[0]

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.n_train // self.spec.batch_size)

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.spec.epochs

    def save(self, step: int) -> None:
        """The model's checkpoint at ``step`` (once)."""
        p = self.state.progress
        if p.saved and p.saved[-1] == step:
            return
        checkpoints.save_checkpoint(
            self.checkpoint_dir,
            self.state.model,
            epoch=step // self.steps_per_epoch,
            step=step,
            epoch_end=step % self.steps_per_epoch == 0,
            run_id=self.spec.run_id,
            blocks=self.blocks,
        )
        p.saved.append(step)

    def record(self, epoch: int, split: str, loss: float, acc: float) -> None:
        """One row of the history, at the current step."""
        p = self.state.progress
        p.history.append(
            {
                "epoch": epoch,
                "step": p.step,
                "split": split,
                "loss": loss,
                "accuracy": acc,
                "lr": self.state.optimizer.param_groups[0]["lr"],
                "seconds": time.perf_counter() - self.t0,
            }
        )


class Callback:
    """A cadence of the training loop. Each hook is called for every callback of the run's
    list, in order: ``after_backward`` once the gradients are there (the optimizer step
    not taken yet), ``after_step`` after the optimizer step (True ends the
    epoch there, and skips the later callbacks), ``after_epoch`` after a completed epoch."""

    def after_backward(self, run: Run) -> None:
        return None

    def after_step(self, run: Run) -> bool:
        return False

    def after_epoch(self, run: Run) -> None:
        return None


class GradientRecords(Callback):
    """Gradient statistics and the reached/moved masks (:mod:`paramdyn.gradients`)."""

    def __init__(self, recorder: GradientRecorder):
        self.recorder = recorder

    def after_backward(self, run: Run) -> None:
        self.recorder.after_backward(run.state.progress.step + 1)

    def after_step(self, run: Run) -> bool:
        self.recorder.after_step()
        return False


class ScheduleStep(Callback):
    """The learning-rate schedule's step (only for a schedule that changes the rate: each
    call costs a CPU step tens of microseconds)."""

    def after_step(self, run: Run) -> bool:
        run.state.lr_scheduler.step()
        return False


class DivergenceCheck(Callback):
    """A non-finite loss is looked for every ``every`` steps (one synchronisation); one
    ends the epoch, which marks the run diverged."""

    def __init__(self, every: int = DIVERGENCE_CHECK_STEPS):
        self.every = every

    def after_step(self, run: Run) -> bool:
        p = run.state.progress
        return p.step % self.every == 0 and run.meter.sync(p)


class StepCheckpoints(Callback):
    """A checkpoint every ``every`` steps."""

    def __init__(self, every: int):
        self.every = every

    def after_step(self, run: Run) -> bool:
        if run.state.progress.step % self.every == 0:
            run.save(run.state.progress.step)
        return False


class Snapshots(Callback):
    """A snapshot of the training state into the work directory once ``seconds`` have
    passed since the last one (looked at after every step and epoch end)."""

    def __init__(self, work: WorkDir, seconds: float):
        self.work, self.seconds, self.last = work, seconds, time.monotonic()

    def _write(self, run: Run) -> None:
        self.work.save(run.state)
        self.last = time.monotonic()

    def after_step(self, run: Run) -> bool:
        if time.monotonic() - self.last >= self.seconds:
            run.meter.sync(run.state.progress)  # the epoch's sums so far, into the snapshot
            self._write(run)
        return False

    def after_epoch(self, run: Run) -> None:
        if time.monotonic() - self.last >= self.seconds:
            self._write(run)


def callbacks_for(run: Run, work: WorkDir, snapshot_seconds: float) -> list[Callback]:
    """The run's cadences, in the order they are called."""
    spec, grads = run.spec, run.state.grads
    return [
        *([ScheduleStep()] if spec.schedule != "constant" else []),
        *([GradientRecords(grads)] if grads.active else []),
        DivergenceCheck(),
        *([StepCheckpoints(spec.checkpoint_every_steps)] if spec.checkpoint_every_steps else []),
        Snapshots(work, snapshot_seconds),
    ]


def train_step(run: Run, x: torch.Tensor, y: torch.Tensor, callbacks: list[Callback]) -> None:
    """One optimizer step on one batch; its loss and accuracy add to the epoch's meter."""
    state = run.state
    with run.autocast:
        out = run.forward(x)
        loss = F.cross_entropy(out.float(), y)
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    for cb in callbacks:
        cb.after_backward(run)
    state.optimizer.step()
    run.meter.add(loss, out, y)


def train_one_epoch(run: Run, callbacks: list[Callback]) -> None:
    """One epoch (or the rest of the one a snapshot stopped in), its history rows and
    checkpoint; a non-finite loss marks the run diverged and ends it."""
    spec, p, gen = run.spec, run.state.progress, run.state.gen
    epoch = p.epoch + 1
    if p.batch == 0:  # a fresh epoch (else: continue the one a snapshot stopped in)
        p.epoch_rng, p.loss_sum, p.correct = gen.get_state(), 0.0, 0
    else:
        gen.set_state(p.epoch_rng)
    run.state.model.train()
    run.meter = Meter.resume(p)
    for i, (x, y) in enumerate(run.data.train_batches(spec.batch_size, gen)):
        if i < p.batch:  # replay the data order (and augmentation draws) up to here
            continue
        train_step(run, x, y, callbacks)
        p.step, p.batch = p.step + 1, i + 1
        if any(cb.after_step(run) for cb in callbacks):  # stops at the first True
            break
    if run.meter.sync(p):
        p.status, p.diverged_at_step = "diverged", p.step
        log.warning("run %s diverged (non-finite loss) by step %d: stopping", spec.run_id, p.step)
        seen = min(p.batch * spec.batch_size, run.n_train)  # images this epoch
        run.record(epoch, "train", p.loss_sum / seen, p.correct / seen)
        run.save(p.step)
        return
    run.record(epoch, "train", p.loss_sum / run.n_train, p.correct / run.n_train)
    test_loss, test_acc = evaluate(run.state.model, run.data, "test", spec.eval_batch_size)
    run.record(epoch, "test", test_loss, test_acc)
    every = spec.checkpoint_every_epochs
    if (every and epoch % every == 0) or epoch == spec.epochs:
        run.save(p.step)
    p.epoch, p.batch = epoch, 0
    log.info(
        "epoch %d/%d step %d: train loss %.4f acc %.4f | test loss %.4f acc %.4f | %.1fs",
        epoch,
        spec.epochs,
        p.step,
        p.history[-2]["loss"],
        p.history[-2]["accuracy"],
        test_loss,
        test_acc,
        time.perf_counter() - run.t0,
    )
    for cb in callbacks:
        cb.after_epoch(run)


def record_init(run: Run) -> None:
    """Step 0: the init's checkpoint, and its loss and accuracy on both splits."""
    spec, data, model = run.spec, run.data, run.state.model
    log.info(
        "run %s on %s: %d params, %d steps",
        spec.run_id,
        run.device,
        sum(q.numel() for q in model.parameters()),
        run.total_steps,
    )
    run.save(0)
    # the init on the training split: every k-th image, about as many as the test split
    # has (the full pass would cost a third of an epoch on a large dataset)
    stride = max(1, run.n_train // data.test_x.shape[0])
    run.record(0, "train", *evaluate(model, data, "train", spec.eval_batch_size, stride))
    run.record(0, "test", *evaluate(model, data, "test", spec.eval_batch_size))


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
    work = WorkDir(
        work_dir if work_dir is not None else run_dir.with_name(run_dir.name + ".work"),
        run_key(spec, code),
    )
    if work.open():
        log.info("run %s already trained with this key: publishing %s", spec.run_id, work.path)
        work.publish(run_dir)
        return read_info(run_dir)
    torch.set_num_threads(threads)
    set_deterministic(deterministic)
    run = Run.build(spec, dataset_path, resolve_device(device), work.checkpoints, init_checkpoint)
    resumed = work.restore(run.state)
    callbacks = callbacks_for(run, work, snapshot_seconds)
    p = run.state.progress  # after restore: the snapshot's
    if resumed:
        log.info(
            "resuming %s at step %d (epoch %d, batch %d)", spec.run_id, p.step, p.epoch, p.batch
        )
    else:
        record_init(run)
    while p.epoch < spec.epochs and p.status == "running":
        train_one_epoch(run, callbacks)
    if p.status == "running":
        p.status = "completed"
    info = write_outputs(run, work.path, threads)
    work.finish(info, run_dir)
    return info


def _write_run_table(df: pd.DataFrame, spec: RunSpec, status: str, path: Path) -> None:
    """Prefix the grid coordinates, suffix the run's status, write atomically."""
    tables.insert_run_columns(df, spec.run_id, spec, status)
    tables.write_parquet(df, path, {"run_id": spec.run_id})


def write_outputs(run: Run, work: Path, threads: int) -> dict[str, Any]:
    """The finished run's gradients.parquet, grad_reached.safetensors (with track_reached)
    and history.parquet into ``work``; returns run.json's content."""
    spec, p, grads = run.spec, run.state.progress, run.state.grads
    table = grads.table(run.state.model.block_of(), lambda s: s // run.steps_per_epoch)
    _write_run_table(table, spec, p.status, work / "gradients.parquet")
    if grads.track:
        grads.write_masks(work / paths.GRAD_REACHED, spec.run_id)
    hist = pd.DataFrame(p.history)
    _write_run_table(hist, spec, p.status, work / "history.parquet")
    test_rows = hist[hist.split == "test"]
    best = test_rows.loc[test_rows.accuracy.idxmax()] if test_rows.accuracy.notna().any() else None
    return {
        "run_id": spec.run_id,
        "status": p.status,
        "diverged_at_step": p.diverged_at_step,
        "hparams": spec.to_dict(),
        "derived": {
            "steps_per_epoch": run.steps_per_epoch,
            "total_steps": run.total_steps,
            "steps_done": p.step,
        },
        "checkpoints": [checkpoints.checkpoint_name(s) for s in p.saved],
        "result": {
            "final_test_accuracy": float(test_rows.accuracy.iloc[-1]),
            "best_test_accuracy": None if best is None else float(best.accuracy),
            "best_epoch": None if best is None else int(best.epoch),
        },
        "execution": {
            "device": str(run.device),
            "threads": threads,
            "seconds": time.perf_counter() - run.t0,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "host": platform.node(),
        },
    }
