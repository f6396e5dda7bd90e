"""The run protocol (docs/design.md §protocol): the one way mirage runs an attack against a defended
API and measures the clone, whoever asks — a sweep (:func:`mirage.bench.execute.execute_run`),
``mirage.evaluate`` on a user's model and data, ``mirage.bench.evaluate`` on a defense instance,
the ``mirage attack`` command.

A run has three typed parts:

* :class:`Stores`: where what is expensive to make again is kept — trained models (victims,
  surrogates, detectors), answered transfer sets, clones. Passed explicitly: nothing in a run
  reads or changes the environment to find them.
* :class:`RunContext`: everything the run needs, built once per defense point: the plain and the
  served model (or a remote endpoint), the defense as built (each use gets its own copy, so no
  run sees another's state), what a Kerckhoffs attacker is told of it, the defender's test set,
  the attacker's pool, seed images and labelled images, the clone recipe and the stores.
* :class:`RunMetrics`: what the run measured, typed; its fields are the run record's beside the
  run's identity.

:func:`run_attack` is the run itself: victim → defended API → attack → clone → clone metrics.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from mirage import paths
from mirage.api import InProcessAPI, PredictionAPI, accuracy, clean_posteriors, defended_accuracy
from mirage.attacks import AttackResult, CloneSpec, create_attack
from mirage.attacks.pools import SEED_ATTACKS
from mirage.attacks.restorer import tell_restorer
from mirage.bench.answers import AnswerCache, ReplayingAPI, answers_dir
from mirage.data import ImageData, load_dataset
from mirage.defenses import Defense
from mirage.models import ModelCard
from mirage.scenarios import Scenario, aligned_sample, query_pool, seed_source
from mirage.training.registry import is_training_time
from mirage.training.resolve import DefenseSpec, Victims, resolve_defense, resolve_victims

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Stores:
    """Where runs keep and find what is expensive to make again (docs/design.md §caches).

    ``models``: trained victims, surrogates and detectors, keyed by their config; ``answers``:
    answered transfer sets (:mod:`mirage.bench.answers`); ``clones``: clones by exact transfer set
    (:attr:`mirage.attacks.CloneSpec.cache`). ``None``: not kept."""

    models: Path
    answers: Path | None = None
    clones: Path | None = None

    @classmethod
    def from_environment(cls) -> Stores:
        """``$MIRAGE_MODELS``, ``$MIRAGE_ANSWERS`` and ``$MIRAGE_CLONES`` (:mod:`mirage.paths`)."""
        return cls(models=paths.models_dir(), answers=answers_dir(), clones=paths.clones_dir())

    @classmethod
    def models_only(cls) -> Stores:
        """Trained models where the environment says; no answers or clones kept."""
        return cls(models=paths.models_dir())

    def with_models(self, models: Path) -> Stores:
        """These stores with trained models kept in ``models``."""
        return dataclasses.replace(self, models=models.resolve())


@dataclasses.dataclass
class RunContext:
    """Everything one run needs, built once (docs/design.md §protocol).

    The target is ``served`` behind ``defense`` in this process, or a remote ``endpoint`` (a
    :class:`~mirage.api.PredictionAPI` such as :class:`~mirage.serve.HTTPPredictionAPI`: black
    box, its own defense). ``plain`` is the undefended model clean answers are measured against
    (the served one, or the plain victim of a training-time defense; ``None`` for an endpoint
    without a baseline). ``defense`` is kept as built and never queried: :meth:`api` and
    :meth:`fresh_defense` hand out copies. ``defense_name`` and ``public_params`` are what a
    Kerckhoffs attacker is told (never secrets or parts). ``pool`` is what pool attacks query,
    ``seeds`` what seed attacks (JBDA) start from, ``labelled`` what the label-aligning attacker
    may hold (never queried)."""

    scenario: str
    test: ImageData
    pool: ImageData
    clone: CloneSpec
    stores: Stores
    served: nn.Module | None = None
    plain: nn.Module | None = None
    defense: Defense | None = None
    defense_name: str = "none"
    public_params: dict[str, Any] = dataclasses.field(default_factory=dict)
    endpoint: PredictionAPI | None = None
    seeds: ImageData | None = None
    labelled: ImageData | None = None
    card: ModelCard | None = None
    training_time: bool = False
    _defender: dict[int | None, dict[str, Any]] = dataclasses.field(
        default_factory=dict, init=False, repr=False
    )

    def __post_init__(self) -> None:
        if (self.served is None) == (self.endpoint is None):
            raise ValueError("a run context needs a served model or an endpoint, not both")
        if self.endpoint is not None and self.defense is not None:
            raise ValueError("an endpoint answers with its own defense")

    def _served(self) -> nn.Module:
        """``served``, which a context without an endpoint has (:meth:`__post_init__`)."""
        assert self.served is not None
        return self.served

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.test.input_shape

    @property
    def num_classes(self) -> int:
        """The classes the target answers: its card's, the endpoint's, or one probe of the served
        model (no defense copied for it)."""
        if self.card is not None:
            return self.card.num_classes
        if self.endpoint is not None:
            return self.endpoint.num_classes
        return InProcessAPI(self._served(), input_shape=self.input_shape).num_classes

    def fresh_defense(self) -> Defense | None:
        """A copy of the defense as built, in the state no request has changed."""
        return copy.deepcopy(self.defense)

    def api(self) -> PredictionAPI:
        """The defended API an attacker queries: the endpoint, or the served model behind a fresh
        copy of the defense, without a query budget (the attack's client keeps its own)."""
        if self.endpoint is not None:
            return self.endpoint
        return InProcessAPI(self._served(), self.fresh_defense(), input_shape=self.input_shape)

    def told(self, attack_params: dict[str, Any]) -> dict[str, Any]:
        """``attack_params`` with what a Kerckhoffs attacker knows filled in: the restorer is told
        the query-time defense's name and public parameters (never its secrets, and never its
        parts, such as a watermark set: docs/design.md §defense-spec)."""
        return tell_restorer(attack_params, self.defense_name, self.public_params)

    def attack_images(self, attack: str) -> ImageData:
        """The attacker's own images for ``attack``: seed images for the JBDA family, else the
        pool."""
        return self.seeds if attack in SEED_ATTACKS and self.seeds is not None else self.pool

    def defender_metrics(self, eval_size: int | None = None) -> dict[str, Any]:
        """What a benign user gets on the first ``eval_size`` test images (all: ``None``), memoised:
        the undefended model's accuracy, the defended API's, the mean L1 its answers moved and
        the top-1 agreement. A training-time defense's cost is against the plain model on the
        same images; an endpoint is queried (every image charged to its key)."""
        if eval_size not in self._defender:
            self._defender[eval_size] = self._measure_defender(eval_size)
        return self._defender[eval_size]

    def _measure_defender(self, eval_size: int | None) -> dict[str, Any]:
        data = (
            self.test
            if eval_size is None
            else self.test.subset(torch.arange(min(eval_size, len(self.test))))
        )
        if self.endpoint is not None:
            served = self.endpoint.query(data.images)
            defended = float((served.argmax(1) == data.labels).float().mean())
            clean = defended if self.plain is None else accuracy(self.plain, data)
            return {
                "victim_accuracy": clean,
                "defender_accuracy": defended,
                "defender_l1": None,
                "defender_top1_agreement": None,
            }
        result = defended_accuracy(self._served(), self.fresh_defense(), data)
        if not self.training_time:
            return {
                "victim_accuracy": result.clean_accuracy,
                "defender_accuracy": result.defended_accuracy,
                "defender_l1": result.effective_l1,
                "defender_top1_agreement": result.top1_agreement,
            }
        # the plain model's accuracy on the same images, and the served answers' distance from it
        if self.plain is None:
            raise ValueError("a training-time defense is measured against the plain victim")
        return {
            "victim_accuracy": accuracy(self.plain, data),
            "defender_accuracy": result.defended_accuracy,
            **distance_to_plain(
                clean_posteriors(self._served(), data.images),
                clean_posteriors(self.plain, data.images),
                prefix="defender_",
            ),
        }

    def overhead(self, images: Tensor) -> float | None:
        """(forward + defense) / forward of the served model on ``images`` (``None`` without a
        defense in this process)."""
        if self.served is None or self.defense is None:
            return None
        return measure_overhead(self.served, copy.deepcopy(self.defense), images)


def plain_params(defense: Defense | None) -> dict[str, Any]:
    """A built defense's plain parameters (numbers, strings, switches), never a model, a tensor or
    another part: what a Kerckhoffs attacker is told of it (its secrets are withheld again by
    :func:`~mirage.attacks.restorer.tell_restorer`)."""
    if defense is None:
        return {}
    values = {name: getattr(defense.params, name) for name in type(defense.params).model_fields}
    return {k: v for k, v in values.items() if isinstance(v, str | int | float | bool)}


def split_defense(name: str, params: dict[str, Any]) -> tuple[DefenseSpec, DefenseSpec]:
    """(the victim's training method, the query-time defense): a training-time defense trains the
    victim and serves it undefended; a query-time one serves the plain victim."""
    if is_training_time(name):
        return DefenseSpec(name=name, params=params), DefenseSpec()
    return DefenseSpec(), DefenseSpec.from_params(name, params)


def scenario_context(
    scenario: Scenario,
    defense: str,
    params: dict[str, Any],
    stores: Stores,
    *,
    clone_training: Any = "grad2",
    show_progress: bool = False,
    victim: tuple[nn.Module, ModelCard] | None = None,
) -> RunContext:
    """The run context of ``scenario``'s victim behind ``defense`` with ``params``: the victims
    and the defense's parts trained or loaded from ``stores.models``, the scenario's test set,
    query pool, seed images and (for the label-aligning attacker) its training split, and the
    protocol's default clone (:meth:`~mirage.attacks.CloneSpec.like` the victim). ``victim``:
    (a model, its card) served instead of the scenario's, which is then neither loaded nor
    trained (a query-time defense only)."""
    method, query = split_defense(defense, params)
    if victim is None:
        victims = resolve_victims(
            method, scenario, models=stores.models, show_progress=show_progress
        )
    elif method.name != "none":
        raise ValueError(f"{defense} is a training-time defense: it retrains the scenario's victim")
    else:
        victims = Victims(victim[0], victim[0], victim[1], training_time=False)
    built = resolve_defense(query, scenario, victims.served, victims.card, models=stores.models)
    data = load_dataset(scenario.victim_dataset, scenario.data_root)
    return RunContext(
        scenario=scenario.name,
        test=data.test,
        pool=query_pool(scenario),
        seeds=seed_source(scenario),
        labelled=data.train,
        clone=CloneSpec.like(victims.card, training=clone_training),
        stores=stores,
        served=victims.served,
        plain=victims.plain,
        defense=built,
        defense_name=query.name,
        public_params=dict(query.params),
        card=victims.card,
        training_time=victims.training_time,
    )


@dataclasses.dataclass(frozen=True)
class Stolen:
    """One run's attack: its result, the answers the cache replayed and the clone's metrics."""

    result: AttackResult
    replayed: int
    clone: dict[str, Any]


def run_attack(
    context: RunContext,
    attack: str,
    attack_params: dict[str, Any],
    budget: int,
    seed: int,
    *,
    clone: CloneSpec | None = None,
) -> Stolen:
    """The run (docs/design.md §protocol): ``attack`` with ``attack_params`` and ``budget`` queries
    against ``context``'s defended API, seeded by ``seed``, its clone built by ``clone`` (default
    the context's) and judged on the defender's test set.

    The restorer is told the defense's name and public parameters (:meth:`RunContext.told`). One-key
    attackers against an in-process API go through the answer cache when the stores keep one;
    clones are kept by exact transfer set when the stores keep them."""
    torch.manual_seed(seed)
    runner = create_attack(attack, **context.told(attack_params))
    api = context.api()
    replaying = None
    if (
        context.stores.answers is not None
        and runner.params.api_keys == 1
        and isinstance(api, InProcessAPI)
    ):
        try:
            api = replaying = ReplayingAPI(api, AnswerCache(context.stores.answers))
        except (TypeError, ValueError) as error:  # e.g. a parameter it cannot fingerprint
            log.warning("answer cache off for this run: %s", error)
    labelled = aligned_sample(context.labelled, runner.params.align_labels, seed)
    spec = (clone or context.clone).model_copy(update={"cache": context.stores.clones})
    result = runner.run(
        api, budget, context.attack_images(attack), spec, seed=seed, labelled=labelled
    )
    if replaying is not None:
        replaying.close()
    return Stolen(
        result, 0 if replaying is None else replaying.replayed, clone_metrics(result, context.test)
    )


class RunMetrics(BaseModel):
    """What one run measured: the fields of its record beside the run's identity (docs/design.md
    §protocol). Optional fields are left out of the record when not measured."""

    model_config = ConfigDict(extra="forbid")

    # what a benign user gets (RunContext.defender_metrics)
    victim_accuracy: float
    defender_accuracy: float
    defender_l1: float | None
    defender_top1_agreement: float | None = None
    # the clone (clone_metrics)
    clone_accuracy: float
    clone_final_loss: float | None
    clone_diverged: bool
    clone_majority_fraction: float
    clone_collapsed: bool
    queries: int
    transfer_digest: str | None
    transfer_size: int
    # what the answers cost the attacker's queries, and where it was measured
    effective_l1: float | None
    effective_l1_on: str = "queries"
    overhead_ratio: float | None = None
    # sweeps' runs: the models, the attack's details and the probes
    victim_test_accuracy: float | None = None
    victim_fingerprint: str | None = None
    served_model_fingerprint: str | None = None
    decoys: int | None = None
    queries_per_key: list[int] | None = None
    answers_replayed: int | None = None
    clone_from_cache: bool | None = None
    restorer: dict[str, Any] | None = None
    alignment: dict[str, Any] | None = None
    angular_deviation: list[float] | None = None
    attack_seconds: float | None = None
    wall_seconds: float | None = None
    worker_peak_rss_mb: float | None = None
    versions: dict[str, str] | None = None
    device: str | None = None  # where the clone trained

    def as_record(self) -> dict[str, Any]:
        """The record's metric fields: every field set, nothing left unmeasured."""
        return self.model_dump(exclude_unset=True)


# -- the measurements every run shares -----------------------------------------------------------

COLLAPSE_MAJORITY = 0.9


def clone_health(
    clone: nn.Module, history: list[dict[str, Any]], predictions: Tensor
) -> dict[str, Any]:
    """Did the clone's training fail? A clone at chance accuracy means something else when its
    weights are NaN (diverged) or it answers one class for nearly every image (collapsed, its
    loss stalled near log K): an attacker sees either and retrains, so the report flags them.
    ``predictions``: the clone's test-set argmax. ``clone_final_loss`` is ``None`` when the
    last training loss is not finite."""
    final_loss = history[-1].get("final_loss") if history else None
    loss_diverged = final_loss is not None and not math.isfinite(final_loss)
    weights_diverged = not all(bool(torch.isfinite(w).all()) for w in clone.parameters())
    majority = float(predictions.bincount().max()) / len(predictions)
    return {
        "clone_final_loss": None if final_loss is None or loss_diverged else final_loss,
        "clone_diverged": loss_diverged or weights_diverged,
        "clone_majority_fraction": majority,
        "clone_collapsed": majority >= COLLAPSE_MAJORITY,
    }


def clone_metrics(result: AttackResult, test: ImageData) -> dict[str, Any]:
    """What every run reports of its clone: its accuracy on the defender's test set, its health
    (:func:`clone_health`), the queries spent and the transfer set's size and digest."""
    predictions = clean_posteriors(result.clone, test.images).argmax(1)
    final = result.history[-1] if result.history else {}
    return {
        "clone_accuracy": float((predictions == test.labels).float().mean()),
        **clone_health(result.clone, result.history, predictions),
        "queries": result.queries,
        "transfer_digest": final.get("transfer_digest"),
        "transfer_size": result.transfer_size,
    }


def distance_to_plain(served: Tensor, plain: Tensor, *, prefix: str = "") -> dict[str, float]:
    """Mean ‖ỹ − y‖₁ and top-1 agreement of served answers ``served`` against the plain victim's
    ``plain`` (both (N, K)): for a training-time defense, the L1 and agreement a query-time
    defense's ledger would report."""
    return {
        f"{prefix}l1": float((served - plain).abs().sum(1).mean()),
        f"{prefix}top1_agreement": float((served.argmax(1) == plain.argmax(1)).float().mean()),
    }


def measure_overhead(victim: nn.Module, defense: Defense, x: Tensor, *, repeats: int = 3) -> float:
    """Median over ``repeats`` of (forward + defense) / forward on the same batch, same process."""
    ratios = []
    for _ in range(repeats):
        start = time.perf_counter()
        clean_posteriors(victim, x)
        forward = time.perf_counter() - start
        start = time.perf_counter()
        defense(x, clean_posteriors(victim, x))
        ratios.append((time.perf_counter() - start) / forward)
    return statistics.median(ratios)


def peak_rss_mb() -> float | None:
    """This process's peak resident memory so far (an upper bound on the current run's), in MiB;
    ``None`` where the platform cannot say."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (
        peak / 2**20 if sys.platform == "darwin" else peak / 2**10
    )  # bytes on macOS, KiB on Linux
