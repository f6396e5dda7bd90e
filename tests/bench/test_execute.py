import pytest

from mirage.bench.execute import execute_run
from mirage.bench.runs import RunSpec
from mirage.models.fit import TrainConfig


@pytest.mark.slow
def test_one_real_run_on_tiny_digits(isolated_cache):
    spec = RunSpec(
        scenario="digits",
        defense="none",
        defense_label="none",
        defense_params={},
        attack="knockoff",
        attack_label="knockoff",
        attack_params={},
        budget=300,
        seed=0,
        clone_training=TrainConfig(epochs=2, batch_size=64),
        eval_size=200,
    )
    result = execute_run(spec)
    assert (
        result["victim_fingerprint"] == result["served_model_fingerprint"]
    )  # the plain victim served
    assert result["queries"] == 300 and result["transfer_size"] == 300
    assert 0 <= result["clone_accuracy"] <= 1 and result["victim_accuracy"] > 0.5
    assert result["effective_l1"] == 0.0 and result["defender_l1"] == 0.0
    assert result["defender_accuracy"] == pytest.approx(result["victim_accuracy"], abs=0.05)
    assert (
        max(result["angular_deviation"]) < 1.0
    )  # undefended: the served gradient is the clean one
    assert result["overhead_ratio"] > 0 and result["worker_peak_rss_mb"] > 50
    assert result["clone_diverged"] is False and result["clone_final_loss"] > 0


def test_clone_health_flags_diverged_and_collapsed_clones():
    import torch

    from mirage.bench.protocol import clone_health

    clone = torch.nn.Linear(2, 2)
    spread = torch.arange(10)
    assert clone_health(clone, [{"final_loss": 0.5}], spread) == {
        "clone_final_loss": 0.5,
        "clone_diverged": False,
        "clone_majority_fraction": 0.1,
        "clone_collapsed": False,
    }
    health = clone_health(clone, [{"final_loss": float("nan")}], spread)
    assert health["clone_final_loss"] is None and health["clone_diverged"] is True
    assert clone_health(clone, [], spread)["clone_diverged"] is False
    constant = torch.tensor([3] * 9 + [1])
    assert clone_health(clone, [{"final_loss": 2.3}], constant)["clone_collapsed"] is True
    with torch.no_grad():
        clone.weight[0, 0] = float("inf")
    assert clone_health(clone, [{"final_loss": 0.5}], spread)["clone_diverged"] is True


@pytest.mark.slow
def test_a_rerun_replays_its_answered_transfer_set_and_gets_the_same_clone(isolated_cache):
    spec = RunSpec(
        scenario="digits",
        defense="random_noise",
        defense_label="random_noise",
        defense_params={"epsilon": 0.5},
        attack="knockoff",
        attack_label="knockoff",
        attack_params={},
        budget=300,
        seed=0,
        clone_training=TrainConfig(epochs=1, batch_size=64),
        eval_size=200,
    )
    first = execute_run(spec)
    assert first["answers_replayed"] == 0 and list((isolated_cache / "answers").rglob("*.pt"))
    assert first["effective_l1_on"] == "queries" and first["effective_l1"] == pytest.approx(
        0.5, abs=0.01
    )
    second = execute_run(spec)
    assert second["answers_replayed"] == 300
    for key in ("clone_accuracy", "effective_l1", "angular_deviation", "defender_accuracy"):
        assert second[key] == pytest.approx(first[key]), key


@pytest.mark.slow
def test_a_run_goes_on_uncached_when_its_server_cannot_be_fingerprinted(
    isolated_cache, monkeypatch, caplog
):
    from mirage.bench import answers

    def refuse(api):
        raise TypeError("cannot fingerprint a Widget defense parameter")

    monkeypatch.setattr(answers, "server_fingerprint", refuse)
    spec = RunSpec(
        scenario="digits",
        defense="none",
        defense_label="none",
        defense_params={},
        attack="knockoff",
        attack_label="knockoff",
        attack_params={},
        budget=100,
        seed=0,
        clone_training=TrainConfig(epochs=1, batch_size=64),
        eval_size=100,
    )
    result = execute_run(spec)
    assert result["queries"] == 100 and result["answers_replayed"] == 0
    assert "answer cache off for this run" in caplog.text
    assert not (isolated_cache / "answers").exists()


