"""The exact null of the ownership test, against enumeration, the binomial and simulation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from mirage.ownership import (
    Evidence,
    KeyedWatermark,
    WatermarkConfig,
    derive_key,
    match_pvalue,
    name_the_thief,
    verify_keys,
)
from mirage.ownership.verification import exact_tail, rank_scores

SECRET = b"0123456789abcdef-server-secret"


def brute_force_pvalue(predictions, buckets, labels, k):
    """P(S ≥ s) by enumerating every labelling of the buckets (the independent reference)."""
    names = sorted(set(buckets))
    observed = sum(p == labels[b] for p, b in zip(predictions, buckets))
    hits = 0
    for assignment in itertools.product(range(k), repeat=len(names)):
        relabel = dict(zip(names, assignment))
        hits += sum(p == relabel[b] for p, b in zip(predictions, buckets)) >= observed
    return hits / k ** len(names)


@pytest.mark.parametrize("seed", range(6))
def test_pvalue_equals_enumeration_over_labellings(seed):
    rng = np.random.default_rng(seed)
    k, m = 3, 9
    buckets = [f"b{int(b)}" for b in rng.integers(0, 5, m)]
    predictions = rng.integers(0, k, m)
    labels = {b: int(rng.integers(0, k)) for b in set(buckets)}
    s, expected, p = match_pvalue(torch.tensor(predictions), buckets, labels, k)
    assert s == sum(int(q) == labels[b] for q, b in zip(predictions, buckets))
    assert expected == pytest.approx(m / k)
    assert p == pytest.approx(
        brute_force_pvalue(predictions.tolist(), buckets, labels, k), abs=1e-12
    )


def brute_force_tail(scores, buckets, k):
    names = sorted(set(buckets))
    hits = {}
    for assignment in itertools.product(range(k), repeat=len(names)):
        relabel = dict(zip(names, assignment))
        total = sum(int(scores[i, relabel[b]]) for i, b in enumerate(buckets))
        hits[total] = hits.get(total, 0) + 1
    return {t: n / k ** len(names) for t, n in hits.items()}


@pytest.mark.parametrize("seed", range(6))
def test_probability_statistic_tail_equals_enumeration(seed):
    """Integer scores per image and class (as round(16 p) gives), shared buckets."""
    rng = np.random.default_rng(seed)
    k, m = 4, 8
    scores = torch.tensor(rng.integers(0, 17, (m, k)))
    buckets = [f"b{int(b)}" for b in rng.integers(0, 5, m)]
    labels = {b: int(rng.integers(0, k)) for b in set(buckets)}
    s, mean, p = exact_tail(scores, buckets, labels)
    law = brute_force_tail(scores, buckets, k)
    assert s == sum(int(scores[i, labels[b]]) for i, b in enumerate(buckets))
    assert mean == pytest.approx(sum(t * q for t, q in law.items()))
    assert p == pytest.approx(sum(q for t, q in law.items() if t >= s), abs=1e-12)
    with pytest.raises(ValueError, match="non-negative"):
        exact_tail(-scores, buckets, labels)


def test_one_image_per_bucket_is_the_binomial_tail():
    rng = np.random.default_rng(0)
    m, k = 200, 10
    predictions = torch.tensor(rng.integers(0, k, m))
    buckets = [f"b{i}" for i in range(m)]
    labels = {
        b: int(p) if i < 60 else (int(p) + 1) % k
        for i, (b, p) in enumerate(zip(buckets, predictions))
    }
    s, _, p = match_pvalue(predictions, buckets, labels, k)
    assert s == 60
    assert p == pytest.approx(stats.binom.sf(59, m, 1 / k), rel=1e-9)
    assert p < 1e-6


@pytest.mark.slow
def test_the_null_is_valid_for_models_that_never_saw_the_key():
    """Random keys against fixed predictions: P(p ≤ α) ≤ α (discrete, hence conservative)."""
    rng = np.random.default_rng(1)
    k = 10
    buckets = [f"b{int(b)}" for b in rng.integers(0, 60, 150)]  # shared buckets: dependent images
    predictions = torch.tensor(rng.integers(0, 3, 150))  # a model that prefers few classes
    names = sorted(set(buckets))
    pvalues = np.array(
        [
            match_pvalue(predictions, buckets, {b: int(rng.integers(0, k)) for b in names}, k)[2]
            for _ in range(2000)
        ]
    )
    for alpha in (0.01, 0.05, 0.2):
        assert (pvalues <= alpha).mean() <= alpha + 3 * np.sqrt(alpha * (1 - alpha) / len(pvalues))
    assert (pvalues <= 0.2).mean() > 0.1  # not trivially conservative


class LookupModel(nn.Module):
    """Predicts ``table[i]`` for the i-th known image (by its first pixel), class 0 otherwise."""

    def __init__(self, images: torch.Tensor, classes: torch.Tensor, k: int) -> None:
        super().__init__()
        self.keys, self.classes, self.k = images.flatten(1), classes, k
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        distance = torch.cdist(x.flatten(1), self.keys)
        out = torch.zeros(len(x), self.k)
        out[torch.arange(len(x)), self.classes[distance.argmin(1)]] = 1.0
        return out


def test_name_the_thief_names_the_client_whose_labels_the_model_learnt():
    torch.manual_seed(0)
    x = torch.rand(3000, 1, 28, 28) ** 3
    config = WatermarkConfig(bucket_fraction=1.0)
    marks = {
        c: KeyedWatermark(derive_key(SECRET, c), 10, config) for c in ("alice", "bob", "carol")
    }
    evidence = Evidence()
    for c, w in marks.items():
        evidence.add(c, x, w.marks(x))
    images, buckets, _ = evidence.items("bob")
    learnt = torch.tensor([marks["bob"].label_of(b) for b in buckets])
    thief = LookupModel(images, learnt, 10)
    tests = name_the_thief(thief, evidence, marks)
    assert (
        tests[0].client == "bob"
        and tests[0].named
        and tests[0].p_value <= 10.0 ** -tests[0].buckets + 1e-15
    )
    assert not any(t.named for t in tests[1:])
    innocent = LookupModel(images, torch.randint(0, 10, (len(images),)), 10)
    assert not any(t.named for t in name_the_thief(innocent, evidence, marks))


def test_rank_scores_count_the_classes_ranked_below_against_a_loop():
    rng = np.random.default_rng(3)
    probs = torch.softmax(torch.tensor(rng.normal(size=(50, 7)), dtype=torch.float32), 1)
    probs[:5] = torch.tensor([1.0, 0, 0, 0, 0, 0, 0])  # saturated rows: ties score alike
    slow = torch.tensor(
        [[sum(float(row[j]) < float(row[k]) for j in range(7)) for k in range(7)] for row in probs]
    )
    assert torch.equal(rank_scores(probs), slow)
    assert (
        torch.equal(rank_scores(probs[:5])[:, 0], torch.full((5,), 6))
        and not rank_scores(probs[:5])[:, 1:].any()
    )


class RunnerUpModel(LookupModel):
    """Puts ``classes[i]`` second (0.3) behind a fixed class 9 (0.6) on the i-th known image."""

    def forward(self, x):
        rows = torch.cdist(x.flatten(1), self.keys).argmin(1)
        probs = torch.full((len(x), self.k), 0.1 / (self.k - 2))
        probs[:, 9] = 0.6
        probs[torch.arange(len(x)), self.classes[rows]] = 0.3
        return probs.log()


def test_the_rank_statistic_names_a_clone_that_learnt_the_keyed_label_as_its_runner_up():
    """The clone that keeps the truthful class on top and the keyed label second: no argmax
    matches, a little probability mass, every rank one below the top."""
    torch.manual_seed(1)
    x = torch.rand(3000, 1, 28, 28) ** 3
    watermark = KeyedWatermark(
        derive_key(SECRET, "alice"), 10, WatermarkConfig(bucket_fraction=1.0, step=0.03)
    )
    evidence = Evidence()
    evidence.add("alice", x, watermark.marks(x))
    images, buckets, _ = evidence.items("alice")
    keyed = torch.tensor([watermark.label_of(b) for b in buckets])
    learnt = torch.where(
        keyed == 9, torch.tensor(0), keyed
    )  # its top class cannot be runner-up too
    [test] = name_the_thief(RunnerUpModel(images, learnt, 10), evidence, {"alice": watermark})
    assert test.matches <= sum(keyed == 9).item() and test.match_p_value > 1e-3
    assert test.named and test.p_value < test.probability_p_value
    [innocent] = name_the_thief(
        RunnerUpModel(images, torch.randint(0, 9, (len(images),)), 10),
        evidence,
        {"alice": watermark},
    )
    assert not innocent.named and innocent.p_value > 1e-4


def test_keyed_ranks_null_is_uniform_over_the_ranks_given_the_ranking():
    """verify_key with keyed ranks against enumerating every assignment of ranks to buckets, and
    a clone that learnt them is named while a model ranking like the victim is not."""
    from mirage.ownership import verify_key

    torch.manual_seed(2)
    x = torch.rand(3000, 1, 28, 28) ** 3
    watermark = KeyedWatermark(
        derive_key(SECRET, "alice"), 5, WatermarkConfig(bucket_fraction=1.0, step=0.03, ranked=3)
    )
    served = torch.softmax(torch.randn(len(x), 5) * 3, 1)
    evidence = Evidence()
    evidence.add("alice", x, watermark.apply(x, served)[1])
    images, buckets, kept_ranking = evidence.items("alice")
    rows = torch.cdist(images.flatten(1), x.flatten(1)).argmin(1)
    ranking = served[rows].argsort(dim=1, descending=True, stable=True)
    assert torch.equal(kept_ranking, ranking)  # what the evidence keeps
    keyed = torch.tensor(
        [int(ranking[i, 1 + watermark.label_of(b)]) for i, b in enumerate(buckets)]
    )
    thief = LookupModel(images, keyed, 5)
    honest = LookupModel(images, ranking[:, 0], 5)  # the victim's own top-1
    for model in (thief, honest):
        test = verify_key(model, watermark, images, buckets, ranking=ranking)
        predictions = model(images).argmax(1)
        names = sorted(set(buckets))[:8]  # enumeration over 2^8 rank choices
        sub = [i for i, b in enumerate(buckets) if b in names]
        observed = sum(
            int(predictions[i] == ranking[i, 1 + watermark.label_of(buckets[i])]) for i in sub
        )
        hits = 0
        for assignment in itertools.product(range(2), repeat=len(names)):
            choice = dict(zip(names, assignment))
            hits += (
                sum(int(predictions[i] == ranking[i, 1 + choice[buckets[i]]]) for i in sub)
                >= observed
            )
        sub_test = verify_key(
            model, watermark, images[sub], [buckets[i] for i in sub], ranking=ranking[sub]
        )
        assert sub_test.matches == observed
        assert sub_test.match_p_value == pytest.approx(hits / 2 ** len(names), abs=1e-12)
        if model is thief:
            assert test.named and test.p_value <= 2.0**-test.buckets + 1e-12
        else:
            assert test.matches == 0 and not test.named
    with pytest.raises(ValueError, match="ranking"):
        verify_key(thief, watermark, images, buckets)


def test_a_group_test_pools_several_keys_evidence_with_an_exact_null():
    """A thief that spread its queries over four keys learnt a share of each key's labels: the
    group's one test is the convolution over every (key, bucket) label, against enumerating every
    label assignment on a small subset; pooled, it names a thief no single key names."""
    torch.manual_seed(3)
    x = torch.rand(4000, 1, 28, 28) ** 3
    config = WatermarkConfig(bucket_fraction=1.0, margin=0.0, step=0.03)
    keys = [f"alice{i}" for i in range(4)]
    watermarks = {c: KeyedWatermark(derive_key(SECRET, c), 3, config) for c in keys + ["bob"]}
    evidence = Evidence()
    for i, c in enumerate(keys):
        evidence.add(c, x[i::4][:12], watermarks[c].marks(x[i::4][:12]))
    evidence.add("bob", x[3::4][12:24], watermarks["bob"].marks(x[3::4][12:24]))
    images, labels = [], []
    for c in keys:  # the thief learnt 7 of each key's 12 labels
        kept, buckets, _ = evidence.items(c)
        keyed = torch.tensor([watermarks[c].label_of(b) for b in buckets])
        images.append(kept)
        labels.append(torch.where(torch.arange(len(keyed)) < 7, keyed, (keyed + 1) % 3))
    thief = LookupModel(torch.cat(images), torch.cat(labels), 3)
    tests = {
        t.client: t for t in name_the_thief(thief, evidence, watermarks, groups=[keys], alpha=1e-2)
    }
    group = tests[",".join(keys)]
    assert group.named and not any(tests[c].named for c in keys + ["bob"])
    assert group.corrected_p_value == pytest.approx(6 * group.p_value)  # 5 clients and 1 group
    # the exact null against enumeration: two keys, four images each
    parts = []
    for c in keys[:2]:
        kept, buckets, _ = evidence.items(c)
        parts.append((watermarks[c], kept[:4], buckets[:4], None))
    test = verify_keys(thief, parts)
    rows = [
        (c, b, int(thief(img[None]).argmax()))
        for c, (_, imgs, bs, _) in zip(keys[:2], parts, strict=True)
        for img, b in zip(imgs, bs, strict=True)
    ]
    cells = sorted({(c, b) for c, b, _ in rows})
    hits = 0
    for assignment in itertools.product(range(3), repeat=len(cells)):
        label = dict(zip(cells, assignment, strict=True))
        hits += sum(pred == label[(c, b)] for c, b, pred in rows) >= test.matches
    assert test.match_p_value == pytest.approx(hits / 3 ** len(cells), abs=1e-12)
    with pytest.raises(ValueError, match="two or more"):
        name_the_thief(thief, evidence, watermarks, groups=[["alice0"]])
    with pytest.raises(ValueError, match="known clients"):
        name_the_thief(thief, evidence, watermarks, groups=[["alice0", "mallory"]])
