"""The keyed watermark: keys, stable buckets, the swap, and the wrapper defense's contract."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from mirage.attacks.base import jitter_images
from mirage.defenses import DefenseInvariantError, create_defense
from mirage.ownership import Evidence, KeyedWatermark, WatermarkConfig, derive_key, fourier_features
from mirage.ownership.watermark import answer_pair

SECRET = b"0123456789abcdef-server-secret"


def images(n: int, seed: int = 0) -> torch.Tensor:
    """Blurry blobs on a dark background, like the digits and garments a victim sees."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 28, 28, generator=g) ** 3
    x = torch.nn.functional.avg_pool2d(x, 5, stride=1, padding=2)
    return (x * torch.rand(n, 1, 1, 1, generator=g) * 3).clamp(0, 1)


class Memorised(torch.nn.Module):
    """A suspect that answers each of ``images`` with its row of ``answers`` (nearest image)."""

    def __init__(self, answers: torch.Tensor, images: torch.Tensor) -> None:
        super().__init__()
        self.answers, self.images = answers, images

    def forward(self, z):
        return (
            self.answers[torch.cdist(z.flatten(1), self.images.flatten(1)).argmin(1)]
            .clamp_min(1e-6)
            .log()
        )


def test_keys_are_per_client_and_deterministic():
    assert derive_key(SECRET, "alice") == derive_key(SECRET, "alice")
    assert len({derive_key(SECRET, c) for c in ("alice", "bob", "carol")}) == 3
    assert derive_key(SECRET, "alice") != derive_key(SECRET + b"!", "alice")
    with pytest.raises(ValueError, match="16 bytes"):
        derive_key(b"short", "alice")
    with pytest.raises(ValueError, match="16 bytes"):
        KeyedWatermark(b"short", 10)


def test_marks_are_keyed_inside_their_cell_and_shift_invariant():
    x = images(4000)
    config = WatermarkConfig(bucket_fraction=0.5)
    alice = KeyedWatermark(derive_key(SECRET, "alice"), 10, config)
    marks = alice.marks(x)
    _, margin = alice.cells(x)
    assert marks.carried.any()
    assert (margin[marks.carried] >= config.margin).all()  # only rows inside their cell
    assert ((marks.labels >= 0) == marks.carried).all() and (marks.labels < 10).all()
    assert all(
        alice.label_of(b) == int(y)
        for b, y, c in zip(marks.buckets, marks.labels, marks.carried)
        if c
    )
    # Fourier magnitudes ignore circular shifts: the same rows carry the same labels.
    rolled = alice.marks(torch.roll(x, shifts=(2, -3), dims=(2, 3)))
    assert torch.equal(rolled.carried, marks.carried) and torch.equal(rolled.labels, marks.labels)
    # another key selects other buckets and labels
    bob = KeyedWatermark(derive_key(SECRET, "bob"), 10, config).marks(x)
    assert not torch.equal(bob.carried, marks.carried)
    # about bucket_fraction of the inside rows carry it (a binomial over buckets: loose bounds)
    inside = (margin >= config.margin).sum().item()
    assert 0.2 < marks.carried.sum().item() / inside < 0.8


def test_jittered_copies_of_carried_queries_keep_bucket_and_label():
    """Query averaging's jitter (±1 px shifts with zero fill, σ 0.02 noise) leaves most carried
    Fashion-MNIST queries in their bucket, and most inside it by the margin (bounds with slack
    below what results/ownership measured)."""
    from mirage.data import load_dataset

    x = load_dataset("fmnist").train.images[:6000].float()
    watermark = KeyedWatermark(
        derive_key(SECRET, "alice"), 10, WatermarkConfig(bucket_fraction=1.0)
    )
    marks = watermark.marks(x)
    rows = torch.nonzero(marks.carried).flatten()
    copies = jitter_images(x[rows], 0.02, torch.Generator().manual_seed(0))
    cells, _ = watermark.cells(x[rows])
    same_cell = (watermark.cells(copies)[0] == cells).all(dim=1)
    assert same_cell.float().mean() > 0.9  # bucket, hence label, kept
    assert watermark.marks(copies).carried.float().mean() > 0.5  # and inside by the margin


