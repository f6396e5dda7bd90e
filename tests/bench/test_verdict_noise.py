"""The verdict never recommends seed noise: a defense must beat the undefended worst case, paired
per seed, by more than the noise margin (docs/design.md §worst-case). Hand-made records."""

import pytest

from mirage.bench.config import SweepConfig
from mirage.bench.report import suite_sections
from mirage.bench.summary import (
    FEW_SEEDS_MARGIN,
    MARGIN_FLOOR,
    NO_DEFENSE,
    beats_undefended,
    noise_margin,
    paired_gains,
    undefended_worst_by_seed,
    verdict,
    verdict_advice,
    worst_case_points,
)

SUITE = ("hard-label", "soft")


def record(defense, attacker, clone, seed=0, digest=None, defender=0.92):
    return {"scenario": "digits", "attack_family": "knockoff", "attack_label": f"knockoff/{attacker}",
            "attacker": attacker, "defense": defense, "defense_label": defense, "defense_params": {},
            "seed": seed, "clone_accuracy": clone, "victim_accuracy": 0.92, "defender_accuracy": defender,
            "effective_l1": 0.5, "overhead_ratio": 2.0, "transfer_digest": digest}


def undefended(soft, hard, seeds=(0,)):
    """`none` at each seed: ``soft[i]``, ``hard[i]`` (its hard-label digest ``u<seed>``)."""
    return [r for i, s in enumerate(seeds) for r in (record("none", "soft", soft[i], s),
                                                      record("none", "hard-label", hard[i], s, f"u{s}"))]


def defended(name, soft, hard, seeds=(0,), digest=lambda s: f"{s}", defender=0.92):
    return [r for i, s in enumerate(seeds) for r in (
        record(name, "soft", soft[i], s, defender=defender),
        record(name, "hard-label", hard[i], s, digest(s), defender=defender))]


def points(records):
    return {p.defense: p for p in worst_case_points(records, {"knockoff": SUITE})[("digits", "knockoff")]}


def the_verdict(records):
    (row,) = verdict(worst_case_points(records, {"knockoff": SUITE}))
    return row


def test_the_margin_is_two_points_below_three_seeds_and_a_t_bound_with_a_floor_from_three():
    assert noise_margin([0.05]) == noise_margin([0.05, 0.01]) == FEW_SEEDS_MARGIN == 0.02
    assert noise_margin([0.05, 0.05, 0.05]) == MARGIN_FLOOR == 0.01  # agreeing gains: the floor
    # s = 0.1, n = 3: t(0.95, 2) = 2.919986 → 2.919986 · 0.1 / √3
    assert noise_margin([0.05, 0.15, -0.05]) == pytest.approx(2.919986 * 0.1 / 3 ** 0.5, rel=1e-5)


def test_a_defense_one_point_better_at_one_seed_is_not_recommended():
    base = undefended([0.90], [0.89])
    row = the_verdict(base + defended("D", [0.885], [0.89]))  # worst case 0.89 against 0.90
    assert row["deploy"] == NO_DEFENSE and row["closest"] == "D"
    assert row["paired gain (pts)"] == "+1.00" and row["noise margin (pts)"] == "2.00"
    # the main job's single-seed case: 0.8444 (hard-label) against an undefended 0.8591
    assert the_verdict(undefended([0.8591], [0.8499]) + defended("mad", [0.7996], [0.8444]))["deploy"] == "none"
    # three points at one seed do count
    assert the_verdict(base + defended("D", [0.86], [0.87]))["deploy"] == "D"


def test_three_seeds_of_consistent_five_point_paired_gains_are_recommended():
    seeds = (0, 1, 2)
    base = undefended([0.90, 0.92, 0.89], [0.88, 0.90, 0.87], seeds)
    consistent = defended("D", [0.70, 0.72, 0.69], [0.85, 0.87, 0.84], seeds)  # 5 points at every seed
    row = the_verdict(base + consistent)
    assert row["deploy"] == "D" and row["gain on"] == "hard-label @ 0,1,2"
    assert row["paired gain (pts)"] == "+5.00" and row["noise margin (pts)"] == "1.00"
    assert "deploy D" in verdict_advice(row)
    # the same five points on average, but +15, -5, +5: the t bound (16.9 points) swallows it
    erratic = defended("D", [0.70, 0.72, 0.69], [0.75, 0.97, 0.84], seeds)
    gain = paired_gains(points(base + erratic)["D"], points(base + erratic)["none"])["hard-label"]
    assert gain.gain == pytest.approx(0.05) and gain.margin > 0.15
    assert the_verdict(base + erratic)["deploy"] == NO_DEFENSE


