"""Tests of the dataset readers, preparation and the device view (``paramdyn.data``).

Everything runs offline: the torchvision datasets are generated here, small, in the exact
on-disk formats torchvision leaves behind (IDX files for MNIST-like sets, the pickled batches
of CIFAR's "python version").
"""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import pickletools
import shlex
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from paramdyn import catalog, data

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
MNIST_FOLDERS = {"mnist": "MNIST", "fashionmnist": "FashionMNIST"}
CIFAR10_DIR = "cifar-10-batches-py"
CIFAR100_DIR = "cifar-100-python"
NUMPY2_MODULE = b"numpy._core.multiarray"
NUMPY1_MODULE = b"numpy.core.multiarray"

# --- writers for the native formats --------------------------------------------------------------


def idx_bytes(array: np.ndarray, type_code: int = 0x08, dtype: str = "u1") -> bytes:
    """An IDX file: magic 0x0000 <type> <ndim>, ndim big-endian uint32 dims, then the data."""
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.dtype(dtype).newbyteorder(">")).tobytes()


def write_file(path: Path, payload: bytes, compress: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        path = path.with_name(path.name + ".gz")
        payload = gzip.compress(payload)
    path.write_bytes(payload)
    return path


def make_mnist_arrays(seed: int, n_train: int = 6, n_test: int = 4):
    rng = np.random.RandomState(seed)
    return (
        rng.randint(0, 256, size=(n_train, 28, 28)).astype(np.uint8),
        rng.randint(0, 10, size=n_train).astype(np.uint8),
        rng.randint(0, 256, size=(n_test, 28, 28)).astype(np.uint8),
        rng.randint(0, 10, size=n_test).astype(np.uint8),
    )


def write_mnist(data_dir: Path, folder: str, arrays, compress: bool = False) -> dict[str, Path]:
    """Write the four IDX files of an MNIST-like set under ``data_dir/folder/raw``."""
    tx, ty, vx, vy = arrays
    raw = data_dir / folder / "raw"
    paths = {}
    for split, (x, y) in (("train", (tx, ty)), ("test", (vx, vy))):
        images, labels = IDX_FILES[split]
        assert idx_bytes(x)[:4] == b"\x00\x00\x08\x03" and idx_bytes(y)[:4] == b"\x00\x00\x08\x01"
        paths[images] = write_file(raw / images, idx_bytes(x), compress)
        paths[labels] = write_file(raw / labels, idx_bytes(y), compress)
    return paths


class Py2Pickler(pickle._Pickler):
    """Pickles as Python 2's cPickle did for the CIFAR batches (protocol 2): every str and
    bytes object is a byte string (SHORT_BINSTRING / BINSTRING, read back as bytes with
    ``encoding="bytes"``), and numpy dtypes carry the int flags numpy 1.x wrote. (Python 3 at
    protocol 2 would write bytes through ``_codecs.encode`` instead, which the real files never
    reference.)"""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj):
        raw = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_str

    def reducer_override(self, obj):
        if isinstance(obj, np.dtype):
            func, args, state = obj.__reduce__()
            return func, tuple(int(a) if isinstance(a, bool) else a for a in args), state
        return NotImplemented


def cifar_pickle(batch: dict, numpy_module: bytes = NUMPY1_MODULE) -> bytes:
    """A CIFAR batch file's bytes; ``numpy_module`` is where it says ``_reconstruct`` lives
    (numpy 1.x, which wrote the real files: ``numpy.core.multiarray``)."""
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(batch)
    raw = buf.getvalue()
    # GLOBAL opcodes at protocol 2 are newline-terminated text, so renaming the module is safe
    assert raw.count(b"c" + NUMPY2_MODULE + b"\n_reconstruct\n") == 1
    return raw.replace(b"c" + NUMPY2_MODULE + b"\n", b"c" + numpy_module + b"\n")


