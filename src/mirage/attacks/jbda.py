"""Jacobian-based dataset augmentation: JBDA (Papernot et al., AsiaCCS 2017, section 4.2) and its
JB-self / JB-top-k variants (Juuti et al., PRADA, EuroS&P 2019), as configured in the MAD paper
(Orekondy et al., ICLR 2020, appendix C): seed set of 100, λ = 0.1, τ = 5.

The substitute set starts as ``seed_size`` of the attacker's images, answered by the API. Each
round ρ retrains a fresh clone F_A on the set D_ρ, then augments it (docs/design.md §jbda):

* ``jbda``:    x' = x + λ_ρ · sign(∇_x CE(F_A(x), argmax ỹ(x)))   (the API's label)
* ``jb-self``: x' = x + λ_ρ · sign(∇_x CE(F_A(x), argmax F_A(x)))  (the clone's own label)
* ``jb-top3``: for each of the clone's 3 most likely classes c other than the API's label,
  ``pgd_steps`` targeted steps of size ``pgd_alpha`` descending CE(F_A(x + δ), c) with
  ‖δ‖_∞ ≤ |λ_ρ| — three new queries per image (Juuti et al.'s targeted top-k variant).

with the periodic step size λ_ρ = λ · (−1)^⌊ρ/τ⌋ (Papernot et al., eq. 5: the sign flips every
τ rounds). Every new image is clipped to [0, 1]. The new images are answered and added:
D_{ρ+1} = D_ρ ∪ {x'} (reservoir of ``kappa`` images augmented per round when set). Rounds stop
after ``rounds`` or when the budget is spent; a round that would overshoot is truncated to the
exact remaining budget (for jb-top3 the last image may get fewer than 3 targets). The final clone
is trained from scratch on the whole substitute set with the clone recipe.

Notes on the official MAD code: it flips the sign at ``round(ρ/τ)`` (so first at ρ = 3); we
follow Papernot's ⌊ρ/τ⌋. Its jb-top-k truncation can overshoot the budget by up to 2 queries;
ours cannot. Its jb-top-k PGD does not clip to [0, 1]; ours does.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from mirage.attacks.base import Attack, AttackParams, QueryClient, StolenModel, register_attack
from mirage.attacks.clone import CloneSpec, train_clone
from mirage.attacks.knockoff import query_all
from mirage.data.base import ImageData

log = logging.getLogger(__name__)

Strategy = Literal["jbda", "jb-self", "jb-top3"]


class JacobianParams(AttackParams):
    seed_size: int = Field(100, ge=1, description="images in the initial substitute set")
    step: float = Field(0.1, gt=0, description="λ: the augmentation step size")
    tau: int | None = Field(
        5, ge=1, description="flip the step's sign every τ rounds (None: never)"
    )
    rounds: int | None = Field(
        6, ge=0, description="augmentation rounds (None: until the budget is spent)"
    )
    kappa: int | None = Field(
        None, ge=1, description="reservoir: augment only this many random images per round"
    )
    substitute_epochs: int = Field(
        20, ge=1, description="epochs of the per-round substitute training"
    )
    top_k: int = Field(3, ge=1, description="targets per image for jb-top3")
    pgd_steps: int = Field(8, ge=1)
    pgd_alpha: float = Field(0.01, gt=0)
    query_batch_size: int = Field(256, ge=1)
    grad_batch_size: int = Field(512, ge=1)


def step_size(step: float, tau: int | None, round_index: int) -> float:
    """λ_ρ = λ · (−1)^⌊ρ/τ⌋ (Papernot et al. 2017, eq. 5)."""
    return step if tau is None else step * (-1) ** (round_index // tau)


def jacobian_step(
    model: nn.Module, x: Tensor, labels: Tensor, lam: float, batch_size: int
) -> Tensor:
    """x: (N, C, H, W), labels: (N,) -> clip(x + λ·sign(∇_x CE(F_A(x), labels)), 0, 1), batched.

    The per-image gradient comes from one backward of the summed loss (images are independent in
    eval mode)."""
    model.eval()
    out = []
    for xb, yb in zip(x.split(batch_size), labels.split(batch_size), strict=True):
        xb = xb.detach().clone().requires_grad_(True)
        loss = F.cross_entropy(model(xb), yb, reduction="sum")
        (grad,) = torch.autograd.grad(loss, xb)
        out.append((xb.detach() + lam * grad.sign()).clamp(0, 1))
    return torch.cat(out) if out else x[:0]


def targeted_pgd(
    model: nn.Module,
    x: Tensor,
    targets: Tensor,
    radius: float,
    alpha: float,
    steps: int,
    batch_size: int,
) -> Tensor:
    """x: (N, C, H, W), targets: (N,) -> x + δ with ‖δ‖_∞ ≤ |radius|, in [0, 1]; ``steps`` signed
    steps of size ``alpha`` descending CE(F_A(x + δ), target) (ascending it if radius < 0)."""
    model.eval()
    direction = -1.0 if radius >= 0 else 1.0
    bound = abs(radius)
    out = []
    for xb, tb in zip(x.split(batch_size), targets.split(batch_size), strict=True):
        adv = xb.detach().clone()
        for _ in range(steps):
            adv.requires_grad_(True)
            loss = F.cross_entropy(model(adv), tb, reduction="sum")
            (grad,) = torch.autograd.grad(loss, adv)
            adv = adv.detach() + direction * alpha * grad.sign()
            adv = torch.minimum(torch.maximum(adv, xb - bound), xb + bound).clamp(0, 1)
        out.append(adv.detach())
    return torch.cat(out) if out else x[:0]


@torch.no_grad()
def top_other_classes(
    model: nn.Module, x: Tensor, labels: Tensor, k: int, batch_size: int
) -> Tensor:
    """(N, k): the clone's k most likely classes per image, excluding ``labels`` (N,)."""
    model.eval()
    logits = torch.cat([model(xb) for xb in x.split(batch_size)])
    logits = logits.scatter(1, labels[:, None], float("-inf"))
    return logits.topk(min(k, logits.shape[1] - 1), dim=1).indices


