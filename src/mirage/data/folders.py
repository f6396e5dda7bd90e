"""Generic image folders, one sub-folder per class (the CUB-200 / Caltech-256 layout).

``root/<class>/<image>``; if ``root/train`` and ``root/test`` exist they are the split, otherwise a
seeded split holds out ``test_fraction`` of every class. Images are converted to RGB and resized
to ``image_size`` squared.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mirage.data.base import (
    CorruptDatasetError,
    DatasetNotFoundError,
    DatasetSplits,
    ImageData,
    channel_stats,
)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff"}


def _class_dirs(root: Path) -> list[Path]:
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not dirs:
        raise DatasetNotFoundError(f"{root}: no class sub-folders (expected root/<class>/<image>)")
    return dirs


def _read_image(path: Path, image_size: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = image.convert("RGB").resize((image_size, image_size), Image.BILINEAR)
            return np.asarray(image, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise CorruptDatasetError(f"{path}: cannot be decoded as an image ({err})") from err


def _read_tree(root: Path, classes: list[str], image_size: int) -> tuple[list[np.ndarray], list[int]]:
    images, labels = [], []
    for label, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                images.append(_read_image(path, image_size))
                labels.append(label)
    return images, labels


def _to_data(images: list[np.ndarray], labels: list[int], where: Path) -> ImageData:
    if not images:
        raise DatasetNotFoundError(f"{where}: no images with suffix in {sorted(IMAGE_SUFFIXES)}")
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div_(255.0)
    return ImageData(x.contiguous(), torch.tensor(labels, dtype=torch.int64))


def load_image_folder(
    root: Path | None, *, image_size: int = 32, test_fraction: float = 0.2, seed: int = 0
) -> DatasetSplits:
    if root is None or not Path(root).is_dir():
        raise DatasetNotFoundError(f"image folder {root!r} does not exist: pass root=<dir>")
    root = Path(root)
    if (root / "train").is_dir() and (root / "test").is_dir():
        classes = [p.name for p in _class_dirs(root / "train")]
        train = _to_data(*_read_tree(root / "train", classes, image_size), root / "train")
        test = _to_data(*_read_tree(root / "test", classes, image_size), root / "test")
    else:
        classes = [p.name for p in _class_dirs(root)]
        full = _to_data(*_read_tree(root, classes, image_size), root)
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
