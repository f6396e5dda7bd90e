"""JBDA family: augmentation stays in [0, 1], batched steps equal a per-image autograd loop, the
step's sign flips every τ rounds, and each variant uses the label it says."""

import pytest
import torch
import torch.nn.functional as F

from mirage.api import InProcessAPI
from mirage.attacks import create_attack
from mirage.attacks.jbda import jacobian_step, step_size, targeted_pgd, top_other_classes


def extreme_images(n=12):
    x = torch.rand(n, 1, 8, 8)
    x[: n // 3] = 0.0
    x[n // 3 : 2 * n // 3] = 1.0
    return x


def test_step_sign_flips_every_tau_rounds():
    assert [step_size(0.1, 5, r) for r in range(12)] == [0.1] * 5 + [-0.1] * 5 + [0.1] * 2
    assert [step_size(0.1, None, r) for r in range(3)] == [0.1] * 3


@pytest.mark.parametrize("lam", [0.1, -0.1, 0.7])
def test_jacobian_step_matches_per_image_autograd_and_stays_in_range(lam, victim):
    x, labels = extreme_images(), torch.arange(12) % 10
    batched = jacobian_step(victim, x, labels, lam, batch_size=5)
    for i in range(len(x)):
        xi = x[i : i + 1].clone().requires_grad_(True)
        F.cross_entropy(victim(xi), labels[i : i + 1]).backward()
        assert torch.equal(batched[i], (x[i] + lam * xi.grad[0].sign()).clamp(0, 1))
    assert batched.min() >= 0 and batched.max() <= 1


@pytest.mark.parametrize("radius", [0.1, -0.1, 0.5])
def test_targeted_pgd_stays_in_the_box_and_moves_toward_the_target(radius, victim):
    x, targets = extreme_images(), (torch.arange(12) + 3) % 10
    adv = targeted_pgd(victim, x, targets, radius, alpha=0.05, steps=4, batch_size=5)
    assert adv.min() >= 0 and adv.max() <= 1
    assert (adv - x).abs().max() <= abs(radius) + 1e-6
    with torch.no_grad():
        before = F.cross_entropy(victim(x), targets, reduction="none")
        after = F.cross_entropy(victim(adv), targets, reduction="none")
    moved = (adv != x).flatten(1).any(1)
    # toward the target for a positive step, away from it after the sign flip
    sign = 1 if radius > 0 else -1
    assert (sign * (before - after))[moved].mean() > 0


def test_top_other_classes_excludes_the_label_brute_force(victim):
    x, labels = torch.rand(6, 1, 8, 8), torch.tensor([0, 1, 2, 3, 4, 5])
    top = top_other_classes(victim, x, labels, 3, batch_size=4)
    with torch.no_grad():
        logits = victim(x)
    for i in range(6):
        order = [c for c in logits[i].argsort(descending=True).tolist() if c != labels[i]]
        assert top[i].tolist() == order[:3]


@pytest.mark.parametrize("name", ["jbda", "jb-self", "jb-top3"])
def test_every_query_stays_in_the_valid_input_range(
    name, victim, digits, clone_spec, recording_api
):
    # a large step makes clipping matter
    api = recording_api(victim)
    create_attack(
        name, seed_size=10, rounds=3, step=0.6, tau=1, substitute_epochs=1, pgd_steps=2
    ).run(api, 200, digits.test, clone_spec)
    asked = api.all_asked()
    assert asked.min() >= 0 and asked.max() <= 1
    assert len(asked) == (80 if name != "jb-top3" else 200)


def test_variants_use_the_label_they_say(victim, digits):
    x = digits.test.images[:16]
    with torch.no_grad():
        own = victim(x).argmax(1)
    api_labels = (own + 1) % 10  # answers that disagree with the clone everywhere
    answers = F.one_hot(api_labels, 10).float()
    jbda = create_attack("jbda").augment(victim, x, answers, 0.1, limit=16)
    jbself = create_attack("jb-self").augment(victim, x, answers, 0.1, limit=16)
    assert torch.equal(jbda, jacobian_step(victim, x, api_labels, 0.1, 512))
    assert torch.equal(jbself, jacobian_step(victim, x, own, 0.1, 512))
    top3 = create_attack("jb-top3", pgd_steps=2).augment(victim, x, answers, 0.1, limit=10)
    assert top3.shape == (10, 1, 8, 8)  # truncated inside the 4th image's targets


def test_jbda_set_doubles_each_round(victim, digits, clone_spec):
    result = create_attack("jbda", seed_size=5, rounds=4, substitute_epochs=1).run(
        InProcessAPI(victim), 1000, digits.test, clone_spec
    )
    sizes = [h["set_size"] for h in result.history if "set_size" in h]
    steps = [h["step"] for h in result.history if "step" in h]
    assert sizes == [5, 10, 20, 40, 80] and steps == [0.1] * 4
