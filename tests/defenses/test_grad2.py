"""The ``grad2`` registry entry: parameters, invariants, and that it maximises ⟨g(ỹ), v⟩ for the
attacker's batch gradient g computed independently by autograd on the surrogate."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from mirage.defenses import DEFENSES, create_defense, redirect
from mirage.defenses.base import strict_top1_kept
from mirage.defenses.grad2.targets import (
    all_ones,
    log_likelihood_gradient,
    random_direction,
    unlearn,
    watermark,
)
from mirage.models import create_model

K = 10


@pytest.fixture
def setup():
    surrogate = create_model("lenet", (1, 8, 8), K, (0.5,), (0.3,)).eval()
    x = torch.rand(12, 1, 8, 8)
    probs = torch.softmax(3 * torch.randn(12, K), 1)
    return surrogate, x, probs


def inner(surrogate, x, served, v):
    """⟨g(ỹ), v⟩ with g(ỹ) = ∇_θ (1/N) Σ ỹ·log p_θ, by plain autograd."""
    g = log_likelihood_gradient(surrogate, x, served)
    return sum((g[name] * v[name]).sum() for name in g).item()


def test_registered_with_validated_params(setup):
    surrogate, _, _ = setup
    assert "grad2" in DEFENSES and DEFENSES["grad2"].contract.needs_input
    defense = create_defense("grad2", surrogate=surrogate)
    assert defense.params.target == "all-ones" and defense.contract.budget == 0.5
    assert not defense.contract.keeps_top1
    for bad in [
        {},
        {"surrogate": "lenet"},
        {"surrogate": surrogate, "epsilon": 2.5},
        {"surrogate": surrogate, "target": "vector"},
        {"surrogate": surrogate, "target": "watermark"},
        {"surrogate": surrogate, "target": "unlearn"},
        {
            "surrogate": surrogate,
            "target": "unlearn",
            "reference_x": torch.rand(2, 1, 8, 8),
            "reference_y": torch.tensor([1, 2, 3]),
        },
        {"surrogate": surrogate, "batch_size": 0},
        {"surrogate": surrogate, "colour": 1},
        {"surrogate": []},
    ]:
        with pytest.raises(ValidationError):
            create_defense("grad2", **bad)
    with pytest.raises(ValueError):
        create_defense("grad2", surrogate=surrogate)(None, torch.full((2, K), 1 / K))


@pytest.mark.parametrize("method", ["fused", "jvp", "double-backward"])
def test_all_ones_is_the_exact_maximiser_of_the_redirected_inner_product(setup, method):
    surrogate, x, probs = setup
    defense = create_defense(
        "grad2", epsilon=0.4, surrogate=surrogate, score_method=method, batch_size=12
    )
    served = defense(x, probs)
    v = all_ones(surrogate)
    # an independent optimum: exact redirect on scores obtained by finite inner products ⟨g(e_k), v⟩
    scores = torch.stack(
        [
            torch.tensor(
                [
                    inner(surrogate, x[i : i + 1], torch.eye(K)[k : k + 1], v) / len(x)
                    for k in range(K)
                ]
            )
            for i in range(len(x))
        ]
    )
    expected = redirect(probs, scores.to(probs), 0.4)
    assert inner(surrogate, x, served, v) >= inner(surrogate, x, probs, v)
    assert inner(surrogate, x, served, v) == pytest.approx(
        inner(surrogate, x, expected, v), rel=1e-4, abs=1e-6
    )
    assert ((served - probs).abs().sum(1) <= 0.4 + 1e-5).all()


def test_targets_increase_their_inner_product(setup):
    surrogate, x, probs = setup
    x_w, y_w = torch.rand(3, 1, 8, 8), torch.tensor([1, 2, 3])
    cases = {
        "min-ip": (
            {},
            lambda: {k: -t for k, t in log_likelihood_gradient(surrogate, x, probs).items()},
        ),
        "watermark": (
            {"watermark_x": x_w, "watermark_y": y_w},
            lambda: watermark(surrogate, x_w, y_w),
        ),
        "unlearn": ({"reference_x": x_w, "reference_y": y_w}, lambda: unlearn(surrogate, x_w, y_w)),
        "random": ({"seed": 4}, lambda: random_direction(surrogate, 4)),
        "vector": (
            {
                "target_vector": torch.cat([p.detach().flatten() for p in surrogate.parameters()])
                ** 2
            },
            lambda: {n: p.detach() ** 2 for n, p in surrogate.named_parameters()},
        ),
        "max-norm": ({}, lambda: {n: p.detach() for n, p in surrogate.named_parameters()}),
    }
    for target, (extra, direction) in cases.items():
        served = create_defense(
            "grad2", epsilon=0.6, surrogate=surrogate, target=target, batch_size=12, **extra
        )(x, probs)
        v = direction()
        assert inner(surrogate, x, served, v) > inner(surrogate, x, probs, v), target


def test_preserve_top1_keeps_argmax_and_scores_no_higher(setup):
    surrogate, x, probs = setup
    plain = create_defense("grad2", epsilon=1.0, surrogate=surrogate)
    keeping = create_defense("grad2", epsilon=1.0, surrogate=surrogate, preserve_top1=True)
    assert keeping.contract.keeps_top1
    served, free = keeping(x, probs), plain(x, probs)
    assert strict_top1_kept(probs, served).all()
    assert not strict_top1_kept(probs, free).all()  # the constraint binds on this batch
    v = all_ones(surrogate)
    assert (
        inner(surrogate, x, probs, v)
        <= inner(surrogate, x, served, v)
        <= inner(surrogate, x, free, v) + 1e-6
    )


def test_ensemble_samples_one_member_per_scoring_batch(setup):
    surrogate, x, probs = setup
    other = create_model("lenet", (1, 8, 8), K, (0.5,), (0.3,)).eval()
    served = create_defense("grad2", surrogate=[surrogate, other], batch_size=4, seed=5)(x, probs)
    picks = [
        int(torch.randint(2, (1,), generator=g))
        for g in [torch.Generator().manual_seed(5)]
        for _ in range(3)
    ]
    members = [surrogate, other]
    expected = torch.cat(
        [
            create_defense("grad2", surrogate=members[m], batch_size=4)(
                x[4 * i : 4 * i + 4], probs[4 * i : 4 * i + 4]
            )
            for i, m in enumerate(picks)
        ]
    )
    torch.testing.assert_close(served, expected)
    assert len(set(picks)) == 2  # this seed really mixes members


def test_class_count_mismatch_is_a_clear_error(setup):
    surrogate, x, _ = setup
    with pytest.raises(ValueError, match="classes"):
        create_defense("grad2", surrogate=surrogate)(x, torch.full((12, 5), 0.2))


def test_unlearn_is_the_reverse_of_learning_the_reference_set(setup):
    surrogate, _, _ = setup
    x_ref, y_ref = torch.rand(5, 1, 8, 8), torch.tensor([0, 1, 2, 3, 4])
    v, learn = unlearn(surrogate, x_ref, y_ref), log_likelihood_gradient(surrogate, x_ref, y_ref)
    assert set(v) == set(learn) and all(torch.equal(v[n], -learn[n]) for n in v)
    # a small step along v lowers the surrogate's log-likelihood of the reference labels
    before = -torch.nn.functional.cross_entropy(surrogate(x_ref), y_ref)
    with torch.no_grad():
        for name, p in surrogate.named_parameters():
            p.add_(1e-3 * v[name])
    assert -torch.nn.functional.cross_entropy(surrogate(x_ref), y_ref) < before
