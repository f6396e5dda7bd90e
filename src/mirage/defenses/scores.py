"""Per-class redirection scores of GRAD² (Mazeika et al., ICML 2022; docs/design.md §grad2-scores).

The attacker's update on a batch X of N queries answered with ỹ is
``g(ỹ) = ∇_θ (1/N) Σ_i Σ_k ỹ_ik log p_θ(k|x_i)``, linear in ỹ, so for a target direction v

    ⟨g(ỹ), v⟩ = Σ_i ⟨a_i, ỹ_i⟩,   a_ik = (1/N) ⟨∇_θ log p_θ(k|x_i), v⟩.

:func:`jvp_scores` gets all of ``a`` (N, K) with ONE forward-mode Jacobian-vector product of the
surrogate's log-softmax along v (``torch.func.jvp``): the cost of about two forward passes.
:func:`double_backward_scores` is the original code's route (grad w.r.t. θ with
``create_graph=True``, then grad of ⟨·, v⟩ w.r.t. ỹ). Both use the full network.

:func:`fused_jvp_scores` is the same forward-mode product written out layer by layer for the
common layers (conv, linear, ReLU, max-pool, flatten, normalisation): the primal and tangent
passes share one batched call per layer, the input's tangent is zero (the first layer's
``conv(dx, W)`` is skipped), and for an all-ones direction ``conv(x, 1)`` / ``x·1ᵀ`` reduce to a
channel sum and a box filter. A user's own module is traced once with ``torch.fx`` and walked
node by node with the same rules (docs/design.md §any-module). Unknown submodules and calls fall
back to ``torch.func.jvp`` on that submodule or call, so any network works.

A target ``v`` is a dict ``{parameter name: tensor}`` shaped like ``model.named_parameters()``.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.func import functional_call, jvp
from torch.utils._pytree import tree_flatten, tree_unflatten

Direction = dict[str, Tensor]
log = logging.getLogger(__name__)


def check_direction(model: nn.Module, v: Direction) -> None:
    """Raise ``ValueError`` unless ``v`` has one tensor per parameter of ``model``, same shapes."""
    names = {name: p.shape for name, p in model.named_parameters()}
    if set(v) != set(names):
        missing, extra = sorted(set(names) - set(v)), sorted(set(v) - set(names))
        raise ValueError(
            "direction does not match the surrogate's parameters "
            f"(missing {missing}, extra {extra})"
        )
    for name, shape in names.items():
        if v[name].shape != shape:
            raise ValueError(
                f"direction {name!r} has shape {tuple(v[name].shape)}, expected {tuple(shape)}"
            )


def jvp_scores(model: nn.Module, x: Tensor, v: Direction) -> Tensor:
    """a = (1/N)·J_θ[log softmax f_θ(x)]·v for a batch ``x`` (N, C, H, W) -> (N, K).

    One ``torch.func.jvp`` through the whole surrogate (in its current mode; use ``eval()``).
    """
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = {name: b.detach() for name, b in model.named_buffers()}
    tangents = {name: v[name].to(params[name]) for name in params}

    def log_probs(p: Direction) -> Tensor:
        return F.log_softmax(functional_call(model, (p, buffers), (x,)), dim=1)

    with torch.no_grad():
        _, tangent = _jvp(log_probs, (params,), (tangents,))
    return tangent / x.shape[0]


def _jvp(func: Callable[..., Any], primals: Any, tangents: Any) -> tuple[Any, Any]:
    """``torch.func.jvp`` (no ``has_aux``): (output, tangent). Its annotation also allows the
    triple of ``has_aux=True``."""
    out = jvp(func, primals, tangents)
    return out[0], out[1]


def double_backward_scores(model: nn.Module, x: Tensor, v: Direction) -> Tensor:
    """Same ``a`` (N, K) by double backward: ∂/∂ỹ ⟨∇_θ (1/N) Σ ỹ·log p_θ, v⟩ (original method)."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    with torch.enable_grad():
        log_p = F.log_softmax(model(x), dim=1)
        weights = torch.zeros_like(log_p, requires_grad=True)
        objective = (weights * log_p).sum() / x.shape[0]
        grads = torch.autograd.grad(
            objective, [p for _, p in named], create_graph=True, allow_unused=True
        )
        inner = sum(
            (g * v[name].to(g)).sum()
            for (name, _), g in zip(named, grads, strict=True)
            if g is not None
        )
        if not isinstance(inner, Tensor):
            raise ValueError("no parameter of the surrogate gets a gradient")  # noqa: TRY004
        (scores,) = torch.autograd.grad(inner, weights)
    return scores.detach()


