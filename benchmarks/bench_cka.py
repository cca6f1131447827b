"""cka: linear CKA of two feature sets of n = 10,000 probe samples x 512 units (ResNet-18's
pooled features on a full CIFAR-10 test split), against one X^T X matmul of the same X.

Ours is ``paramdyn.features.linear_cka`` (biased estimator) on float32 features, as they
are stored: conversion to float64, centring, and the three p x p products X^T X, Y^T Y and
Y^T X (about four times the baseline's arithmetic: numpy computes X^T X as a symmetric
rank-k update, half a general product). The baseline is ``X.T @ X`` on the float64 X.
Both run with numpy's default BLAS threads, interleaved, best of REPEATS each. The unbiased estimator (also in feature space:
no 10,000 x 10,000 Gram matrix) is timed for information. Goal: under 1 s on a 2-core CPU.
"""

from __future__ import annotations

import os

import numpy as np
from _bench import best_of, report

from paramdyn.features import linear_cka

N, P = 10_000, 512
REPEATS = 7


def main() -> None:
    rng = np.random.default_rng(0)
    # post-ReLU-like features: non-negative, correlated units, some sparsity
    mix = rng.normal(size=(P, P)) / np.sqrt(P)
    X = np.maximum(rng.normal(size=(N, P)) @ mix, 0.0).astype(np.float32)
    Y = np.maximum(X @ mix + rng.normal(size=(N, P)).astype(np.float32), 0.0).astype(np.float32)
    X64 = X.astype(np.float64)
    print(f"n = {N:,} samples, p = q = {P} units, float32 features; "
          f"cpus {os.cpu_count()}")  # fmt: skip
    # interleaved, best of each: load from other processes drifts, and hits both alike
    base = ours = unb = float("inf")
    for i in range(REPEATS + 1):
        t_base, _ = best_of(lambda: X64.T @ X64, 2)
        t_ours, value = best_of(lambda: linear_cka(X, Y), 1)
        t_unb, value_u = best_of(lambda: linear_cka(X, Y, unbiased=True), 1)
        if i:  # the first round warms up
            base, ours, unb = min(base, t_base), min(ours, t_ours), min(unb, t_unb)
    print(f"baseline (one X^T X, float64): {base:.4f} s")
    print(f"linear CKA, unbiased HSIC (feature space): {unb:.4f} s, value {value_u:.4f}")
    print(f"linear CKA (biased): {ours:.4f} s, value {value:.4f}")
    print(f"cka: seconds {ours:.3f} (linear CKA, n={N}, p={P}; goal < 1 s)")
    report("cka", ours / base, "linear CKA seconds over one X^T X matmul seconds")


if __name__ == "__main__":
    main()
