"""The report: a Markdown page and a static HTML page, both generated from the JSONL results."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from mirage.bench.config import SweepConfig
from mirage.bench.plots import angular_deviation_figure, overhead_figure, tradeoff_figure
from mirage.bench.results import ResultStore
from mirage.bench.summary import (
    best_within_table,
    curves,
    failed_clone,
    overhead_table,
    points_table,
    references,
    sweep_cost_table,
    tradeoff_table,
)


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _markdown_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "_no data_\n"
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_fmt(r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _html_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "<p><em>no data</em></p>"
    keys = list(rows[0])
    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(k)))}</td>" for k in keys) + "</tr>"
                   for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


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
            warnings.append(f"{scenario}: runs come from {len(prints)} different victims "
                            f"({', '.join(sorted(prints))})")
    diverged = [r for r in records if r.get("clone_diverged")]
    if diverged:
        warnings.append(f"{len(diverged)} run(s) trained a clone whose loss or weights diverged "
                        "(marked in the table of all runs); an attacker would notice and retrain")
    collapsed = [r for r in records if r.get("clone_collapsed") and not r.get("clone_diverged")]
    if collapsed:
        warnings.append(f"{len(collapsed)} run(s) trained a clone that answers one class for nearly every "
                        "image (clone_collapsed in the table of all runs): its training stalled, which "
                        "an attacker would notice and retrain; check such a point across seeds")
    if diverged or collapsed:
        warnings.append(f"the {sum(map(failed_clone, records))} run(s) with a failed clone are left out "
                        "of the curves and tables (an attacker's `restarts` countermeasure measures them)")
    return warnings


def build_report(config: SweepConfig, results: str | Path, out_dir: str | Path) -> Path:
    """Write plots, ``report.md`` and ``report.html`` into ``out_dir``; returns the Markdown path."""
    out_dir = Path(out_dir)
    records = ResultStore(results).read()
    reference_of = {a.display: a.reference_for for a in config.attacks if a.reference_for}
    panels = curves(records)
    refs = references(records, reference_of)
    sections: list[tuple[str, str, list[dict[str, Any]]]] = []  # (title, image, table)
    for (scenario, attack), panel in sorted(panels.items()):
        if attack in reference_of:
            continue
        stem = out_dir / "plots" / f"tradeoff_{scenario}_{attack}"
        tradeoff_figure(scenario, attack, panel, refs.get((scenario, attack), {}), stem)
        ref_rows = [{"reference": k, "clone_accuracy": v} for k, v in sorted(refs.get((scenario, attack), {}).items())]
        sections.append((f"{scenario} — {attack}", f"plots/{stem.name}.png", ref_rows))
        sections.append((f"{scenario} — {attack}: clone accuracy at equal cost (interpolated)", "",
                         tradeoff_table(panel)))
        sections.append((f"{scenario} — {attack}: best operating point within a cost", "",
                         best_within_table(panel)))
        sections.append((f"{scenario} — {attack}: every point (mean and spread over seeds)", "",
                         points_table(panel)))

    angles = {}
    for r in records:
        if r.get("angular_deviation") and r["defense"] != "none":
            angles.setdefault(r["scenario"], {}).setdefault(r["defense_label"], []).extend(r["angular_deviation"])
    angle_images = []
    for scenario, series in sorted(angles.items()):
        stem = out_dir / "plots" / f"angular_deviation_{scenario}"
        angular_deviation_figure(series, f"{scenario}: clean vs served gradient", stem)
        angle_images.append((scenario, f"plots/{stem.name}.png"))

    overhead = overhead_table(records)
    if overhead:
        overhead_figure(overhead, out_dir / "plots" / "overhead")

    md = [f"# mirage benchmark — `{config.name}`\n",
          f"{len(records)} runs from `{Path(results).name}`. Clone and defender accuracy on the "
          "victim's test set; effective L1 = mean ‖ỹ − y‖₁ served to the attacker; overhead = "
          "per-query time of the defended API over the undefended forward, measured in the same run.\n"]
    page = [f"<h1>mirage benchmark — {html.escape(config.name)}</h1>",
            f"<p>{len(records)} runs. Clone and defender accuracy on the victim's test set; "
            "effective L1 = mean ‖ỹ − y‖₁ served to the attacker.</p>"]
    for warning in consistency_warnings(records):
        md.append(f"> **Warning:** {warning}\n")
        page.append(f"<p><strong>Warning:</strong> {html.escape(warning)}</p>")
    for title, image, table in sections:
        md.append(f"## {title}\n")
        page.append(f"<h2>{html.escape(title)}</h2>")
        if image:
            md.append(f"![{title}]({image})\n")
            page.append(f'<img src="{html.escape(image)}" alt="{html.escape(title)}">')
        md.append(_markdown_table(table))
        page.append(_html_table(table))
    if angle_images:
        md.append("## Angular deviation of the attacker's gradient\n")
        page.append("<h2>Angular deviation of the attacker's gradient</h2>")
        for scenario, image in angle_images:
            md.append(f"![{scenario}]({image})\n")
            page.append(f'<img src="{html.escape(image)}" alt="{html.escape(scenario)}">')
    md.append("## Per-query overhead\n")
    md.append(_markdown_table(overhead))
    page.append("<h2>Per-query overhead</h2>" + _html_table(overhead))
    if overhead:
        md.append("![overhead](plots/overhead.png)\n")
        page.append('<img src="plots/overhead.png" alt="overhead">')
    cost = sweep_cost_table(records)
    md.append("## Cost of the sweep\n")
    md.append("Compute as the sum of run wall times (the sweep's wall time is about this over the "
              "number of workers), without the models trained before dispatch (victims, "
              "surrogates, training-time defenses); peak RSS is the largest any worker reached by "
              "the end of a run.\n")
    md.append(_markdown_table(cost))
    page.append("<h2>Cost of the sweep</h2>" + _html_table(cost))
    md.append("## All runs\n")
    run_rows = [{k: r.get(k) for k in ("scenario", "defense_label", "defense_params", "attack_label",
                                        "budget", "seed", "victim_accuracy", "defender_accuracy",
                                        "clone_accuracy", "clone_diverged", "clone_collapsed",
                                        "effective_l1", "overhead_ratio", "wall_seconds")}
                for r in records]
    md.append(_markdown_table(run_rows))
    page.append("<h2>All runs</h2>" + _html_table(run_rows))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.md").write_text("\n".join(md))
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;font-size:13px;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}img{max-width:100%}")
    (out_dir / "report.html").write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>mirage — {html.escape(config.name)}</title>"
        f"<style>{style}</style></head><body>{''.join(page)}</body></html>")
    return out_dir / "report.md"
