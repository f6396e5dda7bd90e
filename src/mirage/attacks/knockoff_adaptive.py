"""Knockoff Nets, adaptive strategy (Orekondy, Schiele & Fritz, CVPR 2019, section 4.1.2).

A gradient bandit (Sutton & Barto, section 2.8) chooses which *arm* of the pool to query next —
one arm per pool class, or per coarse group of classes (``groups``); the pool's own labels are
used only for this, as in Knockoff. Preferences H (Z,) give the policy π = softmax(H) over arms
with images left; after a step with actions A_i and rewards R_i,

    H ← H + α · mean_i (R_i − R̄) (e_{A_i} − π)                                (Sutton & Barto 2.12)

with R̄ the running mean reward. Rewards of one answer ỹ (Knockoff eqs. 2–4):

* certainty: the margin ỹ_(1) − ỹ_(2) between the two largest entries;
* diversity: Σ_k max(0, ỹ_k − ȳ_k), ȳ the mean of the last Δ answers;
* loss: the clone's soft cross-entropy −Σ_k t_k log p_A(k|x) on the (renormalised) answer t;
* all: the sum of the three, each min–max normalised over the rewards seen so far.

Numerically safe whatever the answers look like (one-hot, uniform, rows rounded to zeros): every
reward is finite and bounded, normalisers never divide by zero, preferences are clipped so the
softmax cannot overflow. The clone is trained online (``online_steps`` SGD steps per batch) to
compute the loss reward; the returned clone is then trained from scratch on the whole transfer
set with the clone recipe, like the random strategy. With a budget as large as the pool, every
image is eventually asked and the transfer set equals the random strategy's: the bandit only
changes *which* images are asked when the budget is smaller than the pool.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor

from mirage.attacks.base import Attack, AttackParams, QueryClient, StolenModel, register_attack
from mirage.attacks.clone import CloneSpec, training_targets
from mirage.data.base import ImageData
from mirage.progress import progress_bar

log = logging.getLogger(__name__)

PREFERENCE_CLIP = 30.0
LOSS_CLIP = 50.0
Reward = Literal["certainty", "diversity", "loss", "all"]


def certainty_reward(answers: Tensor) -> Tensor:
    """answers: (B, K) -> (B,) top-1 minus top-2 entry, in [0, 1] for sub-simplex rows."""
    top2 = answers.clamp(0, 1).topk(2, dim=1).values
    return (top2[:, 0] - top2[:, 1]).clamp_min(0)


def diversity_reward(answers: Tensor, recent: Tensor) -> Tensor:
    """answers: (B, K), recent: (M, K) last answers (M may be 0) -> (B,) Σ_k max(0, ỹ_k − ȳ_k)."""
    answers = answers.clamp(0, 1)
    if recent.shape[0] == 0:
        return answers.sum(dim=1)
    return (answers - recent.clamp(0, 1).mean(dim=0)).clamp_min(0).sum(dim=1)


def loss_reward(answers: Tensor, logits: Tensor) -> Tensor:
    """answers: (B, K) served rows, logits: (B, K) of the clone -> (B,) soft CE, in [0, 50]."""
    logits = torch.nan_to_num(logits.float(), nan=0.0, posinf=1e4, neginf=-1e4)
    log_p = F.log_softmax(logits, dim=1).clamp_min(-LOSS_CLIP)
    cross_entropy = -(training_targets(answers) * log_p).sum(dim=1)
    return cross_entropy.clamp(0, LOSS_CLIP)


class MinMaxNormaliser:
    """Maps each reward component to [0, 1] with the min and max seen so far (0 while constant)."""

    def __init__(self, components: int) -> None:
        self.low = torch.full((components,), float("inf"))
        self.high = torch.full((components,), float("-inf"))

    def __call__(self, rewards: Tensor) -> Tensor:
        """rewards: (B, C) -> (B, C) in [0, 1]."""
        self.low = torch.minimum(self.low, rewards.min(dim=0).values)
        self.high = torch.maximum(self.high, rewards.max(dim=0).values)
        span = (self.high - self.low).clamp_min(1e-8)
        return ((rewards - self.low) / span).clamp(0, 1)


class GradientBandit:
    """Preferences over Z arms; exhausted arms are masked out of the policy."""

    def __init__(self, arms: int, lr: float) -> None:
        self.preferences = torch.zeros(arms, dtype=torch.float64)
        self.available = torch.ones(arms, dtype=torch.bool)
        self.lr = lr
        self.baseline = 0.0
        self.steps = 0

    def policy(self) -> Tensor:
        """(Z,) action probabilities, zero on unavailable arms."""
        masked = self.preferences.masked_fill(~self.available, float("-inf"))
        return torch.softmax(masked, dim=0)

    def update(self, actions: Tensor, rewards: Tensor) -> None:
        """actions: (B,) arm ids, rewards: (B,) finite -> gradient-bandit step on H."""
        pi = self.policy()
        advantage = rewards.double() - self.baseline
        chosen = F.one_hot(actions, len(pi)).double()
        step = (advantage[:, None] * (chosen - pi[None])).mean(dim=0)
        self.preferences = (self.preferences + self.lr * step).clamp(
            -PREFERENCE_CLIP, PREFERENCE_CLIP
        )
        self.steps += 1
        self.baseline += (float(rewards.double().mean()) - self.baseline) / self.steps


class AdaptiveParams(AttackParams):
    reward: Reward = "all"
    groups: list[list[int]] | None = Field(
        None,
        description="coarse groups of pool class labels, one arm each (default: one arm per class)",
    )
    step_size: int = Field(32, ge=1, description="images per bandit step (one API request)")
    bandit_lr: float = Field(0.1, gt=0)
    diversity_window: int = Field(
        100, ge=1, description="Δ: answers averaged for the diversity reward"
    )
    online_lr: float = Field(0.01, gt=0)
    online_steps: int = Field(1, ge=0)

    @model_validator(mode="after")
    def _disjoint_groups(self) -> AdaptiveParams:
        if self.groups is not None:
            flat = [c for group in self.groups for c in group]
            if len(flat) != len(set(flat)) or any(not group for group in self.groups):
                raise ValueError("groups must be non-empty and disjoint")
        return self


def arm_of_labels(labels: Tensor, groups: list[list[int]] | None) -> tuple[Tensor, int]:
    """Map pool labels (N,) to arm ids (N,); returns (arms, number of arms)."""
    if groups is None:
        classes, arms = labels.unique(return_inverse=True)
        return arms, len(classes)
    lookup = torch.full((int(labels.max()) + 1,), -1, dtype=torch.long)
    for arm, group in enumerate(groups):
        members = torch.tensor([c for c in group if c < len(lookup)], dtype=torch.long)
        lookup[members] = arm
    arms = lookup[labels]
    if (arms < 0).any():
        missing = sorted(set(labels[arms < 0].tolist()))
        raise ValueError(f"pool classes {missing} belong to no group")
    return arms, len(groups)


class ArmQueues:
    """Each arm's pool indices in a seeded random order, consumed front to back."""

    def __init__(self, arms: Tensor, num_arms: int, generator: torch.Generator) -> None:
        shuffled = torch.randperm(len(arms), generator=generator)
        order = torch.sort(arms[shuffled], stable=True).indices
        self.order = shuffled[order]
        self.size = torch.bincount(arms, minlength=num_arms)
        self.start = torch.cumsum(self.size, 0) - self.size
        self.used = torch.zeros(num_arms, dtype=torch.long)

    def take(self, actions: Tensor) -> tuple[Tensor, Tensor]:
        """actions: (B,) requested arms -> (pool indices, their arms), dropping requests to
        exhausted arms."""
        demand = torch.bincount(actions, minlength=len(self.size))
        take = torch.minimum(demand, self.size - self.used)
        arm = torch.repeat_interleave(torch.arange(len(take)), take)
        rank = torch.arange(len(arm)) - torch.repeat_interleave(torch.cumsum(take, 0) - take, take)
        index = self.order[self.start[arm] + self.used[arm] + rank]
        self.used += take
        return index, arm

    @property
    def available(self) -> Tensor:
        return self.used < self.size


