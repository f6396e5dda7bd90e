"""Faithful re-implementation of the original GRAD² code path (Mazeika et al., ICML 2022,
github.com/mmazeika/model-stealing-defenses, ``method_gradient_redirection``). Used by
``tests/defenses/test_grad2_original.py`` (equality with mirage's GRAD², all-ones target) and
``benchmarks/grad2_overhead.py`` (speed).

What it reproduces, per batch of 32 queries: a victim forward; the surrogate's flattened gradient
G^T ỹ with ``create_graph=True``; the inner product with the target direction and a second backward
to get ∂/∂ỹ; then, for every row, a Python greedy loop that reads probabilities one ``.item()`` at a
time, giving mass min(1 − ỹ_c, ε/2) to the best class and taking it from the worst classes first,
then re-normalises through softmax(log(clamp(ỹ))). (The original minimises ⟨G^T ỹ, −v⟩; here we
maximise ⟨G^T ỹ, v⟩, the same.)
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn


def _flat_log_likelihood_gradient(x: Tensor, surrogate: nn.Module, y: Tensor) -> Tensor:
    logits = surrogate(x)
    log_p = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    objective = (y * log_p).sum(1).mean(0)
    grads = torch.autograd.grad([objective], list(surrogate.parameters()), create_graph=True)
    return torch.cat([g.view(-1) for g in grads])


def _greedy_row(batch_probs: Tensor, row: int, scores: Tensor, epsilon: float) -> Tensor:
    """The original per-row loop, operation for operation: a clone of the batch indexed by row,
    a 0-d tensor accumulator compared against Python floats, one ``.item()`` per visited class,
    an ``np.isclose`` exit test, and the final log/clamp/softmax round trip."""
    order = torch.argsort(scores)  # smallest to largest; the original minimises ⟨G^T ỹ, −v⟩
    order = order.flip(0)  # ... so with +v the receiver is the largest score
    pointer = len(order) - 1
    tmp = batch_probs.clone()[row]
    can_give = min(1 - tmp[order[0]].item(), epsilon / 2)
    found = torch.zeros(1)[0]
    while found < can_give:
        here = tmp[order[pointer]].item()
        if found + here <= can_give:
            tmp[order[pointer]] -= here
            found += here
        elif found + here > can_give:
            tmp[order[pointer]] -= can_give - found
            found += can_give - found
        pointer -= 1
        if np.isclose(found.item(), can_give):
            break
    tmp[order[0]] += found
    return torch.softmax(torch.log(torch.clamp(tmp, 1e-15, 1)), dim=0).unsqueeze(0)


def original_grad2(
    x: Tensor,
    victim: nn.Module,
    surrogate: nn.Module,
    v_flat: Tensor,
    epsilon: float,
    batch_size: int = 32,
) -> Tensor:
    """Served posteriors (B, K) for queries ``x`` the way the original code computed them."""
    served = []
    for xb in x.split(batch_size):
        with torch.no_grad():
            y = torch.softmax(victim(xb), dim=1)
        y.requires_grad_()
        g = _flat_log_likelihood_gradient(xb, surrogate, y.clone())
        (scores,) = torch.autograd.grad([(g * v_flat).sum()], [y])
        with torch.no_grad():
            served.append(
                torch.cat([_greedy_row(y.detach(), i, scores[i], epsilon) for i in range(len(xb))])
            )
    return torch.cat(served)
