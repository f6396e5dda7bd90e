"""Datasets by name: ``load_dataset("fmnist")``. Images in [0, 1], fixed splits, clear errors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from mirage.data.base import (
    CorruptDatasetError,
    DatasetNotFoundError,
    DatasetSplits,
    ImageData,
)
from mirage.data.cifar import load_cifar10, load_cifar100
from mirage.data.fashion_mnist import load_fashion_mnist
from mirage.data.folders import load_image_folder
from mirage.data.mnist_digits import load_mnist_digits
from mirage.data.sklearn_digits import load_sklearn_digits
from mirage.registry import UnknownNameError

DATASETS: dict[str, Callable[..., DatasetSplits]] = {
    "fmnist": load_fashion_mnist,
    "mnist": load_mnist_digits,
    "digits": load_sklearn_digits,
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
    "folder": load_image_folder,
}

_CACHE: dict[tuple[str, str | None], DatasetSplits] = {}


def load_dataset(name: str, root: str | Path | None = None, **kwargs) -> DatasetSplits:
    """Load a registered dataset; results are memoised per process (datasets are immutable)."""
    if name not in DATASETS:
        raise UnknownNameError("dataset", name, DATASETS)
    key = (name, str(root) if root is not None else None)
    if kwargs:
        return DATASETS[name](Path(root) if root is not None else None, **kwargs)
    if key not in _CACHE:
        _CACHE[key] = DATASETS[name](Path(root) if root is not None else None)
    return _CACHE[key]


__all__ = [
    "DATASETS",
    "CorruptDatasetError",
    "DatasetNotFoundError",
    "DatasetSplits",
    "ImageData",
    "load_dataset",
]
