"""``mirage bench run|import|status|report|leaderboard``: the benchmark sweep, its progress, its
report and the leaderboard page."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from mirage.cli.app import app, console

PROFILES_DIR = Path(__file__).resolve().parents[1] / "bench" / "profiles"
"""``mirage.bench.config.PROFILES_DIR``, found without importing the sweep machinery."""


def builtin_profiles() -> list[str]:
    """The names of the built-in sweep profiles (``mirage/bench/profiles/*.toml``)."""
    return sorted(path.stem for path in PROFILES_DIR.glob("*.toml"))


bench = typer.Typer(
    no_args_is_help=True,
    help=(
        "Sweeps of defenses × budgets × attacks, and their report. --config takes a built-in "
        f"profile ({', '.join(builtin_profiles())}) or a TOML file of your own.\n\n"
        "Example: mirage bench run --config quick && mirage bench report --config quick"
    ),
)
app.add_typer(bench, name="bench")

ProfileOption = Annotated[
    str,
    typer.Option(
        "--config", "-c", help=f"built-in profile ({', '.join(builtin_profiles())}) or a TOML file"
    ),
]
ResultsOption = Annotated[
    Path | None, typer.Option(help="results JSONL (default: results/<name>/results.jsonl)")
]


def load_sweep(config: str):
    """The sweep config ``config`` names (a built-in profile or a TOML file); its problems as one
    line each (``error: <file>: <key path>: <message>``) and exit code 2."""
    from mirage.bench.config import SweepConfig, load_config
    from mirage.cli.config_errors import config_errors

    with config_errors(config, SweepConfig):
        return load_config(config)


def with_data_roots(config, pairs: list[str]):
    """``config`` with ``--data-root DATASET=DIR`` pairs over its ``data_roots`` (a malformed
    pair or an unknown dataset is a usage error)."""
    from pydantic import ValidationError

    from mirage.bench.config import SweepConfig

    if not pairs:
        return config
    roots = dict(config.data_roots)
    for pair in pairs:
        name, sep, directory = pair.partition("=")
        if not sep or not name or not directory:
            raise typer.BadParameter(
                f"expected DATASET=DIR, got {pair!r}", param_hint="--data-root"
            )
        roots[name] = str(Path(directory).expanduser())
    try:
        return SweepConfig.model_validate({**config.model_dump(), "data_roots": roots})
    except ValidationError as error:
        message = error.errors()[0]["msg"].removeprefix("Value error, ")
        raise typer.BadParameter(message, param_hint="--data-root") from None


def _results_path(name: str, results: Path | None) -> Path:
    return results or Path("results") / name / "results.jsonl"


@bench.command("run")
def run(
    config: ProfileOption = "quick",
    results: ResultsOption = None,
    executor: Annotated[str, typer.Option(help="inline, local (process pool) or dask")] = "inline",
    workers: Annotated[int, typer.Option(help="process-pool workers")] = 1,
    scheduler: Annotated[
        str | None, typer.Option(help="dask scheduler address, tcp://host:port")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="run at most this many pending runs")] = None,
    scenario: Annotated[
        list[str] | None, typer.Option(help="only these scenarios (repeatable)")
    ] = None,
    attack: Annotated[
        list[str] | None, typer.Option(help="only these attack labels (repeatable)")
    ] = None,
    defense: Annotated[
        list[str] | None, typer.Option(help="only these defense labels (repeatable)")
    ] = None,
    seed: Annotated[list[int] | None, typer.Option(help="only these seeds (repeatable)")] = None,
    report: Annotated[bool, typer.Option(help="write the report when the sweep ends")] = True,
    answers: Annotated[
        str | None,
        typer.Option(
            help="where answered transfer sets are cached ('off': not at all); default "
            "$MIRAGE_ANSWERS or $MIRAGE_CACHE/answers. Dask workers read their own MIRAGE_ANSWERS"
        ),
    ] = None,
    device: Annotated[
        str | None,
        typer.Option(
            help="where clones train: cpu, cuda, cuda:N, mps (default $MIRAGE_DEVICE, else the CPU)"
        ),
    ] = None,
    data_root: Annotated[
        list[str] | None,
        typer.Option(
            help="DATASET=DIR: where your copy of a dataset is (repeatable; overrides the "
            "config's data_roots), e.g. cifar10=~/data/cifar-10-batches-py"
        ),
    ] = None,
) -> None:
    """Run every pending run of a sweep; finished runs are skipped, so this resumes.

    Example: mirage bench run --config cifar10 --data-root cifar10=DIR --data-root cifar100=DIR
    --device cuda"""
    from mirage.bench.report import build_report
    from mirage.bench.sweep import RunFilter, run_sweep

    if answers is not None:
        os.environ["MIRAGE_ANSWERS"] = answers  # inherited by pool workers
    cfg = with_data_roots(load_sweep(config), data_root or [])
    path = _results_path(cfg.name, results)
    if scheduler:
        executor = "dask"
    only = RunFilter.of(
        cfg,
        scenarios=scenario or (),
        attacks=attack or (),
        defenses=defense or (),
        seeds=seed or (),
    )
    try:
        only.validate(cfg)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from error
    try:
        status = run_sweep(
            cfg,
            path,
            executor=executor,
            workers=workers,
            scheduler=scheduler,
            limit=limit,
            only=only,
            device=device,
        )
    except ValueError as error:
        if "device" not in str(error):
            raise
        raise typer.BadParameter(str(error)) from error
    console.print(f"[bold]{cfg.name}[/]: {status.done}/{status.total} runs done -> {path}")
    if report:
        console.print(f"report: {build_report(cfg, path, path.parent)}")
    print_verdict(cfg, path)


def print_verdict(cfg, path: Path) -> None:
    """The verdict table of a sweep with an attacker suite, then each row in words (nothing
    without a suite): :func:`mirage.bench.summary.verdict`, the one rule every report uses."""
    from rich.console import Console
    from rich.table import Table

    from mirage.bench.results import ResultStore
    from mirage.bench.summary import verdict, verdict_advice, verdict_table_row, worst_case_points

    suites = cfg.suites
    panels = worst_case_points(ResultStore(path).read(), suites) if suites else {}
    if not panels:
        return
    rows = verdict(panels)
    table = Table(
        title="verdict: the defense to deploy, judged by its worst case over the attacker "
        "suite (≤ 1 point of defender cost), or none where no defense beats the "
        "undefended API beyond the noise across seeds"
    )
    for key in verdict_table_row(rows[0]):
        table.add_column(key)
    for row in rows:
        table.add_row(
            *(
                "–" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)
                for v in verdict_table_row(row).values()
            )
        )
    wide = Console(width=max(console.width, 200))  # whole rows, also when piped to a log
    wide.print(table)
    for row in rows:
        wide.print(verdict_advice(row), markup=False, highlight=False)


@bench.command("import")
def import_(
    config: ProfileOption,
    source: Annotated[Path, typer.Option(help="results JSONL of an earlier sweep")],
    results: ResultsOption = None,
    attack: Annotated[
        list[str] | None, typer.Option(help="only these attack labels (repeatable)")
    ] = None,
) -> None:
    """Copy the runs of an earlier sweep that are runs of this one (same run id) into its results.

    Example: mirage bench import --config full --source results/quick/results.jsonl"""
    from mirage.bench.results import ResultStore
    from mirage.bench.sweep import RunFilter, import_records

    cfg = load_sweep(config)
    path = _results_path(cfg.name, results)
    only = RunFilter.of(cfg, attacks=attack or ())
    try:
        only.validate(cfg)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from error
    count = import_records(cfg, ResultStore(source), ResultStore(path), only)
    console.print(f"imported {count} runs from {source} into {path}")


@bench.command("status")
def status(
    config: ProfileOption = "quick",
    results: ResultsOption = None,
    workers: Annotated[int, typer.Option(min=1, help="workers the sweep runs with")] = 1,
) -> None:
    """Runs done and left, and an ETA: the finished runs' mean wall time × runs left / workers.

    Example: mirage bench status --config worst_case --workers 4"""
    from mirage.bench.results import ResultStore
    from mirage.bench.sweep import sweep_status

    cfg = load_sweep(config)
    state = sweep_status(cfg, ResultStore(_results_path(cfg.name, results)))
    table = Table("sweep", "done", "left", "ETA")
    eta = "–" if state.eta_seconds is None else f"{state.eta_seconds / workers / 60:.0f} min"
    table.add_row(cfg.name, str(state.done), str(len(state.pending)), eta)
    console.print(table)


@bench.command("report")
def report(
    config: ProfileOption = "quick",
    results: ResultsOption = None,
    out: Annotated[Path | None, typer.Option(help="output directory")] = None,
) -> None:
    """Write plots (PNG+SVG), report.md and report.html from the results.

    Example: mirage bench report --config quick --out report/"""
    from mirage.bench.report import build_report

    cfg = load_sweep(config)
    path = _results_path(cfg.name, results)
    console.print(f"report: {build_report(cfg, path, out or path.parent)}")
    print_verdict(cfg, path)


LEADERBOARD = Path("results") / "leaderboard.html"


@bench.command("leaderboard")
def leaderboard(
    config: Annotated[
        list[str] | None,
        typer.Option(
            "--config",
            "-c",
            help="a sweep with an attacker suite: built-in profile or TOML file (repeatable; "
            "default worst_case)",
        ),
    ] = None,
    results: Annotated[
        list[Path] | None,
        typer.Option(
            help="results JSONL of each --config, in order (default: results/<name>/results.jsonl)"
        ),
    ] = None,
    out: Annotated[Path, typer.Option(help="the HTML page to write")] = LEADERBOARD,
) -> None:
    """Write one static HTML page that ranks every defense point by its worst-case clone, per
    scenario × attack, under the verdict: soft-label and worst-case clone, the attacker that
    reached it, seeds and spread, defender cost and overhead, and where each row comes from.

    Example: mirage bench leaderboard --config worst_case --out results/leaderboard.html"""
    from mirage.bench.leaderboard import Source, build_leaderboard

    configs = config or ["worst_case"]
    if results and len(results) != len(configs):
        raise typer.BadParameter(
            f"give one --results per --config ({len(configs)}), or none", param_hint="--results"
        )
    paths: list[Path | None] = list(results) if results else [None] * len(configs)
    sources = []
    for name, path in zip(configs, paths, strict=True):
        sweep = load_sweep(name)
        sources.append(Source(name, sweep, _results_path(sweep.name, path)))
    try:
        page = build_leaderboard(sources, out)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--config") from error
    console.print(f"leaderboard: {page}")
