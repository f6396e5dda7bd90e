"""A config file's errors as the operator reads them: one line each,
``error: <file>: <key path>: <message>``, on stderr, and exit code 2 — no traceback
(``mirage -v …`` shows it). Used by the commands that read a config file the user names
(``mirage serve --config``, ``mirage bench … --config``)."""

from __future__ import annotations

import difflib
import json
import re
import tomllib
import types
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from mirage.cli.app import options

CONFIG_ERRORS = (
    OSError,
    UnicodeDecodeError,
    tomllib.TOMLDecodeError,
    json.JSONDecodeError,
    ValidationError,
    ValueError,
)
"""What reading, parsing, validating or acting on a config file raises for a problem of the file."""


@contextmanager
def config_errors(path: str | Path, model: type[BaseModel] | None = None) -> Iterator[None]:
    """Turn a :data:`CONFIG_ERRORS` raised inside into one line per problem and exit code 2.
    ``model``: the config's pydantic class, to suggest the key an unknown one was meant to be."""
    try:
        yield
    except CONFIG_ERRORS as error:
        if options["verbose"]:
            raise
        for where, message in problems(error, model):
            typer.echo(
                f"error: {path}: {where}: {message}" if where else f"error: {path}: {message}",
                err=True,
            )
        raise typer.Exit(2) from None


def problems(
    error: BaseException, model: type[BaseModel] | None = None
) -> list[tuple[str | None, str]]:
    """(key path or place in the file, message) of each problem ``error`` reports."""
    if isinstance(error, ValidationError):
        found: dict[str | None, str] = {}
        for item in error.errors():
            path, message = _validation_problem(item, model)
            found.setdefault(path, message)  # a union's alternatives: the first says enough
        return list(found.items())
    if isinstance(error, tomllib.TOMLDecodeError):
        text = str(error)
        if match := re.search(r"\s*\((at line \d+, column \d+|at end of document)\)$", text):
            return [(match.group(1).removeprefix("at "), _first_lower(text[: match.start()]))]
        return [(None, f"not valid TOML: {text}")]
    if isinstance(error, json.JSONDecodeError):
        return [(f"line {error.lineno}, column {error.colno}", _first_lower(error.msg))]
    if isinstance(error, UnicodeDecodeError):
        return [(None, "not a text file (not UTF-8)")]
    if isinstance(error, FileNotFoundError) and error.filename is not None:
        return [(None, "no such file")]
    if isinstance(error, IsADirectoryError):
        return [(None, "a directory, not a config file")]
    if isinstance(error, OSError) and error.strerror:
        return [(None, _first_lower(error.strerror))]
    return [(None, str(error))]


def _validation_problem(
    item: ErrorDetails, model: type[BaseModel] | None
) -> tuple[str | None, str]:
    loc = [step for step in item["loc"] if isinstance(step, int) or _is_key(step)]
    path = (
        "".join(f"[{step}]" if isinstance(step, int) else f".{step}" for step in loc).lstrip(".")
        or None
    )
    if item["type"] == "extra_forbidden":
        known = _keys_at(model, loc[:-1]) if model is not None else []
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        return path, "unknown key" + (
            f" (did you mean {close[0]}?)"
            if close
            else f" (known: {', '.join(known)})"
            if known
            else ""
        )
    message = item["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    value = item.get("input")
    if item["type"] == "missing":
        message = "missing (required)"
    elif (
        isinstance(value, str | int | float | bool)
        and len(repr(value)) <= 60
        and repr(value) not in message
    ):
        message += f", got {value!r}"
    return path, message


def _is_key(step: str) -> bool:
    """A key of the file, not one of the tags pydantic puts in a location (``literal['a']``,
    ``function-after[…]``, a union member's class name)."""
    return bool(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", step)) and not step[0].isupper()


def _keys_at(model: type[BaseModel], loc: list[str | int]) -> list[str]:
    """The keys the table at ``loc`` of ``model`` takes (best effort: ``[]`` when unsure)."""
    current: Any = model
    mapping = False  # the next key names an entry of a table of tables (dict[str, X])
    for step in loc:
        if isinstance(step, int) or mapping:
            mapping = False
            continue  # an array's item or a table's entry: the same class
        field = current.model_fields.get(step) if _is_model(current) else None
        if field is None:
            return []
        current = _model_in(field.annotation)
        mapping = _mapping(field.annotation)
    if not _is_model(current):
        return []
    return sorted(field.alias or name for name, field in current.model_fields.items())


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic class in an annotation (``X | None``, ``list[X]``, ``dict[str, X]``, …)."""
    if _is_model(annotation):
        return annotation
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is not None:
        for arg in typing.get_args(annotation):
            if (found := _model_in(arg)) is not None:
                return found
    return None


def _mapping(annotation: Any) -> bool:
    """Whether the annotation is (or may be) a ``dict``."""
    if typing.get_origin(annotation) is dict:
        return True
    return isinstance(annotation, types.UnionType) and any(
        _mapping(a) for a in typing.get_args(annotation)
    )


def _is_model(value: Any) -> bool:
    return isinstance(value, type) and issubclass(value, BaseModel)


def _first_lower(text: str) -> str:
    return text[:1].lower() + text[1:] if text[1:2].islower() else text
