"""train_overhead_lenet: our whole LeNet-5 training job's seconds over a bare loop that does
the same arithmetic on the same batches (see ``_overhead.py``). Goal: <= 1.10.

The recipe is the dynamics study's demo variant for LeNet-5 (config.yaml): the embedded
``mnist5k`` (4,000 training and 1,000 test digits), kaiming-normal init, Adam (lr 1e-3),
batch 64, 5 epochs (``BENCH_EPOCHS`` overrides), evaluation batch 1,000, a checkpoint every
epoch, and the study's instrumentation: ``gradients.track_reached`` (which entries ever got
a non-zero gradient, and ever moved; kept on the device, per step).

Fifteen rounds (each: one of our jobs, one bare loop; about 5.5 s): single 2.5-s jobs on
the 2-core sandbox vary from 2.3 to 4.4 s, and with nine rounds the ratio of the fastest
still ranged 1.04 to 1.11 over eight runs of the same code (the ratio of medians 0.97 to
1.26).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from _overhead import make_spec, run_benchmark

from paramdyn.data import prepare

EPOCHS = int(os.environ.get("BENCH_EPOCHS", "5"))
STUDY = {
    "models": ["lenet5"],
    "datasets": ["mnist5k"],
    "inits": ["kaiming-normal"],
    "optimizers": [{"name": "adam", "lr": 0.001}],
    "seeds": [0],
    "epochs": EPOCHS,
    "batch_size": 64,
    "eval_batch_size": 1000,
    "checkpoint": {"every_epochs": 1},
    "gradients": {"track_reached": True},
    "precision": os.environ.get("BENCH_PRECISION", "fp32"),
}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mnist5k.safetensors"
        prepare("mnist5k", Path(tmp), path)
        what = (f"LeNet-5, mnist5k (4,000 train / 1,000 test), {EPOCHS} epochs of batch 64, "
                "Adam, a checkpoint every epoch, track_reached")  # fmt: skip
        run_benchmark("train_overhead_lenet", what, make_spec(STUDY), path, rounds=15)


if __name__ == "__main__":
    main()
