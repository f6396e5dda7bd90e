import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from mirage.data import CorruptDatasetError, DatasetNotFoundError, load_dataset
from mirage.data.cifar import load_cifar10, load_cifar100
from mirage.data.folders import load_image_folder
from mirage.registry import UnknownNameError


def test_sklearn_digits_split():
    data = load_dataset("digits")
    assert data.train.images.shape == (1437, 1, 8, 8) and len(data.test) == 360
    assert data.train.images.max() <= 1 and data.train.images.min() >= 0
    assert data.num_classes == 10


def write_cifar10(root, per_batch=4):
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"data": rng.integers(0, 256, (per_batch, 3072)).astype(np.uint8),
            b"labels": rng.integers(0, 10, per_batch).tolist(),
            b"batch_label": name.encode(),
        }
        (root / name).write_bytes(pickle.dumps(batch))
    (root / "batches.meta").write_bytes(
        pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]})
    )
    return root


def test_cifar10_pickle_layout(tmp_path):
    write_cifar10(tmp_path / "cifar-10-batches-py")
    data = load_cifar10(tmp_path)  # the parent directory works too
    assert data.train.images.shape == (20, 3, 32, 32) and data.test.images.shape == (4, 3, 32, 32)
    assert data.classes[0] == "c0" and data.train.images.max() <= 1
    raw = pickle.loads(
        (tmp_path / "cifar-10-batches-py" / "data_batch_1").read_bytes(), encoding="bytes"
    )
    first = torch.from_numpy(raw[b"data"][0].reshape(3, 32, 32)).float() / 255
    assert torch.equal(data.train.images[0], first)  # channel-major layout kept


def test_cifar100_pickle_layout(tmp_path):
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 3)):
        (root / split).write_bytes(
            pickle.dumps(
                {
                    b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8),
                    b"fine_labels": rng.integers(0, 100, n).tolist(),
                    b"coarse_labels": rng.integers(0, 20, n).tolist(),
                }
            )
        )
    (root / "meta").write_bytes(
        pickle.dumps({b"fine_label_names": [f"f{i}".encode() for i in range(100)]})
    )
    data = load_cifar100(root)
    assert data.num_classes == 100 and len(data.train) == 6 and len(data.test) == 3


def test_cifar_truncated_and_malicious_pickles(tmp_path):
    root = write_cifar10(tmp_path / "cifar-10-batches-py")
    blob = (root / "data_batch_3").read_bytes()
    (root / "data_batch_3").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CorruptDatasetError):
        load_cifar10(root)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    write_cifar10(tmp_path / "b" / "cifar-10-batches-py")
    (tmp_path / "b" / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CorruptDatasetError, match="refusing"):
        load_cifar10(tmp_path / "b")


def test_cifar_missing_names_the_file(tmp_path):
    root = write_cifar10(tmp_path / "cifar-10-batches-py")
    (root / "test_batch").unlink()
    with pytest.raises(DatasetNotFoundError, match="test_batch"):
        load_cifar10(root)
    with pytest.raises(DatasetNotFoundError):
        load_dataset("cifar10")


def write_folder(root, classes=("ant", "bee", "cat"), per_class=5, size=(20, 14)):
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(
                root / name / f"{i}.png"
            )
    return root


def test_image_folder_split_and_resize(tmp_path):
    data = load_image_folder(write_folder(tmp_path / "imgs"), image_size=16, test_fraction=0.4)
    assert data.classes == ["ant", "bee", "cat"]
    assert data.train.images.shape == (9, 3, 16, 16) and len(data.test) == 6
    assert data.test.labels.bincount().tolist() == [2, 2, 2]


def test_image_folder_with_train_test_dirs(tmp_path):
    write_folder(tmp_path / "d" / "train", per_class=3)
    write_folder(tmp_path / "d" / "test", per_class=1)
    data = load_image_folder(tmp_path / "d", image_size=8)
    assert len(data.train) == 9 and len(data.test) == 3


def test_image_folder_corrupt_image(tmp_path):
    root = write_folder(tmp_path / "imgs")
    (root / "bee" / "2.png").write_bytes(b"not an image")
    with pytest.raises(CorruptDatasetError, match="2.png"):
        load_image_folder(root)


def test_unknown_dataset():
    with pytest.raises(UnknownNameError, match="unknown dataset"):
        load_dataset("imagenet")


def test_image_folder_keeps_grayscale_and_its_own_size(tmp_path):
    """A folder of 28×28 grayscale PNGs loads as (N, 1, 28, 28), not resized to RGB 32×32."""
    rng = np.random.default_rng(1)
    pixels = {}
    for name in ("shirt", "shoe"):
        (tmp_path / "g" / name).mkdir(parents=True)
        for i in range(4):
            pixels[(name, i)] = rng.integers(0, 256, (28, 28), dtype=np.uint8)
            Image.fromarray(pixels[(name, i)], mode="L").save(tmp_path / "g" / name / f"{i}.png")
    data = load_image_folder(tmp_path / "g", test_fraction=0.25)
    assert data.train.images.shape == (6, 1, 28, 28) and data.test.images.shape == (2, 1, 28, 28)
    assert len(data.mean) == 1
    every = torch.cat([data.train.images, data.test.images])
    expected = torch.stack([torch.from_numpy(p).float().div(255) for p in pixels.values()])[:, None]
    assert sorted(every.flatten(1).tolist()) == sorted(
        expected.flatten(1).tolist()
    )  # the same pixels, exactly
    assert load_image_folder(tmp_path / "g", channels=3, image_size=16).train.images.shape == (
        6,
        3,
        16,
        16,
    )


def test_images_of_several_sizes_need_an_image_size(tmp_path):
    root = write_folder(tmp_path / "imgs")
    Image.fromarray(np.zeros((9, 9, 3), dtype=np.uint8)).save(root / "ant" / "odd.png")
    with pytest.raises(ValueError, match="image_size"):
        load_image_folder(root)
    assert load_image_folder(root, image_size=12).train.images.shape[1:] == (3, 12, 12)


def test_unlabelled_images_from_a_tree_or_an_array(tmp_path):
    from mirage.data.folders import load_images

    root = write_folder(tmp_path / "imgs", per_class=2)
    assert load_images(root).shape == (6, 3, 14, 20)
    array = np.random.default_rng(0).integers(0, 256, (5, 8, 8), dtype=np.uint8)
    np.save(tmp_path / "x.npy", array)
    loaded = load_images(tmp_path / "x.npy")
    assert loaded.shape == (5, 1, 8, 8) and torch.equal(
        loaded[:, 0], torch.from_numpy(array).float() / 255
    )
    np.save(tmp_path / "bad.npy", np.full((2, 1, 4, 4), 2.0, dtype=np.float32))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        load_images(tmp_path / "bad.npy")
