"""Compiled single passes for :class:`paramdyn.gradients.Reach` on a CPU (numba).

PyTorch has no fused op that ORs a comparison into a mask, so the torch form of the masks
costs a tensor 9 passes of 4 bytes an entry a step (the gradient's bit patterns OR-ed into
an integer copy; the running max and the running min of the value). On a CPU those passes
are bound by memory. One loop here reads the gradient, or the value and θ0, once and sets
bytes of a bool mask: 5 and 9 bytes an entry where the torch form moves 12 and 24. In a
ResNet-18 job (its never-reached layer4 taps, 8.3 M entries) 'moved' takes 3.3 ms a step
instead of 8.7; 'reached' about the same as before, bound by reading the gradient
(``benchmarks/RESULTS.md``).

Imported only by a tracker that has that much to track (a CPU job whose open tensors hold
at least ``gradients.FUSED_MIN_ENTRIES`` entries after the first step): ``import numba``
costs a process about 0.2 s. Compiled on first use, cached next to the module (numba's
cache), as :mod:`paramdyn.measures`' kernel.
"""

from __future__ import annotations

import numba


@numba.njit(nogil=True, cache=True)
def mark_nonzero(values, mask):  # pragma: no cover - compiled (tested through Reach)
    """``mask[i] = True`` where ``values[i] != 0``: a NaN is non-zero, -0.0 is zero. A
    set mask byte is only read, never written again (no dirty cache lines)."""
    for i in range(values.size):
        if values[i] != 0 and not mask[i]:
            mask[i] = True


@numba.njit(nogil=True, cache=True)
def mark_changed(values, initial, mask):  # pragma: no cover - compiled
    """``mask[i] = True`` where ``values[i] != initial[i]``: float equality, so +0.0 and
    -0.0 are equal and a NaN differs from everything."""
    for i in range(values.size):
        if values[i] != initial[i] and not mask[i]:
            mask[i] = True
