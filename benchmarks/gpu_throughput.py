"""Training throughput (images/s) of our training job on CIFAR-size data, for the GPU check
(``benchmarks/gpu_check.sh``; not a ``bench_*.py``: ``make bench`` does not run it).

For each model (LeNet-5, ResNet-18 standard, ResNet-18 in CIFAR form) and precision (fp32,
bf16): one ``paramdyn.train.train_run`` job on ``GPU_IMAGES`` (default 50,000) generated
3x32x32 training images and 10,000 test images, 10 classes, Adam, batch ``GPU_BATCH``
(default 128), 2 epochs, checkpoints at the end only. Printed: the steady state (the second
epoch's training, from the history's clock: no start-up, no evaluation, no checkpoint) and
the whole job (2 epochs of images over its wall time, everything included).

    python benchmarks/gpu_throughput.py [--device cuda] [--models lenet5 ...] [--precisions fp32 bf16]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _overhead import make_spec, write_dataset  # noqa: E402

from paramdyn.train import train_run  # noqa: E402

MODELS = {
    "lenet5": "LeNet-5",
    "resnet18-basic-residual": "ResNet-18 (standard)",
    "resnet18-cifar": "ResNet-18 (CIFAR form)",
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    args = ap.parse_args(argv)
    n_train = int(os.environ.get("GPU_IMAGES", "50000"))
    n_test, batch, epochs = max(1, n_train // 5), int(os.environ.get("GPU_BATCH", "128")), 2
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(n_train, 3, 32, 32), dtype=np.uint8)
    tx = rng.integers(0, 256, size=(n_test, 3, 32, 32), dtype=np.uint8)
    y = rng.integers(0, 10, size=n_train).astype(np.int64)
    ty = rng.integers(0, 10, size=n_test).astype(np.int64)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    print(f"training throughput on {name}: {n_train:,} generated 3x32x32 images, batch "
          f"{batch}, Adam, {epochs} epochs, torch {torch.__version__}")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cifar10.safetensors"
        write_dataset(path, x, y, tx, ty, "cifar10", 10)
        for model in args.models:
            for precision in args.precisions:
                spec = make_spec(
                    {
                        "models": [model],
                        "datasets": ["cifar10"],
                        "inits": ["kaiming-normal"],
                        "optimizers": ["adam"],
                        "seeds": [0],
                        "epochs": epochs,
                        "batch_size": batch,
                        "eval_batch_size": 1000,
                        "checkpoint": {"every_epochs": epochs},
                        "precision": precision,
                    }
                )
                t0 = time.perf_counter()
                train_run(spec, path, Path(tmp) / "run", device=args.device)
                wall = time.perf_counter() - t0
                h = pd.read_parquet(Path(tmp) / "run" / "history.parquet")
                start = h[(h.epoch == 1) & (h.split == "test")].seconds.iloc[0]
                end = h[(h.epoch == 2) & (h.split == "train")].seconds.iloc[0]
                print(f"{MODELS.get(model, model):24s} {precision}: "
                      f"{n_train / (end - start):>10,.0f} images/s steady (epoch 2), "
                      f"{epochs * n_train / wall:>10,.0f} images/s whole job "
                      f"({wall:.1f} s)", flush=True)  # fmt: skip
                for sub in ("run", "run.work"):  # the run and its work directory
                    shutil.rmtree(Path(tmp) / sub, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