def test_apply_swaps_top1_to_the_keyed_label_and_stays_on_the_simplex():
    x = images(2000)
    watermark = KeyedWatermark(
        derive_key(SECRET, "alice"), 10, WatermarkConfig(bucket_fraction=1.0)
    )
    probs = torch.softmax(
        torch.randn(2000, 10, generator=torch.Generator().manual_seed(3)) * 3, dim=1
    )
    served, marks = watermark.apply(x, probs)
    c = marks.carried
    assert c.sum() > 20
    assert torch.equal(served[~c], probs[~c])
    assert torch.equal(served[c].argmax(1), marks.labels[c])
    assert torch.allclose(served.sum(1), torch.ones(2000))
    assert torch.equal(served.sort(1).values, probs.sort(1).values)  # a permutation of each row
    with pytest.raises(ValueError, match="served must be"):
        watermark.apply(x, probs[:, :9])


def test_sharpen_moves_its_share_of_a_carried_answer_to_the_keyed_label():
    x = images(2000)
    probs = torch.softmax(torch.randn(2000, 10, generator=torch.Generator().manual_seed(3)), dim=1)
    swap = KeyedWatermark(derive_key(SECRET, "alice"), 10, WatermarkConfig(bucket_fraction=1.0))
    sharp = KeyedWatermark(
        derive_key(SECRET, "alice"), 10, WatermarkConfig(bucket_fraction=1.0, sharpen=0.6)
    )
    swapped, marks = swap.apply(x, probs)
    served, _ = sharp.apply(x, probs)
    c = marks.carried
    expected = 0.4 * swapped[c] + 0.6 * torch.nn.functional.one_hot(marks.labels[c], 10)
    assert torch.allclose(served[c], expected) and torch.equal(served[~c], probs[~c])
    assert torch.allclose(served.sum(1), torch.ones(2000)) and (served >= 0).all()
    lead = (
        served[c].gather(1, marks.labels[c, None]).squeeze(1)
        - served[c].topk(2, dim=1).values[:, 1]
    )
    assert (lead >= 0.6 - 1e-6).all()  # the keyed label leads by at least the share


def test_evidence_margin_keeps_only_the_deep_carried_rows_and_their_jittered_copies_stay_carried():
    from mirage.data import load_dataset

    x = load_dataset("fmnist").train.images[:6000].float()
    config = WatermarkConfig(bucket_fraction=1.0, margin=0.1, evidence_margin=0.2)
    watermark = KeyedWatermark(derive_key(SECRET, "alice"), 10, config)
    marks = watermark.marks(x)
    _, margin = watermark.cells(x)
    assert torch.equal(marks.kept, marks.carried & (margin >= 0.2)) and marks.kept.any()
    assert marks.carried.sum() > marks.kept.sum()
    rows = torch.nonzero(marks.kept).flatten()
    copies = jitter_images(x[rows], 0.02, torch.Generator().manual_seed(0))
    again = watermark.marks(copies)
    # a deep row's copy is answered with the same keyed label far more often than without the gap
    kept_label = again.carried & (again.labels == marks.labels[rows])
    no_gap = KeyedWatermark(
        derive_key(SECRET, "alice"), 10, WatermarkConfig(bucket_fraction=1.0, margin=0.2)
    )
    plain = no_gap.marks(copies).carried.float().mean()
    assert kept_label.float().mean() > 0.9 > plain
    evidence = Evidence()
    assert evidence.add("alice", x, marks) == int(marks.kept.sum())
    with pytest.raises(ValueError, match="evidence_margin"):
        WatermarkConfig(margin=0.2, evidence_margin=0.1)


