"""PRADA against a plain reimplementation of Juuti et al.'s Algorithm 1, and on real streams."""

import numpy as np
import pytest
import torch
from scipy.stats import shapiro

from mirage.api.detection import PradaConfig, PradaDetector, shapiro_w
from mirage.data import load_dataset
from mirage.models import create_model


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def victim(digits):
    torch.manual_seed(0)
    return create_model("lenet", digits.input_shape, 10, digits.mean, digits.std).eval()


def reference_prada(xs, labels, delta, min_distances):
    """Algorithm 1, one query at a time, lists and numpy only (no memory bound)."""
    growing, admitted, thresholds, distances = {}, {}, {}, []
    alarm_at = None
    for n, (x, c) in enumerate(zip(xs, labels, strict=True), 1):
        if not growing.get(c):
            growing[c] = [x]
            admitted[c] = []
            continue
        d = min(float(np.linalg.norm(x - y)) for y in growing[c])
        distances.append(d)
        t = thresholds.get(c, 0.0)
        if len(admitted[c]) >= 2:
            t = max(t, float(np.mean(admitted[c]) - np.std(admitted[c])))
        thresholds[c] = t
        if d > t:
            growing[c].append(x)
            admitted[c].append(d)
        if (
            len(distances) >= min_distances
            and alarm_at is None
            and shapiro(distances).statistic < delta
        ):
            alarm_at = n
    return growing, distances, alarm_at


def test_one_query_at_a_time_matches_the_reference():
    rng = np.random.default_rng(0)
    xs = rng.random((300, 1, 4, 4)).astype(np.float32)
    xs[150:] = xs[:150] + 0.01 * rng.standard_normal((150, 1, 4, 4)).astype(
        np.float32
    )  # synthetic half
    labels = rng.integers(0, 3, 300)
    config = PradaConfig(delta=0.9, min_distances=20, window=5000, max_stored=5000)
    detector = PradaDetector(config)
    for x, c in zip(xs, labels, strict=True):
        state = detector.observe("a", torch.from_numpy(x[None]), torch.tensor([c]))
    growing, distances, alarm_at = reference_prada(
        [x.reshape(-1) for x in xs], labels.tolist(), 0.9, 20
    )
    np.testing.assert_allclose(np.array(state.distances), np.array(distances), rtol=1e-5)
    assert {c: len(v) for c, v in state.stored.items()} == {c: len(v) for c, v in growing.items()}
    assert state.alarm_at == alarm_at is not None


def test_a_single_class_request_equals_its_queries_one_by_one():
    x = torch.rand(64, 1, 5, 5, generator=torch.Generator().manual_seed(1))
    labels = torch.zeros(64, dtype=torch.long)
    batched, single = PradaDetector(), PradaDetector()
    state = batched.observe("a", x, labels)
    for i in range(64):
        one = single.observe("a", x[i : i + 1], labels[i : i + 1])
    assert list(state.distances) == pytest.approx(list(one.distances), rel=1e-5)
    assert len(state.stored[0]) == len(one.stored[0])


def test_memory_is_bounded_and_clients_are_apart():
    detector = PradaDetector(PradaConfig(max_stored=50, window=40, min_distances=10))
    generator = torch.Generator().manual_seed(2)
    for _ in range(10):
        detector.observe(
            "a",
            torch.rand(100, 1, 4, 4, generator=generator),
            torch.randint(0, 4, (100,), generator=generator),
        )
    a = detector.state("a")
    assert sum(len(v) for v in a.stored.values()) == 50 == len(a.order)
    assert len(a.distances) == 40 and a.queries == 1000
    assert detector.state("b").queries == 0  # another key sees nothing of a's stream
    with pytest.raises(ValueError, match="labels"):
        detector.observe("a", torch.rand(3, 1, 4, 4), torch.zeros(2, dtype=torch.long))


def test_natural_images_pass_and_jacobian_steps_alarm(digits, victim):
    detector = PradaDetector(PradaConfig(delta=0.9))
    with torch.no_grad():
        labels = victim(digits.test.images).argmax(1)
    benign = detector.observe("benign", digits.test.images, labels)
    assert benign.alarm_at is None and benign.statistic > 0.9
    # JBDA-like: 20 seeds, then each round a ±0.1 sign step of every image so far (the set doubles)
    synthetic = digits.test.images[:20]
    generator = torch.Generator().manual_seed(0)
    for _ in range(4):
        signs = torch.sign(torch.randn(synthetic.shape, generator=generator))
        synthetic = torch.cat([synthetic, (synthetic + 0.1 * signs).clamp(0, 1)])
    for chunk in synthetic.split(20):
        with torch.no_grad():
            state = detector.observe("thief", chunk, victim(chunk).argmax(1))
    assert state.alarm_at is not None and state.alarm_at <= len(synthetic)


def test_shapiro_w_of_a_constant_sample_is_one():
    assert shapiro_w(np.ones(10)) == 1.0


def _jbda_like(images, rounds=4, seed=0):
    synthetic = images
    generator = torch.Generator().manual_seed(seed)
    for _ in range(rounds):
        signs = torch.sign(torch.randn(synthetic.shape, generator=generator))
        synthetic = torch.cat([synthetic, (synthetic + 0.1 * signs).clamp(0, 1)])
    return synthetic


@pytest.mark.parametrize("action", ["flag", "refuse", "switch"])
def test_the_api_acts_on_an_alarm_for_that_client_only(digits, victim, action):
    from mirage.api import InProcessAPI, QueryRefused
    from mirage.defenses import create_defense

    detector = PradaDetector(PradaConfig(delta=0.9))
    strong = create_defense("argmax")
    thief = InProcessAPI(
        victim,
        None,
        detector=detector,
        client="thief",
        on_alarm=action,
        alarm_defense=strong,
        batch_size=20,
    )
    benign = InProcessAPI(
        victim, None, detector=detector, client="benign", on_alarm=action, alarm_defense=strong
    )
    thief.query(_jbda_like(digits.test.images[:20]))
    benign.query(digits.test.images)
    assert thief.alarmed and not benign.alarmed
    x = digits.test.images[:5]
    if action == "refuse":
        spent = thief.queries_used
        with pytest.raises(QueryRefused):
            thief.query(x)
        assert thief.queries_used == spent
    else:
        answers = thief.query(x)
        one_hot = bool((answers.max(1).values == 1).all())
        assert one_hot == (action == "switch")
    assert benign.query(x).max(1).values.lt(1).all()  # the benign client keeps soft answers
    with pytest.raises(ValueError, match="alarm_defense"):
        InProcessAPI(victim, None, detector=detector, on_alarm="switch")