class JacobianAttack(Attack):
    """Shared rounds of JBDA, JB-self and JB-top-k; subclasses set :attr:`strategy`."""

    strategy: ClassVar[Strategy] = "jbda"
    params: JacobianParams

    def augment(
        self, model: nn.Module, x: Tensor, answers: Tensor, lam: float, limit: int
    ) -> Tensor:
        """New images (at most ``limit``) from the substitute set (x, answers)."""
        p = self.params
        labels = answers.argmax(1)
        if self.strategy == "jb-top3":
            per_image = min(p.top_k, answers.shape[1] - 1)
            n_images = min(len(x), -(-limit // per_image))
            x, labels = x[:n_images], labels[:n_images]
            targets = top_other_classes(model, x, labels, p.top_k, p.grad_batch_size).reshape(-1)[
                :limit
            ]
            sources = x.repeat_interleave(per_image, dim=0)[:limit]
            return targeted_pgd(
                model, sources, targets, lam, p.pgd_alpha, p.pgd_steps, p.grad_batch_size
            )
        x, labels = x[:limit], labels[:limit]
        if self.strategy == "jb-self":
            with torch.no_grad():
                model.eval()
                labels = torch.cat([model(xb) for xb in x.split(p.grad_batch_size)]).argmax(1)
        return jacobian_step(model, x, labels, lam, p.grad_batch_size)

    def steal(
        self, client: QueryClient, data: ImageData, clone: CloneSpec, generator: torch.Generator
    ) -> StolenModel:
        p = self.params
        n_seed = min(p.seed_size, len(data), client.remaining)
        if n_seed == 0:
            raise ValueError(f"{self.name}: the budget does not cover a single query")
        x = data.images[torch.randperm(len(data), generator=generator)[:n_seed]]
        y = query_all(client, x, p.query_batch_size, f"{self.name} seed queries")
        history: list[dict[str, Any]] = [{"round": -1, "set_size": len(x), "queries": client.spent}]
        round_index = 0
        while client.remaining > 0 and (p.rounds is None or round_index < p.rounds):
            substitute_spec = clone.model_copy(
                update={
                    "training": clone.training.model_copy(
                        update={"seed": clone.training.seed + 1000 * (round_index + 1)}
                    )
                }
            )
            substitute, _ = train_clone(
                substitute_spec,
                x,
                y,
                client.num_classes,
                epochs=p.substitute_epochs,
                description=f"{self.name} round {round_index}",
            )
            lam = step_size(p.step, p.tau, round_index)
            source = torch.arange(len(x))
            if p.kappa is not None and p.kappa < len(x):
                source = torch.randperm(len(x), generator=generator)[: p.kappa]
            new_x = self.augment(substitute, x[source], y[source], lam, client.remaining)
            new_y = query_all(
                client, new_x, p.query_batch_size, f"{self.name} round {round_index} queries"
            )
            x, y = torch.cat([x, new_x]), torch.cat([y, new_y])
            history.append(
                {"round": round_index, "step": lam, "set_size": len(x), "queries": client.spent}
            )
            log.info(
                "%s round %d: λ=%+.3g, |D|=%d, %d queries",
                self.name,
                round_index,
                lam,
                len(x),
                client.spent,
            )
            round_index += 1
        model, stats = self.train_final_clone(
            clone, x, y, client.num_classes, description=f"{self.name} clone"
        )
        history.append({"round": "final", **stats})
        return StolenModel(model, transfer_size=len(x), history=history)


@register_attack("jbda", params=JacobianParams)
class JBDA(JacobianAttack):
    """JBDA (Papernot et al. 2017): Jacobian steps on the API's label, set doubles each round."""

    strategy = "jbda"


@register_attack("jb-self", params=JacobianParams)
class JBSelf(JacobianAttack):
    """JB-self (Juuti et al. 2019): Jacobian steps on the clone's own label."""

    strategy = "jb-self"


@register_attack("jb-top3", params=JacobianParams)
class JBTop3(JacobianAttack):
    """JB-top3 (Juuti et al. 2019): targeted steps toward the clone's top-3 other classes."""

    strategy = "jb-top3"