def make_cifar_batch(rng, n: int, classes: int, label_keys=("labels",), name: str = "batch"):
    images = rng.randint(0, 256, size=(n, 3072)).astype(np.uint8)
    batch = {b"batch_label": f"{name} of {n}".encode(), b"data": images}
    for key in label_keys:
        batch[key.encode()] = [int(v) for v in rng.randint(0, classes, size=n)]
    batch[b"filenames"] = [f"{name}_{i:05d}.png".encode() for i in range(n)]
    return batch


def write_cifar10(data_dir: Path, numpy_module: bytes = NUMPY1_MODULE, seed: int = 0):
    """data_batch_1..5 (of uneven sizes, to see the order they are joined in) and test_batch."""
    rng = np.random.RandomState(seed)
    root = data_dir / CIFAR10_DIR
    root.mkdir(parents=True, exist_ok=True)
    train = [make_cifar_batch(rng, n, 10, name=f"b{i}") for i, n in enumerate((2, 3, 1, 2, 2), 1)]
    test = make_cifar_batch(rng, 3, 10, name="test")
    for i, batch in enumerate(train, 1):
        (root / f"data_batch_{i}").write_bytes(cifar_pickle(batch, numpy_module))
    (root / "test_batch").write_bytes(cifar_pickle(test, numpy_module))
    return train, test


def write_cifar100(data_dir: Path, numpy_module: bytes = NUMPY1_MODULE, seed: int = 0):
    rng = np.random.RandomState(seed)
    root = data_dir / CIFAR100_DIR
    root.mkdir(parents=True, exist_ok=True)
    keys = ("fine_labels", "coarse_labels")
    train = make_cifar_batch(rng, 5, 100, label_keys=keys, name="train")
    test = make_cifar_batch(rng, 3, 100, label_keys=keys, name="test")
    (root / "train").write_bytes(cifar_pickle(train, numpy_module))
    (root / "test").write_bytes(cifar_pickle(test, numpy_module))
    return train, test


def cifar_images(batches) -> np.ndarray:
    return np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32)


def cifar_labels(batches, key: bytes = b"labels") -> np.ndarray:
    return np.concatenate([np.asarray(b[key], dtype=np.int64) for b in batches])


class Payload:
    """Unpickling this runs ``func(*args)``; the tests' payloads create ``marker``. (The
    CIFAR writer turns str arguments into bytes, which both accept.)"""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def payloads(marker: Path) -> dict[str, Payload]:
    return {
        "os.system": Payload(os.system, f"touch {shlex.quote(str(marker))}"),
        "os.mkdir": Payload(os.mkdir, str(marker)),
    }


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture
def mnist_dir(tmp_path):
    arrays = make_mnist_arrays(seed=1)
    write_mnist(tmp_path, "MNIST", arrays)
    return tmp_path, arrays


@pytest.fixture
def prepared_mnist(mnist_dir, tmp_path):
    data_dir, arrays = mnist_dir
    out = tmp_path / "prepared" / "mnist.safetensors"
    data.prepare("mnist", data_dir, out)
    return out, arrays


@pytest.fixture
def prepared_cifar10(tmp_path):
    train, test = write_cifar10(tmp_path)
    out = tmp_path / "cifar10.safetensors"
    data.prepare("cifar10", tmp_path, out)
    return out, cifar_images(train), cifar_labels(train)


# --- IDX: MNIST and Fashion-MNIST ----------------------------------------------------------------


def check_mnist(got, arrays) -> None:
    tx, ty, vx, vy = arrays
    gtx, gty, gvx, gvy = got
    for g, x in ((gtx, tx), (gvx, vx)):
        assert g.dtype == np.uint8 and g.shape == (len(x), 1, 28, 28)
        np.testing.assert_array_equal(g[:, 0], x)
    for g, y in ((gty, ty), (gvy, vy)):
        assert g.dtype == np.int64 and g.shape == (len(y),)
        np.testing.assert_array_equal(g, y.astype(np.int64))


