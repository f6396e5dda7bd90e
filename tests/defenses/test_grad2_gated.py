"""GRAD² gated on an OOD score: each row goes to the branch its gate score says, and is exactly
what that branch alone would serve; the threshold meets its benign false-positive rate."""

import pytest
import torch

from mirage.defenses import DEFENSES, create_defense
from mirage.defenses.base import strict_top1_kept
from mirage.defenses.grad2 import benign_threshold, gate_scores, keyed_query_permutations
from mirage.models import create_model


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    surrogate = create_model("lenet", (1, 8, 8), 10, (0.3,), (0.3,)).eval()
    victim = create_model("lenet", (1, 8, 8), 10, (0.3,), (0.3,)).eval()
    return surrogate, victim


def _batch(victim, n=64, seed=1):
    x = torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        probs = torch.softmax(victim(x) * 3, 1)
    return x, probs


def test_rows_are_served_by_their_branch_exactly(nets):
    surrogate, victim = nets
    x, probs = _batch(victim)
    tau = float(probs.max(1).values.median())
    common = {"target": "max-norm", "surrogate": surrogate}
    gated = create_defense("grad2_gated", tau=tau, epsilon_low=0.3, epsilon_high=1.5, **common)
    served = gated(x, probs)
    high = probs.max(1).values < tau
    assert 0 < high.sum() < len(high)
    low_alone = create_defense("grad2", epsilon=0.3, preserve_top1=True, **common)(
        x[~high], probs[~high]
    )
    high_alone = create_defense("grad2", epsilon=1.5, **common)(x[high], probs[high])
    torch.testing.assert_close(served[~high], low_alone)
    torch.testing.assert_close(served[high], high_alone)
    l1 = (served - probs).abs().sum(1)
    assert (l1[~high] <= 0.3 + 1e-5).all() and (l1[high] <= 1.5 + 1e-5).all()
    assert strict_top1_kept(probs[~high], served[~high]).all()
    assert (
        gated.contract.budget == 1.5
        and not gated.contract.keeps_top1
        and gated.contract.needs_input
    )


def test_gate_scores_and_threshold(nets):
    surrogate, victim = nets
    x, probs = _batch(victim, 200)
    torch.testing.assert_close(gate_scores("msp", x, probs, None), probs.max(1).values)
    with torch.no_grad():
        logits = victim(x)
    torch.testing.assert_close(
        gate_scores("neg-energy", x, probs, victim), torch.logsumexp(logits, 1)
    )
    torch.testing.assert_close(gate_scores("max-logit", x, probs, victim), logits.max(1).values)
    scores = gate_scores("neg-energy", x, probs, victim)
    tau = benign_threshold(scores, 0.05)
    assert abs(float((scores < tau).float().mean()) - 0.05) <= 1 / 200
    with pytest.raises(ValueError, match="gate_model"):
        create_defense(
            "grad2_gated", tau=0.0, gate_score="oe-msp", surrogate=surrogate, target="max-norm"
        )
    assert DEFENSES["grad2_gated"].contract.needs_input


def test_permute_serves_the_victims_posterior_moved_by_a_keyed_derangement(nets):
    surrogate, victim = nets
    x, probs = _batch(victim, 128)
    tau = float(probs.max(1).values.median())
    gated = create_defense(
        "grad2_gated",
        tau=tau,
        epsilon_low=0.3,
        epsilon_high=2.0,
        target="max-norm",
        surrogate=surrogate,
        attacker_answer="permute",
        seed=5,
    )
    served = gated(x, probs)
    high = probs.max(1).values < tau
    pi = gated.permutation(10)
    assert sorted(pi.tolist()) == list(range(10)) and (pi != torch.arange(10)).all()
    for j in range(10):  # class j's probability is served as class π(j)'s
        torch.testing.assert_close(served[high, pi[j]], probs[high, j])
    assert (served[high].argmax(1) == pi[probs[high].argmax(1)]).all()  # every flagged label wrong
    torch.testing.assert_close(
        served[high].sort(1).values, probs[high].sort(1).values
    )  # same profile
    low_alone = create_defense(
        "grad2", epsilon=0.3, preserve_top1=True, target="max-norm", surrogate=surrogate
    )(x[~high], probs[~high])
    torch.testing.assert_close(served[~high], low_alone)
    # the key is the seed: another seed, another derangement; the same seed, the same answers
    assert not torch.equal(
        create_defense(
            "grad2_gated",
            tau=tau,
            target="max-norm",
            surrogate=surrogate,
            attacker_answer="permute",
            seed=6,
        ).permutation(10),
        pi,
    )
    again = create_defense(
        "grad2_gated",
        tau=tau,
        epsilon_low=0.3,
        epsilon_high=2.0,
        target="max-norm",
        surrogate=surrogate,
        attacker_answer="permute",
        seed=5,
    )
    torch.testing.assert_close(again(x, probs), served)


