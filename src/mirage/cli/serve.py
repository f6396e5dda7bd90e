"""``mirage serve``: run the defended prediction service; ``mirage prepare``: train what it serves;
``mirage serve-key``: make an API key."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from mirage.cli.app import app, console

log = logging.getLogger(__name__)


@app.command("serve")
def serve(
    config: Annotated[Path, typer.Option("--config", "-c", help="TOML or JSON service config")],
    host: Annotated[str, typer.Option(help="address to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    device: Annotated[
        str | None,
        typer.Option(
            help="where the model's forward pass runs: cpu, cuda, cuda:N, mps "
            "(overrides model.device)"
        ),
    ] = None,
    grpc_port: Annotated[
        int | None,
        typer.Option(
            help="also serve the Open Inference Protocol over gRPC on this port "
            "(overrides grpc.port)"
        ),
    ] = None,
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            help="processes serving the one port, each with the model, sharing quotas, audit and "
            "evidence through the storage (Redis or the SQLite files)",
        ),
    ] = 1,
) -> None:
    """Serve the configured model behind its defense (Open Inference Protocol V2 + /metrics).

    Example: mirage serve --config examples/serve.toml --port 8000 --grpc-port 8001 --workers 2"""
    from mirage.cli.config_errors import config_errors
    from mirage.serve.app import create_app
    from mirage.serve.config import ServeConfig, load_config
    from mirage.serve.runner import serve_forever, serve_workers, with_grpc

    with config_errors(config, ServeConfig):  # one line per problem, exit code 2
        settings = with_grpc(load_config(config), host, grpc_port)
        if device is not None:
            settings = settings.model_copy(
                update={"model": settings.model.model_copy(update={"device": device})}
            )
        if workers > 1:  # each worker loads the model; one that cannot says why and exits 2
            raise typer.Exit(serve_workers(settings, host, port, workers=workers))
        application = create_app(
            settings,
            announce=lambda summary: console.print(
                summary, markup=False, highlight=False, soft_wrap=True
            ),
        )
    log.info("serving %r on http://%s:%d", settings.model.name, host, port)
    serve_forever(application, host, port)


@app.command("prepare")
def prepare(
    config: Annotated[Path, typer.Option("--config", "-c", help="TOML or JSON service config")],
) -> None:
    """Train (or load) what a service config serves from a scenario — the victim, a training-time
    defense's victim, surrogates, detectors — and keep it in the model store ($MIRAGE_MODELS), so
    `mirage serve`, which never trains, starts at once.

    Example: mirage prepare --config examples/serve.toml"""
    from mirage.cli.config_errors import config_errors
    from mirage.serve.config import ServeConfig, load_config
    from mirage.serve.loading import prepare as prepare_models

    with config_errors(config, ServeConfig):
        for line in prepare_models(load_config(config)):
            console.print(f"prepared {line}", markup=False, highlight=False)


@app.command("serve-key")
def serve_key() -> None:
    """Print a fresh API key and the SHA-256 digest to put in the config's key_sha256.

    Example: mirage serve-key"""
    from mirage.serve.auth import new_key

    key, digest = new_key()
    console.print(f"key (give to the client): {key}", soft_wrap=True)
    console.print(f"key_sha256 (put in the config): {digest}", soft_wrap=True)
