"""The report: one list of :class:`Section` s built from the JSONL results, rendered twice — a
Markdown page and a static HTML page — so the two never disagree.

A sweep with an attacker suite (attacks with ``variants``) opens with the **verdict**: per
scenario and attack family, the defense to deploy judged by its worst case over the suite, or
`none` and what to use instead (:func:`mirage.bench.summary.verdict`, ``verdict_advice``), then
each panel's worst-case table, before the per-attacker details.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mirage.bench.config import SweepConfig
from mirage.bench.plots import (
    angular_deviation_figure,
    overhead_figure,
    tradeoff_figure,
    verdict_figure,
    worst_case_figure,
)
from mirage.bench.results import ResultStore
from mirage.bench.summary import (
    PERSISTENT_COLLAPSE_SEEDS,
    best_within_table,
    counted_runs,
    curves,
    overhead_table,
    points_table,
    ranking_changes,
    references,
    sweep_cost_table,
    tradeoff_table,
    verdict,
    verdict_advice,
    verdict_table_row,
    worst_case_best_within,
    worst_case_points,
    worst_case_table,
)


@dataclass
class Section:
    """A titled part of the report: paragraphs, then an image, then a table (each optional)."""

    title: str
    text: list[str] = field(default_factory=list)
    image: str | None = None
    table: list[dict[str, Any]] | None = None
    level: int = 2


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return str(value)


def _markdown_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "_no data_\n"
    keys = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_fmt(r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _html_cell(value: Any) -> str:
    """A table cell; a long text (a defense with its parameters) wraps, after its commas, so that
    the table fits the page."""
    text = _fmt(value)
    if isinstance(value, str) and len(text) > 24:
        return f"<td class='text'>{html.escape(text).replace(',', ',<wbr>')}</td>"
    return f"<td>{html.escape(text)}</td>"


def _html_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "<p><em>no data</em></p>"
    keys = list(dict.fromkeys(k for r in rows for k in r))
    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    body = "".join("<tr>" + "".join(_html_cell(r.get(k)) for k in keys) + "</tr>" for r in rows)
    return (
        f"<div class='scroll'><table><thead><tr>{head}</tr></thead>"
        f"<tbody>{body}</tbody></table></div>"
    )


def render_markdown(title: str, sections: list[Section]) -> str:
    out = [f"# {title}\n"]
    for section in sections:
        if section.title:
            out.append(f"{'#' * section.level} {section.title}\n")
        out += [f"{paragraph}\n" for paragraph in section.text]
        if section.image:
            out.append(f"![{section.title}]({section.image})\n")
        if section.table is not None:
            out.append(_markdown_table(section.table))
    return "\n".join(out)


STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;"
    "line-height:1.4}table{border-collapse:collapse;font-size:12px;margin:.6em 0}"
    "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right;white-space:nowrap}"
    "th{background:#f3f3f3;white-space:normal}td:first-child{white-space:normal;text-align:left;"
    "max-width:22em}td.text{white-space:normal;text-align:left;min-width:10em}.scroll{overflow-x:auto;max-width:100%}img{max-width:100%}"
    "section.verdict{border:2px solid #2a6;padding:0 1em;border-radius:6px;margin:1em 0}"
    ".warning{color:#a40}"
)


WARNING = "> **Warning:** "


def _inline_html(text: str) -> str:
    """A paragraph of the report's Markdown subset (``code``, **bold**, a warning quote) as HTML."""
    warning = text.startswith(WARNING)
    escaped = html.escape(text.removeprefix(WARNING))
    escaped = re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)
    escaped = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", escaped)
    return (
        f"<span class='warning'><strong>Warning:</strong> {escaped}</span>" if warning else escaped
    )


def render_html(title: str, sections: list[Section]) -> str:
    body = [f"<h1>{html.escape(title)}</h1>"]
    for section in sections:
        verdict_box = section.title.startswith("Verdict")
        part = ["<section class='verdict'>" if verdict_box else "<section>"]
        if section.title:
            part.append(f"<h{section.level}>{html.escape(section.title)}</h{section.level}>")
        part += [f"<p>{_inline_html(t)}</p>" for t in section.text]
        if section.image:
            part.append(
                f'<img src="{html.escape(section.image)}" alt="{html.escape(section.title)}">'
            )
        if section.table is not None:
            part.append(_html_table(section.table))
        body.append("".join(part) + "</section>")
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<meta name='viewport' content='width=device-width,initial-scale=1'>"
        f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>"
    )