@pytest.mark.parametrize("answer", ["permute", "scramble"])
def test_within_a_small_budget_the_answer_moves_along_the_segment(nets, answer):
    surrogate, victim = nets
    x, probs = _batch(victim, 64)
    gated = create_defense(
        "grad2_gated",
        tau=float("inf"),
        epsilon_high=0.4,
        target="max-norm",
        surrogate=surrogate,
        attacker_answer=answer,
        seed=1,
    )
    served = gated(x, probs)
    target = torch.empty_like(probs)
    if answer == "permute":
        target[:, gated.permutation(10)] = probs
    else:
        for i, sigma in enumerate(keyed_query_permutations(x, 10, seed=1)):
            target[i, sigma] = probs[i]
    distance = (target - probs).abs().sum(1)
    l1 = (served - probs).abs().sum(1)
    torch.testing.assert_close(l1, distance.clamp(max=0.4))
    lam = (l1 / distance).unsqueeze(1)
    torch.testing.assert_close(served, probs + lam * (target - probs))
    assert (served >= 0).all()
    torch.testing.assert_close(served.sum(1), torch.ones(64, dtype=served.dtype))


def test_scramble_serves_each_query_its_own_keyed_permutation_of_the_posterior(nets):
    surrogate, victim = nets
    x, probs = _batch(victim, 128)
    gated = create_defense(
        "grad2_gated",
        tau=float("inf"),
        epsilon_high=2.0,
        target="max-norm",
        surrogate=surrogate,
        attacker_answer="scramble",
        seed=3,
    )
    served = gated(x, probs)
    sigma = keyed_query_permutations(x, 10, seed=3)
    assert (sigma.sort(1).values == torch.arange(10)).all()  # a permutation per row
    for i in range(len(x)):  # row i's class j is served as class σ_i(j)
        torch.testing.assert_close(served[i, sigma[i]], probs[i])
    torch.testing.assert_close(served.sort(1).values, probs.sort(1).values)  # the same profile
    # the same query, alone or in another batch, gets the same answer; a jittered copy another
    torch.testing.assert_close(gated(x[5:6], probs[5:6]), served[5:6])
    torch.testing.assert_close(gated(x.flip(0), probs.flip(0)), served.flip(0))
    jittered = keyed_query_permutations(x + 1e-3, 10, seed=3)
    assert (jittered != sigma).any(1).float().mean() > 0.95
    assert (keyed_query_permutations(x, 10, seed=4) != sigma).any(1).float().mean() > 0.95  # keyed


def test_scrambled_labels_are_uniform_whatever_the_true_class(nets):
    # one posterior (true class 0) for 5,000 different queries: the served top-1 must be uniform
    # over the 10 classes (a chi-square test against the uniform law at the 0.1 % level), and so
    # carry no information about the true class (the true class is no more frequent than others)
    x = torch.rand(5000, 1, 8, 8, generator=torch.Generator().manual_seed(11))
    probs = torch.softmax(torch.tensor([4.0, 1.0] + [0.0] * 8), 0).expand(5000, 10).contiguous()
    gated = create_defense(
        "grad2_gated",
        tau=float("inf"),
        epsilon_high=2.0,
        attacker_answer="scramble",
        surrogate=nets[0],
        seed=0,
    )
    counts = torch.bincount(gated(x, probs).argmax(1), minlength=10).double()
    chi2 = float(((counts - 500) ** 2 / 500).sum())
    assert 1 - torch.distributions.Chi2(9.0).cdf(torch.tensor(chi2)) > 1e-3, counts
    blank = gated(torch.zeros(2, 1, 8, 8), probs[:2])
    assert (
        blank.argmax(1)[0] == blank.argmax(1)[1]
    )  # deterministic, and keyed even for a blank image


def _tail(count, n, rate):
    """P(Binomial(n, rate) ≥ count), summed exactly in rationals (an independent reference)."""
    from fractions import Fraction
    from math import comb

    p = Fraction(rate)
    return float(sum(comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(count, n + 1)))


