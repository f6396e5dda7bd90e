"""The answer cache must be invisible: the same answers and ledger as a live API, always."""

import logging

import pytest
import torch

from mirage.api import InProcessAPI
from mirage.attacks import CloneSpec, create_attack
from mirage.bench.answers import AnswerCache, ReplayingAPI, answers_dir, server_fingerprint
from mirage.data import ImageData
from mirage.defenses import create_defense
from mirage.models import create_model
from mirage.models.fit import TrainConfig


@pytest.fixture
def model():
    torch.manual_seed(0)
    return create_model("lenet", (1, 28, 28), 10, [0.5], [0.5]).eval()


@pytest.fixture
def cache(tmp_path):
    return AnswerCache(tmp_path / "answers")


def noisy_api(model, epsilon=0.5):
    """A stateful defense: random noise draws from a generator that advances per request."""
    return InProcessAPI(model, create_defense("random_noise", epsilon=epsilon, seed=3))


def batches(seed, n=4, size=8):
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(size, 1, 28, 28, generator=generator) for _ in range(n)]


def answer(api, stream):
    return [api.query(x) for x in stream]


def test_a_replayed_stream_is_the_live_one_and_never_calls_the_defense(model, cache, monkeypatch):
    stream = batches(0)
    live = noisy_api(model)
    expected = answer(live, stream)

    first = ReplayingAPI(noisy_api(model), cache)
    assert all(torch.equal(a, b) for a, b in zip(answer(first, stream), expected, strict=True))
    assert first.replayed == 0 and first.close() is not None

    second_api = noisy_api(model)
    calls = []
    monkeypatch.setattr(second_api.defense, "perturb", lambda *a: calls.append(a))
    second = ReplayingAPI(second_api, cache)
    assert all(torch.equal(a, b) for a, b in zip(answer(second, stream), expected, strict=True))
    assert calls == [] and second.replayed == 32 and second.close() is None
    assert second.ledger.queries == live.ledger.queries
    assert second.ledger.l1_sum == pytest.approx(live.ledger.l1_sum)
    assert second.ledger.top1_kept == live.ledger.top1_kept


def test_a_diverging_stream_answers_as_an_uncached_api_would(model, cache):
    shared, tail = batches(0, n=2), batches(1, n=2)
    recorded = ReplayingAPI(noisy_api(model), cache)
    answer(recorded, shared + batches(2, n=2))
    recorded.close()

    diverging = ReplayingAPI(noisy_api(model), cache)
    got = answer(diverging, shared + tail)
    expected = answer(noisy_api(model), shared + tail)
    assert diverging.replayed == 0  # the stateful defense re-answered the shared prefix
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    assert diverging.close() is not None
    assert len(list(cache.root.rglob("*.pt"))) == 2


def test_a_prefix_of_a_cached_stream_is_replayed(model, cache):
    stream = batches(0)
    recorded = ReplayingAPI(noisy_api(model), cache)
    answer(recorded, stream)
    recorded.close()
    prefix = ReplayingAPI(noisy_api(model), cache)
    answer(prefix, stream[:2])
    assert prefix.replayed == 16 and prefix.close() is None


def test_another_server_never_shares_answers(model, cache):
    recorded = ReplayingAPI(noisy_api(model), cache)
    answer(recorded, batches(0))
    recorded.close()
    other_budget = ReplayingAPI(noisy_api(model, epsilon=0.25), cache)
    answer(other_budget, batches(0))
    assert other_budget.replayed == 0
    retrained = create_model("lenet", (1, 28, 28), 10, [0.5], [0.5]).eval()
    assert server_fingerprint(noisy_api(retrained)) != server_fingerprint(noisy_api(model))
    assert server_fingerprint(InProcessAPI(model)) != server_fingerprint(noisy_api(model))


def test_models_held_in_defense_params_are_fingerprinted_by_value(model):
    surrogate = create_model("lenet", (1, 28, 28), 10, [0.5], [0.5]).eval()
    api = InProcessAPI(model, create_defense("grad2", surrogate=surrogate, epsilon=0.5))
    before = server_fingerprint(api)
    with torch.no_grad():
        next(surrogate.parameters())[0].add_(1.0)
    assert server_fingerprint(api) != before


def test_an_unreadable_cache_file_is_skipped_with_a_warning(model, cache, caplog):
    stream = batches(0)
    recorded = ReplayingAPI(noisy_api(model), cache)
    expected = answer(recorded, stream)
    path = recorded.close()
    path.write_bytes(b"not a torch file")
    with caplog.at_level(logging.WARNING):
        again = ReplayingAPI(noisy_api(model), cache)
        got = answer(again, stream)
    assert again.replayed == 0 and "ignoring unreadable" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_bad_requests_are_refused_before_touching_the_cache(model, cache):
    api = ReplayingAPI(noisy_api(model), cache)
    with pytest.raises(ValueError):
        api.query(torch.rand(2, 3, 28, 28))
    with pytest.raises(ValueError):
        api.query(torch.full((2, 1, 28, 28), float("nan")))
    assert api.ledger.queries == 0 and api.close() is None
    with pytest.raises(ValueError, match="budget"):
        ReplayingAPI(InProcessAPI(model, query_budget=10), cache)


