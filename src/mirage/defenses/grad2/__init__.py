"""GRAD², gradient redirection (Mazeika et al., ICML 2022; docs/design.md §grad2), and its gated
form (docs/design.md §grad2-gated).

Per query, serve the maximiser of ⟨a_i, ỹ_i⟩ over Δ_K ∩ {‖ỹ_i − y_i‖₁ ≤ ε}, with
a_ik = (1/N)⟨∇_θ log p_θ(k|x_i), v⟩ on a surrogate θ (the paper's Algorithm 1, solved exactly by
:func:`mirage.defenses.redirect.redirect`, docs/design.md §redirect).

Modules: :mod:`.defense` (``grad2``), :mod:`.gated` (``grad2_gated``), :mod:`.scores` (the
scores a, docs/design.md §grad2-scores), :mod:`.targets` (the directions v, §grad2-targets).

Modes, one line each:

=========================  =====================================================================
``target="all-ones"``      v = 1 for every query: the paper's coordinated defense (default)
``target="min-ip"``        v = −g(y), against the clean batch gradient, recomputed per batch
``target="watermark"``     v = ∇ log-likelihood of a behaviour set: the clone learns it
``target="unlearn"``       v = −∇ log-likelihood of the defender's labelled reference set
``target="max-norm"``      v = θ
``target="random"``        v = a seeded Gaussian
``target="vector"``        v = a user's flat (P,) vector
``preserve_top1=True``     the maximiser keeps y's top-1 strictly (by ``top1_margin``)
``score_method``           ``fused`` (default), ``jvp`` or ``double-backward``: the same scores
surrogate ensemble         one member drawn per scoring batch (stateful)
``grad2_gated``            gate score < τ: the attacker's answer, else GRAD²(ε_low, top-1 kept)
``gate_score``             ``msp`` (the answer's), or ``oe-msp``, ``max-logit``, ``neg-energy``
``attacker_answer``        ``redirect``: GRAD²(ε_high), labels free to change
                           ``permute``: the posterior moved by a keyed derangement π
                           ``scramble``: the posterior moved by a permutation keyed on the query
``alarm_rate``             per-client stream alarm: after it, every answer is the attacker's
=========================  =====================================================================
"""

from __future__ import annotations

from mirage.defenses.grad2.defense import Grad2, Grad2Params
from mirage.defenses.grad2.gated import (
    AttackerAnswer,
    GatedGrad2,
    GatedGrad2Params,
    GateName,
    benign_threshold,
    gate_scores,
    keyed_query_permutations,
)
from mirage.defenses.grad2.targets import TargetName

__all__ = [
    "AttackerAnswer",
    "GateName",
    "GatedGrad2",
    "GatedGrad2Params",
    "Grad2",
    "Grad2Params",
    "TargetName",
    "benign_threshold",
    "gate_scores",
    "keyed_query_permutations",
]
