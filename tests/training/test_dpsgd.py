"""DP-SGD victims (docs/design.md §dpsgd): ε recorded from the accountant, monotone in the noise,
the checkpoint is a plain mirage model, and the registry caches it."""

import math

import pytest
import torch
from safetensors.torch import load_file

from mirage.data import load_dataset
from mirage.models import ImageClassifier, load_checkpoint
from mirage.scenarios import get_scenario
from mirage.training.dpsgd import DPSGD_TRAINING, DpsgdConfig
from mirage.training.registry import (
    defended_victim_dir,
    get_defended_victim,
    list_training_defenses,
)

TINY = DPSGD_TRAINING.model_copy(update={"epochs": 1, "batch_size": 128})


@pytest.mark.slow
def test_epsilon_is_finite_decreases_with_noise_and_checkpoint_is_plain(isolated_cache):
    scenario = get_scenario("digits")
    cards = {}
    for sigma in (0.5, 1.0, 2.0):
        config = DpsgdConfig(noise_multiplier=sigma, num_train=640, training=TINY)
        model, card, cached = get_defended_victim(scenario, "dpsgd", config, show_progress=False)
        assert not cached and type(model).__name__ == "LeNet" and isinstance(model, ImageClassifier)
        assert (
            card.training["defense"] == "dpsgd"
            and card.training["config"]["noise_multiplier"] == sigma
        )
        assert math.isfinite(card.training["epsilon"]) and card.training["epsilon"] > 0
        assert card.training["steps"] == 5  # 640 / 128 Poisson batches, one epoch
        directory = defended_victim_dir(scenario, "dpsgd", config)
        keys = set(load_file(str(directory / "model.safetensors")))
        assert keys == set(model.state_dict()) and not any("_module" in k for k in keys)
        loaded, _ = load_checkpoint(directory)
        assert not any(hasattr(p, "grad_sample") for p in loaded.parameters())
        test = load_dataset("digits").test.images
        torch.testing.assert_close(loaded(test), model(test))
        cards[sigma] = card
    eps = [cards[s].training["epsilon"] for s in (0.5, 1.0, 2.0)]
    assert eps[0] > eps[1] > eps[2]
    _, again, cached = get_defended_victim(
        scenario,
        "dpsgd",
        {"noise_multiplier": 2.0, "num_train": 640, "training": TINY.model_dump()},
        show_progress=False,
    )
    assert cached and again.training["epsilon"] == cards[2.0].training["epsilon"]


@pytest.mark.slow
def test_epsilon_matches_an_independent_rdp_accountant():
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    from mirage.models import create_model
    from mirage.training.dpsgd import train_dpsgd

    data = load_dataset("digits").train
    model = create_model("lenet", (1, 8, 8), 10, (0.3,), (0.38,))
    config = DpsgdConfig(noise_multiplier=1.3, training=TINY, delta=1e-4)
    stats = train_dpsgd(model, data.images[:512], data.labels[:512], config, show_progress=False)
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    rdp = compute_rdp(q=128 / 512, noise_multiplier=1.3, steps=stats["steps"], orders=orders)
    expected, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=1e-4)
    assert stats["epsilon"] == pytest.approx(expected, rel=1e-6)


def test_config_validation():
    with pytest.raises(ValueError):
        DpsgdConfig(noise_multiplier=0)
    with pytest.raises(ValueError):
        DpsgdConfig(delta=1.5)
    assert {"none", "ini", "dpsgd"} <= set(list_training_defenses())
