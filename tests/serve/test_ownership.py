"""Ownership end to end: a real `mirage serve` with a per-client keyed watermark, two
thieves who extract hard-label clones over HTTP with their own code (httpx and a plain torch
loop, no mirage attack class), save them with torch.export, and `mirage verify` names each
thief's key and nobody else's."""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from conftest import KEYS, ServerProcess, auth, body, make_config
from pydantic import ValidationError
from torch import nn
from typer.testing import CliRunner

from mirage.cli import app
from mirage.data import load_dataset
from mirage.models import load_checkpoint
from mirage.models.base import clean_posteriors
from mirage.ownership import EvidenceStore, KeyedWatermark, WatermarkConfig, derive_key
from mirage.serve.config import ServeConfig
from mirage.serve.service import Service

SECRET = b"a-test-secret-of-32-bytes-000000"
WATERMARK = {"bucket_fraction": 0.5, "margin": 0.1}


def ownership_config(tmp_path, checkpoints, **overrides) -> ServeConfig:
    (tmp_path / "secret").write_bytes(SECRET + b"\n")
    config = make_config(
        tmp_path,
        checkpoints,
        clients=[{"name": "alice", "quota": 100_000}, {"name": "bob", "quota": 100_000}],
    )
    ownership = {
        "secret_env": None,
        "secret_file": str(tmp_path / "secret"),
        "evidence": str(tmp_path / "evidence.sqlite"),
        "watermark": WATERMARK,
        **overrides,
    }
    return ServeConfig.model_validate({**config.model_dump(mode="json"), "ownership": ownership})


def steal_over_http(url: str, client: str, images: torch.Tensor) -> torch.Tensor:
    """The thief's own extraction: hard labels (argmax) of every image, 64 per request."""
    labels = []
    with httpx.Client(base_url=url, headers=auth(client), timeout=30) as http:
        for chunk in images.split(64):
            reply = http.post("/v2/models/digits/infer", json=body(chunk))
            reply.raise_for_status()
            out = reply.json()["outputs"][0]
            labels.append(torch.tensor(out["data"]).view(out["shape"]).argmax(1))
    return torch.cat(labels)


class ThiefNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))

    def forward(self, x):
        return self.net(x)


def train_thief(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, epochs: int
) -> nn.Module:
    """The thief's own training loop: Adam on the stolen hard labels."""
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for index in torch.randperm(len(images)).split(128):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(images[index]), labels[index]).backward()
            optimizer.step()
    return model.eval()


def train_and_export(images: torch.Tensor, labels: torch.Tensor, path, seed: int) -> None:
    torch.manual_seed(seed)
    model = train_thief(ThiefNet(), images, labels, epochs=150)
    program = torch.export.export(
        model, (images[:2],), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},)
    )
    torch.export.save(program, str(path))


def verify(config_path, suspect, *extra: str) -> dict[str, dict]:
    result = CliRunner().invoke(
        app, ["verify", "--config", str(config_path), "--suspect", str(suspect), "--json", *extra]
    )
    assert result.exit_code == 0, result.output
    return {t["client"]: t for t in json.loads(result.output)}


class Memorised(nn.Module):
    """A suspect that answers each of ``images`` with its row of ``answers`` (nearest image)."""

    def __init__(self, answers: torch.Tensor, images: torch.Tensor) -> None:
        super().__init__()
        self.answers, self.images = answers, images

    def forward(self, x):
        return (
            self.answers[torch.cdist(x.flatten(1), self.images.flatten(1)).argmin(1)]
            .clamp_min(1e-6)
            .log()
        )


def answers_in_process(
    config: ServeConfig, images: torch.Tensor, client: str = "alice"
) -> torch.Tensor:
    """``client``'s answers to ``images`` from the real app in process, 64 images per request."""
    from fastapi.testclient import TestClient

    from mirage.serve.app import create_app

    answers = []
    with TestClient(create_app(config)) as http:
        for chunk in images.split(64):
            reply = http.post("/v2/models/digits/infer", json=body(chunk), headers=auth(client))
            assert reply.status_code == 200, reply.text
            answers.append(torch.tensor(reply.json()["outputs"][0]["data"]).view(len(chunk), 10))
    return torch.cat(answers)


