"""What a defense-aware attacker does about a defense (docs/design.md §countermeasures), each a
switch.

Every attack's parameters inherit these fields, so any attack can be combined with any of them:

* ``hard_labels``: train on argmax labels only (one-hot rows). The hard-label attacker bounds
  what any top-1-preserving defense can achieve (MAD paper, section 5.2 and Fig. A2): always
  report it next to the soft-label attacker.
* ``architecture`` (+ ``arch_kwargs``): a clone architecture other than the victim's.
* ``optimizer="adam"``: Adam (lr ``adam_lr``, no weight decay, cosine) instead of the SGD recipe.
* ``augment``: random ±2-pixel translations while training the clone.
* ``repeats=n``: send each image n times and average the answers; defeats zero-mean random
  defenses at n× the query cost (the budget counts every repetition).
* ``jitter=σ`` (with ``repeats``): query averaging under small random augmentations, the
  "smoothing" attacker of ModelGuard's adaptive suite (Tang et al., USENIX Security 2024): every
  repetition but the first is the image shifted by up to one pixel plus Gaussian noise of
  standard deviation σ, so a defense that answers identical queries identically (most do) is
  still averaged over nearby inputs.
* ``robust_loss``: train the clone with a loss that tolerates wrong labels, against
  label-changing defenses — ``"gce"``, the generalized cross-entropy of Zhang & Sabuncu
  (NeurIPS 2018), Σ_k t_k (1 − p_k^q)/q with ``gce_q``; or ``"bootstrap"``, soft bootstrapping
  (Reed et al., ICLR 2015 workshop), cross-entropy against β·t + (1 − β)·p_θ with
  ``bootstrap_beta``.
* ``restorer``: the D-DAE-style posterior restorer (:mod:`mirage.attacks.restorer`): the
  attacker knows the defense's name and public parameters (Kerckhoffs), simulates it on shadow
  victims of its own, learns to map perturbed answers back to clean ones and trains the clone on
  restored answers.
* ``min_confidence=c``: train the clone only on answers whose top probability is at least c —
  the attacker against an out-of-distribution gate that changes the labels of queries it
  doubts, betting that confident answers are the untouched ones (the discarded queries still
  count).
* ``mix_benign=f``: the attacker against a query-stream detector (PRADA, docs/design.md
  §detection) makes a fraction f of its stream decoys — natural images of its own data (the
  Knockoff pool, JBDA's seed source) interleaved with every request
  (:mod:`mirage.attacks.streams`). Every decoy counts against the budget; its answer joins the
  final clone's transfer set.
* ``api_keys=k``: the attacker spreads its budget over k API keys, requests round-robin, so a
  per-key detector sees only about 1/k of the stream (the distances, classes and Shapiro–Wilk
  test of one key never include another key's queries). ``Attack.run`` builds the k − 1 extra
  keys of an in-process API with ``InProcessAPI.for_client``; over HTTP the caller passes one
  ``HTTPPredictionAPI`` per key.
* ``align_labels=n``: the attacker also holds n labelled images of the victim's task (never
  queried, no budget) and, after training, undoes a consistent relabelling its clone's confusions
  on them reveal (:mod:`mirage.attacks.alignment`) — against a defense that answers attacker-like
  queries with a fixed wrong behaviour rather than noise.
* ``budget_factor=f``: spend f× the nominal budget.
* ``restarts=n``: train n clones with different seeds and keep the one that fits the transfer set
  best — the attacker's answer to a defense that makes clone training stall (n× the training cost,
  no extra queries).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mirage.attacks.clone import CloneSpec


class RestorerConfig(BaseModel):
    """The posterior restorer's knowledge and cost (:mod:`mirage.attacks.restorer`).

    ``defense`` / ``defense_params``: what the attacker knows of the defense — its registered
    name and public parameters (budget, target, threshold); secrets (surrogates, reference sets,
    detectors, seeds, keys) are never passed and the attacker builds its own. The benchmark fills
    both from the run's defense when they are left empty.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    defense: str | None = None
    defense_params: dict[str, Any] = Field(default_factory=dict)
    shadows: int = Field(2, ge=1, description="shadow victims the restorer learns from")
    shadow_epochs: int = Field(5, ge=1, description="epochs of each shadow's training")
    surrogate_epochs: int = Field(
        1, ge=1, description="the attacker's own surrogate: a shadow stopped after this many epochs"
    )
    pairs: int = Field(4000, ge=16, description="(perturbed, clean) pairs per shadow")
    features: bool = Field(
        True,
        description="the restorer also sees the shadow's logits on the "
        "image (answer + image features), not only the answer",
    )
    epochs: int = Field(40, ge=1, description="restorer training epochs")
    hidden: int = Field(128, ge=8)

    @model_validator(mode="after")
    def _features_need_two_shadows(self) -> RestorerConfig:
        if self.features and self.shadows < 2:
            raise ValueError("features come from another shadow than the one restored: shadows ≥ 2")
        return self


