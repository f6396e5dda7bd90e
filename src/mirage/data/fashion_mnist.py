"""Fashion-MNIST (Xiao et al., 2017) from its four IDX files.

By default the files of the Debian package ``dataset-fashion-mnist``; any directory holding
``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` works (``MIRAGE_FMNIST_DIR`` or ``root=``).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from mirage import paths
from mirage.data.base import (
    CorruptDatasetError,
    DatasetNotFoundError,
    DatasetSplits,
    ImageData,
)

CLASSES = [
    "t-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
]
PROVIDER = (
    "install the Debian package dataset-fashion-mnist (apt-get install dataset-fashion-mnist) "
    "or point MIRAGE_FMNIST_DIR at a directory with the four IDX files"
)
IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049


def _find(root: Path, stem: str) -> Path:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    raise DatasetNotFoundError(f"missing {root / stem}[.gz]: {PROVIDER}")


def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (optionally gzipped), checking magic number, rank and exact length."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as err:
        raise CorruptDatasetError(f"{path}: cannot be read ({err})") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise CorruptDatasetError(f"{path}: not an unsigned-byte IDX file (bad magic number)")
    rank = raw[3]
    header = 4 + 4 * rank
    if len(raw) < header:
        raise CorruptDatasetError(f"{path}: truncated header")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(rank)]
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        raise CorruptDatasetError(
            f"{path}: {len(raw)} bytes but the header promises {expected} (truncated or padded)"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _load_pair(root: Path, prefix: str) -> ImageData:
    images = read_idx(_find(root, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find(root, f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise CorruptDatasetError(
            f"{root}/{prefix}: images {images.shape} and labels {labels.shape} do not match"
        )
    if labels.max(initial=0) >= len(CLASSES):
        raise CorruptDatasetError(f"{root}/{prefix}: label {labels.max()} out of range")
    x = torch.from_numpy(images.copy()).float().div_(255.0).unsqueeze(1)
    return ImageData(x, torch.from_numpy(labels.astype(np.int64)))


def load_fashion_mnist(root: Path | None = None) -> DatasetSplits:
    root = Path(root) if root is not None else paths.fmnist_dir()
    if not root.is_dir():
        raise DatasetNotFoundError(f"missing directory {root}: {PROVIDER}")
    return DatasetSplits(
        name="fmnist",
        train=_load_pair(root, "train"),
        test=_load_pair(root, "t10k"),
        classes=list(CLASSES),
        mean=(0.2860,),
        std=(0.3530,),
        source=str(root),
    )
