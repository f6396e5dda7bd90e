"""A surrogate for any model (docs/design.md §grad2-surrogate): distilled from a user's own CNN
(batch norm, not a mirage architecture) on unlabelled images, in process, from a ``.pt2`` file
through the command line, and from a served endpoint; then served as GRAD²'s surrogate in front of
that file."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from mirage.api import InProcessAPI, clean_posteriors
from mirage.cli import app
from mirage.models import load_checkpoint
from mirage.serve.auth import hash_key
from mirage.serve.config import ServeConfig
from mirage.training.surrogate import (
    SURROGATE_TRAINING,
    SurrogateConfig,
    architecture_for,
    distil_surrogate,
)

QUICK = SurrogateConfig(
    stop_epoch=4, training=SURROGATE_TRAINING.model_copy(update={"epochs": 6, "batch_size": 64})
)


def agreement(surrogate: nn.Module, model: nn.Module, images: torch.Tensor) -> float:
    return float(
        (clean_posteriors(surrogate, images).argmax(1) == clean_posteriors(model, images).argmax(1))
        .float()
        .mean()
    )


@pytest.mark.slow
def test_a_surrogate_of_a_users_cnn_agrees_with_it(user_model):
    net, data = user_model
    ((surrogate, card),) = distil_surrogate(net, data.train.images, config=QUICK)
    assert card.architecture == architecture_for((1, 8, 8)) == "lenet" and card.input_shape == (
        1,
        8,
        8,
    )
    assert card.test_accuracy >= 0.8 and card.training["agreement_on"] == round(
        0.1 * len(data.train)
    )
    assert agreement(surrogate, net, data.test.images) >= 0.8  # on images it never saw
    # the same through a prediction API (probabilities, each image one query)
    api = InProcessAPI(net, input_shape=(1, 8, 8))  # a module that does not know its input
    ((through_api, _),) = distil_surrogate(api, data.train.images, config=QUICK)
    assert api.queries_used == len(data.train)
    assert agreement(through_api, net, data.test.images) >= 0.8
    assert architecture_for((3, 64, 64)) == "vgg"
    with pytest.raises(ValueError, match="input_shape"):
        InProcessAPI(net)


def test_bad_images_are_refused_before_anything_runs(user_model):
    net, data = user_model
    for images in (data.train.images[:5], data.train.images * 2, data.train.images[:, 0]):
        with pytest.raises(ValueError):
            distil_surrogate(net, images, config=QUICK)


@pytest.mark.slow
def test_the_command_distils_from_a_file_and_an_endpoint_and_grad2_serves_it(
    user_model, tmp_path, monkeypatch
):
    from fastapi.testclient import TestClient

    from mirage.serve.app import create_app
    from mirage.serve.runner import ServerThread

    net, data = user_model
    exported = tmp_path / "net.pt2"
    torch.export.save(
        torch.export.export(
            net,
            (data.train.images[:2],),
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
        ),
        str(exported),
    )
    np.save(tmp_path / "images.npy", data.train.images.numpy())
    runner = CliRunner()
    common = ["--images", str(tmp_path / "images.npy"), "--stop-epoch", "4", "--epochs", "6"]
    result = runner.invoke(
        app, ["distil-surrogate", "--model", str(exported), "--out", str(tmp_path / "s"), *common]
    )
    assert result.exit_code == 0, result.output
    assert "surrogate = " in result.output
    surrogate, _ = load_checkpoint(tmp_path / "s")
    assert agreement(surrogate, net, data.test.images) >= 0.8

    key = "mk_distil_test_key"
    config = ServeConfig.model_validate(
        {
            "model": {"name": "users", "path": str(exported)},
            "defense": {
                "name": "grad2",
                "params": {"epsilon": 0.5, "target": "all-ones"},
                "surrogate": str(tmp_path / "s"),
            },
            "storage": {"database": str(tmp_path / "serve.sqlite")},
            "clients": [{"name": "alice", "key_sha256": hash_key(key)}],
        }
    )
    x = data.test.images[:4]
    request = {
        "inputs": [
            {
                "name": "images",
                "shape": list(x.shape),
                "datatype": "FP32",
                "data": x.flatten().tolist(),
            }
        ]
    }
    with TestClient(create_app(config)) as client:
        response = client.post(
            "/v2/models/users/infer", json=request, headers={"Authorization": f"Bearer {key}"}
        )
    assert response.status_code == 200, response.text
    served = torch.tensor(response.json()["outputs"][0]["data"]).reshape(4, 10)
    clean = clean_posteriors(net, x)
    assert torch.allclose(served.sum(1), torch.ones(4), atol=1e-5)
    assert (
        0 < float((served - clean).abs().sum(1).max()) <= 0.5 + 1e-4
    )  # GRAD² moved them, within ε

    plain = ServeConfig.model_validate(
        {
            **json.loads(config.model_dump_json()),
            "defense": {"name": "none"},
            "storage": {"database": str(tmp_path / "plain.sqlite")},
        }
    )
    with ServerThread(create_app(plain)) as url:
        monkeypatch.setenv("MIRAGE_API_KEY", key)
        result = runner.invoke(
            app,
            [
                "distil-surrogate",
                "--url",
                url,
                "--model-name",
                "users",
                "--out",
                str(tmp_path / "remote"),
                *common,
            ],
        )
        assert result.exit_code == 0, result.output
        used = httpx.get(
            f"{url}/v2/models/users", headers={"Authorization": f"Bearer {key}"}
        ).json()
    assert used["parameters"]["client"]["queries_used"] == len(data.train)
    remote, _ = load_checkpoint(tmp_path / "remote")
    assert agreement(remote, net, data.test.images) >= 0.8
    bad = runner.invoke(app, ["distil-surrogate", "--out", str(tmp_path / "x"), *common])
    assert bad.exit_code != 0 and "exactly one of --model" in bad.output
