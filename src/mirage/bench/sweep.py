"""Run a sweep: expand the config, skip what the results file already holds, execute the rest and
append each result as it finishes. Killing and restarting resumes without redoing finished runs."""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mirage.bench.config import SweepConfig
from mirage.bench.executors import run_dask, run_inline, run_process_pool
from mirage.bench.protocol import Stores
from mirage.bench.results import ResultStore
from mirage.bench.runs import RunSpec, expand
from mirage.progress import progress_bar

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepStatus:
    total: int
    done: int
    pending: list[RunSpec]
    seconds_done: float

    @property
    def eta_seconds(self) -> float | None:
        if not self.done:
            return None
        return self.seconds_done / self.done * len(self.pending)


def sweep_status(config: SweepConfig, store: ResultStore) -> SweepStatus:
    runs = expand(config)
    records = {r["run_id"]: r for r in store.read() if "run_id" in r}
    pending = [run for run in runs if run.run_id not in records]
    finished = [records[run.run_id] for run in runs if run.run_id in records]
    return SweepStatus(
        total=len(runs),
        done=len(finished),
        pending=pending,
        seconds_done=sum(r.get("wall_seconds", 0.0) for r in finished),
    )


@dataclass(frozen=True)
class RunFilter:
    """Which pending runs to execute now (empty = any): lets a long sweep run its most telling
    part first. Matches scenario names, attack labels (or the family of an attacker suite's
    runs: ``knockoff`` matches ``knockoff/hard-label``, but not the attackers beyond the suite,
    ``extra_labels``, which are asked for by their own label) and defense labels."""

    scenarios: frozenset[str] = frozenset()
    attacks: frozenset[str] = frozenset()
    defenses: frozenset[str] = frozenset()
    seeds: frozenset[int] = frozenset()
    extra_labels: frozenset[str] = frozenset()

    @classmethod
    def of(
        cls, config: SweepConfig, *, scenarios=(), attacks=(), defenses=(), seeds=()
    ) -> RunFilter:
        """A filter for ``config``, which says which attack labels are beyond its suites."""
        extras = frozenset(f"{a.display}/{v}" for a in config.attacks for v in a.extra_variants)
        return cls(
            frozenset(scenarios), frozenset(attacks), frozenset(defenses), frozenset(seeds), extras
        )

    def validate(self, config: SweepConfig) -> None:
        known: dict[str, set[Any]] = {
            "scenario": set(config.scenarios),
            "attack": {a.display for a in config.attacks}
            | {label for a in config.attacks for label, _, _ in a.expanded()},
            "defense": {d.display for d in config.defenses},
        }
        known["seed"] = set(config.seeds)
        for kind, wanted in (
            ("scenario", self.scenarios),
            ("attack", self.attacks),
            ("defense", self.defenses),
            ("seed", self.seeds),
        ):
            unknown = wanted - known[kind]
            if unknown:
                raise ValueError(
                    f"no {kind} {sorted(unknown)} in sweep {config.name!r} "
                    f"(it has {sorted(known[kind])})"
                )

    def __call__(self, run: RunSpec) -> bool:
        return (
            (not self.scenarios or run.scenario in self.scenarios)
            and (
                not self.attacks
                or run.attack_label in self.attacks
                or (run.attack_family in self.attacks and run.attack_label not in self.extra_labels)
            )
            and (not self.defenses or run.defense_label in self.defenses)
            and (not self.seeds or run.seed in self.seeds)
        )


def import_records(
    config: SweepConfig, source: ResultStore, target: ResultStore, only: RunFilter | None = None
) -> int:
    """Copy into ``target`` the records of ``source`` that are runs of ``config`` (same run id:
    the same scenario, defense point, attack parameters, budget, seed and clone recipe) and that
    ``target`` lacks, relabelled as ``config`` names them and marked ``imported_from``; returns
    how many. The soft-label attacker of a suite is the plain attack of an earlier sweep: its run
    is not repeated. ``only`` restricts it to matching runs."""
    runs = {run.run_id: run for run in expand(config) if only is None or only(run)}
    have = target.done_ids()
    count = 0
    for record in source.read():
        run = runs.get(record.get("run_id", ""))
        if run is None or run.run_id in have:
            continue
        target.append(
            {
                **record,
                **run.model_dump(mode="json"),
                "run_id": run.run_id,
                "imported_from": str(source.path),
            }
        )
        have.add(run.run_id)
        count += 1
    return count