def test_idx_writer_is_byte_exact():
    x = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    raw = idx_bytes(x)
    assert raw[:16] == bytes.fromhex("00000803000000020000001c0000001c")
    assert raw[16:] == x.tobytes() and len(raw) == 16 + 2 * 784
    assert idx_bytes(np.array([7, 2, 1], dtype=np.uint8)) == bytes.fromhex("0000080100000003070201")


@pytest.mark.parametrize("name", sorted(MNIST_FOLDERS))
@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gz"])
def test_read_mnist_like(tmp_path, name, compress):
    arrays = make_mnist_arrays(seed=3 if compress else 2)
    paths = write_mnist(tmp_path, MNIST_FOLDERS[name], arrays, compress=compress)
    assert all(p.name.endswith(".gz") == compress for p in paths.values())
    check_mnist(data.read_native(name, tmp_path), arrays)


def test_read_mnist_raw_and_gz_side_by_side(tmp_path):
    """torchvision keeps the downloaded .gz next to the extracted file."""
    arrays = make_mnist_arrays(seed=4)
    write_mnist(tmp_path, "MNIST", arrays, compress=False)
    write_mnist(tmp_path, "MNIST", arrays, compress=True)
    check_mnist(data.read_native("mnist", tmp_path), arrays)


def test_mnist_and_fashionmnist_folders_are_separate(mnist_dir):
    data_dir, arrays = mnist_dir
    check_mnist(data.read_native("mnist", data_dir), arrays)
    with pytest.raises(data.DatasetError, match="dataset .fashionmnist.: .* is missing"):
        data.read_native("fashionmnist", data_dir)


@pytest.mark.parametrize(
    ("type_code", "dtype"),
    [(0x08, "u1"), (0x09, "i1"), (0x0B, ">i2"), (0x0C, ">i4"), (0x0D, ">f4"), (0x0E, ">f8")],
)
def test_read_idx_types(tmp_path, type_code, dtype):
    x = (np.arange(24).reshape(2, 3, 4) * (1 if dtype == "u1" else -3)).astype(dtype)
    path = write_file(tmp_path / "x-idx3", idx_bytes(x, type_code, dtype))
    got = data.read_idx(path)
    assert got.shape == (2, 3, 4)
    np.testing.assert_array_equal(got, x)


def test_truncated_idx_data(mnist_dir):
    data_dir, _ = mnist_dir
    path = data_dir / "MNIST" / "raw" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(data.DatasetError, match="truncated") as e:
        data.read_native("mnist", data_dir)
    assert str(path) in str(e.value)


def test_idx_with_extra_bytes(mnist_dir):
    data_dir, _ = mnist_dir
    path = data_dir / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    path.write_bytes(path.read_bytes() + b"\x00")
    with pytest.raises(data.DatasetError) as e:
        data.read_native("mnist", data_dir)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("payload", [b"", b"\x00\x00", b"<html>Not Found</html>" * 10])
def test_not_an_idx_file(tmp_path, payload):
    path = write_file(tmp_path / "train-images-idx3-ubyte", payload)
    with pytest.raises(data.DatasetError, match="not an IDX file") as e:
        data.read_idx(path)
    assert str(path) in str(e.value)


def test_idx_truncated_in_header(mnist_dir):
    data_dir, _ = mnist_dir
    path = data_dir / "MNIST" / "raw" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:10])  # magic and 1.5 of the 3 dims
    with pytest.raises(data.DatasetError) as e:
        data.read_native("mnist", data_dir)
    assert str(path) in str(e.value)


def test_idx_truncated_gz(tmp_path):
    paths = write_mnist(tmp_path, "MNIST", make_mnist_arrays(seed=5), compress=True)
    path = paths["train-images-idx3-ubyte"]
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(data.DatasetError) as e:
        data.read_native("mnist", tmp_path)
    assert str(path) in str(e.value)


