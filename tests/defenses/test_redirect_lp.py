"""``redirect`` and its argmax-preserving form against scipy's LP solver (HiGHS).

≥ 1,000 random instances, K from 2 to 1,000, with one-hot, uniform, tied and Dirichlet rows,
tied scores, and ε over [0, 2] including both ends. The LP is written independently:
ỹ = y + p − q with p, q ≥ 0, Σp = Σq, Σp + Σq ≤ ε, ỹ ≥ 0 (+ ỹ_t − ỹ_j ≥ margin for top-1)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import linprog

from mirage.defenses.base import strict_top1_kept
from mirage.defenses.redirect import TOP1_MARGIN, redirect, redirect_top1_preserving

GROUPS = {2: 204, 3: 180, 4: 140, 5: 120, 7: 100, 10: 120, 20: 60, 50: 40, 100: 24, 300: 8, 1000: 4}


def instances(k: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(n, K) rows of mixed kinds, tie-heavy scores, and ε in [0, 2] (float64)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.distributions.Dirichlet(torch.full((k,), 0.3, dtype=torch.float64)).sample((n,))
    kind = torch.arange(n) % 5
    y[kind == 1] = torch.nn.functional.one_hot(
        torch.randint(k, (int((kind == 1).sum()),), generator=g), k
    ).double()
    y[kind == 2] = 1.0 / k
    tied = torch.randint(1, 4, (int((kind == 3).sum()), k), generator=g).double()
    y[kind == 3] = tied / tied.sum(1, keepdim=True)
    scores = torch.randn(n, k, generator=g, dtype=torch.float64)
    scores[::2] = torch.randint(-2, 3, (len(scores[::2]), k), generator=g).double()  # many ties
    eps = torch.rand(n, generator=g, dtype=torch.float64) * 2
    eps[::7], eps[1::7] = 0.0, 2.0
    return y / y.sum(1, keepdim=True), scores, eps


def lp_optimum(
    y: np.ndarray, s: np.ndarray, eps: float, margin: float | None = None
) -> float | None:
    """max ⟨s, ỹ⟩ with ỹ = y + p − q, p, q ≥ 0: Σp = Σq, Σp + Σq ≤ ε, ỹ ≥ 0 (+ top-1 margin)."""
    k = len(y)
    eye = np.eye(k)
    a_ub = [np.hstack([-eye, eye]), np.ones((1, 2 * k))]
    b_ub = [y, [eps]]
    if margin is not None:
        t = int(np.argmax(y))
        others = [j for j in range(k) if j != t]
        c = np.zeros((k - 1, k))
        c[np.arange(k - 1), others] = 1
        c[:, t] = -1
        a_ub.append(np.hstack([c, -c]))  # ỹ_j − ỹ_t ≤ −margin
        b_ub.append(-margin - c @ y)
    result = linprog(
        np.r_[-s, s],
        A_ub=np.vstack(a_ub),
        b_ub=np.concatenate(b_ub),
        A_eq=np.r_[np.ones(k), -np.ones(k)][None],
        b_eq=[0.0],
        bounds=[(0, None)] * (2 * k),
        method="highs",
        options={"primal_feasibility_tolerance": 1e-10, "dual_feasibility_tolerance": 1e-10},
    )
    if result.status == 2:
        return None
    assert result.status == 0, result.message
    return float(s @ y - result.fun)


@pytest.mark.slow
def test_redirect_matches_linprog_on_1000_instances():
    total = 0
    for k, n in GROUPS.items():
        y, s, eps = instances(k, n, seed=k)
        served = redirect(y, s, eps)
        assert (served >= -1e-12).all()
        assert torch.allclose(served.sum(1), torch.ones(n, dtype=torch.float64), atol=1e-9)
        assert ((served - y).abs().sum(1) <= eps + 1e-9).all()
        mine = (served * s).sum(1)
        for i in range(n):
            best = lp_optimum(y[i].numpy(), s[i].numpy(), eps[i].item())
            assert abs(mine[i].item() - best) <= 1e-6, (k, i, mine[i].item(), best)
        total += n
    assert total >= 1000


@pytest.mark.slow
def test_top1_preserving_matches_constrained_linprog():
    total = infeasible = 0
    for k, n in GROUPS.items():
        n = max(n // 2, 4)
        y, s, eps = instances(k, n, seed=100 + k)
        served, feasible = redirect_top1_preserving(y, s, eps)
        assert ((served - y).abs().sum(1) <= eps + 1e-9).all()
        assert torch.allclose(served.sum(1), torch.ones(n, dtype=torch.float64), atol=1e-9)
        assert (served >= -1e-12).all()
        top = y.argmax(1, keepdim=True)
        gap = served.gather(1, top).squeeze(1) - served.scatter(1, top, -1.0).max(1).values
        assert (gap[feasible] >= TOP1_MARGIN - 1e-9).all()
        mine = (served * s).sum(1)
        for i in range(n):
            best = lp_optimum(y[i].numpy(), s[i].numpy(), eps[i].item(), margin=TOP1_MARGIN)
            if best is None:
                assert not feasible[i], (k, i)
                assert torch.equal(served[i], y[i])
                infeasible += 1
                continue
            assert feasible[i], (k, i)
            assert abs(mine[i].item() - best) <= 1e-6, (k, i, mine[i].item(), best)
        total += n
    assert total >= 450 and 0 < infeasible < total // 4  # uniform rows with tiny ε are infeasible


def test_top1_preserving_equals_redirect_when_redirect_already_keeps_top1():
    y, s, eps = instances(10, 200, seed=7)
    plain = redirect(y, s, eps)
    top = y.argmax(1, keepdim=True)
    keeps = (
        plain.gather(1, top).squeeze(1) - plain.scatter(1, top, -1.0).max(1).values
    ) >= TOP1_MARGIN
    preserving, _ = redirect_top1_preserving(y, s, eps)
    assert keeps.any()
    assert torch.allclose((preserving * s).sum(1)[keeps], (plain * s).sum(1)[keeps], atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtypes_and_per_row_budget(dtype):
    y, s, eps = instances(10, 300, seed=3)
    y, s, eps = y.to(dtype), s.to(dtype), eps.to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-9
    for served in (redirect(y, s, eps), redirect_top1_preserving(y, s, eps)[0]):
        assert served.dtype == dtype
        assert (served >= -tol).all() and ((served.sum(1) - 1).abs() <= tol).all()
        assert ((served - y).abs().sum(1) <= eps + tol).all()
    served, feasible = redirect_top1_preserving(y, s, 1.0)
    assert strict_top1_kept(y[feasible], served[feasible]).all()


def test_invalid_inputs_are_value_errors():
    y = torch.softmax(torch.randn(4, 5), 1)
    with pytest.raises(ValueError):
        redirect(y, torch.randn(4, 5), 2.5)
    with pytest.raises(ValueError):
        redirect(y, torch.randn(4, 6), 0.5)
    with pytest.raises(ValueError):
        redirect_top1_preserving(y, torch.randn(4, 5), torch.full((3,), 0.5))
    with pytest.raises(ValueError):
        redirect_top1_preserving(y, torch.randn(4, 5), 0.5, margin=1.0)
