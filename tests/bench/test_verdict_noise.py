"""The verdict never recommends seed noise: a defense must beat the undefended worst case, paired
per seed, by more than the noise margin (docs/design.md §worst-case). Hand-made records."""

import pytest

from mirage.bench.config import SweepConfig
from mirage.bench.report import suite_sections
from mirage.bench.summary import (
    FEW_SEEDS_MARGIN,
    LABELS_ONLY_DEFENSE,
    MARGIN_FLOOR,
    NO_DEFENSE,
    beats_undefended,
    labels_only,
    noise_margin,
    paired_gains,
    undefended_worst_by_seed,
    verdict,
    verdict_advice,
    worst_case_points,
)

SUITE = ("hard-label", "soft")


def record(defense, attacker, clone, seed=0, digest=None, defender=0.92):
    return {
        "scenario": "digits",
        "attack_family": "knockoff",
        "attack_label": f"knockoff/{attacker}",
        "attacker": attacker,
        "defense": defense,
        "defense_label": defense,
        "defense_params": {},
        "seed": seed,
        "clone_accuracy": clone,
        "victim_accuracy": 0.92,
        "defender_accuracy": defender,
        "effective_l1": 0.5,
        "overhead_ratio": 2.0,
        "transfer_digest": digest,
    }


def undefended(soft, hard, seeds=(0,)):
    """`none` at each seed: ``soft[i]``, ``hard[i]`` (its hard-label digest ``u<seed>``)."""
    return [
        r
        for i, s in enumerate(seeds)
        for r in (
            record("none", "soft", soft[i], s),
            record("none", "hard-label", hard[i], s, f"u{s}"),
        )
    ]


def defended(name, soft, hard, seeds=(0,), digest=lambda s: f"{s}", defender=0.92):
    return [
        r
        for i, s in enumerate(seeds)
        for r in (
            record(name, "soft", soft[i], s, defender=defender),
            record(name, "hard-label", hard[i], s, digest(s), defender=defender),
        )
    ]


def points(records):
    return {
        p.defense: p
        for p in worst_case_points(records, {"knockoff": SUITE})[("digits", "knockoff")]
    }


def the_verdict(records):
    (row,) = verdict(worst_case_points(records, {"knockoff": SUITE}))
    return row


def test_the_margin_is_two_points_below_three_seeds_and_a_t_bound_with_a_floor_from_three():
    assert noise_margin([0.05]) == noise_margin([0.05, 0.01]) == FEW_SEEDS_MARGIN == 0.02
    assert noise_margin([0.05, 0.05, 0.05]) == MARGIN_FLOOR == 0.01  # agreeing gains: the floor
    # s = 0.1, n = 3: t(0.95, 2) = 2.919986 → 2.919986 · 0.1 / √3
    assert noise_margin([0.05, 0.15, -0.05]) == pytest.approx(2.919986 * 0.1 / 3**0.5, rel=1e-5)


def test_a_defense_one_point_better_at_one_seed_is_not_recommended():
    base = undefended([0.90], [0.89])
    row = the_verdict(base + defended("D", [0.885], [0.89]))  # worst case 0.89 against 0.90
    assert row["deploy"] == NO_DEFENSE and row["closest"] == "D"
    assert row["paired gain (pts)"] == "+1.00" and row["noise margin (pts)"] == "2.00"
    # the main job's single-seed case: 0.8444 (hard-label) against an undefended 0.8591
    assert (
        the_verdict(undefended([0.8591], [0.8499]) + defended("mad", [0.7996], [0.8444]))["deploy"]
        == "none"
    )
    # three points at one seed are beyond the margin, but one seed never makes a recommendation
    row = the_verdict(base + defended("D", [0.86], [0.87]))
    assert (
        row["deploy"] == NO_DEFENSE and row["too few seeds"] and row["paired gain (pts)"] == "+3.00"
    )
    words = verdict_advice(row)
    assert (
        words.startswith("digits × knockoff: none yet. D lowers")
        and "too few to recommend" in words
    )
    # the same three points at three seeds are recommended
    seeds = (0, 1, 2)
    confirmed = the_verdict(
        undefended([0.90] * 3, [0.89] * 3, seeds) + defended("D", [0.86] * 3, [0.87] * 3, seeds)
    )
    assert confirmed["deploy"] == "D" and not confirmed["too few seeds"]


