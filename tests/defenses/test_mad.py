"""MAD and MAD-argmax against the faithful per-sample reference of the official code
(``tests/oracles/mad_original.py``: K ``autograd.grad`` calls per query) and against
closed forms and brute force built here."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mirage.defenses import create_defense
from mirage.defenses.base import distance
from mirage.defenses.mad.defense import candidate_objective
from mirage.models import create_model

from oracles.mad_original import jacobian_nll, objective, original_mad


def model64(arch: str, k: int, seed: int, shape=(1, 8, 8)) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = create_model(arch, shape, k, [0.4] * shape[0], [0.3] * shape[0]).double().eval()
    with torch.no_grad():  # larger logits: peaked, varied surrogate posteriors
        model.classifier.weight.mul_(4)
    return model


def batch(b: int, k: int, seed: int, shape=(1, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, *shape, generator=g, dtype=torch.float64)
    y = torch.softmax(3 * torch.randn(b, k, generator=g, dtype=torch.float64), 1)
    return x, y


def reference_gram(model, x, layers):
    G = torch.stack([jacobian_nll(model, x[i : i + 1], layers) for i in range(len(x))])
    return G @ G.transpose(1, 2)


@settings(max_examples=6, deadline=None)
@given(k=st.integers(3, 10), seed=st.integers(0, 10_000), b=st.integers(1, 4))
def test_last_layer_closed_form_equals_autograd_reference(k, seed, b):
    # K ≥ 3: for K = 2 every direction Gᵀ(c − y) is ±one vector, so candidates tie exactly and
    # the winner is decided by rounding noise in either implementation.
    model = model64("lenet", k, seed)
    x, y = batch(b, k, seed)
    mad = create_defense("mad", epsilon=0.7, surrogate=model)
    torch.testing.assert_close(
        mad.gram(x, y), reference_gram(model, x, "last"), rtol=1e-6, atol=1e-9
    )
    G = torch.stack([jacobian_nll(model, x[i : i + 1], "last") for i in range(b)])
    eye = torch.eye(k, dtype=torch.float64)
    ours = candidate_objective(mad.gram(x, y), y, eye.expand(b, k, k), "cosine")
    theirs = torch.tensor(
        [[objective(eye[j], y[i], G[i].detach()).item() for j in range(k)] for i in range(b)],
        dtype=torch.float64,
    )
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    torch.testing.assert_close(mad(x, y), original_mad(model, x, y, 0.7), rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch, shape", [("lenet", (1, 8, 8)), ("vgg", (3, 8, 8))])
def test_all_layers_gram_equals_per_sample_full_jacobian(arch, shape):
    k = 5
    model = model64(arch, k, 3, shape)
    x, y = batch(3, k, 4, shape)
    mad = create_defense("mad", epsilon=0.6, norm="l2", layers="all", surrogate=model)
    torch.testing.assert_close(
        mad.gram(x, y), reference_gram(model, x, "all"), rtol=1e-6, atol=1e-9
    )
    expected = original_mad(model, x, y, 0.6, norm="l2", layers="all")
    torch.testing.assert_close(mad(x, y), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("replicate_max_rows", [0, 10_000])
def test_both_batching_strategies_of_the_full_gram_agree_with_the_reference(replicate_max_rows):
    from mirage.defenses.mad.gram import full_network_gram

    model = model64("lenet", 4, 5)
    x, _ = batch(3, 4, 6)
    gram, probs = full_network_gram(model, x, replicate_max_rows=replicate_max_rows)
    torch.testing.assert_close(gram, reference_gram(model, x, "all"), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(probs, torch.softmax(model(x), 1).detach())


def test_all_layers_works_with_frozen_float32_surrogate():
    torch.manual_seed(0)
    model = create_model("lenet", (1, 8, 8), 4, [0.5], [0.5]).eval().requires_grad_(False)
    x, y = batch(2, 4, 0)
    gram = create_defense("mad", layers="all", surrogate=model).gram(x.float(), y)
    model.requires_grad_(True)
    torch.testing.assert_close(
        gram, reference_gram(model, x.float(), "all").double(), rtol=1e-4, atol=1e-6
    )


@pytest.mark.parametrize("eps", [0.01, 0.2, 1.0, 50.0])
def test_kl_bisection_meets_its_budget_tightly(eps):
    model = model64("lenet", 6, 1)
    x, y = batch(8, 6, 2)
    mad = create_defense("mad", epsilon=eps, norm="kl", surrogate=model)
    target = mad.target(x, y)
    alpha = mad.step(y, target)
    served = mad(x, y)
    kl = distance(y, served, "kl")
    assert (kl <= eps + 1e-12).all()
    inside = alpha < 1
    bumped = y + (alpha + 1e-9).clamp_max(1).unsqueeze(1) * (target - y)
    assert (distance(y, bumped, "kl")[inside] > eps).all()  # the largest feasible α
    assert torch.equal(alpha[~inside], torch.ones_like(alpha[~inside]))
    assert (distance(y, target, "kl")[~inside] <= eps).all()


@pytest.mark.parametrize("norm", ["l1", "l2", "kl"])
def test_vertex_step_equals_the_general_step(norm):
    model = model64("lenet", 7, 3)
    x, y = batch(16, 7, 4)
    mad = create_defense("mad", epsilon=0.4, norm=norm, surrogate=model)
    vertex = mad.vertex(x, y)
    target = torch.nn.functional.one_hot(vertex, 7).double()
    alpha = mad.vertex_step(y, vertex)
    torch.testing.assert_close(alpha, mad.step(y, target), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mad(x, y), y + alpha.unsqueeze(1) * (target - y), rtol=0, atol=1e-12)


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_closed_form_step_spends_exactly_the_budget(norm):
    model = model64("lenet", 5, 2)
    x, y = batch(6, 5, 5)
    eps = 0.3
    mad = create_defense("mad", epsilon=eps, norm=norm, surrogate=model)
    served = mad(x, y)
    used = distance(y, served, norm)
    target = mad.target(x, y)
    full = distance(y, target, norm) <= eps
    torch.testing.assert_close(used[~full], torch.full_like(used[~full], eps))
    torch.testing.assert_close(served[full], target[full])


@settings(max_examples=5, deadline=None)
@given(k=st.integers(3, 8), seed=st.integers(0, 10_000), layers=st.sampled_from(["last", "all"]))
def test_mad_argmax_equals_brute_force_subset_search(k, seed, layers):
    model = model64("lenet", k, seed)
    x, y = batch(3, k, seed + 1)
    defense = create_defense("mad_argmax", epsilon=1.2, layers=layers, surrogate=model)
    expected = original_mad(model, x, y, 1.2, layers=layers, argmax=True)
    torch.testing.assert_close(defense(x, y), expected, rtol=0, atol=1e-6)
    assert defense.evaluations == 2 ** (k - 1)


def reference_greedy(G, y, budget, margin=1e-5):
    """The official oracle_argmax_preserving_approx, one query at a time."""
    k = y.shape[0]
    top = int(y.argmax())
    fixed, best, best_val, evaluations = [top], None, -1.0, 0
    while evaluations < budget and len(fixed) < k:
        scored = []
        for j in sorted(set(range(k)) - set(fixed)):
            c = torch.zeros(k, dtype=y.dtype)
            c[fixed + [j]] = 1.0
            c[top] += margin
            scored.append((objective(c / c.sum(), y, G).item(), j, c / c.sum()))
        val, j, c = max(scored, key=lambda s: (s[0], -s[1]))
        if val > best_val:
            best_val, best = val, c
        fixed.append(j)
        evaluations += len(scored)
    return best


@pytest.mark.parametrize("budget", [1, 30, 1024])
def test_mad_argmax_greedy_equals_reference_greedy(budget):
    k = 13
    model = model64("lenet", k, 7)
    x, y = batch(3, k, 8)
    defense = create_defense("mad_argmax", epsilon=2.0, surrogate=model, max_evaluations=budget)
    target = defense.target(x, y)
    for i in range(3):
        G = jacobian_nll(model, x[i : i + 1], "last").detach()
        torch.testing.assert_close(target[i], reference_greedy(G, y[i], budget), rtol=0, atol=1e-9)
    steps = {1: 1, 30: 3, 1024: k - 1}[budget]
    assert defense.evaluations == sum(k - s for s in range(1, steps + 1))
    assert (defense(x, y).argmax(1) == y.argmax(1)).all()


def test_identity_jacobian_targets_the_least_likely_class():
    # G = I: objective at e_k is 2 − 2 y_k/‖y‖, maximal at argmin y.
    _, y = batch(10, 7, 3)
    mad = create_defense("mad", epsilon=2.0, jacobian="identity")
    assert torch.equal(mad(None, y).argmax(1), y.argmin(1))


def test_surrogate_objective_targets_the_farthest_vertex_on_the_last_layer():
    # ‖Gᵀ(e_k − y)‖² = ‖h‖² ‖e_k − y‖² for the last layer: the farthest vertex is argmin y.
    model = model64("lenet", 6, 4)
    x, y = batch(10, 6, 4)
    mad = create_defense("mad", epsilon=2.0, objective="surrogate", surrogate=model)
    assert torch.equal(mad(x, y).argmax(1), y.argmin(1))


def test_random_oracle_is_seeded_and_covers_every_class():
    _, y = batch(400, 5, 6)
    first = create_defense("mad", epsilon=2.0, oracle="random", seed=1)(None, y)
    again = create_defense("mad", epsilon=2.0, oracle="random", seed=1)(None, y)
    other = create_defense("mad", epsilon=2.0, oracle="random", seed=2)(None, y)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert set(first.argmax(1).tolist()) == set(range(5))


def test_default_surrogate_is_a_seeded_random_initialisation():
    x, y = batch(6, 4, 9)
    x = x.float()
    a = create_defense("mad", epsilon=1.0, seed=3)
    b = create_defense("mad", epsilon=1.0, seed=3)
    torch.testing.assert_close(a.gram(x, y), b.gram(x, y))
    assert not torch.allclose(a.gram(x, y), create_defense("mad", seed=4).gram(x, y))


def test_invalid_parameters_and_mismatched_surrogate():
    with pytest.raises(ValueError):
        create_defense("mad", epsilon=1.5, norm="l2")
    with pytest.raises(ValueError):
        create_defense("mad", surrogate="lenet")
    with pytest.raises(ValueError):
        create_defense("mad_argmax", oracle="random")
    model = model64("lenet", 3, 0)
    x, y = batch(2, 4, 0)
    with pytest.raises(ValueError, match="classes"):
        create_defense("mad", surrogate=model)(x, y)
    with pytest.raises(ValueError, match="classes"):
        create_defense("mad", layers="all", surrogate=model)(x, y)


def test_subset_table_is_every_subset():
    from mirage.defenses.mad.argmax import subset_table

    assert {tuple(r) for r in subset_table(4).tolist()} == set(
        itertools.product([0.0, 1.0], repeat=3)
    )


@settings(max_examples=20, deadline=None)
@given(k=st.integers(3, 12), seed=st.integers(0, 10_000), b=st.integers(1, 16))
def test_cosine_fast_path_picks_the_vertex_of_the_general_objective(k, seed, b):
    from mirage.defenses.mad.defense import last_layer_cosine_vertex, last_layer_vertex_objective

    g = torch.Generator().manual_seed(seed)
    features_sq = torch.rand(b, generator=g, dtype=torch.float64) * 5
    probs = torch.softmax(3 * torch.randn(b, k, generator=g, dtype=torch.float64), 1)
    clean = torch.softmax(3 * torch.randn(b, k, generator=g, dtype=torch.float64), 1)
    features_sq[0] = 0  # G = 0: every vertex ties
    clean[-1] = probs[-1]  # y = p: every vertex ties
    general = last_layer_vertex_objective(features_sq, probs, clean, "cosine").argmax(1)
    assert torch.equal(last_layer_cosine_vertex(features_sq.sqrt(), probs, clean), general)


@pytest.mark.parametrize(
    ("arch", "kwargs"),
    [
        ("resnet18", {"width": 4}),
        ("resnet50", {"width": 2}),
        ("vit", {"patch": 4, "dim": 16, "depth": 2, "heads": 2}),
    ],
)
def test_last_layer_gram_on_resnets_and_a_vit_equals_the_autograd_reference(arch, kwargs):
    """MAD's head hook (the last layer's closed form) on networks with batch norm, residual adds,
    layer norm and attention equals the official code's per-class autograd Jacobians."""
    torch.manual_seed(0)
    shape = (3, 8, 8)
    model = create_model(arch, shape, 6, [0.4] * 3, [0.3] * 3, **kwargs).double().eval()
    x, y = batch(3, 6, 0, shape)
    mad = create_defense("mad", epsilon=0.7, surrogate=model)
    torch.testing.assert_close(
        mad.gram(x, y), reference_gram(model, x, "last"), rtol=1e-6, atol=1e-9
    )
    torch.testing.assert_close(mad(x, y), original_mad(model, x, y, 0.7), rtol=0, atol=1e-6)
