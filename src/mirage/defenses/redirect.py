"""The exact redirection step shared by GRAD², ModelGuard-W and friends (docs/design.md §redirect).

For every row, solve the linear program

    maximise ⟨s, ỹ⟩   subject to   ỹ ∈ Δ_K,   ‖ỹ − y‖₁ ≤ ε.

Moving mass m from class j to class c changes the objective by m·(s_c − s_j) and costs 2m of
budget, so the optimum (GRAD², Mazeika et al. 2022, Alg. 1) moves δ = min(ε/2, 1 − y_c) onto the
best-scoring class c = argmax s, taking it from the lowest-scoring classes first. One sort and
one cumsum per batch: O(B·K log K), no loop over rows or classes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mirage.defenses.base import check_probs


def as_row_budget(epsilon: float | Tensor, probs: Tensor) -> Tensor:
    """Broadcast a scalar or per-row budget to a (B, 1) tensor, checking its range."""
    eps = torch.as_tensor(epsilon, dtype=probs.dtype, device=probs.device)
    if eps.ndim > 1 or (eps.ndim == 1 and eps.shape[0] != probs.shape[0]):
        raise ValueError(
            f"epsilon must be a scalar or have shape ({probs.shape[0]},), got {tuple(eps.shape)}"
        )
    if not torch.isfinite(eps).all() or (eps < 0).any() or (eps > 2).any():
        raise ValueError("epsilon must lie in [0, 2] (the L1 diameter of the simplex)")
    return eps.reshape(-1, 1).expand(probs.shape[0], 1)


def check_scores(scores: Tensor, probs: Tensor) -> None:
    if not isinstance(scores, Tensor) or scores.shape != probs.shape:
        raise ValueError(f"scores must be a tensor of shape {tuple(probs.shape)}")
    if not torch.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinite values")


def move_mass_to_best(probs: Tensor, scores: Tensor, budget_mass: Tensor) -> Tensor:
    """Core of the solver without validation: move up to ``budget_mass`` (B, 1) of probability
    onto each row's best-scoring class, draining the worst-scoring classes first."""
    order = torch.argsort(scores, dim=1, stable=True)
    y_sorted = probs.gather(1, order)
    donors, best = y_sorted[:, :-1], y_sorted[:, -1:]
    delta = torch.minimum(budget_mass, 1 - best).clamp_min(0)
    drained_before = torch.cumsum(donors, dim=1) - donors
    take = torch.minimum((delta - drained_before).clamp_min(0), donors)
    moved = torch.cat([donors - take, best + take.sum(dim=1, keepdim=True)], dim=1)
    return torch.empty_like(probs).scatter_(1, order, moved)


def redirect(probs: Tensor, scores: Tensor, epsilon: float | Tensor) -> Tensor:
    """Return, for each row, a maximiser of ⟨scores, ỹ⟩ over Δ_K ∩ {‖ỹ − probs‖₁ ≤ ε}.

    Args:
        probs: (B, K) rows on the simplex (float32 or float64, any device).
        scores: (B, K) linear objective per row.
        epsilon: scalar or (B,) L1 budget in [0, 2].
    Returns:
        (B, K) tensor of the same dtype and device as ``probs``.
    """
    check_probs(probs)
    check_scores(scores, probs)
    return move_mass_to_best(probs, scores, as_row_budget(epsilon, probs) / 2)


TOP1_MARGIN = 1e-6
"""Default strict margin of the argmax-preserving form: ỹ_t ≥ ỹ_j + margin for every j ≠ t.
Large enough to survive float32 rounding of values in [0, 1] (spacing ≤ 6e-8), small enough to
cost nothing measurable."""

_GOLDEN_STEPS = 60  # 0.618^60 ≈ 3e-13: the top class's final mass to near float64 resolution


def _fill_value(amount: Tensor, sizes: Tensor, values: Tensor) -> Tensor:
    """Value of pouring ``amount`` (..., ) into slots ``sizes`` (..., L) in order, per-unit
    ``values`` (..., L): Σ_j values_j · clamp(amount − before_j, 0, sizes_j)."""
    before = sizes.cumsum(-1) - sizes
    return (values * torch.minimum((amount.unsqueeze(-1) - before).clamp_min(0), sizes)).sum(-1)


