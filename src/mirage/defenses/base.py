"""The defense interface (docs/design.md §defense-contract) and the registry every consumer reads.

A defense maps a batch of clean posteriors to served posteriors: ``defense(x, probs) -> probs``.
:meth:`Defense.__call__` is final in spirit (foolbox-style): it validates the input, runs the
subclass's :meth:`Defense.perturb`, and re-checks the output against the defense's
:class:`DefenseContract` — simplex (or sub-simplex when truncating), the budget, and top-1 when
promised — so no defense can forget them.

A defense declares its contract in one place, :meth:`Defense.contract_for` (a function of its
parameters). ``defense.contract`` is an instance's; ``DEFENSES[name].contract`` the class's, at
the default parameters. Adding a defense is one file::

    class MyParams(DefenseParams):
        epsilon: float = Field(0.5, ge=0, le=2)

    @register_defense("mine", params=MyParams)
    class Mine(Defense[MyParams]):
        @classmethod
        def contract_for(cls, params: MyParams) -> DefenseContract:
            return DefenseContract(budget=params.epsilon, stateful=False)

        def perturb(self, x, probs): ...
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Literal, TypeVar, cast

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from mirage.registry import Entry, Registry, typed_params

INPUT_ATOL = 1e-4

Norm = Literal["l1", "l2", "kl"]


def output_atol(dtype: torch.dtype) -> float:
    """Output invariants hold to 1e-6 in float64; float32 rounding allows 1e-5."""
    return 1e-6 if dtype == torch.float64 else 1e-5


class DefenseInvariantError(RuntimeError):
    """A defense produced an output that breaks its declared contract (a bug in the defense)."""


class DefenseParams(BaseModel):
    """Typed, validated parameters of a defense. Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, frozen=True)


P = TypeVar("P", bound=DefenseParams)


@dataclass(frozen=True)
class DefenseContract:
    """What a defense promises, and what :meth:`Defense.__call__` checks on every call
    (docs/design.md §defense-contract).

    ``needs_input``: the query images ``x`` must be given. ``truncating``: rows may sum to less
    than 1, like a real API that drops or rounds entries. ``keeps_top1``: the clean argmax stays
    the *unique* maximum of every served row. ``stateful``: an answer may depend on earlier
    requests (a generator that advances, an ensemble member drawn per batch); true unless
    declared otherwise, the safe default for answer caches. ``budget``: the per-query bound on
    ``dist(y, ỹ)`` in the distance ``norm`` (L1, L2 or KL(y‖ỹ)), ``None`` for a defense without
    one.
    """

    needs_input: bool = False
    truncating: bool = False
    keeps_top1: bool = False
    stateful: bool = True
    budget: float | None = None
    norm: Norm = "l1"


def distance(clean: Tensor, served: Tensor, norm: Norm) -> Tensor:
    """Per-row dist(y, ỹ): L1, L2 or KL(y ‖ ỹ) (as MAD's official code). (B, K) x2 -> (B,)."""
    if norm == "l1":
        return (served - clean).abs().sum(1)
    if norm == "l2":
        return (served - clean).norm(dim=1)
    return (torch.xlogy(clean, clean) - torch.xlogy(clean, served)).sum(1)


def check_probs(
    probs: Tensor, num_classes: int | None = None, *, name: str = "probs", atol: float = INPUT_ATOL
) -> None:
    """Raise ``ValueError`` unless ``probs`` is a non-empty (B, K) float batch of simplex rows."""
    if not isinstance(probs, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(probs).__name__}")  # noqa: TRY004
    if probs.ndim != 2:
        raise ValueError(f"{name} must have shape (B, K), got {tuple(probs.shape)}")
    if probs.shape[0] == 0 or probs.shape[1] < 2:
        raise ValueError(
            f"{name} must have at least one row and two classes, got {tuple(probs.shape)}"
        )
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


