"""One run of the protocol (docs/design.md §protocol): victim → defended API → attack → clone →
metrics.

A run's defense point is a :class:`~mirage.training.resolve.DefenseSpec` (docs/design.md
§defense-spec). Its victims are explicit (:class:`~mirage.training.resolve.Victims`): the plain
one and the served one. A training-time defense (``ini``, ``dpsgd``:
:mod:`mirage.training.registry`) named in a sweep replaces the served victim and serves it
undefended at query time; the defender's accuracy cost is then measured against the plain
victim on the same images.

Everything expensive is cached: victims and surrogates on disk by config (see
:mod:`mirage.training.victim`), the answered transfer sets on disk by exact server and query
stream (:mod:`mirage.bench.answers`), the clones by exact transfer set
(:func:`mirage.attacks.clone.clone_cache`: a hard-label run against a defense whose labels equal
the undefended API's trains no second clone, and its ``transfer_digest`` shows the equality),
datasets per process; the defender's accuracy on the test
set depends only on (scenario, defense) and is memoised per process.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import platform
import statistics
import sys
import time
from typing import Any

import torch
from torch import Tensor

import mirage
from mirage.api import InProcessAPI, accuracy, clean_posteriors, defended_accuracy
from mirage.attacks import AttackResult, CloneSpec, create_attack
from mirage.attacks.clone import clone_cache
from mirage.attacks.pools import attack_data
from mirage.attacks.restorer import tell_restorer
from mirage.bench.angles import angular_deviation
from mirage.bench.answers import AnswerCache, ReplayingAPI, answers_dir
from mirage.bench.runs import RunSpec
from mirage.data import ImageData, load_dataset
from mirage.defenses import Defense
from mirage.models import weights_fingerprint
from mirage.paths import clones_dir
from mirage.scenarios import Scenario, attacker_labels, get_scenario, query_pool
from mirage.training.registry import is_training_time
from mirage.training.resolve import DefenseSpec, Victims, resolve_defense, resolve_victims

log = logging.getLogger(__name__)

ANGLE_SAMPLES = 64
OVERHEAD_BATCH = 256


ScenarioKey = tuple[str, int | None]
"""(scenario name, victim-epochs override): what the per-process caches below are keyed by."""


def _scenario(key: ScenarioKey) -> Scenario:
    """The named scenario, with the sweep's victim-epochs override (a separately cached victim)."""
    name, victim_epochs = key
    scenario = get_scenario(name)
    if victim_epochs is None:
        return scenario
    return get_scenario(name, victim_training=scenario.victim_training.model_copy(update={"epochs": victim_epochs}))


@functools.lru_cache(maxsize=4)
def _victims(key: ScenarioKey, method: str, params_json: str) -> Victims:
    """The plain and the served victim for a victim method (``none`` or a training-time
    defense), loaded once per process."""
    return resolve_victims(DefenseSpec(name=method, params=json.loads(params_json)), _scenario(key))


def split_defense(name: str, params: dict[str, Any]) -> tuple[tuple[str, str], tuple[str, dict[str, Any]]]:
    """((victim method, its params as JSON), (query-time defense, its params))."""
    if is_training_time(name):
        return (name, json.dumps(params, sort_keys=True)), ("none", {})
    return ("none", "{}"), (name, params)


def _victims_and_defense(key: ScenarioKey, defense: str, params: dict[str, Any]) -> tuple[Victims, Defense]:
    (method, method_params), (query_defense, query_params) = split_defense(defense, params)
    victims = _victims(key, method, method_params)
    spec = DefenseSpec.from_params(query_defense, query_params)
    return victims, resolve_defense(spec, _scenario(key), victims.served, victims.card)


def _eval_data(scenario: Scenario, eval_size: int | None) -> ImageData:
    test = load_dataset(scenario.victim_dataset, scenario.data_root).test
    return test if eval_size is None else test.subset(torch.arange(min(eval_size, len(test))))


@functools.lru_cache(maxsize=64)
def _defender_metrics(key: ScenarioKey, defense: str, params_json: str, eval_size: int | None) -> dict:
    victims, built = _victims_and_defense(key, defense, json.loads(params_json))
    data = _eval_data(_scenario(key), eval_size)
    result = defended_accuracy(victims.served, built, data)
    if not victims.training_time:
        return {"victim_accuracy": result.clean_accuracy, "defender_accuracy": result.defended_accuracy,
                "defender_l1": result.effective_l1, "defender_top1_agreement": result.top1_agreement}
    # A training-time defense: its cost in accuracy and L1 is against the plain victim on the same
    # images (victim_accuracy stays the plain victim's, also when eval_size takes a subset).
    plain = victims.plain
    return {"victim_accuracy": accuracy(plain, data), "defender_accuracy": result.defended_accuracy,
            **distance_to_plain(clean_posteriors(victims.served, data.images),
                                clean_posteriors(plain, data.images), prefix="defender_")}