def test_mismatched_image_and_label_counts(tmp_path):
    tx, ty, vx, vy = make_mnist_arrays(seed=6)
    write_mnist(tmp_path, "MNIST", (tx, ty[:-1], vx, vy))
    with pytest.raises(data.DatasetError, match="6 images but 5 labels"):
        data.read_native("mnist", tmp_path)


def test_missing_mnist_file_is_a_dataset_error(mnist_dir):
    data_dir, _ = mnist_dir
    (data_dir / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(data.DatasetError, match="results/datasets/mnist.download.json"):
        data.read_native("mnist", data_dir)


def test_missing_mnist_file_is_named(mnist_dir):
    data_dir, _ = mnist_dir
    missing = data_dir / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    missing.unlink()
    with pytest.raises(data.DatasetError) as e:
        data.read_native("mnist", data_dir)
    assert str(missing) in str(e.value)


def test_missing_dataset_message_names_file_and_fix(tmp_path):
    with pytest.raises(data.DatasetError) as e:
        data.read_native("cifar10", tmp_path)
    message = str(e.value)
    assert str(tmp_path / CIFAR10_DIR / "data_batch_1") in message
    assert "snakemake" in message and "results/datasets/cifar10.download.json" in message
    assert str(tmp_path.resolve()) in message


# --- CIFAR pickles -------------------------------------------------------------------------------


def test_cifar_pickle_writer_matches_the_real_files():
    """Protocol 2, byte strings, numpy 1.x's module name, and no global but numpy's."""
    rng = np.random.RandomState(0)
    raw = cifar_pickle(make_cifar_batch(rng, 2, 10))
    assert raw[:2] == b"\x80\x02"
    assert b"cnumpy.core.multiarray\n_reconstruct\n" in raw and NUMPY2_MODULE not in raw
    globals_ = {arg for op, arg, _ in pickletools.genops(raw) if op.name in ("GLOBAL", "INST")}
    assert globals_ == {"numpy.core.multiarray _reconstruct", "numpy ndarray", "numpy dtype"}
    loaded = pickle.loads(raw, encoding="bytes")
    assert set(loaded) == {b"batch_label", b"data", b"labels", b"filenames"}
    assert loaded[b"data"].dtype == np.uint8 and loaded[b"data"].shape == (2, 3072)


@pytest.mark.parametrize("module", [NUMPY1_MODULE, NUMPY2_MODULE], ids=["numpy1", "numpy2"])
def test_read_cifar_batch(tmp_path, module):
    batch = make_cifar_batch(np.random.RandomState(7), 4, 10, name="data_batch_1")
    path = tmp_path / "data_batch_1"
    path.write_bytes(cifar_pickle(batch, module))
    assert (module + b"\n_reconstruct") in path.read_bytes()
    got = data.read_cifar_batch(path)
    assert set(got) == {"batch_label", "data", "labels", "filenames"}
    np.testing.assert_array_equal(got["data"], batch[b"data"])
    assert got["labels"] == batch[b"labels"]
    assert got["filenames"] == batch[b"filenames"]


@pytest.mark.parametrize("module", [NUMPY1_MODULE, NUMPY2_MODULE], ids=["numpy1", "numpy2"])
def test_read_cifar10(tmp_path, module):
    train, test = write_cifar10(tmp_path, module)
    tx, ty, vx, vy = data.read_native("cifar10", tmp_path)
    assert tx.shape == (10, 3, 32, 32) and vx.shape == (3, 3, 32, 32)
    assert tx.dtype == vx.dtype == np.uint8 and ty.dtype == vy.dtype == np.int64
    # the five batches joined in order, each row R, G, B planes of 32 x 32, row-major
    np.testing.assert_array_equal(tx, cifar_images(train))
    np.testing.assert_array_equal(ty, cifar_labels(train))
    np.testing.assert_array_equal(vx, cifar_images([test]))
    np.testing.assert_array_equal(vy, cifar_labels([test]))
    first, last = train[0][b"data"], train[4][b"data"]
    assert tx[0, 0, 0, 1] == first[0, 1] and tx[0, 1, 0, 0] == first[0, 1024]
    assert tx[1, 2, 31, 31] == first[1, 3071] and tx[0, 2, 5, 7] == first[0, 2048 + 5 * 32 + 7]
    assert tx[-1, 1, 3, 4] == last[-1, 1024 + 3 * 32 + 4]


@pytest.mark.parametrize("module", [NUMPY1_MODULE, NUMPY2_MODULE], ids=["numpy1", "numpy2"])
def test_read_cifar100_uses_fine_labels(tmp_path, module):
    train, test = write_cifar100(tmp_path, module)
    assert train[b"fine_labels"] != train[b"coarse_labels"]
    tx, ty, vx, vy = data.read_native("cifar100", tmp_path)
    np.testing.assert_array_equal(tx, cifar_images([train]))
    np.testing.assert_array_equal(vx, cifar_images([test]))
    np.testing.assert_array_equal(ty, cifar_labels([train], b"fine_labels"))
    np.testing.assert_array_equal(vy, cifar_labels([test], b"fine_labels"))
    assert ty.dtype == vy.dtype == np.int64


@pytest.mark.parametrize("kind", ["os.system", "os.mkdir"])
def test_payload_is_live(tmp_path, kind):
    """Control for the test below: a plain unpickler does run these payloads."""
    marker = tmp_path / "ran"
    raw = cifar_pickle({b"data": np.zeros((1, 3072), np.uint8), b"labels": payloads(marker)[kind]})
    pickle.loads(raw, encoding="bytes")
    assert marker.exists()


@pytest.mark.parametrize("kind", ["os.system", "os.mkdir"])
@pytest.mark.parametrize("where", ["first", "after_data"])
def test_cifar_batch_refuses_other_globals(tmp_path, kind, where):
    marker = tmp_path / "ran"
    batch = make_cifar_batch(np.random.RandomState(8), 2, 10)
    evil = payloads(marker)[kind]
    batch = {b"x": evil, **batch} if where == "first" else {**batch, b"labels": evil}
    root = tmp_path / "data" / CIFAR10_DIR
    root.mkdir(parents=True)
    write_cifar10(tmp_path / "data")
    path = root / "data_batch_3"
    path.write_bytes(cifar_pickle(batch))
    with pytest.raises(data.DatasetError) as e:
        data.read_native("cifar10", tmp_path / "data")
    assert str(path) in str(e.value)
    assert isinstance(e.value.__cause__, pickle.UnpicklingError)
    assert not marker.exists()


@pytest.mark.parametrize("cut", [1, 7, 40, 200, 3000])
def test_truncated_cifar_batch(tmp_path, cut):
    write_cifar10(tmp_path)
    path = tmp_path / CIFAR10_DIR / "test_batch"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - cut])
    with pytest.raises(data.DatasetError) as e:
        data.read_native("cifar10", tmp_path)
    assert str(path) in str(e.value)


