"""Knockoff adaptive: rewards stay finite on adversarial answers, the bandit is the textbook
gradient bandit, arm queues never repeat an image, and the bandit learns where reward is."""

import pytest
import torch

from mirage.api import InProcessAPI
from mirage.attacks import create_attack
from mirage.attacks.knockoff_adaptive import (
    ArmQueues,
    GradientBandit,
    MinMaxNormaliser,
    arm_of_labels,
    certainty_reward,
    diversity_reward,
    loss_reward,
)

K = 10
ADVERSARIAL = {
    "one-hot": torch.eye(K)[torch.arange(6) % K],
    "uniform": torch.full((6, K), 1 / K),
    "zeros": torch.zeros(6, K),
    "mixed": torch.cat([torch.zeros(2, K), torch.eye(K)[:2], torch.full((2, K), 1 / K)]),
}
LOGITS = {
    "normal": torch.randn(6, K),
    "huge": torch.full((6, K), 3e38) * torch.tensor([1.0, -1.0] * 5),
    "inf": torch.tensor([float("inf"), float("-inf")] * 5).expand(6, K),
    "nan": torch.full((6, K), float("nan")),
}


@pytest.mark.parametrize("answers", ADVERSARIAL.values(), ids=ADVERSARIAL.keys())
@pytest.mark.parametrize("logits", LOGITS.values(), ids=LOGITS.keys())
def test_rewards_are_finite_and_bounded(answers, logits):
    for reward in (
        certainty_reward(answers),
        diversity_reward(answers, answers[:0]),
        diversity_reward(answers, ADVERSARIAL["mixed"]),
        loss_reward(answers, logits),
    ):
        assert reward.shape == (6,) and torch.isfinite(reward).all() and (reward >= 0).all()
    assert (certainty_reward(answers) <= 1).all()
    normalised = MinMaxNormaliser(3)(
        torch.stack(
            [
                certainty_reward(answers),
                diversity_reward(answers, answers[:0]),
                loss_reward(answers, logits),
            ],
            1,
        )
    )
    assert torch.isfinite(normalised).all() and (normalised >= 0).all() and (normalised <= 1).all()


def test_rewards_match_their_definitions():
    answers = torch.tensor([[0.7, 0.2, 0.1], [0.0, 0.0, 0.0], [0.5, 0.3, 0.0]])
    recent = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    logits = torch.tensor([[0.0, 0.0, 0.0]] * 3)
    assert torch.allclose(certainty_reward(answers), torch.tensor([0.5, 0.0, 0.2]))
    # ȳ = (0.5, 0.5, 0): Σ max(0, ỹ − ȳ)
    assert torch.allclose(diversity_reward(answers, recent), torch.tensor([0.3, 0.0, 0.0]))
    # uniform clone: CE = log 3 for every renormalised row
    assert torch.allclose(
        loss_reward(answers, logits), torch.full((3,), torch.log(torch.tensor(3.0)))
    )


def test_gradient_bandit_update_matches_sutton_barto_loop():
    bandit = GradientBandit(4, lr=0.5)
    bandit.preferences = torch.tensor([0.1, -0.2, 0.3, 0.0], dtype=torch.float64)
    bandit.baseline = 0.25
    actions, rewards = torch.tensor([2, 0, 2]), torch.tensor([1.0, 0.0, 0.5])
    pi = torch.softmax(bandit.preferences, 0)
    expected = bandit.preferences.clone()
    for a, r in zip(actions.tolist(), rewards.tolist(), strict=True):
        for arm in range(4):
            indicator = 1.0 if arm == a else 0.0
            expected[arm] += 0.5 * (r - 0.25) * (indicator - pi[arm]) / 3
    bandit.update(actions, rewards)
    assert torch.allclose(bandit.preferences, expected)


def test_bandit_survives_extreme_rewards_and_masks_exhausted_arms():
    bandit = GradientBandit(3, lr=10.0)
    bandit.available = torch.tensor([True, False, True])
    for reward in (1e30, -1e30, 1e30):
        bandit.update(torch.tensor([0, 2]), torch.tensor([reward, 0.0]))
    policy = bandit.policy()
    assert torch.isfinite(bandit.preferences).all() and torch.isfinite(policy).all()
    assert policy[1] == 0 and policy.sum() == pytest.approx(1.0)


def test_arm_queues_hand_out_each_image_once_from_the_right_arm():
    labels = torch.tensor([0, 1, 1, 2, 2, 2, 0, 1])
    arms, n = arm_of_labels(labels, [[0, 2], [1]])
    assert n == 2 and arms.tolist() == [0, 1, 1, 0, 0, 0, 0, 1]
    queues = ArmQueues(arms, n, torch.Generator().manual_seed(0))
    index, acted = queues.take(
        torch.tensor([0, 0, 1, 0, 0, 0, 0, 0, 1])
    )  # 7 asks of arm 0 (5 exist)
    assert len(set(index.tolist())) == len(index) == 7
    assert (arms[index] == acted).all()
    assert acted.tolist().count(0) == 5 and acted.tolist().count(1) == 2
    rest, _ = queues.take(torch.tensor([1, 1, 0]))
    assert rest.tolist() and set(rest.tolist()).isdisjoint(index.tolist())
    assert queues.available.tolist() == [False, False]
    with pytest.raises(ValueError, match="no group"):
        arm_of_labels(labels, [[0], [1]])


@pytest.mark.parametrize("kind", ["one-hot", "uniform", "zeros"])
@pytest.mark.parametrize("reward", ["certainty", "diversity", "loss", "all"])
@pytest.mark.slow
def test_attack_runs_on_adversarial_answers(kind, reward, victim, digits, clone_spec, served):
    api = InProcessAPI(victim, served(kind))
    result = create_attack("knockoff-adaptive", reward=reward, step_size=16).run(
        api, 64, digits.train, clone_spec
    )
    record = result.history[0]
    assert result.queries == 64 and sum(record["arm_counts"]) == 64
    assert torch.isfinite(torch.tensor(record["final_policy"])).all()
    assert torch.isfinite(torch.tensor(record["mean_reward"]))
    assert all(torch.isfinite(p).all() for p in result.clone.parameters())


def test_bandit_learns_which_arm_pays(victim, digits, clone_spec):
    """Answers are certain only for pool images of class 0: with the certainty reward, arm 0 must
    be chosen far more often than the 1/10 of a uniform policy."""
    from mirage.defenses import Defense, DefenseContract

    class CertainOnZeros(Defense):
        name = "certain-on-zeros-test"

        @classmethod
        def contract_for(cls, params):
            return DefenseContract(needs_input=True)

        def perturb(self, x, probs):
            is_zero = (x.flatten(1)[:, None] == zeros[None]).all(-1).any(-1)
            return torch.where(
                is_zero[:, None], torch.eye(10)[0].expand_as(probs), torch.full_like(probs, 0.1)
            )

    zeros = digits.train.images[digits.train.labels == 0].flatten(1)
    api = InProcessAPI(victim, CertainOnZeros())
    result = create_attack("knockoff-adaptive", reward="certainty", step_size=8, bandit_lr=1.0).run(
        api, 240, digits.train, clone_spec, seed=0
    )
    counts = result.history[0]["arm_counts"]
    assert counts[0] > 3 * 240 / 10
