"""Watermark verification: a model trained to carry a behaviour is flagged against clean models
trained without it; a held-out clean model is not. Also the surrogate trainer's early stop and
cache (tiny models on sklearn digits)."""

from __future__ import annotations

import pytest
import torch

from mirage.data import load_dataset
from mirage.models import create_model
from mirage.models.fit import TrainConfig, fit
from mirage.ownership.behaviour import behaviour_statistics, verify

CONFIG = TrainConfig(epochs=2, batch_size=64, lr=0.05, seed=0)


@pytest.fixture(scope="module")
def digits_models():
    data = load_dataset("digits")
    x_w = data.test.images[data.test.labels == 1][:10]
    y_w = torch.full((len(x_w),), 7)
    clean = []
    train_x, train_y = data.train.images[:400], data.train.labels[:400]
    for seed in range(4):
        torch.manual_seed(seed)
        model = create_model("lenet", data.input_shape, 10, data.mean, data.std)
        fit(model, train_x, train_y, CONFIG.model_copy(update={"seed": seed}), show_progress=False)
        clean.append(model)
    torch.manual_seed(9)
    marked = create_model("lenet", data.input_shape, 10, data.mean, data.std)
    images = torch.cat([train_x, x_w.repeat(5, 1, 1, 1)])
    labels = torch.cat([train_y, y_w.repeat(5)])
    fit(marked, images, labels, CONFIG.model_copy(update={"seed": 9}), show_progress=False)
    return clean, marked, x_w, y_w


@pytest.mark.slow
def test_watermarked_model_is_flagged_and_clean_one_is_not(digits_models):
    clean, marked, x_w, y_w = digits_models
    result = verify(marked, clean[:3], x_w, y_w)
    assert result.watermarked and result.p_value < 0.01
    assert result.match_rate > max(result.clean_match_rates)
    assert result.empirical_p_value == pytest.approx(1 / 4)
    held_out = verify(clean[3], clean[:3], x_w, y_w)
    assert not held_out.watermarked and held_out.p_value > 0.01


def test_statistics_and_validation(digits_models):
    clean, _, x_w, y_w = digits_models
    log_lik, match = behaviour_statistics(clean[0], x_w, y_w)
    assert log_lik <= 0 and 0 <= match <= 1
    with pytest.raises(ValueError):
        verify(clean[0], clean[:1], x_w, y_w)
    with pytest.raises(ValueError):
        verify(clean[0], clean[:2], x_w, y_w.float())
    with pytest.raises(ValueError):
        verify(clean[0], clean[:2], x_w, y_w, alpha=1.5)


def test_surrogate_early_stop_and_cache(isolated_cache):
    from mirage.scenarios import get_scenario
    from mirage.training.surrogate import SurrogateConfig, get_surrogate, train_early_stopped
    from mirage.training.victim import get_victim

    scenario = get_scenario("digits", victim_training=CONFIG)
    victim, card, _ = get_victim(scenario, show_progress=False)
    training = CONFIG.model_copy(update={"epochs": 4})
    config = SurrogateConfig(
        kind="distilled", stop_epoch=2, training=training, checkpoints=2, num_queries=300
    )
    members, cards, cached = get_surrogate(scenario, victim, card, config)
    assert len(members) == 2 and not cached and all(c.test_accuracy is not None for c in cards)
    again, _, cached = get_surrogate(scenario, victim, card, config)
    assert cached and torch.equal(again[1].classifier.weight, members[1].classifier.weight)
    assert not torch.equal(members[0].classifier.weight, members[1].classifier.weight)
    # stopping at epoch 2 of 4 = the first two epochs of the full 4-epoch run
    data = load_dataset("digits")
    torch.manual_seed(0)
    a = create_model("lenet", data.input_shape, 10, data.mean, data.std)
    b = create_model("lenet", data.input_shape, 10, data.mean, data.std)
    b.load_state_dict(a.state_dict())
    early, _ = train_early_stopped(a, data.train.images[:200], data.train.labels[:200], training, 2)
    full, _ = train_early_stopped(
        b, data.train.images[:200], data.train.labels[:200], training, 4, keep_last=4
    )
    for name in early[0]:
        torch.testing.assert_close(early[0][name], full[1][name])
    random_members, _, _ = get_surrogate(
        scenario, victim, card, SurrogateConfig(kind="random", stop_epoch=0)
    )
    assert len(random_members) == 1
    with pytest.raises(ValueError):
        SurrogateConfig(stop_epoch=60)


def test_distilled_surrogate_never_sees_the_victims_test_split(monkeypatch):
    import mirage.training.surrogate as surrogate_module
    from mirage.scenarios import get_scenario
    from mirage.training.surrogate import SurrogateConfig, train_surrogate

    seen = []

    def record(model, images):
        seen.append(images)
        raise StopIteration  # the images are all this test needs

    monkeypatch.setattr(surrogate_module, "clean_posteriors", record)
    scenario = get_scenario("digits")  # in-distribution: the pool is the victim's own dataset
    data = load_dataset("digits")
    model = create_model("lenet", data.input_shape, 10, data.mean, data.std)
    with pytest.raises(StopIteration):
        train_surrogate(scenario, model, None, SurrogateConfig(kind="distilled"))
    images = seen[0].flatten(1)
    assert len(images) == len(data.train.images)
    test_rows = data.test.images.flatten(1)
    assert not (torch.cdist(test_rows, images).amin(1) == 0).any()


def test_verify_reads_the_behaviour_a_service_config_serves(tmp_path):
    from typer.testing import CliRunner

    from mirage.cli import app
    from mirage.models import ModelCard, save_checkpoint

    paths = []
    for seed in range(3):
        torch.manual_seed(seed)
        model = create_model("lenet", (1, 8, 8), 10, (0.5,), (0.3,))
        card = ModelCard(
            architecture="lenet",
            input_shape=(1, 8, 8),
            num_classes=10,
            mean=(0.5,),
            std=(0.3,),
            dataset="digits",
            seed=seed,
        )
        paths.append(str(save_checkpoint(model, card, tmp_path / f"m{seed}")))
    config = tmp_path / "serve.toml"
    config.write_text(
        '[model]\nname = "digits"\nscenario = "digits"\n[defense]\nname = "grad2"\n'
        'params = { target = "watermark", '
        "watermark = { source_class = 3, target_class = 5, size = 12 } }\n"
        f'[[clients]]\nname = "a"\nkey_sha256 = "{"a" * 64}"\n'
    )
    models = ["--suspect", paths[0], "--clean", paths[1], "--clean", paths[2]]
    served = CliRunner().invoke(app, ["verify", *models, "--config", str(config)])
    explicit = CliRunner().invoke(
        app,
        [
            "verify",
            *models,
            "--dataset",
            "digits",
            "--source-class",
            "3",
            "--target-class",
            "5",
            "--size",
            "12",
        ],
    )
    assert served.exit_code == 0 and explicit.exit_code == 0, served.output + explicit.output
    assert "12 digits images of class 3 -> 5" in served.output and served.output == explicit.output
    config.write_text(
        config.read_text().replace(
            'target = "watermark", watermark = { source_class = 3, target_class = 5, size = 12 }',
            'target = "all-ones"',
        )
    )
    refused = CliRunner().invoke(app, ["verify", *models, "--config", str(config)])
    assert refused.exit_code == 2 and "serves no watermark" in refused.output