# --- embedded datasets ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mnist5k", "digits", "synthetic"])
def test_embedded_matches_catalog(tmp_path, name):
    spec = catalog.DATASETS[name]
    tx, ty, vx, vy = data.read_native(name, tmp_path / "unused")
    assert tx.shape == (spec.train_size, spec.channels, spec.size, spec.size)
    assert vx.shape == (spec.test_size, spec.channels, spec.size, spec.size)
    assert tx.dtype == vx.dtype == np.uint8
    assert ty.shape == (spec.train_size,) and vy.shape == (spec.test_size,)
    assert ty.dtype == vy.dtype == np.int64
    assert set(np.unique(ty)) == set(np.unique(vy)) == set(range(spec.classes))
    again = data.read_native(name, tmp_path / "elsewhere")
    for a, b in zip((tx, ty, vx, vy), again, strict=True):
        np.testing.assert_array_equal(a, b)


def test_mnist5k_split():
    tx, ty, vx, vy = data.read_native("mnist5k", "/nonexistent")
    assert (len(tx), len(vx)) == (4000, 1000) and tx.shape[1:] == (1, 28, 28)
    assert np.bincount(ty).tolist() == [400] * 10
    assert np.bincount(vy).tolist() == [100] * 10
    assert tx.max() > 200 and tx.min() == 0  # pixels on the 0..255 scale


