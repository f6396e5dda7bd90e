"""The defense interface (docs/design.md §defense-contract) and the registry every consumer reads.

A defense maps a batch of clean posteriors to served posteriors: ``defense(x, probs) -> probs``.
:meth:`Defense.__call__` is final in spirit (foolbox-style): it validates the input, runs the
subclass's :meth:`Defense.perturb`, and re-checks the output invariants — simplex (or
sub-simplex for declared truncating defenses), the L1 budget, and top-1 when promised — so no
defense can forget them.

Adding a defense is one file::

    class MyParams(DefenseParams):
        epsilon: float = Field(0.5, ge=0, le=2)

    @register_defense("mine", params=MyParams)
    class Mine(Defense):
        def perturb(self, x, probs): ...
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from mirage.registry import Registry

INPUT_ATOL = 1e-4


def output_atol(dtype: torch.dtype) -> float:
    """Output invariants hold to 1e-6 in float64; float32 rounding allows 1e-5."""
    return 1e-6 if dtype == torch.float64 else 1e-5


class DefenseInvariantError(RuntimeError):
    """A defense produced an output that breaks its declared contract (a bug in the defense)."""


class DefenseParams(BaseModel):
    """Typed, validated parameters of a defense. Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, frozen=True)


def check_probs(probs: Tensor, num_classes: int | None = None, *, name: str = "probs",
                atol: float = INPUT_ATOL) -> None:
    """Raise ``ValueError`` unless ``probs`` is a non-empty (B, K) float batch of simplex rows."""
    if not isinstance(probs, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(probs).__name__}")  # noqa: TRY004
    if probs.ndim != 2:
        raise ValueError(f"{name} must have shape (B, K), got {tuple(probs.shape)}")
    if probs.shape[0] == 0 or probs.shape[1] < 2:
        raise ValueError(f"{name} must have at least one row and two classes, got {tuple(probs.shape)}")
    if not probs.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {probs.dtype}")
    if num_classes is not None and probs.shape[1] != num_classes:
        raise ValueError(f"{name} has {probs.shape[1]} classes, expected {num_classes}")
    # One pass and one host sync: NaN fails every comparison, so it shows up in ``ok`` too.
    low, high = torch.aminmax(probs)
    sums = probs.sum(dim=1)
    low_sum, high_sum = torch.aminmax(sums)
    low, high, low_sum, high_sum = torch.stack([low, high, low_sum, high_sum]).tolist()
    if low >= -atol and high <= 1 + atol and abs(low_sum - 1) <= atol and abs(high_sum - 1) <= atol:
        return
    if not torch.isfinite(probs).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    if low < -atol:
        raise ValueError(f"{name} has negative entries (min {low:.3g})")
    deviation = (sums - 1).abs().max().item()
    raise ValueError(f"{name} rows must sum to 1 (largest deviation {deviation:.3g})")


def strict_top1_kept(clean: Tensor, served: Tensor) -> Tensor:
    """Per row: is the clean argmax still the *unique* maximum of the served row?"""
    top = clean.argmax(dim=1, keepdim=True)
    top_value = served.gather(1, top)
    others = served.scatter(1, top, float("-inf"))
    return top_value.squeeze(1) > others.max(dim=1).values


