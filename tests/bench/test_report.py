import numpy as np
import pytest
from fake_runner import fake_run

from mirage.bench.report import build_report
from mirage.bench.results import ResultStore
from mirage.bench.summary import (
    best_within_table,
    curves,
    interpolate,
    overhead_table,
    points_table,
    references,
    sweep_cost_table,
    tradeoff_table,
)
from mirage.bench.sweep import run_sweep


def test_best_within_is_none_when_no_point_qualifies():
    from mirage.bench.summary import best_within

    assert best_within(np.array([0.5, 1.0]), np.array([0.3, 0.2]), 0.1) is None
    assert best_within(np.array([0.0, 0.5, 1.0]), np.array([0.9, 0.3, 0.2]), 0.5) == 0.3
    assert best_within(np.array([0.0, np.float32(0.5) + 6e-8]), np.array([0.9, 0.3]), 0.5) == 0.3


def test_interpolate_inside_range_only():
    x, y = np.array([0.0, 0.5, 1.0]), np.array([1.0, 0.5, 0.0])
    assert interpolate(x, y, 0.25) == 0.75
    assert interpolate(x, y, 1.5) is None
    assert interpolate(np.array([0.0, 0.0, 1.0]), np.array([1.0, 0.0, 0.0]), 0.0) == 0.5


def test_summaries_from_records(tmp_path, small_config):
    results = tmp_path / "r.jsonl"
    run_sweep(small_config, results, runner=fake_run, executor="inline", show_progress=False)
    records = ResultStore(results).read()
    panel = curves(records)[("digits", "knockoff")]
    assert set(panel) == {"none", "fake"}
    # the undefended point starts the fake curve: 3 grid points + origin, seeds averaged
    assert len(panel["fake"].points) == 4
    row = tradeoff_table(panel)[0]
    # fake: drop = 0.04·eps, clone = 0.8005 − 0.3·eps  => at drop 0.02, eps = 0.5
    assert abs(row["clone@drop2"] - (0.8005 - 0.15)) < 1e-9
    assert row["clone@drop5"] is None  # beyond the largest measured drop (0.04)
    assert abs(row["clone@L1=0.2"] - (0.8005 - 0.06)) < 1e-9
    best = best_within_table(panel)[0]
    # fake points: drop 0.004/0.02/0.04, clone 0.7705/0.6505/0.5005; the origin: drop 0, 0.8005
    assert abs(best["best@drop≤1"] - (0.8005 - 0.03)) < 1e-9
    assert abs(best["best@drop≤5"] - (0.8005 - 0.3)) < 1e-9
    assert abs(best["best@L1≤0.1"] - (0.8005 - 0.03)) < 1e-9
    points = points_table(panel)
    # the undefended point once, then the fake grid by cost; seeds 0 and 1 differ by 0.001
    assert [(r["defense"], r["params"]) for r in points] == [
        ("fake", "epsilon=0.1"),
        ("fake", "epsilon=0.5"),
        ("fake", "epsilon=1.0"),
        ("none", "–"),
    ]
    assert all(r["seeds"] == 2 and abs(r["clone_sd"] - 0.0005) < 1e-9 for r in points)
    assert abs(points[1]["clone_accuracy"] - (0.8005 - 0.15)) < 1e-9
    assert abs(points[1]["vs_undefended"] - (-0.15)) < 1e-9 and points[3]["vs_undefended"] == 0
    refs = references(records, {"knockoff-hard": "knockoff"})
    assert set(refs[("digits", "knockoff")]) == {"undefended", "knockoff-hard"}
    assert {r["defense"] for r in overhead_table(records)} == {"none", "fake"}