def test_digits_split():
    tx, ty, vx, vy = data.read_native("digits", "/nonexistent")
    assert (len(tx), len(vx)) == (1437, 360) and tx.shape[1:] == (1, 8, 8)
    assert np.bincount(vy).tolist() == [36] * 10
    assert tx.max() == 255 and tx.min() == 0  # 0..16 scaled to 0..255


# --- prepare -------------------------------------------------------------------------------------


def test_prepare_mnist(prepared_mnist):
    out, (tx, ty, vx, vy) = prepared_mnist
    assert out.is_file() and not out.with_name(out.name + ".tmp").exists()
    with safe_open(str(out), framework="pt", device="cpu") as f:
        meta = f.metadata()
        t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    assert set(t) == {"train_x", "train_y", "test_x", "test_y"}
    assert t["train_x"].dtype == t["test_x"].dtype == torch.uint8
    assert t["train_y"].dtype == t["test_y"].dtype == torch.int64
    np.testing.assert_array_equal(t["train_x"].numpy(), tx[:, None])
    np.testing.assert_array_equal(t["test_x"].numpy(), vx[:, None])
    np.testing.assert_array_equal(t["train_y"].numpy(), ty)
    np.testing.assert_array_equal(t["test_y"].numpy(), vy)
    assert meta["name"] == "mnist" and meta["classes"] == "10"
    assert meta["format"] == "paramdyn-dataset/1"
    mean, std = json.loads(meta["mean"]), json.loads(meta["std"])
    assert isinstance(mean, list) and len(mean) == len(std) == 1
    pixels = tx.astype(np.float64) / 255.0
    assert mean[0] == pytest.approx(pixels.mean(), abs=1e-5)
    assert std[0] == pytest.approx(pixels.std(), abs=1e-5)


def test_prepare_cifar10_per_channel_stats(prepared_cifar10):
    out, images, labels = prepared_cifar10
    with safe_open(str(out), framework="pt", device="cpu") as f:
        meta = f.metadata()
        np.testing.assert_array_equal(f.get_tensor("train_x").numpy(), images)
        np.testing.assert_array_equal(f.get_tensor("train_y").numpy(), labels)
    pixels = images.astype(np.float64) / 255.0
    np.testing.assert_allclose(json.loads(meta["mean"]), pixels.mean(axis=(0, 2, 3)), atol=1e-5)
    np.testing.assert_allclose(json.loads(meta["std"]), pixels.std(axis=(0, 2, 3)), atol=1e-5)


def test_prepare_unknown_dataset(tmp_path):
    with pytest.raises(data.DatasetError, match="unknown dataset 'imagenet'"):
        data.prepare("imagenet", tmp_path, tmp_path / "x.safetensors")


def test_prepare_missing_files_writes_nothing(tmp_path):
    out = tmp_path / "out" / "mnist.safetensors"
    with pytest.raises(data.DatasetError):
        data.prepare("mnist", tmp_path, out)
    assert not out.exists()


# --- DeviceData ----------------------------------------------------------------------------------


def epoch(dd: data.DeviceData, batch_size: int, seed: int):
    batches = list(dd.train_batches(batch_size, torch.Generator().manual_seed(seed)))
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]), batches