class Defense(abc.ABC, Generic[P]):
    """Base class of all inference-time defenses, generic in its parameters' type ``P``
    (``class Mine(Defense[MyParams])``: ``self.params`` is a ``MyParams``).

    A subclass declares what it promises in :meth:`contract_for`, from its parameters; the base
    class enforces it (:attr:`contract`) on every call.
    """

    name: ClassVar[str] = ""
    params_type: ClassVar[type[DefenseParams]] = DefenseParams
    params: P

    def __init__(self, params: P | None = None, **kwargs: Any) -> None:
        # register_defense sets params_type to the class's P (a ClassVar cannot say so), and
        # typed_params checks the instance against it
        self.params = cast(P, typed_params(self.name, self.params_type, params, kwargs))
        self._contract = type(self).contract_for(self.params)

    @classmethod
    def contract_for(cls, params: P) -> DefenseContract:
        """The contract of an instance with these parameters: the one place a defense declares
        it. The default promises nothing and is stateful."""
        return DefenseContract()

    @property
    def contract(self) -> DefenseContract:
        """What this instance promises (its parameters are frozen, so this never changes)."""
        return self._contract

    def for_new_client(self) -> Defense:
        """The instance another client's stream should be answered by, as a view of the same API
        (``InProcessAPI.for_client``): this one, unless the defense judges each client's stream."""
        return self

    @property
    def stream_alarm(self) -> int | None:
        """Where in this instance's stream of queries it raised an alarm (1-based), ``None`` if it
        never did or judges no stream. The service records the first one per client
        (docs/design.md §grad2-gated)."""
        return None

    def __call__(self, x: Tensor | None, probs: Tensor) -> Tensor:
        check_probs(probs)
        if self.contract.needs_input:
            x = self._input(x)
            if x.shape[0] != probs.shape[0]:
                raise ValueError(f"x has {x.shape[0]} rows but probs has {probs.shape[0]}")
            if not torch.isfinite(x).all():
                raise ValueError("x contains NaN or infinite values")
        served = self.perturb(x, probs)
        self.check_output(probs, served)
        return served

    def _input(self, x: Tensor | None) -> Tensor:
        """``x``, which a defense whose contract ``needs_input`` cannot do without."""
        if x is None:
            raise ValueError(f"defense {self.name!r} needs the query images x")
        return x

    @abc.abstractmethod
    def perturb(self, x: Tensor | None, probs: Tensor) -> Tensor:
        """The algorithm. ``probs``: (B, K) validated simplex rows. Returns (B, K)."""

    def check_output(self, clean: Tensor, served: Tensor) -> None:
        contract, atol = self.contract, output_atol(served.dtype)
        if served.shape != clean.shape:
            raise DefenseInvariantError(
                f"{self.name}: output shape {tuple(served.shape)} != {tuple(clean.shape)}"
            )
        # Every scalar the contract needs, fetched with one host sync (NaN fails each comparison).
        low, high = torch.aminmax(served)
        low_sum, high_sum = torch.aminmax(served.sum(dim=1))
        used = (
            low
            if contract.budget is None
            else (
                distance(clean, served, "l1")
                if contract.norm == "l1"
                else distance(clean.double(), served.double(), contract.norm)
            )
            .max()
            .to(low)
        )
        low, high, low_sum, high_sum, used = torch.stack(
            [low, high, low_sum, high_sum, used]
        ).tolist()
        if not (low >= -atol and high <= 1 + atol):
            raise DefenseInvariantError(
                f"{self.name}: output entries outside [0, 1] or NaN/inf "
                f"(min {low:.6g}, max {high:.6g})"
            )
        if not high_sum <= 1 + atol or (not contract.truncating and not low_sum >= 1 - atol):
            raise DefenseInvariantError(
                f"{self.name}: output rows not on the "
                f"{'sub-' if contract.truncating else ''}simplex "
                f"(row sums in [{low_sum:.6g}, {high_sum:.6g}])"
            )
        if contract.budget is not None and not used <= contract.budget + atol:
            raise DefenseInvariantError(
                f"{self.name}: {contract.norm.upper()} {used:.6g} exceeds budget {contract.budget}"
            )
        if contract.keeps_top1 and not strict_top1_kept(clean, served).all():
            raise DefenseInvariantError(f"{self.name}: promised to keep top-1 but did not")

    def __repr__(self) -> str:
        """One line: scalar parameters as they are, tensors by shape, modules by class (a reference
        set or a surrogate would otherwise print thousands of numbers)."""
        fields = ", ".join(
            f"{name}={_short_repr(getattr(self.params, name))}"
            for name in type(self.params).model_fields
        )
        return f"{type(self).__name__}({fields})"


def _short_repr(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"<tensor {tuple(value.shape)}>"
    if isinstance(value, torch.nn.Module):
        return f"<{type(value).__name__}>"
    if isinstance(value, list | tuple) and any(
        isinstance(v, torch.Tensor | torch.nn.Module) for v in value
    ):
        return f"<{len(value)} × {type(value[0]).__name__}>"
    return repr(value)


@dataclass(frozen=True)
class DefenseEntry(Entry[Defense]):
    """A registered defense: its class, typed parameters, summary and class-level contract."""

    @property
    def contract(self) -> DefenseContract:
        """The contract at the default parameters (``model_construct``: parts such as a
        surrogate, which have no default, are not needed to say what the defense promises)."""
        return self.cls.contract_for(self.params.model_construct())


_REGISTRY: Registry[Defense] = Registry("defense", entry=DefenseEntry)
DEFENSES: dict[str, DefenseEntry] = _REGISTRY.entries  # type: ignore[assignment]


def register_defense(
    name: str, *, params: type[DefenseParams] = DefenseParams
) -> Callable[[type[Defense]], type[Defense]]:
    """Class decorator: add a defense to the registry under ``name``."""
    return _REGISTRY.register(name, params)


def create_defense(name: str, **params: Any) -> Defense:
    """``create_defense("grad2", epsilon=0.5, ...)``: build a registered defense by name."""
    return _REGISTRY.create(name, **params)


def list_defenses() -> list[str]:
    return _REGISTRY.names()
