"""A sweep's run (docs/design.md §protocol): a :class:`~mirage.bench.runs.RunSpec` → its
:class:`~mirage.bench.protocol.RunContext` → :func:`~mirage.bench.protocol.run_attack` → the run
record, with the probes only sweeps measure (the attacker's gradient deviation, the overhead).

A run's defense point is a :class:`~mirage.training.resolve.DefenseSpec` (docs/design.md
§defense-spec). Its victims are explicit (:class:`~mirage.training.resolve.Victims`): the plain
one and the served one. A training-time defense (``ini``, ``dpsgd``:
:mod:`mirage.training.registry`) named in a sweep replaces the served victim and serves it
undefended at query time; the defender's accuracy cost is then measured against the plain
victim on the same images.

Everything expensive is kept in the run's :class:`~mirage.bench.protocol.Stores`: victims and
surrogates by config, the answered transfer sets by exact server and query stream
(:mod:`mirage.bench.answers`), the clones by exact transfer set (a hard-label run against a
defense whose labels equal the undefended API's trains no second clone, and its
``transfer_digest`` shows the equality). A process builds each defense point's context once
(:class:`ScenarioContexts`): the defense is resolved once, and the defender's accuracy measured
once per evaluation size.
"""

from __future__ import annotations

import functools
import json
import platform
import time
from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor

import mirage
from mirage.api import clean_posteriors
from mirage.bench.angles import angular_deviation
from mirage.bench.protocol import (
    RunContext,
    RunMetrics,
    Stores,
    distance_to_plain,
    peak_rss_mb,
    run_attack,
    scenario_context,
)
from mirage.bench.runs import RunSpec
from mirage.models import weights_fingerprint
from mirage.scenarios import Scenario, get_scenario

ANGLE_SAMPLES = 64
OVERHEAD_BATCH = 256


def run_scenario(spec: RunSpec) -> Scenario:
    """The run's scenario, with the sweep's victim-epochs override (a separately kept victim) and
    its data roots (where this machine keeps the victim's and the pool's datasets)."""
    scenario = get_scenario(spec.scenario)
    overrides: dict = {}
    if spec.victim_epochs is not None:
        overrides["victim_training"] = scenario.victim_training.model_copy(
            update={"epochs": spec.victim_epochs}
        )
    roots = spec.data_roots or {}
    if scenario.victim_dataset in roots:
        overrides["data_root"] = roots[scenario.victim_dataset]
    if scenario.pool_dataset in roots:
        overrides["pool_root"] = roots[scenario.pool_dataset]
    return get_scenario(spec.scenario, **overrides) if overrides else scenario


class ScenarioContexts:
    """A process's run contexts for sweep runs, one per (scenario, victim epochs, defense point),
    the last ``keep`` kept: runs of one point share its models, its defense as built and its
    defender metrics."""

    def __init__(self, stores: Stores, keep: int = 4) -> None:
        self.stores = stores
        self.keep = keep
        self._built: OrderedDict[tuple, RunContext] = OrderedDict()

    def get(self, spec: RunSpec) -> RunContext:
        key = (
            spec.scenario,
            spec.victim_epochs,
            json.dumps(spec.data_roots, sort_keys=True),
            spec.user_scenario,
            spec.defense,
            json.dumps(spec.defense_params, sort_keys=True),
        )
        if key not in self._built:
            if spec.user_scenario is not None:
                from mirage.bench.evaluation import user_context

                built = user_context(
                    spec.scenario,
                    spec.user_scenario,
                    spec.defense,
                    spec.defense_params,
                    self.stores,
                )
            else:
                built = scenario_context(
                    run_scenario(spec), spec.defense, spec.defense_params, self.stores
                )
            self._built[key] = built
            while len(self._built) > self.keep:
                self._built.popitem(last=False)
        self._built.move_to_end(key)
        return self._built[key]


@functools.cache
def contexts_for(stores: Stores) -> ScenarioContexts:
    """This process's :class:`ScenarioContexts` for ``stores`` (each pool worker has its own)."""
    return ScenarioContexts(stores)


