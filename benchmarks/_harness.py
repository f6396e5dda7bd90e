"""What the performance benchmarks share: timers, the common command-line arguments, JSON output
with provenance, loopback servers, and access to the test oracles (the slow originals in
``tests/oracles/``).

Every benchmark in this directory imports it as ``_harness`` (Python puts a script's own
directory first on ``sys.path``); the scripts of ``experiments/`` import it for ``provenance``,
``parser`` and ``write_json`` after putting this directory on ``sys.path``. Timing is in one
process and one run, so every ratio compares contenders under the same machine load
(docs/design.md §overhead).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def runner_command(
    config: Path, port: int, *, workers: int = 1, python: str = sys.executable
) -> list[str]:
    """The command that serves ``config`` on ``port`` (``python -m mirage.serve.runner``)."""
    return [
        python,
        "-m",
        "mirage.serve.runner",
        "--config",
        str(config),
        "--port",
        str(port),
        "--workers",
        str(workers),
    ]


def start_mirage_server(
    config: dict,
    workdir: Path,
    name: str,
    *,
    timeout: float = 120.0,
    env: dict[str, str] | None = None,
    workers: int = 1,
) -> tuple[subprocess.Popen, str]:
    """``mirage serve`` with ``config`` (a dict, written to ``workdir``) on a free loopback port
    (from ``workers`` processes), its log in ``workdir``; returns the process and its URL once
    ``/v2/health/ready`` says 200."""
    import httpx

    path = workdir / f"serve-{name}.json"
    path.write_text(json.dumps(config))
    port = free_port()
    log = workdir / f"serve-{name}.log"
    logfile = open(log, "w")  # noqa: SIM115 — closed with the process
    proc = subprocess.Popen(
        runner_command(path, port, workers=workers),
        stdout=logfile,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/v2/health/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.terminate()
    raise RuntimeError("server did not become ready")


def lenet_checkpoint(
    directory: Path, seed: int, shape: tuple[int, int, int] = (1, 28, 28), classes: int = 10
) -> Path:
    """mirage's LeNet with random weights (seeded) saved as a checkpoint: the served benchmarks'
    victim and surrogate (speed does not depend on the weights)."""
    return model_checkpoint(directory, seed, "lenet", shape, classes)


def model_checkpoint(
    directory: Path,
    seed: int,
    architecture: str,
    shape: tuple[int, int, int],
    classes: int = 10,
) -> Path:
    """A registered ``architecture`` with random weights (seeded) saved as a checkpoint."""
    import torch

    from mirage.models import ModelCard, create_model, save_checkpoint

    torch.manual_seed(seed)
    channels = shape[0]
    model = create_model(architecture, shape, classes, (0.5,) * channels, (0.25,) * channels)
    card = ModelCard(
        architecture=architecture,
        input_shape=shape,
        num_classes=classes,
        mean=(0.5,) * channels,
        std=(0.25,) * channels,
        seed=seed,
    )
    return save_checkpoint(model.eval(), card, directory)


def use_test_oracles() -> None:
    """Make ``tests/oracles`` importable (``from oracles.mad_original import original_mad``)."""
    tests = str(REPO / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)


def best_of(fn: Callable[[], Any], repeats: int) -> float:
    """Best of ``repeats`` wall times of ``fn()`` after one warm-up call (as ``timeit`` advises:
    on a shared machine every other statistic mostly measures the neighbours)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def round_robin(
    fns: dict[str, Callable[[], Any]], repeats: int, inner: int = 1
) -> dict[str, float]:
    """Median seconds per call of each callable, measured round-robin (a block of ``inner`` calls
    of each per repeat, so caches are warm for the contender being timed and a change in machine
    load hits every contender alike); also the median per-repeat ratio of each to the first one
    (``<name>_ratio``)."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            times[name].append((time.perf_counter() - start) / inner)
    first = next(iter(fns))
    out = {name: statistics.median(t) for name, t in times.items()}
    out.update(
        {
            f"{name}_ratio": statistics.median(
                a / b for a, b in zip(times[name], times[first], strict=True)
            )
            for name in fns
        }
    )
    return out


def parser(
    doc: str | None,
    *,
    repeats: int | None = None,
    batches: list[int] | None = None,
    threads: bool = True,
    output: str = "--json",
    output_default: Path | None = None,
) -> argparse.ArgumentParser:
    """An argument parser described by the first line of ``doc`` with the shared arguments:
    ``--epsilon``, the output path (``output``), ``--threads`` unless told not to, and
    ``--repeats`` / ``--batches`` when given a default."""
    parser = argparse.ArgumentParser(description=doc.strip().splitlines()[0] if doc else None)
    if batches is not None:
        parser.add_argument("--batches", type=int, nargs="+", default=batches)
    if repeats is not None:
        parser.add_argument("--repeats", type=int, default=repeats)
    if threads:
        parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--epsilon", type=float, default=0.5, help="the defenses' L1 budget")
    parser.add_argument(
        output, type=Path, default=output_default, help="write the numbers as JSON here"
    )
    return parser


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(
            ["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


_STARTED_AT = (_git("rev-parse", "HEAD"), _git("status", "--porcelain", "--untracked-files=no"))
"""The commit and tree state when this process started: the code that runs is the code it loaded
then, however the tree changes before a row is written."""


def provenance(args: argparse.Namespace | None = None) -> dict[str, Any]:
    """Where and how a result was made: script, arguments, commit and tree state at process start,
    versions, machine, time."""
    import numpy as np
    import torch

    commit, status = _STARTED_AT
    return {
        "script": Path(sys.argv[0]).name,
        "argv": sys.argv[1:],
        "args": {k: str(v) for k, v in vars(args).items()} if args is not None else None,
        "git_commit": commit,
        "git_dirty": None if status is None else bool(status),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "machine": platform.platform(),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def write_json(
    path: Path | None, payload: dict[str, Any], args: argparse.Namespace | None = None
) -> None:
    """Write ``payload`` plus a ``provenance`` entry to ``path`` (nothing if ``path`` is None)."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**payload, "provenance": provenance(args)}, indent=2))
