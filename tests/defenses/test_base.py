import pytest
import torch
from pydantic import Field, ValidationError

from mirage.defenses import (
    DEFENSES,
    Defense,
    DefenseContract,
    DefenseInvariantError,
    DefenseParams,
    check_probs,
    create_defense,
    register_defense,
)
from mirage.defenses.base import strict_top1_kept
from mirage.registry import UnknownNameError


class BudgetParams(DefenseParams):
    epsilon: float = Field(0.2, ge=0, le=2)


class Overspend(Defense):
    params_type = BudgetParams
    name = "overspend"

    @classmethod
    def contract_for(cls, params):
        return DefenseContract(keeps_top1=True, budget=params.epsilon)

    def perturb(self, x, probs):
        out = torch.zeros_like(probs)
        out[:, probs.argmin(1)[0]] = 1.0
        return out


def test_check_probs_rejects_bad_rows():
    good = torch.softmax(torch.randn(3, 4), 1)
    check_probs(good)
    cases = [
        (good[0], "shape"),
        (good[:0], "at least one row"),
        (good.clone().fill_(float("nan")), "NaN"),
        (good * 2, "sum to 1"),
        (torch.tensor([[1.5, -0.5]]), "negative"),
        (good.to(torch.int64), "floating"),
    ]
    for bad, message in cases:
        with pytest.raises(ValueError, match=message):
            check_probs(bad)
    with pytest.raises(ValueError, match="expected 5"):
        check_probs(good, num_classes=5)


def test_base_class_enforces_budget_and_top1():
    defense = Overspend(epsilon=0.2)
    probs = torch.tensor([[0.7, 0.2, 0.1]])
    with pytest.raises(DefenseInvariantError, match="budget"):
        defense(None, probs)


def test_strict_top1_treats_ties_as_lost():
    clean = torch.tensor([[0.6, 0.4], [0.7, 0.3]])
    served = torch.tensor([[0.5, 0.5], [0.6, 0.4]])
    assert strict_top1_kept(clean, served).tolist() == [False, True]


def test_registry_validates_parameters():
    assert "none" in DEFENSES
    with pytest.raises(UnknownNameError, match="unknown defense"):
        create_defense("does-not-exist")
    with pytest.raises(ValidationError):
        create_defense("none", epsilon=0.3)  # unknown keys are refused


def test_register_twice_is_an_error():
    with pytest.raises(ValueError, match="already registered"):
        register_defense("none")(Overspend)


def test_a_defense_declares_its_contract_in_one_place():
    """No contract attribute is spelled outside DefenseContract: no class attributes, instance
    attributes or properties named after its fields (the old spellings included)."""
    spellings = {
        "needs_input",
        "truncating",
        "keeps_top1",
        "preserves_top1",
        "stateful",
        "epsilon",
        "budget",
    }
    for name, entry in DEFENSES.items():
        for cls in entry.cls.__mro__:
            assert not spellings & set(vars(cls)), (name, cls.__name__, spellings & set(vars(cls)))


def test_the_base_class_checks_the_budget_in_the_contracts_distance():
    class KLParams(DefenseParams):
        epsilon: float = 0.01

    class KLOverspend(Defense):
        params_type = KLParams
        name = "kl-overspend"

        @classmethod
        def contract_for(cls, params):
            return DefenseContract(budget=params.epsilon, norm="kl")

        def perturb(self, x, probs):
            return torch.full_like(probs, 1 / probs.shape[1])

    with pytest.raises(DefenseInvariantError, match="KL .* exceeds budget 0.01"):
        KLOverspend()(None, torch.tensor([[0.9, 0.05, 0.05]]))
    assert torch.allclose(
        KLOverspend(epsilon=1.0)(None, torch.tensor([[0.4, 0.3, 0.3]])), torch.full((1, 3), 1 / 3)
    )
