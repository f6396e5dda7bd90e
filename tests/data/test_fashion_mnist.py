import gzip
import struct

import numpy as np
import pytest

from mirage import paths
from mirage.data import CorruptDatasetError, DatasetNotFoundError, load_dataset
from mirage.data.fashion_mnist import load_fashion_mnist, read_idx


def write_idx(path, array, *, gz=True, truncate=0):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(
        struct.pack(">I", d) for d in array.shape
    )
    payload = header + array.astype(np.uint8).tobytes()
    if truncate:
        payload = payload[:-truncate]
    (gzip.open if gz else open)(path, "wb").write(payload)


def make_fmnist_dir(root, n_train=12, n_test=5, gz=True):
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(
            root / f"{prefix}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n, 28, 28)), gz=gz
        )
        write_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}", rng.integers(0, 10, n), gz=gz)
    return root


@pytest.mark.parametrize("gz", [True, False])
def test_idx_directory_loads_with_shapes_ranges_and_labels(tmp_path, gz):
    data = load_fashion_mnist(make_fmnist_dir(tmp_path, gz=gz))
    assert data.train.images.shape == (12, 1, 28, 28)
    assert data.test.images.shape == (5, 1, 28, 28)
    assert 0.0 <= data.train.images.min() and data.train.images.max() <= 1.0
    assert data.num_classes == 10 and data.train.labels.max() < 10


def test_truncated_idx_is_detected(tmp_path):
    make_fmnist_dir(tmp_path)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((5, 28, 28)), truncate=7)
    with pytest.raises(CorruptDatasetError, match="truncated"):
        load_fashion_mnist(tmp_path)


def test_bad_magic_and_broken_gzip_are_detected(tmp_path):
    bad = tmp_path / "x.gz"
    bad.write_bytes(gzip.compress(b"\x01\x02\x03\x04rest"))
    with pytest.raises(CorruptDatasetError, match="magic"):
        read_idx(bad)
    broken = tmp_path / "y.gz"
    broken.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + b"\x00" * 100)[:-10])
    with pytest.raises(CorruptDatasetError):
        read_idx(broken)


def test_mismatched_image_and_label_counts(tmp_path):
    make_fmnist_dir(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(11))
    with pytest.raises(CorruptDatasetError, match="do not match"):
        load_fashion_mnist(tmp_path)


def test_missing_directory_names_the_debian_package(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path / "nowhere")
    make_fmnist_dir(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetNotFoundError, match="t10k-labels"):
        load_fashion_mnist(tmp_path)


@pytest.mark.skipif(
    not (paths.fmnist_dir() / "train-images-idx3-ubyte.gz").is_file(),
    reason="the Debian package dataset-fashion-mnist is installed by scripts/bootstrap.sh",
)
def test_real_fashion_mnist_split_sizes_and_balance():
    data = load_dataset("fmnist")
    assert len(data.train) == 60_000 and len(data.test) == 10_000
    assert data.train.labels.bincount().tolist() == [6000] * 10
    assert data.test.labels.bincount().tolist() == [1000] * 10
    mean = data.train.images.mean().item()
    assert abs(mean - data.mean[0]) < 1e-3
