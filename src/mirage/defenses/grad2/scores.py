"""Per-class redirection scores of GRAD² (Mazeika et al., ICML 2022; docs/design.md §grad2-scores).

The attacker's update on a batch X of N queries answered with ỹ is
``g(ỹ) = ∇_θ (1/N) Σ_i Σ_k ỹ_ik log p_θ(k|x_i)``, linear in ỹ, so for a target direction v

    ⟨g(ỹ), v⟩ = Σ_i ⟨a_i, ỹ_i⟩,   a_ik = (1/N) ⟨∇_θ log p_θ(k|x_i), v⟩.

:func:`jvp_scores` gets all of ``a`` (N, K) with ONE forward-mode Jacobian-vector product of the
surrogate's log-softmax along v (``torch.func.jvp``): the cost of about two forward passes.
:func:`double_backward_scores` is the original code's route (grad w.r.t. θ with
``create_graph=True``, then grad of ⟨·, v⟩ w.r.t. ỹ). Both use the full network.

:func:`fused_jvp_scores` is the same forward-mode product written out layer by layer, one rule per
layer type in :data:`MODULE_RULES` (conv, linear, ReLU, max- and average-pool, flatten, batch norm
in eval mode, layer norm, GELU, mirage's normalisation; registered with :func:`module_rule`, as
Opacus registers its per-sample gradient rules) and one per call in :data:`FUNCTION_RULES`
(residual adds, products, matrix products, softmax, concatenation; :func:`function_rule`): the
primal and tangent passes share one batched call per layer, the input's tangent is zero (the first
layer's ``conv(dx, W)`` is skipped), and for an all-ones direction ``conv(x, 1)`` / ``x·1ᵀ`` reduce
to a channel sum and a box filter. A user's own module is traced once with ``torch.fx`` and walked
node by node with the same rules (docs/design.md §any-module). A layer or call without a rule falls
back to ``torch.func.jvp`` on that layer or call alone, so any network works; mirage's LeNet,
ResNet-18, ResNet-50 and ViT need no fallback (tested).

A target ``v`` is a dict ``{parameter name: tensor}`` shaped like ``model.named_parameters()``.
"""

from __future__ import annotations

import logging
import operator
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.func import functional_call, jvp
from torch.utils._pytree import tree_flatten, tree_unflatten

from mirage.models.base import ImageClassifier, Normalize

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
    """O(1) test for the all-ones direction as built by
    :func:`mirage.defenses.grad2.targets.all_ones` (a broadcast scalar 1, every stride 0); any other
    tensor takes the general path."""
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


ModuleRule = Callable[[Any, Tensor, "Tensor | None", Direction, str], "Tangent | None"]
Tangent = tuple[Tensor, "Tensor | None"]
MODULE_RULES: dict[type, ModuleRule] = {}
"""The fused forward-mode rules by layer type (looked up along the class's MRO): ``rule(module, x,
dx, v, prefix)`` gives (module(x), its tangent along input tangent ``dx`` (``None`` = 0) and the
parameter tangent ``v``), or ``None`` when the module's settings are outside the rule (then the
traced graph, or ``torch.func.jvp``, takes it)."""


def module_rule(*types: type) -> Callable[[ModuleRule], ModuleRule]:
    """Register a fused rule for layers of ``types`` (Opacus registers its per-sample gradient
    rules the same way)."""

    def register(rule: ModuleRule) -> ModuleRule:
        for kind in types:
            MODULE_RULES[kind] = rule
        return rule

    return register


def _rule_for(module: nn.Module) -> ModuleRule | None:
    for kind in type(module).__mro__:
        if (rule := MODULE_RULES.get(kind)) is not None:
            return rule
    return None


def _tangent(
    module: nn.Module, x: Tensor, dx: Tensor | None, v: Direction, prefix: str
) -> tuple[Tensor, Tensor | None]:
    """(module(x), d module(x)) along input tangent ``dx`` (None = 0) and parameter tangent
    ``v``: the module's rule, else its traced graph walked node by node, else ``torch.func.jvp``
    on it."""
    rule = _rule_for(module)
    if rule is not None and (out := rule(module, x, dx, v, prefix)) is not None:
        return out
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


@module_rule(ImageClassifier)
def _classifier(module, x, dx, v, prefix):
    for part in ("normalize", "body", "classifier"):
        x, dx = _tangent(getattr(module, part), x, dx, v, f"{prefix}{part}.")
    return x, dx


@module_rule(Normalize)
def _normalize(module, x, dx, v, prefix):
    return module(x), None if dx is None else dx / module.std


@module_rule(nn.Sequential)
def _sequential(module, x, dx, v, prefix):
    children = list(module.named_children())
    for i in range(len(children) - 1):
        # max-pool commutes with ReLU (monotone), primal and tangent alike: pool first, 4x less work
        if isinstance(children[i][1], nn.ReLU) and isinstance(children[i + 1][1], nn.MaxPool2d):
            children[i], children[i + 1] = children[i + 1], children[i]
    for name, child in children:
        x, dx = _tangent(child, x, dx, v, f"{prefix}{name}.")
    return x, dx