@pytest.mark.slow
def test_verify_names_the_key_each_hard_label_clone_was_stolen_through(tmp_path, checkpoints):
    config = ownership_config(tmp_path, checkpoints)
    server = ServerProcess(config, tmp_path).start()
    images = load_dataset("digits").train.images.float()
    try:
        stolen = {
            client: steal_over_http(server.url, client, images) for client in ("alice", "bob")
        }
    finally:
        server.kill()
    for seed, client in enumerate(stolen):
        train_and_export(images, stolen[client], tmp_path / f"{client}.pt2", seed)

    store = EvidenceStore(tmp_path / "evidence.sqlite")
    assert store.clients() == ["alice", "bob"]
    store.close()
    for thief, other in (("alice", "bob"), ("bob", "alice")):
        tests = verify(server.path, tmp_path / f"{thief}.pt2")
        assert tests[thief]["named"] and tests[thief]["p_value"] < 1e-6, tests
        assert not tests[other]["named"], tests
    # the victim itself never learnt any key's labels
    innocent = verify(server.path, checkpoints["victim"])
    assert not any(t["named"] for t in innocent.values()), innocent


def test_the_secret_never_comes_from_the_config_and_must_exist(tmp_path, checkpoints):
    config = ownership_config(tmp_path, checkpoints)
    raw = config.model_dump(mode="json")
    with pytest.raises(ValidationError, match="secret"):
        ServeConfig.model_validate(
            {**raw, "ownership": {**raw["ownership"], "secret": "in-plain-text"}}
        )
    (tmp_path / "secret").write_bytes(b"short")
    with pytest.raises(ValueError, match="shorter than 16 bytes"):
        Service(config)
    missing = ServeConfig.model_validate(
        {
            **raw,
            "ownership": {
                **raw["ownership"],
                "secret_file": None,
                "secret_env": "MIRAGE_TEST_NO_SUCH_SECRET",
            },
        }
    )
    with pytest.raises(ValueError, match="MIRAGE_TEST_NO_SUCH_SECRET"):
        Service(missing)


def test_served_answers_carry_each_clients_own_watermark(tmp_path, checkpoints):
    """In process: alice's and bob's answers to the same images differ exactly on their own carried
    rows, where the top-1 is their own keyed label; nothing else changes and the key is not
    shown."""
    from fastapi.testclient import TestClient

    from mirage.serve.app import create_app

    config = ownership_config(
        tmp_path, checkpoints, watermark={"bucket_fraction": 1.0, "margin": 0.1}
    )
    images = load_dataset("digits").train.images[:64].float()
    with TestClient(create_app(config)) as http:
        answers = {}
        for client in ("alice", "bob"):
            reply = http.post("/v2/models/digits/infer", json=body(images), headers=auth(client))
            assert reply.status_code == 200, reply.text
            answers[client] = torch.tensor(reply.json()["outputs"][0]["data"]).view(64, 10)
        metadata = http.get("/v2/models/digits", headers=auth("alice")).text
    assert SECRET.decode() not in metadata and KEYS["alice"] not in metadata
    marks = {
        c: KeyedWatermark(
            derive_key(SECRET, c), 10, WatermarkConfig(bucket_fraction=1.0, margin=0.1)
        ).marks(images)
        for c in answers
    }
    for client, other in (("alice", "bob"), ("bob", "alice")):
        own = marks[client].carried & ~marks[other].carried
        assert own.any()
        assert torch.equal(answers[client][own].argmax(1), marks[client].labels[own])
    neither = ~marks["alice"].carried & ~marks["bob"].carried
    assert torch.allclose(answers["alice"][neither], answers["bob"][neither])


def test_served_keyed_ranks_put_the_victims_jth_class_on_top_and_verify_from_the_store(
    tmp_path, checkpoints
):
    """Keyed ranks near ties (ranked, tie_gap) through the service: each carried answer's top-1 is
    the victim's j-th class, the store keeps the victim's ranking, and a model that learnt the
    served answers is named from the store alone, while the victim itself is not."""

    from mirage.ownership import name_the_thief

    watermark = {"bucket_fraction": 1.0, "margin": 0.05, "ranked": 3, "tie_gap": 0.9}
    config = ownership_config(tmp_path, checkpoints, watermark=watermark)
    images = load_dataset("digits").test.images[:256].float()
    served = answers_in_process(config, images)
    victim, _ = load_checkpoint(checkpoints["victim"])
    clean = clean_posteriors(victim, images)
    watermark_of = {
        c: KeyedWatermark(derive_key(SECRET, c), 10, WatermarkConfig(**watermark))
        for c in ("alice", "bob")
    }
    marks = watermark_of["alice"].marks(images, clean)
    assert 5 < marks.carried.sum() < len(images)
    order = clean.argsort(dim=1, descending=True)
    for row in torch.nonzero(marks.carried).flatten().tolist():
        j = 1 + watermark_of["alice"].label_of(marks.buckets[row])
        assert served[row].argmax() == order[row, j]
    store = EvidenceStore(config.ownership.evidence)
    kept, _, ranking = store.items("alice")
    rows = torch.cdist(kept.flatten(1), images.flatten(1)).argmin(1)
    assert torch.equal(ranking, order[rows])

    tests = {
        t.client: t
        for t in name_the_thief(Memorised(served, images), store, watermark_of, alpha=1e-3)
    }
    assert tests["alice"].named and tests["alice"].p_value <= 2.0 ** -tests["alice"].buckets + 1e-12
    assert not tests["bob"].named
    assert not any(
        t.named for t in name_the_thief(Memorised(clean, images), store, watermark_of, alpha=1e-3)
    )
    store.close()


