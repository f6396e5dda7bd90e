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
    assert (
        type(error) is UnknownNameError and str(error) == "unknown scenario 'x'; known: ['a', 'b']"
    )


def test_training_time_defenses_are_registered_like_query_time_ones():
    from mirage.defenses.base import _REGISTRY as QUERY_TIME
    from mirage.training.registry import _REGISTRY as TRAINING_TIME
    from mirage.training.registry import is_training_time

    assert type(QUERY_TIME) is type(TRAINING_TIME)
    assert {"none", "ini", "dpsgd"} <= set(TRAINING_DEFENSES)
    entry = TRAINING_DEFENSES["dpsgd"]
    assert entry.summary.startswith("DP-SGD") and entry.params.model_fields["noise_multiplier"]
    assert resolve_config("dpsgd", {"noise_multiplier": 2.0}) == entry.params(noise_multiplier=2.0)
    assert (
        is_training_time("ini") and not is_training_time("none") and not is_training_time("grad2")
    )


def test_a_defense_repr_is_one_short_line():
    """Tensors by shape, modules by class: a reference set must not print its pixels."""
    import torch

    from mirage.defenses import create_defense
    from mirage.models import create_model

    surrogate = create_model("lenet", (1, 8, 8), 10, (0.5,), (0.5,))
    defense = create_defense(
        "grad2",
        epsilon=0.5,
        target="unlearn",
        surrogate=surrogate,
        reference_x=torch.rand(50, 1, 8, 8),
        reference_y=torch.randint(0, 10, (50,)),
    )
    text = repr(defense)
    assert "\n" not in text and len(text) < 400, text
    assert (
        "reference_x=<tensor (50, 1, 8, 8)>" in text
        and "surrogate=<LeNet>" in text
        and "epsilon=0.5" in text
    )
