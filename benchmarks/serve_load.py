"""Bounded load test of the defended prediction service on loopback (docs/design.md
§overhead).

For each defense (undefended ``none``, ``mad`` MAD-last if registered, ``grad2`` all-ones with
the scenario's distilled surrogate; ``--defenses`` to choose) the script starts ``mirage serve``
as a subprocess on 127.0.0.1 with the Fashion-MNIST LeNet victim, then ``--concurrency`` client
threads send a fixed number of pre-encoded OIP V2 requests of batch 1 and of batch 32. Reports
requests/s, images/s and p50/p99 latency per cell (medians over ``--rounds`` interleaved rounds:
all servers run at once and are measured in turn, so a busy machine slows every defense alike),
and each as a ratio to the undefended server at the same batch size, all from one run. Writes JSON
to ``--out``::

    MIRAGE_PROGRESS=0 .venv/bin/python benchmarks/serve_load.py --out results/serve/load.json
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import torch

from mirage.defenses import DEFENSES

from _harness import parser, start_mirage_server, write_json

log = logging.getLogger("serve_load")
KEY = "mk_load_test_key"
MIRAGE = str(Path(sys.executable).with_name("mirage"))


def defense_spec(name: str, epsilon: float) -> dict | None:
    """The [defense] table for ``name``, or None if it is not registered."""
    if name == "none":
        return {"name": "none"}
    if name not in DEFENSES:
        return None
    fields = DEFENSES[name].params.model_fields
    params: dict = {"epsilon": epsilon} if "epsilon" in fields else {}
    spec: dict = {"name": name, "params": params}
    if name == "grad2":
        params.update(target="all-ones", batch_size=256)
        spec["surrogate"] = "distilled"  # early-stopped (the cached one)
    elif name == "mad":
        if "layers" in fields:
            params["layers"] = "last"
        if "surrogate" in fields:
            spec["surrogate"] = "random"  # MAD's default: a random-init surrogate
    return spec


def start_server(
    config: dict, workdir: Path, timeout: float = 300.0
) -> tuple[subprocess.Popen, str]:
    return start_mirage_server(config, workdir, config["defense"]["name"], timeout=timeout)


def encode(images: torch.Tensor) -> bytes:
    return json.dumps(
        {
            "inputs": [
                {
                    "name": "images",
                    "shape": list(images.shape),
                    "datatype": "FP32",
                    "data": images.reshape(-1).tolist(),
                }
            ]
        }
    ).encode()


def load(url: str, bodies: list[bytes], requests: int, concurrency: int) -> dict:
    """Send ``requests`` requests from ``concurrency`` threads; latency in seconds per request."""
    latencies: list[float] = []
    failures: list[int] = []
    lock = threading.Lock()
    per_thread = [
        requests // concurrency + (i < requests % concurrency) for i in range(concurrency)
    ]

    def worker(index: int) -> None:
        mine, bad = [], []
        with httpx.Client(
            base_url=url,
            timeout=120,
            headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
        ) as http:
            for i in range(per_thread[index]):
                start = time.perf_counter()
                response = http.post(
                    "/v2/models/fmnist/infer",
                    content=bodies[(index + i * concurrency) % len(bodies)],
                )
                mine.append(time.perf_counter() - start)
                if response.status_code != 200:
                    bad.append(response.status_code)
        with lock:
            latencies.extend(mine)
            failures.extend(bad)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if failures:
        raise RuntimeError(f"{len(failures)} failed requests: {sorted(set(failures))}")
    lat = np.array(latencies)
    return {
        "requests": requests,
        "wall_seconds": wall,
        "requests_per_second": requests / wall,
        "p50_ms": float(np.percentile(lat, 50) * 1e3),
        "p99_ms": float(np.percentile(lat, 99) * 1e3),
    }


def main() -> None:
    arguments = parser(
        __doc__, threads=False, output="--out", output_default=Path("results/serve/load.json")
    )
    arguments.add_argument("--defenses", nargs="+", default=["none", "mad", "grad2"])
    arguments.add_argument("--concurrency", type=int, default=8)
    arguments.add_argument(
        "--requests",
        type=int,
        nargs=2,
        default=[400, 80],
        metavar=("B1", "B32"),
        help="requests per cell at batch 1 and at batch 32",
    )
    arguments.add_argument("--warmup", type=int, default=16)
    arguments.add_argument(
        "--rounds", type=int, default=3, help="interleaved repetitions (medians reported)"
    )
    args = arguments.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)

    from mirage.data import load_dataset

    pool = load_dataset("mnist")  # the fmnist scenario's query pool
    images = pool.test.images[: 32 * 16]
    batches = {
        1: [encode(images[i : i + 1]) for i in range(64)],
        32: [encode(images[i : i + 32]) for i in range(0, len(images), 32)],
    }
    requests = dict(zip((1, 32), args.requests, strict=True))
    servers, skipped, samples = {}, [], []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        try:
            for name in args.defenses:
                spec = defense_spec(name, args.epsilon)
                if spec is None:
                    log.warning("defense %r is not registered; skipped", name)
                    skipped.append(name)
                    continue
                config = {
                    "model": {"name": "fmnist", "scenario": "fmnist"},
                    "defense": spec,
                    "limits": {"max_batch": 256},
                    "storage": {"database": str(workdir / f"{name}.sqlite")},
                    "clients": [
                        {"name": "load", "key_sha256": hashlib.sha256(KEY.encode()).hexdigest()}
                    ],
                }
                servers[name] = start_server(config, workdir)
            for name, (_, url) in servers.items():
                for bodies in batches.values():
                    load(url, bodies, args.warmup, args.concurrency)
            # interleave defenses round by round so the shared machine's load hits all alike
            for round_ in range(args.rounds):
                for name, (_, url) in servers.items():
                    for batch, bodies in batches.items():
                        cell = {
                            "defense": name,
                            "batch": batch,
                            "round": round_,
                            **load(url, bodies, requests[batch], args.concurrency),
                        }
                        log.info("%s", cell)
                        samples.append(cell)
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(30)
    results = []
    for name in servers:
        for batch in batches:
            cells = [c for c in samples if c["defense"] == name and c["batch"] == batch]
            median = {
                key: float(np.median([c[key] for c in cells]))
                for key in ("requests_per_second", "p50_ms", "p99_ms")
            }
            results.append(
                {
                    "defense": name,
                    "batch": batch,
                    "concurrency": args.concurrency,
                    "rounds": len(cells),
                    "requests_per_round": requests[batch],
                    **median,
                    "images_per_second": median["requests_per_second"] * batch,
                }
            )
    base = {r["batch"]: r for r in results if r["defense"] == "none"}
    for r in results:
        if r["batch"] in base:
            b = base[r["batch"]]
            r["throughput_ratio"] = r["requests_per_second"] / b["requests_per_second"]
            r["p50_ratio"] = r["p50_ms"] / b["p50_ms"]
            r["p99_ratio"] = r["p99_ms"] / b["p99_ms"]
    print(
        f"{'defense':10} {'batch':>5} {'req/s':>8} {'img/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'thr/none':>8} {'p50/none':>8} {'p99/none':>8}"
    )
    for r in results:
        print(
            f"{r['defense']:10} {r['batch']:5d} {r['requests_per_second']:8.1f} "
            f"{r['images_per_second']:8.1f} "
            f"{r['p50_ms']:8.2f} {r['p99_ms']:8.2f} {r.get('throughput_ratio', float('nan')):8.3f} "
            f"{r.get('p50_ratio', float('nan')):8.3f} {r.get('p99_ratio', float('nan')):8.3f}"
        )
    write_json(
        args.out,
        {
            "args": {k: str(v) for k, v in vars(args).items()},
            "skipped": skipped,
            "torch": torch.__version__,
            "cells": results,
            "samples": samples,
        },
        args,
    )
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
