"""``mirage.evaluate`` on anything a user brings (docs/design.md §evaluate): a module that is not
mirage's, data in every form, parameters checked before anything trains, collapsed clones flagged,
the sweeps' verdict; and the example script CI runs."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import mirage
from mirage.attacks.clone import recipe
from mirage.bench.evaluation import split_user_data
from mirage.data import ImageData, load_dataset

ROOT = Path(__file__).resolve().parents[2]
QUICK = recipe("grad2").model_copy(update={"epochs": 4})


class OneClass(nn.Module):
    """Answers class 3 for everything: every clone of it collapses."""

    def forward(self, x):
        return torch.zeros(len(x), 10).index_fill_(1, torch.tensor([3]), 5.0)


def test_parameters_are_checked_before_anything_trains(user_model):
    net, data = user_model
    for kwargs, message in (
        ({"params": {"epsilon": 5}}, "epsilon"),
        ({"params": {"epsilonn": 1}}, "no parameter"),
        ({"attackers": ("soft", "sneaky")}, "sneaky"),
        ({"defense": "grad3"}, "grad3"),
    ):
        start = time.perf_counter()
        with pytest.raises(ValueError, match=message):
            mirage.evaluate(net, data, **{"defense": "grad2", **kwargs})
        assert time.perf_counter() - start < 1.0, "refused only after training"


def test_the_users_data_splits_the_same_whatever_its_form(user_model, tmp_path):
    _, data = user_model
    images = torch.cat([data.train.images, data.test.images])
    labels = torch.cat([data.train.labels, data.test.labels])
    forms = [
        data,
        ImageData(images, labels),
        (images, labels),
        ((images * 255).round().byte().numpy(), labels.numpy()),
        torch.utils.data.TensorDataset(images, labels),
    ]
    splits = [split_user_data(form) for form in forms]
    for split in splits[1:]:
        assert torch.allclose(split.test.images, splits[0].test.images, atol=1 / 255)
        assert torch.equal(split.pool.labels, splits[0].pool.labels)
    first = splits[0]
    assert (
        len(first.test) + len(first.pool) + len(first.sample) == len(images) and first.classes == 10
    )
    assert not set(map(tuple, first.test.images.flatten(1).tolist()[:50])) & set(
        map(tuple, first.pool.images.flatten(1).tolist())
    )
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        split_user_data((images * 2, labels))


def test_a_users_module_is_judged_against_the_undefended_one(user_model):
    net, data = user_model
    report = mirage.evaluate(
        net,
        data,
        "reverse_sigmoid",
        params={"beta": 0.3},
        attackers=("soft", "hard-label"),
        budget=400,
        clone_training=QUICK,
        progress=False,
        seeds=(0,),
    )
    assert {(r["defense"], r["attacker"]) for r in report.records} == {
        (d, a) for d in ("none", "reverse_sigmoid") for a in ("soft", "hard-label")
    }
    assert all(0 <= r["clone_accuracy"] <= 1 and r["victim_accuracy"] > 0.8 for r in report.records)
    assert report.verdict["deploy"] in ("none", "reverse_sigmoid", "argmax")
    assert "yours × knockoff" in report.advice and "## Verdict" in report.report()
    protected = mirage.protect(net, "reverse_sigmoid", beta=0.3)
    with pytest.raises(ValueError, match="input_shape"):
        mirage.InProcessAPI(net)
    again = mirage.evaluate(
        protected,
        data,
        attackers=("soft",),
        budget=200,
        clone_training=QUICK,
        progress=False,
        seeds=(0,),
    )
    assert {r["defense"] for r in again.records} == {"none", "reverse_sigmoid"}


def test_a_collapsed_clone_is_flagged_never_counted_as_protection():
    data = load_dataset("digits")
    report = mirage.evaluate(
        OneClass(),
        data,
        attackers=("soft",),
        budget=200,
        clone_training=QUICK,
        progress=False,
        seeds=(0,),
    )
    assert report.failed and all(r["clone_collapsed"] for r in report.failed)
    assert report.verdict["deploy"] == "none" and "collapsed" in report.report()


@pytest.mark.slow
def test_the_example_runs_as_ci_runs_it(run_example):
    """examples/evaluate_your_model.py --quick: a user's CNN on an image folder of Fashion-MNIST
    PNGs, GRAD² unlearn-top1 from the user's data, three attackers, the verdict printed."""
    stdout = run_example("evaluate_your_model.py", "--quick")
    assert "## Verdict" in stdout and "yours × knockoff" in stdout
    assert np.isfinite(float(stdout.rsplit("done in ", 1)[1].split()[0]))


