"""A sweep over a user's own scenario (docs/design.md §evaluate): their images (a file of arrays),
with or without their model, run by the one run protocol, resumed by run id, reported with the
sweeps' verdict; bad definitions fail when the config loads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mirage.bench.config import SweepConfig, load_config
from mirage.bench.results import ResultStore
from mirage.bench.runs import expand
from mirage.bench.sweep import run_sweep
from mirage.data import load_dataset

CONFIG = (
    """
name = "mine"
scenarios = ["my-digits"]
seeds = [0]
clone_training = {{ epochs = 2, batch_size = 64 }}

[user_scenarios.my-digits]
data = "{data}"
{model}

[[defenses]]
name = "none"

[[defenses]]
name = "grad2"
grid = {{ epsilon = [0.5] }}
params = {{ target = "unlearn", preserve_top1 = true, surrogate = "distilled", """
    """reference = {{ size = 64 }} }}

[[attacks]]
name = "knockoff"
budget = 200
variants = ["soft", "hard-label"]
"""
)


def _digits_file(folder):
    digits = load_dataset("digits")
    images = torch.cat([digits.train.images, digits.test.images]).numpy()
    labels = torch.cat([digits.train.labels, digits.test.labels]).numpy()
    np.savez(folder / "digits.npz", images=images, labels=labels)


@pytest.mark.slow
def test_a_sweep_runs_a_user_scenario_with_a_trained_victim_and_resumes(tmp_path, isolated_cache):
    _digits_file(tmp_path)
    (tmp_path / "mine.toml").write_text(CONFIG.format(data="digits.npz", model=""))
    config = load_config(tmp_path / "mine.toml")
    assert config.user_scenarios["my-digits"].path("digits.npz") == tmp_path / "digits.npz"
    results = tmp_path / "out" / "results.jsonl"
    status = run_sweep(config, results, executor="inline", show_progress=False)
    assert status.done == status.total == 4 and not status.pending
    records = ResultStore(results).read()
    assert {r["scenario"] for r in records} == {"my-digits"}
    assert {r["defense"] for r in records} == {"none", "grad2"}
    grad2 = [r for r in records if r["defense"] == "grad2"]
    assert all(r["defender_l1"] > 0 and r["effective_l1"] > 0 for r in grad2)
    assert all(
        0.5 < r["victim_accuracy"] for r in records
    )  # the victim trained on the non-test share
    assert list((isolated_cache / "victims").glob("user-my-digits-*"))
    # the same config elsewhere resumes: run ids do not depend on where the files are
    moved = load_config(tmp_path / "mine.toml").model_copy()
    assert {run.run_id for run in expand(moved)} == {r["run_id"] for r in records}
    assert run_sweep(moved, results, executor="inline", show_progress=False).pending == []


def test_a_user_scenario_changes_the_run_id_and_bad_definitions_fail_at_load(tmp_path):
    base = {
        "name": "t",
        "defenses": [{"name": "none"}],
        "attacks": [{"name": "knockoff", "budget": 10}],
    }
    mine = SweepConfig.model_validate(
        {**base, "scenarios": ["mine"], "user_scenarios": {"mine": {"data": "a"}}}
    )
    other = SweepConfig.model_validate(
        {**base, "scenarios": ["mine"], "user_scenarios": {"mine": {"data": "b"}}}
    )
    assert expand(mine)[0].run_id != expand(other)[0].run_id
    builtin = SweepConfig.model_validate({**base, "scenarios": ["digits"]})
    assert expand(builtin)[0].user_scenario is None
    with pytest.raises(ValueError, match="unknown scenarios"):
        SweepConfig.model_validate({**base, "scenarios": ["mine"]})
    with pytest.raises(ValueError, match="hide the built-in"):
        SweepConfig.model_validate(
            {**base, "scenarios": ["digits"], "user_scenarios": {"digits": {"data": "a"}}}
        )
    with pytest.raises(ValueError, match="data"):
        SweepConfig.model_validate(
            {**base, "scenarios": ["mine"], "user_scenarios": {"mine": {"model": "m.pt2"}}}
        )


@pytest.mark.slow
def test_a_sweep_serves_the_users_own_exported_model_unchanged(
    tmp_path, isolated_cache, user_model
):
    """Their batch-norm CNN, exported with a static batch of 1 as torch.export makes it by default:
    the sweep's victim answers exactly as their module does, and no victim is trained."""
    from mirage.api import clean_posteriors
    from mirage.bench.execute import prepare_run

    net, _ = user_model
    _digits_file(tmp_path)
    torch.export.save(
        torch.export.export(net, (torch.zeros(1, 1, 8, 8),)), str(tmp_path / "net.pt2")
    )
    (tmp_path / "mine.toml").write_text(CONFIG.format(data="digits.npz", model='model = "net.pt2"'))
    config = load_config(tmp_path / "mine.toml")
    none = next(run for run in expand(config) if run.defense == "none")
    context = prepare_run(none)
    images = context.test.images[:64]
    torch.testing.assert_close(
        clean_posteriors(context.served, images), torch.softmax(net(images), 1)
    )
    results = tmp_path / "results.jsonl"
    run_sweep(config, results, executor="inline", show_progress=False, only=None, limit=2)
    records = ResultStore(results).read()
    assert len(records) == 2 and all(r["victim_accuracy"] > 0.8 for r in records)
    assert not (isolated_cache / "victims").exists()


@pytest.mark.slow
def test_the_sweep_example_runs_as_ci_runs_it(tmp_path, isolated_cache, run_example):
    stdout = run_example("sweep_your_data.py", "--out", str(tmp_path), "--quick", timeout=600)
    assert "36/36 runs" in stdout and "my-digits × knockoff:" in stdout
    assert (tmp_path / "report.md").is_file() and list((tmp_path / "models" / "victims").iterdir())
