"""The service serves models from outside mirage (docs/design.md §model-formats): a
``torch.export`` archive, an ONNX file run by onnxruntime, and a class by import path with a
safetensors state dict. Each is served through the real server and answers as the same model and
defense do in process."""

from __future__ import annotations

import pytest
import torch
from conftest import INPUT_SHAPE, KEYS, grad2_defense, make_config
from safetensors.torch import save_file
from user_models import Net

from mirage.api import InProcessAPI
from mirage.defenses import create_defense
from mirage.models import load_checkpoint
from mirage.models.formats import ExternalModel, load_model_file
from mirage.serve.app import create_app
from mirage.serve.client import HTTPPredictionAPI
from mirage.serve.config import ModelConfig
from mirage.serve.runner import ServerThread

PLATFORMS = {"export": "pytorch_torch_export", "onnx": "onnxruntime_onnx", "state_dict": "pytorch"}


def user_net() -> Net:
    torch.manual_seed(5)
    return Net(num_classes=10, width=4).eval()


def save(model: Net, fmt: str, directory) -> dict:
    """The [model] table that serves ``model`` saved in ``fmt``."""
    example = (torch.rand(2, *INPUT_SHAPE),)
    batch = torch.export.Dim("batch", min=1, max=1024)
    if fmt == "export":
        path = directory / "net.pt2"
        torch.export.save(
            torch.export.export(model, example, dynamic_shapes=({0: batch},)), str(path)
        )
        return {"path": str(path)}
    if fmt == "onnx":
        pytest.importorskip("onnxscript")
        path = directory / "net.onnx"
        torch.onnx.export(
            model,
            example,
            str(path),
            input_names=["images"],
            dynamic_shapes=({0: batch},),
            dynamo=True,
            verbose=False,
        )
        return {"path": str(path)}
    path = directory / "net.safetensors"
    save_file(model.state_dict(), str(path))
    return {
        "path": str(path),
        "class": "user_models:Net",
        "kwargs": {"width": 4},
        "input_shape": list(INPUT_SHAPE),
    }


@pytest.mark.parametrize("fmt", ["export", "onnx", "state_dict"])
@pytest.mark.parametrize("defense", ["none", "grad2"])
@pytest.mark.slow
def test_each_format_serves_what_the_model_answers_in_process(tmp_path, checkpoints, fmt, defense):
    model = user_net()
    table = {"name": "digits", **save(model, fmt, tmp_path)}
    spec = grad2_defense(checkpoints) if defense == "grad2" else {"name": "none"}
    config = make_config(tmp_path, checkpoints, defense=spec)
    config = config.model_copy(update={"model": ModelConfig.model_validate(table)})
    x = torch.rand(40, *INPUT_SHAPE)
    local = (
        None
        if defense == "none"
        else create_defense(
            "grad2",
            epsilon=0.5,
            target="all-ones",
            surrogate=load_checkpoint(checkpoints["surrogate"])[0],
        )
    )
    expected = InProcessAPI(ExternalModel(model, INPUT_SHAPE), local).query(x)
    with (
        ServerThread(create_app(config)) as url,
        HTTPPredictionAPI(url, "digits", KEYS["alice"], batch_size=16) as api,
    ):
        served = api.query(x)
        assert (api.num_classes, api.input_shape) == (10, INPUT_SHAPE)
        assert api.metadata()["platform"] == PLATFORMS[fmt]  # what it is; never TorchScript
    torch.testing.assert_close(served, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("fmt", ["export", "onnx", "state_dict"])
@pytest.mark.slow
def test_loaded_models_know_their_shape_and_classes(tmp_path, fmt):
    model = user_net()
    table = save(model, fmt, tmp_path)
    config = ModelConfig.model_validate({"name": "m", **table})
    loaded, card = load_model_file(
        config.file_format,
        config.path,
        input_shape=config.input_shape,
        class_path=config.class_path,
        kwargs=config.kwargs,
    )
    assert (loaded.input_shape, loaded.num_classes, card.num_classes) == (INPUT_SHAPE, 10, 10)
    assert card.training["format"] == fmt and not loaded.training
    x = torch.rand(3, *INPUT_SHAPE)
    torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-5)
    loaded.train()  # modes never reach an exported program or a session (torch would raise)
    loaded.eval()


@pytest.mark.parametrize(
    "table, message",
    [
        ({"path": "m.safetensors"}, "needs model.class"),
        ({"path": "m.onnx", "class": "user_models:Net"}, "only it takes one"),
        ({"path": "m.pt2", "kwargs": {"width": 2}}, "constructor arguments"),
        ({"path": "m.pt2", "checkpoint": "dir"}, "exactly one"),
        ({"checkpoint": "dir", "input_shape": [1, 8, 8]}, "describe model.path"),
    ],
)
def test_model_table_says_what_is_wrong(table, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.model_validate({"name": "m", **table})


def test_a_state_dict_without_a_shape_or_with_a_bad_class_is_refused(tmp_path):
    save_file(user_net().state_dict(), str(tmp_path / "net.safetensors"))
    with pytest.raises(ValueError, match="input_shape"):
        load_model_file(
            "state_dict",
            tmp_path / "net.safetensors",
            class_path="user_models:Net",
            kwargs={"width": 4},
        )
    with pytest.raises(ValueError, match="not an nn.Module class"):
        load_model_file("state_dict", tmp_path / "net.safetensors", class_path="user_models:F")
