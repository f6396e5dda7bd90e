"""The root ``mirage`` typer app. Command modules in this package register on it."""

from __future__ import annotations

import logging
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Defenses against model stealing, and a benchmark to judge them.",
)
console = Console()
options = {"verbose": False}
"""The root options of the running command (``mirage -v …``: tracebacks are shown)."""


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    options["verbose"] = verbose
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False)],
    )