def distance_to_plain(served: Tensor, plain: Tensor, *, prefix: str = "") -> dict[str, float]:
    """Mean ‖ỹ − y‖₁ and top-1 agreement of served answers ``served`` against the plain victim's
    ``plain`` (both (N, K)): for a training-time defense, the L1 and agreement a query-time
    defense's ledger would report."""
    return {f"{prefix}l1": float((served - plain).abs().sum(1).mean()),
            f"{prefix}top1_agreement": float((served.argmax(1) == plain.argmax(1)).float().mean())}


def measure_overhead(victim: torch.nn.Module, defense, x: torch.Tensor, *, repeats: int = 3) -> float:
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
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


COLLAPSE_MAJORITY = 0.9


def clone_health(clone: torch.nn.Module, history: list[dict[str, Any]], predictions: Tensor) -> dict[str, Any]:
    """Did the clone's training fail? A clone at chance accuracy means something else when its
    weights are NaN (diverged) or it answers one class for nearly every image (collapsed, its
    loss stalled near log K): an attacker sees either and retrains, so the report flags them.
    ``predictions``: the clone's test-set argmax. ``clone_final_loss`` is ``None`` when the
    last training loss is not finite."""
    final_loss = history[-1].get("final_loss") if history else None
    loss_diverged = final_loss is not None and not math.isfinite(final_loss)
    weights_diverged = not all(bool(torch.isfinite(w).all()) for w in clone.parameters())
    majority = float(predictions.bincount().max()) / len(predictions)
    return {"clone_final_loss": None if final_loss is None or loss_diverged else final_loss,
            "clone_diverged": loss_diverged or weights_diverged,
            "clone_majority_fraction": majority,
            "clone_collapsed": majority >= COLLAPSE_MAJORITY}


def clone_metrics(result: AttackResult, test: ImageData) -> dict[str, Any]:
    """What every run reports of its clone, whoever ran it (a sweep's :func:`execute_run`,
    :func:`mirage.bench.evaluation.evaluate`, ``mirage.evaluate``): its accuracy on the defender's
    test set, its health (:func:`clone_health`), the queries spent and the transfer set's size
    and digest."""
    predictions = clean_posteriors(result.clone, test.images).argmax(1)
    final = result.history[-1] if result.history else {}
    return {"clone_accuracy": float((predictions == test.labels).float().mean()),
            **clone_health(result.clone, result.history, predictions),
            "queries": result.queries, "transfer_digest": final.get("transfer_digest"),
            "transfer_size": result.transfer_size}


def prepare_run(spec: RunSpec) -> tuple[Victims, Defense]:
    """The run's victims (plain and served) and its query-time defense, trained (or loaded) and
    cached — victim, a training-time defense's victim, surrogates, detectors. A sweep calls it
    once per defense point before dispatch, so parallel workers only read models from disk
    instead of training the same one side by side."""
    return _victims_and_defense((spec.scenario, spec.victim_epochs), spec.defense, spec.defense_params)


def probe_images(scenario: Scenario, seed: int) -> Tensor:
    """The run's probe batch: ``OVERHEAD_BATCH`` pool images drawn with the run's seed."""
    pool = query_pool(scenario)
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))
    return pool.images[order[:OVERHEAD_BATCH]]


def probe_metrics(victims: Victims, defense: Defense, fresh_clone: torch.nn.Module, probe: Tensor
                  ) -> dict[str, Any]:
    """The angular deviation of the attacker's gradient on ``ANGLE_SAMPLES`` probe images, clean
    = what the undefended API answers (the plain victim), served = the whole defended pipeline;
    and, for a training-time defense, the effective L1 against the plain victim on the probe (its
    ledger compared the served victim with itself, L1 0; a query-time defense's comes from the
    attack's ledger)."""
    head = probe[:ANGLE_SAMPLES]
    clean = clean_posteriors(victims.plain, head)
    served = defense(head, clean_posteriors(victims.served, head))
    metrics: dict[str, Any] = {
        "angular_deviation": [round(float(a), 2) for a in angular_deviation(fresh_clone, head, clean, served)]}
    if victims.training_time:
        metrics["effective_l1"] = distance_to_plain(clean_posteriors(victims.served, probe),
                                                    clean_posteriors(victims.plain, probe))["l1"]
    return metrics


