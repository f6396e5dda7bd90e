"""GRAD²: gradient redirection (Mazeika et al., "How to Steer Your Adversary: Targeted and
Efficient Model Stealing Defenses with Gradient Redirection", ICML 2022; docs/design.md §grad2).

For each scoring batch X (N queries) the defense computes per-class scores
a_ik = (1/N)⟨∇_θ log p_θ(k|x_i), v⟩ on a surrogate θ (one forward-mode JVP,
:mod:`mirage.defenses.grad2.scores`) and serves, per query, the exact maximiser of ⟨a_i, ỹ_i⟩ over
Δ_K ∩ {‖ỹ_i − y_i‖₁ ≤ ε} (:func:`mirage.defenses.redirect.redirect`), so the attacker's update
g(ỹ) is pushed along v. With ``preserve_top1`` the maximiser is restricted to points keeping y's
top-1 class strictly (defender accuracy unchanged).

Which target: on networks whose logits grow with their weights (ReLU nets without
normalisation, such as LeNet) the paper's all-ones target is nearly the confidence direction and
the step only sharpens answers; there, ``target="unlearn"`` (a reference set of the defender's
own labelled data) with ``preserve_top1=True`` hurts a soft-label clone most per unit of L1 — and,
like every top-1-kept defense, not an attacker who keeps only the argmax (results/README.md).

Example::

    defense = create_defense("grad2", epsilon=0.5, surrogate=surrogate)   # all-ones target
    served = defense(x, victim_probs)                                      # x: (B, C, H, W)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import Tensor, nn

from mirage.defenses.base import Defense, DefenseContract, DefenseParams, register_defense
from mirage.defenses.grad2.scores import SCORE_METHODS, Direction, check_direction
from mirage.defenses.grad2.targets import TargetName, min_ip, static_target
from mirage.defenses.redirect import TOP1_MARGIN, redirect, redirect_top1_preserving


class Grad2Params(DefenseParams):
    epsilon: float = Field(0.5, ge=0, le=2, description="per-query L1 budget")
    target: TargetName = "all-ones"
    surrogate: Any = Field(
        None,
        validate_default=True,
        description="nn.Module, or a sequence of them (one sampled per batch)",
    )
    target_vector: Any = Field(None, description="flat (P,) tensor for target='vector'")
    watermark_x: Any = Field(
        None, description="(M, C, H, W) behaviour images for target='watermark'"
    )
    watermark_y: Any = Field(None, description="(M,) behaviour labels for target='watermark'")
    reference_x: Any = Field(None, description="(M, C, H, W) defender images for target='unlearn'")
    reference_y: Any = Field(None, description="(M,) their true labels for target='unlearn'")
    preserve_top1: bool = False
    top1_margin: float = Field(TOP1_MARGIN, ge=0, lt=0.5)
    score_method: Literal["fused", "jvp", "double-backward"] = "fused"
    batch_size: int = Field(256, ge=1, description="queries per scoring batch (N in a_ik)")
    seed: int = 0

    @field_validator("surrogate")
    @classmethod
    def _surrogates(cls, value: Any) -> Any:
        if value is None:
            raise ValueError(
                "grad2 needs a surrogate (an nn.Module or a non-empty sequence of them)"
            )
        members = list(value) if isinstance(value, Sequence) else [value]
        if not members or not all(isinstance(m, nn.Module) for m in members):
            raise ValueError("surrogate must be an nn.Module or a non-empty sequence of nn.Module")
        return value

    @model_validator(mode="after")
    def _target_inputs(self) -> Grad2Params:
        if self.target == "vector" and self.target_vector is None:
            raise ValueError("target='vector' needs target_vector")
        if self.target == "watermark":
            _check_labelled_set(self.watermark_x, self.watermark_y, "watermark")
        if self.target == "unlearn":
            _check_labelled_set(self.reference_x, self.reference_y, "reference")
        return self


def _check_labelled_set(x: Any, y: Any, prefix: str) -> None:
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise ValueError(f"this target needs {prefix}_x and {prefix}_y tensors")  # noqa: TRY004 (pydantic)
    if x.ndim != 4 or y.ndim != 1 or len(x) != len(y) or not len(x):
        raise ValueError(f"{prefix}_x must be (M, C, H, W) with M = len({prefix}_y) ≥ 1")


@register_defense("grad2", params=Grad2Params)
class Grad2(Defense[Grad2Params]):
    """GRAD² gradient redirection (ICML 2022): steer the clone's gradient along a target v."""

    @classmethod
    def contract_for(cls, params: Grad2Params) -> DefenseContract:
        """An ensemble of surrogates samples its member per scoring batch from a generator that
        advances: stateful."""
        ensemble = isinstance(params.surrogate, Sequence) and len(params.surrogate) > 1
        return DefenseContract(
            needs_input=True,
            keeps_top1=params.preserve_top1,
            stateful=ensemble,
            budget=params.epsilon,
        )

    def __init__(self, params: Grad2Params | None = None, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        surrogate = self.params.surrogate
        self.surrogates: list[nn.Module] = (
            list(surrogate) if isinstance(surrogate, Sequence) else [surrogate]
        )
        for member in self.surrogates:
            member.eval()
        self._generator = torch.Generator().manual_seed(self.params.seed)
        self._targets: dict[int, Direction] = {}

    def direction(self, member: int, x: Tensor, probs: Tensor) -> Direction:
        """The target v on surrogate ``member`` (cached unless it depends on the batch)."""
        model = self.surrogates[member]
        if self.params.target == "min-ip":
            return min_ip(model, x, probs)
        if member not in self._targets:
            p = self.params
            v = static_target(
                p.target,
                model,
                seed=p.seed,
                vector=p.target_vector,
                watermark_x=p.watermark_x,
                watermark_y=p.watermark_y,
                reference_x=p.reference_x,
                reference_y=p.reference_y,
            )
            check_direction(model, v)
            self._targets[member] = v
        return self._targets[member]

    def scores(self, x: Tensor, probs: Tensor) -> Tensor:
        """Per-class scores a (B, K) for the whole query batch, in scoring batches."""
        score = SCORE_METHODS[self.params.score_method]
        chunks = []
        for xb, pb in zip(
            x.split(self.params.batch_size), probs.split(self.params.batch_size), strict=True
        ):
            member = (
                int(torch.randint(len(self.surrogates), (1,), generator=self._generator))
                if len(self.surrogates) > 1
                else 0
            )
            model = self.surrogates[member]
            device = next(model.parameters()).device
            xb = xb.to(device)
            chunks.append(score(model, xb, self.direction(member, xb, pb.to(device))).to(probs))
        return torch.cat(chunks)

    def perturb(self, x: Tensor | None, probs: Tensor) -> Tensor:
        scores = self.scores(self._input(x), probs)
        if scores.shape != probs.shape:
            raise ValueError(
                f"surrogate gives {scores.shape[1]} classes, the API serves {probs.shape[1]}"
            )
        if self.params.preserve_top1:
            served, _ = redirect_top1_preserving(
                probs, scores, self.params.epsilon, margin=self.params.top1_margin
            )
            return served
        return redirect(probs, scores, self.params.epsilon)
