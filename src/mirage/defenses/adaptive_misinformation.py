"""Adaptive Misinformation (Kariyappa & Qureshi, "Defending Against Model Stealing Attacks with
Adaptive Misinformation", CVPR 2020, eq. 4–5; docs/design.md §adaptive-misinformation).

Queries that look out-of-distribution — typical of model-stealing query sets — get answers mixed
with those of a misinformation model F̂ (trained on −log(1 − p_y), so it avoids the true class):

    s(x) = max_k F_OE(x)_k,      α = σ(ν (τ − s(x))),      ỹ = (1 − α) y + α F̂(x).

F_OE is a classifier trained with Outlier Exposure (in the paper, the victim itself);
training functions in :mod:`mirage.training.outlier_exposure`. No L1 budget: the trade-off is set
by the threshold τ and the steepness ν. The output is a convex mix of two simplex rows.

Example::

    defense = create_defense("adaptive_misinformation", oe_model=oe, misinformation_model=mis,
                             tau=0.9, nu=1000.0)
    served = defense(x, victim_probs)
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field, field_validator
from torch import Tensor, nn

from mirage.defenses.base import Defense, DefenseContract, DefenseParams, register_defense


class AdaptiveMisinformationParams(DefenseParams):
    oe_model: Any = Field(description="nn.Module trained with outlier exposure: s(x) = max softmax")
    misinformation_model: Any = Field(description="nn.Module F̂ trained on −log(1 − p_y)")
    tau: float = Field(0.5, ge=0, le=1, description="OOD threshold τ on s(x)")
    nu: float = Field(1000.0, gt=0, description="steepness ν of the switch")

    @field_validator("oe_model", "misinformation_model")
    @classmethod
    def _module(cls, value: Any) -> Any:
        if not isinstance(value, nn.Module):
            raise ValueError(  # noqa: TRY004 (pydantic)
                "adaptive_misinformation needs oe_model and misinformation_model (nn.Module)"
            )
        return value


@register_defense("adaptive_misinformation", params=AdaptiveMisinformationParams)
class AdaptiveMisinformation(Defense[AdaptiveMisinformationParams]):
    """Adaptive Misinformation (CVPR 2020): mix in a misinformation model on OOD-looking queries."""

    @classmethod
    def contract_for(cls, params: AdaptiveMisinformationParams) -> DefenseContract:
        return DefenseContract(needs_input=True, stateful=False)  # no budget: τ and ν set it

    def __init__(self, params: AdaptiveMisinformationParams | None = None, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.oe_model = self.params.oe_model.eval()
        self.misinformation_model = self.params.misinformation_model.eval()

    def mixing(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(α (B,), F̂(x) (B, K)) for queries x (B, C, H, W)."""
        dtype = next(self.oe_model.parameters()).dtype
        with torch.no_grad():
            score = torch.softmax(self.oe_model(x.to(dtype)).double(), dim=1).max(dim=1).values
            misinformation = torch.softmax(self.misinformation_model(x.to(dtype)).double(), dim=1)
        alpha = torch.sigmoid(self.params.nu * (self.params.tau - score))
        return alpha, misinformation

    def perturb(self, x: Tensor | None, probs: Tensor) -> Tensor:
        alpha, misinformation = self.mixing(self._input(x))
        if misinformation.shape != probs.shape:
            raise ValueError(
                f"misinformation model gives {tuple(misinformation.shape)}, "
                f"probs are {tuple(probs.shape)}"
            )
        y = probs.double()
        return ((1 - alpha).unsqueeze(1) * y + alpha.unsqueeze(1) * misinformation).to(probs.dtype)
