"""The attack interface (docs/design.md §attack-contract) and the registry every consumer reads.

An attack talks only to a :class:`~mirage.api.PredictionAPI`, spends at most an exact query
budget, and returns the trained clone with a record of what it spent::

    attack = create_attack("knockoff", hard_labels=True)
    result = attack.run(api, budget=10_000, data=pool, clone=CloneSpec.like(card), seed=0)
    result.clone, result.queries, result.effective_l1

:meth:`Attack.run` is final in spirit (like :class:`~mirage.defenses.Defense.__call__`): it wraps
the API in a :class:`QueryClient` that refuses any request past the budget, applies the
countermeasure switches (:mod:`mirage.attacks.countermeasures`), runs the subclass's
:meth:`Attack.steal`, and checks the spend afterwards — no attack can overspend.

Adding an attack is one file::

    class MyParams(AttackParams):
        rounds: int = 3

    @register_attack("mine", params=MyParams)
    class Mine(Attack):
        def steal(self, client, data, clone, generator): ...
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from mirage.api.base import PredictionAPI
from mirage.attacks.clone import CloneSpec, train_clone, training_targets
from mirage.attacks.countermeasures import Countermeasures, apply_countermeasures, variant_params
from mirage.attacks.streams import DecoyPool, decoy_fraction, decoy_mask, decoys_before, key_apis
from mirage.data.base import ImageData
from mirage.models.base import ImageClassifier
from mirage.models.fit import random_shift
from mirage.registry import Registry, typed_params


class AttackParams(Countermeasures):
    """Typed, validated parameters of an attack. Unknown keys are errors.

    Every attack inherits the countermeasure switches of :class:`Countermeasures`
    (``hard_labels``, ``architecture``, ``optimizer``, ``augment``, ``repeats``, ``jitter``,
    ``robust_loss``, ``restorer``, ``min_confidence``, ``mix_benign``, ``api_keys``,
    ``budget_factor``, ``restarts``).
    """


class BudgetExhausted(RuntimeError):
    """An attack asked for more queries than its budget allows (a bug in the attack)."""


class QueryClient:
    """The attacker's side of the API: spends at most ``budget`` queries, never one more.

    Each image asked is sent ``repeats`` times and the answers averaged (a countermeasure against
    random defenses), so one image costs ``repeats`` queries; with ``jitter`` σ > 0 every
    repetition after the first is a jittered copy (:func:`jitter_images`: query averaging under
    small augmentations). With ``hard_labels`` the attacker keeps only the argmax of the
    (averaged) answer, as a one-hot row.

    Against a query-stream detector (docs/design.md §countermeasures,
    :mod:`mirage.attacks.streams`):

    * ``mix_benign`` f: a fraction f of the images sent are decoys from ``decoys`` (the attacker's
      own natural images), interleaved with the attack's images inside each request at the
      stream positions the schedule fixes. A decoy costs what any image costs (``repeats``
      queries), so :attr:`remaining` counts only the attack's images the budget still allows; the
      decoys after the attack's last image are sent with its last request, so an attack that
      asks all of :attr:`remaining` spends the budget exactly. The decoys' answers are kept
      (:meth:`decoy_set`) and :meth:`Attack.train_final_clone` adds them to the transfer set;
    * several APIs, one per key: successive requests go round-robin over them (a request whole to
      one key); :attr:`spent_per_key` says what each key was charged.

    Args:
        api: the prediction API, or a sequence of them (one per API key).
        budget: the exact number of API queries this attack may spend, over all keys.
        decoys: (N, C, H, W) natural images to draw decoys from (needed when ``mix_benign > 0``).
        decoy_generator: seeds the decoys' order.
    """

    def __init__(
        self,
        api: PredictionAPI | Sequence[PredictionAPI],
        budget: int,
        *,
        repeats: int = 1,
        hard_labels: bool = False,
        jitter: float = 0.0,
        generator: torch.Generator | None = None,
        mix_benign: float = 0.0,
        decoys: Tensor | None = None,
        decoy_generator: torch.Generator | None = None,
    ) -> None:
        if budget < 0:
            raise ValueError(f"budget must be non-negative, got {budget}")
        if repeats < 1:
            raise ValueError(f"repeats must be at least 1, got {repeats}")
        if jitter < 0:
            raise ValueError(f"jitter must be non-negative, got {jitter}")
        self.apis = key_apis(api)
        self.budget = int(budget)
        self.repeats = int(repeats)
        self.hard_labels = hard_labels
        self.jitter = float(jitter)
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.mix = decoy_fraction(mix_benign)
        self._decoys: DecoyPool | None = None
        if self.mix > 0:
            if decoys is None:
                raise ValueError("mix_benign > 0 needs decoys: the attacker's own images")
            self._decoys = DecoyPool(
                decoys.detach().cpu(),
                decoy_generator
                if decoy_generator is not None
                else torch.Generator().manual_seed(1),
            )
        self.spent = 0
        self.spent_per_key = [0] * len(self.apis)
        self.decoys_sent = 0
        self.decoys_trained = 0  # decoys :meth:`Attack.train_final_clone` added to the transfer set
        self.answers_seconds = 0.0
        self._sent = (
            0  # stream positions used: images sent, decoys included (each `repeats` queries)
        )
        self._requests = 0
        self._decoy_images: list[Tensor] = []
        self._decoy_answers: list[Tensor] = []
        self._ledger_start = {
            id(a): (ledger.queries, ledger.l1_sum)
            for a in self.apis
            if (ledger := getattr(a, "ledger", None)) is not None
        }

    @property
    def api(self) -> PredictionAPI:
        """The first key's API."""
        return self.apis[0]

    @property
    def num_classes(self) -> int:
        return int(self.api.num_classes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.api.input_shape)  # type: ignore[return-value]

    @property
    def remaining(self) -> int:
        """How many more of the attack's own *images* can be asked (each costs ``repeats``
        queries, and the budget also pays for the decoys scheduled among them)."""
        positions = self.budget // self.repeats
        attack_positions = positions - decoys_before(positions, self.mix)
        return attack_positions - (self._sent - self.decoys_sent)

    def query(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) in [0, 1] -> (B, K) answers as the attacker uses them."""
        if x.shape[0] > self.remaining:
            raise BudgetExhausted(
                f"asked for {x.shape[0]} images but only {self.remaining} are left "
                f"({self.spent}/{self.budget} queries spent, repeats={self.repeats})"
            )
        if x.shape[0] == 0:
            return torch.empty(0, self.num_classes)
        start = time.perf_counter()
        x = x.detach().cpu()
        images, is_decoy = self._with_decoys(x)
        sent = images.repeat_interleave(self.repeats, dim=0) if self.repeats > 1 else images
        if self.jitter > 0 and self.repeats > 1:
            copies = sent.view(images.shape[0], self.repeats, *x.shape[1:])
            jittered = jitter_images(
                copies[:, 1:].reshape(-1, *x.shape[1:]), self.jitter, self.generator
            )
            sent = torch.cat(
                [copies[:, :1], jittered.view(images.shape[0], self.repeats - 1, *x.shape[1:])],
                dim=1,
            ).reshape(-1, *x.shape[1:])
        key = self._requests % len(self.apis)
        answers = self.apis[key].query(sent)
        self._requests += 1
        self.spent += sent.shape[0]
        self.spent_per_key[key] += sent.shape[0]
        self._sent += images.shape[0]
        if self.repeats > 1:
            answers = answers.view(images.shape[0], self.repeats, -1).mean(dim=1)
        if self.hard_labels:
            answers = torch.nn.functional.one_hot(answers.argmax(1), answers.shape[1]).to(
                answers.dtype
            )
        answers = answers.float()
        if is_decoy is not None:
            self.decoys_sent += int(is_decoy.sum())
            self._decoy_images.append(images[is_decoy])
            self._decoy_answers.append(answers[is_decoy])
            answers = answers[~is_decoy]
        self.answers_seconds += time.perf_counter() - start
        return answers

    def _with_decoys(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """The request's images in stream order, the decoys at their scheduled positions, and
        which of them are decoys (``None`` without mixing). The request ends at the attack's last
        image, or at the end of the budget when it leaves no attack image to ask."""
        if self._decoys is None:
            return x, None
        left = self.remaining - x.shape[0]
        # positions [sent, sent + span) surely hold x.shape[0] attack images (decoys ≤ f·span + 1)
        span = (
            -(
                -(x.shape[0] + 1)
                * self.mix.denominator
                // (self.mix.denominator - self.mix.numerator)
            )
            + 1
        )
        is_decoy = decoy_mask(self._sent, self._sent + span, self.mix)
        end = int(torch.nonzero(torch.cumsum(~is_decoy, 0) == x.shape[0])[0]) + 1
        if left == 0:
            end = self.budget // self.repeats - self._sent
            is_decoy = decoy_mask(self._sent, self._sent + end, self.mix)
        is_decoy = is_decoy[:end]
        images = torch.empty((end, *x.shape[1:]), dtype=x.dtype)
        images[~is_decoy] = x
        images[is_decoy] = self._decoys.take(int(is_decoy.sum())).to(x.dtype)
        return images, is_decoy

    def decoy_set(self) -> tuple[Tensor, Tensor]:
        """The decoys sent so far and their answers (as the attacker uses them):
        (D, C, H, W), (D, K)."""
        if not self._decoy_images:
            return torch.empty(0, *self.input_shape), torch.empty(0, self.num_classes)
        return torch.cat(self._decoy_images), torch.cat(self._decoy_answers)

    def effective_l1(self) -> float | None:
        """Mean ‖ỹ − y‖₁ served during this attack over all its keys, when every key's API keeps a
        ledger (in-process); ``None`` for APIs that cannot know the clean answer (e.g. a remote
        service)."""
        if len(self._ledger_start) != len({id(a) for a in self.apis}):
            return None
        queries, l1 = 0, 0.0
        for api in {id(a): a for a in self.apis}.values():
            ledger = api.ledger  # type: ignore[attr-defined]
            queries += ledger.queries - self._ledger_start[id(api)][0]
            l1 += ledger.l1_sum - self._ledger_start[id(api)][1]
        return l1 / queries if queries else 0.0


def jitter_images(x: Tensor, sigma: float, generator: torch.Generator) -> Tensor:
    """x: (N, C, H, W) in [0, 1] -> each image shifted by up to one pixel in each direction (zero
    fill) plus Gaussian noise of standard deviation ``sigma``, clipped to [0, 1]."""
    shifted = random_shift(x, generator, pad=1)
    noise = torch.randn(shifted.shape, generator=generator, dtype=shifted.dtype) * sigma
    return (shifted + noise).clamp(0, 1)


@dataclass
class AttackResult:
    """A trained clone and what stealing it cost.

    ``queries``: API queries spent (≤ the budget), decoys and every key included;
    ``transfer_size``: (x, ỹ) pairs trained on (``queries / repeats``, decoys included);
    ``effective_l1``: mean L1 of the served answers over all keys if the APIs know it;
    ``decoys``: decoy images sent (``mix_benign``; each cost ``repeats`` queries);
    ``queries_per_key``: the queries each API key was charged, in key order.
    """

    clone: nn.Module
    queries: int
    budget: int
    transfer_size: int
    effective_l1: float | None
    wall_seconds: float
    query_seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)
    countermeasures: dict[str, Any] = field(default_factory=dict)
    decoys: int = 0
    queries_per_key: list[int] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "queries": self.queries,
            "budget": self.budget,
            "transfer_size": self.transfer_size,
            "effective_l1": self.effective_l1,
            "attack_seconds": self.wall_seconds,
            "query_seconds": self.query_seconds,
            "countermeasures": self.countermeasures,
            "decoys": self.decoys,
            "queries_per_key": self.queries_per_key,
        }


@dataclass
class StolenModel:
    """What :meth:`Attack.steal` returns: the clone and the size of its transfer set."""

    clone: nn.Module
    transfer_size: int
    history: list[dict[str, Any]] = field(default_factory=list)


class Attack(abc.ABC):
    """Base class of all model-stealing attacks (docs/design.md §attack-contract)."""

    name: ClassVar[str] = ""
    params_type: ClassVar[type[AttackParams]] = AttackParams
    _client: QueryClient | None = None  # the running attack's client, while :meth:`run` runs
    _labelled: ImageData | None = (
        None  # the align_labels countermeasure's images, while :meth:`run` runs
    )

    def __init__(self, params: AttackParams | None = None, **kwargs: Any) -> None:
        self.params = typed_params(self.name, self.params_type, params, kwargs)

    def run(
        self,
        api: PredictionAPI | Sequence[PredictionAPI],
        budget: int,
        data: ImageData,
        clone: CloneSpec,
        *,
        seed: int = 0,
        labelled: ImageData | None = None,
    ) -> AttackResult:
        """Steal ``api`` with at most ``budget × budget_factor`` queries.

        Args:
            api: the (defended) prediction API, or one per API key the attacker holds (requests
                go round-robin over them; ``budget`` is the total over all keys). With the
                ``api_keys`` countermeasure k > 1 and a single API, the API's ``for_client``
                builds the other k − 1 keys (:func:`mirage.attacks.streams.key_apis`).
            budget: the query budget before the ``budget_factor`` countermeasure.
            data: the attacker's own images (a query pool, or JBDA's seed source); ``mix_benign``
                draws its decoys from them. Labels are used only by attacks that say so (the
                adaptive bandit's coarse groups).
            clone: how to build and train the clone; countermeasures may override parts of it.
            seed: seeds every random choice (sampling, initialisation, training order, decoys).
            labelled: labelled images of the victim's task the attacker holds besides ``data``
                (never queried); the ``align_labels`` countermeasure uses its first n.
        """
        if budget < 1:
            raise ValueError(f"budget must be positive, got {budget}")
        self._labelled = None
        if self.params.align_labels is not None:
            if labelled is None or len(labelled) < self.params.align_labels:
                raise ValueError(
                    f"align_labels={self.params.align_labels} needs that many labelled images "
                    f"(Attack.run(labelled=...)), got {0 if labelled is None else len(labelled)}"
                )
            self._labelled = labelled.subset(torch.arange(self.params.align_labels))
        apis = key_apis(api, self.params.api_keys)
        if tuple(data.input_shape) != tuple(apis[0].input_shape):
            raise ValueError(
                f"attack data has shape {data.input_shape}, the API takes {apis[0].input_shape}"
            )
        clone, total_budget = apply_countermeasures(self.params, clone, budget)
        clone = clone.model_copy(
            update={"training": clone.training.model_copy(update={"seed": seed})}
        )
        mixing = self.params.mix_benign > 0
        client = QueryClient(
            apis,
            total_budget,
            repeats=self.params.repeats,
            hard_labels=self.params.hard_labels,
            jitter=self.params.jitter,
            generator=torch.Generator().manual_seed(seed + 7919),
            mix_benign=self.params.mix_benign,
            decoys=data.images if mixing else None,
            decoy_generator=torch.Generator().manual_seed(seed + 104_729) if mixing else None,
        )
        generator = torch.Generator().manual_seed(seed)
        start = time.perf_counter()
        torch.manual_seed(seed)
        self._client = client
        try:
            stolen = self.steal(client, data, clone, generator)
        finally:
            self._client = self._labelled = None
        if client.spent > total_budget:
            raise BudgetExhausted(f"{self.name} spent {client.spent} > {total_budget} queries")
        return AttackResult(
            clone=stolen.clone.eval(),
            queries=client.spent,
            budget=total_budget,
            transfer_size=stolen.transfer_size + client.decoys_trained,
            effective_l1=client.effective_l1(),
            wall_seconds=time.perf_counter() - start,
            query_seconds=client.answers_seconds,
            history=stolen.history,
            countermeasures=self.params.active(),
            decoys=client.decoys_sent,
            queries_per_key=list(client.spent_per_key),
        )

    def train_final_clone(
        self,
        clone: CloneSpec,
        images: Tensor,
        answers: Tensor,
        num_classes: int,
        *,
        description: str = "clone",
    ) -> tuple[nn.Module, dict[str, Any]]:
        """Train the attack's final clone on its transfer set (images, answers): only on the
        answers whose top probability reaches ``min_confidence`` when that countermeasure is on
        (an attacker against a gate that changes labels on queries it doubts), and through the
        posterior restorer when ``restorer`` is on (the answers are restored first; the
        restorer's own cost is in the returned stats), then flattened when ``flatten`` is on
        (:func:`flatten_answers`).

        With ``mix_benign`` the decoys' answers join the transfer set first (a rational attacker
        keeps every answer it paid for: they are natural images, labelled by the victim), so the
        filters and the restorer see them like any other pair; ``decoys`` in the stats counts them.
        The per-round substitutes of the JBDA family never see them (the Jacobian steps start from
        the attack's own images only)."""
        extra: dict[str, Any] = {}
        if self._client is not None and self._client.decoys_sent:
            decoy_images, decoy_answers = self._client.decoy_set()
            images, answers = torch.cat([images, decoy_images]), torch.cat([answers, decoy_answers])
            self._client.decoys_trained = extra["decoys"] = len(decoy_images)
        if self.params.min_confidence is not None:
            keep = training_targets(answers).max(1).values >= self.params.min_confidence
            if not keep.any():
                raise ValueError(f"no answer reaches min_confidence {self.params.min_confidence}")
            images, answers = images[keep], answers[keep]
            extra["kept_confident"] = int(keep.sum())
        if self.params.restorer is not None:
            from mirage.attacks.restorer import restore_answers

            answers, extra["restorer"] = restore_answers(
                self.params.restorer, clone, images, answers, num_classes, seed=clone.training.seed
            )
        if self.params.flatten:
            answers = flatten_answers(answers)
        model, stats = train_clone(clone, images, answers, num_classes, description=description)
        if self._labelled is not None:
            model, stats, extra["alignment"] = self._aligned(
                model, stats, clone, images, answers, num_classes, description, self._labelled
            )
        return model, {**stats, **extra}

    def _aligned(
        self,
        model: ImageClassifier,
        stats: dict[str, Any],
        clone: CloneSpec,
        images: Tensor,
        answers: Tensor,
        num_classes: int,
        description: str,
        labelled: ImageData,
    ) -> tuple[ImageClassifier, dict[str, Any], dict[str, Any]]:
        """The ``align_labels`` countermeasure (:mod:`mirage.attacks.alignment`): retrain on
        realigned answers when the clone's confusions on the labelled images show a relabelling,
        and keep the clone more accurate on them."""
        from mirage.api.evaluate import accuracy
        from mirage.attacks.alignment import class_alignment, realign

        sigma = class_alignment(model, labelled, num_classes)
        report: dict[str, Any] = {
            "labelled": len(labelled),
            "sigma": sigma.tolist(),
            "accuracy_before": accuracy(model, labelled),
            "kept": False,
        }
        if torch.equal(sigma, torch.arange(num_classes)):
            return model, stats, report
        realigned, realigned_stats = train_clone(
            clone,
            images,
            realign(answers, sigma),
            num_classes,
            description=f"{description} (realigned)",
        )
        report["accuracy_after"] = accuracy(realigned, labelled)
        if report["accuracy_after"] > report["accuracy_before"]:
            report["kept"] = True
            return realigned, realigned_stats, report
        return model, stats, report

    @abc.abstractmethod
    def steal(
        self, client: QueryClient, data: ImageData, clone: CloneSpec, generator: torch.Generator
    ) -> StolenModel:
        """The algorithm: query through ``client`` (never past ``client.remaining``), train a
        clone built by ``clone``. ``generator`` seeds the attack's own random choices."""

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.params.model_dump().items())
        return f"{type(self).__name__}({fields})"


_REGISTRY: Registry[Attack] = Registry("attack")
ATTACKS = _REGISTRY.entries


def register_attack(
    name: str, *, params: type[AttackParams] = AttackParams
) -> Callable[[type[Attack]], type[Attack]]:
    """Class decorator: add an attack to the registry under ``name``."""
    return _REGISTRY.register(name, params)


def create_attack(name: str, *, variant: str | None = None, **params: Any) -> Attack:
    """``create_attack("jbda", rounds=6, hard_labels=True)``: build a registered attack by name;
    ``variant`` names an attacker of the suite
    (:data:`~mirage.attacks.countermeasures.ATTACKER_SUITE`) whose switches apply first (explicit
    ``params`` override them)."""
    if variant is not None:
        params = {**variant_params(variant), **params}
    return _REGISTRY.create(name, **params)


def list_attacks() -> list[str]:
    return _REGISTRY.names()


def flatten_answers(answers: Tensor) -> Tensor:
    """(N, K) answers -> each row's top-1 with its probability, the rest of the mass spread evenly
    over the other K − 1 classes: what a clone may learn from an answer with no dark knowledge
    (the ``flatten`` countermeasure)."""
    targets = training_targets(answers)
    top, index = targets.max(dim=1)
    rest = ((1 - top) / (targets.shape[1] - 1)).unsqueeze(1)
    return rest.expand_as(targets).clone().scatter_(1, index.unsqueeze(1), top.unsqueeze(1))
