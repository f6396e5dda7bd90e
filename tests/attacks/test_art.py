"""ART's own extraction attacks steal a mirage-defended model through the adapter, with mirage's
query accounting and budget in force."""

import numpy as np
import pytest
import torch
from art.attacks.extraction import CopycatCNN, KnockoffNets

from mirage.api import InProcessAPI, QueryBudgetExceeded
from mirage.attacks.art import art_thief, as_art_classifier
from mirage.models import create_model


def agreement(thief, victim, images):
    with torch.no_grad():
        victim_labels = victim(images).argmax(1).numpy()
    return float((thief.predict(images.numpy()).argmax(1) == victim_labels).mean())


def fresh_thief(digits):
    torch.manual_seed(1)
    return art_thief(
        create_model("lenet", digits.input_shape, 10, digits.mean, digits.std), lr=0.05
    )


@pytest.mark.parametrize("attack_class", [KnockoffNets, CopycatCNN])
def test_art_attack_steals_through_the_adapter(attack_class, victim, digits, served):
    api = InProcessAPI(victim, served("one-hot"), query_budget=400)
    np.random.seed(0)
    art_attack = attack_class(
        as_art_classifier(api),
        batch_size_fit=32,
        batch_size_query=64,
        nb_epochs=15,
        nb_stolen=400,
        use_probability=True,
    )
    thief = art_attack.extract(digits.train.images.numpy(), thieved_classifier=fresh_thief(digits))
    assert api.queries_used == 400
    assert agreement(thief, victim, digits.test.images) > 0.5  # chance is 0.1


def test_adapter_answers_are_the_api_answers_and_respect_its_budget(victim, digits):
    api = InProcessAPI(victim, query_budget=10)
    classifier = as_art_classifier(api)
    x = digits.test.images[:6]
    with torch.no_grad():
        expected = torch.softmax(victim(x), 1).numpy()
    np.testing.assert_allclose(classifier.predict(x.numpy()), expected, atol=1e-6)
    assert api.queries_used == 6
    with pytest.raises(QueryBudgetExceeded):
        classifier.predict(digits.test.images[:5].numpy())
