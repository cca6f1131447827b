"""train_lenet: training throughput (images/s) of LeNet-5 on MNIST-size data, ours over
the seed studies' loop.

Data: the embedded ``mnist5k`` set (4,000 training and 1,000 test digits, 1x28x28). Ours
trains from the file ``paramdyn.data.prepare`` writes. The baseline reads the same images
through ``torchvision.datasets.MNIST`` from real IDX files (uncompressed, in torchvision's
layout, so nothing is downloaded) with per-sample ``ToTensor`` and ``Normalize`` (the
training split's mean and std, as ours). Both: Adam (lr 1e-3), batch 128, 2 epochs, test
evaluation after each epoch; see ``_train.py``. Images/s counts training images (epochs x
4,000) over the whole job's wall time (data loading included).
"""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import numpy as np
from _train import (
    EPOCHS,
    interleaved,
    report_training,
    run_spec,
    setting,
    time_baseline,
    time_ours,
)
from safetensors import safe_open

from paramdyn.data import prepare

BATCH, EVAL_BATCH = 128, 1000
ROUNDS = 3


def write_idx(path: Path, array: np.ndarray) -> None:
    """An uncompressed IDX file (MNIST's format) of a uint8 array."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def main() -> None:
    import torchvision.datasets as tvd
    from torchvision import transforms

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prepared = tmp / "mnist5k.safetensors"
        meta = prepare("mnist5k", tmp, prepared)
        with safe_open(str(prepared), framework="np") as f:
            arrays = {k: f.get_tensor(k) for k in ("train_x", "train_y", "test_x", "test_y")}
        raw = tmp / "tv" / "MNIST" / "raw"
        raw.mkdir(parents=True)
        for split, prefix in (("train", "train"), ("test", "t10k")):
            write_idx(raw / f"{prefix}-images-idx3-ubyte", arrays[f"{split}_x"][:, 0])
            write_idx(raw / f"{prefix}-labels-idx1-ubyte", arrays[f"{split}_y"].astype(np.uint8))
        mean, std = json.loads(meta["mean"]), json.loads(meta["std"])
        tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])

        def sets():
            root = str(tmp / "tv")
            return (
                tvd.MNIST(root, train=True, download=False, transform=tf),
                tvd.MNIST(root, train=False, download=False, transform=tf),
            )

        train_set, test_set = sets()
        assert (len(train_set), len(test_set)) == (4000, 1000)
        spec = run_spec(
            "lenet5", "mnist5k", epochs=EPOCHS, batch_size=BATCH, eval_batch_size=EVAL_BATCH
        )
        accs = []

        def baseline() -> float:
            seconds, acc = time_baseline(spec, sets, BATCH, EVAL_BATCH)
            accs.append(acc)
            return seconds

        def equal_work() -> float:
            return time_baseline(spec, sets, BATCH, EVAL_BATCH, eval_at_start=True)[0]

        fns = {
            "ours": lambda: time_ours(spec, prepared),
            "baseline": baseline,
            "equal_work": equal_work,
        }
        best = interleaved(fns, ROUNDS)
    images = EPOCHS * len(train_set)
    print(f"LeNet-5, mnist5k (4,000 train / 1,000 test), {EPOCHS} epochs, batch {BATCH}, "
          f"Adam, {setting()}, best of {ROUNDS}")  # fmt: skip
    report_training(
        "train_lenet", best, images, "torchvision MNIST + per-sample transforms + DataLoader",
        f" (test accuracy {accs[-1]:.3f})",
    )  # fmt: skip


if __name__ == "__main__":
    main()