def prepare_run(spec: RunSpec, stores: Stores | None = None) -> RunContext:
    """The run's context, its models trained (or loaded) and kept — victim, a training-time
    defense's victim, surrogates, detectors. A sweep calls it once per defense point before
    dispatch, so parallel workers only read models from disk instead of training the same one
    side by side."""
    return contexts_for(stores or Stores.from_environment()).get(spec)


def probe_images(pool: Tensor, seed: int) -> Tensor:
    """The run's probe batch: ``OVERHEAD_BATCH`` pool images drawn with the run's seed."""
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))
    return pool[order[:OVERHEAD_BATCH]]


def probe_metrics(
    context: RunContext, fresh_clone: torch.nn.Module, probe: Tensor
) -> dict[str, Any]:
    """The angular deviation of the attacker's gradient on ``ANGLE_SAMPLES`` probe images, clean
    = what the undefended API answers (the plain victim), served = the whole defended pipeline;
    and, for a training-time defense, the effective L1 against the plain victim on the probe (its
    ledger compared the served victim with itself, L1 0; a query-time defense's comes from the
    attack's ledger)."""
    plain, model, defense = context.plain, context.served, context.fresh_defense()
    if plain is None or model is None or defense is None:
        raise ValueError("probe metrics need the plain victim, the served model and its defense")
    head = probe[:ANGLE_SAMPLES]
    clean = clean_posteriors(plain, head)
    served = defense(head, clean_posteriors(model, head))
    metrics: dict[str, Any] = {
        "angular_deviation": [
            round(float(a), 2) for a in angular_deviation(fresh_clone, head, clean, served)
        ]
    }
    if context.training_time:
        metrics["effective_l1"] = distance_to_plain(
            clean_posteriors(model, probe), clean_posteriors(plain, probe)
        )["l1"]
    return metrics


def execute_run(
    spec: RunSpec, stores: Stores | None = None, device: str | None = None
) -> dict[str, Any]:
    """Run one (scenario, defense point, attack, budget, seed) with ``stores`` (default: where the
    environment says, :meth:`Stores.from_environment`), its clone trained on ``device``
    (:func:`mirage.devices.resolve_device`), and return its metrics
    (:class:`~mirage.bench.protocol.RunMetrics`)."""
    from mirage.devices import resolve_device

    start = time.perf_counter()
    device = str(resolve_device(device))
    context = prepare_run(spec, stores)
    plain, served = context.plain, context.served
    if plain is None or served is None:
        raise ValueError("a sweep's run serves its model in this process")
    card = context.card
    clone = context.clone.model_copy(update={"training": spec.clone_training, "device": device})
    stolen = run_attack(
        context, spec.attack, spec.attack_params, spec.budget, spec.seed, clone=clone
    )
    result = stolen.result
    final = result.history[-1] if result.history else {}
    probe = probe_images(context.pool.images, spec.seed)
    probes = probe_metrics(context, clone.build(context.input_shape, context.num_classes), probe)
    l1 = probes.pop("effective_l1", None)
    l1 = (
        {"effective_l1": result.effective_l1, "effective_l1_on": "queries"}
        if l1 is None
        else {"effective_l1": l1, "effective_l1_on": f"{len(probe)} pool images"}
    )
    metrics = RunMetrics(
        **context.defender_metrics(spec.eval_size),
        victim_test_accuracy=None if card is None else card.test_accuracy,
        victim_fingerprint=weights_fingerprint(plain),  # the scenario's plain victim
        served_model_fingerprint=weights_fingerprint(served),  # differs for ini, dpsgd
        **stolen.clone,
        **l1,
        **({"decoys": result.decoys} if result.decoys else {}),
        **({"queries_per_key": result.queries_per_key} if len(result.queries_per_key) > 1 else {}),
        answers_replayed=stolen.replayed,
        clone_from_cache=bool(final.get("from_cache", False)),
        **({"restorer": final["restorer"]} if "restorer" in final else {}),
        **({"alignment": final["alignment"]} if "alignment" in final else {}),
        overhead_ratio=context.overhead(probe),
        **probes,
        attack_seconds=result.wall_seconds,
        wall_seconds=time.perf_counter() - start,
        worker_peak_rss_mb=peak_rss_mb(),
        versions={
            "mirage": mirage.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        device=device,
    )
    return metrics.as_record()
