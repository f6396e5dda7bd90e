"""A name → (class, typed parameters) registry, shared by defenses and attacks, and the one
error every by-name lookup in mirage raises.

Registration is a class decorator; the registry is what the CLI, the benchmark, the server and
the shared property tests read, so adding an algorithm is one file (CONTRIBUTING.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import BaseModel

T = TypeVar("T")


class UnknownNameError(KeyError, ValueError):
    """No entry of this name: raised by every by-name lookup (defenses, attacks, datasets,
    architectures, scenarios, clone recipes, training-time defenses), listing the known names.

    A ``KeyError`` (a failed lookup) and a ``ValueError`` (a bad argument), so code catching
    either keeps working."""

    def __init__(self, kind: str, name: object, known: Iterable[str]) -> None:
        self.kind, self.name, self.known = kind, name, sorted(known)
        super().__init__(f"unknown {kind} {name!r}; known: {self.known}")

    def __str__(self) -> str:  # KeyError would show the message in quotes
        return str(self.args[0])

    def __reduce__(self):  # picklable across process-pool and Dask workers
        return type(self), (self.kind, self.name, self.known)


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    cls: type[T]
    params: type[BaseModel]
    summary: str


class Registry(Generic[T]):
    """``kind`` names what is registered ("defense", "attack") in error messages; ``entry`` is
    the :class:`Entry` (sub)class its entries are made of."""

    def __init__(self, kind: str, *, entry: type[Entry] = Entry) -> None:
        self.kind = kind
        self.entry = entry
        self.entries: dict[str, Entry[T]] = {}

    def register(self, name: str, params: type[BaseModel]) -> Callable[[type[T]], type[T]]:
        def decorate(cls: type[T]) -> type[T]:
            if name in self.entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            cls.name = name  # type: ignore[attr-defined]
            cls.params_type = params  # type: ignore[attr-defined]
            doc = (cls.__doc__ or "").strip().splitlines()
            self.entries[name] = self.entry(name, cls, params, doc[0] if doc else "")
            return cls

        return decorate

    def get(self, name: str) -> Entry[T]:
        """The entry registered as ``name``; :class:`UnknownNameError` if there is none."""
        if name not in self.entries:
            raise UnknownNameError(self.kind, name, self.entries)
        return self.entries[name]

    def create(self, name: str, **params: Any) -> T:
        entry = self.get(name)
        return entry.cls(entry.params(**params))  # type: ignore[call-arg]

    def names(self) -> list[str]:
        return sorted(self.entries)

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)


P = TypeVar("P", bound=BaseModel)


def typed_params(owner: str, params_type: type[P], params: P | None, kwargs: dict[str, Any]) -> P:
    """The parameters a registered class is built with: a ``params_type`` object, or keyword
    arguments validated into one — never both (defenses and attacks take either)."""
    if params is None:
        params = params_type(**kwargs)
    elif kwargs:
        raise TypeError("pass either a params object or keyword arguments, not both")
    if not isinstance(params, params_type):
        raise TypeError(f"{owner} expects {params_type.__name__}, got {type(params).__name__}")
    return params