def test_the_hard_label_attacker_reuses_the_soft_label_transfer_set(model, cache):
    pool = ImageData(torch.rand(96, 1, 28, 28), torch.zeros(96, dtype=torch.long))
    clone = CloneSpec(training=TrainConfig(epochs=1, batch_size=32))
    soft = ReplayingAPI(noisy_api(model), cache)
    soft_result = create_attack("knockoff", query_batch_size=32).run(soft, 96, pool, clone, seed=0)
    soft.close()
    hard = ReplayingAPI(noisy_api(model), cache)
    hard_result = create_attack("knockoff", query_batch_size=32, hard_labels=True).run(
        hard, 96, pool, clone, seed=0
    )
    assert hard.replayed == 96 and hard_result.effective_l1 == pytest.approx(
        soft_result.effective_l1
    )


def test_the_cache_location_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MIRAGE_CACHE", str(tmp_path))
    monkeypatch.delenv("MIRAGE_ANSWERS", raising=False)
    assert answers_dir() == tmp_path / "answers"
    monkeypatch.setenv("MIRAGE_ANSWERS", "off")
    assert answers_dir() is None
    monkeypatch.setenv("MIRAGE_ANSWERS", str(tmp_path / "elsewhere"))
    assert answers_dir() == tmp_path / "elsewhere"


def test_a_change_to_the_answering_code_invalidates_the_cache(model, monkeypatch, tmp_path):
    import mirage
    from mirage.bench import answers

    before = server_fingerprint(noisy_api(model))
    fake_root = tmp_path / "mirage"
    for package in answers.ANSWERING_PACKAGES:
        (fake_root / package).mkdir(parents=True)
        (fake_root / package / "x.py").write_text("A = 1\n")
    monkeypatch.setattr(mirage, "__file__", str(fake_root / "__init__.py"))
    answers._code_fingerprint.cache_clear()
    try:
        one = server_fingerprint(noisy_api(model))
        (fake_root / "models" / "x.py").write_text("A = 2\n")
        answers._code_fingerprint.cache_clear()
        assert server_fingerprint(noisy_api(model)) not in {one, before}
    finally:
        answers._code_fingerprint.cache_clear()


def test_a_cached_answer_of_the_wrong_shape_is_not_served(model, cache, caplog):
    stream = batches(0)
    recorded = ReplayingAPI(noisy_api(model), cache)
    expected = answer(recorded, stream)
    path = recorded.close()
    saved = torch.load(path, weights_only=True)
    saved["answers"][1] = saved["answers"][1][:3]
    torch.save(saved, path)
    with caplog.at_level(logging.WARNING):
        again = ReplayingAPI(noisy_api(model), cache)
        got = answer(again, stream)
    assert again.replayed == 0 and "answering live" in caplog.text  # stateful: prefix re-answered
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_a_stateless_defense_keeps_the_shared_prefix_without_re_answering_it(
    model, cache, monkeypatch
):
    def rounding_api():
        return InProcessAPI(model, create_defense("rounding", decimals=2))

    shared = batches(0, n=2)
    recorded = ReplayingAPI(rounding_api(), cache)
    answer(recorded, shared + batches(2, n=2))
    recorded.close()
    live = rounding_api()
    calls = []
    perturb = live.defense.perturb
    monkeypatch.setattr(live.defense, "perturb", lambda x, p: calls.append(len(p)) or perturb(x, p))
    diverging = ReplayingAPI(live, cache)
    got = answer(diverging, shared + batches(1, n=2))
    assert diverging.replayed == 16 and calls == [8, 8]  # only the two new requests reach it
    expected = answer(rounding_api(), shared + batches(1, n=2))
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_defenses_declare_whether_earlier_requests_change_their_answers(model):
    one = create_model("lenet", (1, 28, 28), 10, [0.5], [0.5])
    two = create_model("lenet", (1, 28, 28), 10, [0.5], [0.5])
    assert create_defense("random_noise").contract.stateful
    assert create_defense("grad2", surrogate=[one, two]).contract.stateful
    assert not create_defense("grad2", surrogate=one).contract.stateful
    assert create_defense("mad", oracle="random", jacobian="identity").contract.stateful
    assert not create_defense("mad", surrogate=one).contract.stateful
    assert not create_defense("mad_argmax", surrogate=one).contract.stateful
    for name in ("none", "argmax", "top_k", "rounding", "reverse_sigmoid", "modelguard"):
        assert not create_defense(name).contract.stateful, name


def test_odd_parameter_values_are_fingerprinted_or_refused_clearly():
    import numpy as np

    from mirage.bench.answers import _describe

    assert _describe({"a": np.float32(0.5), "b": np.arange(3)}) == _describe(
        {"a": 0.5, "b": torch.arange(3)}
    )
    with pytest.raises(TypeError, match="cannot fingerprint"):
        _describe(object())
