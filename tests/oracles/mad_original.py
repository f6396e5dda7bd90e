"""A faithful per-sample re-implementation of the official MAD code (Orekondy et al., ICLR 2020,
github.com/tribhuvanesh/prediction-poisoning, ``defenses/victim/bb_mad.py``), written for mirage.

What the original does per query, kept here on purpose (it is the slow reference):
- ``compute_jacobian_nll``: one forward of the single query, then K calls of
  ``torch.autograd.grad(nll_k, w)`` — w the final linear layer's weight (``layers="last"``,
  the official ``w_idx = -2``) or every parameter (``layers="all"``) — stacked into G (K×D);
- ``oracle_extreme``: a Python loop over the K vertices, objective ‖u − v‖² with
  u = Gᵀỹ/‖Gᵀỹ‖, v = Gᵀy/‖Gᵀy‖ (``max_over_obj=True``, the paper's objective);
- ``oracle_argmax_preserving``: a loop over the 2^(K−1) subsets containing argmax y, each
  up-weighted by 1e-5 on the top class (K ≤ 10);
- ``linesearch`` with the closed-form α = ε/(‖y − y*‖_p + 1e-7) clipped to [0, 1] (L1/L2).
Used by ``tests/defenses/test_mad.py`` (equality) and ``benchmarks/mad_overhead.py`` (speed).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def jacobian_nll(model: nn.Module, x_i: Tensor, layers: str) -> Tensor:
    """G (K×D) for ONE query ``x_i`` (1, C, H, W): row k = ∂(−log p_k)/∂w, one autograd.grad per
    k."""
    params = [model.classifier.weight] if layers == "last" else [p for p in model.parameters()]
    logits = model(x_i)
    nlls = -F.log_softmax(logits, dim=1).mean(dim=0)
    rows = []
    for k in range(nlls.shape[0]):
        grads = torch.autograd.grad(nlls[k], params, retain_graph=True)
        rows.append(torch.cat([g.flatten() for g in grads]))
    return torch.stack(rows)


def objective(ytilde: Tensor, y: Tensor, G: Tensor) -> Tensor:
    u = G.t() @ ytilde
    u = u / u.norm()
    v = G.t() @ y
    v = v / v.norm()
    return (u - v).norm() ** 2


def oracle_extreme(G: Tensor, y: Tensor) -> tuple[Tensor, float]:
    best_k, best_val = -1, -1.0
    for k in range(y.shape[0]):
        yk = torch.zeros_like(y)
        yk[k] = 1.0
        val = objective(yk, y, G).item()
        if val > best_val:
            best_val, best_k = val, k
    ystar = torch.zeros_like(y)
    ystar[best_k] = 1.0
    return ystar, best_val


def oracle_argmax_preserving(G: Tensor, y: Tensor, margin: float = 1e-5) -> tuple[Tensor, float]:
    k = y.shape[0]
    top = int(y.argmax())
    best, best_val = None, -1.0
    for bits in itertools.product([0.0, 1.0], repeat=k):
        if bits[top] == 0:
            continue
        candidate = torch.tensor(bits, dtype=y.dtype)
        candidate[top] += margin
        candidate = candidate / candidate.sum()
        val = objective(candidate, y, G).item()
        if val > best_val:
            best_val, best = val, candidate
    return best, best_val


def closed_form_alpha(y: Tensor, ystar: Tensor, epsilon: float, norm: str) -> Tensor:
    p = 1.0 if norm == "l1" else 2.0
    return (epsilon / ((y - ystar).norm(p=p) + 1e-7)).clamp(0.0, 1.0)


def original_mad(
    model: nn.Module,
    x: Tensor,
    probs: Tensor,
    epsilon: float,
    *,
    norm: str = "l1",
    layers: str = "last",
    argmax: bool = False,
) -> Tensor:
    """The official per-sample loop: for each query, G by K backward calls, vertex (or subset)
    search, closed-form line search. ``x``: (B, C, H, W), ``probs``: (B, K) -> (B, K)."""
    served = []
    for i in range(x.shape[0]):
        y = probs[i]
        with torch.enable_grad():
            G = jacobian_nll(model, x[i : i + 1], layers)
        with torch.no_grad():
            ystar, _ = oracle_argmax_preserving(G, y) if argmax else oracle_extreme(G, y)
            alpha = closed_form_alpha(y, ystar, epsilon, norm)
            served.append((1 - alpha) * y + alpha * ystar)
    return torch.stack(served)