def _is_ones(t: Tensor | None) -> bool:
    """O(1) test for the all-ones direction as built by :func:`mirage.defenses.targets.all_ones`
    (a broadcast scalar 1, every stride 0); any other tensor takes the general path."""
    return (
        t is not None
        and t.numel() > 0
        and all(s == 0 for s in t.stride())
        and t[(0,) * t.ndim].item() == 1
    )


def _linear_like(
    op,
    x: Tensor,
    dx: Tensor | None,
    weight: Tensor,
    bias: Tensor | None,
    v_weight: Tensor,
    v_bias: Tensor | None,
    ones_op,
    channel_dim: int = 1,
) -> tuple[Tensor, Tensor]:
    """Primal and tangent of op(x, W) + b along (dx, V_W, V_b), one batched call for W; the bias
    runs along ``channel_dim`` of the output (1 for a convolution, -1 for a linear layer, whose
    input may be a sequence of tokens (B, T, D))."""
    if dx is None:
        y, dy = op(x, weight), None
    else:
        both = op(torch.cat([x, dx]), weight)
        y, dy = both[: len(x)], both[len(x) :]
    extra = ones_op(x) if _is_ones(v_weight) else op(x, v_weight)
    dy = extra if dy is None else dy + extra
    if bias is not None:
        along = [1] * y.ndim
        along[channel_dim] = -1
        y = y + bias.view(along)
        if v_bias is not None and dy.stride(channel_dim) == 0 and _is_ones(v_bias):
            # all-ones on a first layer: still one channel
            dy = (dy.narrow(channel_dim, 0, 1) + 1).expand_as(dy)
        elif v_bias is not None:
            dy = dy + v_bias.view(along)
    return y, dy


def _tiled_pool(module: nn.MaxPool2d, x: Tensor) -> tuple[int, int] | None:
    """(kh, kw) when the pooling windows tile the input exactly (kernel = stride, no padding)."""
    pair = nn.modules.utils._pair
    kernel, stride, padding = (
        pair(module.kernel_size),
        pair(module.stride or module.kernel_size),
        pair(module.padding),
    )
    if kernel != stride or padding != (0, 0) or x.ndim != 4:
        return None
    if x.shape[2] % kernel[0] or x.shape[3] % kernel[1]:
        return None
    return kernel


def _tiled_max_pool(
    x: Tensor, dx: Tensor | None, kernel: tuple[int, int]
) -> tuple[Tensor, Tensor | None]:
    """Max-pool with non-overlapping windows as a max over the kh·kw strided views (no copies);
    the tangent follows the first maximum, like ``max_pool2d``'s indices: it is taken from the
    last view to the first wherever the view attains the maximum, so the first such view wins."""
    kh, kw = kernel
    views = [x[:, :, i::kh, j::kw] for i in range(kh) for j in range(kw)]
    y = views[0]
    for view in views[1:]:
        y = torch.maximum(y, view)
    if dx is None:
        return y, None
    tangents = [dx[:, :, i::kh, j::kw] for i in range(kh) for j in range(kw)]
    dy = tangents[-1]
    for view, tangent in zip(views[-2::-1], tangents[-2::-1], strict=True):
        dy = torch.where(view == y, tangent, dy)
    return y, dy