def test_three_seeds_of_consistent_five_point_paired_gains_are_recommended():
    seeds = (0, 1, 2)
    base = undefended([0.90, 0.92, 0.89], [0.88, 0.90, 0.87], seeds)
    consistent = defended(
        "D", [0.70, 0.72, 0.69], [0.85, 0.87, 0.84], seeds
    )  # 5 points at every seed
    row = the_verdict(base + consistent)
    assert row["deploy"] == "D" and row["gain on"] == "hard-label @ 0,1,2"
    assert row["paired gain (pts)"] == "+5.00" and row["noise margin (pts)"] == "1.00"
    assert "deploy D" in verdict_advice(row)
    # the same five points on average, but +15, -5, +5: the t bound (16.9 points) swallows it
    erratic = defended("D", [0.70, 0.72, 0.69], [0.75, 0.97, 0.84], seeds)
    gain = paired_gains(points(base + erratic)["D"], points(base + erratic)["none"])["hard-label"]
    assert gain.gain == pytest.approx(0.05) and gain.margin > 0.15
    assert the_verdict(base + erratic)["deploy"] == NO_DEFENSE


def test_labels_only_defense_ten_points_below_undefended_worst_case_is_recommended_as_argmax():
    # the undefended soft clone is 10 points above its hard-label clone at every seed; the defense
    # keeps the top-1, so its hard-label runs have the undefended transfer sets (equal digests)
    seeds = (0, 1, 2)
    base = undefended([0.95, 0.96, 0.95], [0.85, 0.86, 0.85], seeds)
    top1 = defended(
        "top1",
        [0.40, 0.41, 0.42],
        [0.85, 0.86, 0.85],
        seeds,
        digest=lambda s: f"u{s}",
        defender=0.915,
    )
    by_name = points(base + top1)
    assert labels_only(by_name["top1"]) and not labels_only(by_name["none"])
    gains = paired_gains(by_name["top1"], by_name["none"])
    # the gain is against the undefended worst case, =undef. or not: 10 points at every seed
    assert gains["hard-label"].gain == pytest.approx(0.10) and gains["soft"].gain > 0.5
    assert beats_undefended(by_name["top1"], by_name["none"])
    row = the_verdict(base + top1)
    # its effect is that of answering labels only: argmax, at no perturbation cost, is the pick
    assert row["deploy"] == LABELS_ONLY_DEFENSE == "argmax"
    assert row["labels-only bound"] == row["figures of"] == "top1"
    assert row["worst-case clone"] == pytest.approx(0.8533333) and row["by attacker"].startswith(
        "hard-label"
    )
    assert row["gain on"] == "hard-label @ 0,1,2" and row["paired gain (pts)"] == "+10.00"
    assert row["noise margin (pts)"] == "1.00" and row["defender cost (pts)"] == "0.00"
    assert row["overhead"] is None and row["soft clone"] is None
    words = verdict_advice(row)
    assert words.startswith(
        "digits × knockoff: deploy argmax: serve top-1 labels only. top1's worst case"
    )
    for phrase in (
        "exactly the undefended API's answers",
        "its effect is that of answering labels only",
        "which argmax does at no perturbation cost",
        "argmax has not faced the whole suite here",
    ):
        assert phrase in words
    # the same clones from answers of its own (another digest) are its own doing: deployed as itself
    own = defended("own", [0.40, 0.41, 0.42], [0.85, 0.86, 0.85], seeds)
    row = the_verdict(base + own)
    assert row["deploy"] == "own" and row["labels-only bound"] is None and row["figures of"] is None
    assert "labels only" not in verdict_advice(row)


