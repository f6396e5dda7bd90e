"""Rounding (Tramèr et al., "Stealing machine learning models via prediction APIs", USENIX
Security 2016): serve each probability with ``decimals`` decimal places.

Values are rounded *down*, so a served row never sums above 1 (round-to-nearest could, e.g.
[.335, .335, .33] → [.34, .34, .33]); the row sums to at most 1 (declared ``truncating``).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from mirage.defenses.base import Defense, DefenseContract, DefenseParams, register_defense


class RoundingParams(DefenseParams):
    decimals: int = Field(2, ge=0, le=12)


@register_defense("rounding", params=RoundingParams)
class Rounding(Defense[RoundingParams]):
    """Rounding: floor every probability to ``decimals`` decimal places."""

    @classmethod
    def contract_for(cls, params: RoundingParams) -> DefenseContract:
        return DefenseContract(truncating=True, stateful=False)

    def perturb(self, x: Tensor | None, probs: Tensor) -> Tensor:
        scale = 10.0**self.params.decimals
        # A hair of slack so values like 0.29999999 (meant as 0.3) are not floored to 0.29.
        return (torch.floor(probs.double() * scale + 1e-9) / scale).clamp(0, 1).to(probs.dtype)