@module_rule(nn.Conv2d)
def _conv2d(module, x, dx, v, prefix):
    if module.groups != 1 or module.padding_mode != "zeros":
        return None
    stride, padding, dilation = module.stride, module.padding, module.dilation

    def op(inp: Tensor, w: Tensor) -> Tensor:
        return F.conv2d(inp, w, None, stride=stride, padding=padding, dilation=dilation)

    def ones_op(inp: Tensor) -> Tensor:
        box = torch.ones(1, 1, *module.kernel_size, dtype=inp.dtype, device=inp.device)
        return F.conv2d(
            inp.sum(1, keepdim=True), box, None, stride=stride, padding=padding, dilation=dilation
        ).expand(-1, module.out_channels, -1, -1)

    return _linear_like(
        op, x, dx, module.weight, module.bias, v[prefix + "weight"], v.get(prefix + "bias"), ones_op
    )


@module_rule(nn.Linear)
def _linear(module, x, dx, v, prefix):
    def ones_linear(inp: Tensor) -> Tensor:
        return inp.sum(-1, keepdim=True).expand(*inp.shape[:-1], module.out_features)

    return _linear_like(
        F.linear,
        x,
        dx,
        module.weight,
        module.bias,
        v[prefix + "weight"],
        v.get(prefix + "bias"),
        ones_linear,
        channel_dim=-1,
    )


@module_rule(nn.ReLU)
def _relu_module(module, x, dx, v, prefix):
    return _relu(x, dx)


@module_rule(nn.MaxPool2d)
def _max_pool(module, x, dx, v, prefix):
    if module.ceil_mode or module.dilation != 1:
        return None
    if tiled := _tiled_pool(module, x):
        return _tiled_max_pool(x, dx, tiled)
    y, index = F.max_pool2d(
        x, module.kernel_size, module.stride, module.padding, return_indices=True
    )
    if dx is None:
        return y, None
    return y, dx.flatten(2).gather(2, index.flatten(2)).view_as(y)


@module_rule(nn.Flatten, nn.AdaptiveAvgPool2d, nn.AvgPool2d)
def _linear_map(module, x, dx, v, prefix):
    """A parameter-free linear map: the tangent goes through it as the input does."""
    return module(x), None if dx is None else module(dx)


@module_rule(nn.Dropout, nn.Identity)
def _identity(module, x, dx, v, prefix):
    return None if module.training else (x, dx)


def _add(dy: Tensor | None, term: Tensor | None) -> Tensor | None:
    return term if dy is None else dy if term is None else dy + term


@module_rule(nn.BatchNorm2d)
def _batch_norm(module, x, dx, v, prefix):
    """Eval-mode batch norm, y = x̂·γ + β with x̂ = (x − μ)/√(σ² + ε) from the running statistics:
    dy = dx·γ/√(σ² + ε) + x̂·v_γ + v_β."""
    if module.training or module.running_mean is None or module.running_var is None:
        return None
    shape = (1, -1, 1, 1)
    inv = (module.running_var + module.eps).rsqrt().view(shape)
    x_hat = (x - module.running_mean.view(shape)) * inv
    y, dy = x_hat, None if dx is None else dx * inv
    if module.weight is not None:
        y = y * module.weight.view(shape) + module.bias.view(shape)
        dy = None if dy is None else dy * module.weight.view(shape)
        if (v_weight := v.get(prefix + "weight")) is not None:
            dy = _add(dy, x_hat * v_weight.view(shape))
        if (v_bias := v.get(prefix + "bias")) is not None:
            dy = _add(dy, v_bias.view(shape).expand_as(y))
    return y, dy


@module_rule(nn.LayerNorm)
def _layer_norm(module, x, dx, v, prefix):
    """y = x̂·γ + β over the last dimensions, x̂ = (x − mean)/√(var + ε):
    dx̂ = (dx − mean(dx) − x̂·mean(x̂·dx)) / √(var + ε)."""
    dims = tuple(range(-len(module.normalized_shape), 0))
    mean = x.mean(dims, keepdim=True)
    inv = (x.var(dims, unbiased=False, keepdim=True) + module.eps).rsqrt()
    x_hat = (x - mean) * inv
    dx_hat = (
        None
        if dx is None
        else (dx - dx.mean(dims, keepdim=True) - x_hat * (x_hat * dx).mean(dims, keepdim=True))
        * inv
    )
    if not module.elementwise_affine:
        return x_hat, dx_hat
    y = x_hat * module.weight
    dy = None if dx_hat is None else dx_hat * module.weight
    if (v_weight := v.get(prefix + "weight")) is not None:
        dy = _add(dy, x_hat * v_weight)
    if module.bias is not None:
        y = y + module.bias
        if (v_bias := v.get(prefix + "bias")) is not None:
            dy = _add(dy, v_bias.expand_as(y))
    return y, dy


@module_rule(nn.GELU)
def _gelu(module, x, dx, v, prefix):
    """GELU(x) = x·Φ(x): dy = dx·(Φ(x) + x·φ(x)) (the exact, erf form)."""
    if module.approximate != "none":
        return None
    y = F.gelu(x)
    if dx is None:
        return y, None
    # dx·GELU'(x) is what GELU's backward computes from an incoming dx: one fused kernel
    return y, torch.ops.aten.gelu_backward(dx, x)


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


