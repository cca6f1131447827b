"""Shared by the training benchmarks: our training job against the seed studies' loop.

Ours is :func:`paramdyn.train.train_run` on a prepared uint8 dataset file: the whole set
held as one tensor, batches normalised as tensors, loss and accuracy read back once per
epoch, checkpoints and resume snapshots written along the way, evaluation passes at
epoch 0 and after every epoch. The baseline is how the seed studies trained: a
``torchvision.datasets`` object read from its native files, a per-sample
``transforms.Compose([ToTensor(), Normalize(...)])`` (one PIL image at a time), a
``DataLoader(batch_size, shuffle=True, num_workers=0)``, ``loss.item()`` after every step,
and a test-set evaluation after every epoch. Same model, init, optimizer, epochs and batch
size; both with the same number of torch threads, on the same device.

Environment: ``BENCH_THREADS`` (torch threads, default 1), ``BENCH_DEVICE`` (``cpu``, the
default, or ``cuda``: ours keeps the data on the GPU, the baseline moves each batch there
as the seed studies did), ``BENCH_PRECISION`` (``fp32``, the default, or ``bf16``: ours
only; the baseline stays in fp32 as the seeds trained), ``BENCH_EPOCHS`` (default 2) and,
for ``train_resnet18``, ``BENCH_TRAIN_IMAGES`` (default 1,024). On a GPU machine::

    BENCH_DEVICE=cuda BENCH_PRECISION=bf16 BENCH_EPOCHS=5 BENCH_TRAIN_IMAGES=50000 make bench
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _bench import report
from torch.utils.data import DataLoader, Dataset, Subset

from paramdyn.config import DEFAULT_SCHEMA, RunSpec, load_studies
from paramdyn.inits import initialise
from paramdyn.models import build_model
from paramdyn.train import train_run

# the seed studies' optimizers: torch's default (unfused) implementations
SEED_OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}

# the same threads for both sides; 1 is the workflow's default (train_threads)
THREADS = int(os.environ.get("BENCH_THREADS", "1"))
DEVICE = os.environ.get("BENCH_DEVICE", "cpu")
PRECISION = os.environ.get("BENCH_PRECISION", "fp32")
EPOCHS = int(os.environ.get("BENCH_EPOCHS", "2"))


def setting() -> str:
    """How the benchmark runs, for its report."""
    return f"{THREADS} torch thread(s), device {DEVICE}, ours in {PRECISION}"


def _sync() -> None:
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()


def run_spec(
    model: str, dataset: str, *, epochs: int, batch_size: int, eval_batch_size: int
) -> RunSpec:
    """The one run of a small in-memory study, validated like config.yaml."""
    config = {
        "run": "bench",
        "studies": {
            "bench": {
                "models": [model],
                "datasets": [dataset],
                "inits": ["default"],
                "optimizers": ["adam"],
                "seeds": [0],
                "epochs": epochs,
                "batch_size": batch_size,
                "eval_batch_size": eval_batch_size,
                "checkpoint": {"every_epochs": 1},
                "precision": PRECISION,
            }
        },
    }
    (spec,) = load_studies(config, DEFAULT_SCHEMA)["bench"].runs.values()
    return spec


def time_ours(spec: RunSpec, dataset_path: Path) -> float:
    """Wall seconds of one training job, in a fresh run directory."""
    with tempfile.TemporaryDirectory() as tmp:
        _sync()
        t0 = time.perf_counter()
        train_run(spec, dataset_path, Path(tmp) / "run", device=DEVICE, threads=THREADS)
        _sync()
        return time.perf_counter() - t0


@torch.no_grad()
def _evaluate(model: torch.nn.Module, loader: DataLoader) -> tuple[float, float]:
    model.eval()
    loss, correct, n = 0.0, 0, 0
    for x, y in loader:
        x, y = x.to(DEVICE), y.to(DEVICE)
        out = model(x)
        loss += F.cross_entropy(out, y, reduction="sum").item()
        correct += (out.argmax(1) == y).sum().item()
        n += len(y)
    return loss / n, correct / n


def time_baseline(
    spec: RunSpec,
    make_sets: callable,
    batch_size: int,
    eval_batch_size: int,
    *,
    eval_at_start: bool = False,
) -> tuple[float, float]:
    """Wall seconds of the seed-style loop (dataset objects built inside the timing), and
    its final test accuracy. ``make_sets()`` returns the train and test datasets.
    ``eval_at_start``: also evaluate the initial weights on both splits as ours does (every
    k-th training image; the seed studies did not; for an equal-work comparison)."""
    torch.set_num_threads(THREADS)
    _sync()
    t0 = time.perf_counter()
    train_set, test_set = make_sets()
    assert isinstance(train_set, Dataset)
    train = DataLoader(train_set, batch_size=batch_size, shuffle=True, num_workers=0)
    test = DataLoader(test_set, batch_size=eval_batch_size, shuffle=False, num_workers=0)
    model = build_model(spec.model_name, spec.dataset, spec.model_settings)
    initialise(model, spec.init_name or spec.init, spec.seed)
    model.to(DEVICE)
    settings = dict(spec.optimizer_settings)
    if "betas" in settings:
        settings["betas"] = tuple(settings["betas"])
    optimizer = SEED_OPTIMIZERS[spec.optimizer_name](model.parameters(), **settings)
    torch.manual_seed(spec.seed)
    acc = 0.0
    if eval_at_start:  # as ours: every k-th training image, then the test split
        stride = max(1, len(train_set) // len(test_set))
        subset = Subset(train_set, range(0, len(train_set), stride))
        _evaluate(model, DataLoader(subset, batch_size=eval_batch_size))
        _evaluate(model, test)
    for _ in range(spec.epochs):
        model.train()
        running = 0.0
        for x, y in train:
            x, y = x.to(DEVICE), y.to(DEVICE)
            out = model(x)
            loss = F.cross_entropy(out, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            running += loss.item()
        _, acc = _evaluate(model, test)
    _sync()
    return time.perf_counter() - t0, acc


def interleaved(fns: dict[str, callable], rounds: int) -> dict[str, float]:
    """The least time of each function over ``rounds`` rounds, one call of each per round
    (load from other processes drifts, and then hits both alike); a first round warms up."""
    best = {name: float("inf") for name in fns}
    for i in range(rounds + 1):
        for name, fn in fns.items():
            t = fn()
            if i:
                best[name] = min(best[name], t)
    return best


def report_training(name: str, best: dict[str, float], images: int, baseline: str, note=""):
    """Print the timings of ``interleaved`` (keys ours, baseline, equal_work) as images/s,
    then the benchmark's ratio line."""
    ours, base, eq = (images / best[k] for k in ("ours", "baseline", "equal_work"))
    print(f"baseline ({baseline}): {best['baseline']:.2f} s, {base:,.1f} images/s{note}")
    print(f"baseline + ours' epoch-0 evaluation of both splits (equal work): "
          f"{best['equal_work']:.2f} s, {eq:,.1f} images/s; ours over it: {ours / eq:.2f}")  # fmt: skip
    print(f"ours (paramdyn.train.train_run): {best['ours']:.2f} s, {ours:,.1f} images/s")
    report(name, ours / base, "ours images/s over seed-style loop images/s")


def random_cifar(n_train: int, n_test: int):
    """Seeded random CIFAR-size uint8 images (N, 3, 32, 32) and 10-class labels: train x,
    y, then test x, y. The training benchmarks measure speed, not accuracy."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(n_train, 3, 32, 32), dtype=np.uint8)
    tx = rng.integers(0, 256, size=(n_test, 3, 32, 32), dtype=np.uint8)
    y = rng.integers(0, 10, size=n_train).astype(np.int64)
    ty = rng.integers(0, 10, size=n_test).astype(np.int64)
    return x, y, tx, ty
