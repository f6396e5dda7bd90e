"""Any defense a sweep runs, the service serves from the same lines (docs/design.md §defense-spec):
the two-model adaptive misinformation, GRAD²'s watermark target (the one `mirage verify` tests
for), a training-time defense, and parts given as checkpoints without a scenario. Each test
starts the real server on 127.0.0.1 and queries it."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from conftest import KEYS, tiny_checkpoint

from mirage.api import InProcessAPI
from mirage.data import load_dataset
from mirage.models import load_checkpoint
from mirage.scenarios import WatermarkSet, behaviour_set, get_scenario
from mirage.serve.app import create_app
from mirage.serve.client import HTTPPredictionAPI
from mirage.serve.config import load_config
from mirage.serve.loading import prepare
from mirage.serve.runner import ServerThread
from mirage.training.resolve import DefenseSpec, resolve_defense, resolve_victims

QUICK_SURROGATE = "{ num_queries = 300, stop_epoch = 1 }"
QUICK_MODELS = "{ training = { epochs = 1, batch_size = 128, lr = 0.05, seed = 0 } }"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A private model cache for the module: the digits victim is trained once, by the first
    test."""
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MIRAGE_CACHE", str(root))
        for name in ("MIRAGE_MODELS", "MIRAGE_ANSWERS", "MIRAGE_CLONES"):
            patch.delenv(name, raising=False)
        yield root


def write_config(directory: Path, model: str, defense: str) -> Path:
    """A service config file: ``model`` and ``defense`` are the bodies of its tables."""
    digest = hashlib.sha256(KEYS["alice"].encode()).hexdigest()
    path = directory / "serve.toml"
    path.write_text(
        f'[model]\nname = "digits"\n{model}\n\n[defense]\n{defense}\n\n'
        f'[storage]\ndatabase = "quotas.sqlite"\n\n'
        "[access]\ndisclose_defense = true\n\n"
        f'[[clients]]\nname = "alice"\nkey_sha256 = "{digest}"\n'
    )
    return path


def serve_and_query(config_path: Path, x: torch.Tensor) -> tuple[torch.Tensor, dict, object]:
    """Start the server from the config file, answer ``x`` over HTTP; (answers, defense metadata,
    app)."""
    config = load_config(config_path)
    prepare(config)  # the service never trains: the operator's `mirage prepare` first
    app = create_app(config)
    with (
        ServerThread(app) as url,
        HTTPPredictionAPI(url, "digits", KEYS["alice"], batch_size=16) as api,
    ):
        return api.query(x), api.defense, app


def probe() -> torch.Tensor:
    return load_dataset("digits").test.images[:48]


@pytest.mark.slow
def test_grad2s_watermark_target_serves_from_a_sweeps_lines_and_the_behaviour_verify_tests(
    models, tmp_path
):
    params = (
        '{ epsilon = 1.0, target = "watermark", surrogate = "distilled", '
        f"surrogate_config = {QUICK_SURROGATE}, "
        "watermark = { source_class = 1, target_class = 8, size = 10 } }"
    )
    path = write_config(tmp_path, 'scenario = "digits"', f'name = "grad2"\nparams = {params}')
    behaviour = behaviour_set(
        load_dataset("digits"), WatermarkSet(source_class=1, target_class=8, size=10)
    )
    x = torch.cat([behaviour.images, probe()])
    served, described, app = serve_and_query(path, x)

    scenario, spec = get_scenario("digits"), load_config(path).defense
    sweep_point = DefenseSpec.from_params(
        "grad2",
        {  # the same lines as a sweep's [[defenses]] point
            "epsilon": 1.0,
            "target": "watermark",
            "surrogate": "distilled",
            "surrogate_config": {"num_queries": 300, "stop_epoch": 1},
            "watermark": {"source_class": 1, "target_class": 8, "size": 10},
        },
    )
    assert sweep_point == DefenseSpec(**spec.model_dump(exclude={"per_client", "seed_per_client"}))
    defense = app.state.service.defenses.prototype
    assert torch.equal(
        defense.params.watermark_x, behaviour.images
    )  # what `mirage verify` tests for
    assert defense.params.watermark_y.tolist() == [8] * 10
    victims = resolve_victims(spec, scenario)
    expected = InProcessAPI(
        victims.plain, resolve_defense(spec, scenario, victims.plain, victims.card)
    ).query(x)
    torch.testing.assert_close(served, expected, rtol=0, atol=1e-6)
    clean = InProcessAPI(victims.plain).query(x)
    assert (served - clean).abs().sum(1).max() <= 1.0 + 1e-5 and (served - clean).abs().sum(
        1
    ).mean() > 0.05
    assert served[:10, 8].mean() > clean[:10, 8].mean()  # the behaviour's images lean to its label
    assert described["name"] == "grad2" and described["params"]["target"] == "watermark"
    assert described["params"]["watermark_x"] == "<Tensor>"  # secrets are not shown
    assert described["contract"] == {
        "needs_input": True,
        "truncating": False,
        "keeps_top1": False,
        "stateful": False,
        "budget": 1.0,
        "norm": "l1",
    }


