"""CIFAR-10 / CIFAR-100 in the standard "python version" pickle layout.

CIFAR-10: ``cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}``;
CIFAR-100: ``cifar-100-python/{train, test, meta}``. Pass either the directory itself or its parent.
Pickles are read with an unpickler that only admits the numpy array types these files contain.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from mirage.data.base import (
    CorruptDatasetError,
    DatasetNotFoundError,
    DatasetSplits,
    ImageData,
    require_file,
)

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
}
PROVIDER = "point root= (or --data-root) at your copy of the python-version CIFAR archive, unpacked"


class _ArrayOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR pickle")
        return super().find_class(module, name)


def read_batch(path: Path) -> dict[bytes, object]:
    try:
        with open(path, "rb") as handle:
            batch = _ArrayOnlyUnpickler(handle, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise CorruptDatasetError(f"{path}: not a CIFAR pickle batch ({err})") from err
    if not isinstance(batch, dict):
        raise CorruptDatasetError(f"{path}: expected a dict, got {type(batch).__name__}")
    return batch


def _to_images(batch: dict, label_key: bytes, path: Path, num_classes: int) -> ImageData:
    data, labels = batch.get(b"data"), batch.get(label_key)
    if data is None or labels is None:
        raise CorruptDatasetError(f"{path}: missing b'data' or {label_key!r}")
    data = np.asarray(data)
    labels = np.asarray(labels, dtype=np.int64)
    if (
        data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != 3072
        or len(labels) != len(data)
    ):
        raise CorruptDatasetError(
            f"{path}: data {data.shape}/{data.dtype} and {len(labels)} labels"
        )
    if labels.min(initial=0) < 0 or labels.max(initial=0) >= num_classes:
        raise CorruptDatasetError(f"{path}: labels outside 0..{num_classes - 1}")
    x = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()).float().div_(255.0)
    return ImageData(x, torch.from_numpy(labels))


def _concat(parts: list[ImageData]) -> ImageData:
    return ImageData(torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]))


def _resolve(root: Path | None, subdir: str, name: str) -> Path:
    if root is None:
        raise DatasetNotFoundError(f"{name} has no default location: {PROVIDER}")
    root = Path(root)
    if (root / subdir).is_dir():
        root = root / subdir
    if not root.is_dir():
        raise DatasetNotFoundError(f"missing directory {root}: {PROVIDER}")
    return root


def _names(meta: dict, key: bytes, path: Path) -> list[str]:
    names = meta.get(key)
    if not isinstance(names, list) or not names:
        raise CorruptDatasetError(f"{path}: missing {key!r}")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def load_cifar10(root: Path | None = None) -> DatasetSplits:
    root = _resolve(root, "cifar-10-batches-py", "cifar10")
    meta_path = require_file(root / "batches.meta", PROVIDER)
    classes = _names(read_batch(meta_path), b"label_names", meta_path)
    train = []
    for i in range(1, 6):
        path = require_file(root / f"data_batch_{i}", PROVIDER)
        train.append(_to_images(read_batch(path), b"labels", path, len(classes)))
    test_path = require_file(root / "test_batch", PROVIDER)
    return DatasetSplits(
        name="cifar10",
        train=_concat(train),
        test=_to_images(read_batch(test_path), b"labels", test_path, len(classes)),
        classes=classes,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        source=str(root),
    )


def load_cifar100(root: Path | None = None) -> DatasetSplits:
    root = _resolve(root, "cifar-100-python", "cifar100")
    meta_path = require_file(root / "meta", PROVIDER)
    classes = _names(read_batch(meta_path), b"fine_label_names", meta_path)
    splits = {}
    for split in ("train", "test"):
        path = require_file(root / split, PROVIDER)
        splits[split] = _to_images(read_batch(path), b"fine_labels", path, len(classes))
    return DatasetSplits(
        name="cifar100",
        train=splits["train"],
        test=splits["test"],
        classes=classes,
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
        source=str(root),
    )
