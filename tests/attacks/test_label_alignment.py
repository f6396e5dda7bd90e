"""The label-aligning attacker: the class assignment against brute force over all permutations,
the realignment against its definition, and the attack undoing a consistent relabelling."""

import itertools

import pytest
import torch

from mirage.api import InProcessAPI, accuracy
from mirage.attacks import create_attack, variant_params
from mirage.attacks.alignment import class_alignment, realign
from mirage.data import ImageData
from mirage.defenses import create_defense


class FixedPredictions(torch.nn.Module):
    """A 'model' whose argmax on image i is predictions[i] (the image's first pixel holds i)."""

    def __init__(self, predictions, num_classes):
        super().__init__()
        self.predictions, self.num_classes = predictions, num_classes

    def forward(self, x):
        index = x[:, 0, 0, 0].long()
        return torch.nn.functional.one_hot(self.predictions[index], self.num_classes).float()


@pytest.mark.parametrize("seed", range(5))
def test_the_alignment_is_the_best_permutation_by_brute_force(seed):
    generator = torch.Generator().manual_seed(seed)
    k, n = 4, 40
    labels = torch.randint(0, k, (n,), generator=generator)
    predicted = torch.randint(0, k, (n,), generator=generator)
    images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    sigma = class_alignment(FixedPredictions(predicted, k), ImageData(images, labels), k)
    assert sorted(sigma.tolist()) == list(range(k))
    best = max(
        (sum(int((labels[predicted == a] == perm[a]).sum()) for a in range(k)), perm)
        for perm in itertools.permutations(range(k))
    )
    assert sum(int((labels[predicted == a] == sigma[a]).sum()) for a in range(k)) == best[0]


def test_realign_moves_class_a_to_sigma_a():
    answers = torch.softmax(torch.randn(6, 5, generator=torch.Generator().manual_seed(0)), 1)
    sigma = torch.tensor([2, 0, 1, 4, 3])
    moved = realign(answers, sigma)
    for a in range(5):
        torch.testing.assert_close(moved[:, sigma[a]], answers[:, a])


@pytest.mark.slow
def test_the_aligned_attacker_undoes_a_permuting_defense(victim, digits, clone_spec):
    # every query flagged: the served answer is the victim's posterior under a keyed derangement
    permuting = create_defense(
        "grad2_gated",
        tau=float("inf"),
        epsilon_low=0.0,
        epsilon_high=2.0,
        target="random",
        surrogate=victim,
        attacker_answer="permute",
        seed=3,
    )
    labelled = digits.train.sample(100, 11)
    spec = clone_spec.model_copy(
        update={"training": clone_spec.training.model_copy(update={"epochs": 8})}
    )
    results = {}
    for name, params in (
        ("soft", {}),
        ("aligned", {"align_labels": 100}),
    ):  # the mechanism, with CE
        attack = create_attack("knockoff", **params)
        results[name] = attack.run(
            InProcessAPI(victim, permuting), 600, digits.train, spec, seed=0, labelled=labelled
        )
    plain, aligned = (accuracy(results[n].clone, digits.test) for n in ("soft", "aligned"))
    assert plain < 0.2 and aligned > 0.6, (plain, aligned)
    assert (
        results["aligned"].queries == results["soft"].queries == 600
    )  # the labelled images cost nothing
    assert variant_params("aligned") == {"align_labels": 100, "robust_loss": "gce"}
    with pytest.raises(ValueError, match="align_labels=100 needs"):
        create_attack("knockoff", variant="aligned").run(
            InProcessAPI(victim), 50, digits.train, spec
        )


@pytest.mark.slow
def test_against_an_honest_api_the_alignment_is_the_identity_and_changes_nothing(
    victim, digits, clone_spec
):
    spec = clone_spec.model_copy(
        update={"training": clone_spec.training.model_copy(update={"epochs": 8})}
    )
    labelled = digits.train.sample(100, 11)
    plain = create_attack("knockoff").run(InProcessAPI(victim), 600, digits.train, spec, seed=0)
    aligned = create_attack("knockoff", align_labels=100).run(
        InProcessAPI(victim), 600, digits.train, spec, seed=0, labelled=labelled
    )
    assert accuracy(aligned.clone, digits.test) == accuracy(plain.clone, digits.test)
