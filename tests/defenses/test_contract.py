"""One contract per defense (docs/design.md §defense-contract): the registry's class-level
contract is the instance's at the default parameters, and parameters change it where they
should."""

import pytest
import torch
from factories import FACTORIES, registered_name, tiny_model

from mirage.defenses import DEFENSES, DefenseContract, create_defense

K = 10
# the parts without a default, to build an instance at otherwise default parameters
NEEDS_MODELS = {
    "grad2": lambda: {"surrogate": tiny_model(K)},
    "grad2_gated": lambda: {"surrogate": tiny_model(K)},
    "adaptive_misinformation": lambda: {
        "oe_model": tiny_model(K, 1),
        "misinformation_model": tiny_model(K, 2),
    },
    "watermarked": lambda: {"key": b"k" * 32},
}


@pytest.mark.parametrize("name", sorted(DEFENSES))
def test_the_class_level_contract_is_the_instances_at_default_parameters(name):
    defense = create_defense(name, **NEEDS_MODELS.get(name, dict)())
    assert isinstance(DEFENSES[name].contract, DefenseContract)
    assert DEFENSES[name].contract == defense.contract


@pytest.mark.parametrize("key", sorted(FACTORIES))
def test_the_budget_is_epsilon_wherever_there_is_one(key):
    defense = FACTORIES[key](K)
    assert defense.contract.budget == declared_budget(defense.params)
    assert defense.contract.norm == getattr(defense.params, "norm", "l1")
    entry = DEFENSES[registered_name(key)]
    assert entry.contract.budget == declared_budget(entry.params.model_construct())


def declared_budget(params) -> float | None:
    """ε where a defense has one; a gated defense's larger branch budget."""
    if hasattr(params, "epsilon_high"):
        return max(params.epsilon_low, params.epsilon_high)
    return getattr(params, "epsilon", None)


def test_what_the_registry_says_of_each_defense():
    contract = {name: entry.contract for name, entry in DEFENSES.items()}
    assert (
        contract["mad"].needs_input and contract["mad_argmax"].needs_input
    )  # the old registry said no
    assert contract["grad2"].needs_input and contract["adaptive_misinformation"].needs_input
    assert contract["mad_argmax"].keeps_top1 and contract["argmax"].keeps_top1
    assert not contract["grad2"].keeps_top1 and not contract["modelguard"].keeps_top1
    assert contract["top_k"].truncating and contract["rounding"].truncating
    assert contract["random_noise"].stateful
    assert not any(
        contract[n].stateful for n in ("none", "argmax", "top_k", "rounding", "grad2", "mad")
    )


def test_parameters_change_the_contract_where_they_should():
    surrogate = tiny_model(K)
    assert create_defense("grad2", surrogate=surrogate, preserve_top1=True).contract.keeps_top1
    assert create_defense("modelguard", preserve_top1=True).contract.keeps_top1
    assert create_defense("grad2", surrogate=[surrogate, tiny_model(K, 1)]).contract.stateful
    assert not create_defense("mad", jacobian="identity").contract.needs_input
    assert not create_defense("mad", oracle="random").contract.needs_input
    assert create_defense("mad", oracle="random").contract.stateful
    mad = create_defense("mad", epsilon=0.3, norm="l2")
    assert (mad.contract.budget, mad.contract.norm) == (0.3, "l2")


def test_a_defense_that_needs_input_refuses_to_answer_without_it():
    mad = create_defense("mad", surrogate=tiny_model(K))
    with pytest.raises(ValueError, match="needs the query images"):
        mad(None, torch.softmax(torch.randn(2, K), 1))
    identity = create_defense("mad", jacobian="identity")
    assert identity(None, torch.softmax(torch.randn(2, K), 1)).shape == (2, K)