FunctionRule = Callable[[list, dict, list, dict], "Tangent | None"]
FUNCTION_RULES: dict[Any, FunctionRule] = {}
"""The fused rules of calls in a traced graph, by target (a function, or a method's name):
``rule(args, kwargs, d_args, d_kwargs)`` with the primal arguments and their tangents (``None``
where an argument carries none) gives (the call's value, its tangent), or ``None`` when the call
is outside the rule (then ``torch.func.jvp`` takes that call)."""


def function_rule(*targets: Any) -> Callable[[FunctionRule], FunctionRule]:
    def register(rule: FunctionRule) -> FunctionRule:
        for target in targets:
            FUNCTION_RULES[target] = rule
        return rule

    return register


def _broadcast(tangent: Tensor | None, shape: torch.Size) -> Tensor | None:
    if tangent is None or tangent.shape == shape:
        return tangent
    return tangent.expand(shape)


@function_rule(operator.add, torch.add, "add")
def _sum(args, kwargs, d_args, d_kwargs):
    if kwargs or len(args) != 2:
        return None
    y = args[0] + args[1]
    return y, _broadcast(_add(d_args[0], d_args[1]), y.shape) if isinstance(y, Tensor) else None


@function_rule(operator.sub, torch.sub, "sub")
def _difference(args, kwargs, d_args, d_kwargs):
    if kwargs or len(args) != 2:
        return None
    y = args[0] - args[1]
    minus = None if d_args[1] is None else -d_args[1]
    return y, _broadcast(_add(d_args[0], minus), y.shape) if isinstance(y, Tensor) else None


@function_rule(operator.mul, torch.mul, "mul")
def _product(args, kwargs, d_args, d_kwargs):
    if kwargs or len(args) != 2:
        return None
    (a, b), (da, db) = args, d_args
    y = a * b
    dy = _add(None if da is None else da * b, None if db is None else a * db)
    return y, _broadcast(dy, y.shape) if isinstance(y, Tensor) else None


@function_rule(operator.truediv, torch.div, "div")
def _quotient(args, kwargs, d_args, d_kwargs):
    if kwargs or len(args) != 2 or d_args[1] is not None:
        return None  # a moving divisor: the generic route
    y = args[0] / args[1]
    return y, None if d_args[0] is None else d_args[0] / args[1]


@function_rule(operator.matmul, torch.matmul, "matmul")
def _matrix_product(args, kwargs, d_args, d_kwargs):
    if kwargs or len(args) != 2:
        return None
    (a, b), (da, db) = args, d_args
    return a @ b, _add(None if da is None else da @ b, None if db is None else a @ db)


@function_rule(torch.softmax, F.softmax, "softmax")
def _softmax(args, kwargs, d_args, d_kwargs):
    """s = softmax(x): ds = s·(dx − Σ s·dx) along ``dim``."""
    dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
    if dim is None or set(kwargs) - {"dim"} or len(args) > 2 or d_args[0] is None:
        return None
    s = torch.softmax(args[0], dim=dim)
    dx = d_args[0]
    return s, s * (dx - (s * dx).sum(dim, keepdim=True))


@function_rule(torch.cat)
def _concatenate(args, kwargs, d_args, d_kwargs):
    dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
    if set(kwargs) - {"dim"} or not isinstance(args[0], list | tuple):
        return None
    parts, d_parts = args[0], d_args[0]
    y = torch.cat(parts, dim=dim)
    if all(d is None for d in d_parts):
        return y, None
    return y, torch.cat(
        [torch.zeros_like(p) if d is None else d for p, d in zip(parts, d_parts, strict=True)],
        dim=dim,
    )


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
    "expand",
    operator.getitem,
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
                env[node] = _call_rule(node, key, primal, tangent)
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


def _call_rule(node: fx.Node, key: Any, primal, tangent) -> tuple[Any, Any]:
    """A call by its fused rule (:data:`FUNCTION_RULES`) when it has one that takes it, else by
    :func:`_call_jvp`."""
    rule = FUNCTION_RULES.get(key) if _hashable(key) else None
    if rule is not None:
        args = [_tree(primal, a) for a in node.args]
        kwargs = {k: _tree(primal, a) for k, a in node.kwargs.items()}
        d_args = [_tree(tangent, a) for a in node.args]
        d_kwargs = {k: _tree(tangent, a) for k, a in node.kwargs.items()}
        if (out := rule(args, kwargs, d_args, d_kwargs)) is not None:
            return out
    return _call_jvp(node, key, primal, tangent)


def _hashable(key: Any) -> bool:
    try:
        hash(key)
    except TypeError:
        return False
    return True


def _tree(of: Callable[[Any], Any], arg: Any) -> Any:
    """``of`` applied to a call argument, through lists and tuples (``torch.cat``'s tensors)."""
    if isinstance(arg, list | tuple):
        return type(arg)(of(a) for a in arg)
    return of(arg)


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