def attacker_knowledge(spec: RunSpec) -> dict[str, Any]:
    """The run's attack parameters, with what a Kerckhoffs attacker knows filled in: the
    restorer is told the query-time defense's name and public parameters (never its secrets,
    and never its parts, such as a watermark set: docs/design.md §defense-spec)."""
    _, (query_defense, query_params) = split_defense(spec.defense, spec.defense_params)
    plain_params = DefenseSpec.from_params(query_defense, query_params).params  # without its parts
    return tell_restorer(spec.attack_params, query_defense, plain_params)


def steal(spec: RunSpec, scenario: Scenario, victims: Victims, defense: Defense, clone_spec: CloneSpec
          ) -> tuple[AttackResult, int]:
    """The run's attack on the served victim behind ``defense``, through the answer cache when
    there is one; returns the result and how many answers the cache replayed. An attacker with
    several API keys (``api_keys``) gets one :meth:`~mirage.api.InProcessAPI.for_client` view per
    key and no answer cache (it records one stream per API); the views share the defense and the
    benchmark's API has no detector, so its answers are the one-key attacker's."""
    api: InProcessAPI | ReplayingAPI = InProcessAPI(victims.served, defense, query_budget=None)
    attack = create_attack(spec.attack, **attacker_knowledge(spec))
    if (answers := answers_dir()) is not None and attack.params.api_keys == 1:
        try:
            api = ReplayingAPI(api, AnswerCache(answers))
        except (TypeError, ValueError) as error:  # e.g. a parameter it cannot fingerprint
            log.warning("answer cache off for this run: %s", error)
    with clone_cache(clones_dir()):
        result = attack.run(api, spec.budget, attack_data(scenario, spec.attack), clone_spec, seed=spec.seed,
                            labelled=attacker_labels(scenario, attack.params.align_labels, spec.seed))
    if not isinstance(api, ReplayingAPI):
        return result, 0
    api.close()
    return result, api.replayed


def execute_run(spec: RunSpec) -> dict[str, Any]:
    """Run one (scenario, defense point, attack, budget, seed) and return its metrics."""
    start = time.perf_counter()
    torch.manual_seed(spec.seed)
    key = (spec.scenario, spec.victim_epochs)
    scenario = _scenario(key)
    victims, defense = prepare_run(spec)
    card = victims.card
    clone_spec = CloneSpec.like(card, training=spec.clone_training)
    result, replayed = steal(spec, scenario, victims, defense, clone_spec)
    final = result.history[-1] if result.history else {}
    # A fresh defense for the probes below: their numbers must not depend on what the attack's
    # requests did to the defense's state (or on whether they were replayed from the cache).
    defense = prepare_run(spec)[1]
    test = load_dataset(scenario.victim_dataset, scenario.data_root).test
    scored = clone_metrics(result, test)

    probe = probe_images(scenario, spec.seed)
    probes = probe_metrics(victims, defense, clone_spec.build(card.input_shape, card.num_classes), probe)
    l1 = probes.pop("effective_l1", None)
    l1 = ({"effective_l1": result.effective_l1, "effective_l1_on": "queries"} if l1 is None
          else {"effective_l1": l1, "effective_l1_on": f"{len(probe)} pool images"})

    return {
        **_defender_metrics(key, spec.defense, json.dumps(spec.defense_params, sort_keys=True),
                            spec.eval_size),
        "victim_test_accuracy": card.test_accuracy,
        "victim_fingerprint": weights_fingerprint(victims.plain),       # the scenario's plain victim
        "served_model_fingerprint": weights_fingerprint(victims.served),  # differs for ini, dpsgd
        **scored,
        **l1,
        **({"decoys": result.decoys} if result.decoys else {}),
        **({"queries_per_key": result.queries_per_key} if len(result.queries_per_key) > 1 else {}),
        "answers_replayed": replayed,
        "clone_from_cache": bool(final.get("from_cache", False)),
        **({"restorer": final["restorer"]} if "restorer" in final else {}),
        **({"alignment": final["alignment"]} if "alignment" in final else {}),
        "overhead_ratio": measure_overhead(victims.served, defense, probe),
        **probes,
        "attack_seconds": result.wall_seconds,
        "wall_seconds": time.perf_counter() - start,
        "worker_peak_rss_mb": peak_rss_mb(),
        "versions": {"mirage": mirage.__version__, "torch": torch.__version__,
                     "python": platform.python_version()},
    }
