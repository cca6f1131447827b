"""Shared helpers of the benchmarks (this file is not a benchmark: ``make bench`` runs only
``bench_*.py``).

Every benchmark measures ours and a baseline in the same process, on the same model and
data, takes the best of several repeats of each (the machine may be shared), and prints as
its last line ``NAME: ratio VALUE (what over what)``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def best_of(fn: Callable[[], Any], repeats: int, warmup: int = 0) -> tuple[float, Any]:
    """The least wall time (seconds) of ``repeats`` calls of ``fn`` after ``warmup`` untimed
    calls, and the result of the last call."""
    result = None
    for _ in range(warmup):
        result = fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def report(name: str, ratio: float, what: str) -> None:
    """The benchmark's last line, the one ``make bench`` and RESULTS.md quote."""
    print(f"{name}: ratio {ratio:.2f} ({what})", flush=True)
