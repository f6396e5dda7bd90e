"""Where a command's model comes from: a model file (``--model``, ``--class``) or a served Open
Inference Protocol endpoint (``--url``, ``--model-name``, ``--key-env``), one set of options and
one loader for every command that takes a user's model (``evaluate``, ``distil-surrogate``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from torch import nn

    from mirage.serve import HTTPPredictionAPI

ModelFile = Annotated[
    Path | None,
    typer.Option(
        "--model",
        help="the model: .pt2, .onnx, .safetensors (with --class) or a mirage checkpoint directory",
    ),
]
ClassPath = Annotated[
    str | None, typer.Option("--class", help="a state dict's module, 'package.module:Class'")
]
EndpointUrl = Annotated[
    str | None,
    typer.Option(
        "--url",
        help="… or an Open Inference Protocol V2 endpoint, e.g. http://127.0.0.1:8000 (every image "
        "one query, charged to the key)",
    ),
]
EndpointModel = Annotated[
    str | None, typer.Option("--model-name", help="the endpoint's model name")
]
KeyEnv = Annotated[
    str, typer.Option("--key-env", help="environment variable holding the endpoint's API key")
]
DEFAULT_KEY_ENV = "MIRAGE_API_KEY"


def model_file(path: Path, class_path: str | None, input_shape: Sequence[int]) -> nn.Module:
    """The model at ``path`` (its format from the suffix), taking images of ``input_shape``."""
    from mirage.models.formats import format_of, load_model_file

    return load_model_file(
        format_of(path), path, input_shape=tuple(input_shape), class_path=class_path
    )[0]


def endpoint(url: str, model_name: str | None, key_env: str) -> HTTPPredictionAPI:
    """A client of the endpoint, its API key read from ``$key_env``; a usage error without them."""
    from mirage.serve import HTTPPredictionAPI

    if model_name is None or not os.environ.get(key_env):
        raise typer.BadParameter(f"--url needs --model-name and the API key in ${key_env}")
    return HTTPPredictionAPI(url, model_name, os.environ[key_env])
