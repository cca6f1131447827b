"""train_overhead_resnet18: our whole ResNet-18 training job's seconds over a bare loop that
does the same arithmetic on the same batches (see ``_overhead.py``). Goal: <= 1.10.

ResNet-18 (standard widths, residual: ``resnet18-basic-residual``, as ``train_resnet18``) on
CIFAR-size data: ``BENCH_TRAIN_IMAGES`` (default 2,048) generated 3x32x32 training images
and a quarter as many test images, 10 classes. With 2,048 an epoch is 16 steps, so the
job still writes a 45-MB checkpoint every 16 steps (CIFAR-10's epoch is 391): its fixed
costs (building and initialising the model, three checkpoints, the masks and tables)
are about 4% of it; with 1,024, 8%. The recipe is the dynamics study's for its
ResNet-18 (config.yaml): kaiming-normal init, Adam, batch 128, evaluation batch 256, and
its instrumentation, ``gradients.track_reached``; 2 epochs (``BENCH_EPOCHS``), a
checkpoint every epoch.

Nine rounds (each: one of our jobs, one bare loop; about 35 s): on the 2-core sandbox a
single 16-s job varies by up to ±10% with the host's load, about twice the overhead being
measured, so each side needs several chances at an undisturbed run (the figure is the
ratio of the fastest of each; with five rounds the ratio of medians swung from 1.04 to
1.14 between runs of the same code).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from _overhead import make_spec, run_benchmark, write_dataset
from _train import random_cifar

N_TRAIN = int(os.environ.get("BENCH_TRAIN_IMAGES", "2048"))
N_TEST = max(1, N_TRAIN // 4)
EPOCHS = int(os.environ.get("BENCH_EPOCHS", "2"))
STUDY = {
    "models": ["resnet18-basic-residual"],
    "datasets": ["cifar10"],
    "inits": ["kaiming-normal"],
    "optimizers": [{"name": "adam", "lr": 0.001}],
    "seeds": [0],
    "epochs": EPOCHS,
    "batch_size": 128,
    "eval_batch_size": 256,
    "checkpoint": {"every_epochs": 1},
    "gradients": {"track_reached": True},
    "precision": os.environ.get("BENCH_PRECISION", "fp32"),
}


def main() -> None:
    x, y, tx, ty = random_cifar(N_TRAIN, N_TEST)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cifar10.safetensors"
        write_dataset(path, x, y, tx, ty, "cifar10", 10)
        what = (f"ResNet-18 (standard, residual), random CIFAR-size data ({N_TRAIN:,} train / "
                f"{N_TEST:,} test), {EPOCHS} epochs of batch 128, Adam, a checkpoint every "
                "epoch, track_reached")  # fmt: skip
        run_benchmark("train_overhead_resnet18", what, make_spec(STUDY), path, rounds=9)


if __name__ == "__main__":
    main()