def test_where_argmax_was_measured_a_labels_only_point_is_judged_by_its_runs():
    seeds = (0, 1, 2)
    base = undefended([0.95, 0.96, 0.95], [0.85, 0.86, 0.85], seeds)
    top1 = defended("top1", [0.40, 0.41, 0.42], [0.85, 0.86, 0.85], seeds, digest=lambda s: f"u{s}")

    def argmax(
        soft,
    ):  # its soft attacker trains on one-hot answers: not the hard-label transfer set
        return defended("argmax", soft, [0.85, 0.86, 0.85], seeds, digest=lambda s: f"u{s}")

    # argmax's own worst case, 0.87 (soft), beats the undefended API by 8-9 points: deployed with it
    row = the_verdict(base + top1 + argmax([0.87, 0.88, 0.87]))
    assert (
        row["deploy"] == "argmax"
        and row["figures of"] is None
        and row["labels-only bound"] == "top1"
    )
    assert row["worst-case clone"] == pytest.approx(0.8733333) and row["by attacker"].startswith(
        "soft"
    )
    words = verdict_advice(row)
    assert words.startswith("digits × knockoff: deploy argmax. Its worst case, 0.8733")
    assert "top1's, is the hard-label attacker" in words and "answering labels only" in words
    # argmax's own runs within the noise (0.5 points): the labels-only point stands or falls with
    # them
    weak = argmax([0.945, 0.955, 0.945])
    row = the_verdict(base + top1 + weak)
    assert (
        row["deploy"] == NO_DEFENSE
        and row["closest"] == "top1"
        and row["labels-only bound"] == "top1"
    )
    words = verdict_advice(row)
    assert "answering labels only" in words and "argmax's own runs here do not beat" in words
    # ... and a defense that changes labels comes first
    other = defended("other", [0.50, 0.50, 0.50], [0.90, 0.91, 0.90], seeds)
    row = the_verdict(base + top1 + weak + other)
    assert row["deploy"] == "other" and row["labels-only bound"] == "top1"
    assert "top1's lower worst case is the hard-label attacker" in verdict_advice(row)


def test_a_top1_keeping_defense_under_a_point_below_the_undefended_worst_case_is_not_recommended():
    seeds = (0, 1, 2)
    base = undefended([0.90, 0.91, 0.90], [0.893, 0.903, 0.893], seeds)
    top1 = defended(
        "top1", [0.40, 0.41, 0.42], [0.893, 0.903, 0.893], seeds, digest=lambda s: f"u{s}"
    )
    row = the_verdict(base + top1)
    assert (
        row["deploy"] == NO_DEFENSE
        and row["closest"] == "top1"
        and row["labels-only bound"] == "top1"
    )
    assert row["paired gain (pts)"] == "+0.70" and row["noise margin (pts)"] == "1.00"
    words = verdict_advice(row)
    assert words.startswith("digits × knockoff: none. ")
    assert (
        "its effect is that of answering labels only" in words and "within the noise here" in words
    )


def test_the_undefended_worst_case_includes_the_hard_label_attacker_and_every_other():
    base = undefended([0.85, 0.86], [0.90, 0.84], seeds=(0, 1))
    assert undefended_worst_by_seed(points(base)["none"]) == {0: 0.90, 1: 0.86}
    # 4 points below the undefended worst case at both seeds (0.90 hard-label, 0.86 soft); against
    # the soft clone alone it would be -1 and +4
    row = the_verdict(base + defended("D", [0.50, 0.50], [0.86, 0.82], seeds=(0, 1)))
    assert row["undefended worst case"] == pytest.approx(0.87)  # hard-label, mean of 0.90 and 0.84
    assert row["closest"] == "D" and row["paired gain (pts)"] == "+4.00" and row["too few seeds"]
    # an attacker beyond the suite run against `none` raises its worst case at its seed
    aligned = [record("none", "aligned", 0.99, seed=0)]
    assert undefended_worst_by_seed(points(base + aligned)["none"]) == {0: 0.99, 1: 0.86}
    row = the_verdict(base + aligned + defended("D", [0.50, 0.50], [0.96, 0.83], seeds=(0, 1)))
    assert row["closest"] == "D" and row["paired gain (pts)"] == "+3.00" and row["too few seeds"]
    against_hard_label = the_verdict(base + defended("D", [0.50, 0.50], [0.96, 0.83], seeds=(0, 1)))
    assert against_hard_label["deploy"] == "none" and not against_hard_label["too few seeds"]


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
    for phrase in (
        "No answer perturbation helps in this scenario",
        "quotas and rate limits",
        "query-stream detection",
        "watermark",
        "`mirage verify`",
        "closest: D",
    ):
        assert phrase in words
    config = SweepConfig.model_validate(
        {
            "name": "t",
            "scenarios": ["digits"],
            "defenses": [{"name": "none"}],
            "attacks": [{"name": "knockoff", "budget": 10, "variants": list(SUITE)}],
        }
    )
    (section, *_) = suite_sections(config, records, tmp_path)
    assert section.table[0]["deploy"] == "none" and words in section.text
    path = tmp_path / "results.jsonl"
    store = ResultStore(path)
    for r in records:
        store.append(r)
    print_verdict(config, path)
    assert "No answer perturbation helps in this scenario" in capsys.readouterr().out