@pytest.mark.slow
def test_a_training_time_defense_reports_its_l1_and_agreement_against_the_plain_victim(
    isolated_cache,
):
    from mirage.api import clean_posteriors
    from mirage.bench.execute import prepare_run, probe_images
    from mirage.data import load_dataset
    from mirage.scenarios import get_scenario, query_pool

    tiny = {"noise_multiplier": 1.0, "num_train": 640, "training": {"epochs": 1, "batch_size": 128}}
    spec = RunSpec(
        scenario="digits",
        defense="dpsgd",
        defense_label="dpsgd",
        defense_params=tiny,
        attack="knockoff",
        attack_label="knockoff",
        attack_params={},
        budget=100,
        seed=0,
        clone_training=TrainConfig(epochs=1, batch_size=64),
    )
    result = execute_run(spec)
    context = prepare_run(spec)
    assert context.training_time
    served, plain = context.served, context.plain
    probe = probe_images(query_pool(get_scenario("digits")).images, 0)
    expected = (
        (clean_posteriors(served, probe) - clean_posteriors(plain, probe)).abs().sum(1).mean()
    )
    assert (
        result["effective_l1"] == pytest.approx(float(expected)) and result["effective_l1"] > 0.05
    )
    assert result["effective_l1_on"] == "256 pool images"
    test = load_dataset("digits").test.images
    agreement = (
        (clean_posteriors(served, test).argmax(1) == clean_posteriors(plain, test).argmax(1))
        .float()
        .mean()
    )
    assert result["defender_top1_agreement"] == pytest.approx(float(agreement)) and agreement < 1
    assert result["defender_l1"] > 0.05 and max(result["angular_deviation"]) > 1.0


def _digits_run(defense, params, attack_params, label="knockoff", attack="knockoff"):
    return RunSpec(
        scenario="digits",
        defense=defense,
        defense_label=defense,
        defense_params=params,
        attack=attack,
        attack_label=label,
        attack_params=attack_params,
        budget=300,
        seed=0,
        clone_training=TrainConfig(epochs=1, batch_size=64),
        eval_size=200,
    )


@pytest.mark.slow
def test_hard_labels_of_a_top1_kept_defense_train_the_undefended_clone_and_say_so(isolated_cache):
    hard = {"hard_labels": True}
    undefended = execute_run(_digits_run("none", {}, hard))
    kept = execute_run(
        _digits_run(
            "grad2",
            {"epsilon": 1.0, "target": "max-norm", "preserve_top1": True, "surrogate": "random"},
            hard,
        )
    )
    flipped = execute_run(_digits_run("random_noise", {"epsilon": 1.5}, hard))
    assert undefended["clone_from_cache"] is False
    assert (
        kept["transfer_digest"] == undefended["transfer_digest"]
        and kept["clone_from_cache"] is True
    )
    assert kept["clone_accuracy"] == undefended["clone_accuracy"]
    assert kept["effective_l1"] > 0  # its soft answers differ; their argmax does not
    assert flipped["transfer_digest"] != undefended["transfer_digest"]
    assert flipped["clone_from_cache"] is False


