"""Image folders: labelled, one sub-folder per class (the CUB-200 / Caltech-256 layout), and
unlabelled (any tree of images, or a NumPy array), the way a user's own data arrives.

``root/<class>/<image>``; if ``root/train`` and ``root/test`` exist they are the split, otherwise a
seeded split holds out ``test_fraction`` of every class. Images keep their own size and channels
unless told: a folder of 28×28 grayscale PNGs loads as (N, 1, 28, 28). ``image_size`` resizes
(squared) and ``channels`` (1 or 3) converts; images of different sizes need ``image_size``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mirage.data.base import (
    CorruptDatasetError,
    DatasetNotFoundError,
    DatasetSplits,
    ImageData,
    channel_stats,
)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".tif", ".tiff"}
GRAYSCALE_MODES = {"1", "L", "LA", "I", "I;16", "F"}


def _class_dirs(root: Path) -> list[Path]:
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not dirs:
        raise DatasetNotFoundError(f"{root}: no class sub-folders (expected root/<class>/<image>)")
    return dirs


def _image_files(folder: Path, *, recursive: bool = False) -> list[Path]:
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in found if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _read_images(paths: list[Path], image_size: int | None, channels: int | None) -> np.ndarray:
    """(N, H, W, C) uint8: each image at ``image_size`` (default: its own, the same for all) with
    ``channels`` (default: 1 if every image is grayscale, else 3)."""
    from PIL import Image, UnidentifiedImageError

    opened = []
    for path in paths:
        try:
            with Image.open(path) as file:
                file.load()
                opened.append(file.copy())
        except (UnidentifiedImageError, OSError, SyntaxError) as err:
            raise CorruptDatasetError(f"{path}: cannot be decoded as an image ({err})") from err
    if channels is None:
        channels = 1 if all(image.mode in GRAYSCALE_MODES for image in opened) else 3
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if image_size is None:
        sizes = sorted({image.size for image in opened})
        if len(sizes) > 1:
            raise ValueError(
                f"the images have {len(sizes)} different sizes (e.g. {sizes[0]} and {sizes[-1]}): "
                "pass image_size to resize them all"
            )
    arrays = []
    for image in opened:
        image = image.convert("L" if channels == 1 else "RGB")
        if image_size is not None:
            image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
        array = np.asarray(image, dtype=np.uint8)
        arrays.append(array[..., None] if channels == 1 else array)
    return np.stack(arrays)


def _to_tensor(images: np.ndarray) -> Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0).contiguous()


def _read_tree(root: Path, classes: list[str]) -> tuple[list[Path], list[int]]:
    paths, labels = [], []
    for label, name in enumerate(classes):
        folder = root / name
        if folder.is_dir():
            files = _image_files(folder)
            paths += files
            labels += [label] * len(files)
    return paths, labels


def _labelled(
    roots: list[Path], classes: list[str], image_size: int | None, channels: int | None
) -> list[ImageData]:
    """One :class:`ImageData` per root, read together so they share size and channels."""
    trees = [_read_tree(root, classes) for root in roots]
    for root, (paths, _) in zip(roots, trees, strict=True):
        if not paths:
            raise DatasetNotFoundError(f"{root}: no images with suffix in {sorted(IMAGE_SUFFIXES)}")
    images = _to_tensor(
        _read_images([p for paths, _ in trees for p in paths], image_size, channels)
    )
    out, start = [], 0
    for paths, labels in trees:
        out.append(
            ImageData(images[start : start + len(paths)], torch.tensor(labels, dtype=torch.int64))
        )
        start += len(paths)
    return out


def load_images(
    source: str | Path, *, image_size: int | None = None, channels: int | None = None
) -> Tensor:
    """Unlabelled images (N, C, H, W) in [0, 1]: every image file under a folder (recursively,
    sorted by path), or a ``.npy`` array, (N, C, H, W) or (N, H, W), of floats in [0, 1] or
    uint8. What a defender distils a surrogate on
    (:func:`mirage.training.surrogate.distil_surrogate`)."""
    source = Path(source)
    if source.suffix == ".npy":
        array = np.load(source, allow_pickle=False)
        if array.ndim == 3:
            array = array[:, None]
        if array.ndim != 4:
            raise ValueError(
                f"{source}: expected (N, C, H, W) or (N, H, W), got shape {array.shape}"
            )
        images = torch.from_numpy(
            array.astype(np.float32) / (255.0 if array.dtype == np.uint8 else 1.0)
        )
        if not torch.isfinite(images).all() or images.min() < 0 or images.max() > 1:
            raise ValueError(f"{source}: pixel values must be in [0, 1] (or uint8)")
        return images.contiguous()
    if not source.is_dir():
        raise DatasetNotFoundError(f"{source}: neither an image folder nor a .npy file")
    paths = _image_files(source, recursive=True)
    if not paths:
        raise DatasetNotFoundError(f"{source}: no images with suffix in {sorted(IMAGE_SUFFIXES)}")
    return _to_tensor(_read_images(paths, image_size, channels))


def load_image_folder(
    root: Path | None,
    *,
    image_size: int | None = None,
    channels: int | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> DatasetSplits:
    if root is None or not Path(root).is_dir():
        raise DatasetNotFoundError(f"image folder {root!r} does not exist: pass root=<dir>")
    root = Path(root)
    if (root / "train").is_dir() and (root / "test").is_dir():
        classes = [p.name for p in _class_dirs(root / "train")]
        train, test = _labelled([root / "train", root / "test"], classes, image_size, channels)
    else:
        classes = [p.name for p in _class_dirs(root)]
        (full,) = _labelled([root], classes, image_size, channels)
        generator = torch.Generator().manual_seed(seed)
        test_mask = torch.zeros(len(full), dtype=torch.bool)
        for label in range(len(classes)):
            members = torch.nonzero(full.labels == label).flatten()
            n_test = round(test_fraction * len(members))
            test_mask[members[torch.randperm(len(members), generator=generator)[:n_test]]] = True
        train, test = full.subset(~test_mask), full.subset(test_mask)
    mean, std = channel_stats(train.images)
    return DatasetSplits(
        name=f"folder:{root.name}",
        train=train,
        test=test,
        classes=classes,
        mean=mean,
        std=std,
        source=str(root),
    )
