"""layer_similarity: the layer-by-layer linear CKA matrix of two ResNet-18-family networks
(``resnet18-cifar`` and ``resnet18-cifar-plain``, width 16: stem, 8 blocks, fc = 10 blocks
each) on a probe set of 1,000 random CIFAR-size images, against the forward passes alone.

Ours is ``paramdyn.layer_similarity``: ``block_grams`` of each model (forward passes with a
hook on every block, mean reduction, each block's stored form built at the end), then
``cka_matrix`` of the two (100 pairs, biased). The baseline is the same two models' forward
passes over the same batches with no hooks: the physical floor, since the activations must
be computed. Both in eval mode without gradients, with BENCH_THREADS torch threads
(default 1; numpy's BLAS limited to as many), batches of 250, after a one-batch warm-up;
each model's forward and Grams timed separately, interleaved, best of ROUNDS each, then
summed with the matrix's best (each round's matrix on fresh Grams, lazy terms included).
The CKA matrix alone (biased and unbiased), and with the ``pool4`` reduction (every block
16 x wider; the widest stored as 1,000 x 1,000 Grams), are timed for information. Goal:
ratio <= 1.5.
"""

from __future__ import annotations

import os

import torch
from _bench import best_of, report
from _train import random_cifar
from threadpoolctl import threadpool_limits

from paramdyn.layer_similarity import block_grams, cka_matrix
from paramdyn.models import build_model

N_PROBE = 1000
BATCH = 250
ROUNDS = 5
THREADS = int(os.environ.get("BENCH_THREADS", "1"))


def main() -> None:
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    models = [
        build_model(name, "cifar10", {"width": 16}).eval()
        for name in ("resnet18-cifar", "resnet18-cifar-plain")
    ]
    x = torch.from_numpy(random_cifar(0, N_PROBE)[2]).float().div_(255.0)
    x = (x - 0.5) / 0.25
    batches = list(x.split(BATCH))

    def forward(m):
        with torch.no_grad():
            for b in batches:
                m(b)

    print(f"probe {N_PROBE} images 3x32x32, batches of {BATCH}, {THREADS} torch thread(s), "
          f"blocks {len(models[0].block_names())} per model")  # fmt: skip
    with torch.no_grad():  # warm up (allocator, kernels) on one batch
        [m(batches[0]) for m in models]
    # per model and per part, interleaved, best of ROUNDS each: short samples, so that load
    # from other processes (a shared 2-core machine) spoils fewer of them
    base, mine, grams = [float("inf")] * 2, [float("inf")] * 2, [None, None]
    t_matrix = float("inf")
    for _ in range(ROUNDS):
        for i, m in enumerate(models):
            base[i] = min(base[i], best_of(lambda m=m: forward(m), 1)[0])
            t, grams[i] = best_of(lambda m=m: block_grams(m, batches), 1)
            mine[i] = min(mine[i], t)
        a, b = grams  # fresh: the matrix's time includes each block's lazy self terms
        t, df = best_of(lambda a=a, b=b: cka_matrix(a, b), 1)
        t_matrix = min(t_matrix, t)
    t_unb, _ = best_of(lambda: cka_matrix(a, b, unbiased=True), 1)  # its terms, once
    pa, pb = (block_grams(m, batches, reduction="pool4") for m in models)
    t_pool, _ = best_of(lambda: cka_matrix(pa, pb), 1)
    base_total, ours_total = sum(base), sum(mine) + t_matrix
    diag = df[df.block_a == df.block_b]
    print(
        f"baseline (two models' forward passes): {base_total:.3f} s ({base[0]:.3f} + {base[1]:.3f})"
    )
    print(f"ours (Grams of both + 10 x 10 CKA matrix, mean): {ours_total:.3f} s "
          f"(Grams {mine[0]:.3f} + {mine[1]:.3f}, matrix {t_matrix:.4f}; unbiased matrix "
          f"{t_unb:.4f})")  # fmt: skip
    print(f"same-block CKA, residual vs plain, untrained: {diag.cka.round(2).tolist()}")
    print(f"for information, pool4: CKA matrix {t_pool:.3f} s on stored forms "
          f"{[g.form for g in pa.values()]}")  # fmt: skip
    report(
        "layer_similarity",
        ours_total / base_total,
        "CKA matrix of two ResNet-18s seconds over their forward passes seconds; goal <= 1.5",
    )


if __name__ == "__main__":
    # numpy's BLAS on the same threads as torch: on a loaded 2-core machine OpenBLAS's own
    # two threads make the 0.03 s matrix take 0.1-2.7 s
    with threadpool_limits(THREADS):
        main()