def consistency_warnings(records: list[dict[str, Any]]) -> list[str]:
    """What makes runs of one sweep not comparable: several plain victims in one scenario (a
    victim retrained on another CPU), clones whose training diverged."""
    warnings = []
    victims: dict[str, set[str]] = {}
    for r in records:
        if r.get("victim_fingerprint"):
            victims.setdefault(r["scenario"], set()).add(r["victim_fingerprint"])
    for scenario, prints in sorted(victims.items()):
        if len(prints) > 1:
            warnings.append(
                f"{scenario}: runs come from {len(prints)} different victims "
                f"({', '.join(sorted(prints))})"
            )
    diverged = [r for r in records if r.get("clone_diverged")]
    if diverged:
        warnings.append(
            f"{len(diverged)} run(s) trained a clone whose loss or weights diverged "
            "(marked in the table of all runs); an attacker would notice and retrain"
        )
    collapsed = [r for r in records if r.get("clone_collapsed") and not r.get("clone_diverged")]
    if collapsed:
        warnings.append(
            f"{len(collapsed)} run(s) trained a clone that answers one class for nearly every "
            "image (clone_collapsed in the table of all runs): its training stalled, which "
            "an attacker would notice and retrain; check such a point across seeds"
        )
    counted = counted_runs(records)
    left_out = len(records) - len(counted)
    if left_out:
        warnings.append(
            f"the {left_out} run(s) with a failed clone are left out of the curves and tables "
            "(an attacker's `restarts` countermeasure measures them)"
        )
    counted_collapses = sum(bool(r.get("clone_collapsed")) for r in counted)
    if counted_collapses:
        warnings.append(
            f"{counted_collapses} collapsed run(s) count: their point's clone collapsed at "
            f"every seed, {PERSISTENT_COLLAPSE_SEEDS} or more, which is that attacker's "
            "outcome rather than a stalled training"
        )
    return warnings


VERDICT_TEXT = (
    "Each defense is judged by the strongest attacker of the suite: for every defense point, the "
    "highest clone accuracy any attacker reached (mean over its seeds). A point is recommended "
    "only if it costs the defender at most 1 point of accuracy and holds every attacker below the "
    "undefended API's worst case (every attacker run against `none`, the hard-label one included) "
    "by more than the noise: per seed both ran, the undefended worst case minus the point's clone "
    "(also where the attacker got exactly the undefended answers, `=undef.`), whose mean must "
    "exceed max(1 point, one-sided 95 % t bound) at 3 paired seeds or more and 2 points below 3 "
    "(`paired gain`, `noise margin`, `gain on`: the attacker and seeds where the point beats it by "
    "the least). Without such a point the verdict is `none` (`closest`: the nearest miss). Among "
    "several, the lowest worst case, two points compared on the seeds they share per attacker "
    "(`compared on`: the binding attacker's seeds shared with the runner-up), ties to more seeds, "
    "then to the cheaper point. Where the winner's worst case is the hard-label attacker on "
    "exactly the undefended answers, its effect is that of answering labels only: the pick is "
    "`argmax`, which does that at no perturbation cost, judged by its own runs where it was "
    "measured (`labels-only bound`: that point, or the closest; `figures of`: the point whose "
    "figures stand for `argmax` where it was not). Suite: {suite}. A worst case still missing an "
    "attacker is a lower bound (≥) and never recommended.{extra}"
)


def suite_sections(
    config: SweepConfig, records: list[dict[str, Any]], out_dir: Path
) -> list[Section]:
    """The verdict and one worst-case section per (scenario, attack family), when the sweep has
    an attacker suite; nothing otherwise."""
    suites = config.suites
    panels = worst_case_points(records, suites) if suites else {}
    if not panels:
        return []
    rows = verdict(panels)
    verdict_figure(panels, out_dir / "plots" / "verdict")
    suite_names = sorted({v for variants in suites.values() for v in variants})
    extra_names = sorted({v for a in config.attacks for v in a.extra_variants})
    extra = (
        " Beyond the suite, counted where they ran (the defenses they answer): "
        f"{', '.join(extra_names)}."
        if extra_names
        else ""
    )
    sections = [
        Section(
            "Verdict: which defense to deploy",
            [
                VERDICT_TEXT.format(suite=", ".join(suite_names), extra=extra),
                *map(verdict_advice, rows),
            ],
            "plots/verdict.png",
            [verdict_table_row(row) for row in rows],
        )
    ]
    for (scenario, family), points in sorted(panels.items()):
        stem = out_dir / "plots" / f"worst_case_{scenario}_{family}"
        worst_case_figure(scenario, family, points, stem)
        change = ranking_changes(points)
        sections.append(
            Section(
                f"{scenario} — {family}: every defense by its worst case",
                [
                    "Defender drop in points of accuracy; clones as mean over seeds (± spread); "
                    "`=undef.`: the run's transfer set is exactly the undefended API's "
                    "(equal digest), so it trained the undefended clone.",
                    "Order within 1 point of cost, soft-label attacker: "
                    f"{', '.join(change['soft order']) or '–'}; "
                    f"worst case: {', '.join(change['worst-case order']) or '–'} "
                    f"({change['changed place']} defenses change place).",
                ],
                f"plots/{stem.name}.png",
                worst_case_table(points),
            )
        )
        sections.append(
            Section(
                f"{scenario} — {family}: best operating point within a cost, "
                "soft-label vs worst case",
                [],
                None,
                worst_case_best_within(points),
                level=3,
            )
        )
    return sections