def test_adaptive_misinformation_serves_its_two_models_from_a_config(models, tmp_path):
    path = write_config(
        tmp_path,
        'scenario = "digits"',
        'name = "adaptive_misinformation"\n'
        f"params = {{ tau = 0.9, models_config = {QUICK_MODELS} }}",
    )
    x = probe()
    served, described, app = serve_and_query(path, x)
    scenario, spec = get_scenario("digits"), load_config(path).defense
    defense = app.state.service.defenses.prototype
    assert (
        defense.name == "adaptive_misinformation"
        and defense.oe_model is not defense.misinformation_model
    )
    victims = resolve_victims(spec, scenario)
    expected = InProcessAPI(victims.plain, resolve_defense(spec, scenario)).query(x)
    torch.testing.assert_close(served, expected, rtol=0, atol=1e-6)
    assert (served - InProcessAPI(victims.plain).query(x)).abs().sum(
        1
    ).max() > 0.01  # it mixes something in
    assert described["contract"]["needs_input"] and described["contract"]["budget"] is None
    assert described["params"]["oe_model"] == "<LeNet>"  # a model, not its weights


@pytest.mark.slow
def test_a_training_time_defense_serves_its_victim_from_a_config(models, tmp_path):
    params = (
        "{ noise_multiplier = 1.0, num_train = 640, training = { epochs = 1, batch_size = 128 } }"
    )
    path = write_config(tmp_path, 'scenario = "digits"', f'name = "dpsgd"\nparams = {params}')
    x = probe()
    served, described, app = serve_and_query(path, x)
    victims = resolve_victims(load_config(path).defense, get_scenario("digits"))
    assert victims.training_time and app.state.service.defenses.prototype is None
    torch.testing.assert_close(served, InProcessAPI(victims.served).query(x), rtol=0, atol=1e-6)
    assert (served - InProcessAPI(victims.plain).query(x)).abs().sum(1).mean() > 0.05
    assert described["training_time"] and described["params"]["noise_multiplier"] == 1.0


def test_parts_given_as_checkpoints_serve_without_a_scenario(tmp_path):
    for name, seed in (("victim", 0), ("oe", 1), ("mis", 2)):
        tiny_checkpoint(tmp_path / "models" / name, seed)
    path = write_config(
        tmp_path,
        'checkpoint = "models/victim"',  # relative to the config file
        'name = "adaptive_misinformation"\noe_model = "models/oe"\n'
        'misinformation_model = "models/mis"\n'
        "params = { tau = 0.95, nu = 50.0 }",
    )
    x = torch.rand(12, 1, 8, 8)
    served, described, _ = serve_and_query(path, x)
    victim, _ = load_checkpoint(tmp_path / "models" / "victim")
    local = DefenseSpec(
        name="adaptive_misinformation",
        params={"tau": 0.95, "nu": 50.0},
        oe_model=tmp_path / "models/oe",
        misinformation_model=tmp_path / "models/mis",
    )
    expected = InProcessAPI(victim, resolve_defense(local, None)).query(x)
    torch.testing.assert_close(served, expected, rtol=0, atol=1e-6)
    assert described["name"] == "adaptive_misinformation"
    with pytest.raises(ValueError, match="models_config needs model.scenario"):
        load_config(
            write_config(
                tmp_path, 'checkpoint = "models/victim"', 'name = "adaptive_misinformation"'
            )
        )
    with pytest.raises(ValueError, match="dpsgd' needs model.scenario"):
        load_config(write_config(tmp_path, 'checkpoint = "models/victim"', 'name = "dpsgd"'))


def test_the_keys_of_earlier_service_configs_still_read():
    from mirage.scenarios import ReferenceSet
    from mirage.serve.config import DefenseConfig

    earlier = DefenseConfig.model_validate(
        {
            "name": "grad2",
            "params": {"target": "unlearn"},
            "surrogate_training": {"kind": "random", "stop_epoch": 0},
            "reference_set": {"size": 8},
            "surrogate_param": "surrogate",
        }
    )
    assert (earlier.surrogate, earlier.surrogate_config, earlier.reference) == (
        "random",
        {"stop_epoch": 0},
        ReferenceSet(size=8),
    )
    assert (
        DefenseConfig.model_validate({"name": "grad2", "surrogate_training": {}}).surrogate
        == "distilled"
    )
    with pytest.raises(ValueError, match="at most one"):
        DefenseConfig.model_validate({"name": "grad2", "surrogate": "x", "surrogate_training": {}})
    with pytest.raises(ValueError, match="surrogate_param is gone"):
        DefenseConfig.model_validate({"name": "mad", "surrogate_param": "oe_model"})
    with pytest.raises(ValueError, match="has no seed"):
        DefenseConfig.model_validate({"name": "top_k", "seed_per_client": True})
