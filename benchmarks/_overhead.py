"""Shared by the training-overhead benchmarks: our whole training job over a bare loop that
does the same arithmetic on the same batches.

Ours is :func:`paramdyn.train.train_run` as the workflow runs it: the prepared dataset read
from its file onto the device, the model built and initialised, every step's loss and
accuracy accumulated, the evaluation passes (the init on every k-th training image and on
the test split, then the test split after every epoch), checkpoints, history, gradient
instrumentation as the recipe configures it, run.json, the publication into the run
directory, and resume snapshots at the configured cadence (``snapshot_seconds``, 300 s by
default: none fires in a job this short; their cost is printed apart, per snapshot).

The bare loop is what nobody can do less than: the same model (built and initialised
before the clock starts, reset to the same initial weights each time), the same optimizer
(``paramdyn.train.make_optimizer``: the fused kernel, the same settings), the same batches
in the same order, already normalised and on the device in the model's memory layout, and
the same evaluation passes (forward, loss and correct count on the device); nothing read
back but once at the end, nothing written.

Both run in the same process, alternately (one repetition of each per round, after a
warm-up round), and the ratio is of the fastest repetitions (each side's minimum): the
machine only ever adds time (other tenants, its memory bandwidth shared), so each side's
fastest run is the one least disturbed, the estimator BenchmarkTools.jl judges by (Chen
and Revels, "Robust benchmarking in noisy environments", 2016) and ``timeit`` recommends.
On the shared 2-core sandbox the medians are not: four runs in a row of the same LeNet-5
code printed a ratio of medians of 1.07, 0.98, 1.26 and 0.97 (single rounds 2.4 to 4.4 s)
and a ratio of the fastest of 1.04, 1.04, 1.06 and 1.08. The medians, the median of the
rounds' ratios and the CPU seconds are printed too. Environment: as ``_train.py``
(``BENCH_THREADS``, ``BENCH_DEVICE``, ``BENCH_PRECISION``, ``BENCH_EPOCHS`` where the
benchmark says so); ``BENCH_ROUNDS`` (repetitions of each side), ``BENCH_PROFILE=1`` (also
print a cProfile of one of our jobs: where the overhead goes).
"""

from __future__ import annotations

import cProfile
import io
import json
import os
import pstats
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from _bench import report
from _train import DEVICE, PRECISION, THREADS, setting

from paramdyn.config import DEFAULT_SCHEMA, RunSpec, load_studies
from paramdyn.data import DeviceData
from paramdyn.inits import initialise
from paramdyn.models import build_model
from paramdyn.train import make_optimizer, train_run

PROFILE = os.environ.get("BENCH_PROFILE", "") not in ("", "0")


def sync() -> None:
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()


def make_spec(study: dict) -> RunSpec:
    """The one run of a study (a config.yaml study, validated like one)."""
    (spec,) = load_studies({"studies": {"bench": study}}, DEFAULT_SCHEMA)["bench"].runs.values()
    return spec