def to_uint8(dd: data.DeviceData, x: torch.Tensor) -> torch.Tensor:
    """Undo the normalisation: back to the stored 0..255 pixels."""
    return torch.round((x * dd.std + dd.mean) * 255.0).to(torch.uint8)


def items(x: torch.Tensor, y: torch.Tensor) -> Counter:
    return Counter((xi.numpy().tobytes(), int(yi)) for xi, yi in zip(x, y, strict=True))


def test_device_data_load(prepared_mnist):
    out, (tx, ty, vx, vy) = prepared_mnist
    dd = data.DeviceData.load(out, "cpu", normalize=True, augment=False)
    assert dd.shape == (1, 28, 28) and dd.classes == 10 and dd.augment is False
    assert dd.mean.shape == dd.std.shape == (1, 1, 1, 1)
    pixels = tx.astype(np.float64) / 255.0
    assert float(dd.mean) == pytest.approx(pixels.mean(), abs=1e-5)
    assert float(dd.std) == pytest.approx(pixels.std(), abs=1e-5)
    plain = data.DeviceData.load(out, "cpu", normalize=False)
    assert float(plain.mean) == 0.0 and float(plain.std) == 1.0
    x, y = next(plain.eval_batches("test", 100))
    np.testing.assert_allclose(x.numpy(), vx[:, None] / 255.0, atol=1e-6)
    np.testing.assert_array_equal(y.numpy(), vy)


def test_eval_batches_are_normalised_in_order(synthetic):
    dd = data.DeviceData.load(synthetic, "cpu", normalize=True)
    batches = list(dd.eval_batches("train", 100))
    assert [len(y) for _, y in batches] == [100] * 5 + [12]
    x = torch.cat([b[0] for b in batches])
    torch.testing.assert_close(to_uint8(dd, x), dd.train_x, atol=0, rtol=0)
    torch.testing.assert_close(torch.cat([b[1] for b in batches]), dd.train_y)
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1.0) < 1e-3
    assert sum(len(y) for _, y in dd.eval_batches("test", 50)) == 128


