"""Top-k truncation (Orekondy et al., Knockoff Nets, 2019; Tramèr et al., 2016): serve the k most
probable classes and zero the rest, *without* renormalising — what an API that lists only its
top-k predictions returns. Rows then sum to at most 1 (declared ``truncating``)."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from mirage.defenses.base import Defense, DefenseContract, DefenseParams, register_defense


class TopKParams(DefenseParams):
    k: int = Field(1, ge=1, description="number of classes served")


@register_defense("top_k", params=TopKParams)
class TopK(Defense[TopKParams]):
    """Top-k: keep the k largest probabilities, zero the others (no renormalisation)."""

    @classmethod
    def contract_for(cls, params: TopKParams) -> DefenseContract:
        return DefenseContract(truncating=True, stateful=False)

    def perturb(self, x: Tensor | None, probs: Tensor) -> Tensor:
        k = min(self.params.k, probs.shape[1])
        values, index = probs.topk(k, dim=1)
        return torch.zeros_like(probs).scatter_(1, index, values)
