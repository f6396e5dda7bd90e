"""MAD-argmax (Orekondy et al., ICLR 2020, section 4.1 "MAD-argmax"; docs/design.md §mad-argmax):
MAD whose candidates y* keep the clean top-1 label, so defender accuracy is unchanged.

Candidates are uniform distributions over a class subset S ∋ t = argmax y, with t up-weighted by
``top1_margin`` (as the official code, 1e-5) so that t stays the strict maximum:
c_S ∝ 1_S + margin·e_t. For K ≤ ``exhaustive_max_classes`` (10) all 2^(K−1) subsets are scored;
beyond, S grows greedily from {t} by the class that maximises the objective, until
``max_evaluations`` (1,024) candidates have been scored or S is full, and the best candidate seen
wins. Then ỹ = (1 − α) y + α y* as in MAD; since y_t ≥ y_j and c_t > c_j, top-1 is kept for α > 0
(with ε = 0 a row whose top class is tied is served unchanged, and the tie is not a strict keep).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import torch
from pydantic import Field, model_validator
from torch import Tensor

from mirage.defenses.base import DefenseContract, register_defense
from mirage.defenses.mad.defense import MAD, MADParams, candidate_objective


class MADArgmaxParams(MADParams):
    top1_margin: float = Field(1e-5, gt=0, le=0.1, description="up-weighting of the top class")
    exhaustive_max_classes: int = Field(10, ge=2, le=16)
    max_evaluations: int = Field(1024, ge=1)

    @model_validator(mode="after")
    def _extreme(self) -> MADArgmaxParams:
        if self.oracle != "extreme":
            raise ValueError("mad_argmax searches subsets; oracle='random' is a MAD ablation only")
        return self


def subset_table(k: int) -> Tensor:
    """All 2^(K−1) subsets of the K−1 non-top classes as a (S, K−1) 0/1 table."""
    return torch.tensor(list(itertools.product([0.0, 1.0], repeat=k - 1)), dtype=torch.float64)


@register_defense("mad_argmax", params=MADArgmaxParams)
class MADArgmax(MAD):
    """MAD-argmax (ICLR 2020): MAD over top-1-preserving candidates; keeps the top-1 label."""

    params: MADArgmaxParams

    @classmethod
    def contract_for(cls, params: MADParams) -> DefenseContract:
        return dataclasses.replace(super().contract_for(params), keeps_top1=True)

    def __init__(self, params: MADArgmaxParams | None = None, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.evaluations = 0  # candidates scored per query in the last call (for tests/benchmarks)

    def perturb(self, x: Tensor | None, probs: Tensor) -> Tensor:
        y = probs.double()
        target = self.target(x, y)  # not a vertex: the general step
        return torch.lerp(y, target, self.step(y, target).unsqueeze(1)).to(probs.dtype)

    def target(self, x: Tensor | None, y: Tensor) -> Tensor:
        gram = self.gram(x, y)
        if y.shape[1] <= self.params.exhaustive_max_classes:
            return self._exhaustive(gram, y)
        return self._greedy(gram, y)

    def _candidates(self, members: Tensor, top: Tensor) -> Tensor:
        """members: (B, S, K) 0/1 with the top class set -> normalised candidates."""
        c = members.clone()
        c.scatter_add_(
            2,
            top.view(-1, 1, 1).expand(-1, c.shape[1], 1),
            torch.full_like(c[..., :1], self.params.top1_margin),
        )
        return c / c.sum(2, keepdim=True)

    def _exhaustive(self, gram: Tensor, y: Tensor) -> Tensor:
        b, k = y.shape
        top = y.argmax(1)
        classes = torch.arange(k, device=y.device).expand(b, k)
        others = classes[classes != top.unsqueeze(1)].view(b, k - 1)  # (B, K−1)
        table = subset_table(k).to(y)  # (S, K−1)
        members = torch.zeros(b, table.shape[0], k, dtype=y.dtype, device=y.device)
        members.scatter_(
            2, others.unsqueeze(1).expand(-1, table.shape[0], -1), table.expand(b, -1, -1)
        )
        members.scatter_(2, top.view(-1, 1, 1).expand(-1, table.shape[0], 1), 1.0)
        candidates = self._candidates(members, top)
        values = candidate_objective(gram, y, candidates, self.params.objective)
        self.evaluations = table.shape[0]
        return candidates[torch.arange(b), values.argmax(1)]

    def _greedy(self, gram: Tensor, y: Tensor) -> Tensor:
        b, k = y.shape
        top = y.argmax(1)
        rows = torch.arange(b, device=y.device)
        fixed = torch.nn.functional.one_hot(top, k).to(y.dtype)  # (B, K)
        eye = torch.eye(k, dtype=y.dtype, device=y.device)
        best_value = torch.full((b,), float("-inf"), dtype=y.dtype, device=y.device)
        best = self._candidates(fixed.unsqueeze(1), top)[:, 0]
        evaluations = 0
        for size in range(1, k):  # S has `size` members; grow by one class per step
            if evaluations >= self.params.max_evaluations:
                break
            members = (fixed.unsqueeze(1) + eye).clamp_max(1)  # (B, K, K): add class j
            candidates = self._candidates(members, top)
            values = candidate_objective(gram, y, candidates, self.params.objective)
            values = values.masked_fill(fixed.bool(), float("-inf"))  # j already in S
            pick = values.argmax(1)
            improved = values[rows, pick] > best_value
            best = torch.where(improved.unsqueeze(1), candidates[rows, pick], best)
            best_value = torch.where(improved, values[rows, pick], best_value)
            fixed[rows, pick] = 1.0
            evaluations += k - size
        self.evaluations = evaluations
        return best
