"""``mirage attack`` prints what it must, and passes defense/attack parameters generically."""

import pytest
import typer
from typer.testing import CliRunner

from mirage.cli import app
from mirage.cli.attack import parse_params
from mirage.models import ModelCard, save_checkpoint
from mirage.scenarios import get_scenario
from mirage.training.victim import victim_dir


def test_parse_params_reads_json_values_and_keeps_strings():
    assert parse_params(
        ["epsilon=0.5", "hard_labels=true", "target=all-ones", "groups=[[0,1],[2]]"]
    ) == {"epsilon": 0.5, "hard_labels": True, "target": "all-ones", "groups": [[0, 1], [2]]}
    with pytest.raises(typer.BadParameter):
        parse_params(["no-equals-sign"])


@pytest.fixture
def cached_digits_victim(isolated_cache, victim, digits):
    card = ModelCard(
        architecture="lenet",
        input_shape=digits.input_shape,
        num_classes=10,
        mean=digits.mean,
        std=digits.std,
        dataset="digits",
    )
    save_checkpoint(victim, card, victim_dir(get_scenario("digits")))


def test_attack_command_reports_accuracies_l1_and_queries(cached_digits_victim):
    result = CliRunner().invoke(
        app,
        [
            "attack",
            "--scenario",
            "digits",
            "--attack",
            "knockoff",
            "--defense",
            "none",
            "--budget",
            "50",
            "--epochs",
            "1",
            "--attack-param",
            "hard_labels=true",
        ],
    )
    assert result.exit_code == 0, result.output
    for text in ("clone accuracy", "defender accuracy", "effective L1", "50 / 50"):
        assert text in result.output


def test_unknown_defense_parameter_is_an_error(cached_digits_victim):
    result = CliRunner().invoke(
        app,
        [
            "attack",
            "--scenario",
            "digits",
            "--defense",
            "none",
            "--param",
            "beta=0.1",
            "--budget",
            "10",
            "--epochs",
            "1",
        ],
    )
    assert result.exit_code == 2 and "beta" in result.output


@pytest.mark.parametrize(
    "variant", ["averaging", "restorer", "noise-robust", "mixing", "multi-key", "aligned"]
)
def test_attack_command_runs_every_attacker_of_the_suite(cached_digits_victim, variant):
    extra = {
        "restorer": ["--attack-param", 'restorer={"pairs": 20, "epochs": 2, "shadow_epochs": 1}'],
        "multi-key": ["--attack-param", "query_batch_size=15"],
    }.get(variant, [])
    result = CliRunner().invoke(
        app,
        [
            "attack",
            "--scenario",
            "digits",
            "--attack",
            "knockoff",
            "--defense",
            "random_noise",
            "--epsilon",
            "0.5",
            "--budget",
            "60",
            "--epochs",
            "1",
            "--variant",
            variant,
            *extra,
        ],
    )
    assert result.exit_code == 0, result.output
    assert "60 / 60" in result.output  # averaging: 20 images asked 3 times each
    size = 20 if variant == "averaging" else 60  # mixing: the 18 decoys' answers are kept too
    assert result.output.split("transfer set size")[1].split("\n")[0].split()[-2] == str(size)
    assert ("decoys sent" in result.output) == (variant == "mixing")
    assert ("15 / 15 / 15 / 15" in result.output) == (variant == "multi-key")
    assert ("labels realigned" in result.output) == (variant == "aligned")


def test_attacks_command_lists_the_suite():
    result = CliRunner().invoke(app, ["attacks"])
    assert result.exit_code == 0 and "restorer" in result.output and "noise-robust" in result.output
    assert "mix_benign=0.3" in result.output and "api_keys=4" in result.output
