"""extraction: every measure at both references over a run's checkpoints, against the least
any measure must do (read each checkpoint once and take one norm of each tensor).

The run: ResNet-18 standard for CIFAR-10 (11.2M parameters, 45 MB a checkpoint) saved N
times with ``paramdyn.checkpoints.save_checkpoint``, each after a random perturbation of
every parameter. Ours is ``paramdyn.measures.compare`` with the demo study's measures (atol
1e-8, rtol 1e-5, Minkowski p=3): tensor, layer and block rows against the init and the
previous checkpoint. The baseline reads the same files with safetensors and takes
``torch.linalg.vector_norm`` of each tensor. Both run with torch's default threads, on warm
files (page cache), interleaved, best of ROUNDS each. Ours is also timed on 2N checkpoints:
linear time makes that (2N - 1) / (N - 1) times the time on N (printed, not asserted).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from _bench import best_of, report
from safetensors import safe_open

from paramdyn.checkpoints import list_checkpoints, save_checkpoint
from paramdyn.measures import compare
from paramdyn.models import build_model

N = 8
ROUNDS = 5
MEASURES = {"atol": 1e-8, "rtol": 1e-5, "minkowski_p": [3]}


def make_run(directory: Path, count: int) -> list[Path]:
    torch.manual_seed(0)
    model = build_model("resnet18-basic-residual", "cifar10")
    blocks = model.block_names()
    for step in range(count):
        if step:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p), alpha=1e-3 * step)
        save_checkpoint(
            directory, model, epoch=step, step=step, epoch_end=True, run_id="bench", blocks=blocks
        )
    return list_checkpoints(directory)


def read_and_norm(paths: list[Path]) -> float:
    """The baseline: touch every byte of every checkpoint once."""
    total = 0.0
    for path in paths:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118
                t = f.get_tensor(key)
                if t.is_floating_point():
                    total += float(torch.linalg.vector_norm(t))
    return total


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_run(Path(tmp), 2 * N)
        params = sum(
            t.numel() for t in build_model("resnet18-basic-residual", "cifar10").parameters()
        )
        mb = paths[0].stat().st_size / 1e6
        print(f"ResNet-18 standard: {params:,} parameters, {mb:.1f} MB a checkpoint; "
              f"torch threads {torch.get_num_threads()}")  # fmt: skip
        # interleaved, best of each: load from other processes drifts, and hits both alike
        base = ours = ours2 = float("inf")
        for i in range(ROUNDS + 1):
            t_base, _ = best_of(lambda: read_and_norm(paths[:N]), 2)
            t_ours, df = best_of(lambda: compare(paths[:N], **MEASURES), 1)
            t_ours2, df2 = best_of(lambda: compare(paths, **MEASURES), 1)
            if i:  # the first round warms up
                base, ours, ours2 = min(base, t_base), min(ours, t_ours), min(ours2, t_ours2)
    print(f"baseline (read + one norm per tensor), {N} checkpoints: {base:.3f} s "
          f"({base / N * 1e3:.1f} ms a checkpoint)")  # fmt: skip
    print(f"ours (compare, all measures, both references), {N} checkpoints: {ours:.3f} s "
          f"({ours / (N - 1) * 1e3:.1f} ms a comparison), {len(df):,} rows")  # fmt: skip
    print(f"ours, {2 * N} checkpoints: {ours2:.3f} s ({ours2 / (2 * N - 1) * 1e3:.1f} ms a "
          f"comparison), {len(df2):,} rows")  # fmt: skip
    print(f"linearity: time(2N) / time(N) = {ours2 / ours:.2f} "
          f"(linear: {(2 * N - 1) / (N - 1):.2f} comparisons, 2.00 reads)")  # fmt: skip
    report("extraction", ours / base, f"compare seconds over read-and-norm seconds, N={N}")


if __name__ == "__main__":
    main()
