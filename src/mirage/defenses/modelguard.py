"""ModelGuard-W (Tang et al., "ModelGuard: Information-Theoretic Defense Against Model Extraction
Attacks", USENIX Security 2024), the weighted/cross-entropy variant (docs/design.md §modelguard):
serve the answer that carries the least information about the clean one within the budget,

    maximise  CE(ỹ, y) = −Σ_k ỹ_k log y_k   over  Δ_K ∩ {‖ỹ − y‖₁ ≤ ε},

a linear objective in ỹ with scores −log y, solved exactly by :func:`redirect` (mass moves to
the least likely class, taken from the most likely ones). With ``preserve_top1`` the argmax-
preserving solver keeps the top-1 class strictly (zero loss of defender accuracy).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from mirage.defenses.base import Defense, DefenseContract, DefenseParams, register_defense
from mirage.defenses.redirect import TOP1_MARGIN, redirect, redirect_top1_preserving

LOG_CLAMP = 1e-30


class ModelGuardParams(DefenseParams):
    epsilon: float = Field(0.5, ge=0, le=2, description="per-query L1 budget")
    preserve_top1: bool = False


@register_defense("modelguard", params=ModelGuardParams)
class ModelGuardW(Defense[ModelGuardParams]):
    """ModelGuard-W: maximise CE(ỹ, y) within the L1 budget via the exact redirection step."""

    @classmethod
    def contract_for(cls, params: ModelGuardParams) -> DefenseContract:
        return DefenseContract(
            keeps_top1=params.preserve_top1, stateful=False, budget=params.epsilon
        )

    def perturb(self, x: Tensor | None, probs: Tensor) -> Tensor:
        scores = -torch.log(probs.double().clamp_min(LOG_CLAMP))
        if self.params.preserve_top1:
            served, _ = redirect_top1_preserving(
                probs, scores.to(probs.dtype), self.params.epsilon, margin=TOP1_MARGIN
            )
            return served
        return redirect(probs, scores.to(probs.dtype), self.params.epsilon)
