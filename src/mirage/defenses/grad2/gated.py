"""GRAD² gated on how attacker-like a query looks (docs/design.md §grad2-gated).

Redirection is the best use of a budget (Mazeika et al., ICML 2022), so spend a large one exactly
where a query looks unlike the defender's own traffic and a small, top-1-keeping one elsewhere:

    s(x) = gate score (higher = more in-distribution),  τ = the benign false-positive quantile,
    ỹ = GRAD²(ε_low, top-1 kept)(x, y)      if s(x) ≥ τ,
    ỹ = GRAD²(ε_high, label-changing)(x, y) if s(x) < τ.

Gate scores: ``msp`` — the victim's max softmax, read from the answer itself (no model needed);
``oe-msp`` — the max softmax of an outlier-exposure detector (adaptive misinformation's,
Kariyappa & Qureshi 2020); ``max-logit`` and ``neg-energy`` (logsumexp of the logits, Liu et al.,
NeurIPS 2020) of ``gate_model`` (the victim). τ is a parameter; :func:`benign_threshold` sets it
from held-out benign scores at a target false-positive rate (the resolver does).

Above the gate, ``attacker_answer`` says what is served:

- ``"redirect"``: GRAD² with ε_high and labels free to change (the JVP scores pick where the mass
  goes; at ε_high = 2 the answer is the one-hot of the best-scoring class).
- ``"permute"``: the limit of redirection towards a *behaviour* the defender chose, t(x) =
  π(f(x)) — the victim's own posterior with its classes moved by a keyed derangement π (class j's
  probability goes to π(j)). When ε_high ≥ ‖t − y‖₁ the attacker's training gradient on the
  answer is that behaviour's own, the most any redirection can align it; otherwise the answer
  moves along the segment, ỹ = y + min(1, ε_high/‖t − y‖₁)(t − y). Every flagged label is wrong
  in the same learnable way, so a hard-label or noise-robust clone learns π∘f rather than noise,
  and the answer keeps the victim's confidence profile, so neither its shape nor its top
  probability shows which branch made it. π is a secret (``seed``); an attacker holding labelled
  in-distribution images could estimate a global π and undo it (docs/design.md §grad2-gated).
- ``"scramble"``: the limit of redirection towards a behaviour that carries *no* information
  about the class, t(x) = the victim's posterior with its classes moved by a permutation σ_x drawn
  uniformly among all K! by a keyed hash of the query itself (:func:`keyed_query_permutations`).
  Its top-1 is then uniform over the K classes whatever the true class, so no global realignment,
  noise-robust loss, repetition or averaging of flagged answers recovers anything from them: an
  attacker learns only from the queries the gate lets through. The same query always gets the
  same answer; the budget and the segment rule are those of ``"permute"``.

A per-query gate still answers an attacker truthfully on the queries it lets through, and those
alone train a clone. With ``alarm_rate`` set, the gate also judges the *stream* (the instance's
whole history; the service keeps one instance per client): after each query it tests whether the
number of flagged queries so far exceeds what a benign client flagged at rate ``alarm_rate`` would
send, P(Binomial(n, alarm_rate) ≥ flagged) < ``alarm_alpha``, and from the first query at which it
does every later answer is the attacker's (:meth:`GatedGrad2.observe_stream`). The state is two
counts and the alarm position: O(1) per client.

Both GRAD² branches are registered instances called through :meth:`Defense.__call__`, so every
row is checked against its own branch's contract (ε_low and top-1 below the gate, ε_high above),
and the whole answer against this defense's (simplex, max(ε_low, ε_high)).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import Tensor, nn

from mirage.defenses.base import Defense, DefenseContract, DefenseParams, register_defense
from mirage.defenses.grad2.defense import Grad2, Grad2Params
from mirage.defenses.grad2.targets import TargetName
from mirage.defenses.redirect import TOP1_MARGIN

GateName = Literal["msp", "oe-msp", "max-logit", "neg-energy"]
AttackerAnswer = Literal["redirect", "permute", "scramble"]


class GatedGrad2Params(DefenseParams):
    epsilon_low: float = Field(0.5, ge=0, le=2, description="L1 budget below the gate (top-1 kept)")
    epsilon_high: float = Field(
        2.0, ge=0, le=2, description="L1 budget above the gate (labels may change)"
    )
    tau: float = Field(0.5, description="attacker-like when the gate score is below τ")
    gate_score: GateName = "msp"
    gate_model: Any = Field(None, description="nn.Module scoring the gate (all gates but msp)")
    attacker_answer: AttackerAnswer = Field(
        "redirect",
        description="above the gate: GRAD² redirection, or the posterior moved by a keyed "
        "derangement (permute) or by a permutation keyed on the query (scramble)",
    )
    target: TargetName = "all-ones"
    surrogate: Any = None
    reference_x: Any = None
    reference_y: Any = None
    watermark_x: Any = None
    watermark_y: Any = None
    target_vector: Any = None
    top1_margin: float = Field(TOP1_MARGIN, ge=0, lt=0.5)
    batch_size: int = Field(256, ge=1)
    seed: int = 0
    alarm_rate: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="per-client alarm: the flag rate a benign client stays under (None: no alarm)",
    )
    alarm_alpha: float = Field(
        1e-9, gt=0, lt=1, description="the alarm's false-positive level per client stream"
    )

    @field_validator("gate_model")
    @classmethod
    def _module(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, nn.Module):
            raise ValueError("gate_model must be an nn.Module")
        return value

    @model_validator(mode="after")
    def _gate_needs_model(self) -> GatedGrad2Params:
        if self.gate_score != "msp" and self.gate_model is None:
            raise ValueError(f"gate_score {self.gate_score!r} needs gate_model")
        return self

    def branch(self, *, high: bool) -> Grad2Params:
        shared = {
            k: getattr(self, k)
            for k in (
                "target",
                "surrogate",
                "reference_x",
                "reference_y",
                "watermark_x",
                "watermark_y",
                "target_vector",
                "top1_margin",
                "batch_size",
                "seed",
            )
        }
        return Grad2Params(
            epsilon=self.epsilon_high if high else self.epsilon_low,
            preserve_top1=not high,
            **shared,
        )


@torch.no_grad()
def gate_scores(gate: GateName, x: Tensor | None, probs: Tensor, model: nn.Module | None) -> Tensor:
    """(B,) gate scores, higher = more in-distribution."""
    if gate == "msp":
        return probs.max(1).values
    if x is None or model is None:
        raise ValueError(f"gate {gate!r} needs the query images and a gate model")
    model.eval()
    logits = model(x.to(next(model.parameters()).dtype)).to(probs.dtype)
    if gate == "oe-msp":
        return torch.softmax(logits, 1).max(1).values
    if gate == "max-logit":
        return logits.max(1).values
    return torch.logsumexp(logits, 1)


def benign_threshold(scores: Tensor, false_positive_rate: float) -> float:
    """τ such that a fraction ``false_positive_rate`` of benign ``scores`` falls below it."""
    if not 0 <= false_positive_rate < 1:
        raise ValueError("false_positive_rate must lie in [0, 1)")
    return float(torch.quantile(scores.double(), false_positive_rate))


def keyed_derangement(num_classes: int, seed: int) -> Tensor:
    """(K,) a permutation π of the classes with π(j) ≠ j for every j, uniform among derangements
    (rejection sampling from a seeded generator: about e ≈ 2.7 draws on average)."""
    if num_classes < 2:
        raise ValueError("a derangement needs at least two classes")
    generator = torch.Generator().manual_seed(seed)
    classes = torch.arange(num_classes)
    while True:
        permutation = torch.randperm(num_classes, generator=generator)
        if (permutation != classes).all():
            return permutation


def keyed_query_permutations(x: Tensor, num_classes: int, seed: int) -> Tensor:
    """(B, K) one permutation of the classes per query, a keyed pseudo-random function of the query.

    The fractional parts of a keyed Gaussian projection of the flattened input (plus a keyed
    offset, so that a blank image is scrambled too), scaled by 2¹⁶, are close to independent
    uniforms, and their argsort is close to a uniform permutation. Computed in float64, so a
    query's permutation does not depend on the batch it came in; any change to the query (a
    jittered copy) draws a fresh one."""
    flat = x.reshape(len(x), -1).double()
    generator = torch.Generator().manual_seed(seed)
    projection = torch.randn(
        flat.shape[1] + 1, num_classes, generator=generator, dtype=torch.float64
    )
    scores = flat @ projection[1:].to(flat.device) + projection[0].to(flat.device)
    return torch.frac(scores.abs() * 65536.0).argsort(1)


def permuted_answer(probs: Tensor, permutation: Tensor, epsilon: float) -> Tensor:
    """(B, K) the answer moved towards t = probs with class j's mass at ``permutation[j]`` (one
    permutation (K,) for every row, or one per row (B, K)), as far as the L1 budget ``epsilon``
    allows: y + min(1, ε/‖t − y‖₁)(t − y), on the simplex."""
    target = torch.empty_like(probs)
    if permutation.dim() == 1:
        target[:, permutation] = probs
    else:
        target.scatter_(1, permutation, probs)
    distance = (target - probs).abs().sum(1, keepdim=True)
    step = torch.where(
        distance > epsilon, epsilon / distance.clamp_min(1e-12), torch.ones_like(distance)
    )
    return probs + step * (target - probs)


@register_defense("grad2_gated", params=GatedGrad2Params)
class GatedGrad2(Defense[GatedGrad2Params]):
    """GRAD² with an out-of-distribution gate: top-1-keeping below it, label-changing above."""

    @classmethod
    def contract_for(cls, params: GatedGrad2Params) -> DefenseContract:
        """Stateful as GRAD² is (with a surrogate ensemble); the budget is the larger branch's."""
        ensemble = isinstance(params.surrogate, Sequence) and len(params.surrogate) > 1
        return DefenseContract(
            needs_input=True,
            keeps_top1=False,
            stateful=ensemble or params.alarm_rate is not None,
            budget=max(params.epsilon_low, params.epsilon_high),
        )

    def __init__(self, params: GatedGrad2Params | None = None, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.low = Grad2(self.params.branch(high=False))
        self.high = Grad2(self.params.branch(high=True))
        self.queries_seen = 0
        self.queries_flagged = 0
        self.alarm_at: int | None = None  # the 1-based position in the stream of the alarming query

    @property
    def alarmed(self) -> bool:
        return self.alarm_at is not None

    @property
    def stream_alarm(self) -> int | None:
        return self.alarm_at

    def for_new_client(self) -> GatedGrad2:
        """With ``alarm_rate``, a fresh stream (the same parameters and models); else this one."""
        return self if self.params.alarm_rate is None else type(self)(self.params)

    def alarm_position(self, flagged: Tensor) -> int | None:
        """Index into this batch of the first query at which the stream's flag count becomes
        significant (one-sided binomial test against ``alarm_rate`` at ``alarm_alpha``), or None."""
        from scipy.stats import binom  # scipy.stats takes ~0.6 s to import: only for a stream alarm

        n = self.queries_seen + torch.arange(1, len(flagged) + 1)
        count = self.queries_flagged + flagged.long().cumsum(0)
        tail = binom.sf(count.numpy() - 1, n.numpy(), self.params.alarm_rate)  # P(X ≥ count)
        hits = (tail < self.params.alarm_alpha).nonzero()[0]
        return int(hits[0]) if len(hits) else None

    def permutation(self, num_classes: int) -> Tensor:
        """The keyed derangement π of ``attacker_answer="permute"`` (from ``seed``: the same π on
        every call)."""
        return keyed_derangement(num_classes, self.params.seed)

    def attacker_like(self, x: Tensor, probs: Tensor) -> Tensor:
        """(B,) bool: the rows the gate sends to the label-changing branch."""
        return (
            gate_scores(self.params.gate_score, x, probs, self.params.gate_model) < self.params.tau
        )

    def perturb(self, x: Tensor | None, probs: Tensor) -> Tensor:
        x = self._input(x)
        high = self.attacker_like(x, probs)
        if self.params.alarm_rate is None:
            return self._serve(x, probs, high)
        before = (self.queries_seen, self.queries_flagged, self.alarm_at)
        try:
            return self._serve(x, probs, self.observe_stream(high))
        except BaseException:  # a request that is not answered does not count in the stream
            self.queries_seen, self.queries_flagged, self.alarm_at = before
            raise

    def _serve(self, x: Tensor, probs: Tensor, high: Tensor) -> Tensor:
        served = torch.empty_like(probs)
        if (~high).any():
            served[~high] = self.low(x[~high], probs[~high])
        if high.any():
            if self.params.attacker_answer == "permute":
                served[high] = permuted_answer(
                    probs[high],
                    self.permutation(probs.shape[1]).to(probs.device),
                    self.params.epsilon_high,
                )
            elif self.params.attacker_answer == "scramble":
                permutations = keyed_query_permutations(x[high], probs.shape[1], self.params.seed)
                served[high] = permuted_answer(probs[high], permutations, self.params.epsilon_high)
            else:
                served[high] = self.high(x[high], probs[high])
        return served

    def observe_stream(self, flagged: Tensor) -> Tensor:
        """The next request of this client's stream, flagged by the gate as ``flagged`` (B,):
        which of its rows get the attacker's answer (every row from the alarm on). The stream's
        counts advance by this request, with the flags the gate gave."""
        served_high = flagged.clone()
        if self.alarm_at is None:
            first = self.alarm_position(flagged.cpu())
            if first is not None:
                self.alarm_at = self.queries_seen + first + 1
                served_high[first:] = True
        else:
            served_high[:] = True
        self.queries_seen += len(flagged)
        self.queries_flagged += int(flagged.sum())
        return served_high