@pytest.mark.parametrize("fmt", ["export", "export-static", "onnx", "checkpoint"])
@pytest.mark.slow
def test_verify_reads_the_suspect_in_the_thiefs_format(tmp_path, checkpoints, fmt):
    """The evidence a served watermark leaves (written through the service's own store), a clone
    that learnt alice's answers saved as .pt2 (also with torch.export's default static batch of
    one), ONNX or a mirage checkpoint: `mirage verify` names alice from each."""
    from mirage.defenses import create_defense
    from mirage.models import ModelCard, create_model, save_checkpoint

    config = ownership_config(
        tmp_path, checkpoints, watermark={"bucket_fraction": 1.0, "margin": 0.1}
    )
    config_path = tmp_path / "serve.json"
    config_path.write_text(json.dumps(config.model_dump(mode="json")))
    digits = load_dataset("digits").train
    images = digits.images.float()
    clean = torch.nn.functional.one_hot(digits.labels, 10) * 0.9 + 0.01  # a good victim
    store = EvidenceStore(tmp_path / "evidence.sqlite")
    defense = create_defense(
        "watermarked",
        key=derive_key(SECRET, "alice"),
        client="alice",
        config=config.ownership.watermark,
        evidence=store,
    )
    labels = defense(images, clean).argmax(1)  # alice's answers
    store.close()
    torch.manual_seed(0)
    model = train_thief(
        create_model("lenet", (1, 8, 8), 10, (0.3,), (0.3,)), images, labels, epochs=60
    )
    example = (images[:2],)
    batch = torch.export.Dim("batch", min=1, max=4096)
    if fmt == "export":
        suspect = tmp_path / "clone.pt2"
        torch.export.save(
            torch.export.export(model, example, dynamic_shapes=({0: batch},)), str(suspect)
        )
    elif (
        fmt == "export-static"
    ):  # what torch.export.export(model, (torch.zeros(1, 1, 8, 8),)) gives
        suspect = tmp_path / "clone-static.pt2"
        torch.export.save(torch.export.export(model, (torch.zeros(1, 1, 8, 8),)), str(suspect))
    elif fmt == "onnx":
        pytest.importorskip("onnxscript")
        suspect = tmp_path / "clone.onnx"
        torch.onnx.export(
            model,
            example,
            str(suspect),
            input_names=["images"],
            dynamic_shapes=({0: batch},),
            dynamo=True,
            verbose=False,
        )
    else:
        card = ModelCard(
            architecture="lenet",
            input_shape=(1, 8, 8),
            num_classes=10,
            mean=(0.3,),
            std=(0.3,),
            dataset="digits",
            seed=0,
        )
        suspect = save_checkpoint(model, card, tmp_path / "clone")
    tests = verify(config_path, suspect)
    assert tests["alice"]["named"] and not tests["bob"]["named"], tests
    if fmt == "checkpoint":  # a group test: one more test, on alice's and bob's pooled evidence
        grouped = verify(config_path, suspect, "--group", "alice,bob")
        assert (
            set(grouped) == {"alice", "bob", "alice,bob"}
            and grouped["alice,bob"]["images"] == tests["alice"]["images"]
        )
        assert grouped["alice"]["corrected_p_value"] == pytest.approx(
            min(1.0, 3 * tests["alice"]["p_value"])
        )
        bad = CliRunner().invoke(
            app,
            [
                "verify",
                "--config",
                str(config_path),
                "--suspect",
                str(suspect),
                "--group",
                "alice,mallory",
            ],
        )
        assert bad.exit_code != 0 and "known clients" in bad.output
    bad = CliRunner().invoke(
        app, ["verify", "--config", str(config_path), "--suspect", str(tmp_path / "nope.onnx")]
    )
    assert bad.exit_code != 0 and "cannot load the suspect" in bad.output


