"""The service under hostile connections and failing storage, before and after a change, in one
run (docs/design.md §connections, §fair-share, §reservations, §service-errors).

Two code trees serve the same configs side by side: the working tree (``after``) and a commit
checked out with ``git worktree`` (``before``, ``--before``; its ``src`` goes first on the
server's ``PYTHONPATH``). Each server is ``python -m mirage.serve.runner`` on 127.0.0.1 with one
torch thread, mirage's LeNet at 1×28×28, K = 10 (random weights). Per tree:

- ``flood``: a client's one-image requests (binary tensor data) alone, then while another client
  floods with batches of 256 from 4 connections: its latency p50/p99;
- ``held``: the server with at most 256 file descriptors; 240 connections from one address
  (127.0.0.2) each get an early 401 (no key, ``Content-Length: 1000000``) and trickle their body a
  byte per 100 ms, reopened when cut; another client's (127.0.0.1) ``live`` on new connections and
  one-image latency on a kept one meanwhile (p50/p99, failures);
- ``chunks``: one keyless connection streams a chunked body of 1-byte chunks after its 401,
  reopened when cut; others' ``live`` p50/p99 and the server's CPU seconds meanwhile;
- ``sqlite_locked``: another connection holds the database's write lock for 6 s while one wrong
  key is tried; others' ``live`` p50/p99 meanwhile;
- ``hang_up``: a client with quota 256 sends 40 requests of 256 images, 0.3 s apart, each hung up
  right after its body; images the model ran on (``mirage_microbatch_queries_sum``) against
  images charged;
- ``rss``: the server's resident memory before and at its peak (sampled every 5 ms) while it
  takes its largest accepted body (256 JSON images) five times;
- ``throughput``: images/s at batch 256, binary, undefended and GRAD² (``target = all-ones``, a
  surrogate checkpoint), before and after, timed round-robin (medians of 5)::

    MIRAGE_PROGRESS=0 .venv/bin/python benchmarks/serve_hostile.py --before 9cdaf43
"""

from __future__ import annotations

import json
import os
import resource
import socket
import sqlite3
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import torch

from mirage.serve.auth import hash_key

from _harness import (
    REPO,
    free_port,
    lenet_checkpoint,
    parser,
    round_robin,
    runner_command,
    write_json,
)

SHAPE, K = (1, 28, 28), 10
HEADER = "Inference-Header-Content-Length"
KEYS = {
    "other": "mk_hostile_other",
    "flooder": "mk_hostile_flooder",
    "hanger": "mk_hostile_hanger",
    "metrics": "mk_hostile_metrics",
}


def config(workdir: Path, name: str, victim: Path, defense: dict) -> dict:
    clients = [
        {"name": "other", "key_sha256": hash_key(KEYS["other"])},
        {"name": "flooder", "key_sha256": hash_key(KEYS["flooder"])},
        {"name": "hanger", "key_sha256": hash_key(KEYS["hanger"]), "quota": 256},
    ]
    return {
        "model": {"name": "victim", "checkpoint": str(victim)},
        "defense": defense,
        "limits": {"max_batch": 256},
        "storage": {"database": str(workdir / f"{name}.sqlite")},
        "access": {"metrics_key_sha256": hash_key(KEYS["metrics"]), "auth_failures": 10**9},
        "clients": clients,
    }


