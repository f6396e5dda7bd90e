"""Per-sample Gram matrices of the surrogate's log-likelihood Jacobian, for MAD (docs/design.md
§mad).

MAD's objective only ever needs inner products of columns Gᵀa, where G (K×D) is the Jacobian
∂ log p_S(k|x)/∂w of one query. With M = G Gᵀ (K×K, per query):

    ⟨Gᵀa, Gᵀb⟩ = aᵀ M b.

``last``: w = the final linear layer's weight W (K×H). With features h and probabilities p,
∂ log p_k/∂W = (e_k − p) hᵀ, hence M = ‖h‖² (I − 1pᵀ − p1ᵀ + ‖p‖² 11ᵀ): one forward, no backward.

``all``: w = every parameter. One forward with hooks that keep each layer's input a and output, then
ONE backward batched over the K classes (``is_grads_batched``; for small batches, one backward of
the batch repeated K times) that gives the K output gradients δ_k of every layer; the per-layer Gram
is assembled without a per-sample, per-class parameter gradient wherever a layer allows it
(Opacus-style "ghost" products):
Linear: M = (δ δᵀ)(‖a‖² + 1 for the bias); Conv2d: per layer the cheaper of explicit per-sample
gradients from the unfolded input U and the ghost product Σ_{t,t'} (UᵀU)_{tt'} ⟨δ_k,t, δ_l,t'⟩;
BatchNorm2d (eval): explicit per-channel gradients.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GRAM_LAYERS = (nn.Linear, nn.Conv2d, nn.BatchNorm2d)


def last_layer_gram_from_norms(features_sq: Tensor, probs: Tensor) -> Tensor:
    """M = G Gᵀ for G = ∂ log p/∂W of the final linear layer's weight (bias excluded, as the
    official MAD code). ``features_sq``: ‖h‖² (B,), ``probs``: (B, K) surrogate softmax
    -> (B, K, K)."""
    k = probs.shape[1]
    eye = torch.eye(k, dtype=probs.dtype, device=probs.device)
    centred = eye.unsqueeze(0) - probs.unsqueeze(1)  # row k: e_k − p, (B, K, K)
    return centred @ centred.transpose(1, 2) * features_sq.view(-1, 1, 1)


def _check_supported(model: nn.Module) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False)]
        if not own:
            continue
        if not isinstance(module, GRAM_LAYERS):
            raise ValueError(  # noqa: TRY004
                f"layers='all' supports {[c.__name__ for c in GRAM_LAYERS]}; "
                f"module {name!r} is {type(module).__name__} (use layers='last')"
            )
        if isinstance(module, nn.BatchNorm2d) and module.training:
            raise ValueError("layers='all' needs BatchNorm in eval mode (per-sample Jacobians)")
        if isinstance(module, nn.Conv2d) and (
            module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str)
        ):
            raise ValueError(
                f"layers='all': conv {name!r} must use groups=1 and numeric zero padding"
            )
        layers.append(module)
    return layers


def _layer_gram(module: nn.Module, a: Tensor, delta: Tensor) -> Tensor:
    """Gram contribution (B, K, K) of one layer's parameters; a: layer input (B, ...),
    delta: output gradients (K, B, ...)."""
    if isinstance(module, nn.Linear):
        if a.ndim != 2:
            raise ValueError("layers='all': Linear layers must see (B, features) inputs")
        d = delta.transpose(0, 1)  # (B, K, O)
        dd = d @ d.transpose(1, 2)
        scale = a.pow(2).sum(1) + (1.0 if module.bias is not None else 0.0)
        return dd * scale.view(-1, 1, 1)
    if isinstance(module, nn.Conv2d):
        k, b = delta.shape[:2]
        assert not isinstance(module.padding, str)  # _check_supported refuses string padding
        unfolded = F.unfold(
            a,
            module.kernel_size,
            dilation=module.dilation,
            padding=module.padding,
            stride=module.stride,
        )  # (B, C·kh·kw, T)
        d = delta.reshape(k, b, module.out_channels, -1).transpose(0, 1)  # (B, K, O, T)
        c, t = unfolded.shape[1:]
        o = module.out_channels
        if t * t * (c + k * o) + k * k * o * t < k * o * c * t:
            # Ghost product: Σ_{t,t'} (UᵀU)_{tt'} ⟨δ_k,t, δ_l,t'⟩ without per-sample gradients.
            patches = unfolded.transpose(1, 2) @ unfolded  # (B, T, T)
            mixed = (d.flatten(1, 2) @ patches).view(b, k, o * t)  # δ_k P
            gram = mixed @ d.flatten(2).transpose(1, 2)
        else:
            grads = (d.flatten(1, 2) @ unfolded.transpose(1, 2)).view(
                b, k, -1
            )  # per-sample weight grads
            gram = grads @ grads.transpose(1, 2)
        if module.bias is not None:
            bias = d.sum(-1)  # (B, K, O)
            gram = gram + bias @ bias.transpose(1, 2)
        return gram
    # BatchNorm2d in eval mode: out = γ·x̂ + β.
    assert isinstance(module, nn.BatchNorm2d)  # _check_supported lets only GRAM_LAYERS through
    mean, var = module.running_mean, module.running_var
    if mean is None or var is None:
        raise ValueError("layers='all' needs BatchNorm with running statistics")
    xhat = (a - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + module.eps)
    gram = torch.zeros(a.shape[0], delta.shape[0], delta.shape[0], dtype=a.dtype, device=a.device)
    if module.weight is not None:
        gamma = torch.einsum("kbchw,bchw->bkc", delta, xhat)
        gram = gram + gamma @ gamma.transpose(1, 2)
    if module.bias is not None:
        beta = delta.sum((-1, -2)).transpose(0, 1)
        gram = gram + beta @ beta.transpose(1, 2)
    return gram


REPLICATE_MAX_ROWS = 64
"""Below this many rows B·K, the K backward passes are one ordinary backward over the batch
repeated K times (cheap for small B, where a vmapped backward is dominated by overhead)."""


def full_network_gram(
    model: nn.Module,
    x: Tensor,
    *,
    num_classes: int | None = None,
    replicate_max_rows: int = REPLICATE_MAX_ROWS,
) -> tuple[Tensor, Tensor]:
    """Per-sample M = G Gᵀ over ALL parameters, G = ∂ log p_S(·|x_i)/∂θ (K×P per sample).

    ``x``: (B, C, H, W) -> (M (B, K, K), surrogate probabilities (B, K)). One forward and one
    backward batched over the K classes (``is_grads_batched``), or for B·K ≤ ``replicate_max_rows``
    one forward and one backward of the batch repeated K times (row (i, k) backpropagates
    log p_k(x_i)); never a loop over samples or classes. ``num_classes`` spares a probe forward.
    """
    layers = _check_supported(model)
    inputs: dict[nn.Module, Tensor] = {}
    outputs: dict[nn.Module, Tensor] = {}

    def keep(module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> None:
        inputs[module] = args[0].detach()
        outputs[module] = out

    b = x.shape[0]
    handles = [layer.register_forward_hook(keep) for layer in layers]
    try:
        with torch.enable_grad():
            # The input requires grad so every layer output is in the graph even when the
            # surrogate's parameters are frozen.
            k = num_classes
            if k is None and replicate_max_rows > 0:
                with torch.no_grad():
                    k = model(x[:1]).shape[1]
            replicate = k is not None and b * k <= replicate_max_rows
            x_in = (
                x.detach().repeat_interleave(k, dim=0)
                if replicate and k is not None
                else x.detach()
            )
            log_probs = torch.log_softmax(model(x_in.requires_grad_(True)), dim=1)
            if replicate and log_probs.shape[1] != k:
                raise ValueError(f"surrogate has {log_probs.shape[1]} classes but probs have {k}")
            k = log_probs.shape[1]
            wanted = [outputs[m] for m in layers]
            if replicate:
                picked = log_probs.view(b, k, k).diagonal(dim1=1, dim2=2).sum()
                deltas: Sequence[Tensor] = [
                    d.view(b, k, *d.shape[1:]).transpose(0, 1)
                    for d in torch.autograd.grad(picked, wanted)
                ]
                for m in layers:
                    inputs[m] = inputs[m].view(b, k, *inputs[m].shape[1:])[:, 0]
                log_probs = log_probs.view(b, k, k)[:, 0]
            else:
                basis = torch.eye(k, dtype=log_probs.dtype, device=log_probs.device)
                basis = basis.unsqueeze(1).expand(k, b, k)
                deltas = torch.autograd.grad(log_probs, wanted, basis, is_grads_batched=True)
    finally:
        for handle in handles:
            handle.remove()
    gram = torch.zeros(b, k, k, dtype=log_probs.dtype, device=log_probs.device)
    for layer, delta in zip(layers, deltas, strict=True):
        gram = gram + _layer_gram(layer, inputs[layer], delta)
    return gram, log_probs.detach().exp()
