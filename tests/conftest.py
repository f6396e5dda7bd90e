import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

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


class UserNet(nn.Module):
    """Somebody else's classifier for 8×8 digits: batch norm, its own layout, no mirage base class
    and no ``input_shape`` attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.norm = nn.BatchNorm2d(8)
        self.head = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        return self.head(F.max_pool2d(F.relu(self.norm(self.conv(x))), 2).flatten(1))


@pytest.fixture(scope="session")
def user_model():
    """A :class:`UserNet` trained briefly with Adam on the scikit-learn digits, and the digits."""
    from mirage.data import load_dataset

    data = load_dataset("digits")
    torch.manual_seed(0)
    net = UserNet()
    optimizer = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(4):
        for index in torch.randperm(len(data.train)).split(64):
            loss = F.cross_entropy(net(data.train.images[index]), data.train.labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return net.eval(), data


@pytest.fixture
def digits_lenet():
    """A factory: ``digits_lenet(seed)`` -> a random 8×8 LeNet for scikit-learn digits (eval
    mode) and its card."""
    from mirage.models import ModelCard, create_model

    def build(seed: int):
        torch.manual_seed(seed)
        model = create_model("lenet", (1, 8, 8), 10, (0.3,), (0.3,)).eval()
        card = ModelCard(
            architecture="lenet",
            input_shape=(1, 8, 8),
            num_classes=10,
            mean=(0.3,),
            std=(0.3,),
            dataset="digits",
            seed=seed,
        )
        return model, card

    return build


@pytest.fixture
def run_example():
    """``run_example(name, *args, timeout=300)``: run ``examples/<name>`` as CI runs it (this
    Python, the repository as working directory, no progress bars) and return its stdout after
    checking it exited 0 (the failure shows its stderr's tail)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]

    def run(name: str, *args: str, timeout: int = 300) -> str:
        result = subprocess.run(
            [sys.executable, str(root / "examples" / name), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "MIRAGE_PROGRESS": "0"},
            cwd=root,
            check=False,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout

    return run
