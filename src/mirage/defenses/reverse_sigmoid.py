"""Reverse sigmoid (Lee et al., "Defending against NN model stealing attacks using deceptive
perturbations", IEEE S&P Workshops 2019), as evaluated in the MAD paper (section 5.1):

    r = β · (σ(γ · logit(y)) − ½),      ỹ ∝ max(y − r, 0)   (renormalised).

Classes below ½ get pushed up and the dominant class down, flattening the posterior while the
ranking of the top class is kept for β small enough. γ is dataset-specific (MNIST 0.2,
Fashion-MNIST 0.4, CIFAR-10 0.1, otherwise 0.2); the MAD paper sweeps β ∈ [0, 1].
No L1 budget: the trade-off is set by β.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from mirage.defenses.base import Defense, DefenseContract, DefenseParams, register_defense

LOGIT_CLAMP = 1e-12


class ReverseSigmoidParams(DefenseParams):
    beta: float = Field(0.1, ge=0, description="perturbation magnitude β")
    gamma: float = Field(0.4, gt=0, description="dataset-specific slope γ")


@register_defense("reverse_sigmoid", params=ReverseSigmoidParams)
class ReverseSigmoid(Defense[ReverseSigmoidParams]):
    """Reverse sigmoid: ỹ ∝ max(y − β(σ(γ·logit y) − ½), 0) (Lee et al., 2019)."""

    @classmethod
    def contract_for(cls, params: ReverseSigmoidParams) -> DefenseContract:
        return DefenseContract(stateful=False)  # no budget: β sets the trade-off

    def perturb(self, x: Tensor | None, probs: Tensor) -> Tensor:
        y = probs.double().clamp(LOGIT_CLAMP, 1 - LOGIT_CLAMP)
        r = self.params.beta * (torch.sigmoid(self.params.gamma * torch.logit(y)) - 0.5)
        shifted = (probs.double() - r).clamp_min(0)
        # Some class has y ≤ ½, so r ≤ 0 there and the row keeps positive mass.
        return (shifted / shifted.sum(dim=1, keepdim=True)).to(probs.dtype)
