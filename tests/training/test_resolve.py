"""One spec of a defense and one resolver (docs/design.md §defense-spec): declarative parts become
objects the same way for sweeps, the service, the command line and the Python API."""

import pytest
import torch
from pydantic import ValidationError

from mirage.bench.config import load_config
from mirage.data import load_dataset
from mirage.models import ModelCard, create_model, save_checkpoint
from mirage.models.fit import TrainConfig
from mirage.scenarios import ReferenceSet, WatermarkSet, behaviour_set, get_scenario
from mirage.training.misinformation_models import MisinformationConfig
from mirage.training.resolve import DefenseSpec, Parts, resolve_defense, resolve_params


def lenet(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("lenet", (1, 8, 8), 10, (0.5,), (0.3,)).eval()


def checkpoint(tmp_path, name: str, seed: int):
    card = ModelCard(
        architecture="lenet",
        input_shape=(1, 8, 8),
        num_classes=10,
        mean=(0.5,),
        std=(0.3,),
        dataset="digits",
        seed=seed,
    )
    return save_checkpoint(lenet(seed), card, tmp_path / name)


def test_every_defense_point_of_the_built_in_profiles_is_a_valid_spec():
    for profile in ("quick", "full", "worst_case"):
        config = load_config(profile)
        for defense in config.defenses:
            for scenario in config.scenarios:
                for params in defense.points(scenario):
                    spec = DefenseSpec.from_params(defense.name, params)
                    assert spec.params.keys() <= params.keys()
                    assert spec.parts() is not None


def test_parts_written_among_params_are_the_parts_written_beside_them():
    flat = DefenseSpec.from_params(
        "grad2",
        {
            "target": "unlearn",
            "epsilon": 1.0,
            "surrogate": "distilled",
            "surrogate_config": {"num_queries": 100},
            "reference": {"size": 40, "seed": 3},
        },
    )
    beside = DefenseSpec(
        name="grad2",
        params={"target": "unlearn", "epsilon": 1.0},
        surrogate="distilled",
        surrogate_config={"num_queries": 100},
        reference=ReferenceSet(size=40, seed=3),
    )
    assert flat == beside
    assert flat.parts() == Parts("distilled", ReferenceSet(size=40, seed=3), None, None)
    with pytest.raises(ValidationError, match="both among params and beside"):
        DefenseSpec(name="grad2", params={"surrogate": "random"}, surrogate="distilled")


def test_defaults_are_what_the_sweeps_always_got():
    assert DefenseSpec(name="grad2").parts().surrogate == "distilled"  # GRAD² cannot go without one
    assert DefenseSpec(name="mad").parts().surrogate is None  # MAD: its own random initialisation
    unlearn = DefenseSpec(name="grad2", params={"target": "unlearn"}).parts()
    assert unlearn.reference == ReferenceSet() and unlearn.watermark is None
    assert (
        DefenseSpec(name="grad2", params={"target": "watermark"}).parts().watermark
        == WatermarkSet()
    )
    assert (
        DefenseSpec(name="adaptive_misinformation").parts().misinformation == MisinformationConfig()
    )
    live = lenet()
    assert DefenseSpec(name="grad2", params={"surrogate": live}).parts().surrogate is None
    assert DefenseSpec(name="grad2", params={"surrogate": live}).params["surrogate"] is live


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("grad2", {"reference": {"size": 4}}, "target='unlearn' only"),
        ("grad2", {"target": "unlearn", "reference": {"n": 4}}, "Extra inputs are not permitted"),
        ("grad2", {"watermark": {"size": 4}}, "target='watermark' only"),
        (
            "grad2",
            {"target": "watermark", "watermark": {"source_class": 3, "target_class": 3}},
            "another class",
        ),
        ("mad", {"surrogate_config": {"stop_epoch": 2}}, "name its kind"),
        ("grad2", {"surrogate_config": {"nope": 1}}, "Extra inputs"),
        ("top_k", {"surrogate": "distilled"}, "top_k takes no"),
        ("top_k", {"kk": 2}, "no parameters"),
        ("nope", {}, "unknown defense 'nope'"),
        ("dpsgd", {"noise": 1.0}, "Extra inputs"),
        (
            "adaptive_misinformation",
            {"oe_model": "ckpt/oe"},
            "both oe_model and misinformation_model",
        ),
    ],
)
def test_a_spec_says_what_is_wrong_before_anything_is_trained(name, params, message):
    with pytest.raises(ValueError, match=message):
        DefenseSpec.from_params(name, params)


def test_grad2_unlearn_draws_its_reference_set_from_the_defenders_training_data():
    scenario = get_scenario("digits")
    surrogate = lenet()
    spec = DefenseSpec.from_params(
        "grad2", {"target": "unlearn", "surrogate": surrogate, "reference": {"size": 40, "seed": 3}}
    )
    defense = resolve_defense(spec, scenario)
    expected = load_dataset("digits").train.sample(40, 3)
    assert torch.equal(defense.params.reference_x, expected.images)
    assert torch.equal(defense.params.reference_y, expected.labels)
    x = load_dataset("digits").train.images[:6]
    served = defense(x, torch.softmax(surrogate(x), 1).detach())
    assert torch.allclose(served.sum(1), torch.ones(6))