def test_a_hard_label_clone_equal_to_the_undefended_one_cannot_win_on_that_attacker():
    # the undefended soft clone is 10 points above its hard-label clone at every seed; the defense
    # keeps the top-1, so its hard-label runs have the undefended transfer sets (equal digests)
    seeds = (0, 1, 2)
    base = undefended([0.95, 0.96, 0.95], [0.85, 0.86, 0.85], seeds)
    top1 = defended("top1", [0.40, 0.41, 0.42], [0.85, 0.86, 0.85], seeds, digest=lambda s: f"u{s}")
    by_name = points(base + top1)
    gains = paired_gains(by_name["top1"], by_name["none"])
    assert gains["hard-label"].gain == 0.0 and gains["soft"].gain > 0.5
    assert not beats_undefended(by_name["top1"], by_name["none"])
    row = the_verdict(base + top1)
    assert row["deploy"] == NO_DEFENSE and row["closest"] == "top1" and row["gain on"] == "hard-label @ 0,1,2"
    # the same clones from answers of its own (another digest) are 10 points below the undefended
    # worst case: that defense does beat it
    own = defended("own", [0.40, 0.41, 0.42], [0.85, 0.86, 0.85], seeds)
    assert the_verdict(base + own)["deploy"] == "own"


def test_the_undefended_worst_case_includes_the_hard_label_attacker_and_every_other():
    base = undefended([0.85, 0.86], [0.90, 0.84], seeds=(0, 1))
    assert undefended_worst_by_seed(points(base)["none"]) == {0: 0.90, 1: 0.86}
    # 4 points below the undefended worst case at both seeds (0.90 hard-label, 0.86 soft); against
    # the soft clone alone it would be -1 and +4
    row = the_verdict(base + defended("D", [0.50, 0.50], [0.86, 0.82], seeds=(0, 1)))
    assert row["undefended worst case"] == pytest.approx(0.87)  # hard-label, mean of 0.90 and 0.84
    assert row["deploy"] == "D" and row["paired gain (pts)"] == "+4.00"
    # an attacker beyond the suite run against `none` raises its worst case at its seed
    aligned = [record("none", "aligned", 0.99, seed=0)]
    assert undefended_worst_by_seed(points(base + aligned)["none"]) == {0: 0.99, 1: 0.86}
    row = the_verdict(base + aligned + defended("D", [0.50, 0.50], [0.96, 0.83], seeds=(0, 1)))
    assert row["deploy"] == "D" and row["paired gain (pts)"] == "+3.00"
    assert the_verdict(base + defended("D", [0.50, 0.50], [0.96, 0.83], seeds=(0, 1)))["deploy"] == "none"


def test_the_cost_still_counts_and_nothing_is_recommended_without_an_undefended_api():
    base = undefended([0.90], [0.89])
    costly = defended("D", [0.50], [0.60], defender=0.90)  # 2 points of defender accuracy
    row = the_verdict(base + costly)
    assert row["deploy"] == NO_DEFENSE and row["closest"] is None
    assert the_verdict(defended("D", [0.50], [0.60]))["deploy"] == NO_DEFENSE


def test_the_none_verdict_says_what_to_use_instead_in_the_report_and_the_command(tmp_path, capsys):
    from mirage.bench.results import ResultStore
    from mirage.cli.bench import print_verdict

    records = undefended([0.90], [0.89]) + defended("D", [0.885], [0.89])
    row = the_verdict(records)
    words = verdict_advice(row)
    assert words.startswith("digits × knockoff: none. ")
    for phrase in ("No answer perturbation helps in this scenario", "quotas and rate limits",
                   "query-stream detection", "watermark", "`mirage verify`", "closest: D"):
        assert phrase in words
    config = SweepConfig.model_validate({
        "name": "t", "scenarios": ["digits"], "defenses": [{"name": "none"}],
        "attacks": [{"name": "knockoff", "budget": 10, "variants": list(SUITE)}]})
    (section, *_) = suite_sections(config, records, tmp_path)
    assert section.table[0]["deploy"] == "none" and words in section.text
    path = tmp_path / "results.jsonl"
    store = ResultStore(path)
    for r in records:
        store.append(r)
    print_verdict(config, path)
    assert "No answer perturbation helps in this scenario" in capsys.readouterr().out
