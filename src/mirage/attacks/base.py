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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from mirage.api.base import PredictionAPI
from mirage.attacks.clone import CloneSpec, train_clone, training_targets
from mirage.attacks.countermeasures import Countermeasures, apply_countermeasures, variant_params
from mirage.data.base import ImageData
from mirage.models.fit import random_shift
from mirage.registry import Registry


class AttackParams(Countermeasures):
    """Typed, validated parameters of an attack. Unknown keys are errors.

    Every attack inherits the countermeasure switches of :class:`Countermeasures`
    (``hard_labels``, ``architecture``, ``optimizer``, ``augment``, ``repeats``, ``jitter``,
    ``robust_loss``, ``restorer``, ``budget_factor``, ``restarts``).
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

    Args:
        api: the prediction API.
        budget: the exact number of API queries this attack may spend.
    """

    def __init__(self, api: PredictionAPI, budget: int, *, repeats: int = 1,
                 hard_labels: bool = False, jitter: float = 0.0,
                 generator: torch.Generator | None = None) -> None:
        if budget < 0:
            raise ValueError(f"budget must be non-negative, got {budget}")
        if repeats < 1:
            raise ValueError(f"repeats must be at least 1, got {repeats}")
        if jitter < 0:
            raise ValueError(f"jitter must be non-negative, got {jitter}")
        self.api = api
        self.budget = int(budget)
        self.repeats = int(repeats)
        self.hard_labels = hard_labels
        self.jitter = float(jitter)
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.spent = 0
        self.answers_seconds = 0.0
        ledger = getattr(api, "ledger", None)
        self._ledger_start = (ledger.queries, ledger.l1_sum) if ledger is not None else None

    @property
    def num_classes(self) -> int:
        return int(self.api.num_classes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.api.input_shape)  # type: ignore[return-value]

    @property
    def remaining(self) -> int:
        """How many more *images* can be asked (each costs ``repeats`` queries)."""
        return (self.budget - self.spent) // self.repeats

    def query(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) in [0, 1] -> (B, K) answers as the attacker uses them."""
        if x.shape[0] > self.remaining:
            raise BudgetExhausted(f"asked for {x.shape[0]} images but only {self.remaining} are left "
                                  f"({self.spent}/{self.budget} queries spent, repeats={self.repeats})")
        if x.shape[0] == 0:
            return torch.empty(0, self.num_classes)
        start = time.perf_counter()
        x = x.detach().cpu()
        sent = x.repeat_interleave(self.repeats, dim=0) if self.repeats > 1 else x
        if self.jitter > 0 and self.repeats > 1:
            copies = sent.view(x.shape[0], self.repeats, *x.shape[1:])
            jittered = jitter_images(copies[:, 1:].reshape(-1, *x.shape[1:]), self.jitter, self.generator)
            sent = torch.cat([copies[:, :1], jittered.view(x.shape[0], self.repeats - 1, *x.shape[1:])],
                             dim=1).reshape(-1, *x.shape[1:])
        answers = self.api.query(sent)
        self.spent += sent.shape[0]
        if self.repeats > 1:
            answers = answers.view(x.shape[0], self.repeats, -1).mean(dim=1)
        if self.hard_labels:
            answers = torch.nn.functional.one_hot(answers.argmax(1), answers.shape[1]).to(answers.dtype)
        self.answers_seconds += time.perf_counter() - start
        return answers.float()

    def effective_l1(self) -> float | None:
        """Mean ‖ỹ − y‖₁ served during this attack, when the API keeps a ledger (in-process);
        ``None`` for APIs that cannot know the clean answer (e.g. a remote service)."""
        ledger = getattr(self.api, "ledger", None)
        if ledger is None or self._ledger_start is None:
            return None
        queries = ledger.queries - self._ledger_start[0]
        return (ledger.l1_sum - self._ledger_start[1]) / queries if queries else 0.0


def jitter_images(x: Tensor, sigma: float, generator: torch.Generator) -> Tensor:
    """x: (N, C, H, W) in [0, 1] -> each image shifted by up to one pixel in each direction (zero
    fill) plus Gaussian noise of standard deviation ``sigma``, clipped to [0, 1]."""
    shifted = random_shift(x, generator, pad=1)
    noise = torch.randn(shifted.shape, generator=generator, dtype=shifted.dtype) * sigma
    return (shifted + noise).clamp(0, 1)


@dataclass
class AttackResult:
    """A trained clone and what stealing it cost.

    ``queries``: API queries spent (≤ the budget); ``transfer_size``: (x, ỹ) pairs trained on
    (``queries / repeats``); ``effective_l1``: mean L1 of the served answers if the API knows it.
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

    def as_dict(self) -> dict[str, Any]:
        return {
            "queries": self.queries, "budget": self.budget, "transfer_size": self.transfer_size,
            "effective_l1": self.effective_l1, "attack_seconds": self.wall_seconds,
            "query_seconds": self.query_seconds, "countermeasures": self.countermeasures,
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

    def __init__(self, params: AttackParams | None = None, **kwargs: Any) -> None:
        if params is None:
            params = self.params_type(**kwargs)
        elif kwargs:
            raise TypeError("pass either a params object or keyword arguments, not both")
        if not isinstance(params, self.params_type):
            raise TypeError(f"{self.name} expects {self.params_type.__name__}, got {type(params).__name__}")
        self.params = params

    def run(self, api: PredictionAPI, budget: int, data: ImageData, clone: CloneSpec, *,
            seed: int = 0) -> AttackResult:
        """Steal ``api`` with at most ``budget × budget_factor`` queries.

        Args:
            api: the (defended) prediction API.
            budget: the query budget before the ``budget_factor`` countermeasure.
            data: the attacker's own images (a query pool, or JBDA's seed source). Labels are used
                only by attacks that say so (the adaptive bandit's coarse groups).
            clone: how to build and train the clone; countermeasures may override parts of it.
            seed: seeds every random choice (sampling, initialisation, training order).
        """
        if budget < 1:
            raise ValueError(f"budget must be positive, got {budget}")
        if tuple(data.input_shape) != tuple(api.input_shape):
            raise ValueError(f"attack data has shape {data.input_shape}, the API takes {api.input_shape}")
        clone, total_budget = apply_countermeasures(self.params, clone, budget)
        clone = clone.model_copy(update={"training": clone.training.model_copy(update={"seed": seed})})
        client = QueryClient(api, total_budget, repeats=self.params.repeats,
                             hard_labels=self.params.hard_labels, jitter=self.params.jitter,
                             generator=torch.Generator().manual_seed(seed + 7919))
        generator = torch.Generator().manual_seed(seed)
        start = time.perf_counter()
        torch.manual_seed(seed)
        stolen = self.steal(client, data, clone, generator)
        if client.spent > total_budget:
            raise BudgetExhausted(f"{self.name} spent {client.spent} > {total_budget} queries")
        return AttackResult(
            clone=stolen.clone.eval(), queries=client.spent, budget=total_budget,
            transfer_size=stolen.transfer_size, effective_l1=client.effective_l1(),
            wall_seconds=time.perf_counter() - start, query_seconds=client.answers_seconds,
            history=stolen.history, countermeasures=self.params.active(),
        )

    def train_final_clone(self, clone: CloneSpec, images: Tensor, answers: Tensor, num_classes: int,
                          *, description: str = "clone") -> tuple[nn.Module, dict[str, Any]]:
        """Train the attack's final clone on its transfer set (images, answers): only on the
        answers whose top probability reaches ``min_confidence`` when that countermeasure is on
        (an attacker against a gate that changes labels on queries it doubts), and through the
        posterior restorer when ``restorer`` is on (the answers are restored first; the
        restorer's own cost is in the returned stats)."""
        extra: dict[str, Any] = {}
        if self.params.min_confidence is not None:
            keep = training_targets(answers).max(1).values >= self.params.min_confidence
            if not keep.any():
                raise ValueError(f"no answer reaches min_confidence {self.params.min_confidence}")
            images, answers = images[keep], answers[keep]
            extra["kept_confident"] = int(keep.sum())
        if self.params.restorer is not None:
            from mirage.attacks.restorer import restore_answers

            answers, extra["restorer"] = restore_answers(self.params.restorer, clone, images, answers,
                                                         num_classes, seed=clone.training.seed)
        model, stats = train_clone(clone, images, answers, num_classes, description=description)
        return model, {**stats, **extra}

    @abc.abstractmethod
    def steal(self, client: QueryClient, data: ImageData, clone: CloneSpec,
              generator: torch.Generator) -> StolenModel:
        """The algorithm: query through ``client`` (never past ``client.remaining``), train a
        clone built by ``clone``. ``generator`` seeds the attack's own random choices."""

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.params.model_dump().items())
        return f"{type(self).__name__}({fields})"


_REGISTRY: Registry[Attack] = Registry("attack")
ATTACKS = _REGISTRY.entries


def register_attack(name: str, *, params: type[AttackParams] = AttackParams
                    ) -> Callable[[type[Attack]], type[Attack]]:
    """Class decorator: add an attack to the registry under ``name``."""
    return _REGISTRY.register(name, params)


def create_attack(name: str, *, variant: str | None = None, **params: Any) -> Attack:
    """``create_attack("jbda", rounds=6, hard_labels=True)``: build a registered attack by name;
    ``variant`` names an attacker of the suite (:data:`~mirage.attacks.countermeasures.ATTACKER_SUITE`)
    whose switches apply first (explicit ``params`` override them)."""
    if variant is not None:
        params = {**variant_params(variant), **params}
    return _REGISTRY.create(name, **params)


def list_attacks() -> list[str]:
    return _REGISTRY.names()
