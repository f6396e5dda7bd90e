"""Turn run records into the protocol's summaries (docs/design.md §summaries): per-defense trade-off
curves, clone accuracy interpolated at fixed defender-accuracy drops and at fixed effective L1, the
reference clones, and the per-query overhead.

Runs whose clone training failed — diverged (NaN) or collapsed to one class — are left out of the
curves and tables (:func:`failed_clone`): an attacker sees the stalled loss and retrains, and a
fluke of one training run must not pass for a defense's effect. They stay in the list of all runs
and the report counts them; ``restarts`` (an attacker countermeasure) measures the retrained clone.
One exception (:func:`counted_runs`): a clone that collapsed at every seed of its point, and at
:data:`PERSISTENT_COLLAPSE_SEEDS` seeds or more, is what that attacker gets — independent
trainings that all end in one class are no fluke (answers that carry nothing teach one class).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.stats import t as student_t

ACCURACY_DROPS = (0.01, 0.02, 0.05)
L1_LEVELS = (0.1, 0.2, 0.5)


@dataclass
class Curve:
    """One defense's points for one (scenario, attack): seeds averaged per parameter point."""

    scenario: str
    attack: str
    defense: str
    points: list[dict[str, Any]] = field(default_factory=list)

    def xy(self, x_key: str, y_key: str = "clone_accuracy") -> tuple[np.ndarray, np.ndarray]:
        pts = sorted(self.points, key=lambda p: p[x_key])
        return np.array([p[x_key] for p in pts]), np.array([p[y_key] for p in pts])


def _mean_over_seeds(records: list[dict[str, Any]]) -> dict[str, Any]:
    keys = (
        "clone_accuracy",
        "defender_accuracy",
        "victim_accuracy",
        "effective_l1",
        "defender_l1",
        "overhead_ratio",
    )
    out: dict[str, Any] = {
        k: float(np.mean([r[k] for r in records if r.get(k) is not None]))
        for k in keys
        if any(r.get(k) is not None for r in records)
    }
    out["defense_params"] = records[0]["defense_params"]
    out["seeds"] = sorted(r["seed"] for r in records)
    out["clone_accuracy_std"] = float(np.std([r["clone_accuracy"] for r in records]))
    out["clone_by_seed"] = {r["seed"]: r["clone_accuracy"] for r in records}
    return out


PERSISTENT_COLLAPSE_SEEDS = 3
"""Seeds at which a point's clone must have collapsed, every one, for the collapse to count."""


def failed_clone(record: dict[str, Any]) -> bool:
    return bool(record.get("clone_diverged") or record.get("clone_collapsed"))


def _run_group(record: dict[str, Any]) -> tuple:
    return (
        record.get("scenario"),
        record.get("attack_label"),
        record.get("defense_label"),
        tuple(sorted((k, str(v)) for k, v in (record.get("defense_params") or {}).items())),
    )


def persistently_collapsed(records: list[dict[str, Any]]) -> set[tuple]:
    """The (scenario, attack, defense, params) groups whose clone collapsed (without diverging)
    at every seed they ran, at :data:`PERSISTENT_COLLAPSE_SEEDS` seeds or more."""
    seeds: dict[tuple, set[int | None]] = defaultdict(set)
    not_collapsed: set[tuple] = set()  # groups with a healthy or a diverged run
    for r in records:
        group = _run_group(r)
        if r.get("clone_collapsed") and not r.get("clone_diverged"):
            seeds[group].add(r.get("seed"))
        else:
            not_collapsed.add(group)
    return {
        g
        for g, s in seeds.items()
        if g not in not_collapsed and len(s) >= PERSISTENT_COLLAPSE_SEEDS
    }


