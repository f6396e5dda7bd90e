"""The attackers of a query-stream detector (docs/design.md §countermeasures, §detection): benign
decoys mixed into the stream (``mix_benign``) and the budget spread over API keys
(``api_keys``): exact budgets, where the decoys come from and sit, what each key's detector state
holds, and PRADA against plain and mixing JBDA on the digits victim."""

import pytest
import torch
from pydantic import ValidationError

from mirage.api import InProcessAPI, PradaConfig, PradaDetector
from mirage.attacks import ATTACKER_SUITE, BudgetExhausted, QueryClient, create_attack
from mirage.attacks.streams import decoy_fraction, decoy_mask, key_apis
from mirage.defenses import create_defense

JBDA_SMALL = {"seed_size": 20, "rounds": None, "substitute_epochs": 1, "query_batch_size": 20}


def rows_of(images: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    """(N,) bool: which of ``images`` are exactly rows of ``data``."""
    return torch.cdist(images.flatten(1), data.flatten(1)).min(1).values == 0


def test_the_schedule_puts_floor_of_l_times_f_decoys_in_every_prefix():
    for fraction in (0.3, 0.5, 0.25, 0.9, 0.001):
        f = decoy_fraction(fraction)
        mask = decoy_mask(0, 2000, f)
        prefix = torch.cumsum(mask.long(), 0)
        expected = torch.arange(1, 2001) * f.numerator // f.denominator
        assert torch.equal(prefix, expected) and not mask[0]
        assert torch.equal(decoy_mask(37, 700, f), mask[37:700])  # positions, not requests, decide
    assert decoy_mask(0, 10, decoy_fraction(0.3)).nonzero().flatten().tolist() == [3, 6, 9]


@pytest.mark.parametrize(
    ("budget", "repeats", "batch"), [(10, 1, 3), (100, 1, 7), (91, 3, 5), (64, 2, 64)]
)
def test_decoys_come_from_the_data_sit_at_their_positions_and_spend_the_budget_exactly(
    victim, digits, recording_api, budget, repeats, batch
):
    api = recording_api(victim, None)
    pool = digits.train.images[:50]
    client = QueryClient(
        api,
        budget,
        repeats=repeats,
        mix_benign=0.3,
        decoys=pool,
        decoy_generator=torch.Generator().manual_seed(5),
    )
    positions = budget // repeats
    assert client.remaining == positions - positions * 3 // 10
    own = digits.test.images  # the attack's images: none is a pool image
    done = calls = 0
    while client.remaining:
        x = own[done : done + min(batch, client.remaining)]
        assert client.query(x).shape == (len(x), 10)
        done, calls = done + len(x), calls + 1
    assert client.spent == api.queries_used == repeats * positions > budget - repeats  # exact
    assert client.decoys_sent == positions * 3 // 10
    sent = api.all_asked()[::repeats]  # the first copy of every image, in stream order
    is_decoy = decoy_mask(0, positions, decoy_fraction(0.3))
    assert rows_of(sent[is_decoy], pool).all() and not rows_of(sent[~is_decoy], pool).any()
    assert torch.equal(sent[~is_decoy], own[:done])
    assert len(api.asked) == calls  # the decoys travel inside the attack's own requests
    assert len(set(map(tuple, sent[is_decoy].flatten(1).tolist()))) == min(
        client.decoys_sent, len(pool)
    )
    images, answers = client.decoy_set()
    assert torch.equal(images, sent[is_decoy]) and answers.shape == (client.decoys_sent, 10)
    with pytest.raises(BudgetExhausted):
        client.query(own[:1])


@pytest.mark.parametrize(
    ("attack", "budget"), [("knockoff", 97), ("jbda", 130), ("knockoff-adaptive", 80)]
)
def test_a_mixing_attack_spends_exactly_its_budget_and_trains_on_the_decoys_too(
    victim, digits, clone_spec, recording_api, attack, budget
):
    api = recording_api(victim, None)
    extra = (
        JBDA_SMALL if attack == "jbda" else {"query_batch_size": 16} if attack == "knockoff" else {}
    )
    data = digits.test if attack == "jbda" else digits.train
    result = create_attack(attack, variant="mixing", **extra).run(
        api, budget, data, clone_spec, seed=0
    )
    decoys = budget * 3 // 10
    assert result.queries == api.queries_used == budget and result.decoys == decoys
    assert result.transfer_size == budget  # the attack's images and the decoys
    assert result.history[-1]["decoys"] == decoys
    assert result.countermeasures == {"mix_benign": 0.3}
    sent = api.all_asked()
    assert rows_of(sent[decoy_mask(0, budget, decoy_fraction(0.3))], data.images).all()


def test_several_keys_share_the_budget_round_robin_and_the_l1_adds_up(victim, digits, clone_spec):
    noisy = create_defense("random_noise", epsilon=0.5, seed=1)
    api = InProcessAPI(victim, noisy, client="thief")
    views = [api, *(api.for_client(f"thief{i}") for i in range(1, 4))]
    result = create_attack("knockoff", query_batch_size=10).run(
        views, 97, digits.train, clone_spec, seed=0
    )
    assert result.queries == 97 == sum(v.queries_used for v in views)
    assert (
        result.queries_per_key == [v.queries_used for v in views] == [30, 27, 20, 20]
    )  # 10 requests
    l1 = sum(v.ledger.l1_sum for v in views) / 97
    assert result.effective_l1 == pytest.approx(l1) and result.effective_l1 > 0
    assert (
        views[1].model is api.model
        and views[1].defense is noisy
        and views[1].ledger is not api.ledger
    )


def test_a_shared_prada_detector_sees_a_quarter_of_the_stream_per_key(victim, digits, clone_spec):
    detector = PradaDetector(PradaConfig())
    api = InProcessAPI(victim, None, detector=detector, client="thief")
    result = create_attack("jbda", variant="multi-key", **JBDA_SMALL).run(
        api, 320, digits.test, clone_spec, seed=0
    )
    assert result.queries == 320 and result.queries_per_key == [80, 80, 80, 80]
    assert set(detector.clients) == {"thief", "thief+1", "thief+2", "thief+3"}
    assert [
        detector.state(name).queries for name in ("thief", "thief+1", "thief+2", "thief+3")
    ] == [80] * 4
    assert api.queries_used == 80  # the API it was given is the first key


def test_mixing_half_the_stream_hides_jbda_from_prada_on_digits(victim, digits, clone_spec):
    """Plain JBDA alarms PRADA at its first test; with half of the stream natural digits the
    distances look normal enough (W ≈ 0.98 against δ = 0.9) that it never alarms."""
    outcome = {}
    for mix in (0.0, 0.5):
        detector = PradaDetector(PradaConfig())
        api = InProcessAPI(victim, None, detector=detector, client="thief")
        result = create_attack("jbda", mix_benign=mix, **JBDA_SMALL).run(
            api, 320, digits.test, clone_spec, seed=0
        )
        outcome[mix] = detector.state("thief")
        assert outcome[mix].queries == result.queries == 320
    assert outcome[0.0].alarm_at is not None
    assert outcome[0.5].alarm_at is None and outcome[0.5].statistic > PradaConfig().delta


def test_keys_and_decoys_are_validated(victim, digits, clone_spec):
    api = InProcessAPI(victim, None, client="a")

    class Remote:  # an API that cannot make views for other clients (like HTTPPredictionAPI)
        num_classes, input_shape = api.num_classes, api.input_shape

        def query(self, x):
            return api.query(x)

    with pytest.raises(TypeError, match="one API per key"):
        create_attack("knockoff", api_keys=2).run(Remote(), 10, digits.train, clone_spec)
    with pytest.raises(ValueError, match="3 APIs"):
        key_apis([api, api.for_client("b"), api.for_client("c")], 2)
    with pytest.raises(ValueError, match="share"):
        api.for_client("a")
    with pytest.raises(ValidationError):
        create_attack("knockoff", mix_benign=1.0)
    with pytest.raises(ValueError, match="decoys"):
        QueryClient(api, 10, mix_benign=0.3)
    assert ATTACKER_SUITE["mixing"] == {"mix_benign": 0.3} and ATTACKER_SUITE["multi-key"] == {
        "api_keys": 4
    }
    assert create_attack("jbda", variant="multi-key").params.active() == {"api_keys": 4}
    assert create_attack("jbda", variant="multi-key-hard-label").params.active() == {
        "api_keys": 4,
        "hard_labels": True,
    }