def _tangent(
    module: nn.Module, x: Tensor, dx: Tensor | None, v: Direction, prefix: str
) -> tuple[Tensor, Tensor | None]:
    """(module(x), d module(x)) along input tangent ``dx`` (None = 0) and parameter tangent
    ``v``."""
    from mirage.models.base import ImageClassifier, Normalize

    def p(name: str) -> Tensor | None:
        return v.get(prefix + name)

    if isinstance(module, ImageClassifier):
        for part in ("normalize", "body", "classifier"):
            x, dx = _tangent(getattr(module, part), x, dx, v, f"{prefix}{part}.")
        return x, dx
    if isinstance(module, nn.Sequential):
        children = list(module.named_children())
        for i in range(len(children) - 1):
            # max-pool commutes with ReLU (monotone), primal and tangent alike: pool first,
            # 4x less work
            if isinstance(children[i][1], nn.ReLU) and isinstance(children[i + 1][1], nn.MaxPool2d):
                children[i], children[i + 1] = children[i + 1], children[i]
        for name, child in children:
            x, dx = _tangent(child, x, dx, v, f"{prefix}{name}.")
        return x, dx
    if isinstance(module, Normalize):
        return module(x), None if dx is None else dx / module.std
    if isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros":
        stride, padding, dilation = module.stride, module.padding, module.dilation

        def op(inp: Tensor, w: Tensor) -> Tensor:
            return F.conv2d(inp, w, None, stride=stride, padding=padding, dilation=dilation)

        def ones_op(inp: Tensor) -> Tensor:
            box = torch.ones(1, 1, *module.kernel_size, dtype=inp.dtype, device=inp.device)
            return F.conv2d(
                inp.sum(1, keepdim=True),
                box,
                None,
                stride=stride,
                padding=padding,
                dilation=dilation,
            ).expand(-1, module.out_channels, -1, -1)

        return _linear_like(
            op, x, dx, module.weight, module.bias, v[prefix + "weight"], p("bias"), ones_op
        )
    if isinstance(module, nn.Linear):

        def ones_linear(inp: Tensor) -> Tensor:
            return inp.sum(-1, keepdim=True).expand(*inp.shape[:-1], module.out_features)

        return _linear_like(
            F.linear,
            x,
            dx,
            module.weight,
            module.bias,
            v[prefix + "weight"],
            p("bias"),
            ones_linear,
            channel_dim=-1,
        )
    if isinstance(module, nn.ReLU):
        return F.relu(x), None if dx is None else torch.where(x > 0, dx, 0.0)
    if isinstance(module, nn.MaxPool2d) and not module.ceil_mode and module.dilation == 1:
        if tiled := _tiled_pool(module, x):
            return _tiled_max_pool(x, dx, tiled)
        y, index = F.max_pool2d(
            x, module.kernel_size, module.stride, module.padding, return_indices=True
        )
        if dx is None:
            return y, None
        return y, dx.flatten(2).gather(2, index.flatten(2)).view_as(y)
    if isinstance(module, nn.Flatten):
        return module(x), None if dx is None else module(dx)
    if isinstance(module, nn.Dropout | nn.Identity) and not module.training:
        return x, dx
    if (graph := _graph_of(module)) is not None:
        try:
            return _graph_tangent(graph, module, x, dx, v, prefix)
        except Exception as error:  # noqa: BLE001 (a call the walk cannot take: the generic route)
            log.warning(
                "GRAD² fused scores: %s's graph cannot be walked (%s: %s); "
                "using torch.func.jvp on it",
                type(module).__name__,
                type(error).__name__,
                error,
            )
            _GRAPHS[module] = None
    return _module_jvp(module, x, dx, v, prefix)


def _module_jvp(
    module: nn.Module, x: Tensor, dx: Tensor | None, v: Direction, prefix: str
) -> tuple[Tensor, Tensor]:
    """The generic route: ``torch.func.jvp`` through ``module`` alone."""
    params = {name: t.detach() for name, t in module.named_parameters()}
    buffers = {name: b.detach() for name, b in module.named_buffers()}
    tangents = {name: v[prefix + name].to(t) for name, t in params.items()}

    def call(ps: Direction, inp: Tensor) -> Tensor:
        return functional_call(module, (ps, buffers), (inp,))

    return _jvp(call, (params, x), (tangents, torch.zeros_like(x) if dx is None else dx))


class _Leaves(fx.Tracer):
    """Keeps torch.nn's layers and mirage's own classifier pieces whole: :func:`_tangent` knows
    them."""

    def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
        from mirage.models.base import ImageClassifier, Normalize

        return isinstance(m, ImageClassifier | Normalize) or super().is_leaf_module(
            m, qualified_name
        )


_GRAPHS: weakref.WeakKeyDictionary[nn.Module, fx.Graph | None] = weakref.WeakKeyDictionary()


def _graph_of(module: nn.Module) -> fx.Graph | None:
    """The ``torch.fx`` graph of a user's module (traced once, in its current mode), or ``None``
    for torch's own layers and for forwards that do not trace (data-dependent control flow)."""
    if type(module).__module__.startswith("torch."):
        return None
    if module not in _GRAPHS:
        try:
            _GRAPHS[module] = _Leaves().trace(module)
        except Exception:  # noqa: BLE001 (any untraceable forward takes the generic route)
            _GRAPHS[module] = None
    return _GRAPHS[module]