class Countermeasures(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    hard_labels: bool = False
    architecture: str | None = None
    arch_kwargs: dict[str, Any] | None = None
    optimizer: Literal["sgd", "adam"] | None = None
    adam_lr: float = Field(1e-3, gt=0)
    augment: bool = False
    repeats: int = Field(1, ge=1)
    jitter: float = Field(0.0, ge=0, le=0.5)
    robust_loss: Literal["gce", "bootstrap"] | None = None
    gce_q: float = Field(0.7, gt=0, le=1)
    bootstrap_beta: float = Field(0.8, gt=0, le=1)
    restorer: RestorerConfig | None = None
    min_confidence: float | None = Field(None, gt=0, le=1)
    mix_benign: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="fraction of the query stream that is "
        "benign decoys from the attacker's own data (counted in the budget)",
    )
    api_keys: int = Field(
        1,
        ge=1,
        le=1000,
        description="API keys the budget is spread over, "
        "requests round-robin (one view per key of an in-process API)",
    )
    align_labels: int | None = Field(
        None,
        ge=1,
        description="labelled images of the task the attacker "
        "holds to undo a consistent relabelling",
    )
    flatten: bool = Field(
        False,
        description="train on each answer's top-1 and its probability only, the rest "
        "spread evenly (after the restorer, if any): no dark knowledge",
    )
    budget_factor: float = Field(1.0, gt=0)
    restarts: int = Field(1, ge=1)

    def active(self) -> dict[str, Any]:
        """The switches that differ from the plain attacker (for labels and logs)."""
        defaults = Countermeasures()
        return {
            name: (value.model_dump() if isinstance(value, BaseModel) else value)
            for name in Countermeasures.model_fields
            if (value := getattr(self, name)) != getattr(defaults, name)
        }

    @model_validator(mode="after")
    def _jitter_needs_repeats(self) -> Countermeasures:
        if self.jitter > 0 and self.repeats < 2:
            raise ValueError("jitter perturbs repeated queries: set repeats ≥ 2 with it")
        if self.flatten and self.hard_labels:
            raise ValueError(
                "flatten keeps the top-1 probability of soft answers: not with hard_labels"
            )
        return self


ATTACKER_SUITE: dict[str, dict[str, Any]] = {
    "soft": {},
    "hard-label": {"hard_labels": True},
    "averaging": {"repeats": 3, "jitter": 0.02},
    "restorer": {"restorer": {}},
    "noise-robust": {"robust_loss": "gce"},
    "confident-only": {"min_confidence": 0.9},
    "mixing": {"mix_benign": 0.3},
    "multi-key": {"api_keys": 4},
    "multi-key-hard-label": {"api_keys": 4, "hard_labels": True},
    "aligned": {"align_labels": 100, "robust_loss": "gce"},
    "flattened": {"flatten": True},
    "flattened-restorer": {"restorer": {}, "flatten": True},
}
"""The named attacker variants a defense is judged against, each a set of countermeasure switches
usable with every attack (``create_attack("knockoff", variant="averaging")``, a sweep's
``variants = [...]``, ``mirage attack --variant``). A defense's verdict is its worst case over
them (:mod:`mirage.bench.summary`): the naive soft-label attacker; the hard-label one, which
bounds every top-1-keeping defense; query averaging over 3 jittered copies (the 3 queries count
against the budget); the D-DAE-style posterior restorer (``restorer.defense`` filled from the
defense attacked); noise-robust clone training with the generalized cross-entropy; the
attacker that trains only on confident answers (top probability ≥ 0.9); and two attackers of a
query-stream detector (docs/design.md §detection): ``mixing``, whose stream is 30 % natural
decoys (they count against the budget and join the transfer set), and ``multi-key``, which
spreads its budget round-robin over 4 API keys (against an API without a detector it gets the
soft attacker's answers; over HTTP it needs one ``HTTPPredictionAPI`` per key), and
``multi-key-hard-label``, the same keys with argmax labels, against a gate whose passes keep the
top-1 (where the hard-label attacker binds); and ``aligned``,
the noise-robust attacker holding 100 labelled images of the task (``Attack.run(labelled=...)``;
the benchmark draws them from the victim's training split) to undo a consistent relabelling: the
generalized cross-entropy lets its first clone learn the relabelling without the minority of true
labels, and its realigned clone shrug off those labels once they are the wrong ones; ``flattened``,
which trains on each answer's top-1 and its probability with the rest spread evenly, so that no
keyed runner-up (docs/design.md §ownership) reaches its clone, and ``flattened-restorer``, which
restores the answers first, then flattens them."""


def variant_params(variant: str) -> dict[str, Any]:
    """The countermeasure switches of a named attacker variant (a fresh dict)."""
    if variant not in ATTACKER_SUITE:
        raise ValueError(f"unknown attacker variant {variant!r}; known: {sorted(ATTACKER_SUITE)}")
    return {k: (dict(v) if isinstance(v, dict) else v) for k, v in ATTACKER_SUITE[variant].items()}


def apply_countermeasures(
    params: Countermeasures, clone: CloneSpec, budget: int
) -> tuple[CloneSpec, int]:
    """Return the clone spec and the total query budget after the switches of ``params``.

    ``hard_labels``, ``repeats``, ``jitter`` and ``mix_benign`` act on the queries and answers
    and are applied by the query client, ``api_keys`` by :meth:`mirage.attacks.Attack.run`;
    ``restorer`` and ``flatten`` by :meth:`mirage.attacks.Attack.train_final_clone`.
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
    if params.robust_loss == "gce":
        update.update(loss="gce", loss_param=params.gce_q)
    elif params.robust_loss == "bootstrap":
        update.update(loss="bootstrap", loss_param=params.bootstrap_beta)
    total = int(budget * params.budget_factor)
    if total < 1:
        raise ValueError(
            f"budget {budget} × budget_factor {params.budget_factor} leaves no queries"
        )
    return (clone.model_copy(update=update) if update else clone), total