def _stream(flags, seed=0):
    """Queries whose victim posterior's max is 0.3 where ``flags`` is true (flagged by the msp gate
    at τ = 0.5) and 0.9 elsewhere."""
    x = torch.rand(len(flags), 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    top = torch.where(torch.as_tensor(flags), 0.3, 0.9)
    probs = torch.cat([top[:, None], ((1 - top) / 9)[:, None].expand(-1, 9)], 1)
    return x, probs


@pytest.mark.parametrize("batches", [[60], [7, 20, 33], [1] * 60])
def test_the_stream_alarm_fires_where_the_exact_binomial_tail_first_drops_below_alpha(
    nets, batches
):
    flags = torch.rand(60, generator=torch.Generator().manual_seed(2)) < 0.45
    rate, alpha = 0.1, 1e-4
    expected = next(n for n in range(1, 61) if _tail(int(flags[:n].sum()), n, rate) < alpha)
    gated = create_defense(
        "grad2_gated",
        tau=0.5,
        epsilon_low=0.3,
        epsilon_high=2.0,
        surrogate=nets[0],
        attacker_answer="scramble",
        alarm_rate=rate,
        alarm_alpha=alpha,
    )
    assert gated.contract.stateful
    x, probs = _stream(flags.tolist())
    served, start = [], 0
    for size in batches:
        served.append(gated(x[start : start + size], probs[start : start + size]))
        start += size
    served = torch.cat(served)
    assert (
        gated.alarm_at == expected
        and gated.queries_seen == 60
        and gated.queries_flagged == int(flags.sum())
    )
    # before the alarm a query passing the gate keeps its label; from the alarm on none is spared
    kept = served.argmax(1) == 0
    assert kept[:expected][~flags[:expected]].all()
    sigma = keyed_query_permutations(x, 10, seed=0)
    torch.testing.assert_close(served[expected:].sort(1).values, probs[expected:].sort(1).values)
    assert (served[expected:].argmax(1) == sigma[expected:, 0]).all()  # every one scrambled


def test_a_benign_stream_never_alarms_and_each_key_is_its_own_stream(nets):
    from mirage.api import InProcessAPI

    gated = create_defense(
        "grad2_gated",
        tau=0.5,
        epsilon_low=0.3,
        epsilon_high=2.0,
        surrogate=nets[0],
        attacker_answer="scramble",
        alarm_rate=0.1,
    )
    benign = torch.rand(5000, generator=torch.Generator().manual_seed(3)) < 0.03  # 3 % flagged
    x, probs = _stream(benign.tolist(), seed=4)
    for xs, ps in zip(x.split(256), probs.split(256)):
        gated(xs, ps)
    assert not gated.alarmed and gated.queries_seen == 5000

    # every query flagged (τ above any max probability): alice's 64 alarm her stream, not bob's
    everything = create_defense(
        "grad2_gated",
        tau=1.01,
        epsilon_low=0.3,
        epsilon_high=2.0,
        surrogate=nets[0],
        attacker_answer="scramble",
        alarm_rate=0.1,
    )
    alice = InProcessAPI(nets[1], everything)
    bob = alice.for_client("bob")
    alice.query(torch.rand(64, 1, 8, 8))
    bob.query(torch.rand(1, 1, 8, 8))
    assert alice.defense.alarmed and not bob.defense.alarmed
    assert (alice.defense.queries_seen, bob.defense.queries_seen) == (64, 1)


def test_a_request_that_fails_leaves_the_stream_as_it_was(nets, monkeypatch):
    import mirage.defenses.grad2.gated as module

    gated = create_defense(
        "grad2_gated",
        tau=1.01,
        epsilon_low=0.3,
        epsilon_high=2.0,
        surrogate=nets[0],
        attacker_answer="scramble",
        alarm_rate=0.1,
        alarm_alpha=5e-4,
    )
    x, probs = _batch(nets[1], 3)
    gated(x, probs)  # three flagged: 0.1³ = 1e-3 is not below α
    assert (gated.queries_seen, gated.queries_flagged, gated.alarm_at) == (3, 3, None)

    def broken(*args, **kwargs):
        raise RuntimeError("the scrambling failed")

    monkeypatch.setattr(module, "keyed_query_permutations", broken)
    with pytest.raises(RuntimeError, match="scrambling"):
        gated(x, probs)  # would have alarmed at its first query (0.1⁴ < α)
    assert (gated.queries_seen, gated.queries_flagged, gated.alarm_at) == (3, 3, None)
    monkeypatch.undo()
    gated(x[:1], probs[:1])
    assert gated.alarm_at == 4


def test_a_watermark_over_the_alarmed_gate_gives_each_new_client_its_own_stream(nets):
    inner = create_defense(
        "grad2_gated",
        tau=1.01,
        epsilon_low=0.3,
        epsilon_high=2.0,
        surrogate=nets[0],
        attacker_answer="scramble",
        alarm_rate=0.1,
    )
    marked = create_defense("watermarked", key=b"k" * 32, inner=inner)
    x, probs = _batch(nets[1], 16)
    marked(x, probs)
    fresh = marked.for_new_client()
    assert marked.stream_alarm is not None and fresh.stream_alarm is None
    assert fresh.params.key == marked.params.key and fresh.params.inner is not inner
    plain = create_defense("watermarked", key=b"k" * 32, inner=create_defense("top_k", k=3))
    assert plain.for_new_client() is plain


def test_the_gated_repr_is_one_line_without_tensors_or_modules(nets):
    """Its reference set, gate model and surrogate ensemble print by shape and class."""
    surrogate, victim = nets
    gated = create_defense(
        "grad2_gated",
        gate_score="max-logit",
        gate_model=victim,
        surrogate=[surrogate, victim],
        target="unlearn",
        reference_x=torch.rand(20, 1, 8, 8),
        reference_y=torch.randint(0, 10, (20,)),
        attacker_answer="scramble",
    )
    text = repr(gated)
    assert "\n" not in text and len(text) < 500 and "tensor([" not in text, text
    assert (
        text.startswith("GatedGrad2(")
        and "gate_model=<LeNet>" in text
        and "surrogate=<2 × LeNet>" in text
        and "reference_x=<tensor (20, 1, 8, 8)>" in text
        and "attacker_answer='scramble'" in text
    )
