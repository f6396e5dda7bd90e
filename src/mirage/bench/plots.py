"""Matplotlib figures of a sweep (PNG + SVG): trade-off curves and angular deviations."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from mirage.bench.summary import Curve, WorstCasePoint


def _save(fig, stem: Path) -> list[Path]:
    """PNG and SVG; the same results give byte-identical files (no date, fixed SVG ids), so a
    regenerated report changes in git only where its numbers did."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".png"), stem.with_suffix(".svg")]
    with matplotlib.rc_context({"svg.hashsalt": "mirage"}):
        for path in paths:
            fig.savefig(
                path,
                dpi=130,
                bbox_inches="tight",
                metadata={"Date": None} if path.suffix == ".svg" else {"Software": None},
            )
    plt.close(fig)
    return paths


ZOOM_DROP = 0.05
MARKERS = "os^Dv<>PX*"


def tradeoff_figure(
    scenario: str, attack: str, panel: dict[str, Curve], refs: dict[str, float], stem: Path
) -> list[Path]:
    """Clone accuracy vs defender accuracy (all of it, and zoomed on the first ``ZOOM_DROP`` of
    the defender's loss, where a deployable defense lives) and vs effective L1."""
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    colors = plt.get_cmap("tab20").colors  # type: ignore[attr-defined]  # a ListedColormap
    victim = max((p["victim_accuracy"] for c in panel.values() for p in c.points), default=None)
    for i, (name, curve) in enumerate(sorted(n for n in panel.items() if n[0] != "none")):
        style = {
            "marker": MARKERS[i % len(MARKERS)],
            "ms": 4,
            "color": colors[i % len(colors)],
            "label": name,
        }
        for ax, key in zip(axes, ("defender_accuracy", "defender_accuracy", "effective_l1")):
            x, y = curve.xy(key)
            ax.plot(x, y, **style)
    for ax in axes:
        for ref_name, value in sorted(refs.items()):
            ax.axhline(
                value,
                color="k" if ref_name == "undefended" else "tab:gray",
                ls="--" if ref_name == "undefended" else ":",
                lw=1,
                label=f"{ref_name} clone",
            )
        ax.set_ylabel("clone accuracy")
        ax.grid(alpha=0.3)
    axes[0].set_xlabel("defender accuracy")
    axes[0].invert_xaxis()
    axes[1].set_xlabel(f"defender accuracy (within {ZOOM_DROP * 100:.0f} points of the victim)")
    if victim is not None:
        axes[1].set_xlim(victim + 0.005, victim - ZOOM_DROP)
        shown = [
            p["clone_accuracy"]
            for c in panel.values()
            for p in c.points
            if p["defender_accuracy"] >= victim - ZOOM_DROP
        ] + list(refs.values())
        axes[1].set_ylim(min(shown) - 0.01, max(shown) + 0.01)
    else:
        axes[1].invert_xaxis()
    axes[2].set_xlabel("effective L1 served to the attacker")
    axes[2].legend(fontsize=7, loc="best")
    fig.suptitle(f"{scenario} — {attack}")
    return _save(fig, stem)


def angular_deviation_figure(angles: dict[str, list[float]], title: str, stem: Path) -> list[Path]:
    """Histogram of the angle between the clean and the served answer's training gradient
    (MAD paper, section 5.2 / Fig. 6), one series per defense."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    bins = np.linspace(0, 180, 37)
    for name, values in sorted(angles.items()):
        ax.hist(values, bins=bins.tolist(), histtype="step", lw=1.4, label=name, density=True)
    ax.set_xlabel("angular deviation θ (degrees)")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return _save(fig, stem)


def overhead_figure(rows: list[dict[str, Any]], stem: Path) -> list[Path]:
    fig, ax = plt.subplots(figsize=(6, 0.4 * max(len(rows), 3) + 1))
    names = [r["defense"] for r in rows]
    ax.barh(names, [r["overhead_ratio_median"] for r in rows], color="tab:blue")
    ax.axvline(1, color="k", lw=0.8)
    ax.set_xlabel("per-query time / undefended forward (same run)")
    return _save(fig, stem)


def worst_case_figure(
    scenario: str, family: str, points: list[WorstCasePoint], stem: Path
) -> list[Path]:
    """Clone accuracy vs defender accuracy per defense point: the soft-label attacker (hollow) and
    the worst case over the suite (filled), joined by a line — how much of a defense's effect the
    strongest attacker takes back. A worst case still missing an attacker is drawn grey."""
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    colors = plt.get_cmap("tab20").colors  # type: ignore[attr-defined]  # a ListedColormap
    for i, p in enumerate(sorted(points, key=lambda q: q.defense)):
        color = colors[i % len(colors)]
        x = p.defender_accuracy
        if p.soft is not None:
            ax.plot([x, x], [p.soft, p.worst], color=color, lw=1)
            ax.plot(x, p.soft, marker=MARKERS[i % len(MARKERS)], mfc="none", color=color, ms=7)
        ax.plot(
            x,
            p.worst,
            marker=MARKERS[i % len(MARKERS)],
            color=color if p.complete else "0.6",
            ms=7,
            ls="none",
            label=f"{p.defense}{'' if p.complete else ' (incomplete)'}",
        )
    ax.set_xlabel("defender accuracy")
    ax.set_ylabel("clone accuracy (hollow: soft-label, filled: worst case)")
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    ax.set_title(f"{scenario} — {family}: soft-label vs worst-case attacker")
    return _save(fig, stem)


def verdict_figure(
    panels: dict[tuple[str, str], list[WorstCasePoint]], stem: Path, max_drop: float = 0.01
) -> list[Path]:
    """One panel per (scenario, attack family): each defense within ``max_drop`` of defender cost,
    its soft-label clone (light) and its worst case over the suite (dark), the undefended worst
    case as a dashed line. Incomplete worst cases are hatched."""
    keys = sorted(panels)
    fig, axes = plt.subplots(
        1,
        len(keys),
        figsize=(5.2 * len(keys), 0.32 * max((len(panels[k]) for k in keys), default=3) + 1.6),
        squeeze=False,
        layout="constrained",
    )
    for ax, key in zip(axes[0], keys, strict=True):
        points = sorted(
            (p for p in panels[key] if p.drop <= max_drop + 1e-6), key=lambda p: -p.worst
        )
        names = [p.defense for p in points]
        y = np.arange(len(points))
        ax.barh(
            y + 0.2,
            [p.soft or 0 for p in points],
            0.4,
            color="tab:blue",
            alpha=0.35,
            label="soft-label",
        )
        ax.barh(
            y - 0.2,
            [p.worst for p in points],
            0.4,
            color="tab:blue",
            hatch=None,
            label="worst case",
        )
        for yi, p in zip(y, points, strict=True):
            if not p.complete:
                ax.barh(yi - 0.2, p.worst, 0.4, color="white", edgecolor="tab:blue", hatch="//")
        undefended = next((p.worst for p in panels[key] if p.defense == "none"), None)
        if undefended is not None:
            ax.axvline(undefended, color="k", ls="--", lw=1, label="undefended, worst case")
        ax.set_yticks(y, names, fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_xlabel("clone accuracy")
        ax.set_title(f"{key[0]} — {key[1]}", fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.suptitle(
        f"Clone accuracy at ≤ {max_drop * 100:.0f} point of defender cost: "
        "soft-label vs worst-case attacker"
    )
    return _save(fig, stem)