def _top1_inner(
    u: Tensor,
    y_top: Tensor,
    s_top: Tensor,
    y_rest: Tensor,
    s_rest: Tensor,
    eps: Tensor,
    margin: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Best objective with the top class's final mass fixed to ``u`` (B, J).

    The other K−1 classes (``y_rest``, ``s_rest``: (B, K−1), sorted by score, descending) are
    capped at c = u − margin. Classes above the cap are forced down to it (mass F); the remaining
    freedom is one scalar q ≥ 0 — extra mass drained from the lowest-scoring classes — with
    p = F + d + q (d = y_top − u) poured into the highest-scoring classes below the cap. Pouring
    and draining never need to cross: for a split m of the score order, receivers [0, m) and
    donors [m, K−1) gain on every unit, so the gain is increasing up to
    q_cross = max_m min(room[0, m) − F − d, drainable[m, K−1)) and decreasing after (concave);
    the optimum is q_cross clipped to the feasible [q_lo, q_hi]. Returns (value, q*, min L1 cost).
    """
    cap_level = (u - margin).unsqueeze(-1)  # (B, J, 1)
    y = y_rest.unsqueeze(1)  # (B, 1, K-1)
    s = s_rest.unsqueeze(1)
    room = (cap_level - y).clamp_min(0)
    over = (y - cap_level).clamp_min(0)
    drainable = torch.minimum(y, cap_level).clamp_min(0)
    forced = over.sum(-1)
    d = y_top.unsqueeze(1) - u
    min_cost = (u - y_top.unsqueeze(1)).abs() + torch.maximum(2 * forced + d, -d)
    zero = torch.zeros_like(room[..., :1])
    room_prefix = torch.cat([zero, room.cumsum(-1)], -1)  # room in [0, m)
    drain_suffix = torch.cat(
        [drainable.flip(-1).cumsum(-1).flip(-1), zero], -1
    )  # drainable in [m, L)
    q_cross = torch.minimum(room_prefix - (forced + d).unsqueeze(-1), drain_suffix).max(-1).values
    budget_left = eps.unsqueeze(1) - (u - y_top.unsqueeze(1)).abs()
    q_lo = (-d - forced).clamp_min(0)
    q_hi = torch.minimum(
        torch.minimum((budget_left - d) / 2 - forced, drain_suffix[..., 0]),
        room_prefix[..., -1] - forced - d,
    )
    q_star = torch.minimum(q_cross, q_hi).maximum(q_lo)
    gain = _fill_value(forced + d + q_star, room, s.expand_as(room)) - _fill_value(
        q_star, drainable.flip(-1), s.flip(-1).expand_as(room)
    )
    value = s_top.unsqueeze(1) * u + (s * y).sum(-1) - (s * over).sum(-1) + gain
    return value, q_star, min_cost


def redirect_top1_preserving(
    probs: Tensor, scores: Tensor, epsilon: float | Tensor, *, margin: float = TOP1_MARGIN
) -> tuple[Tensor, Tensor]:
    """Argmax-preserving redirection (mirage, beyond GRAD²): per row, maximise ⟨s, ỹ⟩ over
    Δ_K ∩ {‖ỹ − y‖₁ ≤ ε} ∩ {ỹ_t ≥ ỹ_j + margin ∀ j ≠ t}, t = argmax y (first index on ties).

    Structure: fixing the top class's final mass u, the rest is a greedy fill with caps u −
    margin (see :func:`_top1_inner`); the optimal value V(u) is concave in u (projection of a
    polytope), and adding a steep penalty on the convex minimum budget outside the feasible
    u-interval keeps it unimodal, so a vectorised golden-section search over u (60 steps, all
    rows at once) finds the optimum to ~1e-12. Computed in float64; O(B·K) per step after one sort.

    Args:
        probs: (B, K) simplex rows; scores: (B, K); epsilon: scalar or (B,) in [0, 2].
        margin: the strict gap kept between the top class and every other class.
    Returns:
        ``(served, feasible)``: (B, K) rows in ``probs``' dtype and a (B,) bool mask. Rows where
        no point within ε keeps top-1 by ``margin`` (e.g. exact ties in y with ε too small) are
        returned unchanged and flagged ``False``.
    """
    check_probs(probs)
    check_scores(scores, probs)
    if not 0 <= margin < 1:
        raise ValueError(f"margin must lie in [0, 1), got {margin}")
    eps = as_row_budget(epsilon, probs).squeeze(1).double()
    y, s = probs.double(), scores.double()
    k = y.shape[1]
    top = y.argmax(1, keepdim=True)
    y_top, s_top = y.gather(1, top).squeeze(1), s.gather(1, top).squeeze(1)
    order = torch.argsort(s.scatter(1, top, float("-inf")), dim=1, descending=True, stable=True)[
        :, : k - 1
    ]
    y_rest, s_rest = y.gather(1, order), s.gather(1, order)
    spread = (s.max(1).values - s.min(1).values).unsqueeze(1)
    steep = 10.0 * k * (spread + 1.0)

    def objective(u: Tensor) -> Tensor:
        value, _, min_cost = _top1_inner(u, y_top, s_top, y_rest, s_rest, eps, margin)
        return value - steep * (min_cost - eps.unsqueeze(1)).clamp_min(0)

    lo = torch.maximum((1 + (k - 1) * margin) / k * torch.ones_like(y_top), y_top - eps / 2)
    hi = torch.minimum(torch.ones_like(y_top), y_top + eps / 2)
    lo = torch.minimum(lo, hi)
    ratio = (5**0.5 - 1) / 2
    inner_lo, inner_hi = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    f_lo, f_hi = (
        objective(inner_lo.unsqueeze(1)).squeeze(1),
        objective(inner_hi.unsqueeze(1)).squeeze(1),
    )
    for _ in range(
        _GOLDEN_STEPS
    ):  # golden-section search: one evaluation per step, all rows at once
        right = f_lo < f_hi
        lo = torch.where(right, inner_lo, lo)
        hi = torch.where(right, hi, inner_hi)
        probe = torch.where(right, lo + ratio * (hi - lo), hi - ratio * (hi - lo))
        f_probe = objective(probe.unsqueeze(1)).squeeze(1)
        inner_lo, inner_hi = (
            torch.where(right, inner_hi, probe),
            torch.where(right, probe, inner_lo),
        )
        f_lo, f_hi = torch.where(right, f_hi, f_probe), torch.where(right, f_probe, f_lo)
    u = ((lo + hi) / 2).unsqueeze(1)
    _, q_star, min_cost = _top1_inner(u, y_top, s_top, y_rest, s_rest, eps, margin)
    cap_level = u - margin
    room = (cap_level - y_rest).clamp_min(0)
    over = (y_rest - cap_level).clamp_min(0)
    drainable = torch.minimum(y_rest, cap_level).clamp_min(0).flip(1)
    pour = over.sum(1, keepdim=True) + (y_top.unsqueeze(1) - u) + q_star
    poured = torch.minimum((pour - (room.cumsum(1) - room)).clamp_min(0), room)
    drained = torch.minimum(
        (q_star - (drainable.cumsum(1) - drainable)).clamp_min(0), drainable
    ).flip(1)
    rest = (y_rest - over + poured - drained).clamp_min(0)
    served = torch.empty_like(y).scatter_(1, order, rest).scatter_(1, top, u)
    capacity_ok = (k - 1) * cap_level.squeeze(1) >= 1 - u.squeeze(1) - 1e-12
    feasible = (min_cost.squeeze(1) <= eps + 1e-9) & capacity_ok & (cap_level.squeeze(1) >= 0)
    served = torch.where(feasible.unsqueeze(1), served, y)
    return served.to(probs.dtype), feasible
