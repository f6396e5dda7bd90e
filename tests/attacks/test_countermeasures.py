"""Each countermeasure switch does what it says."""

import pytest
import torch

import mirage.attacks.base as attack_base
from mirage.api import InProcessAPI
from mirage.attacks import CloneSpec, Countermeasures, QueryClient, create_attack
from mirage.attacks.countermeasures import apply_countermeasures
from mirage.defenses import Defense
from mirage.models import CompactVGG, LeNet


class CountingNoise(Defense):
    """Test double: the i-th answered row is y + (−1)^i · 0.05 on classes 0/1 (zero mean in
    pairs)."""

    name = "counting-noise-test"

    def __init__(self):
        super().__init__()
        self.calls = 0

    def perturb(self, x, probs):
        sign = torch.tensor([(-1.0) ** (self.calls + i) for i in range(len(probs))])[:, None]
        self.calls += len(probs)
        shift = torch.zeros_like(probs)
        shift[:, 0], shift[:, 1] = 1.0, -1.0
        mixed = 0.5 * probs + 0.25  # keeps every entry ≥ 0.25 (valid for K=10 after renorm below)
        mixed = mixed / mixed.sum(1, keepdim=True)
        return mixed + 0.01 * sign * shift


@pytest.fixture
def captured(monkeypatch):
    """Capture what knockoff hands to clone training."""
    seen = {}
    original = attack_base.train_clone

    def spy(spec, images, answers, num_classes, **kwargs):
        seen.update(spec=spec, images=images, answers=answers)
        return original(spec, images, answers, num_classes, **kwargs)

    monkeypatch.setattr(attack_base, "train_clone", spy)
    return seen


def test_plain_attacker_has_no_active_switches():
    assert Countermeasures().active() == {}
    assert Countermeasures(hard_labels=True, repeats=3).active() == {
        "hard_labels": True,
        "repeats": 3,
    }


def test_hard_labels_train_on_one_hot_argmax(victim, digits, clone_spec, captured):
    create_attack("knockoff", hard_labels=True).run(
        InProcessAPI(victim), 40, digits.train, clone_spec
    )
    answers = captured["answers"]
    with torch.no_grad():
        expected = torch.softmax(victim(captured["images"]), 1).argmax(1)
    assert torch.equal(answers, torch.nn.functional.one_hot(expected, 10).float())


def test_soft_attacker_trains_on_the_full_answers(victim, digits, clone_spec, captured):
    create_attack("knockoff").run(InProcessAPI(victim), 40, digits.train, clone_spec)
    with torch.no_grad():
        expected = torch.softmax(victim(captured["images"]), 1)
    assert torch.allclose(captured["answers"], expected, atol=1e-6)


def test_flatten_trains_on_the_top1_and_its_probability_only(victim, digits, clone_spec, captured):
    """flatten: each row keeps its argmax and that probability, the rest spread evenly over the
    other classes (against a per-row loop); it refuses hard labels, which have no probability."""
    create_attack("knockoff", variant="flattened").run(
        InProcessAPI(victim), 40, digits.train, clone_spec
    )
    with torch.no_grad():
        clean = torch.softmax(victim(captured["images"]), 1)
    for row, answer in zip(clean, captured["answers"], strict=True):
        top = int(row.argmax())
        expected = torch.full((10,), float(1 - row[top]) / 9)
        expected[top] = row[top]
        assert torch.allclose(answer, expected, atol=1e-6)
    with pytest.raises(ValueError, match="not with hard_labels"):
        Countermeasures(flatten=True, hard_labels=True)


def test_another_architecture(victim, digits, clone_spec):
    result = create_attack("knockoff", architecture="vgg").run(
        InProcessAPI(victim), 20, digits.train, clone_spec
    )
    assert isinstance(result.clone, CompactVGG)
    plain = create_attack("knockoff").run(InProcessAPI(victim), 20, digits.train, clone_spec)
    assert isinstance(plain.clone, LeNet)


def test_adam_and_augmentation_change_the_training_recipe(victim, digits, clone_spec, captured):
    spec, _ = apply_countermeasures(
        Countermeasures(optimizer="adam", augment=True), clone_spec, 100
    )
    assert spec.training.optimizer == "adam" and spec.training.lr == 1e-3 and spec.training.augment
    assert clone_spec.training.optimizer == "sgd" and not clone_spec.training.augment
    create_attack("knockoff", optimizer="adam", augment=True).run(
        InProcessAPI(victim), 20, digits.train, clone_spec
    )
    assert captured["spec"].training.optimizer == "adam" and captured["spec"].training.augment


def test_restarts_reach_the_clone_spec_and_cost_no_queries():
    spec, total = apply_countermeasures(Countermeasures(restarts=3), CloneSpec(), 100)
    assert spec.restarts == 3 and total == 100 and spec.training == CloneSpec().training
    assert apply_countermeasures(Countermeasures(), CloneSpec(), 100)[0].restarts == 1
    with pytest.raises(ValueError):
        Countermeasures(restarts=0)


def test_repeats_average_n_answers_and_cost_n_queries(victim, digits):
    noisy = CountingNoise()
    client = QueryClient(InProcessAPI(victim, noisy), budget=9, repeats=2)
    x = digits.test.images[:4]
    averaged = client.query(x)
    assert client.spent == 8 and client.remaining == 0  # 9 // 2 images allowed, then 1 query left
    reference = CountingNoise()
    with torch.no_grad():
        clean = torch.softmax(victim(x.repeat_interleave(2, 0)), 1)
    expected = reference(None, clean).view(4, 2, 10).mean(1)
    assert torch.allclose(averaged, expected, atol=1e-6)
    # the ±0.01 noise cancels in pairs: the average is the defense's noiseless answer
    with torch.no_grad():
        base = 0.5 * torch.softmax(victim(x), 1) + 0.25
    assert torch.allclose(averaged, base / base.sum(1, keepdim=True), atol=1e-5)


def test_repeats_through_an_attack_never_overspend(victim, digits, clone_spec):
    api = InProcessAPI(victim, query_budget=37)
    result = create_attack("knockoff", repeats=3).run(api, 37, digits.train, clone_spec)
    assert result.queries == api.queries_used == 36 and result.transfer_size == 12


def test_budget_factor_spends_more(victim, digits, clone_spec):
    api = InProcessAPI(victim)
    result = create_attack("knockoff", budget_factor=2.5).run(api, 20, digits.train, clone_spec)
    assert result.queries == result.budget == api.queries_used == 50
    assert result.as_dict()["countermeasures"] == {"budget_factor": 2.5}


def test_invalid_switches_are_errors():
    with pytest.raises(ValueError):
        Countermeasures(repeats=0)
    with pytest.raises(ValueError):
        Countermeasures(optimizer="rmsprop")
    with pytest.raises(ValueError):
        apply_countermeasures(Countermeasures(budget_factor=0.01), CloneSpec(), 10)
