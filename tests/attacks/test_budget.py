"""Exact budget accounting: an attack never spends one query over its budget, and spends all of
it when it can (JBDA rounds that would overshoot are truncated)."""

import pytest
import torch

from mirage.api import InProcessAPI
from mirage.attacks import BudgetExhausted, QueryClient, create_attack, list_attacks
from mirage.registry import UnknownNameError

FAST_PARAMS = {
    "knockoff": {},
    "knockoff-adaptive": {"step_size": 8},
    "jbda": {"seed_size": 10, "rounds": None, "substitute_epochs": 1},
    "jb-self": {"seed_size": 10, "rounds": None, "substitute_epochs": 1},
    "jb-top3": {"seed_size": 10, "rounds": None, "substitute_epochs": 1, "pgd_steps": 2},
}


def test_every_registered_attack_is_covered():
    assert set(list_attacks()) == set(FAST_PARAMS)


@pytest.mark.parametrize("name", sorted(FAST_PARAMS))
@pytest.mark.parametrize("budget", [1, 37])
def test_attack_spends_exactly_its_budget(name, budget, victim, digits, clone_spec):
    # The API refuses anything past `budget`, so one query over would raise.
    api = InProcessAPI(victim, query_budget=budget)
    result = create_attack(name, **FAST_PARAMS[name]).run(api, budget, digits.train, clone_spec)
    assert result.queries == api.queries_used == budget
    assert result.transfer_size == budget
    assert result.effective_l1 == pytest.approx(0.0)


@pytest.mark.parametrize("name", ["jbda", "jb-top3"])
def test_jacobian_rounds_truncate_to_the_remaining_budget(name, victim, digits, clone_spec):
    # seed 10: jbda 10 -> 20 -> 40 (26 = 20 + 6 left), jb-top3 10 -> 40 (26 = 10 + 16 left).
    api = InProcessAPI(victim, query_budget=26)
    result = create_attack(name, **FAST_PARAMS[name]).run(api, 26, digits.train, clone_spec)
    sizes = [h["set_size"] for h in result.history if "set_size" in h]
    assert sizes == ([10, 20, 26] if name == "jbda" else [10, 26])
    assert api.queries_used == 26


def test_jbda_stops_after_its_rounds(victim, digits, clone_spec):
    api = InProcessAPI(victim)
    result = create_attack("jbda", seed_size=10, rounds=3, substitute_epochs=1).run(
        api, 1000, digits.train, clone_spec
    )
    assert result.queries == api.queries_used == 80  # 10 * 2**3


def test_knockoff_with_a_small_pool_spends_only_the_pool(victim, digits, clone_spec):
    api = InProcessAPI(victim)
    pool = digits.test.subset(torch.arange(50))
    result = create_attack("knockoff").run(api, 200, pool, clone_spec)
    assert result.queries == api.queries_used == 50


def test_query_client_refuses_and_spends_nothing(victim):
    client = QueryClient(InProcessAPI(victim), budget=5)
    client.query(torch.rand(3, 1, 8, 8))
    with pytest.raises(BudgetExhausted):
        client.query(torch.rand(3, 1, 8, 8))
    assert client.spent == 3 and client.remaining == 2


def test_effective_l1_counts_only_the_attack_queries(
    victim, digits, clone_spec, served, recording_api
):
    api = recording_api(victim, served("uniform"))
    api.query(digits.test.images[:7])  # someone else's queries, far from uniform answers
    result = create_attack("knockoff").run(api, 20, digits.train, clone_spec)
    with torch.no_grad():
        clean = torch.softmax(victim(api.all_asked()[7:]), 1)
    expected = (clean - 0.1).abs().sum(1).mean().item()
    assert result.effective_l1 == pytest.approx(expected, rel=1e-4)
    assert api.queries_used == 27


def test_invalid_budget_and_mismatched_data_are_errors(victim, digits, clone_spec):
    attack = create_attack("knockoff")
    with pytest.raises(ValueError, match="budget"):
        attack.run(InProcessAPI(victim), 0, digits.train, clone_spec)
    other = digits.train.subset(torch.arange(4))
    wrong = type(other)(torch.zeros(4, 1, 28, 28), other.labels)
    with pytest.raises(ValueError, match="shape"):
        attack.run(InProcessAPI(victim), 10, wrong, clone_spec)
    with pytest.raises(UnknownNameError):
        create_attack("nope")
    with pytest.raises(ValueError):
        create_attack("knockoff", unknown_key=1)