def test_the_watermark_target_serves_the_behaviour_mirage_verify_tests_for():
    watermark = {"source_class": 2, "target_class": 7, "size": 15}
    spec = DefenseSpec.from_params(
        "grad2", {"target": "watermark", "surrogate": lenet(), "watermark": watermark}
    )
    defense = resolve_defense(spec, get_scenario("digits"))
    expected = behaviour_set(
        load_dataset("digits"), WatermarkSet(**watermark)
    )  # what `mirage verify` builds
    assert torch.equal(defense.params.watermark_x, expected.images) and len(expected.images) == 15
    assert defense.params.watermark_y.tolist() == [7] * 15
    train = load_dataset("digits").train
    assert torch.equal(expected.images, train.images[train.labels == 2][:15])
    with pytest.raises(ValueError, match="not one of the 10 classes"):
        behaviour_set(load_dataset("digits"), WatermarkSet(source_class=1, target_class=12))


def test_parts_from_checkpoints_need_no_scenario_and_the_others_say_they_do(tmp_path):
    one, two = checkpoint(tmp_path, "one", 1), checkpoint(tmp_path, "two", 2)
    single = resolve_defense(DefenseSpec(name="grad2", surrogate=one), None)
    assert torch.equal(single.surrogates[0].classifier.weight, lenet(1).classifier.weight)
    ensemble = resolve_defense(DefenseSpec(name="grad2", surrogate=[one, two]), None)
    assert len(ensemble.surrogates) == 2 and ensemble.contract.stateful
    am = resolve_defense(
        DefenseSpec(name="adaptive_misinformation", oe_model=one, misinformation_model=two), None
    )
    assert torch.equal(am.misinformation_model.classifier.weight, lenet(2).classifier.weight)
    for spec, part in [
        (DefenseSpec(name="grad2"), "surrogate"),
        (DefenseSpec(name="grad2", params={"target": "unlearn"}, surrogate=one), "reference"),
        (DefenseSpec(name="grad2", params={"target": "watermark"}, surrogate=one), "watermark"),
        (DefenseSpec(name="adaptive_misinformation"), "models_config"),
    ]:
        with pytest.raises(ValueError, match=f"{part} needs a scenario"):
            resolve_params(spec, None)


def test_adaptive_misinformation_trains_its_two_models_for_the_scenario_once(isolated_cache):
    quick = {"training": TrainConfig(epochs=1, batch_size=128, lr=0.05, seed=0).model_dump()}
    spec = DefenseSpec.from_params("adaptive_misinformation", {"tau": 0.6, "models_config": quick})
    first = resolve_defense(spec, get_scenario("digits"))
    again = resolve_defense(spec, get_scenario("digits"))
    assert list((isolated_cache / "adaptive_misinformation").iterdir())
    assert torch.equal(first.oe_model.classifier.weight, again.oe_model.classifier.weight)
    x = load_dataset("digits").test.images[:5]
    assert first(x, torch.softmax(torch.randn(5, 10), 1)).shape == (5, 10)


def test_a_training_time_spec_names_a_victim_and_no_query_time_defense():
    spec = DefenseSpec.from_params("dpsgd", {"noise_multiplier": 2.0})
    assert spec.training_time and spec.parts() == Parts(None, None, None, None)
    assert resolve_defense(spec, None).name == "none"
    with pytest.raises(ValueError, match="resolve_victims"):
        resolve_params(spec, None)
    with pytest.raises(ValueError, match="takes no parts"):
        DefenseSpec(name="ini", surrogate="distilled")


def test_the_gate_is_calibrated_on_the_defenders_data_at_its_false_positive_rate():
    from mirage.defenses.grad2 import gate_scores

    scenario = get_scenario("digits")
    victim, surrogate = lenet(1), lenet(2)
    spec = DefenseSpec.from_params(
        "grad2_gated",
        {
            "surrogate": surrogate,
            "target": "max-norm",
            "epsilon_high": 1.5,
            "gate": {
                "score": "neg-energy",
                "benign_fpr": 0.1,
                "calibration": {"size": 400, "seed": 2},
            },
        },
    )
    assert spec.parts().gate.benign_fpr == 0.1
    defense = resolve_defense(spec, scenario, victim)
    assert defense.params.gate_score == "neg-energy" and defense.params.gate_model is victim
    calibration = load_dataset("digits").train.sample(400, 2).images
    with torch.no_grad():
        probs = torch.softmax(victim(calibration), 1)
    below = gate_scores("neg-energy", calibration, probs, victim) < defense.params.tau
    assert abs(float(below.float().mean()) - 0.1) <= 1 / 400
    assert torch.equal(defense.attacker_like(calibration, probs), below)
    with pytest.raises(ValueError, match="victim"):
        resolve_defense(spec, scenario)
    given = DefenseSpec.from_params(
        "grad2_gated", {"surrogate": surrogate, "target": "max-norm", "tau": 3.0}
    )
    assert given.parts().gate is None and resolve_defense(given, scenario).params.tau == 3.0
