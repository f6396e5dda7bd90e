"""The leaderboard: one static page that ranks every defense point of one or more sweeps with an
attacker suite by its worst case, per scenario × attack, the verdict on top.

Nothing is computed here that the report does not compute: the points are
:func:`mirage.bench.summary.worst_case_points`, the verdict and its words
:func:`~mirage.bench.summary.verdict` and :func:`~mirage.bench.summary.verdict_advice`
(docs/design.md §worst-case), and the page is the report's HTML
(:func:`mirage.bench.report.render_html`): one inline stylesheet, no script, no image, nothing
fetched.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mirage.bench.config import SweepConfig
from mirage.bench.report import Section, render_html
from mirage.bench.results import ResultStore
from mirage.bench.summary import (
    LABELS_ONLY_DEFENSE,
    NO_DEFENSE,
    WorstCasePoint,
    point_label,
    point_seeds,
    verdict,
    verdict_advice,
    worst_case_points,
)

TITLE = "mirage leaderboard: defenses judged by their worst-case clone"

VERDICT_COLUMNS = (
    "scenario",
    "attack",
    "deploy",
    "worst-case clone",
    "by attacker",
    "soft clone",
    "undefended worst case",
    "defender cost (pts)",
    "overhead",
    "seeds",
)
"""The verdict table's columns on the page (of :func:`mirage.bench.summary.verdict`'s rows)."""

INTRO = (
    "Every defense point of the sweeps below, judged by its **worst case**: the highest clone "
    "accuracy any attacker of the suite reached against it (mean over that attacker's seeds, ± "
    "their spread). `soft clone`: the naive attacker, who trains on the served probabilities. "
    "`defender cost`: points of accuracy that benign users lose. `overhead`: per-query time of "
    "the defended API over the undefended forward, measured in the same run (– where the runs "
    "have none). Clone and defender accuracy on the victim's test set. In each table the "
    "undefended API (`none`) is the reference row, then the points ranked by their worst case; a "
    "point still missing an attacker of the suite is a lower bound (≥), unranked. The verdict is "
    "`mirage bench report`'s (docs/design.md §worst-case): a defense only where it costs at most "
    "1 point and beats the undefended worst case on every attacker beyond the noise across "
    "seeds. Each row names its results file, the seeds it ran and the command that runs what is "
    "missing of it. Rebuilt by `{command}`."
)


@dataclass(frozen=True)
class Source:
    """One sweep on the leaderboard: ``config`` as given to ``--config`` (a built-in profile or a
    TOML file), the sweep it names and its results file."""

    config: str
    sweep: SweepConfig
    results: Path


def leaderboard_command(sources: list[Source]) -> str:
    """The ``mirage bench leaderboard`` command that rebuilds a page of ``sources`` (the
    default results path of a sweep is left out)."""
    words = ["mirage bench leaderboard"]
    for source in sources:
        words.append(f"--config {source.config}")
        if source.results != Path("results") / source.sweep.name / "results.jsonl":
            words.append(f"--results {source.results}")
    return " ".join(words)


def _verdict_mark(point: WorstCasePoint, row: dict[str, Any]) -> str:
    """What the verdict ``row`` of the point's panel says of the point."""
    label = point_label(point)
    if point.defense == NO_DEFENSE:
        return "reference; deploy" if row["deploy"] == NO_DEFENSE else "reference"
    if label == row["figures of"]:
        return f"deploy {LABELS_ONLY_DEFENSE} (its figures)"
    if label == row["deploy"]:
        return "deploy"
    if label == row["closest"]:
        return "closest"
    missing = [a for a in point.suite if a not in point.by_attacker]
    return f"pending: {', '.join(missing)}" if missing else ""


def leaderboard_rows(
    points: list[WorstCasePoint], row: dict[str, Any], source: Source
) -> list[dict[str, Any]]:
    """One row per defense point of a panel: the undefended reference first, then the complete
    points by worst case (ranked), then those still missing an attacker. ``row``: the panel's
    :func:`mirage.bench.summary.verdict` row."""
    reference = [p for p in points if p.defense == NO_DEFENSE]
    complete = sorted(
        (p for p in points if p.defense != NO_DEFENSE and p.complete), key=lambda p: p.worst
    )
    pending = sorted(
        (p for p in points if p.defense != NO_DEFENSE and not p.complete), key=lambda p: p.worst
    )
    ordered = [*reference, *complete, *pending]
    ranks = ["ref"] * len(reference) + [str(i + 1) for i in range(len(complete))]
    ranks += ["–"] * len(pending)
    rows = []
    for rank, p in zip(ranks, ordered, strict=True):
        worst = p.by_attacker[p.worst_attacker]
        n = len(worst["seeds"])
        spread = f" ± {worst['sd']:.3f}" if n > 1 else ""
        rows.append(
            {
                "defense": point_label(p),
                "rank": rank,
                "soft clone": p.soft,
                "worst-case clone": f"{p.worst:.4f}" if p.complete else f"≥ {p.worst:.4f}",
                "by attacker": f"{p.worst_attacker}{spread} ({n} seed{'s' if n > 1 else ''})",
                "defender cost (pts)": f"{100 * p.drop:.2f}",
                "overhead": p.overhead_ratio,
                "verdict": _verdict_mark(p, row),
                "from": f"{source.results}, seeds {','.join(map(str, point_seeds(p)))}; rerun: "
                f"mirage bench run --config {source.config} --scenario {p.scenario} "
                f"--attack {p.family} --defense {p.defense}",
            }
        )
    return rows


def leaderboard_sections(sources: list[Source]) -> list[Section]:
    """The page: what it shows, the verdict of every scenario × attack, then one ranked table
    per sweep, scenario and attack."""
    verdict_rows: list[dict[str, Any]] = []
    panels: list[Section] = []
    for source in sources:
        suites = source.sweep.suites
        if not suites:
            raise ValueError(
                f"sweep {source.sweep.name!r} has no attacker suite (no attack lists variants): "
                "nothing is judged by its worst case"
            )
        records = ResultStore(source.results).read()
        points = worst_case_points(records, suites)
        if not points:
            raise ValueError(f"{source.results}: no run of an attacker suite")
        rows = verdict(points)
        for row in rows:
            verdict_rows.append(
                {"sweep": source.sweep.name, **{k: row[k] for k in VERDICT_COLUMNS}}
            )
        for row in rows:
            key = (row["scenario"], row["attack"])
            suite = ", ".join(suites.get(row["attack"], ()))
            panels.append(
                Section(
                    f"{row['scenario']} × {row['attack']} ({source.sweep.name})",
                    [
                        verdict_advice(row),
                        f"Suite: {suite}. {len(records)} runs in `{source.results}`.",
                    ],
                    None,
                    leaderboard_rows(points[key], row, source),
                )
            )
    head = Section("", [INTRO.format(command=leaderboard_command(sources))])
    box = Section("Verdict: what to deploy, per scenario × attack", [], None, verdict_rows)
    return [head, box, *panels]


def build_leaderboard(sources: list[Source], out: str | Path) -> Path:
    """Write the leaderboard page of ``sources`` to ``out``; returns its path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_html(TITLE, leaderboard_sections(sources)))
    return out