_RELU = {F.relu, torch.relu, "relu"}
_SHAPE_OPS = {
    torch.flatten,
    torch.reshape,
    torch.squeeze,
    torch.unsqueeze,
    torch.permute,
    torch.transpose,
    "flatten",
    "view",
    "reshape",
    "squeeze",
    "unsqueeze",
    "permute",
    "transpose",
    "contiguous",
    "view_as",
    "reshape_as",
}
_IDENTITY = {F.dropout, F.dropout2d}
_NO_TANGENT = {"size", "dim", "numel", getattr, len}


class _PendingReLU:
    """A ReLU whose only consumer is a max-pool: pooled first (they commute), 4x less work."""

    def __init__(self, x: Tensor, dx: Tensor | None) -> None:
        self.x, self.dx = x, dx


def _is_pool(node: fx.Node, module: nn.Module) -> bool:
    if node.op == "call_module":
        return isinstance(module.get_submodule(str(node.target)), nn.MaxPool2d)
    return (
        node.op == "call_function"
        and node.target is F.max_pool2d
        and not node.kwargs.get("return_indices")
    )


def _relu(x: Tensor, dx: Tensor | None) -> tuple[Tensor, Tensor | None]:
    return F.relu(x), None if dx is None else torch.where(x > 0, dx, 0.0)


def _graph_tangent(
    graph: fx.Graph, module: nn.Module, x: Tensor, dx: Tensor | None, v: Direction, prefix: str
) -> tuple[Tensor, Tensor | None]:
    """(module(x), tangent) by walking the traced graph of a user's module: known modules and
    functions by their fused rule, every other call by ``torch.func.jvp`` on that call alone."""
    env: dict[fx.Node, tuple[Any, Any]] = {}
    placeholders = 0
    done_with = _last_uses(graph)

    def primal(a: Any) -> Any:
        value = env[a][0] if isinstance(a, fx.Node) else a
        return _relu(value.x, None)[0] if isinstance(value, _PendingReLU) else value

    def tangent(a: Any) -> Any:
        if not isinstance(a, fx.Node):
            return None
        value = env[a]
        return _relu(value[0].x, value[0].dx)[1] if isinstance(value[0], _PendingReLU) else value[1]

    for node in graph.nodes:
        op, target = node.op, node.target
        if op == "placeholder":
            if placeholders == 0:
                env[node] = (x, dx)
            elif node.args:
                env[node] = (node.args[0], None)
            else:
                raise ValueError(f"{type(module).__name__}.forward takes more than one input")
            placeholders += 1
        elif op == "get_attr":
            value = _fetch(module, str(target))
            direction = v.get(prefix + str(target)) if isinstance(value, nn.Parameter) else None
            env[node] = (
                value.detach() if isinstance(value, Tensor) else value,
                None if direction is None else direction.to(value),
            )
        elif op == "output":
            out = node.args[0]
            return primal(out), tangent(out)
        elif op == "call_module" and len(node.args) == 1 and not node.kwargs:
            sub = module.get_submodule(str(target))
            source = env[node.args[0]][0] if isinstance(node.args[0], fx.Node) else None
            if isinstance(source, _PendingReLU) and isinstance(sub, nn.MaxPool2d):
                pooled, d_pooled = _tangent(sub, source.x, source.dx, v, f"{prefix}{target}.")
                env[node] = _relu(pooled, d_pooled)
            else:
                env[node] = _tangent(
                    sub, primal(node.args[0]), tangent(node.args[0]), v, f"{prefix}{target}."
                )
        elif op in ("call_function", "call_method"):
            key = target if op == "call_function" else str(target)
            first = node.args[0] if node.args else None
            if key in _RELU and isinstance(first, fx.Node):
                users = list(node.users)
                if len(users) == 1 and _is_pool(users[0], module):
                    env[node] = (_PendingReLU(primal(first), tangent(first)), None)
                else:
                    env[node] = _relu(primal(first), tangent(first))
            elif (
                key is F.max_pool2d
                and not node.kwargs.get("return_indices")
                and isinstance(first, fx.Node)
            ):
                pool = nn.MaxPool2d(
                    *[primal(a) for a in node.args[1:]],
                    **{k: primal(a) for k, a in node.kwargs.items() if k != "return_indices"},
                )
                source = env[first][0]
                if isinstance(source, _PendingReLU):
                    env[node] = _relu(*_tangent(pool, source.x, source.dx, v, ""))
                else:
                    env[node] = _tangent(pool, primal(first), tangent(first), v, "")
            elif key in _IDENTITY and not node.kwargs.get(
                "training", node.args[2] if len(node.args) > 2 else True
            ):
                env[node] = (primal(first), tangent(first))
            elif key in _NO_TANGENT:
                env[node] = (_apply(node, key, primal, lambda a: None)[0], None)
            elif (
                key in _SHAPE_OPS
                and isinstance(first, fx.Node)
                and not any(tangent(a) is not None for a in [*node.args[1:], *node.kwargs.values()])
            ):
                env[node] = _apply(
                    node, key, primal, lambda a, f=first: tangent(a) if a is f else primal(a)
                )
            else:
                env[node] = _call_jvp(node, key, primal, tangent)
        else:
            raise ValueError(f"unsupported graph node {node.format_node()}")
        for finished in done_with.get(node, ()):  # free activations early, as a Sequential does
            env.pop(finished, None)
    raise ValueError("graph without output")


