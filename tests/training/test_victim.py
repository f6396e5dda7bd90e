import pytest
import torch

from mirage.models.fit import TrainConfig, fit, random_shift, soft_cross_entropy
from mirage.scenarios import get_scenario
from mirage.training.victim import get_victim, victim_dir

TINY = TrainConfig(epochs=3, batch_size=64, lr=0.05, seed=3)


def test_soft_cross_entropy_matches_hard_labels_for_one_hot():
    logits = torch.randn(6, 4)
    labels = torch.randint(0, 4, (6,))
    one_hot = torch.nn.functional.one_hot(labels, 4).float()
    assert torch.allclose(soft_cross_entropy(logits, labels), soft_cross_entropy(logits, one_hot))


def test_random_shift_is_a_translation_with_zero_fill():
    x = torch.rand(5, 2, 6, 6)
    shifted = random_shift(x, torch.Generator().manual_seed(1), pad=2)
    assert shifted.shape == x.shape
    for i in range(5):  # every output is some translate of its input
        found = False
        padded = torch.nn.functional.pad(x[i], (2, 2, 2, 2))
        for dy in range(5):
            for dx in range(5):
                found |= torch.equal(padded[:, dy : dy + 6, dx : dx + 6], shifted[i])
        assert found


@pytest.mark.slow
def test_victim_training_is_deterministic_and_cached(isolated_cache):
    scenario = get_scenario("digits", victim_training=TINY)
    model, card, cached = get_victim(scenario, show_progress=False)
    assert not cached and card.test_accuracy > 0.8  # 3 epochs on 8x8 digits
    _, card2, cached2 = get_victim(scenario, show_progress=False)
    assert cached2 and card2.test_accuracy == card.test_accuracy
    retrained, _, cached3 = get_victim(scenario, retrain=True, show_progress=False)
    assert not cached3
    for a, b in zip(model.parameters(), retrained.parameters()):
        assert torch.equal(a, b)
    other = get_scenario("digits", victim_training=TINY.model_copy(update={"seed": 4}))
    assert victim_dir(other) != victim_dir(scenario)


def test_fit_rejects_mismatched_data():
    model = torch.nn.Linear(4, 2)
    try:
        fit(model, torch.rand(3, 4), torch.zeros(2, dtype=torch.long), TINY, show_progress=False)
    except ValueError as err:
        assert "targets" in str(err)
    else:
        raise AssertionError("expected ValueError")
