"""Random-noise baselines (docs/design.md §random-noise), both within an L1 budget ε.

* ``mode="shift"``: move ε/2 of mass onto one uniformly drawn non-argmax class, taking it from
  the most probable classes first (the largest random change the budget allows).
* ``mode="logit"``: the MAD paper's controlled random noise (section 5.1): uniform noise δ_z ∈
  [−s, s] on the logits z = log(y / (1 − y)), ỹ' = normalise(σ(z + δ_z)); mirage then keeps the
  budget in probability space by moving from y towards ỹ' only as far as ‖ỹ − y‖₁ ≤ ε (the
  segment stays on the simplex). The paper projects δ_z onto an ε_z-ball in logit space instead;
  an L1 budget on the served probabilities is what every other mirage defense is measured by.

Randomness comes from a generator seeded once per instance (``seed``): the same instance answers
a sequence of batches reproducibly.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from mirage.defenses.base import Defense, DefenseContract, DefenseParams, register_defense
from mirage.defenses.redirect import move_mass_to_best

LOGIT_CLAMP = 1e-12


class RandomNoiseParams(DefenseParams):
    epsilon: float = Field(0.5, ge=0, le=2, description="per-query L1 budget")
    mode: Literal["shift", "logit"] = "shift"
    noise_scale: float = Field(5.0, gt=0, description="logit mode: δ_z ~ U[−s, s]")
    seed: int = 0


@register_defense("random_noise", params=RandomNoiseParams)
class RandomNoise(Defense[RandomNoiseParams]):
    """Random noise within an L1 budget: a random non-argmax class gains ε/2, or logit noise."""

    @classmethod
    def contract_for(cls, params: RandomNoiseParams) -> DefenseContract:
        return DefenseContract(
            budget=params.epsilon, stateful=True
        )  # its generator advances per call

    def __init__(self, params: RandomNoiseParams | None = None, **kwargs) -> None:
        super().__init__(params, **kwargs)
        self.generator = torch.Generator().manual_seed(self.params.seed)

    def perturb(self, x: Tensor | None, probs: Tensor) -> Tensor:
        if self.params.mode == "shift":
            return self._shift(probs)
        return self._logit(probs)

    def _shift(self, probs: Tensor) -> Tensor:
        b, k = probs.shape
        top = probs.argmax(dim=1)
        offset = torch.randint(1, k, (b,), generator=self.generator).to(probs.device)
        chosen = (top + offset) % k
        # Score: the chosen class first; donors ordered from the most probable down.
        scores = -probs.double()
        scores[torch.arange(b), chosen] = 2.0
        budget = torch.full(
            (b, 1), self.params.epsilon / 2, dtype=torch.float64, device=probs.device
        )
        return move_mass_to_best(probs.double(), scores, budget).to(probs.dtype)

    def _logit(self, probs: Tensor) -> Tensor:
        y = probs.double()
        z = torch.logit(y.clamp(LOGIT_CLAMP, 1 - LOGIT_CLAMP))
        noise = torch.rand(y.shape, generator=self.generator, dtype=torch.float64) * 2 - 1
        noisy = torch.sigmoid(z + self.params.noise_scale * noise.to(y.device))
        candidate = noisy / noisy.sum(dim=1, keepdim=True)
        distance = (candidate - y).abs().sum(dim=1, keepdim=True)
        step = torch.where(
            distance > self.params.epsilon,
            self.params.epsilon / distance.clamp_min(1e-300),
            torch.ones_like(distance),
        )
        # Shrink the step by a hair so float rounding can never cross the budget.
        served = y + step * (1 - 1e-9) * (candidate - y)
        return (served / served.sum(dim=1, keepdim=True)).to(probs.dtype)