@register_attack("knockoff-adaptive", params=AdaptiveParams)
class KnockoffAdaptive(Attack):
    """Knockoff Nets (adaptive): a gradient bandit over the pool's classes or coarse groups."""

    params: AdaptiveParams

    def steal(
        self, client: QueryClient, data: ImageData, clone: CloneSpec, generator: torch.Generator
    ) -> StolenModel:
        p = self.params
        arms, num_arms = arm_of_labels(data.labels, p.groups)
        queues = ArmQueues(arms, num_arms, generator)
        bandit = GradientBandit(num_arms, p.bandit_lr)
        normaliser = MinMaxNormaliser(3)
        online = clone.build(client.input_shape, client.num_classes)
        optimizer = torch.optim.SGD(online.parameters(), lr=p.online_lr, momentum=0.9)
        images: list[Tensor] = []
        answers: list[Tensor] = []
        chosen: list[Tensor] = []
        rewards: list[Tensor] = []
        total = min(client.remaining, len(data))
        with progress_bar("knockoff-adaptive queries", total=total) as advance:
            while client.remaining > 0 and queues.available.any():
                bandit.available = queues.available
                n = min(p.step_size, client.remaining)
                actions = torch.multinomial(
                    bandit.policy().float(), n, replacement=True, generator=generator
                )
                index, acted = queues.take(actions)
                if len(index) == 0:
                    continue
                x = data.images[index]
                y = client.query(x)
                online.eval()
                with torch.no_grad():
                    logits = online(x)
                recent = torch.cat(answers)[-p.diversity_window :] if answers else y[:0]
                raw = torch.stack(
                    [certainty_reward(y), diversity_reward(y, recent), loss_reward(y, logits)], 1
                )
                scaled = normaliser(raw)
                reward = (
                    scaled.sum(1)
                    if p.reward == "all"
                    else scaled[:, ["certainty", "diversity", "loss"].index(p.reward)]
                )
                bandit.update(acted, reward)
                online.train()
                for _ in range(p.online_steps):
                    loss = -(training_targets(y) * F.log_softmax(online(x), 1)).sum(1).mean()
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                images.append(x)
                answers.append(y)
                chosen.append(acted)
                rewards.append(reward)
                advance(len(x), reward=float(reward.mean()))
        if not images:
            raise ValueError("knockoff-adaptive: the budget does not cover a single query")
        images_t, answers_t = torch.cat(images), torch.cat(answers)
        counts = torch.bincount(torch.cat(chosen), minlength=num_arms)
        model, stats = self.train_final_clone(
            clone, images_t, answers_t, client.num_classes, description="knockoff-adaptive clone"
        )
        history = [
            {
                "images": len(images_t),
                "arm_counts": counts.tolist(),
                "final_policy": bandit.policy().tolist(),
                "mean_reward": float(torch.cat(rewards).mean()),
                **stats,
            }
        ]
        return StolenModel(model, transfer_size=len(images_t), history=history)
