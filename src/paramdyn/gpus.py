"""One GPU per training job on a multi-GPU box: a lease taken through a lock file.

Snakemake's ``--resources gpu=2`` only counts GPUs: it sets no ``CUDA_VISIBLE_DEVICES``, so
two concurrent training jobs would both land on GPU 0. ``lease_gpu()``, called by a job
before CUDA starts, takes a non-blocking ``fcntl.flock`` on one of N per-GPU lock files in a
node-local directory, keeps it for the life of the process (the kernel releases it when the
process ends, even after SIGKILL) and sets ``CUDA_VISIBLE_DEVICES`` to that GPU.

Which GPUs are candidates:

- ``CUDA_VISIBLE_DEVICES`` already set (SLURM sets it for a job given ``--gpus``; a user may
  set ``CUDA_VISIBLE_DEVICES=2,3`` to share a box): with one entry (or none) there is
  nothing to choose and nothing is done; with several, one of the listed devices is leased
  and ``CUDA_VISIBLE_DEVICES`` narrowed to it. The lock files are named after the listed
  entries, so sessions with overlapping lists still coordinate.
- otherwise the node's GPUs ``0..N-1``: N from ``$PARAMDYN_NUM_GPUS`` (the tests use it to
  simulate devices), else ``nvidia-smi -L``, else ``/proc/driver/nvidia/gpus/*``. With one
  GPU or none nothing is done.

When every candidate is leased the call polls (every ``$PARAMDYN_GPU_POLL_SECONDS``, default
2 s, logging) for at most ``$PARAMDYN_GPU_WAIT_SECONDS`` (default 600 s), then raises
``GpuLeaseError``. The lock directory is ``$PARAMDYN_GPU_LOCK_DIR``, default
``/tmp/paramdyn-gpu-locks-<uid>``: it must be local to the node (flock over NFS is not
reliable) and shared by all jobs of one user there.

No torch here: the lease has to happen before CUDA is initialised.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["GpuLeaseError", "lease_gpu", "lock_dir", "num_gpus"]

_log = logging.getLogger(__name__)

# the lease of this process: (device entry, open lock file descriptor); the descriptor stays
# open (and referenced) until the process exits, which is what keeps the lock
_lease: tuple[str, int] | None = None


class GpuLeaseError(RuntimeError):
    """No GPU could be leased in time."""


def lock_dir() -> Path:
    """The node-local folder of the per-GPU lock files."""
    env = os.environ.get("PARAMDYN_GPU_LOCK_DIR")
    if env:
        return Path(env)
    return Path(tempfile.gettempdir()) / f"paramdyn-gpu-locks-{os.getuid()}"


def num_gpus() -> int:
    """The number of GPUs of this node: ``$PARAMDYN_NUM_GPUS``, else ``nvidia-smi -L``, else
    ``/proc/driver/nvidia/gpus``; 0 when none is found."""
    env = os.environ.get("PARAMDYN_NUM_GPUS")
    if env not in (None, ""):
        try:
            n = int(env)
        except ValueError:
            raise ValueError(f"PARAMDYN_NUM_GPUS must be an integer, not {env!r}") from None
        return max(n, 0)
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run(
                [smi, "-L"], capture_output=True, text=True, timeout=30, check=True
            ).stdout
            # "GPU 0: NVIDIA H100 (UUID: ...)"; MIG instances are indented lines below
            return sum(1 for line in out.splitlines() if line.startswith("GPU "))
        except (OSError, subprocess.SubprocessError):
            pass
    proc = Path("/proc/driver/nvidia/gpus")
    if proc.is_dir():
        return sum(1 for _ in proc.iterdir())
    return 0


def _candidates() -> list[str] | None:
    """The device entries to lease among, or None when there is nothing to choose."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        entries = [e.strip() for e in visible.split(",") if e.strip()]
        # CUDA stops at the first invalid entry: "-1" hides every device after it
        if "-1" in entries:
            entries = entries[: entries.index("-1")]
        return entries if len(entries) > 1 else None
    n = num_gpus()
    return [str(i) for i in range(n)] if n > 1 else None


def _lock_name(entry: str) -> str:
    return "gpu-" + re.sub(r"[^A-Za-z0-9_.-]", "_", entry) + ".lock"


def _try_lock(directory: Path, entry: str) -> int | None:
    fd = os.open(directory / _lock_name(entry), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return None
        raise
    # who holds it, for whoever looks at the folder
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()}\n".encode())
    return fd


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value not in (None, "") else default


def _index(entry: str, position: int) -> int:
    return int(entry) if entry.isdigit() else position


def lease_gpu(
    log: logging.Logger | None = None,
    *,
    timeout: float | None = None,
    poll: float | None = None,
) -> int | None:
    """Lease one GPU for the rest of this process and set ``CUDA_VISIBLE_DEVICES`` to it.

    Returns the leased device's index (its number in ``CUDA_VISIBLE_DEVICES`` or in
    ``nvidia-smi``; its position in the list when the entries are UUIDs), or None when there
    is nothing to do (one GPU or none, or a single device already chosen by
    ``CUDA_VISIBLE_DEVICES``). Call it before anything initialises CUDA. ``timeout`` and
    ``poll`` (seconds) default to ``$PARAMDYN_GPU_WAIT_SECONDS`` (600) and
    ``$PARAMDYN_GPU_POLL_SECONDS`` (2). Raises ``GpuLeaseError`` when every GPU stays leased
    for ``timeout`` seconds."""
    global _lease
    log = log or _log
    if _lease is not None:  # a second call in the same process keeps the first lease
        entry, _ = _lease
        return _index(entry, 0)
    candidates = _candidates()
    if candidates is None:
        log.info(
            "GPU lease: nothing to choose (CUDA_VISIBLE_DEVICES=%s)",
            os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>"),
        )
        return None
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        log.warning("GPU lease: CUDA is already initialised; CUDA_VISIBLE_DEVICES comes too late")
    timeout = _env_float("PARAMDYN_GPU_WAIT_SECONDS", 600.0) if timeout is None else timeout
    poll = _env_float("PARAMDYN_GPU_POLL_SECONDS", 2.0) if poll is None else poll
    directory = lock_dir()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    start = time.monotonic()
    next_report = start
    while True:
        for position, entry in enumerate(candidates):
            fd = _try_lock(directory, entry)
            if fd is not None:
                _lease = (entry, fd)
                os.environ["CUDA_VISIBLE_DEVICES"] = entry
                waited = time.monotonic() - start
                log.info(
                    "GPU lease: GPU %s of %s (lock %s, waited %.1f s)",
                    entry,
                    ",".join(candidates),
                    directory / _lock_name(entry),
                    waited,
                )
                return _index(entry, position)
        now = time.monotonic()
        if now - start >= timeout:
            raise GpuLeaseError(
                f"no free GPU after {timeout:g} s: all of {','.join(candidates)} are leased "
                f"by other processes (lock files in {directory}). Run at most one training job "
                "per GPU: give Snakemake --resources gpu=N with N no more than the GPUs of "
                "this machine (profiles/local), or raise PARAMDYN_GPU_WAIT_SECONDS."
            )
        if now >= next_report:
            log.info(
                "GPU lease: all of %s are leased; waiting (at most %.0f s more)",
                ",".join(candidates),
                timeout - (now - start),
            )
            next_report = now + 30
        time.sleep(min(poll, max(timeout - (now - start), 0.0)))
