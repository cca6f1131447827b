"""Training: one run of a study's grid, from its :class:`~paramdyn.config.RunSpec`.

The whole dataset sits on the training device as uint8 (``data.DeviceData``); batches are
normalised there. Loss and accuracy accumulate on the device and are read back once per
epoch, so the loop never waits on the GPU per step. Checkpoints are written at step 0 (the
init), at the configured cadence, and at the end.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F

from . import checkpoints, tables
from .config import RunSpec
from .data import DeviceData
from .inits import initialise
from .models import build_model

log = logging.getLogger("paramdyn.train")

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": lambda params, lr, momentum, weight_decay, nesterov: torch.optim.SGD(
        params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov
    ),
    "adam": lambda params, lr, weight_decay, betas, eps: torch.optim.Adam(
        params, lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps
    ),
    "adamw": lambda params, lr, weight_decay, betas, eps: torch.optim.AdamW(
        params, lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps
    ),
}

# step -> multiplier of the base learning rate, given the total number of steps
SCHEDULES: dict[str, Callable[[int, int], float]] = {
    "constant": lambda step, total: 1.0,
    "cosine": lambda step, total: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total)),
    "step": lambda step, total: 0.1 ** ((step >= total // 2) + (step >= (3 * total) // 4)),
}


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch sees no CUDA device")
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(requested)


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: DeviceData, split: str, batch_size: int):
    model.eval()
    loss = torch.zeros((), device=data.train_x.device, dtype=torch.float64)
    correct = torch.zeros((), device=data.train_x.device, dtype=torch.int64)
    n = 0
    for x, y in data.eval_batches(split, batch_size):
        out = model(x)
        loss += F.cross_entropy(out, y, reduction="sum").double()
        correct += (out.argmax(1) == y).sum()
        n += y.shape[0]
    return loss.item() / n, correct.item() / n


def train_run(
    spec: RunSpec,
    dataset_path: Path | str,
    run_dir: Path | str,
    *,
    device: str = "auto",
    threads: int = 1,
) -> dict[str, Any]:
    """Train one run. Writes ``checkpoints/``, ``history.parquet`` and ``run.json`` (last) in
    ``run_dir``; returns the content of run.json."""
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    torch.set_num_threads(threads)
    dev = resolve_device(device)
    t0 = time.perf_counter()

    data = DeviceData.load(dataset_path, dev, normalize=spec.normalize, augment=spec.augment)
    model = build_model(spec.model_name, spec.dataset, spec.model_settings)
    initialise(model, spec.init, spec.seed)
    model.to(dev)
    blocks = model.block_names()

    opt_settings = dict(spec.optimizer_settings)
    base_lr = opt_settings["lr"]
    optimizer = OPTIMIZERS[spec.optimizer_name](model.parameters(), **opt_settings)
    n_train = data.train_x.shape[0]
    steps_per_epoch = -(-n_train // spec.batch_size)
    total = steps_per_epoch * spec.epochs
    schedule = SCHEDULES[spec.schedule]
    lr_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: schedule(s, total))
    gen = torch.Generator().manual_seed(spec.seed)  # data order (and augmentation)

    history: list[dict[str, Any]] = []
    saved: list[int] = []

    def save(step: int) -> None:
        if saved and saved[-1] == step:
            return
        checkpoints.save_checkpoint(
            ckpt_dir,
            model,
            epoch=step // steps_per_epoch,
            step=step,
            epoch_end=step % steps_per_epoch == 0,
            run_id=spec.run_id,
            blocks=blocks,
        )
        saved.append(step)

    def record(epoch: int, step: int, split: str, loss: float, acc: float) -> None:
        history.append(
            {
                "epoch": epoch,
                "step": step,
                "split": split,
                "loss": loss,
                "accuracy": acc,
                "lr": optimizer.param_groups[0]["lr"],
                "seconds": time.perf_counter() - t0,
            }
        )

    log.info("run %s on %s: %d params, %d steps", spec.run_id, dev,
             sum(p.numel() for p in model.parameters()), total)  # fmt: skip
    save(0)
    for split in ("train", "test"):
        record(0, 0, split, *evaluate(model, data, split, spec.eval_batch_size))

    step = 0
    for epoch in range(1, spec.epochs + 1):
        model.train()
        loss_sum = torch.zeros((), device=dev, dtype=torch.float64)
        correct = torch.zeros((), device=dev, dtype=torch.int64)
        for x, y in data.train_batches(spec.batch_size, gen):
            out = model(x)
            loss = F.cross_entropy(out, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            lr_sched.step()
            step += 1
            with torch.no_grad():
                loss_sum += loss.detach().double() * y.shape[0]
                correct += (out.argmax(1) == y).sum()
            if spec.checkpoint_every_steps and step % spec.checkpoint_every_steps == 0:
                save(step)
        record(epoch, step, "train", loss_sum.item() / n_train, correct.item() / n_train)
        test_loss, test_acc = evaluate(model, data, "test", spec.eval_batch_size)
        record(epoch, step, "test", test_loss, test_acc)
        if (
            spec.checkpoint_every_epochs and epoch % spec.checkpoint_every_epochs == 0
        ) or epoch == spec.epochs:
            save(step)
        log.info(
            "epoch %d/%d step %d: train loss %.4f acc %.4f | test loss %.4f acc %.4f | %.1fs",
            epoch, spec.epochs, step, history[-2]["loss"], history[-2]["accuracy"],
            test_loss, test_acc, time.perf_counter() - t0,
        )  # fmt: skip

    hist = pd.DataFrame(history)
    for k in ("run_id", "study", "model", "dataset", "init", "optimizer", "seed", "shortcut"):
        hist.insert(0 if k == "run_id" else len(hist.columns), k, getattr(spec, k))
    tables.write_parquet(hist, run_dir / "history.parquet", {"run_id": spec.run_id})
    test_rows = hist[hist.split == "test"]
    best = test_rows.loc[test_rows.accuracy.idxmax()]
    info = {
        "run_id": spec.run_id,
        "status": "completed",
        "hparams": spec.to_dict(),
        "derived": {"steps_per_epoch": steps_per_epoch, "total_steps": total, "base_lr": base_lr},
        "checkpoints": [checkpoints.checkpoint_name(s) for s in saved],
        "result": {
            "final_test_accuracy": float(test_rows.accuracy.iloc[-1]),
            "best_test_accuracy": float(best.accuracy),
            "best_epoch": int(best.epoch),
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
    tmp = run_dir / "run.json.tmp"
    tmp.write_text(json.dumps(info, indent=2, sort_keys=True))
    os.replace(tmp, run_dir / "run.json")
    return info
