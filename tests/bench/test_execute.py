import pytest

from mirage.bench.execute import execute_run
from mirage.bench.runs import RunSpec
from mirage.training.fit import TrainConfig


@pytest.mark.slow
def test_one_real_run_on_tiny_digits(isolated_cache):
    spec = RunSpec(scenario="digits", defense="none", defense_label="none", defense_params={},
                   attack="knockoff", attack_label="knockoff", attack_params={}, budget=300, seed=0,
                   clone_training=TrainConfig(epochs=2, batch_size=64), eval_size=200)
    result = execute_run(spec)
    assert result["queries"] == 300 and result["transfer_size"] == 300
    assert 0 <= result["clone_accuracy"] <= 1 and result["victim_accuracy"] > 0.5
    assert result["effective_l1"] == 0.0 and result["defender_l1"] == 0.0
    assert result["defender_accuracy"] == pytest.approx(result["victim_accuracy"], abs=0.05)
    assert max(result["angular_deviation"]) < 1.0  # undefended: the served gradient is the clean one
    assert result["overhead_ratio"] > 0
    assert result["clone_diverged"] is False and result["clone_final_loss"] > 0


def test_clone_health_flags_a_diverged_clone():
    import torch

    from mirage.bench.execute import clone_health

    clone = torch.nn.Linear(2, 2)
    assert clone_health(clone, [{"final_loss": 0.5}]) == {"clone_final_loss": 0.5, "clone_diverged": False}
    assert clone_health(clone, [{"final_loss": float("nan")}]) == {"clone_final_loss": None, "clone_diverged": True}
    assert clone_health(clone, []) == {"clone_final_loss": None, "clone_diverged": False}
    with torch.no_grad():
        clone.weight[0, 0] = float("inf")
    assert clone_health(clone, [{"final_loss": 0.5}])["clone_diverged"] is True


def test_training_time_defenses_replace_the_victim_and_serve_undefended():
    from mirage.bench.execute import split_defense

    assert split_defense("dpsgd", {"noise_multiplier": 1.0}) == (("dpsgd", '{"noise_multiplier": 1.0}'), ("none", {}))
    assert split_defense("grad2", {"epsilon": 0.5}) == (("none", "{}"), ("grad2", {"epsilon": 0.5}))
    assert split_defense("none", {}) == (("none", "{}"), ("none", {}))


def test_victim_epochs_override_is_its_own_scenario_and_run():
    import hashlib
    import json

    from mirage.bench.execute import _scenario

    assert _scenario(("digits", None)).victim_training.epochs == 15
    assert _scenario(("digits", 3)).victim_training.epochs == 3
    spec = RunSpec(scenario="digits", defense="none", defense_label="none", defense_params={},
                   attack="knockoff", attack_label="knockoff", attack_params={}, budget=300, seed=0,
                   clone_training=TrainConfig(epochs=2))
    # ids of runs recorded before the field existed are unchanged
    legacy = spec.model_dump(mode="json", exclude={"defense_label", "attack_label", "victim_epochs"})
    assert spec.run_id == hashlib.sha256(json.dumps(legacy, sort_keys=True).encode()).hexdigest()[:16]
    assert spec.model_copy(update={"victim_epochs": 3}).run_id != spec.run_id
