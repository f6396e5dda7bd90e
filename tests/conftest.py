import os

import pytest
import torch

os.environ.setdefault("MIRAGE_PROGRESS", "0")
# The suite is dominated by small tensors, where a second OpenMP thread only adds overhead
# (and stalls badly when the machine is busy).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    """A private MIRAGE_CACHE so tests never read or write the user's cache."""
    monkeypatch.setenv("MIRAGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MIRAGE_MODELS", raising=False)
    monkeypatch.delenv("MIRAGE_ANSWERS", raising=False)
    monkeypatch.delenv("MIRAGE_CLONES", raising=False)
    return tmp_path / "cache"