def counted_runs(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs the summaries use: those with a healthy clone, plus every run of a group that
    collapsed at every seed (:func:`persistently_collapsed`); a diverged run never counts."""
    persistent = persistently_collapsed(records)
    return [
        r
        for r in records
        if not failed_clone(r) or (not r.get("clone_diverged") and _run_group(r) in persistent)
    ]


def curves(records: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Curve]]:
    """(scenario, attack label) -> defense label -> Curve; the undefended point starts every curve.
    Runs with a failed clone are left out."""
    grouped: dict[tuple, list] = defaultdict(list)
    for r in counted_runs(records):
        grouped[_run_group(r)].append(r)
    result: dict[tuple[str, str], dict[str, Curve]] = defaultdict(dict)
    for (scenario, attack, defense, _), group in grouped.items():
        curve = result[(scenario, attack)].setdefault(defense, Curve(scenario, attack, defense))
        curve.points.append(_mean_over_seeds(group))
    for panel in result.values():
        origin = panel.get("none")
        if origin is None:
            continue
        for name, curve in panel.items():
            if name != "none":
                curve.points.extend({**p, "origin": True} for p in origin.points)
    return dict(result)


def interpolate(x: np.ndarray, y: np.ndarray, at: float) -> float | None:
    """Linear interpolation of y at x = ``at``; ``None`` outside the measured range."""
    if len(x) == 0 or at < x.min() - 1e-12 or at > x.max() + 1e-12:
        return None
    unique_x = np.unique(x)
    mean_y = np.array([y[x == u].mean() for u in unique_x])
    return float(np.interp(at, unique_x, mean_y))


def best_within(cost: np.ndarray, clone: np.ndarray, limit: float) -> float | None:
    """The lowest clone accuracy among measured points whose cost is at most ``limit`` (the
    defender's best operating point within that cost; the undefended origin qualifies when the
    panel has it); ``None`` if no point does."""
    within = clone[cost <= limit + 1e-6]  # costs are float32 means: ε = 0.5 may read 0.50000006
    return float(within.min()) if len(within) else None


def _costs(curve: Curve) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(defender-accuracy drop, clone accuracy, effective L1) of a curve's points."""
    pts = curve.points
    return (
        np.array([p["victim_accuracy"] - p["defender_accuracy"] for p in pts]),
        np.array([p["clone_accuracy"] for p in pts]),
        np.array([p["effective_l1"] for p in pts]),
    )


def _cost_table(
    panel: dict[str, Curve], at, prefix: str, drop_fmt: str, l1_fmt: str
) -> list[dict[str, Any]]:
    """One row per defense: ``at(cost, clone, level)`` at each defender-accuracy drop and L1
    level."""
    rows = []
    for name, curve in sorted(panel.items()):
        if name == "none":
            continue
        drop, clone, l1 = _costs(curve)
        row: dict[str, Any] = {"defense": name}
        row.update(
            {
                f"{prefix}@{drop_fmt}{int(d * 100)}": at(np.maximum(drop, 0), clone, d)
                for d in ACCURACY_DROPS
            }
        )
        row.update({f"{prefix}@{l1_fmt}{level}": at(l1, clone, level) for level in L1_LEVELS})
        rows.append(row)
    return rows


def best_within_table(panel: dict[str, Curve]) -> list[dict[str, Any]]:
    """Per defense: the lowest clone accuracy at a defender-accuracy drop ≤ 1/2/5 points and at
    effective L1 ≤ 0.1/0.2/0.5 — unlike interpolation, defined for every defense."""
    return _cost_table(panel, best_within, "best", "drop≤", "L1≤")


def tradeoff_table(panel: dict[str, Curve]) -> list[dict[str, Any]]:
    """Clone accuracy at defender-accuracy drops of 1/2/5 points and at effective L1 0.1/0.2/0.5."""
    return _cost_table(panel, interpolate, "clone", "drop", "L1=")


def points_table(panel: dict[str, Curve]) -> list[dict[str, Any]]:
    """Every measured point of a panel (the undefended one once), seeds averaged: its parameters,
    how many seeds, defender accuracy, effective L1, the clone's mean and spread (population
    standard deviation over seeds, 0 for one seed) — what a difference must beat to count — and
    ``vs_undefended``: the clone's change against the undefended clone of the same seeds (paired,
    so the attacker's own seed-to-seed noise cancels; ``None`` without a shared seed)."""
    undefended = panel["none"].points[0]["clone_by_seed"] if "none" in panel else {}
    rows = []
    for name, curve in sorted(panel.items()):
        own = [p for p in curve.points if not p.get("origin")]
        for p in sorted(
            own, key=lambda q: (q.get("effective_l1", 0.0), -q.get("defender_accuracy", 0.0))
        ):
            rows.append(
                {
                    "defense": name,
                    "params": ",".join(
                        f"{k}={'{…}' if isinstance(v, dict) else v}"
                        for k, v in sorted(p["defense_params"].items())
                        if k != "surrogate_config"
                    )
                    or "–",
                    "seeds": len(p["seeds"]),
                    "defender_accuracy": p.get("defender_accuracy"),
                    "effective_l1": p.get("effective_l1"),
                    "clone_accuracy": p["clone_accuracy"],
                    "clone_sd": p["clone_accuracy_std"],
                    "vs_undefended": _paired_change(p, undefended),
                }
            )
    return rows


def _paired_change(point: dict[str, Any], undefended: dict[int, float]) -> float | None:
    shared = sorted(set(point["clone_by_seed"]) & set(undefended))
    if not shared:
        return None
    return float(np.mean([point["clone_by_seed"][s] - undefended[s] for s in shared]))


def references(
    records: list[dict[str, Any]], reference_of: dict[str, str]
) -> dict[tuple[str, str], dict[str, float]]:
    """(scenario, attack) -> {"undefended": acc, "<reference attack>": acc} from the ``none``
    runs."""
    refs: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in counted_runs(records):
        if r["defense"] != "none":
            continue
        refs[(r["scenario"], r["attack_label"])]["undefended"].append(r["clone_accuracy"])
        target = reference_of.get(r["attack_label"])
        if target:
            refs[(r["scenario"], target)][r["attack_label"]].append(r["clone_accuracy"])
    return {k: {name: float(np.mean(v)) for name, v in d.items()} for k, d in refs.items()}


def overhead_table(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per defense label: median (defended / undefended) per-query time, measured within each
    run."""
    by_defense: dict[str, list[float]] = defaultdict(list)
    for r in records:
        if r.get("overhead_ratio") is not None:
            by_defense[r["defense_label"]].append(r["overhead_ratio"])
    return [
        {"defense": d, "overhead_ratio_median": float(np.median(v)), "runs": len(v)}
        for d, v in sorted(by_defense.items())
    ]


def sweep_cost_table(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per scenario and in total: runs, the compute they took (sum of run wall times; with W
    workers the sweep's wall time is about this over W) and the largest worker peak RSS recorded
    (runs recorded before ``worker_peak_rss_mb`` existed have none)."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[r["scenario"]].append(r)
        groups["all"].append(r)

    def row(name: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
        memory = [r["worker_peak_rss_mb"] for r in rows if r.get("worker_peak_rss_mb") is not None]
        return {
            "scenario": name,
            "runs": len(rows),
            "run_hours": sum(r.get("wall_seconds", 0.0) for r in rows) / 3600,
            "peak_rss_mb": max(memory) if memory else None,
            "runs_with_memory": len(memory),
        }

    return [
        row(name, groups[name]) for name in sorted(set(groups) - {"all"}) + ["all"] if groups[name]
    ]


# --- The worst case over an attacker suite (sweeps whose attacks list ``variants``) -------------


def attack_family(record: dict[str, Any]) -> str:
    """The attack a run belongs to: its suite family (``knockoff`` for ``knockoff/averaging``), or
    its label for a run outside any suite."""
    return record.get("attack_family") or record["attack_label"]


def _point_key(record: dict[str, Any]) -> tuple[str, str]:
    return record["defense_label"], json_params(record["defense_params"])


def json_params(params: dict[str, Any]) -> str:
    """A defense point's parameters as a short, stable label (nested recipes abbreviated)."""
    return (
        ",".join(
            f"{k}={'{…}' if isinstance(v, dict) else v}"
            for k, v in sorted(params.items())
            if k != "surrogate_config"
        )
        or "–"
    )


@dataclass
class WorstCasePoint:
    """One defense point of one (scenario, attack family): every attacker's clone (mean over its
    seeds), the worst of them and who reached it. ``complete`` is False while an attacker of the
    suite has no (healthy) run yet: ``worst`` is then only a lower bound on the worst case."""

    scenario: str
    family: str
    defense: str
    params: str
    victim_accuracy: float
    defender_accuracy: float
    effective_l1: float | None
    overhead_ratio: float | None
    by_attacker: dict[str, dict[str, Any]]
    suite: tuple[str, ...]

    @property
    def drop(self) -> float:
        return self.victim_accuracy - self.defender_accuracy

    @property
    def complete(self) -> bool:
        return all(a in self.by_attacker for a in self.suite)

    @property
    def worst_attacker(self) -> str:
        return max(self.by_attacker, key=lambda a: self.by_attacker[a]["clone"])

    @property
    def worst(self) -> float:
        return self.by_attacker[self.worst_attacker]["clone"]

    @property
    def soft(self) -> float | None:
        return self.by_attacker.get("soft", {}).get("clone")


def worst_case_points(
    records: list[dict[str, Any]], suites: dict[str, tuple[str, ...]] | None = None
) -> dict[tuple[str, str], list[WorstCasePoint]]:
    """(scenario, attack family) -> its defense points judged by every attacker of the suite.

    ``suites``: attack family -> the attackers its sweep runs (the config's ``variants``); without
    it, the attackers seen in the records of the panel.

    Only runs of a suite (records with an ``attacker``) count; runs with a failed clone are left
    out as everywhere else (an attacker retrains them), unless they collapsed at every seed
    (:func:`counted_runs`). Per attacker the clone is the mean over its
    seeds; ``seeds`` and the spread (``sd``) are kept beside it. A run whose transfer set is the
    very one the same attacker got from the undefended API at the same seed (equal
    ``transfer_digest``; in practice a hard-label run against a point that keeps the top-1) is
    marked ``same_as_undefended`` (at every seed it ran; ``identical_seeds``: the seeds where it
    is); ``hard_labels``: the attacker trains on top-1 labels only (:func:`hard_label_run`)."""
    seen: dict[tuple[str, str], set[str]] = defaultdict(set)
    grouped: dict[tuple[str, str, str, str], list[dict[str, Any]]] = defaultdict(list)
    undefended_digest: dict[tuple[str, str, str, int], str] = {}
    counted = {id(r) for r in counted_runs(records)}
    for r in records:
        if not r.get("attacker"):
            continue
        family = attack_family(r)
        seen[(r["scenario"], family)].add(r["attacker"])
        if r["defense"] == "none" and r.get("transfer_digest"):
            undefended_digest[(r["scenario"], family, r["attacker"], r["seed"])] = r[
                "transfer_digest"
            ]
        if id(r) in counted:
            grouped[(r["scenario"], family, *_point_key(r))].append(r)
    panels: dict[tuple[str, str], list[WorstCasePoint]] = defaultdict(list)
    for (scenario, family, defense, params), group in sorted(grouped.items()):
        by_attacker: dict[str, dict[str, Any]] = {}
        for attacker in sorted({r["attacker"] for r in group}):
            runs = [r for r in group if r["attacker"] == attacker]
            clones = [r["clone_accuracy"] for r in runs]
            same = [
                r.get("transfer_digest") is not None
                and r.get("transfer_digest")
                == undefended_digest.get((scenario, family, attacker, r["seed"]))
                for r in runs
            ]
            by_attacker[attacker] = {
                "clone": float(np.mean(clones)),
                "sd": float(np.std(clones)),
                "seeds": sorted(r["seed"] for r in runs),
                "by_seed": {r["seed"]: r["clone_accuracy"] for r in runs},
                "collapsed": all(r.get("clone_collapsed") for r in runs),
                "hard_labels": all(hard_label_run(r) for r in runs),
                "same_as_undefended": defense != "none" and all(same),
                "identical_seeds": sorted(
                    r["seed"] for r, s in zip(runs, same, strict=True) if s and defense != "none"
                ),
            }
        l1 = [
            r["effective_l1"]
            for r in group
            if r.get("attacker") == "soft" and r.get("effective_l1") is not None
        ]
        overhead = [r["overhead_ratio"] for r in group if r.get("overhead_ratio") is not None]
        panels[(scenario, family)].append(
            WorstCasePoint(
                scenario=scenario,
                family=family,
                defense=defense,
                params=params,
                victim_accuracy=float(np.mean([r["victim_accuracy"] for r in group])),
                defender_accuracy=float(np.mean([r["defender_accuracy"] for r in group])),
                effective_l1=float(np.mean(l1)) if l1 else None,
                overhead_ratio=float(np.median(overhead)) if overhead else None,
                by_attacker=by_attacker,
                suite=tuple((suites or {}).get(family) or sorted(seen[(scenario, family)])),
            )
        )
    return dict(panels)


def hard_label_run(record: dict[str, Any]) -> bool:
    """Whether the run's attacker trains on top-1 labels only: its ``attack_params`` say so, or,
    in a record without them, its named variant does (``mirage.attacks.ATTACKER_SUITE``)."""
    params = record.get("attack_params")
    if params is not None:
        return bool(params.get("hard_labels"))
    from mirage.attacks.countermeasures import ATTACKER_SUITE

    return bool(ATTACKER_SUITE.get(record.get("attacker", ""), {}).get("hard_labels"))


def _attacker_cell(entry: dict[str, Any]) -> str:
    cell = f"{entry['clone']:.4f}"
    if len(entry["seeds"]) > 1:
        cell += f" ± {entry['sd']:.3f} ({len(entry['seeds'])} seeds)"
    if entry["same_as_undefended"]:
        cell += " =undef."
    if entry.get("collapsed"):
        cell += " collapsed at every seed"
    return cell


def worst_case_table(points: list[WorstCasePoint]) -> list[dict[str, Any]]:
    """One row per defense point: its cost, the soft-label clone, the worst case over the suite
    and who reached it, then every attacker's clone (``=undef.``: the transfer set is exactly the
    undefended API's, so is the clone). A worst case still missing attackers reads ``≥ x``."""
    rows = []
    for p in sorted(points, key=lambda q: (q.defense != "none", q.worst if q.complete else 2.0)):
        row: dict[str, Any] = {
            "defense": point_label(p),
            "defender drop (pts)": f"{100 * p.drop:.2f}",
            "soft clone": p.soft,
            "worst clone": f"{p.worst:.4f}" if p.complete else f"≥ {p.worst:.4f}",
            "worst attacker": p.worst_attacker,
            "recovered vs soft (pts)": None
            if p.soft is None
            else f"{100 * (p.worst - p.soft):+.1f}",
        }
        for attacker in p.suite:
            entry = p.by_attacker.get(attacker)
            row[attacker] = "pending" if entry is None else _attacker_cell(entry)
        for attacker in sorted(set(p.by_attacker) - set(p.suite)):  # beyond the suite, where it ran
            row[attacker] = _attacker_cell(p.by_attacker[attacker])
        rows.append(row)
    return rows


def worst_case_best_within(
    points: list[WorstCasePoint], drops=ACCURACY_DROPS
) -> list[dict[str, Any]]:
    """Per defense: the lowest clone within a defender drop of 1/2/5 points, by the soft-label
    attacker and by the worst case over the suite (its complete points only; the undefended
    point qualifies, as in :func:`best_within`)."""
    origin = [p for p in points if p.defense == "none"]
    rows = []
    for defense in sorted({p.defense for p in points} - {"none"}):
        own = [p for p in points if p.defense == defense] + origin
        row: dict[str, Any] = {"defense": defense}
        for d in drops:
            within = [p for p in own if p.drop <= d + 1e-6]
            soft = [p.soft for p in within if p.soft is not None]
            worst = [p.worst for p in within if p.complete]
            row[f"soft@drop≤{int(d * 100)}"] = min(soft) if soft else None
            row[f"worst@drop≤{int(d * 100)}"] = min(worst) if worst else None
        rows.append(row)
    return rows


def worst_on_seeds(point: WorstCasePoint, other: WorstCasePoint) -> float:
    """``point``'s worst case with each attacker's clone averaged over the seeds at which ``other``
    ran that attacker too (over all its seeds where they share none), so that two points measured at
    different seeds are compared on the seeds they share: a lucky single seed cannot beat three."""
    clones = []
    for attacker, entry in point.by_attacker.items():
        theirs = other.by_attacker.get(attacker, {}).get("seeds", ())
        shared = [entry["by_seed"][s] for s in entry["seeds"] if s in theirs]
        clones.append(float(np.mean(shared)) if shared else entry["clone"])
    return max(clones)


def point_seeds(point: WorstCasePoint) -> list[int]:
    """Every seed at which some attacker ran against ``point``."""
    return sorted({s for entry in point.by_attacker.values() for s in entry["seeds"]})


def _n_seeds(point: WorstCasePoint) -> int:
    return len(point_seeds(point))


def _deploy_key(point: WorstCasePoint, other: WorstCasePoint) -> tuple:
    """The verdict's order of ``point`` against ``other``: worst case on their shared seeds, then
    `none` first, then more seeds, then the lower defender cost, then the lower overhead."""
    return (
        round(worst_on_seeds(point, other), 9),
        point.defense != "none",
        -_n_seeds(point),
        point.drop,
        math.inf if point.overhead_ratio is None else point.overhead_ratio,
    )


def _compared_on(best: WorstCasePoint, eligible: list[WorstCasePoint]) -> str:
    """The seeds of ``best``'s binding attacker shared with the runner-up (its own without one)."""
    others = [p for p in eligible if p is not best]
    if not others:
        return "own seeds"
    runner_up = min(others, key=lambda p: _deploy_key(p, best))
    theirs = runner_up.by_attacker.get(best.worst_attacker, {}).get("seeds", ())
    return (
        ",".join(str(s) for s in best.by_attacker[best.worst_attacker]["seeds"] if s in theirs)
        or "own seeds"
    )


def deploy_choice(points: list[WorstCasePoint]) -> WorstCasePoint:
    """The point to deploy among ``points``: challengers in order of their own worst case, each
    replacing the champion when it wins on the seeds the two share (:func:`_deploy_key`)."""
    champion, *challengers = sorted(points, key=lambda p: _deploy_key(p, p))
    for challenger in challengers:
        if _deploy_key(challenger, champion) < _deploy_key(champion, challenger):
            champion = challenger
    return champion


# --- The verdict: a defense only where it beats the undefended worst case beyond seed noise -----

NO_DEFENSE = "none"
"""The verdict's machine-readable pick when no defense point beats the undefended API."""

LABELS_ONLY_DEFENSE = "argmax"
"""The cheapest labels-only defense: every answer is its top-1 label, with no perturbation and no
defender cost. The verdict's pick where the winner's worst case is the labels-only bound
(:func:`labels_only`)."""

MIN_NOISE_SEEDS = 3
"""Paired seeds from which the noise margin is measured from the paired gains themselves."""

FEW_SEEDS_MARGIN = 0.02
"""The margin below :data:`MIN_NOISE_SEEDS` paired seeds: 2 points of clone accuracy."""

MARGIN_FLOOR = 0.01
"""The least margin at any number of seeds: 1 point of clone accuracy."""

MARGIN_CONFIDENCE = 0.95
"""One-sided confidence of the t bound on the mean paired gain."""


@dataclass(frozen=True)
class PairedGain:
    """How far a defense point lowers one attacker's clone below the undefended worst case: the
    mean of the paired per-seed gains, the noise margin it must exceed, and the seeds."""

    attacker: str
    gain: float
    margin: float
    seeds: tuple[int, ...]

    @property
    def beyond_margin(self) -> bool:
        """The mean gain exceeds the noise margin, at however many seeds."""
        return self.gain > self.margin

    @property
    def significant(self) -> bool:
        """Beyond the margin at :data:`MIN_NOISE_SEEDS` paired seeds or more: what a recommendation
        needs. Below that a gain beyond the margin is only indicative
        (docs/design.md §worst-case)."""
        return self.beyond_margin and len(self.seeds) >= MIN_NOISE_SEEDS

    @property
    def slack(self) -> float:
        return self.gain - self.margin


def undefended_worst_by_seed(undefended: WorstCasePoint) -> dict[int, float]:
    """Per seed, the undefended API's worst case: the highest clone any attacker reached against
    `none` at that seed — the hard-label attacker and the attackers beyond the suite included."""
    worst: dict[int, float] = {}
    for entry in undefended.by_attacker.values():
        for seed, clone in entry["by_seed"].items():
            worst[seed] = max(worst.get(seed, -math.inf), clone)
    return worst


def noise_margin(gains: list[float]) -> float:
    """What a mean paired gain must exceed to count (docs/design.md §worst-case).

    At :data:`MIN_NOISE_SEEDS` seeds or more: the one-sided Student t bound on the mean,
    t(:data:`MARGIN_CONFIDENCE`, n − 1) · s / √n with s the sample standard deviation of the
    paired gains — a gain above it is positive at that confidence — and never less than
    :data:`MARGIN_FLOOR`, because three gains that happen to agree give an s far below the true
    spread (one clone's accuracy varies by 0.1–0.7 points across seeds in the committed sweeps).
    Below :data:`MIN_NOISE_SEEDS` seeds the spread cannot be measured: :data:`FEW_SEEDS_MARGIN`,
    above the 0.75 and 1.47 points by which two runs of the main job's single-seed sweep put MAD
    under the undefended API."""
    n = len(gains)
    if n < MIN_NOISE_SEEDS:
        return FEW_SEEDS_MARGIN
    bound = (
        float(student_t.ppf(MARGIN_CONFIDENCE, n - 1)) * float(np.std(gains, ddof=1)) / math.sqrt(n)
    )
    return max(MARGIN_FLOOR, bound)


def paired_gains(point: WorstCasePoint, undefended: WorstCasePoint) -> dict[str, PairedGain | None]:
    """Per attacker of ``point``: its paired gain over the undefended worst case.

    At each seed where both ran, the gain is the undefended worst case at that seed
    (:func:`undefended_worst_by_seed`) minus the point's clone — also where the run's transfer set
    is exactly the undefended API's (``identical_seeds``, ``=undef.``): the baseline is what the
    undefended API lets its strongest attacker reach, so a point that leaves an attacker only its
    undefended transfer set still lowers the attacker's best option by the gap between that
    attacker and the strongest (the hard-label attacker of a point that keeps every top-1 —
    :func:`labels_only`). ``None`` where no seed is shared."""
    reference = undefended_worst_by_seed(undefended)
    gains: dict[str, PairedGain | None] = {}
    for attacker, entry in sorted(point.by_attacker.items()):
        seeds = [s for s in entry["seeds"] if s in reference]
        per_seed = [reference[s] - entry["by_seed"][s] for s in seeds]
        gains[attacker] = (
            PairedGain(attacker, float(np.mean(per_seed)), noise_margin(per_seed), tuple(seeds))
            if seeds
            else None
        )
    return gains


def binding_gain(point: WorstCasePoint, undefended: WorstCasePoint) -> PairedGain | None:
    """The attacker on which ``point`` beats the undefended worst case by the least (gain less
    margin); ``None`` if some attacker shares no seed with the undefended API."""
    gains = list(paired_gains(point, undefended).values())
    measured = [g for g in gains if g is not None]
    if not gains or len(measured) != len(gains):
        return None
    return min(measured, key=lambda g: g.slack)


def beats_undefended(
    point: WorstCasePoint, undefended: WorstCasePoint, min_seeds: int = MIN_NOISE_SEEDS
) -> bool:
    """The verdict's rule (docs/design.md §worst-case): every attacker that faced ``point`` is
    held, on average over the seeds both ran, below the undefended worst case by more than the
    noise margin of its paired gains (:func:`paired_gains`, :func:`noise_margin`), each measured
    at ``min_seeds`` paired seeds or more (nothing is recommended on fewer than three)."""
    gain = binding_gain(point, undefended)
    return gain is not None and gain.beyond_margin and len(gain.seeds) >= min_seeds


def labels_only(point: WorstCasePoint) -> bool:
    """Whether ``point``'s worst case is the labels-only bound: the attacker that reached it trains
    on top-1 labels and got exactly the undefended API's transfer set at every seed it ran
    (``same_as_undefended``, ``=undef.``). Against its strongest attacker such a point does what
    answering labels only does, and :data:`LABELS_ONLY_DEFENSE` does that at no perturbation cost;
    since the point keeps those top-1s, an attacker can take the labels of its answers and attack
    it as it would attack :data:`LABELS_ONLY_DEFENSE`."""
    entry = point.by_attacker[point.worst_attacker]
    return bool(entry.get("hard_labels") and entry.get("same_as_undefended"))


def point_label(point: WorstCasePoint) -> str:
    """A defense point as the verdict and the tables name it: ``defense (params)``."""
    return point.defense if point.params == "–" else f"{point.defense} ({point.params})"


def _gain_cells(gain: PairedGain | None) -> dict[str, Any]:
    return {
        "paired gain (pts)": None if gain is None else f"{100 * gain.gain:+.2f}",
        "noise margin (pts)": None if gain is None else f"{100 * gain.margin:.2f}",
        "gain on": None if gain is None else f"{gain.attacker} @ {','.join(map(str, gain.seeds))}",
    }


def _closest(points: list[WorstCasePoint], undefended: WorstCasePoint) -> WorstCasePoint | None:
    """The point that comes nearest to beating the undefended API (largest gain less margin)."""
    gains = {id(p): binding_gain(p, undefended) for p in points}
    slack = {i: gain.slack for i, gain in gains.items() if gain is not None}
    measured = [p for p in points if id(p) in slack]
    return max(measured, key=lambda p: slack[id(p)], default=None)


def _no_defense_row(
    scenario: str,
    family: str,
    undefended: WorstCasePoint | None,
    closest: WorstCasePoint | None,
    pending: int,
    min_seeds: int = MIN_NOISE_SEEDS,
) -> dict[str, Any]:
    """The verdict row that deploys nothing: the undefended API's worst case, and the closest
    challenger with its paired gain and margin (``too few seeds``: its gain is beyond the margin
    but measured at fewer seeds than a recommendation needs)."""
    entry = None if undefended is None else undefended.by_attacker[undefended.worst_attacker]
    gain = None if closest is None or undefended is None else binding_gain(closest, undefended)
    return {
        "scenario": scenario,
        "attack": family,
        "deploy": NO_DEFENSE,
        "worst-case clone": None if undefended is None else undefended.worst,
        "by attacker": None
        if entry is None or undefended is None
        else undefended.worst_attacker
        + (f" ± {entry['sd']:.3f}" if len(entry["seeds"]) > 1 else ""),
        "soft clone": None if undefended is None else undefended.soft,
        "undefended worst case": None if undefended is None else undefended.worst,
        "defender cost (pts)": "0.00",
        "overhead": None,
        "seeds": None if undefended is None else ",".join(map(str, point_seeds(undefended))),
        "compared on": None,
        "closest": None if closest is None else point_label(closest),
        **_gain_cells(gain),
        "points pending": pending,
        "labels-only bound": None
        if closest is None or not labels_only(closest)
        else point_label(closest),
        "figures of": None,
        "too few seeds": gain is not None and gain.beyond_margin and len(gain.seeds) < min_seeds,
    }


def _deploy_row(
    scenario: str,
    family: str,
    best: WorstCasePoint,
    undefended: WorstCasePoint,
    eligible: list[WorstCasePoint],
    pending: int,
    stand_in: WorstCasePoint | None = None,
) -> dict[str, Any]:
    """The verdict row that deploys ``best``. ``stand_in``: a labels-only point
    (:func:`labels_only`) that the verdict judged as :data:`LABELS_ONLY_DEFENSE` — with ``best``
    that defense measured on its own runs, or, where ``stand_in is best`` (that defense not
    measured), deployed in its place with the stand-in's figures (``figures of``; no perturbation:
    no defender cost, no overhead)."""
    worst_entry = best.by_attacker[best.worst_attacker]
    row = {
        "scenario": scenario,
        "attack": family,
        "deploy": point_label(best),
        "worst-case clone": best.worst,
        "by attacker": best.worst_attacker
        + (f" ± {worst_entry['sd']:.3f}" if len(worst_entry["seeds"]) > 1 else ""),
        "soft clone": best.soft,
        "undefended worst case": undefended.worst,
        "defender cost (pts)": f"{100 * best.drop:.2f}",
        "overhead": best.overhead_ratio,
        "seeds": ",".join(map(str, point_seeds(best))),
        "compared on": _compared_on(best, eligible),
        "closest": None,
        **_gain_cells(binding_gain(best, undefended)),
        "points pending": pending,
        "labels-only bound": (
            point_label(stand_in)
            if stand_in is not None
            else point_label(best)
            if labels_only(best)
            else None
        ),
        "figures of": None,
    }
    if stand_in is best:
        row.update(
            {
                "deploy": LABELS_ONLY_DEFENSE,
                "soft clone": None,
                "defender cost (pts)": "0.00",
                "overhead": None,
                "figures of": point_label(best),
            }
        )
    return row


def verdict(
    panels: dict[tuple[str, str], list[WorstCasePoint]],
    max_drop: float = 0.01,
    min_seeds: int = MIN_NOISE_SEEDS,
) -> list[dict[str, Any]]:
    """Per (scenario, attack family): the defense to deploy, or :data:`NO_DEFENSE`
    (docs/design.md §worst-case). The only place the verdict is decided: every report and
    ``mirage bench run`` / ``report`` print these rows (and :func:`verdict_advice`).

    Candidates are the points judged by the whole suite, costing the defender at most
    ``max_drop``, that beat the undefended worst case beyond the noise at ``min_seeds`` paired
    seeds or more (:func:`beats_undefended`: three; fewer only where a test isolates another rule).
    Without one, the row deploys ``none`` and names the closest challenger (the largest gain less
    margin) with its paired gain, saying when that gain is beyond the margin but rests on too few
    seeds (``too few seeds``). Among candidates, the lowest worst case wins, two points compared
    on the seeds they share (:func:`deploy_choice`; ``compared on``: the seeds of the binding
    attacker at which the runner-up ran it too); equal worst cases go to the point measured at more
    seeds, then to the cheaper point: defender cost first, then per-query overhead.

    A winner whose worst case is the labels-only bound (:func:`labels_only`) does what answering
    labels only does, so the pick is :data:`LABELS_ONLY_DEFENSE`, with no perturbation cost
    (``labels-only bound``: that point). Where that defense was measured (complete, within the
    cost), the labels-only points are judged by its own runs: they leave the candidates, and the
    choice is made again among the rest (it included, if it beats the undefended API itself);
    where it was not, the winner's figures stand for it (``figures of``)."""
    rows = []
    for (scenario, family), points in sorted(panels.items()):
        undefended = next((p for p in points if p.defense == "none" and p.complete), None)
        pending = sum(not p.complete for p in points)
        within = [
            p for p in points if p.defense != "none" and p.complete and p.drop <= max_drop + 1e-6
        ]
        eligible = (
            []
            if undefended is None
            else [p for p in within if beats_undefended(p, undefended, min_seeds)]
        )
        best = deploy_choice(eligible) if eligible else None
        stand_in = None
        if best is not None and labels_only(best) and best.defense != LABELS_ONLY_DEFENSE:
            stand_in = best
            if any(
                p.defense == LABELS_ONLY_DEFENSE for p in within
            ):  # measured: judged by its own runs
                eligible = [
                    p for p in eligible if p.defense == LABELS_ONLY_DEFENSE or not labels_only(p)
                ]
                best = deploy_choice(eligible) if eligible else None
        if best is None or undefended is None:  # no undefended point: nothing is eligible
            closest = None if undefended is None else _closest(within, undefended)
            rows.append(_no_defense_row(scenario, family, undefended, closest, pending, min_seeds))
        else:
            rows.append(
                {
                    **_deploy_row(scenario, family, best, undefended, eligible, pending, stand_in),
                    "too few seeds": False,
                }
            )
    return rows


def verdict_table_row(row: dict[str, Any]) -> dict[str, Any]:
    """A verdict row's table columns: everything but the flags its words are made from."""
    return {k: v for k, v in row.items() if k != "too few seeds"}


NO_DEFENSE_ADVICE = (
    "No answer perturbation helps in this scenario. Serve the plain model and protect it "
    "otherwise: per-client quotas and rate limits (`mirage serve`'s API keys), query-stream "
    "detection (PRADA, the service's `detection` section), and ownership evidence — a watermark in "
    "the answers, tested on a suspect clone with `mirage verify`. That evidence names a thief "
    "whose clone memorises its answers; an in-distribution thief with an ordinary, early-stopped "
    "recipe escapes it (results/ownership/README.md)."
)

LABELS_ONLY_BOUND = (
    "the hard-label attacker trained on exactly the undefended API's answers (=undef.)"
)
LABELS_ONLY_EFFECT = (
    f"its effect is that of answering labels only, which {LABELS_ONLY_DEFENSE} does at no "
    "perturbation cost"
)


def _labels_only_words(row: dict[str, Any]) -> str:
    """What a deploy row adds where a labels-only point (``labels-only bound``) is involved."""
    bound, deploy = row["labels-only bound"], row["deploy"]
    if bound is None:
        return ""
    if bound == deploy:  # the labels-only defense itself, on its own runs
        return f" Its worst case is {LABELS_ONLY_BOUND}: the effect of answering labels only."
    if deploy == LABELS_ONLY_DEFENSE:
        return (
            f" The lowest worst case beyond the noise, {bound}'s, is {LABELS_ONLY_BOUND}: "
            f"{LABELS_ONLY_EFFECT}; {LABELS_ONLY_DEFENSE} is judged by its own runs here."
        )
    return (
        f" {bound}'s lower worst case is {LABELS_ONLY_BOUND}: {LABELS_ONLY_EFFECT}; judged by "
        f"{LABELS_ONLY_DEFENSE}'s own runs here, it does not come first."
    )


def verdict_advice(row: dict[str, Any], max_drop: float = 0.01) -> str:
    """A :func:`verdict` row (computed with the same ``max_drop``) in words: what to deploy and why,
    or — for :data:`NO_DEFENSE` — that no answer perturbation helps and what to use instead. Where
    the pick or the closest challenger is a labels-only point (:func:`labels_only`), the words say
    that its effect is that of answering labels only, which :data:`LABELS_ONLY_DEFENSE` does at no
    perturbation cost."""
    head = f"{row['scenario']} × {row['attack']}: "
    if (
        row["figures of"] is not None
    ):  # the labels-only defense, not measured: a point stands for it
        stand_in = row["figures of"]
        return (
            f"{head}deploy {row['deploy']}: serve top-1 labels only. {stand_in}'s worst case, "
            f"{row['worst-case clone']:.4f} ({row['by attacker']}), is {LABELS_ONLY_BOUND}: "
            f"{LABELS_ONLY_EFFECT} ({row['deploy']} has not faced the whole suite here; its "
            f"hard-label clone is this one by construction). {stand_in} beats the undefended API's "
            f"worst case ({row['undefended worst case']:.4f}) on every attacker beyond the noise "
            f"across seeds; by the least on {row['gain on']}: {row['paired gain (pts)']} points "
            f"against a margin of {row['noise margin (pts)']}. Defender cost 0.00 points: "
            f"{row['deploy']} keeps every top-1."
        )
    if row["deploy"] != NO_DEFENSE:
        return (
            f"{head}deploy {row['deploy']}. Its worst case, {row['worst-case clone']:.4f} "
            f"({row['by attacker']}), beats the undefended API's "
            f"({row['undefended worst case']:.4f}) on every attacker beyond the noise across "
            f"seeds; by the least on {row['gain on']}: "
            f"{row['paired gain (pts)']} points against a margin of {row['noise margin (pts)']}. "
            f"Defender cost {row['defender cost (pts)']} points.{_labels_only_words(row)}"
        )
    if row["undefended worst case"] is None:
        return (
            f"{head}none. The undefended API has not faced the whole suite in these runs (no "
            "complete `none` point), so no defense can be shown to beat it."
        )
    closest = (
        "none was measured at the undefended API's seeds"
        if row["closest"] is None
        else f"closest: {row['closest']}, {row['paired gain (pts)']} points on {row['gain on']} "
        f"against a margin of {row['noise margin (pts)']}"
    )
    if row["labels-only bound"] == LABELS_ONLY_DEFENSE:
        closest += f"; its worst case is {LABELS_ONLY_BOUND}"
    elif row["labels-only bound"] is not None:
        within_noise = float(row["paired gain (pts)"]) <= float(row["noise margin (pts)"])
        closest += f"; its worst case is {LABELS_ONLY_BOUND}: {LABELS_ONLY_EFFECT}, and " + (
            "that is within the noise here"
            if within_noise
            else f"{LABELS_ONLY_DEFENSE}'s own runs here do not beat the undefended worst case "
            "beyond the noise"
        )
    cost = f"{100 * max_drop:g} point{'' if abs(max_drop - 0.01) < 1e-9 else 's'}"
    if row.get("too few seeds"):
        return (
            f"{head}none yet. {row['closest']} lowers the worst-case clone below the undefended "
            f"API's ({row['undefended worst case']:.4f}, {row['by attacker']}) by "
            f"{row['paired gain (pts)']} points on {row['gain on']}, beyond the margin of "
            f"{row['noise margin (pts)']}, but on fewer than "
            f"{MIN_NOISE_SEEDS} paired seeds: too few to recommend anything. Run its missing seeds "
            f"(`mirage bench run … --seed`) before deploying it; meanwhile: {NO_DEFENSE_ADVICE}"
        )
    return (
        f"{head}none. No defense point costing the defender at most {cost} of accuracy lowers "
        f"the worst-case clone below the undefended API's ({row['undefended worst case']:.4f}, "
        f"{row['by attacker']}) by more than the noise across seeds ({closest}). "
        f"{NO_DEFENSE_ADVICE}"
    )


def ranking_changes(points: list[WorstCasePoint], max_drop: float = 0.01) -> dict[str, Any]:
    """How the order of the defenses (≤ ``max_drop`` cost, complete points) changes between the
    soft-label attacker and the worst case: both orders and how many defenses changed place."""
    eligible = [
        p for p in points if p.complete and p.soft is not None and p.drop <= max_drop + 1e-6
    ]

    def soft_clone(point: WorstCasePoint) -> float:
        assert point.soft is not None  # eligible points have one
        return point.soft

    soft = [p.defense for p in sorted(eligible, key=soft_clone)]
    worst = [p.defense for p in sorted(eligible, key=lambda p: p.worst)]
    return {
        "soft order": soft,
        "worst-case order": worst,
        "changed place": sum(a != b for a, b in zip(soft, worst, strict=True)),
    }
