"""The service on a device (docs/design.md §devices): the model's forward pass runs where
``model.device`` (or ``mirage serve --device``) says, answers come back on the CPU equal to the
CPU service's, and an absent device stops the service before any model loads."""

from __future__ import annotations

import pytest
import torch
from conftest import grad2_defense, make_config

from mirage.devices import device_available
from mirage.serve import service as service_module
from mirage.serve.service import Service

DEVICES = [
    pytest.param(
        kind, marks=pytest.mark.skipif(not device_available(kind), reason=f"no {kind} device here")
    )
    for kind in ("cpu", "cuda", "mps")
]


def _with_device(config, device):
    return config.model_copy(update={"model": config.model.model_copy(update={"device": device})})


@pytest.mark.parametrize("device", DEVICES)
def test_the_model_computes_on_the_device_and_answers_as_on_the_cpu(tmp_path, checkpoints, device):
    config = make_config(tmp_path, checkpoints, defense=grad2_defense(checkpoints))
    on_cpu, on_device = Service(config), Service(_with_device(config, device))
    try:
        assert next(on_device.batcher.model.parameters()).device.type == device
        assert (
            next(on_device.model.parameters()).device.type == "cpu"
        )  # the defense's parts keep theirs
        x = torch.rand(16, *on_cpu.input_shape)
        clean_cpu = torch.softmax(on_cpu.batcher.model(x), 1)
        clean_device = torch.softmax(on_device.batcher.model(x.to(device)), 1).cpu()
        torch.testing.assert_close(clean_device, clean_cpu, atol=1e-5, rtol=1e-4)
    finally:
        on_cpu.close()
        on_device.close()


def test_an_absent_device_stops_the_service_before_any_model_loads(
    tmp_path, checkpoints, monkeypatch
):
    absent = next((kind for kind in ("cuda", "mps") if not device_available(kind)), None)
    if absent is None:
        pytest.skip("every device kind is present here")

    def never(config):
        raise AssertionError("the model was loaded before the device was checked")

    monkeypatch.setattr(service_module, "load_model", never)
    with pytest.raises(ValueError, match=f"device {absent}"):
        Service(_with_device(make_config(tmp_path, checkpoints), absent))
    with pytest.raises(ValueError, match="unknown device"):
        Service(_with_device(make_config(tmp_path, checkpoints), "gpu0"))