def test_watermarked_defense_wraps_any_defense_and_records_evidence():
    x = images(1500)
    probs = torch.softmax(
        torch.randn(1500, 10, generator=torch.Generator().manual_seed(4)) * 3, dim=1
    )
    evidence = Evidence(max_items=50)
    inner = create_defense("reverse_sigmoid", beta=0.64)
    defense = create_defense(
        "watermarked",
        inner=inner,
        key=derive_key(SECRET, "bob"),
        client="bob",
        config=WatermarkConfig(bucket_fraction=1.0),
        evidence=evidence,
    )
    assert defense.contract.needs_input and not defense.contract.keeps_top1
    assert defense.contract.stateful == inner.contract.stateful
    served = defense(x, probs)
    marks = defense.watermarks(10)["bob"].marks(x)
    assert torch.allclose(served[~marks.carried], inner(x[~marks.carried], probs[~marks.carried]))
    stored, buckets, _ = evidence.items("bob")
    assert evidence.clients() == ["bob"] and len(buckets) == 50  # bounded
    defense(x, probs)  # the same images again:
    assert len(evidence.items("bob")[1]) == 50  # nothing counted twice
    assert stored.shape == (50, 1, 28, 28)
    with pytest.raises(ValueError, match="needs the query images"):
        defense(None, probs)
    with pytest.raises(ValueError):
        create_defense("watermarked", inner="mad", key=derive_key(SECRET, "bob"))


def test_watermarked_contract_is_enforced():
    """The wrapper's output is still checked by Defense.__call__ (simplex)."""
    defense = create_defense("watermarked", key=derive_key(SECRET, "bob"))
    with pytest.raises(DefenseInvariantError):
        defense.check_output(torch.full((2, 3), 1 / 3), torch.full((2, 3), 0.5))


def test_density_cap_leaves_dense_reference_buckets_unselected():
    """Against a slow reference (a Python count per cell): no row whose cell holds more than
    density_cap of the reference images carries, every other row is selected exactly as without
    the cap, and verification (label_of) needs no reference."""
    from collections import Counter

    reference, queries = images(3000, seed=1), images(3000, seed=2)
    key = derive_key(SECRET, "alice")
    config = WatermarkConfig(bucket_fraction=1.0, density_cap=2e-3)
    capped = KeyedWatermark(key, 10, config, reference)
    uncapped = KeyedWatermark(key, 10, WatermarkConfig(bucket_fraction=1.0))
    counts = Counter(tuple(c) for c in capped.cells(reference)[0].tolist())
    dense = {cell for cell, n in counts.items() if n > 2e-3 * len(reference)}
    assert dense and len(dense) < len(counts)  # the cap bites, and not everywhere
    assert dense == {
        tuple(int.from_bytes(b[i : i + 8], "little", signed=True) for i in range(0, len(b), 8))
        for b in capped.dense_cells(reference)
    }
    # the key-independent features, computed once, give the same cells as the images
    assert capped.dense_cells(fourier_features(reference, config)) == capped.dense_cells(reference)
    with pytest.raises(ValueError, match="features"):
        capped.dense_cells(torch.zeros(5, 3, dtype=torch.float64))
    cells = [tuple(c) for c in capped.cells(queries)[0].tolist()]
    with_cap, without = capped.marks(queries), uncapped.marks(queries)
    in_dense = torch.tensor([c in dense for c in cells])
    assert in_dense[without.carried].any()  # some rows the cap takes away …
    assert not with_cap.carried[in_dense].any()  # … are not carried
    assert torch.equal(with_cap.carried, without.carried & ~in_dense)
    assert torch.equal(with_cap.labels[with_cap.carried], without.labels[with_cap.carried])
    # the verifier regenerates labels without the reference
    verifier = KeyedWatermark(key, 10, config)
    assert all(
        verifier.label_of(b) == int(y)
        for b, y, c in zip(with_cap.buckets, with_cap.labels, with_cap.carried, strict=True)
        if c
    )
    with pytest.raises(ValueError, match="reference"):
        verifier.marks(queries)


