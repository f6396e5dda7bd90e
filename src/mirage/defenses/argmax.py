"""Argmax (top-1 label only): the extreme of information truncation (MAD paper, section 5.2):
serve the one-hot vector of the predicted class. On the simplex, top-1 kept by construction."""

from __future__ import annotations

import torch
from torch import Tensor

from mirage.defenses.base import Defense, DefenseContract, DefenseParams, register_defense


@register_defense("argmax")
class Argmax(Defense[DefenseParams]):
    """Argmax: serve only the top-1 label, as a one-hot row."""

    @classmethod
    def contract_for(cls, params: DefenseParams) -> DefenseContract:
        return DefenseContract(keeps_top1=True, stateful=False)

    def perturb(self, x: Tensor | None, probs: Tensor) -> Tensor:
        return torch.nn.functional.one_hot(probs.argmax(dim=1), probs.shape[1]).to(probs.dtype)
