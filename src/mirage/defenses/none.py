"""The undefended API: serve the clean posterior unchanged (the reference every defense is
compared with)."""

from __future__ import annotations

from torch import Tensor

from mirage.defenses.base import Defense, register_defense


@register_defense("none")
class NoDefense(Defense):
    """No defense: ỹ = y."""

    preserves_top1 = False  # ties in y stay ties; nothing is promised beyond identity
    stateful = False

    def perturb(self, x: Tensor | None, probs: Tensor) -> Tensor:
        return probs.clone()
