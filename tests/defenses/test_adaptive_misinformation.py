"""Adaptive Misinformation and its victim-side training (outlier exposure, misinformation model)
on scikit-learn's 8×8 digits: in-distribution = digits 0–4, OE outliers = 5–7, unseen OOD = 8–9."""

import pytest
import torch

from mirage.data import load_dataset
from mirage.defenses import create_defense
from mirage.models.fit import TrainConfig
from mirage.training.outlier_exposure import (
    max_softmax,
    misinformation_loss,
    outlier_exposure_loss,
    train_misinformation,
    train_outlier_exposure,
)

CONFIG = TrainConfig(
    epochs=10, batch_size=64, optimizer="adam", lr=3e-3, weight_decay=0, schedule="constant", seed=0
)


def auroc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """P(score of a random positive > score of a random negative), ties count half."""
    diff = positive.unsqueeze(1) - negative.unsqueeze(0)
    return float((diff > 0).double().mean() + 0.5 * (diff == 0).double().mean())


@pytest.fixture(scope="module")
def digits():
    data = load_dataset("digits")
    pick = lambda split, lo, hi: split.images[(split.labels >= lo) & (split.labels <= hi)]
    inside = data.train.labels <= 4
    return {
        "train_x": data.train.images[inside],
        "train_y": data.train.labels[inside],
        "test_in": pick(data.test, 0, 4),
        "test_y": data.test.labels[data.test.labels <= 4],
        "outliers": pick(data.train, 5, 7),
        "test_out": pick(data.test, 8, 9),
    }


def mlp(seed: int) -> torch.nn.Module:
    """Any classifier works for both roles; a small MLP keeps the test fast."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 5)
    )


@pytest.fixture(scope="module")
def models(digits):
    oe, plain, mis = mlp(0), mlp(0), mlp(1)
    train_outlier_exposure(
        oe, digits["train_x"], digits["train_y"], digits["outliers"], CONFIG, show_progress=False
    )
    train_outlier_exposure(
        plain,
        digits["train_x"],
        digits["train_y"],
        digits["outliers"],
        CONFIG,
        weight=0.0,
        show_progress=False,
    )
    train_misinformation(mis, digits["train_x"], digits["train_y"], CONFIG, show_progress=False)
    return oe, plain, mis


def test_losses_match_their_definitions():
    logits = torch.randn(6, 5, dtype=torch.float64)
    labels = torch.randint(0, 5, (6,))
    p = torch.softmax(logits, 1)
    expected = -torch.log(1 - p[torch.arange(6), labels]).mean()
    torch.testing.assert_close(misinformation_loss(logits, labels), expected)
    out = torch.randn(4, 5, dtype=torch.float64)
    uniform_ce = (
        -(torch.full((4, 5), 0.2, dtype=torch.float64) * torch.log_softmax(out, 1)).sum(1).mean()
        / 0.2
        / 5
    )
    torch.testing.assert_close(
        outlier_exposure_loss(logits, labels, out, 0.5),
        torch.nn.functional.cross_entropy(logits, labels) + 0.5 * uniform_ce,
    )


def test_outlier_exposure_separates_unseen_ood_and_keeps_accuracy(digits, models):
    oe, plain, _ = models
    accuracy = (oe(digits["test_in"]).argmax(1) == digits["test_y"]).double().mean()
    assert accuracy > 0.9
    s_in, s_out = max_softmax(oe, digits["test_in"]), max_softmax(oe, digits["test_out"])
    assert auroc(s_in, s_out) > 0.85
    assert auroc(s_in, s_out) > auroc(
        max_softmax(plain, digits["test_in"]), max_softmax(plain, digits["test_out"])
    )


def test_misinformation_model_avoids_the_true_class(digits, models):
    _, _, mis = models
    p = torch.softmax(mis(digits["test_in"]), 1)
    assert p[torch.arange(len(p)), digits["test_y"]].mean() < 0.05
    assert (p.argmax(1) == digits["test_y"]).double().mean() < 0.05


def test_defense_is_the_sigmoid_mix_of_victim_and_misinformation(digits, models):
    oe, _, mis = models
    x = torch.cat([digits["test_in"][:20], digits["test_out"][:20]])
    with torch.no_grad():
        y = torch.softmax(oe(x), 1)
        s = torch.softmax(oe(x), 1).max(1).values.double()
        y_mis = torch.softmax(mis(x), 1).double()
    tau, nu = 0.9, 50.0
    alpha = 1 / (1 + torch.exp(-nu * (tau - s)))
    expected = (1 - alpha).unsqueeze(1) * y.double() + alpha.unsqueeze(1) * y_mis
    defense = create_defense(
        "adaptive_misinformation", oe_model=oe, misinformation_model=mis, tau=tau, nu=nu
    )
    served = defense(x, y)
    torch.testing.assert_close(served, expected.float())
    # In-distribution answers are mostly kept, OOD answers mostly replaced.
    kept = (served.argmax(1) == y.argmax(1)).double()
    assert kept[:20].mean() > kept[20:].mean()


def test_needs_both_models():
    with pytest.raises(ValueError):
        create_defense("adaptive_misinformation", oe_model=mlp(0))