@pytest.mark.slow
def test_report_files(tmp_path, small_config):
    results = tmp_path / "r.jsonl"
    run_sweep(small_config, results, runner=fake_run, executor="inline", show_progress=False)
    md = build_report(small_config, results, tmp_path / "out")
    text = md.read_text()
    assert "digits — knockoff" in text and "clone@drop2" in text
    assert (tmp_path / "out" / "plots" / "tradeoff_digits_knockoff.png").stat().st_size > 1000
    assert (tmp_path / "out" / "plots" / "tradeoff_digits_knockoff.svg").is_file()
    assert (tmp_path / "out" / "plots" / "angular_deviation_digits.png").is_file()
    html = (tmp_path / "out" / "report.html").read_text()
    assert "<img" in html and "tradeoff_digits_knockoff.png" in html
    # regenerating from the same results rewrites the very same bytes (clean git diffs)
    plots = sorted((tmp_path / "out" / "plots").iterdir())
    before = {p.name: p.read_bytes() for p in plots}
    build_report(small_config, results, tmp_path / "out")
    assert {p.name: p.read_bytes() for p in plots} == before


def test_report_warns_about_mixed_victims_and_diverged_clones(tmp_path, small_config):
    from mirage.bench.report import consistency_warnings

    base = {"scenario": "digits", "defense": "none", "clone_diverged": False}
    assert (
        consistency_warnings(
            [{**base, "victim_fingerprint": "a"}, {**base, "victim_fingerprint": "a"}]
        )
        == []
    )
    warnings = consistency_warnings(
        [
            {**base, "victim_fingerprint": "a", "clone_collapsed": True},
            {**base, "victim_fingerprint": "b", "clone_diverged": True},
        ]
    )
    assert len(warnings) == 4 and "2 different victims" in warnings[0]
    assert "diverged" in warnings[1] and "one class" in warnings[2] and "2 run(s)" in warnings[3]


def test_failed_clones_are_left_out_of_curves_and_references(tmp_path, small_config):
    results = tmp_path / "r.jsonl"
    run_sweep(small_config, results, runner=fake_run, executor="inline", show_progress=False)
    records = ResultStore(results).read()
    fake = [r for r in records if r["defense"] == "fake" and r["attack_label"] == "knockoff"]
    collapsed = {**fake[0], "clone_accuracy": 0.1, "clone_collapsed": True}
    kept = [collapsed if r is fake[0] else r for r in records]
    panel = curves(kept)[("digits", "knockoff")]
    assert min(p["clone_accuracy"] for p in panel["fake"].points) > 0.4
    assert len(panel["fake"].points) == 4  # the other seed of that point remains


def test_sweep_cost_sums_run_time_per_scenario_and_keeps_the_memory_peak():
    records = [
        {"scenario": "a", "wall_seconds": 1800.0, "worker_peak_rss_mb": 300.0},
        {"scenario": "a", "wall_seconds": 1800.0},  # recorded before memory was
        {"scenario": "b", "wall_seconds": 3600.0, "worker_peak_rss_mb": 500.0},
    ]
    rows = {row["scenario"]: row for row in sweep_cost_table(records)}
    assert rows["a"] == {
        "scenario": "a",
        "runs": 2,
        "run_hours": 1.0,
        "peak_rss_mb": 300.0,
        "runs_with_memory": 1,
    }
    assert rows["all"]["runs"] == 3 and rows["all"]["run_hours"] == 2.0
    assert rows["all"]["peak_rss_mb"] == 500.0
    assert sweep_cost_table([]) == []


def test_points_table_abbreviates_nested_parameters():
    base = {
        "scenario": "s",
        "attack_label": "a",
        "seed": 0,
        "victim_accuracy": 0.9,
        "effective_l1": 0.0,
        "defender_l1": 0.0,
        "overhead_ratio": 1.0,
    }
    records = [
        {
            **base,
            "defense": "none",
            "defense_label": "none",
            "defense_params": {},
            "defender_accuracy": 0.9,
            "clone_accuracy": 0.8,
        },
        {
            **base,
            "defense": "dpsgd",
            "defense_label": "dpsgd",
            "defender_accuracy": 0.8,
            "defense_params": {"noise_multiplier": 1.0, "training": {"epochs": 2}},
            "clone_accuracy": 0.7,
        },
    ]
    rows = {row["defense"]: row for row in points_table(curves(records)[("s", "a")])}
    assert rows["dpsgd"]["params"] == "noise_multiplier=1.0,training={…}"
    assert rows["dpsgd"]["vs_undefended"] == pytest.approx(-0.1)
