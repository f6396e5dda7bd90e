"""Devices (docs/design.md §devices): every device present trains clones and surrogates and runs
``mirage.evaluate``; a device that is absent is a clear error before anything runs. On a machine
without a GPU the CUDA and MPS cases are skipped, saying so."""

from __future__ import annotations

import pytest
import torch

import mirage
from mirage.attacks import CloneSpec
from mirage.attacks.clone import _clone_key, recipe, train_clone
from mirage.data import load_dataset
from mirage.devices import device_available, resolve_device
from mirage.training.surrogate import SURROGATE_TRAINING, SurrogateConfig, distil_surrogate

DEVICES = [
    pytest.param(
        kind, marks=pytest.mark.skipif(not device_available(kind), reason=f"no {kind} device here")
    )
    for kind in ("cpu", "cuda", "mps")
]
QUICK = recipe("grad2").model_copy(update={"epochs": 3})


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.slow
def test_clones_and_surrogates_train_on_each_device_and_come_back_on_the_cpu(device, digits):
    images, labels = digits.train.images, digits.train.labels
    answers = torch.nn.functional.one_hot(labels, 10).float()
    spec = CloneSpec(architecture="lenet", mean=(0.3,), std=(0.3,), training=QUICK, device=device)
    clone, _ = train_clone(spec, images, answers, 10, show_progress=False)
    assert next(clone.parameters()).device.type == "cpu" and not clone.training
    accuracy = float((clone(digits.test.images).argmax(1) == digits.test.labels).float().mean())
    assert accuracy > 0.5, accuracy
    config = SurrogateConfig(
        stop_epoch=2, training=SURROGATE_TRAINING.model_copy(update={"epochs": 3})
    )
    ((surrogate, card),) = distil_surrogate(clone, images, config=config, device=device)
    assert next(surrogate.parameters()).device.type == "cpu" and card.test_accuracy > 0.5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.slow
def test_evaluate_runs_on_each_device(device, digits):
    report = mirage.evaluate(
        torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)),
        digits,
        "grad2",
        params={"epsilon": 0.5},
        attackers=("soft",),
        budget=200,
        clone_training=QUICK,
        progress=False,
        device=device,
        seeds=(0,),
    )
    assert len(report.records) == 2


def test_an_absent_device_is_refused_before_anything_runs(monkeypatch):
    assert resolve_device().type == "cpu"
    monkeypatch.setenv("MIRAGE_DEVICE", "cpu")
    assert resolve_device() == torch.device("cpu")
    for name, message in (("tpu", "unknown device|not supported"), ("gpu0", "unknown device")):
        with pytest.raises(ValueError, match=message):
            resolve_device(name)
    absent = next((kind for kind in ("cuda", "mps") if not device_available(kind)), None)
    if absent is None:
        pytest.skip("this machine has both CUDA and MPS")
    monkeypatch.setenv("MIRAGE_DEVICE", absent)
    with pytest.raises(ValueError, match="has none"):
        resolve_device()
    with pytest.raises(ValueError, match="has none"):
        mirage.evaluate(torch.nn.Linear(64, 10), load_dataset("digits"), attackers=("soft",))


def test_a_cpu_clone_keeps_its_cache_key():
    """Clones cached before devices existed are found again: the CPU adds nothing to the key."""
    plain = CloneSpec(architecture="lenet", training=QUICK)
    assert _clone_key(plain, "data", 10) == _clone_key(
        plain.model_copy(update={"device": "cpu"}), "data", 10
    )
    assert _clone_key(plain, "data", 10) != _clone_key(
        plain.model_copy(update={"device": "cuda"}), "data", 10
    )


def test_a_model_is_copied_to_a_device_and_left_alone_on_the_cpu():
    from mirage.devices import on_device

    model = torch.nn.Sequential(torch.nn.Linear(4, 2))
    assert on_device(model, torch.device("cpu")) is model and on_device(model, None) is model
    moved = on_device(model, torch.device("meta"))  # a device every machine has, holding no data
    assert moved is not model and next(moved.parameters()).device.type == "meta"
    assert next(model.parameters()).device.type == "cpu"


@pytest.mark.parametrize("device", DEVICES)
def test_victims_train_on_each_device_and_come_back_on_the_cpu(device):
    from mirage.training.victim import train_model

    model, card = train_model(
        "lenet",
        {},
        "digits",
        QUICK.model_copy(update={"epochs": 1}),
        show_progress=False,
        device=device,
    )
    assert (
        next(model.parameters()).device.type == "cpu"
        and not model.training
        and card.test_accuracy > 0.3
    )


def test_a_sweep_refuses_an_absent_device_before_any_run(tmp_path):
    from mirage.bench.config import SweepConfig
    from mirage.bench.sweep import run_sweep

    config = SweepConfig.model_validate(
        {
            "name": "t",
            "scenarios": ["digits"],
            "defenses": [{"name": "none"}],
            "attacks": [{"name": "knockoff", "budget": 10}],
        }
    )
    ran = []
    with pytest.raises(ValueError, match="unknown device"):
        run_sweep(
            config,
            tmp_path / "r.jsonl",
            runner=lambda spec, **kw: ran.append(spec),
            executor="inline",
            device="gpu0",
            show_progress=False,
        )
    assert not ran and not (tmp_path / "r.jsonl").exists()
