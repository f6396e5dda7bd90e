"""Angular deviation between the training gradient a clean answer and a served answer induce
(MAD paper, section 5.2): θ = ∠(∇_w ⟨y, log F(x; w)⟩, ∇_w ⟨ỹ, log F(x; w)⟩), per query."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap


def angular_deviation(
    model: nn.Module, x: Tensor, clean: Tensor, served: Tensor, *, chunk: int = 32
) -> Tensor:
    """Degrees, shape (N,), for each query's per-sample gradient w.r.t. all of ``model``'s
    parameters. Truncated rows (sum < 1) are renormalised first."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def log_likelihood(p, image, target):
        logits = functional_call(model, (p, buffers), (image.unsqueeze(0),))
        return (target * F.log_softmax(logits, dim=1)[0]).sum()

    per_sample = vmap(grad(log_likelihood), in_dims=(None, 0, 0))
    served = served / served.sum(dim=1, keepdim=True).clamp_min(1e-12)
    was_training = model.training
    model.eval()
    angles = []
    for xs, ys, ts in zip(x.split(chunk), clean.split(chunk), served.split(chunk)):
        g_clean = per_sample(params, xs, ys)
        g_served = per_sample(params, xs, ts)
        flat_clean = torch.cat([g.flatten(1) for g in g_clean.values()], dim=1)
        flat_served = torch.cat([g.flatten(1) for g in g_served.values()], dim=1)
        cos = F.cosine_similarity(flat_clean, flat_served, dim=1, eps=1e-12).clamp(-1, 1)
        angles.append(torch.rad2deg(torch.arccos(cos)))
    model.train(was_training)
    return torch.cat(angles)