@pytest.mark.parametrize("batch_size", [1, 64, 100, 512, 1000])
def test_train_batches_cover_each_image_once(synthetic, batch_size):
    dd = data.DeviceData.load(synthetic, "cpu", normalize=True, augment=False)
    x, y, batches = epoch(dd, batch_size, seed=0)
    n = dd.train_x.shape[0]
    sizes = [len(b[1]) for b in batches]
    assert sizes == [batch_size] * (n // batch_size) + ([n % batch_size] if n % batch_size else [])
    assert x.dtype == torch.float32 and x.shape == (n, 1, 12, 12)
    assert sorted(y.tolist()) == sorted(dd.train_y.tolist())
    assert items(to_uint8(dd, x), y) == items(dd.train_x, dd.train_y)
    assert not torch.equal(y, dd.train_y)  # shuffled


def test_train_batches_cover_each_image_once_mnist(prepared_mnist):
    out, (tx, ty, _, _) = prepared_mnist
    dd = data.DeviceData.load(out, "cpu", normalize=True, augment=False)
    x, y, _ = epoch(dd, 4, seed=0)
    got = items(to_uint8(dd, x), y)
    assert got == items(torch.from_numpy(tx[:, None]), torch.from_numpy(ty.astype(np.int64)))


def test_train_batches_depend_on_the_seed_only(synthetic):
    dd = data.DeviceData.load(synthetic, "cpu", normalize=True, augment=False)
    x0, y0, _ = epoch(dd, 64, seed=0)
    x0b, y0b, _ = epoch(dd, 64, seed=0)
    x1, y1, _ = epoch(dd, 64, seed=1)
    assert torch.equal(x0, x0b) and torch.equal(y0, y0b)
    assert not torch.equal(y0, y1) and not torch.equal(x0, x1)
    # one generator for two epochs: two different orders, each complete
    gen = torch.Generator().manual_seed(0)
    first = torch.cat([y for _, y in dd.train_batches(64, gen)])
    second = torch.cat([y for _, y in dd.train_batches(64, gen)])
    assert torch.equal(first, y0) and not torch.equal(first, second)
    assert sorted(second.tolist()) == sorted(first.tolist())


def crops(image: torch.Tensor, pad: int) -> list[torch.Tensor]:
    """Every random crop (after zero padding) and its mirror image."""
    _, h, w = image.shape
    padded = torch.nn.functional.pad(image, (pad, pad, pad, pad))
    out = []
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[:, dy : dy + h, dx : dx + w]
            out += [crop, crop.flip(2)]
    return out


@pytest.mark.parametrize("dataset", ["mnist", "cifar10"])
def test_augment(request, dataset):
    fixture = "prepared_mnist" if dataset == "mnist" else "prepared_cifar10"
    out = request.getfixturevalue(fixture)[0]
    plain = data.DeviceData.load(out, "cpu", normalize=True, augment=False)
    aug = data.DeviceData.load(out, "cpu", normalize=True, augment=True)
    assert aug.augment is True
    n = plain.train_x.shape[0]
    xp, yp, _ = epoch(plain, n, seed=3)
    xa, ya, batches = epoch(aug, n, seed=3)
    assert len(batches) == 1 and xa.shape == xp.shape == (n, *plain.shape)
    assert xa.dtype == torch.float32
    # the order is drawn before the augmentation, so image i is a crop or flip of image i
    assert torch.equal(ya, yp)
    pad = 4 if plain.shape[1] >= 32 else 2
    for a, p in zip(xa, xp, strict=True):
        assert any(torch.equal(a, c) for c in crops(p, pad))
    assert not torch.equal(xa, xp)
    xa2, _, _ = epoch(aug, n, seed=3)
    assert torch.equal(xa, xa2)
    xs, ys, _ = epoch(aug, 4, seed=5)
    assert xs.shape == (n, *plain.shape) and sorted(ys.tolist()) == sorted(yp.tolist())


def test_load_unreadable_prepared_file(tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(data.DatasetError, match="unreadable prepared dataset") as e:
        data.DeviceData.load(path, "cpu")
    assert str(path) in str(e.value)


@pytest.mark.parametrize(
    ("channels_last", "augment", "inputs"),
    [(False, False, None), (True, True, None), (True, False, {"pad_to": 32, "channels": 3})],
)
def test_hold_normalised_gives_the_same_batches_bit_for_bit(
    prepared_mnist, channels_last, augment, inputs
):
    """Normalising the whole split once (training) and each batch on the fly give the same
    tensors, values and memory layout (the strides of size-1 dimensions may differ), for training batches (with augmentation), strided
    evaluation batches and padded, channel-repeated inputs."""
    out = prepared_mnist[0]
    fly, held = (
        data.DeviceData.load(out, "cpu", normalize=True, augment=augment, inputs=inputs)
        for _ in range(2)
    )
    fly.channels_last = held.channels_last = channels_last
    assert held.hold_normalised() and held.train_x.dtype == torch.float32
    assert not fly.hold_normalised(budget_bytes=1) and fly.train_x.dtype == torch.uint8
    layout = torch.channels_last if channels_last else torch.contiguous_format
    pairs = [
        *zip(epoch(fly, 7, seed=2)[2], epoch(held, 7, seed=2)[2], strict=True),
        *zip(fly.eval_batches("train", 5, 3), held.eval_batches("train", 5, 3), strict=True),
        *zip(fly.eval_batches("test", 6), held.eval_batches("test", 6), strict=True),
    ]
    for (xf, yf), (xh, yh) in pairs:
        assert torch.equal(xf, xh) and torch.equal(yf, yh)
        assert xf.is_contiguous(memory_format=layout) and xh.is_contiguous(memory_format=layout)