_LAST_USES: weakref.WeakKeyDictionary[fx.Graph, dict[fx.Node, list[fx.Node]]] = (
    weakref.WeakKeyDictionary()
)


def _last_uses(graph: fx.Graph) -> dict[fx.Node, list[fx.Node]]:
    """For each node, the values it is the last user of (so they can be dropped after it)."""
    if graph not in _LAST_USES:
        last: dict[fx.Node, fx.Node] = {}
        for node in graph.nodes:
            for used in node.all_input_nodes:
                last[used] = node
        uses: dict[fx.Node, list[fx.Node]] = {}
        for used, user in last.items():
            uses.setdefault(user, []).append(used)
        _LAST_USES[graph] = uses
    return _LAST_USES[graph]


def _fetch(module: nn.Module, target: str) -> Any:
    *path, name = target.split(".")
    owner = module.get_submodule(".".join(path)) if path else module
    return getattr(owner, name)


def _apply(node: fx.Node, key: Any, primal, other) -> tuple[Any, Any]:
    """A shape op on the primal and, the same way, on the tangent of its first argument."""

    def call(arg_of):
        args = [arg_of(a) for a in node.args]
        kwargs = {k: arg_of(a) for k, a in node.kwargs.items()}
        return (
            getattr(args[0], key)(*args[1:], **kwargs)
            if isinstance(key, str)
            else key(*args, **kwargs)
        )

    first = node.args[0]
    return call(primal), None if other(first) is None else call(other)


def _call_jvp(node: fx.Node, key: Any, primal, tangent) -> tuple[Any, Any]:
    """Any other call: the primal alone when no argument carries a tangent, else one
    ``torch.func.jvp`` of the call in its tensor arguments that do."""
    flat, spec = tree_flatten((list(node.args), dict(node.kwargs)))
    values = [primal(a) for a in flat]
    moving = [i for i, a in enumerate(flat) if tangent(a) is not None]

    def call(*inputs: Tensor) -> Any:
        leaves = list(values)
        for i, t in zip(moving, inputs, strict=True):
            leaves[i] = t
        args, kwargs = tree_unflatten(leaves, spec)
        return (
            getattr(args[0], key)(*args[1:], **kwargs)
            if isinstance(key, str)
            else key(*args, **kwargs)
        )

    if not moving:
        return call(), None
    return _jvp(call, tuple(values[i] for i in moving), tuple(tangent(flat[i]) for i in moving))


def fused_jvp_scores(model: nn.Module, x: Tensor, v: Direction) -> Tensor:
    """Same ``a`` (N, K) as :func:`jvp_scores`, propagated layer by layer (see module doc)."""
    if model.training:
        raise ValueError("fused_jvp_scores needs the surrogate in eval mode")
    with torch.no_grad():
        logits, d_logits = _tangent(model, x, None, v, "")
        if d_logits is None:
            return torch.zeros_like(logits)
        probs = torch.softmax(logits, dim=1)
        d_log_probs = d_logits - (probs * d_logits).sum(1, keepdim=True)
    return d_log_probs / x.shape[0]


SCORE_METHODS = {
    "fused": fused_jvp_scores,
    "jvp": jvp_scores,
    "double-backward": double_backward_scores,
}