@pytest.mark.slow
def test_the_command_evaluates_a_model_file_on_an_image_folder(user_model, tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from mirage.cli import app

    net, data = user_model
    for i, (image, label) in enumerate(
        zip(data.test.images[:300], data.test.labels[:300], strict=True)
    ):
        folder = tmp_path / "data" / f"digit-{int(label)}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image[0] * 255).round().byte().numpy(), mode="L").save(folder / f"{i}.png")
    exported = tmp_path / "net.pt2"
    torch.export.save(
        torch.export.export(
            net,
            (data.test.images[:2],),
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
        ),
        str(exported),
    )
    result = CliRunner().invoke(
        app,
        [
            "evaluate",
            "--seeds",
            "0",
            "--model",
            str(exported),
            "--data",
            str(tmp_path / "data"),
            "--defense",
            "reverse_sigmoid",
            "-p",
            "beta=0.3",
            "--attackers",
            "soft",
            "--budget",
            "150",
            "--report",
            str(tmp_path / "report.md"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert (
        "## Verdict" in (tmp_path / "report.md").read_text() and "yours × knockoff" in result.output
    )


@pytest.mark.slow
def test_a_served_endpoint_is_judged_black_box_against_its_baseline(
    user_model, tmp_path, monkeypatch
):
    """``mirage evaluate --url``: a running ``mirage serve`` (reverse sigmoid, disclosed) judged
    through its API, every query charged to the key, with the model file as the baseline."""
    from typer.testing import CliRunner

    from mirage.cli import app
    from mirage.serve.app import create_app
    from mirage.serve.auth import hash_key
    from mirage.serve.config import ServeConfig
    from mirage.serve.runner import ServerThread

    net, data = user_model
    exported = tmp_path / "net.pt2"
    torch.export.save(
        torch.export.export(
            net,
            (data.test.images[:2],),
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
        ),
        str(exported),
    )
    from PIL import Image

    for i, (image, label) in enumerate(
        zip(data.test.images[:300], data.test.labels[:300], strict=True)
    ):
        folder = tmp_path / "data" / f"digit-{int(label)}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image[0] * 255).round().byte().numpy(), mode="L").save(folder / f"{i}.png")
    key = "mk_evaluate_endpoint"
    config = ServeConfig.model_validate(
        {
            "model": {"name": "users", "path": str(exported)},
            "defense": {"name": "reverse_sigmoid", "params": {"beta": 0.3}},
            "access": {"disclose_defense": True},
            "storage": {"database": str(tmp_path / "serve.sqlite")},
            "clients": [{"name": "alice", "key_sha256": hash_key(key)}],
        }
    )
    monkeypatch.setenv("MIRAGE_API_KEY", key)
    with ServerThread(create_app(config)) as url:
        result = CliRunner().invoke(
            app,
            [
                "evaluate",
                "--seeds",
                "0",
                "--url",
                url,
                "--model-name",
                "users",
                "--model",
                str(exported),
                "--data",
                str(tmp_path / "data"),
                "--attackers",
                "soft,restorer",
                "--budget",
                "100",
                "--report",
                str(tmp_path / "report.md"),
            ],
        )
        assert result.exit_code == 0, result.output
        from mirage.serve import HTTPPredictionAPI

        with HTTPPredictionAPI(url, "users", key) as api:
            used = api.queries_used
    report = (tmp_path / "report.md").read_text()
    assert "| reverse_sigmoid | soft |" in report and "| none | restorer |" in report
    assert used == 60 + 2 * 100  # the defender's test set (20 % of 300) and two attackers
    hidden = ServeConfig.model_validate(
        {
            **config.model_dump(mode="json"),
            "access": {"disclose_defense": False},
            "storage": {"database": str(tmp_path / "hidden.sqlite")},
        }
    )
    with ServerThread(create_app(hidden)) as url, HTTPPredictionAPI(url, "users", key) as api:
        with pytest.raises(ValueError, match="does not disclose"):
            mirage.evaluate(api, data, attackers=("restorer",))
        assert api.queries_used == 0  # refused before a single query


def test_an_out_of_distribution_attacker_brings_its_own_pool(user_model, tmp_path):
    """``pool``: the attacker queries its own unlabelled images (here the MNIST-like digits turned
    upside down, as a .npy file) instead of the user's in-distribution share."""
    net, data = user_model
    flipped = data.train.images.flip(2)[:300]
    np.save(tmp_path / "pool.npy", flipped.numpy())
    report = mirage.evaluate(
        net,
        data,
        attackers=("soft", "aligned"),
        budget=150,
        clone_training=QUICK,
        progress=False,
        pool=tmp_path / "pool.npy",
        seeds=(0,),
    )
    assert {r["attacker"] for r in report.records} == {"soft", "aligned"}
    assert all(r["queries"] <= 150 for r in report.records)
    with pytest.raises(ValueError, match="images"):
        mirage.evaluate(net, data, attackers=("soft",), pool=torch.rand(10, 3, 8, 8))
    with pytest.raises(ValueError, match="unlabelled pool"):
        mirage.evaluate(net, data, attack="knockoff-adaptive", attackers=("soft",), pool=flipped)
