"""Checkpoints: the full state_dict (parameters and buffers) in safetensors, never pickle.

The metadata of each file makes it self-describing, so measures need only the files:
``epoch`` (completed epochs), ``step`` (optimizer steps), ``epoch_end`` ("1" when taken at
the end of an epoch or at the init, "0" for a mid-epoch step checkpoint), ``run_id``, ``parameters``
(JSON list of the state_dict keys that are trainable parameters; the rest are buffers such
as BatchNorm running statistics) and ``blocks`` (JSON list of the building blocks, input to
output; a key belongs to the block that prefixes it).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from . import atomic, paths

FORMAT = "paramdyn-checkpoint/1"
_NAME = re.compile(r"^step(\d{8})\.safetensors$")


class CheckpointError(RuntimeError):
    pass


class BlockError(ValueError):
    """A state_dict key that no building block, or more than one, owns."""

    def __init__(self, key: str, hits: list[tuple[str, int]]):
        super().__init__(f"{key} is in blocks {hits}")
        self.key, self.hits = key, hits


def block_of(key: str, blocks: Sequence[str]) -> tuple[str, int]:
    """The building block that owns the state_dict key ``key``, and its depth (its index in
    ``blocks``, input to output): the one block whose name prefixes the key (``block.``).
    Raises :class:`BlockError` when none or several do."""
    hits = [(b, d) for d, b in enumerate(blocks) if key.startswith(b + ".")]
    if len(hits) != 1:
        raise BlockError(key, hits)
    return hits[0]


_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path | str, metadata: dict) -> None:
    """Write a safetensors file byte-for-byte reproducibly (the library's writer orders the
    metadata at random), atomically: a temporary file, then a rename. Same tensors and
    metadata, same bytes."""
    path = Path(path)
    header: dict = {"__metadata__": dict(sorted(metadata.items()))}
    chunks, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy()  # the bytes, without a copy
        header[name] = {
            "dtype": _DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + raw.nbytes],
        }
        chunks.append(raw)
        offset += raw.nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with atomic.replacing(path) as tmp, open(tmp, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for c in chunks:
            f.write(c)


@dataclass
class Checkpoint:
    path: Path
    epoch: int
    step: int
    epoch_end: bool
    run_id: str
    parameters: list[str]
    blocks: list[str]
    tensors: dict[str, torch.Tensor]

    def owner(self, key: str) -> tuple[str, int]:
        """The block that owns ``key`` and its depth (:func:`block_of` on this checkpoint's
        block names); a :class:`CheckpointError` naming the file when none or several do."""
        try:
            return block_of(key, self.blocks)
        except BlockError as e:
            raise CheckpointError(f"{self.path}: parameter {key} lies in blocks {e.hits}") from None


def checkpoint_name(step: int) -> str:
    return f"step{step:08d}.safetensors"


def save_checkpoint(
    directory: Path | str,
    model: torch.nn.Module,
    *,
    epoch: int,
    step: int,
    epoch_end: bool,
    run_id: str,
    blocks: list[str],
) -> Path:
    """Write the model's state_dict atomically and reproducibly."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    params = [k for k, _ in model.named_parameters()]
    meta = {
        "format": FORMAT,
        "epoch": str(epoch),
        "step": str(step),
        "epoch_end": str(int(epoch_end)),
        "run_id": run_id,
        "parameters": json.dumps(params),
        "blocks": json.dumps(blocks),
    }
    path = directory / checkpoint_name(step)
    write_safetensors(state, path, meta)
    return path


def read_safetensors(
    path: Path | str, *, what: str, fix: str, error: type[Exception] | None = None
) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Every tensor and the metadata of a safetensors file (the counterpart of
    :func:`write_safetensors`); a truncated or corrupt file raises ``error`` (default
    CheckpointError) naming the file, the ``what`` it should be and the ``fix``."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise (error or CheckpointError)(f"{path}: unreadable {what} ({e}); {fix}") from e
    return meta, tensors


def read_checkpoint(path: Path | str) -> Checkpoint:
    path = Path(path)
    meta, tensors = read_safetensors(path, what="checkpoint", fix="delete it and retrain")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a paramdyn checkpoint (format {meta.get('format')!r})")
    try:
        return Checkpoint(
            path=path,
            epoch=int(meta["epoch"]),
            step=int(meta["step"]),
            epoch_end=meta["epoch_end"] == "1",
            run_id=meta["run_id"],
            parameters=json.loads(meta["parameters"]),
            blocks=json.loads(meta["blocks"]),
            tensors=tensors,
        )
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: checkpoint metadata is incomplete ({e})") from e


def list_checkpoints(directory: Path | str) -> list[Path]:
    """The checkpoint files of a run, in step order."""
    paths = [p for p in Path(directory).iterdir() if _NAME.match(p.name)]
    if not paths:
        raise CheckpointError(f"{directory}: no checkpoints (step*.safetensors)")
    return sorted(paths, key=lambda p: int(_NAME.match(p.name).group(1)))


def load_into(model: torch.nn.Module, path: Path | str) -> Checkpoint:
    ckpt = read_checkpoint(path)
    model.load_state_dict(ckpt.tensors)
    return ckpt


def drop_step_checkpoints(*directories: Path | str) -> int:
    """Delete the mid-epoch checkpoints (``epoch_end`` 0) from each directory (a run's
    checkpoints and its work copy: hard links of the same files). Returns how many files
    were deleted from the first directory."""
    dropped = 0
    for i, directory in enumerate(directories):
        folder = Path(directory)
        if folder.name != paths.CHECKPOINTS:
            folder = folder / paths.CHECKPOINTS
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob("step*.safetensors")):
            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}).get("epoch_end") == "0":
                    path.unlink()
                    dropped += i == 0
    return dropped