class Bare:
    """The bare loop of ``spec`` on the prepared dataset ``path``: everything built once."""

    def __init__(self, spec: RunSpec, path: Path):
        torch.set_num_threads(THREADS)
        dev = torch.device(DEVICE)
        data = DeviceData.load(
            path, dev, normalize=spec.normalize, augment=spec.augment, inputs=spec.inputs
        )
        model = build_model(spec.model_name, spec.dataset, spec.model_settings, spec.inputs)
        initialise(model, spec.init_name or spec.init, spec.seed, options=spec.init_options)
        model.to(dev)
        conv = any(isinstance(m, torch.nn.Conv2d) for m in model.modules())
        if conv:  # as ours: NHWC model and batches for conv nets
            model.to(memory_format=torch.channels_last)
        data.channels_last = conv
        self.model, self.spec = model, spec
        self.init = {k: v.clone() for k, v in model.state_dict().items()}
        gen = torch.Generator().manual_seed(spec.seed)  # ours' data order
        self.epochs = [list(data.train_batches(spec.batch_size, gen)) for _ in range(spec.epochs)]
        stride = max(1, data.train_x.shape[0] // data.test_x.shape[0])
        self.train_eval = list(data.eval_batches("train", spec.eval_batch_size, stride))
        self.test_eval = list(data.eval_batches("test", spec.eval_batch_size))
        self.autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=PRECISION == "bf16")
        self.images = sum(y.shape[0] for batches in self.epochs for _, y in batches)
        self.steps = sum(len(b) for b in self.epochs)

    @torch.no_grad()
    def _evaluate(self, batches, acc: list[torch.Tensor]) -> None:
        self.model.eval()
        for x, y in batches:
            out = self.model(x)
            acc.append(F.cross_entropy(out, y, reduction="sum") + (out.argmax(1) == y).sum())

    def __call__(self) -> tuple[float, float]:
        """Wall and CPU seconds of one bare training (from the same initial weights)."""
        self.model.load_state_dict(self.init)
        opt = make_optimizer(
            self.spec.optimizer_name, self.model.parameters(), dict(self.spec.optimizer_settings)
        )
        acc: list[torch.Tensor] = []
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        self._evaluate(self.train_eval, acc)
        self._evaluate(self.test_eval, acc)
        for batches in self.epochs:
            self.model.train()
            for x, y in batches:
                with self.autocast:
                    out = self.model(x)
                    loss = F.cross_entropy(out.float(), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            self._evaluate(self.test_eval, acc)
        torch.stack(acc).sum().item()
        sync()
        return time.perf_counter() - t0, time.process_time() - c0


def ours(spec: RunSpec, path: Path) -> Callable[[], tuple[float, float]]:
    """Wall and CPU seconds of one of our training jobs, in a fresh run directory."""

    def run() -> tuple[float, float]:
        with tempfile.TemporaryDirectory() as tmp:
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            train_run(spec, path, Path(tmp) / "run", device=DEVICE, threads=THREADS)
            sync()
            return time.perf_counter() - t0, time.process_time() - c0

    return run


def alternate(fns: dict[str, Callable[[], tuple]], rounds: int) -> dict[str, list[tuple]]:
    """Each function once per round, ``rounds`` times after a warm-up round, the order
    reversed every other round (A B, B A, ...: a drift in the machine's load hits both)."""
    times: dict[str, list[tuple]] = {name: [] for name in fns}
    for i in range(rounds + 1):
        for name in list(fns)[:: -1 if i % 2 else 1]:
            t = fns[name]()
            if i:
                times[name].append(t)
    return times


def snapshot_seconds(spec: RunSpec, path: Path) -> float:
    """Seconds one resume snapshot costs in our job: a job with ``snapshot_seconds=0``
    (a snapshot after every step and every epoch's end) less one without, per snapshot."""
    runs = {}
    for every in (0.0, 300.0):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            train_run(spec, path, Path(tmp) / "run", device=DEVICE, threads=THREADS,
                      snapshot_seconds=every)  # fmt: skip
            runs[every] = time.perf_counter() - t0
    snapshots = (-(-train_size(path) // spec.batch_size) + 1) * spec.epochs
    return max(0.0, runs[0.0] - runs[300.0]) / snapshots


def train_size(path: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.get_slice("train_x").get_shape()[0]


def profile(spec: RunSpec, path: Path, top: int = 25) -> None:
    """cProfile of one of our jobs: the functions with the most cumulative and own time."""
    prof = cProfile.Profile()
    with tempfile.TemporaryDirectory() as tmp:
        prof.enable()
        train_run(spec, path, Path(tmp) / "run", device=DEVICE, threads=THREADS)
        prof.disable()
    for key in ("cumulative", "tottime"):
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats(key).print_stats(top)
        print(f"-- cProfile of one job, by {key}")
        print(out.getvalue().split("\n", 6)[-1].rstrip())


def run_benchmark(name: str, what: str, spec: RunSpec, path: Path, rounds: int) -> None:
    rounds = int(os.environ.get("BENCH_ROUNDS", rounds))
    bare = Bare(spec, path)
    times = alternate({"ours": ours(spec, path), "bare": bare}, rounds)
    med = {k: statistics.median(t[0] for t in v) for k, v in times.items()}
    cpu = {k: statistics.median(t[1] for t in v) for k, v in times.items()}
    print(f"{what}; {bare.steps} steps, {bare.images:,} training images, "
          f"{setting()}, {rounds} alternating repetitions")  # fmt: skip
    for k, label in (("bare", "bare loop"), ("ours", "ours (paramdyn.train.train_run)")):
        ts = ", ".join(f"{t[0]:.3f}" for t in times[k])
        print(f"{label}: median {med[k]:.3f} s ({bare.images / med[k]:,.0f} images/s), "
              f"CPU {cpu[k]:.3f} s; each round (wall): {ts}")  # fmt: skip
    rounds_ratio = [o[0] / b[0] for o, b in zip(times["ours"], times["bare"], strict=True)]
    paired = statistics.median(rounds_ratio)
    best = {k: min(t[0] for t in v) for k, v in times.items()}
    print(f"fastest: ours {best['ours']:.3f} s, bare loop {best['bare']:.3f} s")
    print(f"other estimates of the ratio: ratio of medians {med['ours'] / med['bare']:.3f}, "
          f"median of the rounds' ratios {paired:.3f}, "
          f"CPU seconds (medians) {cpu['ours'] / cpu['bare']:.3f}")  # fmt: skip
    if os.environ.get("BENCH_SNAPSHOT", "1") != "0":
        snap = snapshot_seconds(spec, path)
        print(f"one resume snapshot: {snap * 1e3:.1f} ms (at snapshot_seconds 300: "
              f"{snap / 300 * 100:.3f}% of a long job)")  # fmt: skip
    if PROFILE:
        profile(spec, path)
    report(
        name,
        best["ours"] / best["bare"],
        "our training job's seconds over the bare loop's, fastest repetition of each",
    )


def write_dataset(path: Path, x, y, tx, ty, name: str, classes: int) -> None:
    """A prepared-dataset file (uint8 images, int64 labels, the training mean and std)."""
    from safetensors.torch import save_file

    scaled = x.astype("float64") / 255.0
    mean = scaled.mean(axis=(0, 2, 3)).round(6).tolist()
    std = scaled.std(axis=(0, 2, 3)).round(6).tolist()
    meta = {"format": "paramdyn-dataset/1", "name": name, "classes": str(classes),
            "mean": json.dumps(mean), "std": json.dumps(std)}  # fmt: skip
    tensors = {"train_x": x, "train_y": y, "test_x": tx, "test_y": ty}
    save_file({k: torch.from_numpy(v) for k, v in tensors.items()}, str(path), metadata=meta)