def test_density_cap_needs_reference_images_wherever_it_is_configured():

    from mirage.serve.config import OwnershipConfig

    config = WatermarkConfig(density_cap=1e-4)
    with pytest.raises(ValidationError, match="reference"):
        create_defense("watermarked", key=derive_key(SECRET, "alice"), config=config)
    with pytest.raises(ValidationError, match="reference"):
        create_defense(
            "watermarked",
            key=derive_key(SECRET, "alice"),
            config=config,
            benign_reference=torch.zeros(3, 28, 28),
        )
    with pytest.raises(ValidationError, match="features must be"):
        create_defense(
            "watermarked",
            key=derive_key(SECRET, "alice"),
            config=config,
            benign_reference=torch.zeros(3, 5, dtype=torch.float64),
        )
    with pytest.raises(ValidationError, match="float"):
        create_defense(
            "watermarked",
            key=derive_key(SECRET, "alice"),
            config=config,
            benign_reference=torch.zeros(3, 1, 28, 28, dtype=torch.uint8),
        )
    with pytest.raises(ValidationError, match="reference"):
        OwnershipConfig(watermark=config)
    assert OwnershipConfig(watermark=config, reference="digits").reference == "digits"
    with pytest.raises(ValidationError):
        WatermarkConfig(density_cap=-0.1)
    defense = create_defense(
        "watermarked", key=derive_key(SECRET, "alice"), config=config, benign_reference=images(500)
    )
    probs = torch.softmax(torch.randn(64, 10), 1)
    served = defense(images(64, seed=3), probs)
    assert torch.allclose(served.sum(1), torch.ones(64))


def test_keyed_ranks_put_the_answers_keyed_jth_class_on_top():
    """ranked = m: the carried answer's top-1 is the served answer's j-th class, j = 2 + PRF mod
    (m − 1), against a per-row reference; nothing else moves but the swap."""
    x = images(3000, seed=4)
    config = WatermarkConfig(bucket_fraction=1.0, ranked=4)
    alice = KeyedWatermark(derive_key(SECRET, "alice"), 10, config)
    served = torch.softmax(
        torch.randn(len(x), 10, generator=torch.Generator().manual_seed(5)) * 2, 1
    )
    out, marks = alice.apply(x, served)
    assert marks.carried.sum() > 20
    for row in torch.nonzero(marks.carried).flatten().tolist():
        j = 1 + alice.label_of(marks.buckets[row])  # 0-based rank 1 … 3
        assert 1 <= j <= 3
        keyed = sorted(range(10), key=lambda c: -float(served[row, c]))[j]
        assert marks.labels[row] == keyed and out[row].argmax() == keyed
        assert torch.allclose(out[row].sort().values, served[row].sort().values)  # a swap
    assert torch.equal(out[~marks.carried], served[~marks.carried])
    with pytest.raises(ValueError, match="served answers"):
        alice.marks(x)
    with pytest.raises(ValueError, match="at most the number of classes"):
        KeyedWatermark(derive_key(SECRET, "alice"), 3, config)


def test_tie_gap_carries_only_near_ties_and_leaves_the_rest_of_the_selection_alone():
    """tie_gap = g: the carried rows are the ungated watermark's carried rows whose served top and
    m-th probabilities differ by at most g (a per-row reference); a carried answer passes the
    same gate (a swap keeps the set of probabilities) and moves at most 2g of mass."""
    x = images(3000, seed=6)
    served = torch.softmax(
        torch.randn(len(x), 10, generator=torch.Generator().manual_seed(7)) * 1.5, 1
    )
    key = derive_key(SECRET, "alice")
    ungated = KeyedWatermark(key, 10, WatermarkConfig(bucket_fraction=1.0, ranked=3)).marks(
        x, served
    )
    gated = KeyedWatermark(key, 10, WatermarkConfig(bucket_fraction=1.0, ranked=3, tie_gap=0.3))
    out, marks = gated.apply(x, served)
    expected = []
    for row in range(len(x)):
        ordered = sorted(served[row].tolist(), reverse=True)
        expected.append(bool(ungated.carried[row]) and ordered[0] - ordered[2] <= 0.3)
    assert marks.carried.tolist() == expected
    assert 10 < marks.carried.sum() < ungated.carried.sum()
    assert torch.equal(marks.labels[marks.carried], ungated.labels[marks.carried])
    top = out[marks.carried].topk(3, dim=1).values
    assert (top[:, 0] - top[:, 2] <= 0.3 + 1e-6).all()
    assert ((out - served).abs().sum(1) <= 2 * 0.3 + 1e-6).all()