def prepare_shared_models(pending: list[RunSpec], preparer: Callable[[RunSpec], Any]) -> int:
    """Call ``preparer`` once per distinct (scenario, victim epochs, defense point) among
    ``pending``, in this process; returns how many it prepared."""
    seen: set[tuple] = set()
    for run in pending:
        key = (
            run.scenario,
            run.victim_epochs,
            run.defense,
            json.dumps(run.defense_params, sort_keys=True),
        )
        if key not in seen:
            seen.add(key)
            preparer(run)
    return len(seen)


def sweep_stores(config: SweepConfig, results: str | Path, stores: Stores | None = None) -> Stores:
    """The stores a sweep's runs use: ``stores`` (default: where the environment says), with the
    models pinned next to the results file when the config says ``models_dir``."""
    stores = stores or Stores.from_environment()
    if config.models_dir:
        stores = stores.with_models(Path(results).parent / config.models_dir)
    return stores


def run_sweep(
    config: SweepConfig,
    results: str | Path,
    *,
    runner: Callable[..., dict[str, Any]] | None = None,
    preparer: Callable[..., Any] | None = None,
    executor: str = "local",
    workers: int = 1,
    scheduler: Any = None,
    limit: int | None = None,
    only: RunFilter | None = None,
    show_progress: bool = True,
    stores: Stores | None = None,
    device: str | None = None,
) -> SweepStatus:
    """Execute every pending run of ``config``; returns the status after the sweep.

    ``executor``: ``inline`` (this process), ``local`` (process pool of ``workers``) or ``dask``
    (``scheduler`` = address or Client). ``runner(spec, stores=...)`` runs one spec (default
    :func:`mirage.bench.execute.execute_run`) with the sweep's stores (:func:`sweep_stores`).
    Before runs go to a pool or cluster, ``preparer(spec, stores=...)`` (default with the default
    runner: :func:`mirage.bench.execute.prepare_run`) trains the models they share here, once
    each. ``only`` restricts this call to matching runs and ``limit`` caps how many it executes.
    ``device`` (cpu, cuda, mps) is where the default runner trains clones
    (:func:`mirage.devices.resolve_device`; checked here, before any run).
    """
    if runner is None:
        from mirage.bench.execute import execute_run, prepare_run

        runner = execute_run
        preparer = preparer or prepare_run
    stores = sweep_stores(config, results, stores)
    if device is not None:
        from mirage.devices import resolve_device

        runner = functools.partial(runner, device=str(resolve_device(device)))
    runner = functools.partial(runner, stores=stores)
    preparer = None if preparer is None else functools.partial(preparer, stores=stores)
    store = ResultStore(results)
    status = sweep_status(config, store)
    pending = status.pending
    if only is not None:
        only.validate(config)
        pending = [run for run in pending if only(run)]
    pending = pending[:limit] if limit is not None else pending
    log.info(
        "sweep %s: %d runs, %d done, %d to run now",
        config.name,
        status.total,
        status.done,
        len(pending),
    )
    _execute(
        pending,
        store,
        runner,
        preparer,
        executor=executor,
        workers=workers,
        scheduler=scheduler,
        title=f"sweep {config.name}",
        show_progress=show_progress,
    )
    return sweep_status(config, store)


def _execute(
    pending: list[RunSpec],
    store: ResultStore,
    runner: Callable[[RunSpec], dict[str, Any]],
    preparer: Callable[[RunSpec], Any] | None,
    *,
    executor: str,
    workers: int,
    scheduler: Any,
    title: str,
    show_progress: bool,
) -> None:
    if executor != "inline" and preparer is not None and pending:
        log.info(
            "prepared the models of %d defense points", prepare_shared_models(pending, preparer)
        )
    if executor == "inline":
        stream = run_inline(runner, pending)
    elif executor == "local":
        stream = run_process_pool(runner, pending, workers=workers)
    elif executor == "dask":
        if scheduler is None:
            raise ValueError("the dask executor needs a scheduler address or Client")
        stream = run_dask(runner, pending, scheduler=scheduler)
    else:
        raise ValueError(f"unknown executor {executor!r} (inline, local, dask)")
    start = time.perf_counter()
    with progress_bar(title, total=len(pending), enabled=show_progress) as advance:
        for spec, result in stream:
            finished = datetime.now(UTC).isoformat(timespec="seconds")
            store.append(
                {
                    "run_id": spec.run_id,
                    **spec.model_dump(mode="json", exclude={"data_roots"}),  # local paths
                    **result,
                    "finished": finished,
                }
            )
            log.info(
                "done %s -> clone %.4f", spec.describe(), result.get("clone_accuracy", float("nan"))
            )
            advance(1, elapsed=time.perf_counter() - start)