class Defense(abc.ABC):
    """Base class of all inference-time defenses.

    Class attributes declare the contract the base class enforces:
    ``needs_input`` (``x`` must be given), ``truncating`` (rows may sum to < 1, like a real API
    that drops or rounds entries), ``preserves_top1`` (top-1 kept strictly, always), ``stateful``
    (an answer may depend on earlier requests, e.g. through a random generator that advances per
    call; ``True`` unless a defense declares otherwise, the safe default for answer caches).
    A defense with an L1 budget exposes it as :attr:`epsilon`.
    """

    name: ClassVar[str] = ""
    params_type: ClassVar[type[DefenseParams]] = DefenseParams
    needs_input: ClassVar[bool] = False
    truncating: ClassVar[bool] = False
    preserves_top1: ClassVar[bool] = False
    stateful: ClassVar[bool] = True

    def __init__(self, params: DefenseParams | None = None, **kwargs: Any) -> None:
        if params is None:
            params = self.params_type(**kwargs)
        elif kwargs:
            raise TypeError("pass either a params object or keyword arguments, not both")
        if not isinstance(params, self.params_type):
            raise TypeError(f"{self.name} expects {self.params_type.__name__}, got {type(params).__name__}")
        self.params = params

    @property
    def epsilon(self) -> float | None:
        """The per-query L1 budget, or ``None`` for a defense without one."""
        return getattr(self.params, "epsilon", None)

    @property
    def keeps_top1(self) -> bool:
        """Whether this instance promises to keep the top-1 class (may depend on parameters)."""
        return self.preserves_top1

    def __call__(self, x: Tensor | None, probs: Tensor) -> Tensor:
        check_probs(probs)
        if self.needs_input:
            if x is None:
                raise ValueError(f"defense {self.name!r} needs the query images x")
            if x.shape[0] != probs.shape[0]:
                raise ValueError(f"x has {x.shape[0]} rows but probs has {probs.shape[0]}")
            if not torch.isfinite(x).all():
                raise ValueError("x contains NaN or infinite values")
        served = self.perturb(x, probs)
        self.check_output(probs, served)
        return served

    @abc.abstractmethod
    def perturb(self, x: Tensor | None, probs: Tensor) -> Tensor:
        """The algorithm. ``probs``: (B, K) validated simplex rows. Returns (B, K)."""

    def check_output(self, clean: Tensor, served: Tensor) -> None:
        atol = output_atol(served.dtype)
        if served.shape != clean.shape:
            raise DefenseInvariantError(f"{self.name}: output shape {tuple(served.shape)} != {tuple(clean.shape)}")
        # Every scalar the contract needs, fetched with one host sync (NaN fails each comparison).
        low, high = torch.aminmax(served)
        low_sum, high_sum = torch.aminmax(served.sum(dim=1))
        l1 = (served - clean).abs().sum(dim=1).max() if self.epsilon is not None else low
        low, high, low_sum, high_sum, l1 = torch.stack([low, high, low_sum, high_sum, l1]).tolist()
        if not (low >= -atol and high <= 1 + atol):
            raise DefenseInvariantError(f"{self.name}: output entries outside [0, 1] or NaN/inf "
                                        f"(min {low:.6g}, max {high:.6g})")
        if not high_sum <= 1 + atol or (not self.truncating and not low_sum >= 1 - atol):
            raise DefenseInvariantError(f"{self.name}: output rows not on the "
                                        f"{'sub-' if self.truncating else ''}simplex "
                                        f"(row sums in [{low_sum:.6g}, {high_sum:.6g}])")
        if self.epsilon is not None and not l1 <= self.epsilon + atol:
            raise DefenseInvariantError(f"{self.name}: L1 {l1:.6g} exceeds budget {self.epsilon}")
        if self.keeps_top1 and not strict_top1_kept(clean, served).all():
            raise DefenseInvariantError(f"{self.name}: promised to keep top-1 but did not")

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.params.model_dump().items()
                           if not isinstance(v, torch.nn.Module))
        return f"{type(self).__name__}({fields})"


_REGISTRY: Registry[Defense] = Registry("defense")
DEFENSES = _REGISTRY.entries


def register_defense(name: str, *, params: type[DefenseParams] = DefenseParams
                     ) -> Callable[[type[Defense]], type[Defense]]:
    """Class decorator: add a defense to the registry under ``name``."""
    return _REGISTRY.register(name, params)


def create_defense(name: str, **params: Any) -> Defense:
    """``create_defense("grad2", epsilon=0.5, ...)``: build a registered defense by name."""
    return _REGISTRY.create(name, **params)


def list_defenses() -> list[str]:
    return _REGISTRY.names()