def test_answer_buckets_relabel_each_pair_of_top_classes_consistently():
    """buckets = "answer": the bucket is the served answer's unordered top-2 classes, so every
    near-tie (tie_gap on the top two) with the same pair gets the same keyed label, against a
    per-row reference; the image itself plays no part."""
    x = images(2000, seed=8)
    served = torch.softmax(
        torch.randn(len(x), 10, generator=torch.Generator().manual_seed(9)) * 1.5, 1
    )
    config = WatermarkConfig(buckets="answer", bucket_fraction=1.0, tie_gap=0.2)
    alice = KeyedWatermark(derive_key(SECRET, "alice"), 10, config)
    out, marks = alice.apply(x, served)
    label_of_pair, bucket_of_pair = {}, {}
    for row in range(len(x)):
        (p1, p2), (a, b) = served[row].topk(2).values.tolist(), served[row].topk(2).indices.tolist()
        assert bool(marks.carried[row]) == (p1 - p2 <= 0.2)
        if marks.carried[row]:
            pair = (min(a, b), max(a, b))
            assert bucket_of_pair.setdefault(pair, marks.buckets[row]) == marks.buckets[row]
            assert label_of_pair.setdefault(pair, int(marks.labels[row])) == int(marks.labels[row])
            outside = [c for c in range(10) if c not in pair]  # the label is neither of the pair
            assert answer_pair(marks.buckets[row]) == pair
            assert (
                outside[alice.label_of(marks.buckets[row])]
                == marks.labels[row]
                == out[row].argmax()
            )
    assert len(set(bucket_of_pair.values())) == len(bucket_of_pair) > 20
    assert torch.equal(marks.kept, marks.carried)
    shuffled = alice.marks(x.flip(0), served)  # the image plays no part
    assert torch.equal(shuffled.carried, marks.carried) and shuffled.buckets == marks.buckets
    bob = KeyedWatermark(derive_key(SECRET, "bob"), 10, config).marks(x, served)
    assert (bob.labels[marks.carried] != marks.labels[marks.carried]).float().mean() > 0.7
    with pytest.raises(ValueError, match="served answers"):
        alice.marks(x)
    with pytest.raises(ValidationError, match="Fourier cells"):
        WatermarkConfig(buckets="answer", density_cap=1e-4)
    with pytest.raises(ValidationError, match="not with ranked"):
        WatermarkConfig(buckets="answer", ranked=3)
    with pytest.raises(ValueError, match="not an answer bucket"):
        answer_pair("00ff")
    # the test: a model that learnt the labels is named at (1/8) per bucket; one that ranks like
    # the victim (the pair on top, the rest in class order) matches no label
    from mirage.ownership import verify_key

    kept = torch.nonzero(marks.carried).flatten()
    buckets = [marks.buckets[r] for r in kept.tolist()]

    thief = verify_key(Memorised(out[kept], x[kept]), alice, x[kept], buckets)
    assert thief.named and thief.p_value == pytest.approx(8.0**-thief.buckets, rel=1e-6)
    honest = verify_key(Memorised(served[kept], x[kept]), alice, x[kept], buckets)
    assert not honest.named and honest.matches == 0


