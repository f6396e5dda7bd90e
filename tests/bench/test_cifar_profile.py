"""The seeds' CIFAR-10 protocol as a built-in profile (``mirage bench run --config cifar10
--data-root cifar10=DIR --data-root cifar100=DIR``): it runs end to end on generated files in the
python-pickle layout, at a tiny budget; data roots never enter a run's id or record."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from typer.testing import CliRunner

from mirage.bench.config import load_config
from mirage.bench.results import ResultStore
from mirage.bench.runs import expand
from mirage.bench.sweep import run_sweep
from mirage.cli import app


def write_cifar(root, *, classes: int, per_file: int = 40):
    """Random images in CIFAR-10's (``classes`` = 10) or CIFAR-100's python-pickle layout."""
    rng = np.random.default_rng(classes)
    if classes == 10:
        folder = root / "cifar-10-batches-py"
        files, key = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], b"labels"
        meta = ("batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)]})
    else:
        folder = root / "cifar-100-python"
        files, key = ["train", "test"], b"fine_labels"
        meta = ("meta", {b"fine_label_names": [f"f{i}".encode() for i in range(100)]})
    folder.mkdir(parents=True)
    for name in files:
        batch = {
            b"data": rng.integers(0, 256, (per_file, 3072)).astype(np.uint8),
            key: rng.integers(0, classes, per_file).tolist(),
        }
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / meta[0]).write_bytes(pickle.dumps(meta[1]))
    return folder


@pytest.mark.slow
def test_the_cifar10_profile_runs_on_files_in_the_pickle_layout(tmp_path, isolated_cache):
    cifar10 = write_cifar(tmp_path / "data", classes=10)
    cifar100 = write_cifar(tmp_path / "data", classes=100)
    profile = load_config("cifar10")
    assert profile.scenarios == ["cifar10"] and profile.attacks[0].budget == 50_000
    small = profile.model_copy(
        update={
            "seeds": [0],
            "eval_size": 20,
            "victim_epochs": {"cifar10": 1},
            "clone_training": profile.clone_training.model_copy(update={"epochs": 1}),
            "defenses": [d for d in profile.defenses if d.name in ("none", "mad")][:2],
            "attacks": [profile.attacks[0].model_copy(update={"budget": 60, "variants": ["soft"]})],
            "data_roots": {"cifar10": str(cifar10), "cifar100": str(cifar100)},
        }
    )
    results = tmp_path / "out" / "results.jsonl"
    status = run_sweep(small, results, executor="inline", show_progress=False)
    assert status.done == status.total == 3 and not status.pending  # none, mad ε 0.5 and 1.0
    records = ResultStore(results).read()
    assert {r["defense"] for r in records} == {"none", "mad"}
    assert all(0 <= r["clone_accuracy"] <= 1 for r in records)
    assert not any("data_roots" in r or str(tmp_path) in str(r) for r in records)
    elsewhere = small.model_copy(update={"data_roots": {"cifar10": "/elsewhere"}})
    assert [run.run_id for run in expand(elsewhere)] == [run.run_id for run in expand(small)]


def test_data_roots_name_registered_datasets_and_the_command_line_checks_its_pairs():
    with pytest.raises(ValueError, match="unknown datasets"):
        load_config("cifar10").model_validate(
            {**load_config("cifar10").model_dump(), "data_roots": {"cifar11": "/x"}}
        )
    runner = CliRunner()
    for pair, message in (("cifar10", "DATASET=DIR"), ("cifar11=/x", "unknown datasets")):
        result = runner.invoke(
            app, ["bench", "run", "--config", "cifar10", "--data-root", pair, "--limit", "0"]
        )
        assert result.exit_code == 2 and message in result.output, result.output
