"""The device a job runs on: ``auto``, ``cpu`` or ``cuda``, as the config's ``device`` says.

:func:`detect_device` needs no torch: the scheduler calls it while it parses the rules (a
training job's ``gpu`` resource) and a training job before CUDA starts (to lease a GPU).
:func:`resolve_device` asks torch itself, in the job.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def detect_device(requested: str) -> str:
    """'cuda' or 'cpu' without importing torch: 'auto' means CUDA when an NVIDIA device
    node is visible to this process (set ``device: cuda`` for clusters whose login nodes
    have no GPU)."""
    if requested != "auto":
        return requested
    return "cuda" if Path("/dev/nvidia0").exists() or Path("/dev/nvidiactl").exists() else "cpu"


def resolve_device(requested: str) -> torch.device:
    """The torch device of a job: 'auto' is CUDA when torch sees a device; 'cuda' without
    one is an error."""
    import torch  # here, not at the top: the scheduler imports this module, torch-free

    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch sees no CUDA device")
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(requested)