def test_templates_serve_a_carried_answer_as_a_recent_confident_answer_of_its_keyed_class():
    """template = t: once a class has uncarried answers confident in it, a carried answer of that
    class is made from them (confident in the keyed class, within the log-space hull of two of
    them plus noise, never a repeat); before that, the swap."""
    x = images(3000, seed=10)
    logits = torch.randn(len(x), 10, generator=torch.Generator().manual_seed(11)) * 4
    served = torch.softmax(logits, 1)
    config = WatermarkConfig(buckets="answer", bucket_fraction=1.0, tie_gap=0.3, template=0.9)
    alice = KeyedWatermark(derive_key(SECRET, "alice"), 10, config)
    swapped, _ = KeyedWatermark(
        derive_key(SECRET, "alice"), 10, config.model_copy(update={"template": None})
    ).apply(x[:1500], served[:1500])
    _, marks = alice.apply(x[:1500], served[:1500])
    seen = served[:1500][~marks.carried]
    confident = seen[seen.max(1).values >= 0.9]
    out, later = alice.apply(x[1500:], served[1500:])
    assert later.carried.sum() > 20
    for row in torch.nonzero(later.carried).flatten().tolist():
        label = int(later.labels[row])
        assert out[row].argmax() == label and out[row].max() > 0.5
        bank = torch.cat([confident, served[1500:][~later.carried]])
        bank = bank[bank.argmax(1) == label]
        assert (bank - out[row]).abs().sum(1).min() > 1e-6  # no repeat of an answer
        assert (
            out[row].log().sub(bank.log()).abs().max(1).values.min() < 8
        )  # but near the class's ones
    # a fresh key that has seen only near-ties has no template: it swaps
    near = torch.nonzero(marks.carried).flatten()
    fresh = KeyedWatermark(derive_key(SECRET, "alice"), 10, config)
    assert torch.equal(fresh.apply(x[near], served[near])[0], swapped[near])
    with pytest.raises(ValidationError):
        WatermarkConfig(template=0.4)


def test_template_bank_keeps_each_classs_latest_confident_answers_like_a_loop():
    """The vectorised ring of templates against writing the answers one by one, over batches that
    overflow a class's ring."""
    from mirage.ownership.watermark import TEMPLATES

    config = WatermarkConfig(buckets="answer", tie_gap=0.3, template=0.9)
    bank = KeyedWatermark(derive_key(SECRET, "alice"), 4, config)
    templates, counts = torch.zeros(4, TEMPLATES, 4), torch.zeros(4, dtype=torch.long)
    generator = torch.Generator().manual_seed(12)
    for size in (10, 300, 1, 0, 90):
        answers = torch.softmax(torch.randn(size, 4, generator=generator) * 5, 1)
        bank._keep_templates(answers)
        for answer in answers[answers.max(1).values >= 0.9]:
            c = int(answer.argmax())
            templates[c, counts[c] % TEMPLATES] = answer
            counts[c] += 1
        assert torch.equal(bank._template_count, counts) and torch.equal(bank._templates, templates)
    assert counts.max() > TEMPLATES


def test_templates_make_the_watermarked_defense_stateful():
    key = derive_key(SECRET, "alice")
    swap = create_defense(
        "watermarked", key=key, config=WatermarkConfig(buckets="answer", tie_gap=0.3)
    )
    templated = create_defense(
        "watermarked", key=key, config=WatermarkConfig(buckets="answer", tie_gap=0.3, template=0.9)
    )
    assert not swap.contract.stateful and templated.contract.stateful


