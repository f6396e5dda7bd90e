"""Every by-name lookup raises the same error, UnknownNameError, naming the known names."""

import pickle

import pytest

from mirage.attacks import create_attack
from mirage.attacks.base import ATTACKS
from mirage.attacks.clone import RECIPES, recipe
from mirage.data import DATASETS, load_dataset
from mirage.defenses import DEFENSES, create_defense
from mirage.models import MODELS, create_model
from mirage.registry import UnknownNameError
from mirage.scenarios import SCENARIOS, get_scenario
from mirage.training.registry import TRAINING_DEFENSES, resolve_config

LOOKUPS = {
    "defense": (lambda: create_defense("nope"), DEFENSES),
    "attack": (lambda: create_attack("nope"), ATTACKS),
    "dataset": (lambda: load_dataset("nope"), DATASETS),
    "architecture": (lambda: create_model("nope", (1, 8, 8), 10, [0.5], [0.5]), MODELS),
    "scenario": (lambda: get_scenario("nope"), SCENARIOS),
    "clone recipe": (lambda: recipe("nope"), RECIPES),
    "training-time defense": (lambda: resolve_config("nope"), TRAINING_DEFENSES),
}


@pytest.mark.parametrize("kind", sorted(LOOKUPS))
def test_unknown_names_raise_one_error_listing_the_known_ones(kind):
    lookup, known = LOOKUPS[kind]
    with pytest.raises(UnknownNameError) as caught:
        lookup()
    error = caught.value
    assert isinstance(error, KeyError) and isinstance(error, ValueError)
    assert (error.kind, error.name, error.known) == (kind, "nope", sorted(known))
    assert str(error) == f"unknown {kind} 'nope'; known: {sorted(known)}"


def test_the_error_survives_pickling():  # process-pool and Dask workers send it back
    error = pickle.loads(pickle.dumps(UnknownNameError("scenario", "x", ["b", "a"])))
    assert type(error) is UnknownNameError and str(error) == "unknown scenario 'x'; known: ['a', 'b']"
