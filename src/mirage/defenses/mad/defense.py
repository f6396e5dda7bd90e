"""MAD — Maximizing Angular Deviation (Orekondy, Schiele, Fritz, "Prediction Poisoning: Towards
Defenses Against DNN Model Stealing Attacks", ICLR 2020; docs/design.md §mad).

With G = ∂ log p_S(·|x)/∂w (K×D) of a surrogate F_S, MAD serves the answer whose gradient
direction deviates most from the clean one (paper eq. 4–6):

    max_ỹ ‖ Gᵀỹ/‖Gᵀỹ‖ − Gᵀy/‖Gᵀy‖ ‖²    s.t.  ỹ ∈ Δ_K,  dist(y, ỹ) ≤ ε.

Heuristic of the paper (section 4.1, "MAD"): evaluate the objective at every vertex e_k of the
simplex, take the best y*, then ỹ = (1 − α) y + α y* with the largest feasible α — closed form
α = min(1, ε/‖y* − y‖_p) for L1/L2, bisection on KL(y ‖ ỹ) (the official code's ``kl``).

The objective only needs M = G Gᵀ (K×K): ⟨Gᵀa, Gᵀb⟩ = aᵀMb (:mod:`mirage.defenses.mad.gram`).
``layers="last"`` (official default: the final linear layer's weight) has the closed form
M = ‖h‖²(I − 1pᵀ − p1ᵀ + ‖p‖²11ᵀ) from the surrogate's features h and probabilities p — one
forward, no backward. On a module that is not a mirage classifier, h is the input of the final
``nn.Linear`` (or of ``head``), caught by a forward hook (docs/design.md §any-module).
``layers="all"`` uses the whole network, batched over samples and classes.

Options: ``objective="surrogate"`` maximises ‖Gᵀ(ỹ − y)‖² instead (the official code's default
``objmax=False``); ablations ``jacobian="identity"`` (G = I) and ``oracle="random"`` (y* a
uniformly drawn vertex). The surrogate is randomly initialised (``architecture``, ``seed``) on
first use unless a model is given.

Example::

    mad = create_defense("mad", epsilon=0.5, norm="l1", surrogate=surrogate)
    served = mad(x, victim_probs)          # x: (B, C, H, W), victim_probs: (B, K)
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import Tensor, nn

from mirage.defenses.base import (
    Defense,
    DefenseContract,
    DefenseParams,
    Norm,
    distance,
    register_defense,
)
from mirage.defenses.mad.gram import full_network_gram, last_layer_gram_from_norms

log = logging.getLogger(__name__)

MAX_EPSILON = {"l1": 2.0, "l2": 2.0**0.5}


class MADParams(DefenseParams):
    epsilon: float = Field(0.5, ge=0, description="budget in the distance `norm`")
    norm: Norm = "l1"
    layers: Literal["last", "all"] = "last"
    objective: Literal["cosine", "surrogate"] = "cosine"
    jacobian: Literal["surrogate", "identity"] = "surrogate"
    oracle: Literal["extreme", "random"] = "extreme"
    surrogate: Any = Field(None, description="nn.Module; None: randomly initialised `architecture`")
    architecture: str = "lenet"
    head: str | None = Field(
        None,
        description="layers='last': the surrogate's final nn.Linear, by module name "
        "(None: mirage's `classifier`, else the last nn.Linear run)",
    )
    seed: int = 0
    kl_steps: int = Field(60, ge=1, description="bisection steps for the KL budget")

    @field_validator("surrogate")
    @classmethod
    def _module(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, nn.Module):
            raise ValueError("surrogate must be an nn.Module (or None for a random initialisation)")
        return value

    @model_validator(mode="after")
    def _budget(self) -> MADParams:
        limit = MAX_EPSILON.get(self.norm)
        if limit is not None and self.epsilon > limit + 1e-12:
            raise ValueError(f"{self.norm} budget above {limit:.4g} is vacuous on the simplex")
        return self


def objective_from_terms(cmc: Tensor, cmy: Tensor, ymy: Tensor, objective: str) -> Tensor:
    """The objective from ‖Gᵀc‖² (cmc), ⟨Gᵀc, Gᵀy⟩ (cmy): (B, S) and ‖Gᵀy‖² (ymy): (B, 1).
    A zero gradient vector normalises to the zero vector."""
    if objective == "surrogate":
        return cmc - 2 * cmy + ymy
    norm_c, norm_y = cmc.clamp_min(0).sqrt(), ymy.clamp_min(0).sqrt()
    nonzero_c, nonzero_y = (norm_c > 0).to(cmc.dtype), (norm_y > 0).to(cmc.dtype)
    cosine = cmy / (norm_c * norm_y).clamp_min(torch.finfo(cmc.dtype).tiny)
    return nonzero_c + nonzero_y - 2 * cosine * nonzero_c * nonzero_y


def candidate_objective(gram: Tensor, clean: Tensor, candidates: Tensor, objective: str) -> Tensor:
    """MAD objective of candidates ``(B, S, K)`` for clean rows ``(B, K)`` given M ``(B, K, K)``
    -> (B, S)."""
    my = gram @ clean.unsqueeze(2)  # (B, K, 1)
    cmy = (candidates @ my).squeeze(2)
    cmc = ((candidates @ gram) * candidates).sum(2)
    ymy = (clean.unsqueeze(1) @ my).squeeze(2)
    return objective_from_terms(cmc, cmy, ymy, objective)


def last_layer_vertex_objective(
    features_sq: Tensor, probs: Tensor, clean: Tensor, objective: str
) -> Tensor:
    """Objective at every vertex e_k for the last layer, O(BK): with M = ‖h‖²(I−1pᵀ)(I−p1ᵀ),
    ‖Gᵀe_k‖² = ‖h‖²‖e_k − p‖², ⟨Gᵀe_k, Gᵀy⟩ = ‖h‖²⟨e_k − p, y − p⟩, ‖Gᵀy‖² = ‖h‖²‖y − p‖².
    ``features_sq``: ‖h‖² (B,), ``probs``: surrogate p (B, K), ``clean``: y (B, K) -> (B, K)."""
    scale = features_sq.unsqueeze(1)
    p_sq = probs.pow(2).sum(1, keepdim=True)
    cmc = scale * (1 - 2 * probs + p_sq)
    cmy = scale * (clean - probs - (probs * clean).sum(1, keepdim=True) + p_sq)
    ymy = scale * (clean - probs).pow(2).sum(1, keepdim=True)
    return objective_from_terms(cmc, cmy, ymy, objective)


def last_layer_cosine_vertex(features_norm: Tensor, probs: Tensor, clean: Tensor) -> Tensor:
    """argmax_k of the cosine objective at the vertices e_k for the last layer, (B,) — the same
    choice as :func:`last_layer_vertex_objective` in a dozen ops (the per-query cost that matters
    at batch 1). The positive factors ‖h‖² and ‖y − p‖ cancel from the cosine, so the best vertex
    minimises ⟨e_k − p, y − p⟩ / ‖e_k − p‖. ``features_norm``: ‖h‖ (B,), only used so that when
    G = 0 (‖h‖ = 0) — as when y = p — every score is 0 and, like the general path, the first
    vertex is taken."""
    residual = clean - probs
    along = residual - (probs * residual).sum(1, keepdim=True)  # ⟨e_k − p, y − p⟩
    length_sq = torch.add(probs.square().sum(1, keepdim=True), probs, alpha=-2).add_(1)
    scale = (
        length_sq.clamp_min_(torch.finfo(probs.dtype).tiny)
        .rsqrt_()
        .mul_(features_norm.unsqueeze(1))
    )
    return (along * scale).argmin(1)


def move_to_vertex(clean: Tensor, vertex: Tensor, alpha: Tensor) -> Tensor:
    """(1 − α) y + α e_k per row: ``clean`` (B, K), ``vertex`` k (B,), ``alpha`` (B,)."""
    alpha = alpha.unsqueeze(1)
    return (clean * (1 - alpha)).scatter_add_(1, vertex.unsqueeze(1), alpha)


def head_features(
    model: nn.Module, x: Tensor, head: str | None = None
) -> tuple[Tensor, Tensor, str]:
    """(input h of the head, logits, the head's name) from one forward of any ``model``, with a
    forward hook on the head: the ``nn.Linear`` named ``head``, or else the last ``nn.Linear``
    the forward runs (MAD keeps the name found and hooks only it from then on).
    ``ValueError`` unless the head sees flat (B, H) features and its output is the logits (the
    closed form of ``layers="last"`` needs logits = W h + b)."""
    modules = dict(model.named_modules())
    if head is not None:
        if not isinstance(modules.get(head), nn.Linear):
            found = modules.get(head)
            raise ValueError(
                f"head {head!r} must name an nn.Linear of the surrogate, got "
                f"{type(found).__name__ if found is not None else 'no such module'}"
            )
        candidates = {head: modules[head]}
    else:
        candidates = {name: m for name, m in modules.items() if isinstance(m, nn.Linear)}
        if not candidates:
            raise ValueError(
                f"MAD layers='last' needs a final nn.Linear; {type(model).__name__} has none "
                "(pass head=<module name>, or use layers='all')"
            )
    calls: list[tuple[str, Tensor, Tensor]] = []

    def hook(name: str):
        def keep(module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> None:
            calls.append((name, args[0], out))

        return keep

    handles = [m.register_forward_hook(hook(name)) for name, m in candidates.items()]
    try:
        logits = model(x)
    finally:
        for handle in handles:
            handle.remove()
    if not calls:
        raise ValueError(
            f"the forward of {type(model).__name__} never ran {head or 'an nn.Linear'!r}"
        )
    name, features, out = calls[-1]
    if (
        features.ndim != 2
        or not isinstance(logits, Tensor)
        or (out is not logits and (out.shape != logits.shape or not torch.equal(out, logits)))
    ):
        raise ValueError(
            f"MAD layers='last': the output of nn.Linear {name!r} is not the model's logits "
            f"(or it does not see flat (B, H) features); pass head=<module name> or use "
            "layers='all'"
        )
    return features, logits, name


@register_defense("mad", params=MADParams)
class MAD(Defense[MADParams]):
    """MAD (ICLR 2020): move towards the simplex vertex of largest angular gradient deviation."""

    @classmethod
    def contract_for(cls, params: MADParams) -> DefenseContract:
        """The budget is dist_norm(y, ỹ) ≤ ε. Only the surrogate's Jacobian needs the images, and
        only the random-oracle ablation draws from a generator that advances per request."""
        return DefenseContract(
            needs_input=params.jacobian == "surrogate" and params.oracle == "extreme",
            stateful=params.oracle == "random",
            budget=params.epsilon,
            norm=params.norm,
        )

    def __init__(self, params: MADParams | None = None, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        p = self.params
        self.surrogate: nn.Module | None = p.surrogate.eval() if p.surrogate is not None else None
        self.generator = torch.Generator().manual_seed(p.seed)
        self._dtype = (
            next(p.surrogate.parameters()).dtype if p.surrogate is not None else torch.float32
        )
        self._head: str | None = None  # the head found on the first call (head_features)

    def perturb(self, x: Tensor | None, probs: Tensor) -> Tensor:
        y = probs.double()
        vertex = self.vertex(x, y)
        return move_to_vertex(y, vertex, self.vertex_step(y, vertex)).to(probs.dtype)

    # -- pieces, public so tests and benchmarks can check them one by one -------------------

    def gram(self, x: Tensor | None, y: Tensor) -> Tensor:
        """M = G Gᵀ per query, (B, K, K) float64."""
        b, k = y.shape
        if self.params.jacobian == "identity":
            return torch.eye(k, dtype=torch.float64, device=y.device).expand(b, k, k)
        if self.params.layers == "last":
            features, logits = self._last_layer(x, k)
            return last_layer_gram_from_norms(
                features.square().sum(1), torch.softmax(logits, dim=1)
            )
        x = self._input(x)
        model = self._surrogate(x, k)
        gram, surrogate_probs = full_network_gram(model, x.to(self._dtype), num_classes=k)
        self._check_classes(surrogate_probs, k)
        return gram.double()

    def vertex(self, x: Tensor | None, y: Tensor) -> Tensor:
        """The index k of y* = e_k per query, (B,)."""
        b, k = y.shape
        if self.params.oracle == "random":
            return torch.randint(0, k, (b,), generator=self.generator).to(y.device)
        if self.params.jacobian == "surrogate" and self.params.layers == "last":
            features, logits = self._last_layer(x, k)
            probs = torch.softmax(logits, dim=1)
            if self.params.objective == "cosine":
                return last_layer_cosine_vertex(torch.linalg.vector_norm(features, dim=1), probs, y)
            return last_layer_vertex_objective(
                features.square().sum(1), probs, y, self.params.objective
            ).argmax(1)
        vertices = torch.eye(k, dtype=y.dtype, device=y.device).expand(b, k, k)
        return candidate_objective(self.gram(x, y), y, vertices, self.params.objective).argmax(1)

    def target(self, x: Tensor | None, y: Tensor) -> Tensor:
        """y* per query, (B, K)."""
        return nn.functional.one_hot(self.vertex(x, y), y.shape[1]).to(y.dtype)

    def vertex_step(self, y: Tensor, vertex: Tensor) -> Tensor:
        """:meth:`step` towards y* = e_k, with ‖e_k − y‖ in closed form for L1 and L2, (B,)."""
        eps, norm = self.params.epsilon, self.params.norm
        if norm == "kl":
            return self.step(y, nn.functional.one_hot(vertex, y.shape[1]).to(y.dtype))
        y_k = y.gather(1, vertex.unsqueeze(1)).squeeze(1)
        if norm == "l1":  # ‖e_k − y‖₁ = 2 (1 − y_k)
            length = (1 - y_k).mul_(2)
        else:  # ‖e_k − y‖₂² = 1 − 2 y_k + ‖y‖²
            length = torch.add(y.square().sum(1), y_k, alpha=-2).add_(1).clamp_min_(0).sqrt_()
        return (eps / length.clamp_min(1e-300)).clamp_max_(1)

    def _last_layer(self, x: Tensor | None, k: int) -> tuple[Tensor, Tensor]:
        """One surrogate forward: (features h (B, H), logits (B, K)), float64. h is the input of
        the head, the final ``nn.Linear`` whose output must be the logits (docs/design.md §mad)."""
        from mirage.models.base import ImageClassifier

        x = self._input(x)
        model = self._surrogate(x, k)
        x = x if x.dtype == self._dtype else x.to(self._dtype)
        with torch.inference_mode():
            if self.params.head is None and isinstance(model, ImageClassifier):
                features = model.features(x)
                logits = model.classifier(features)
            else:
                features, logits, self._head = head_features(
                    model, x, self.params.head or self._head
                )
        self._check_classes(logits, k)
        return features.double(), logits.double()

    def step(self, y: Tensor, target: Tensor) -> Tensor:
        """Largest α ∈ [0, 1] with dist(y, (1−α)y + αy*) ≤ ε, (B,)."""
        eps, norm = self.params.epsilon, self.params.norm
        if norm in ("l1", "l2"):
            length = distance(y, target, norm)
            return torch.where(
                length > eps, eps / length.clamp_min(1e-300), torch.ones_like(length)
            )
        low = torch.zeros(y.shape[0], dtype=y.dtype, device=y.device)
        high = torch.ones_like(low)
        done = distance(y, target, "kl") <= eps
        low = torch.where(done, high, low)
        for _ in range(self.params.kl_steps):  # KL(y ‖ ỹ(α)) is convex, increasing in α
            mid = (low + high) / 2
            feasible = distance(y, y + mid.unsqueeze(1) * (target - y), "kl") <= eps
            low = torch.where(feasible, mid, low)
            high = torch.where(feasible, high, mid)
        return low

    def _surrogate(self, x: Tensor, num_classes: int) -> nn.Module:
        if self.surrogate is None:
            from mirage.models import create_model

            channels = x.shape[1]
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.params.seed)
                self.surrogate = create_model(
                    self.params.architecture,
                    tuple(x.shape[1:]),
                    num_classes,
                    [0.0] * channels,
                    [1.0] * channels,
                ).eval()
            self._dtype = next(self.surrogate.parameters()).dtype
            log.info(
                "MAD: randomly initialised %s surrogate (seed %d)",
                self.params.architecture,
                self.params.seed,
            )
        return self.surrogate

    @staticmethod
    def _check_classes(surrogate_out: Tensor, k: int) -> None:
        if surrogate_out.shape[1] != k:
            raise ValueError(f"surrogate has {surrogate_out.shape[1]} classes but probs have {k}")
