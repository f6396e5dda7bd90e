import json

import pytest
import torch

from mirage.models import (
    MODELS,
    ModelCard,
    create_model,
    has_checkpoint,
    load_checkpoint,
    save_checkpoint,
    weights_fingerprint,
)
from mirage.registry import UnknownNameError


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
def test_architectures_map_images_to_logits(name, shape):
    model = create_model(name, shape, 7, [0.5] * shape[0], [0.25] * shape[0]).eval()
    x = torch.rand(3, *shape)
    assert model(x).shape == (3, 7)
    assert model.features(x).shape == (3, model.feature_dim)
    assert isinstance(model.classifier, torch.nn.Linear)
    assert torch.allclose(model.classifier(model.features(x)), model(x))


def test_normalisation_is_inside_the_model():
    model = create_model("lenet", (1, 28, 28), 10, [0.3], [0.5])
    x = torch.rand(2, 1, 28, 28)
    assert torch.allclose(model.normalize(x), (x - 0.3) / 0.5)


def test_unknown_architecture_and_bad_shapes():
    with pytest.raises(UnknownNameError):
        create_model("alexnet", (1, 28, 28), 10, [0.5], [0.5])
    with pytest.raises(ValueError):
        create_model("lenet", (28, 28), 10, [0.5], [0.5])
    with pytest.raises(ValueError):
        create_model("lenet", (3, 32, 32), 10, [0.5], [0.5])


@pytest.mark.parametrize("name", sorted(MODELS))
def test_checkpoint_round_trip(tmp_path, name):
    model = create_model(name, (3, 32, 32), 5, [0.1, 0.2, 0.3], [0.3, 0.3, 0.3]).eval()
    card = ModelCard(
        architecture=name,
        input_shape=(3, 32, 32),
        num_classes=5,
        mean=(0.1, 0.2, 0.3),
        std=(0.3, 0.3, 0.3),
        dataset="x",
        seed=4,
        test_accuracy=0.5,
    )
    save_checkpoint(model, card, tmp_path / "ckpt")
    assert has_checkpoint(tmp_path / "ckpt")
    loaded, loaded_card = load_checkpoint(tmp_path / "ckpt")
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(loaded(x), model(x))
    assert loaded_card.seed == 4 and loaded_card.versions["torch"] == torch.__version__
    assert json.loads((tmp_path / "ckpt" / "card.json").read_text())["architecture"] == name
    assert weights_fingerprint(loaded) == weights_fingerprint(model)


def test_fingerprint_changes_with_any_weight():
    model = create_model("lenet", (1, 28, 28), 10, [0.5], [0.5])
    before = weights_fingerprint(model)
    with torch.no_grad():
        model.classifier.bias[3] += 1e-7
    assert weights_fingerprint(model) != before and len(before) == 16


def test_incomplete_checkpoint_is_refused(tmp_path):
    model = create_model("lenet", (1, 28, 28), 10, [0.5], [0.5])
    card = ModelCard(
        architecture="lenet", input_shape=(1, 28, 28), num_classes=10, mean=(0.5,), std=(0.5,)
    )
    save_checkpoint(model, card, tmp_path / "c")
    (tmp_path / "c" / "card.json").unlink()
    assert not has_checkpoint(tmp_path / "c")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "c")
