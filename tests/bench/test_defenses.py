"""The benchmark's defense builder: resolvers turn declarative parameters into objects."""

import pytest
import torch

from mirage.bench.defenses import build_defense
from mirage.data import load_dataset
from mirage.models import create_model
from mirage.scenarios import get_scenario


def test_grad2_unlearn_draws_its_reference_set_from_the_defenders_training_data():
    scenario = get_scenario("digits")
    surrogate = create_model("lenet", (1, 8, 8), 10, (0.5,), (0.3,)).eval()
    defense = build_defense("grad2", {"target": "unlearn", "surrogate": surrogate,
                                      "reference": {"size": 40, "seed": 3}}, scenario, surrogate, None)
    train = load_dataset("digits").train
    expected = train.sample(40, 3)
    assert torch.equal(defense.params.reference_x, expected.images)
    assert torch.equal(defense.params.reference_y, expected.labels)
    x = train.images[:6]
    served = defense(x, torch.softmax(surrogate(x), 1).detach())
    assert torch.allclose(served.sum(1), torch.ones(6))


def test_grad2_reference_is_refused_where_it_means_nothing():
    scenario = get_scenario("digits")
    surrogate = create_model("lenet", (1, 8, 8), 10, (0.5,), (0.3,)).eval()
    with pytest.raises(ValueError, match="target='unlearn' only"):
        build_defense("grad2", {"surrogate": surrogate, "reference": {"size": 4}}, scenario, surrogate, None)
    with pytest.raises(ValueError, match="Extra inputs are not permitted"):
        build_defense("grad2", {"target": "unlearn", "surrogate": surrogate, "reference": {"n": 4}},
                      scenario, surrogate, None)
