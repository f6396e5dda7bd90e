import pytest
import torch

from mirage.api import (
    InProcessAPI,
    PredictionAPI,
    QueryBudgetExceeded,
    clean_posteriors,
    defended_accuracy,
)
from mirage.data import ImageData
from mirage.defenses import Defense, create_defense
from mirage.models import create_model


class ShiftToLast(Defense):
    """Test double: moves 0.1 of mass from the top class to the last class."""

    name = "shift-test"

    def perturb(self, x, probs):
        out = probs.clone()
        top = probs.argmax(1)
        mass = torch.minimum(probs.gather(1, top[:, None]).squeeze(1), torch.tensor(0.1))
        out[torch.arange(len(out)), top] -= mass
        out[:, -1] += mass
        return out


@pytest.fixture
def model():
    return create_model("lenet", (1, 28, 28), 10, [0.5], [0.5]).eval()


def test_api_satisfies_the_protocol_and_serves_clean_posteriors(model):
    api = InProcessAPI(model)
    assert isinstance(api, PredictionAPI)
    x = torch.rand(5, 1, 28, 28)
    assert torch.allclose(api.query(x), torch.softmax(model(x), 1), atol=1e-6)
    assert api.queries_used == 5 and api.ledger.effective_l1 == 0.0


def test_budget_is_exact_and_a_refused_request_spends_nothing(model):
    api = InProcessAPI(model, query_budget=10, batch_size=3)
    api.query(torch.rand(7, 1, 28, 28))
    with pytest.raises(QueryBudgetExceeded):
        api.query(torch.rand(4, 1, 28, 28))
    assert api.queries_used == 7 and api.queries_left == 3
    api.query(torch.rand(3, 1, 28, 28))
    assert api.queries_used == 10
    with pytest.raises(QueryBudgetExceeded):
        api.query(torch.rand(1, 1, 28, 28))
    assert api.queries_used == 10


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.rand(2, 1, 27, 28), "shape"),
        (torch.rand(0, 1, 28, 28), "empty"),
        (torch.full((1, 1, 28, 28), float("nan")), "NaN"),
        (torch.rand(1, 1, 28, 28) + 1.5, r"\[0, 1\]"),
        (torch.randint(0, 2, (1, 1, 28, 28)), "floating"),
    ],
)
def test_invalid_queries_are_refused_without_spending(model, bad, message):
    api = InProcessAPI(model, query_budget=100)
    with pytest.raises(ValueError, match=message):
        api.query(bad)
    assert api.queries_used == 0


def test_effective_l1_and_top1_accounting(model):
    defense = ShiftToLast()
    api = InProcessAPI(model, defense, batch_size=4)
    x = torch.rand(9, 1, 28, 28)
    served = api.query(x)
    clean = clean_posteriors(model, x)
    expected_l1 = (served - clean).abs().sum(1).mean().item()
    assert api.ledger.effective_l1 == pytest.approx(expected_l1, rel=1e-5)
    assert api.ledger.effective_l1 == pytest.approx(0.2, abs=1e-5)  # 0.1 moved costs 0.2 in L1
    kept = (served.argmax(1) == clean.argmax(1)).float().mean().item()
    assert api.ledger.top1_agreement == pytest.approx(kept)


def test_defended_accuracy_uses_the_defense(model):
    x = torch.rand(20, 1, 28, 28)
    labels = clean_posteriors(model, x).argmax(1)
    data = ImageData(x, labels)
    result = defended_accuracy(model, create_defense("none"), data)
    assert result.clean_accuracy == 1.0 and result.defended_accuracy == 1.0
    assert result.effective_l1 == 0.0
