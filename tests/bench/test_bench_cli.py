import pytest

"""``mirage bench``: status divides the ETA by the workers; run honours --answers."""

import json
import os

from typer.testing import CliRunner

from mirage.bench.runs import expand
from mirage.cli import app


def write_config(tmp_path):
    config = tmp_path / "tiny.toml"
    config.write_text(
        'name = "tiny"\nscenarios = ["digits"]\n[[defenses]]\nname = "none"\n'
        '[[defenses]]\nname = "rounding"\ngrid = { decimals = [1, 2, 3] }\n'
        '[[attacks]]\nname = "knockoff"\nbudget = 50\n[clone_training]\nepochs = 1\n'
    )
    return config


def test_status_eta_is_the_mean_run_time_times_runs_left_over_workers(tmp_path):
    from mirage.bench.config import load_config

    config = write_config(tmp_path)
    results = tmp_path / "r.jsonl"
    first = expand(load_config(config))[0]
    results.write_text(json.dumps({"run_id": first.run_id, "wall_seconds": 600.0}) + "\n")
    runner = CliRunner()
    one = runner.invoke(
        app, ["bench", "status", "--config", str(config), "--results", str(results)]
    )
    two = runner.invoke(
        app,
        ["bench", "status", "--config", str(config), "--results", str(results), "--workers", "2"],
    )
    assert one.exit_code == two.exit_code == 0, one.output + two.output
    assert "30 min" in one.output and "15 min" in two.output  # 3 runs left × 10 min


@pytest.mark.slow
def test_run_with_answers_off_caches_nothing(tmp_path, isolated_cache, monkeypatch):
    monkeypatch.delenv("MIRAGE_ANSWERS", raising=False)
    config = write_config(tmp_path)
    results = tmp_path / "r.jsonl"
    try:
        result = CliRunner().invoke(
            app,
            [
                "bench",
                "run",
                "--config",
                str(config),
                "--results",
                str(results),
                "--limit",
                "1",
                "--no-report",
                "--answers",
                "off",
            ],
        )
        assert result.exit_code == 0, result.output
        assert os.environ["MIRAGE_ANSWERS"] == "off"
    finally:
        os.environ.pop("MIRAGE_ANSWERS", None)
    assert json.loads(results.read_text())["answers_replayed"] == 0
    assert not (isolated_cache / "answers").exists()
