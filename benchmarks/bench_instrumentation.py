"""instrumentation: training time with gradient recording every step over training time
without it, same run otherwise (ResNet-18 in CIFAR form, width 16, on 3x32x32 data).

Ours and the baseline are the same ``train_run``: one with ``gradients.every_steps: 1``
(per-tensor L2 norm, max |g|, exact zeros, NaN and Inf counts of every gradient, kept on
the device and read back at epoch ends), one without. Also printed: the cost of
``track_reached`` (which entries ever got a non-zero gradient, and ever moved). The goal
for the recording is <= 1.05.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _bench import report
from _train import THREADS, interleaved
from safetensors.torch import save_file

from paramdyn.config import DEFAULT_SCHEMA, load_studies
from paramdyn.train import train_run

N_TRAIN, N_TEST, EPOCHS, BATCH = 512, 128, 2, 128
ROUNDS = 2


def spec(gradients: dict):
    config = {
        "run": "bench",
        "studies": {
            "bench": {
                "models": [{"name": "resnet18-cifar", "width": 16}],
                "datasets": ["cifar10"],
                "inits": ["kaiming-normal"],
                "optimizers": [{"name": "sgd", "lr": 0.05}],
                "seeds": [0],
                "epochs": EPOCHS,
                "batch_size": BATCH,
                "eval_batch_size": 256,
                "checkpoint": {"every_epochs": EPOCHS},
                "gradients": gradients,
            }
        },
    }
    (run,) = load_studies(config, DEFAULT_SCHEMA)["bench"].runs.values()
    return run


def main() -> None:
    torch.set_num_threads(THREADS)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (N_TRAIN, 3, 32, 32), dtype=np.uint8)
    tx = rng.integers(0, 256, (N_TEST, 3, 32, 32), dtype=np.uint8)
    y, ty = rng.integers(0, 10, N_TRAIN), rng.integers(0, 10, N_TEST)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "cifar10.safetensors"
        meta = {"format": "paramdyn-dataset/1", "name": "cifar10", "classes": "10",
                "mean": json.dumps([0.5] * 3), "std": json.dumps([0.25] * 3)}  # fmt: skip
        tensors = {"train_x": x, "train_y": y, "test_x": tx, "test_y": ty}
        save_file({k: torch.from_numpy(v) for k, v in tensors.items()}, str(data), metadata=meta)
        specs = {
            "plain": spec({}),
            "recording": spec({"every_steps": 1}),
            "recording+reached": spec({"every_steps": 1, "track_reached": True}),
        }

        def timed(s):
            def fn():
                with tempfile.TemporaryDirectory() as out:
                    t0 = time.perf_counter()
                    train_run(s, data, Path(out) / "run", device="cpu", threads=THREADS)
                    return time.perf_counter() - t0

            return fn

        best = interleaved({k: timed(s) for k, s in specs.items()}, ROUNDS)
    for k, t in best.items():
        print(f"{k:>20}: {t:.3f} s ({EPOCHS * N_TRAIN / t:.0f} images/s)")
    print(f"track_reached costs {best['recording+reached'] / best['recording']:.3f}x more")
    report(
        "instrumentation",
        best["recording"] / best["plain"],
        "training seconds with gradient recording every step over without",
    )


if __name__ == "__main__":
    main()