class Server:
    """A server of one code tree in a subprocess (``nofile``: its descriptor limit)."""

    def __init__(
        self, tree: Path, cfg: dict, workdir: Path, name: str, nofile: int | None = None
    ) -> None:
        path = workdir / f"{name}.json"
        path.write_text(json.dumps(cfg))
        self.database = Path(cfg["storage"]["database"])
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        env = {
            **os.environ,
            "PYTHONPATH": str(tree / "src"),
            "OMP_NUM_THREADS": "1",
            "MIRAGE_PROGRESS": "0",
        }

        self.log = open(workdir / f"{name}.log", "w")  # noqa: SIM115 — closed in stop()
        self.proc = subprocess.Popen(
            runner_command(path, port, python=str(REPO / ".venv/bin/python")),
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        if nofile is not None:  # set while it imports, long before it listens
            resource.prlimit(self.proc.pid, resource.RLIMIT_NOFILE, (nofile, nofile))
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(self.url + "/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"{name} did not start: {(workdir / f'{name}.log').read_text()[-2000:]}"
                )
            time.sleep(0.2)

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def metric(self, name: str) -> float:
        text = httpx.get(
            self.url + "/metrics", headers={"Authorization": f"Bearer {KEYS['metrics']}"}
        ).text
        return sum(
            float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name)
        )

    def used(self, client: str) -> int:
        response = httpx.get(
            self.url + "/v2/models/victim",
            headers={"Authorization": f"Bearer {KEYS[client]}"},
            timeout=30,
        )
        if response.status_code != 200:
            raise RuntimeError(f"metadata: HTTP {response.status_code} {response.text[:300]}")
        return response.json()["parameters"]["client"]["queries_used"]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def binary_request(n: int, seed: int = 0) -> tuple[bytes, dict[str, str]]:
    x = np.random.default_rng(seed).random((n, *SHAPE), dtype=np.float32)
    raw = x.astype("<f4").tobytes()
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "images",
                    "shape": list(x.shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    return header + raw, {HEADER: str(len(header)), "Content-Type": "application/octet-stream"}


def json_request(n: int) -> bytes:
    x = np.random.default_rng(0).random((n, *SHAPE), dtype=np.float32)
    return json.dumps(
        {
            "inputs": [
                {
                    "name": "images",
                    "shape": list(x.shape),
                    "datatype": "FP32",
                    "data": x.reshape(-1).tolist(),
                }
            ]
        }
    ).encode()


def percentiles(times: list[float], failures: int = 0) -> dict:
    if not times:
        return {"p50_ms": None, "p99_ms": None, "n": 0, "failures": failures}
    ordered = sorted(times)
    return {
        "p50_ms": round(1000 * statistics.median(ordered), 1),
        "p99_ms": round(1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 1),
        "n": len(ordered),
        "failures": failures,
    }


def sample(fn: Callable[[], None], seconds: float, pause: float = 0.02) -> dict:
    """Latency of ``fn`` called repeatedly for ``seconds`` (a failure or timeout counts apart)."""
    times, failures, end = [], 0, time.monotonic() + seconds
    while time.monotonic() < end:
        start = time.monotonic()
        try:
            fn()
            times.append(time.monotonic() - start)
        except (httpx.HTTPError, OSError):
            failures += 1
        time.sleep(pause)
    return percentiles(times, failures)


def in_background(
    target: Callable[[threading.Event], None], count: int = 1
) -> tuple[threading.Event, list]:
    stop = threading.Event()
    threads = [threading.Thread(target=target, args=(stop,), daemon=True) for _ in range(count)]
    for thread in threads:
        thread.start()
    return stop, threads


def finish(stop: threading.Event, threads: list) -> None:
    stop.set()
    for thread in threads:
        thread.join(30)


def one_image_probe(url: str) -> Callable[[], None]:
    client = httpx.Client(
        base_url=url, timeout=10, headers={"Authorization": f"Bearer {KEYS['other']}"}
    )
    content, headers = binary_request(1)

    def probe() -> None:
        client.post("/v2/models/victim/infer", content=content, headers=headers).raise_for_status()

    return probe


def live_probe(url: str) -> Callable[[], None]:
    """``GET /v2/health/live`` on a new connection each time."""
    return lambda: httpx.get(url + "/v2/health/live", timeout=10).raise_for_status()


def settle(server: Server, timeout: float = 30.0) -> float:
    """Wait until the server answers ``live`` within 50 ms again (the previous scenario's backlog
    drained); returns the seconds waited."""
    start = time.monotonic()
    probe = live_probe(server.url)
    while time.monotonic() - start < timeout:
        began = time.monotonic()
        try:
            probe()
            if time.monotonic() - began < 0.05:
                break
        except (httpx.HTTPError, OSError):
            pass
        time.sleep(0.2)
    return round(time.monotonic() - start, 1)


def flood(server: Server) -> dict:
    alone = sample(one_image_probe(server.url), 4)
    content, headers = binary_request(256, 1)

    def flooder(stop: threading.Event) -> None:
        with httpx.Client(
            base_url=server.url, timeout=60, headers={"Authorization": f"Bearer {KEYS['flooder']}"}
        ) as http:
            while not stop.is_set():
                http.post("/v2/models/victim/infer", content=content, headers=headers)

    stop, threads = in_background(flooder, 4)
    time.sleep(1)
    flooded = sample(one_image_probe(server.url), 8)
    finish(stop, threads)
    return {"alone": alone, "flooded": flooded}


ATTACKER = "127.0.0.2"
"""The hostile connections' source address (the probes come from 127.0.0.1)."""


def connect(url: str, timeout: float = 5) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection(
        (host, int(port)), timeout=timeout, source_address=(ATTACKER, 0)
    )


def held(tree: Path, cfg: dict, workdir: Path, name: str) -> dict:
    server = Server(tree, cfg, workdir, name, nofile=256)
    head = b"POST /v2/models/victim/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n"

    def trickler(stop: threading.Event) -> None:
        sock = None
        while not stop.is_set():
            try:
                if sock is None:
                    sock = connect(server.url)
                    sock.sendall(head)
                sock.sendall(b"0")
            except OSError:
                if sock is not None:
                    sock.close()
                sock = None
            time.sleep(0.1)
        if sock is not None:
            sock.close()

    stop, threads = in_background(trickler, 240)
    time.sleep(3)
    result = {
        "live": sample(live_probe(server.url), 5),
        "infer": sample(one_image_probe(server.url), 5),
    }
    finish(stop, threads)
    server.stop()
    return result


def chunks(server: Server) -> dict:
    head = b"POST /v2/models/victim/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    block = b"1\r\n0\r\n" * 2000

    def streamer(stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                with connect(server.url) as sock:
                    sock.sendall(head)
                    while not stop.is_set():
                        sock.sendall(block)
            except OSError:
                time.sleep(0.01)

    before = server.cpu_seconds()
    stop, threads = in_background(streamer)
    live = sample(live_probe(server.url), 8)
    finish(stop, threads)
    return {"live": live, "server_cpu_s": round(server.cpu_seconds() - before, 2), "seconds": 8}


def sqlite_locked(server: Server) -> dict:
    baseline = sample(live_probe(server.url), 2)
    lock = sqlite3.connect(server.database, isolation_level=None, timeout=30)
    lock.execute("BEGIN IMMEDIATE")
    login: dict = {}

    def wrong_key() -> None:
        start = time.monotonic()
        try:
            response = httpx.post(
                server.url + "/v2/models/victim/infer",
                content=b"{}",
                headers={"Authorization": "Bearer wrong"},
                timeout=30,
            )
            login["status"] = response.status_code
        except httpx.HTTPError as error:
            login["status"] = type(error).__name__
        login["seconds"] = round(time.monotonic() - start, 2)

    thread = threading.Thread(target=wrong_key)
    thread.start()
    locked = sample(live_probe(server.url), 6)
    lock.execute("ROLLBACK")
    lock.close()
    thread.join(30)
    return {"baseline": baseline, "locked": locked, "wrong_key": login}


def hang_up(server: Server) -> dict:
    computed = server.metric("mirage_microbatch_queries_sum")
    content, headers = binary_request(256, 2)
    head = (
        "POST /v2/models/victim/infer HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {KEYS['hanger']}\r\nContent-Length: {len(content)}\r\n"
        + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        + "\r\n"
    ).encode()
    for _ in range(40):  # each hung up right after its body, the next sent once it would have run
        with connect(server.url) as sock:
            sock.sendall(head + content)
        time.sleep(0.3)
    time.sleep(2)
    return {
        "requests": 40,
        "images_sent": 40 * 256,
        "quota": 256,
        "computed": int(server.metric("mirage_microbatch_queries_sum") - computed),
        "charged": server.used("hanger"),
    }


def rss(server: Server) -> dict:
    content = json_request(256)
    peak, stop = [server.rss_mb()], threading.Event()
    baseline = peak[0]

    def sampler() -> None:
        while not stop.is_set():
            peak.append(server.rss_mb())
            time.sleep(0.005)

    thread = threading.Thread(target=sampler)
    thread.start()
    statuses = [
        httpx.post(
            server.url + "/v2/models/victim/infer",
            content=content,
            timeout=60,
            headers={
                "Authorization": f"Bearer {KEYS['other']}",
                "Content-Type": "application/json",
            },
        ).status_code
        for _ in range(5)
    ]
    stop.set()
    thread.join()
    return {
        "body_mb": round(len(content) / 2**20, 2),
        "statuses": statuses,
        "baseline_mb": round(baseline, 1),
        "peak_mb": round(max(peak), 1),
    }


def throughput(servers: dict[str, Server], repeats: int) -> dict:
    content, headers = binary_request(256, 3)
    clients = {
        name: httpx.Client(
            base_url=s.url, timeout=120, headers={"Authorization": f"Bearer {KEYS['other']}"}
        )
        for name, s in servers.items()
    }

    def call(client: httpx.Client) -> Callable[[], None]:
        return lambda: client.post(
            "/v2/models/victim/infer", content=content, headers=headers
        ).raise_for_status()

    seconds = round_robin(
        {name: call(client) for name, client in clients.items()}, repeats, inner=3
    )
    return {name: round(256 / seconds[name], 1) for name in servers} | {
        f"{name}_vs_{first}": round(seconds[first] / seconds[name], 3)
        for first in list(servers)[:1]
        for name in servers
    }


def main() -> None:
    arguments = parser(
        __doc__,
        repeats=5,
        threads=False,
        output="--out",
        output_default=Path("results/serve/hostile.json"),
    )
    arguments.add_argument(
        "--before", default="9cdaf43", help="the commit to compare with (git worktree)"
    )
    args = arguments.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        before = workdir / "before"
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "add", "--detach", str(before), args.before],
            check=True,
            capture_output=True,
        )
        try:
            trees = {"before": before, "after": REPO}
            victim, surrogate = (
                lenet_checkpoint(workdir / "victim", 0),
                lenet_checkpoint(workdir / "surrogate", 1),
            )
            grad2 = {
                "name": "grad2",
                "params": {"epsilon": args.epsilon, "target": "all-ones", "batch_size": 256},
                "surrogate": str(surrogate),
            }
            results: dict = {}
            for tree_name, tree in trees.items():
                print(f"[{tree_name}] held connections", flush=True)
                row = {
                    "held": held(
                        tree,
                        config(workdir, f"{tree_name}-held", victim, {"name": "none"}),
                        workdir,
                        f"{tree_name}-held",
                    )
                }
                server = Server(
                    tree, config(workdir, tree_name, victim, {"name": "none"}), workdir, tree_name
                )
                try:
                    for name, scenario in (
                        ("flood", flood),
                        ("chunks", chunks),
                        ("sqlite_locked", sqlite_locked),
                        ("hang_up", hang_up),
                        ("rss", rss),
                    ):
                        print(f"[{tree_name}] {name}", flush=True)
                        waited = settle(server)
                        row[name] = {**scenario(server), "settled_after_s": waited}
                        print(json.dumps(row[name]), flush=True)
                finally:
                    server.stop()
                results[tree_name] = row
            print("throughput", flush=True)
            servers = {
                f"{tree_name}_{defense}": Server(
                    tree,
                    config(workdir, f"{tree_name}-{defense}-tp", victim, spec),
                    workdir,
                    f"{tree_name}-{defense}-tp",
                )
                for tree_name, tree in trees.items()
                for defense, spec in (("none", {"name": "none"}), ("grad2", grad2))
            }
            try:
                results["throughput_images_per_s"] = throughput(servers, args.repeats)
            finally:
                for server in servers.values():
                    server.stop()
        finally:
            subprocess.run(
                ["git", "-C", str(REPO), "worktree", "remove", "--force", str(before)], check=False
            )
    results["before_commit"] = args.before
    print(json.dumps(results, indent=1))
    write_json(args.out, results, args)


if __name__ == "__main__":
    main()
