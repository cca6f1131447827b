"""train_resnet18: training throughput (images/s) of ResNet-18 (standard widths, residual)
on CIFAR-size data, ours over the seed studies' loop.

There is no CIFAR-10 on this machine, so the data are generated: N_TRAIN training and
N_TEST test images, random uint8 3x32x32 with labels 0-9. The baseline reads them through
``torchvision.datasets.CIFAR10`` from files in CIFAR-10's native layout
(``cifar-10-batches-py/data_batch_1..5``, ``test_batch``, ``batches.meta``: pickled dicts
with ``data``, N x 3072 uint8, and ``labels``); torchvision checks the files' MD5 against
the real CIFAR-10, so a subclass skips that check and nothing else. Ours trains from a
prepared file written directly in ``paramdyn.data.prepare``'s format, named ``cifar10``
(3 channels, 10 classes). Both: Adam (lr 1e-3), batch 128, 2 epochs, per-sample
``ToTensor`` + ``Normalize`` in the baseline, test evaluation after each epoch; see
``_train.py``. On a CPU the model's arithmetic dominates both sides: the goal is >= 1.0.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from pathlib import Path

import numpy as np
import torch
from _train import (
    EPOCHS,
    interleaved,
    random_cifar,
    report_training,
    run_spec,
    setting,
    time_baseline,
    time_ours,
)
from safetensors.torch import save_file

N_TRAIN = int(os.environ.get("BENCH_TRAIN_IMAGES", "1024"))
N_TEST = max(1, N_TRAIN // 4)
BATCH, EVAL_BATCH = 128, 256
ROUNDS = 2


def write_cifar(root: Path, x: np.ndarray, y: np.ndarray, tx: np.ndarray, ty: np.ndarray):
    """CIFAR-10's python layout: five training batches, one test batch, the label names."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i, part in enumerate(np.array_split(np.arange(len(x)), 5), start=1):
        batch = {"data": x[part].reshape(len(part), -1), "labels": y[part].tolist()}
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch, protocol=2))
    test = {"data": tx.reshape(len(tx), -1), "labels": ty.tolist()}
    (folder / "test_batch").write_bytes(pickle.dumps(test, protocol=2))
    names = {"label_names": [f"class{i}" for i in range(10)]}
    (folder / "batches.meta").write_bytes(pickle.dumps(names, protocol=2))


def write_prepared(path: Path, x, y, tx, ty) -> list[list[float]]:
    """Our prepared-dataset file (uint8 images, int64 labels, training mean and std)."""
    scaled = x.astype(np.float64) / 255.0
    mean = scaled.mean(axis=(0, 2, 3)).round(6).tolist()
    std = scaled.std(axis=(0, 2, 3)).round(6).tolist()
    meta = {"format": "paramdyn-dataset/1", "name": "cifar10", "classes": "10",
            "mean": json.dumps(mean), "std": json.dumps(std)}  # fmt: skip
    tensors = {"train_x": x, "train_y": y, "test_x": tx, "test_y": ty}
    save_file({k: torch.from_numpy(v) for k, v in tensors.items()}, str(path), metadata=meta)
    return [mean, std]


def main() -> None:
    import torchvision.datasets as tvd
    from torchvision import transforms

    class LocalCIFAR10(tvd.CIFAR10):
        """torchvision's CIFAR10 without the MD5 check against the real files."""

        def _check_integrity(self) -> bool:
            return True

        def _load_meta(self) -> None:
            path = os.path.join(self.root, self.base_folder, self.meta["filename"])
            with open(path, "rb") as f:
                self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    x, y, tx, ty = random_cifar(N_TRAIN, N_TEST)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_cifar(tmp / "tv", x, y, tx, ty)
        prepared = tmp / "cifar10.safetensors"
        mean, std = write_prepared(prepared, x, y, tx, ty)
        tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])

        def sets():
            root = str(tmp / "tv")
            return (
                LocalCIFAR10(root, train=True, download=False, transform=tf),
                LocalCIFAR10(root, train=False, download=False, transform=tf),
            )

        train_set, _ = sets()
        assert np.array_equal(train_set.data, x.transpose(0, 2, 3, 1))  # the same images
        spec = run_spec(
            "resnet18-basic-residual",
            "cifar10",
            epochs=EPOCHS,
            batch_size=BATCH,
            eval_batch_size=EVAL_BATCH,
        )

        def equal_work() -> float:
            return time_baseline(spec, sets, BATCH, EVAL_BATCH, eval_at_start=True)[0]

        fns = {
            "ours": lambda: time_ours(spec, prepared),
            "baseline": lambda: time_baseline(spec, sets, BATCH, EVAL_BATCH)[0],
            "equal_work": equal_work,
        }
        best = interleaved(fns, ROUNDS)
    images = EPOCHS * N_TRAIN
    steps = EPOCHS * -(-N_TRAIN // BATCH)
    print(f"ResNet-18 (standard, residual), random CIFAR-size data ({N_TRAIN:,} train / "
          f"{N_TEST:,} test), {EPOCHS} epochs = {steps} steps of batch {BATCH}, Adam, "
          f"{setting()}, best of {ROUNDS}")  # fmt: skip
    report_training(
        "train_resnet18", best, images, "torchvision CIFAR10 + per-sample transforms + DataLoader"
    )


if __name__ == "__main__":
    main()
