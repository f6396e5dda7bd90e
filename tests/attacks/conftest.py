"""Tiny, fast fixtures: sklearn's 8x8 digits, a LeNet victim trained for a few epochs, and API
test doubles serving adversarial answers (one-hot, uniform, all zeros)."""

import pytest
import torch

from mirage.api import InProcessAPI
from mirage.attacks import CloneSpec
from mirage.data import load_dataset
from mirage.defenses import Defense, DefenseContract
from mirage.models import create_model
from mirage.models.fit import TrainConfig, fit

FAST = TrainConfig(epochs=1, batch_size=64, lr=0.05)


@pytest.fixture(scope="session")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="session")
def victim(digits):
    torch.manual_seed(0)
    model = create_model("lenet", digits.input_shape, 10, digits.mean, digits.std)
    fit(
        model,
        digits.train.images,
        digits.train.labels,
        TrainConfig(epochs=4, lr=0.05),
        show_progress=False,
    )
    return model.eval()


@pytest.fixture
def clone_spec(digits):
    return CloneSpec(mean=digits.mean, std=digits.std, training=FAST)


class Served(Defense):
    """Test double: serves a fixed kind of answer whatever the victim says."""

    name = "served-test"

    @classmethod
    def contract_for(cls, params):
        return DefenseContract(truncating=True)

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def perturb(self, x, probs):
        if self.kind == "one-hot":
            return torch.nn.functional.one_hot(probs.argmax(1), probs.shape[1]).to(probs.dtype)
        if self.kind == "uniform":
            return torch.full_like(probs, 1 / probs.shape[1])
        if self.kind == "zeros":
            return torch.zeros_like(probs)
        raise ValueError(self.kind)


class RecordingAPI(InProcessAPI):
    """An in-process API that keeps every batch it was asked."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.asked: list[torch.Tensor] = []

    def query(self, x):
        out = super().query(x)
        self.asked.append(x.detach().clone())
        return out

    def all_asked(self) -> torch.Tensor:
        return torch.cat(self.asked)


@pytest.fixture
def served():
    """Factory: ``served("zeros")`` -> a defense double serving that kind of answer."""
    return Served


@pytest.fixture
def recording_api():
    """Factory with InProcessAPI's signature, returning a :class:`RecordingAPI`."""
    return RecordingAPI
