"""interpolation: K = 21 points on the linear path between two ResNet-18s, BatchNorm
re-estimated at each point, against the same forward passes done bare.

Ours is ``paramdyn.interpolate.evaluate_path`` (``bn="reestimate"``): per α, θ(α) lerped
and loaded into the one model, every BatchNorm reset and re-estimated on a fixed training
subset (BatchNorm layers alone in train mode, cumulative average), then one evaluation pass
per split (cross-entropy and accuracy summed on the device, read back once per split),
rows collected into a DataFrame. The baseline is the least any implementation must do: on
the same model and the same materialised batches, per α one train-mode forward pass over
the BatchNorm subset and one eval-mode forward pass over each split, a hand loop of
``model(x)`` and nothing else (no loading, no reset, no loss). Both under ``no_grad``,
interleaved (each first in turn), best of ROUNDS each. The ratio is of CPU seconds
(``time.process_time``) on one CPU thread: on a shared 2-core machine other processes'
load stretches wall time by a factor that changes within a minute, CPU time far less;
of wall seconds on a GPU or with more threads. Both are printed.

Setting: ``resnet18-basic-residual`` (ImageNet stem) at width 16 on seeded random
CIFAR-size uint8 images held as tensors (``_train.random_cifar``), normalised once into
fixed subsets (``path_subsets``): 256 BatchNorm images in batches of 128, 512 images of
each of the train and test splits in batches of 256; the sizes keep the run under a
minute on a 2-core CPU. Environment: ``BENCH_THREADS`` (default 1), ``BENCH_DEVICE``
(``cpu``, the default, or ``cuda``), ``BENCH_BN_IMAGES``, ``BENCH_EVAL_IMAGES``. Goal:
ratio <= 1.2.
"""

from __future__ import annotations

import os
import time

import torch
from _bench import report
from _train import random_cifar

from paramdyn.data import DeviceData
from paramdyn.interpolate import alphas, evaluate_path, path_subsets
from paramdyn.models import build_model

MODEL, WIDTH, K = "resnet18-basic-residual", 16, 21
THREADS = int(os.environ.get("BENCH_THREADS", "1"))
DEVICE = torch.device(os.environ.get("BENCH_DEVICE", "cpu"))
BN_IMAGES = int(os.environ.get("BENCH_BN_IMAGES", "256"))
EVAL_IMAGES = int(os.environ.get("BENCH_EVAL_IMAGES", "512"))
ROUNDS = 2


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _data() -> DeviceData:
    x, y, tx, ty = (torch.from_numpy(a).to(DEVICE) for a in random_cifar(2048, 1024))
    mean = torch.full((1, 3, 1, 1), 0.5, device=DEVICE)
    std = torch.full((1, 3, 1, 1), 0.29, device=DEVICE)
    return DeviceData(x, y, tx, ty, mean, std, 10, augment=False, channels_last=True)


def _state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = build_model(MODEL, "cifar10", {"width": WIDTH})
    return {k: v.clone() for k, v in model.state_dict().items()}


@torch.no_grad()
def bare(model, points, bn_batches, splits) -> None:
    """The baseline: the same forward passes, nothing else."""
    for _ in points:
        model.train()
        for x, _ in bn_batches:
            model(x)
        model.eval()
        for batches in splits.values():
            for x, _ in batches:
                model(x)
    _sync()


def main() -> None:
    torch.set_num_threads(THREADS)
    data = _data()
    bn_batches, splits = path_subsets(
        data, bn_size=BN_IMAGES, eval_size=EVAL_IMAGES, bn_batch_size=128, eval_batch_size=256
    )
    a, b = _state(0), _state(1)
    model = build_model(MODEL, "cifar10", {"width": WIDTH}).to(DEVICE)
    model.to(memory_format=torch.channels_last)
    points = alphas(K)
    images = K * (BN_IMAGES + len(splits) * EVAL_IMAGES)
    print(f"{MODEL} width {WIDTH}, K = {K} points, {BN_IMAGES} BatchNorm images and "
          f"{EVAL_IMAGES} per split ({images:,} forwarded per path); {THREADS} torch "
          f"thread(s), device {DEVICE}")  # fmt: skip

    def ours():
        out = evaluate_path(model, a, b, points, bn_batches=bn_batches, splits=splits)
        _sync()
        return out

    # warm up (one-off allocations): two points each
    evaluate_path(model, a, b, points[:2], bn_batches=bn_batches, splits=splits)
    bare(model, points[:2], bn_batches, splits)
    clocks = {"wall": time.perf_counter, "cpu": time.process_time}
    best = {(side, c): float("inf") for side in ("ours", "bare") for c in clocks}
    runs = {"ours": ours, "bare": lambda: bare(model, points, bn_batches, splits)}
    df = None
    for i in range(ROUNDS):  # interleaved, each first in turn: drifting load hits both alike
        for side in ("ours", "bare") if i % 2 else ("bare", "ours"):
            t0 = {c: clock() for c, clock in clocks.items()}
            out = runs[side]()
            for c, clock in clocks.items():
                best[side, c] = min(best[side, c], clock() - t0[c])
            df = out if side == "ours" else df
    mid = df[(df["alpha"] == 0.5) & (df["split"] == "test")].iloc[0]
    for c in clocks:
        print(f"{c} seconds: bare forward passes {best['bare', c]:.2f}, evaluate_path "
              f"{best['ours', c]:.2f}, ratio {best['ours', c] / best['bare', c]:.2f}")  # fmt: skip
    print(f"test loss at alpha 0.5: {mid['loss']:.4f}")
    clock = "wall" if DEVICE.type == "cuda" or THREADS > 1 else "cpu"
    report("interpolation", best["ours", clock] / best["bare", clock],
           f"evaluate_path {clock} seconds over bare forward passes")  # fmt: skip


if __name__ == "__main__":
    main()