@pytest.mark.slow
def test_the_restorer_is_told_the_defense_and_its_public_parameters_only(isolated_cache):
    from mirage.bench.execute import prepare_run

    def told(spec):
        return prepare_run(spec).told(spec.attack_params)["restorer"]

    spec = _digits_run(
        "grad2",
        {
            "epsilon": 0.5,
            "target": "all-ones",
            "surrogate": "distilled",
            "surrogate_config": {"stop_epoch": 2},
        },
        {"restorer": {"pairs": 100}},
    )
    assert told(spec) == {
        "pairs": 100,
        "defense": "grad2",
        "defense_params": {"epsilon": 0.5, "target": "all-ones"},
    }
    watermark = _digits_run(
        "grad2",
        {"target": "watermark", "watermark": {"source_class": 3, "target_class": 5}},
        {"restorer": {}},
    )
    assert told(watermark)["defense_params"] == {"target": "watermark"}
    tiny_dpsgd = {
        "noise_multiplier": 1.0,
        "num_train": 640,
        "training": {"epochs": 1, "batch_size": 128},
    }
    training_time = _digits_run("dpsgd", tiny_dpsgd, {"restorer": {}})
    assert told(training_time)["defense"] == "none"
    result = execute_run(
        _digits_run(
            "random_noise",
            {"epsilon": 1.0},
            {"restorer": {"pairs": 100, "epochs": 5, "shadow_epochs": 2}},
            label="knockoff/restorer",
        )
    )
    assert result["restorer"]["pairs"] == 200 and result["queries"] == 300


def test_the_probe_l1_is_measured_for_training_time_defenses_only_whatever_the_objects(tmp_path):
    """Plain and served victims are told apart by what they are, not by object identity: a
    query-time run whose served victim is another object with the plain weights (a reload, as in
    another worker) still gets its L1 from the ledger, never 0 from the probe."""
    import copy

    import torch

    from mirage.attacks import CloneSpec
    from mirage.bench.execute import probe_metrics
    from mirage.bench.protocol import RunContext, Stores
    from mirage.data import ImageData
    from mirage.defenses import create_defense
    from mirage.models import create_model

    torch.manual_seed(0)
    plain = create_model("lenet", (1, 8, 8), 10, (0.5,), (0.3,)).eval()
    reloaded = copy.deepcopy(plain)
    torch.manual_seed(1)
    other = create_model("lenet", (1, 8, 8), 10, (0.5,), (0.3,)).eval()
    probe, fresh = torch.rand(80, 1, 8, 8), create_model("lenet", (1, 8, 8), 10, (0.5,), (0.3,))
    data = ImageData(probe, torch.zeros(len(probe), dtype=torch.int64))

    def context(served, training_time):
        return RunContext(
            scenario="digits",
            test=data,
            pool=data,
            clone=CloneSpec(),
            stores=Stores(tmp_path),
            served=served,
            plain=plain,
            defense=create_defense("none"),
            training_time=training_time,
        )

    query_time = probe_metrics(context(reloaded, False), fresh, probe)
    assert "effective_l1" not in query_time and max(query_time["angular_deviation"]) < 1.0
    training_time = probe_metrics(context(other, True), fresh, probe)
    assert training_time["effective_l1"] > 0 and len(training_time["angular_deviation"]) == 64


@pytest.mark.parametrize("switch", [{"api_keys": 2}, {"mix_benign": 0.3}])
def test_the_stream_attackers_run_in_the_benchmark_with_their_keys_and_decoys(
    isolated_cache, switch, digits_lenet
):
    """``run_attack`` builds the multi-key attacker's second key as a view (and skips the answer
    cache, which records one API's stream); the mixing attacker goes through the cache like any
    other."""

    from mirage.attacks import CloneSpec
    from mirage.bench.protocol import RunContext, Stores, run_attack
    from mirage.data import load_dataset
    from mirage.defenses import create_defense
    from mirage.scenarios import get_scenario, query_pool

    model, card = digits_lenet(seed=0)
    training = TrainConfig(epochs=1, batch_size=64)
    context = RunContext(
        scenario="digits",
        test=load_dataset("digits").test,
        pool=query_pool(get_scenario("digits")),
        clone=CloneSpec.like(card, training=training),
        stores=Stores(isolated_cache, answers=isolated_cache / "answers"),
        served=model,
        plain=model,
        defense=create_defense("none"),
    )
    stolen = run_attack(context, "knockoff", {**switch, "query_batch_size": 50}, 200, 0)
    result = stolen.result
    assert result.queries == 200 and stolen.replayed == 0
    cached = list((isolated_cache / "answers").rglob("*.pt"))
    if "api_keys" in switch:
        assert result.queries_per_key == [100, 100] and not cached
    else:
        assert result.decoys == 60 and result.transfer_size == 200 and cached