def test_served_watermark_stays_out_of_the_reference_datasets_dense_buckets(tmp_path, checkpoints):
    """With ``density_cap`` and ``reference``, the service's answers carry exactly the rows a
    watermark built on the reference dataset's training images selects: none in a dense bucket."""
    from fastapi.testclient import TestClient

    from mirage.serve.app import create_app

    watermark = {"bucket_fraction": 1.0, "margin": 0.1, "density_cap": 0.002}
    config = ownership_config(tmp_path, checkpoints, watermark=watermark, reference="digits")
    images = load_dataset("digits").test.images[:64].float()
    with TestClient(create_app(config)) as http:
        reply = http.post("/v2/models/digits/infer", json=body(images), headers=auth("alice"))
    assert reply.status_code == 200, reply.text
    served = torch.tensor(reply.json()["outputs"][0]["data"]).view(64, 10)
    key = derive_key(SECRET, "alice")
    capped = KeyedWatermark(
        key, 10, WatermarkConfig(**watermark), load_dataset("digits").train.images
    )
    uncapped = KeyedWatermark(key, 10, WatermarkConfig(**{**watermark, "density_cap": None})).marks(
        images
    )
    marks = capped.marks(images)
    removed = uncapped.carried & ~marks.carried
    assert removed.any() and marks.carried.any()  # the cap takes some rows away, not all
    assert torch.equal(served[marks.carried].argmax(1), marks.labels[marks.carried])
    # every row it does not carry, those the cap took away included, is the victim's own answer
    victim, _ = load_checkpoint(checkpoints["victim"])
    clean = clean_posteriors(victim, images)
    assert torch.allclose(served[~marks.carried], clean[~marks.carried], atol=1e-5)


def test_layered_watermark_is_served_recorded_per_layer_and_verified(tmp_path, checkpoints):
    """``watermark`` as an array of tables: the service answers through both layers (a top-1 layer
    under a keyed runner-up), keeps each layer's evidence apart (``alice``, ``alice#1``), and
    `mirage verify` tests every layer of every client (corrected for all of them), and ``--group``
    pools layer by layer."""

    from mirage.ownership import layered_watermarks

    layers = [
        {"bucket_fraction": 0.5, "margin": 0.1},
        {"buckets": "answer", "bucket_fraction": 1.0, "place": "second"},
    ]  # the test victim is unsure
    config = ownership_config(tmp_path, checkpoints, watermark=layers)
    assert len(config.ownership.watermark) == 2
    config_path = tmp_path / "serve.json"
    config_path.write_text(json.dumps(config.model_dump(mode="json")))
    images = load_dataset("digits").train.images.float()
    served = answers_in_process(config, images)
    victim, _ = load_checkpoint(checkpoints["victim"])
    expected = clean_posteriors(victim, images)
    for watermark in layered_watermarks(
        derive_key(SECRET, "alice"), "alice", config.ownership.watermark, 10
    ).values():
        expected = watermark.apply(images, expected)[0]
    assert torch.allclose(served, expected, atol=1e-5)
    store = EvidenceStore(config.ownership.evidence)
    assert store.clients() == ["alice", "alice#1"]
    store.close()
    # a model that learnt alice's answers is named through each layer, bob through none
    from mirage.ownership import name_the_thief

    watermarks = {
        name: w
        for c in ("alice", "bob")
        for name, w in layered_watermarks(
            derive_key(SECRET, c), c, config.ownership.watermark, 10
        ).items()
    }
    store = EvidenceStore(config.ownership.evidence)
    tests = {t.client: t for t in name_the_thief(Memorised(served, images), store, watermarks)}
    store.close()
    assert (
        tests["alice"].named
        and tests["alice#1"].named
        and tests["alice#1"].images > tests["alice"].images
    )
    assert not any(tests[c].named for c in ("bob", "bob#1"))
    # `mirage verify` tests every layer of every client, and --group pools layer by layer
    innocent = verify(config_path, checkpoints["victim"])
    assert set(innocent) == {"alice", "alice#1", "bob", "bob#1"}
    assert not any(t["named"] for t in innocent.values()), innocent
    assert innocent["alice#1"]["corrected_p_value"] == pytest.approx(
        min(1.0, 4 * innocent["alice#1"]["p_value"])
    )
    grouped = verify(config_path, checkpoints["victim"], "--group", "alice,bob")
    assert set(grouped) == set(innocent) | {"alice,bob", "alice#1,bob#1"}


@pytest.mark.slow
def test_the_serve_and_verify_example_runs_as_ci_runs_it(run_example):
    """examples/serve_and_verify.py: your exported model served with [ownership], a thief's
    clone over HTTP named by mirage verify through its own key only, an innocent named by none."""
    lines = run_example("serve_and_verify.py").splitlines()
    assert any(line.startswith("alice's clone: named ['alice']") for line in lines), lines
    assert any(line.startswith("a model of the true labels: named nobody") for line in lines), lines