def build_report(config: SweepConfig, results: str | Path, out_dir: str | Path) -> Path:
    """Write plots, ``report.md`` and ``report.html`` into ``out_dir``; returns the Markdown
    path."""
    out_dir = Path(out_dir)
    records = ResultStore(results).read()
    reference_of = {a.display: a.reference_for for a in config.attacks if a.reference_for}
    panels = curves(records)
    refs = references(records, reference_of)
    sections = [
        Section(
            "",
            [
                f"{len(records)} runs from `{Path(results).name}`. Clone and defender accuracy "
                "on the victim's test set; effective L1 = mean ‖ỹ − y‖₁ served to the attacker; "
                "overhead = per-query time of the defended API over the undefended forward, "
                "measured in the same run."
            ],
        )
    ]
    sections += suite_sections(config, records, out_dir)
    warnings = consistency_warnings(records)
    if warnings:
        sections.append(Section("Warnings", [f"{WARNING}{w}" for w in warnings]))
    for (scenario, attack), panel in sorted(panels.items()):
        if attack in reference_of:
            continue
        stem = out_dir / "plots" / f"tradeoff_{scenario}_{attack.replace('/', '_')}"
        tradeoff_figure(scenario, attack, panel, refs.get((scenario, attack), {}), stem)
        ref_rows = [
            {"reference": k, "clone_accuracy": v}
            for k, v in sorted(refs.get((scenario, attack), {}).items())
        ]
        sections += [
            Section(f"{scenario} — {attack}", [], f"plots/{stem.name}.png", ref_rows),
            Section(
                f"{scenario} — {attack}: clone accuracy at equal cost (interpolated)",
                [],
                None,
                tradeoff_table(panel),
                level=3,
            ),
            Section(
                f"{scenario} — {attack}: best operating point within a cost",
                [],
                None,
                best_within_table(panel),
                level=3,
            ),
            Section(
                f"{scenario} — {attack}: every point (mean and spread over seeds)",
                [],
                None,
                points_table(panel),
                level=3,
            ),
        ]

    angles: dict[str, dict[str, list[float]]] = {}
    for r in records:
        if r.get("angular_deviation") and r["defense"] != "none":
            angles.setdefault(r["scenario"], {}).setdefault(r["defense_label"], []).extend(
                r["angular_deviation"]
            )
    for i, (scenario, series) in enumerate(sorted(angles.items())):
        stem = out_dir / "plots" / f"angular_deviation_{scenario}"
        angular_deviation_figure(series, f"{scenario}: clean vs served gradient", stem)
        sections.append(
            Section(
                "Angular deviation of the attacker's gradient" if i == 0 else "",
                [],
                f"plots/{stem.name}.png",
            )
        )

    overhead = overhead_table(records)
    if overhead:
        overhead_figure(overhead, out_dir / "plots" / "overhead")
    sections.append(
        Section("Per-query overhead", [], "plots/overhead.png" if overhead else None, overhead)
    )
    sections.append(
        Section(
            "Cost of the sweep",
            [
                "Compute as the sum of run wall times (the sweep's wall time is about this over "
                "the number of workers), without the models trained before dispatch (victims, "
                "surrogates, training-time defenses); peak RSS is the largest any worker reached "
                "by the end of a run."
            ],
            None,
            sweep_cost_table(records),
        )
    )
    run_rows = [
        {
            k: r.get(k)
            for k in (
                "scenario",
                "defense_label",
                "defense_params",
                "attack_label",
                "budget",
                "seed",
                "victim_accuracy",
                "defender_accuracy",
                "clone_accuracy",
                "clone_diverged",
                "clone_collapsed",
                "effective_l1",
                "overhead_ratio",
                "wall_seconds",
            )
        }
        for r in records
    ]
    sections.append(Section("All runs", [], None, run_rows))
    out_dir.mkdir(parents=True, exist_ok=True)
    title = f"mirage benchmark — {config.name}"
    (out_dir / "report.md").write_text(
        render_markdown(title.replace(config.name, f"`{config.name}`"), sections)
    )
    (out_dir / "report.html").write_text(render_html(title, sections))
    return out_dir / "report.md"
