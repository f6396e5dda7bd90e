"""The undefended API: serve the clean posterior unchanged (the reference every defense is
compared with)."""

from __future__ import annotations

from torch import Tensor

from mirage.defenses.base import Defense, DefenseContract, DefenseParams, register_defense


@register_defense("none")
class NoDefense(Defense[DefenseParams]):
    """No defense: ỹ = y."""

    @classmethod
    def contract_for(cls, params: DefenseParams) -> DefenseContract:
        # keeps_top1 stays false: ties in y stay ties, and nothing is promised beyond identity
        return DefenseContract(stateful=False)

    def perturb(self, x: Tensor | None, probs: Tensor) -> Tensor:
        return probs.clone()
