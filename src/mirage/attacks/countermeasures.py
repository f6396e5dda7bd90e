"""What a defense-aware attacker does about a defense (SPEC section 4), each a switch.

Every attack's parameters inherit these fields, so any attack can be combined with any of them:

* ``hard_labels``: train on argmax labels only (one-hot rows). The hard-label attacker bounds
  what any top-1-preserving defense can achieve (MAD paper, section 5.2 and Fig. A2): always
  report it next to the soft-label attacker.
* ``architecture`` (+ ``arch_kwargs``): a clone architecture other than the victim's.
* ``optimizer="adam"``: Adam (lr ``adam_lr``, no weight decay, cosine) instead of the SGD recipe.
* ``augment``: random ±2-pixel translations while training the clone.
* ``repeats=n``: send each image n times and average the answers; defeats zero-mean random
  defenses at n× the query cost (the budget counts every repetition).
* ``budget_factor=f``: spend f× the nominal budget.
* ``restarts=n``: train n clones with different seeds and keep the one that fits the transfer set
  best — the attacker's answer to a defense that makes clone training stall (n× the training cost,
  no extra queries).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from mirage.attacks.clone import CloneSpec


class Countermeasures(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    hard_labels: bool = False
    architecture: str | None = None
    arch_kwargs: dict[str, Any] | None = None
    optimizer: Literal["sgd", "adam"] | None = None
    adam_lr: float = Field(1e-3, gt=0)
    augment: bool = False
    repeats: int = Field(1, ge=1)
    budget_factor: float = Field(1.0, gt=0)
    restarts: int = Field(1, ge=1)

    def active(self) -> dict[str, Any]:
        """The switches that differ from the plain attacker (for labels and logs)."""
        defaults = Countermeasures()
        return {name: getattr(self, name) for name in Countermeasures.model_fields
                if getattr(self, name) != getattr(defaults, name)}


def apply_countermeasures(params: Countermeasures, clone: CloneSpec, budget: int
                          ) -> tuple[CloneSpec, int]:
    """Return the clone spec and the total query budget after the switches of ``params``.

    ``hard_labels`` and ``repeats`` act on the answers and are applied by the query client.
    """
    update: dict[str, Any] = {}
    training: dict[str, Any] = {}
    if params.architecture is not None:
        update["architecture"] = params.architecture
        update["arch_kwargs"] = dict(params.arch_kwargs or {})
    elif params.arch_kwargs is not None:
        update["arch_kwargs"] = dict(params.arch_kwargs)
    if params.optimizer == "adam":
        training.update(optimizer="adam", lr=params.adam_lr, weight_decay=0.0, schedule="cosine")
    elif params.optimizer == "sgd":
        training.update(optimizer="sgd")
    if params.augment:
        training["augment"] = True
    if training:
        update["training"] = clone.training.model_copy(update=training)
    if params.restarts != 1:
        update["restarts"] = params.restarts
    total = int(budget * params.budget_factor)
    if total < 1:
        raise ValueError(f"budget {budget} × budget_factor {params.budget_factor} leaves no queries")
    return (clone.model_copy(update=update) if update else clone), total
