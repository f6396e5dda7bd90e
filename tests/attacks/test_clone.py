"""Clone training: truncated answers are renormalised, clones are built deterministically."""

import pytest
import torch

from mirage.attacks import CloneSpec, train_clone, training_targets
from mirage.attacks.clone import recipe
from mirage.models import ModelCard
from mirage.models.fit import MAD_RECIPE, fit
from mirage.registry import UnknownNameError


def test_truncated_rows_are_renormalised_and_zero_rows_become_uniform():
    answers = torch.tensor(
        [
            [0.5, 0.2, 0.0, 0.0],
            [0.0, 0.0, 0.0, 0.0],
            [0.25, 0.25, 0.25, 0.25],
            [0.6, -1e-9, 0.3, 0.0],
        ]
    )
    targets = training_targets(answers)
    assert torch.allclose(targets.sum(1), torch.ones(4))
    assert torch.allclose(targets[0], torch.tensor([5 / 7, 2 / 7, 0, 0]))
    assert torch.allclose(targets[1], torch.full((4,), 0.25))
    assert torch.equal(targets[2], answers[2])
    assert (targets >= 0).all()
    with pytest.raises(ValueError):
        training_targets(torch.tensor([[float("nan"), 1.0]]))


def test_clone_spec_builds_deterministically_without_touching_the_global_rng():
    spec = CloneSpec(mean=(0.3,), std=(0.4,))
    state = torch.random.get_rng_state()
    a, b = spec.build((1, 8, 8), 10), spec.build((1, 8, 8), 10)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    other = spec.model_copy(update={"training": spec.training.model_copy(update={"seed": 1})})
    assert not torch.equal(next(other.build((1, 8, 8), 10).parameters()), next(a.parameters()))


def test_like_copies_the_victims_architecture_and_recipes_resolve():
    card = ModelCard(
        architecture="vgg",
        input_shape=(3, 8, 8),
        num_classes=5,
        mean=(0.1, 0.2, 0.3),
        std=(0.5, 0.5, 0.5),
    )
    spec = CloneSpec.like(card, training="mad")
    assert (
        spec.architecture == "vgg" and spec.mean == (0.1, 0.2, 0.3) and spec.training == MAD_RECIPE
    )
    assert recipe("grad2").nesterov
    with pytest.raises(UnknownNameError):
        recipe("sgd-please")


def test_train_clone_fits_the_renormalised_answers(digits):
    """Training on truncated rows (sum < 1) is exactly training on their renormalised rows."""
    x = digits.train.images[:96]
    truncated = torch.softmax(torch.randn(96, 10), 1)
    truncated = truncated * (
        truncated >= truncated.topk(2, 1).values[:, 1:]
    )  # top-2 kept, no renorm
    spec = CloneSpec(
        mean=digits.mean, std=digits.std, training=MAD_RECIPE.model_copy(update={"epochs": 2})
    )
    model, _ = train_clone(spec, x, truncated, 10, show_progress=False)
    reference = spec.build(x.shape[1:], 10)
    fit(
        reference, x, truncated / truncated.sum(1, keepdim=True), spec.training, show_progress=False
    )
    assert all(
        torch.allclose(p, q, atol=1e-6)
        for p, q in zip(model.parameters(), reference.parameters(), strict=True)
    )


def test_restarts_keep_the_clone_that_fits_the_transfer_set_best(digits):
    from mirage.attacks.clone import transfer_loss

    x, y = digits.train.images[:128], digits.train.labels[:128]
    answers = torch.nn.functional.one_hot(y, 10).float() * 0.9 + 0.01
    spec = CloneSpec(
        mean=digits.mean, std=digits.std, training=MAD_RECIPE.model_copy(update={"epochs": 1})
    )
    losses = []
    for seed in range(3):  # the same three runs, one by one
        single = spec.model_copy(
            update={"training": spec.training.model_copy(update={"seed": seed})}
        )
        model, _ = train_clone(single, x, answers, 10, show_progress=False)
        losses.append(transfer_loss(model, x, training_targets(answers)))
    model, stats = train_clone(
        spec.model_copy(update={"restarts": 3}), x, answers, 10, show_progress=False
    )
    assert stats["restart"] == min(range(3), key=losses.__getitem__)
    assert stats["transfer_loss"] == pytest.approx(min(losses))
    assert transfer_loss(model, x, training_targets(answers)) == pytest.approx(min(losses))