def test_a_keyed_runner_up_keeps_the_top1_and_moves_the_keyed_class_second():
    """place = "second": on a carried row the keyed class (outside the answer's top two) takes the
    runner-up's probability, then ``sharpen`` of the mass, and the top-1 never changes; a row is
    carried only if its top-1 would stay on top. Against a per-row reference."""
    x = images(1500, seed=12)
    served = torch.softmax(
        torch.randn(len(x), 10, generator=torch.Generator().manual_seed(13)) * 2.5, 1
    )
    share = 0.1
    config = WatermarkConfig(buckets="answer", bucket_fraction=1.0, place="second", sharpen=share)
    alice = KeyedWatermark(derive_key(SECRET, "alice"), 10, config)
    out, marks = alice.apply(x, served)
    assert torch.equal(out.argmax(1), served.argmax(1))
    assert torch.allclose(out.sum(1), torch.ones(len(x))) and (out >= 0).all()
    for row in range(len(x)):
        p = served[row]
        (p1, p2), (a, b) = p.topk(2).values.tolist(), p.topk(2).indices.tolist()
        assert bool(marks.carried[row]) == ((1 - share) * (p1 - p2) > share)
        if not marks.carried[row]:
            assert torch.equal(out[row], p)
            continue
        outside = [c for c in range(10) if c not in (a, b)]
        keyed = outside[alice.label_of(marks.buckets[row])]
        assert keyed == marks.labels[row] and answer_pair(marks.buckets[row]) == (
            min(a, b),
            max(a, b),
        )
        expected = p.clone()
        expected[keyed], expected[b] = p[b], p[keyed]
        expected = (1 - share) * expected + share * torch.nn.functional.one_hot(
            torch.tensor(keyed), 10
        )
        assert torch.allclose(out[row], expected, atol=1e-6)
        assert out[row].topk(2).indices.tolist() == [a, keyed]
    assert 0.5 < marks.carried.float().mean() < 1
    for bad in ({"buckets": "fourier"}, {"template": 0.9}, {"tie_gap": 0.3}):
        with pytest.raises(ValidationError, match="runner-up"):
            WatermarkConfig(**{"buckets": "answer", "place": "second", "sharpen": 0.1, **bad})
    # a model that learnt the rule (its runner-up is the keyed class) is named by the rank; the
    # answers it learnt from, before the watermark, are not
    from mirage.ownership import verify_key

    kept = torch.nonzero(marks.carried).flatten()
    buckets = [marks.buckets[r] for r in kept.tolist()]

    thief = verify_key(Memorised(out[kept], x[kept]), alice, x[kept], buckets)
    assert thief.named and thief.matches == 0  # named by the runner-up, never the argmax
    honest = verify_key(Memorised(served[kept], x[kept]), alice, x[kept], buckets)
    assert not honest.named


def test_layers_each_have_their_own_key_and_evidence_set_and_compose_in_order():
    """A list of configs is a stack: layer i ≥ 1 has its own key (layer 0 the client's), records in
    ``client#i``, and sees the answer the layer below served."""
    from mirage.ownership import layer_key, layer_name, layered_watermarks

    x = images(1200, seed=14)
    probs = torch.softmax(
        torch.randn(len(x), 10, generator=torch.Generator().manual_seed(15)) * 3, dim=1
    )
    layers = [
        WatermarkConfig(bucket_fraction=1.0),
        WatermarkConfig(buckets="answer", bucket_fraction=1.0, place="second", sharpen=0.1),
    ]
    key = derive_key(SECRET, "bob")
    assert layer_key(key, 0) == key and len({layer_key(key, i) for i in range(3)}) == 3
    assert [layer_name("bob", i) for i in range(3)] == ["bob", "bob#1", "bob#2"]
    evidence = Evidence(max_items=10_000)
    defense = create_defense(
        "watermarked",
        key=key,
        client="bob",
        config=[c.model_dump() for c in layers],
        evidence=evidence,
    )
    served = defense(x, probs)
    reference = layered_watermarks(key, "bob", layers, 10)
    assert list(reference) == ["bob", "bob#1"]
    step, marks = probs, {}
    for name, watermark in reference.items():
        step, marks[name] = watermark.apply(x, step)
    assert torch.allclose(served, step)
    assert evidence.clients() == ["bob", "bob#1"]
    assert len(evidence.items("bob")[1]) == int(marks["bob"].carried.sum()) > 0
    assert len(evidence.items("bob#1")[1]) == int(marks["bob#1"].carried.sum()) > 0
    # a single config is the one-layer stack, keyed and recorded as before layers
    single = create_defense("watermarked", key=key, client="bob", config=layers[0])
    assert single.params.config == (layers[0],)
    assert torch.allclose(single(x, probs), reference["bob"].apply(x, probs)[0])
    with pytest.raises(ValueError, match="at least one layer"):
        create_defense("watermarked", key=key, config=[])
    # layers with density_cap share one set of reference features: the same frequencies and floor
    mismatched = [{"density_cap": 1e-3}, {"density_cap": 1e-3, "floor": 0.2}]
    with pytest.raises(ValueError, match="share frequencies and floor"):
        create_defense("watermarked", key=key, config=mismatched, benign_reference=x)
