"""Images/s of one victim in process, served over OIP V2 REST as JSON and as binary tensor data,
and through mirage as a gateway in front of MLServer, undefended and with GRAD², all in one run
(docs/design.md §oip, §gateway, §overhead).

The victim is mirage's LeNet at 1×28×28 with K = 10 (the Fashion-MNIST victim's network, random
weights: speed does not depend on them), the surrogate another one. GRAD² is the served config
of the tests and ``benchmarks/serve_load.py``: ``target = "all-ones"``, ``--epsilon`` (0.5), a
surrogate checkpoint, ``batch_size = 256``. Two servers (``python -m mirage.serve.runner``, one
undefended, one GRAD², the default limits: ``max_batch`` 256, micro-batches of up to 256 images
or 2 ms) run as subprocesses on 127.0.0.1 with ``--threads`` torch threads, as many as the
in-process contenders get. One client (this process, ``httpx``, keep-alive) sends pre-encoded
requests, one at a time, and decodes every answer: JSON with ``json.loads``, binary with
``np.frombuffer`` (the request sets ``binary_data_output``). Per batch size, the six contenders
(in process, served JSON, served binary; undefended and GRAD²) are timed round-robin, so a busy
machine slows all alike, and the ratios are medians of per-repeat ratios::

    MIRAGE_PROGRESS=0 .venv/bin/python benchmarks/oip_throughput.py

The gateway rows: the same victim exported to ONNX, served by MLServer 1.7.1 (its own venv,
tests/serve/third_party/mlserver-requirements.txt, installed by scripts/bootstrap.sh) with the
onnxruntime runtime of ``tests/serve/third_party/runtimes.py`` (``--threads`` intra-op threads),
answering logits; two more mirage servers (undefended, GRAD²) run with ``[model] upstream``
pointing at it, ``output = "logits"``. The client talks binary tensor data to the gateway; the
gateway talks JSON to MLServer, which does not implement the binary extension. ``upstream`` is
the client talking JSON to MLServer directly (no mirage), to show what the gateway adds. Without
MLServer's venv or onnxscript (for the export) the gateway rows are skipped, and the JSON says
why (``gateway_skipped``).

The gRPC rows: the same two servers also answer the protocol's gRPC binding (``[grpc] port``,
docs/design.md §grpc); the client is Triton's own ``tritonclient.grpc`` sending raw FP32 contents.
``--model-workers`` sets the servers' ``limits.model_workers`` (1 by default); ``--no-gateway``
leaves MLServer out::

    MIRAGE_PROGRESS=0 .venv/bin/python benchmarks/oip_throughput.py --no-gateway --model-workers 2 \
        --out results/serve/oip_throughput_workers2.json

``--architecture resnet18`` serves a CIFAR-style ResNet-18 at 3×32×32 instead (victim and
surrogate, random weights). ``--server-workers N`` starts each server as N processes behind one
port (``mirage serve --workers``, docs/design.md §workers), and ``--clients C`` makes each timed
call of a served contender C concurrent requests (C × batch images), so that more than one
worker has work::

    MIRAGE_PROGRESS=0 .venv/bin/python benchmarks/oip_throughput.py --no-gateway \
        --architecture resnet18 --batches 1 32 256 --repeats 3 \
        --out results/serve/oip_throughput_resnet18.json
    MIRAGE_PROGRESS=0 .venv/bin/python benchmarks/oip_throughput.py --no-gateway \
        --server-workers 2 --clients 2 --out results/serve/oip_throughput_processes2.json

The throughput targets: served binary undefended at batch 256 ≥ 0.5× the in-process forward, and
GRAD² served ≥ 0.8× undefended served.
"""

from __future__ import annotations

import hashlib
import json
import logging
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import torch

from mirage.defenses import create_defense
from mirage.models import load_checkpoint

from _harness import (
    REPO,
    free_port,
    model_checkpoint,
    parser,
    round_robin,
    start_mirage_server,
    write_json,
)

sys.path.insert(0, str(REPO / "tests" / "serve"))  # the tests' MLServer launcher
from upstreams import MLServerProcess, mlserver_executable

log = logging.getLogger("oip_throughput")
K = 10
SHAPES = {"lenet": (1, 28, 28), "resnet18": (3, 32, 32)}
KEY = "mk_oip_throughput_key"
HEADER = "Inference-Header-Content-Length"
MODES = ("inprocess", "json", "binary", "grpc", "gateway")
DEFENSES = ("none", "grad2")
GATEWAY_ATOL = 1e-4  # the ONNX export's logits differ from torch's in the last float32 bits


def grad2_spec(epsilon: float, surrogate: Path) -> dict:
    return {
        "name": "grad2",
        "params": {"epsilon": epsilon, "target": "all-ones", "batch_size": 256},
        "surrogate": str(surrogate),
    }


def start_server(
    config: dict,
    workdir: Path,
    threads: int,
    timeout: float = 120.0,
    name: str | None = None,
    workers: int = 1,
) -> tuple[subprocess.Popen, str]:
    """A mirage server from ``workers`` processes with ``threads`` torch threads each (the
    supervisor gives each worker cpu_count // workers; OMP_NUM_THREADS caps that)."""
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "MIRAGE_PROGRESS": "0"}
    return start_mirage_server(
        config,
        workdir,
        name or config["defense"]["name"],
        timeout=timeout,
        env=env,
        workers=workers,
    )


def start_upstream(
    victim: torch.nn.Module, workdir: Path, threads: int, shape: tuple[int, int, int]
) -> tuple[MLServerProcess | None, str]:
    """MLServer serving ``victim`` exported to ONNX, or ``None`` and why not."""
    executable = mlserver_executable()
    if executable is None:
        return None, "MLServer's venv is missing (scripts/bootstrap.sh installs it)"
    try:
        import onnxscript  # noqa: F401 (torch.onnx.export's dynamo exporter needs it)
    except ImportError:
        return None, "onnxscript is not installed: the victim cannot be exported to ONNX"
    path = workdir / "victim.onnx"
    batch = torch.export.Dim("batch", min=1, max=1024)
    torch.onnx.export(
        victim,
        (torch.rand(2, *shape),),
        str(path),
        input_names=["images"],
        dynamic_shapes=({0: batch},),
        dynamo=True,
        verbose=False,
    )
    server = MLServerProcess(
        executable,
        workdir / "mlserver",
        {"victim": ("runtimes.Onnx", {"uri": str(path), "extra": {"threads": threads}})},
        env={"OMP_NUM_THREADS": str(threads)},
    )
    return server.start(), ""


def gateway_config(
    spec: dict, upstream: str, workdir: Path, client: dict, shape: tuple[int, int, int]
) -> dict:
    name = spec["name"]
    return {
        "model": {
            "name": "victim",
            "upstream": {
                "url": upstream,
                "model": "victim",
                "input_name": "images",
                "input_shape": list(shape),
                "output": "logits",
                "num_classes": K,
                "timeout_s": 120,
                "retries": 0,
            },
        },
        "defense": spec,
        "limits": {"max_batch": 256},
        "storage": {"database": str(workdir / f"gateway-{name}.sqlite")},
        "clients": [client],
    }


def json_request(x: np.ndarray) -> tuple[bytes, dict]:
    body = {
        "inputs": [
            {
                "name": "images",
                "shape": list(x.shape),
                "datatype": "FP32",
                "data": x.reshape(-1).tolist(),
            }
        ]
    }
    return json.dumps(body).encode(), {"Content-Type": "application/json"}


def binary_request(x: np.ndarray) -> tuple[bytes, dict]:
    raw = np.ascontiguousarray(x, dtype="<f4").tobytes()
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


def decode(response: httpx.Response) -> np.ndarray:
    """The served probabilities of a response, JSON or binary (one output)."""
    if response.status_code != 200:
        raise RuntimeError(f"HTTP {response.status_code}: {response.text[:300]}")
    length = response.headers.get(HEADER)
    if length is None:
        output = json.loads(response.content)["outputs"][0]
        return np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])
    header = json.loads(response.content[: int(length)])
    output = header["outputs"][0]
    return np.frombuffer(
        response.content, "<f4", count=int(np.prod(output["shape"])), offset=int(length)
    ).reshape(output["shape"])


def main() -> None:
    arguments = parser(
        __doc__,
        repeats=10,
        batches=[1, 32, 256],
        output="--out",
        output_default=Path("results/serve/oip_throughput.json"),
    )
    arguments.add_argument(
        "--model-workers", type=int, default=1, help="the servers' limits.model_workers"
    )
    arguments.add_argument(
        "--no-gateway", action="store_true", help="leave MLServer and the gateway rows out"
    )
    arguments.add_argument(
        "--architecture", choices=sorted(SHAPES), default="lenet", help="the served network"
    )
    arguments.add_argument(
        "--server-workers",
        type=int,
        default=1,
        help="processes per server (mirage serve --workers)",
    )
    arguments.add_argument(
        "--clients",
        type=int,
        default=1,
        help="concurrent requests per timed call (one client each)",
    )
    args = arguments.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        shape = SHAPES[args.architecture]
        victim_dir, surrogate_dir = (
            model_checkpoint(workdir / "victim", 0, args.architecture, shape, K),
            model_checkpoint(workdir / "surrogate", 1, args.architecture, shape, K),
        )
        victim, surrogate = (
            load_checkpoint(victim_dir)[0].eval(),
            load_checkpoint(surrogate_dir)[0].eval(),
        )
        grad2 = create_defense(
            "grad2", epsilon=args.epsilon, target="all-ones", surrogate=surrogate, batch_size=256
        )
        client = {"name": "bench", "key_sha256": hashlib.sha256(KEY.encode()).hexdigest()}
        servers, upstream, skipped, grpc_addresses = {}, None, None, {}
        specs = (("none", {"name": "none"}), ("grad2", grad2_spec(args.epsilon, surrogate_dir)))
        try:
            for name, spec in specs:
                config = {
                    "model": {"name": "victim", "checkpoint": str(victim_dir)},
                    "defense": spec,
                    "limits": {"max_batch": 256, "model_workers": args.model_workers},
                    "storage": {"database": str(workdir / f"{name}.sqlite")},
                    "grpc": {"port": free_port()},
                    "clients": [client],
                }
                servers[name] = start_server(
                    config, workdir, args.threads, workers=args.server_workers, timeout=300
                )
                grpc_addresses[name] = f"127.0.0.1:{config['grpc']['port']}"
            upstream, skipped = (
                (None, "--no-gateway")
                if args.no_gateway
                else start_upstream(victim, workdir, args.threads, shape)
            )
            if upstream is None:
                log.warning("no gateway rows: %s", skipped)
            else:
                for name, spec in specs:
                    servers[f"gateway-{name}"] = start_server(
                        gateway_config(spec, upstream.url, workdir, client, shape),
                        workdir,
                        args.threads,
                        name=f"gateway-{name}",
                    )
            http = {
                name: httpx.Client(
                    base_url=url, timeout=120, headers={"Authorization": f"Bearer {KEY}"}
                )
                for name, (_, url) in servers.items()
            }
            if upstream is not None:
                http["upstream"] = httpx.Client(base_url=upstream.url, timeout=120)
            import tritonclient.grpc as grpcclient

            grpc_clients = {
                name: grpcclient.InferenceServerClient(address)
                for name, address in grpc_addresses.items()
            }
            rows = measure(args, victim, grad2, http, grpc_clients, shape)
            for session in http.values():
                session.close()
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(30)
            if upstream is not None:
                upstream.kill(signal.SIGTERM)
    summary = targets(rows)
    print(f"{'batch':>5} {'mode':>9} {'defense':>7} {'images/s':>10}")
    for row in rows:
        print(
            f"{row['batch']:5d} {row['mode']:>9} {row['defense']:>7} "
            f"{row['images_per_second']:10.1f}"
        )
    for key, value in summary.items():
        print(f"{key}: {value:.3f}")
    write_json(
        args.out,
        {
            "threads": args.threads,
            "architecture": args.architecture,
            "input_shape": list(shape),
            "model_workers": args.model_workers,
            "server_workers": args.server_workers,
            "clients": args.clients,
            "epsilon": args.epsilon,
            "rows": rows,
            "ratios": summary,
            "gateway_skipped": skipped,
        },
        args,
    )
    log.info("wrote %s", args.out)


def measure(
    args,
    victim: torch.nn.Module,
    grad2,
    http: dict[str, httpx.Client],
    grpc_clients: dict,
    shape: tuple[int, int, int],
) -> list[dict]:
    """Seconds per timed call of each contender, and images/s: a served contender's call is
    ``args.clients`` concurrent requests of ``b`` images (``b × clients`` images), the in-process
    ones a call each."""
    import tritonclient.grpc as grpcclient

    pool = ThreadPoolExecutor(args.clients)
    rows = []
    generator = torch.Generator().manual_seed(0)
    for b in args.batches:
        x = torch.rand(b, *shape, generator=generator)
        array = x.numpy()
        bodies = {"json": json_request(array), "binary": binary_request(array)}

        def forward(x=x):
            with torch.no_grad():
                return torch.softmax(victim(x), 1)

        def defended(x=x):
            return grad2(x, forward(x))

        def served(defense: str, mode: str, bodies=bodies):
            server = f"gateway-{defense}" if mode == "gateway" else defense
            content, headers = bodies["binary" if mode == "gateway" else mode]
            return lambda: decode(
                http[server].post("/v2/models/victim/infer", content=content, headers=headers)
            )

        def direct(content=bodies["json"][0]):  # MLServer alone: its logits, softmaxed here
            logits = decode(
                http["upstream"].post(
                    "/v2/models/victim/infer",
                    content=content,
                    headers={"Content-Type": "application/json"},
                )
            )
            return torch.softmax(torch.from_numpy(logits.copy()), 1).numpy()

        def over_grpc(defense: str, array=array):
            tensor = grpcclient.InferInput("images", list(array.shape), "FP32")
            tensor.set_data_from_numpy(array)
            client = grpc_clients[defense]
            headers = {"authorization": f"Bearer {KEY}"}
            return lambda: client.infer("victim", [tensor], headers=headers).as_numpy(
                "probabilities"
            )

        modes = ("json", "binary", "gateway") if "upstream" in http else ("json", "binary")
        fns = {"inprocess_none": forward, "inprocess_grad2": defended}
        fns.update(
            {
                f"{mode}_{defense}": concurrently(pool, served(defense, mode), args.clients)
                for mode in modes
                for defense in DEFENSES
            }
        )
        fns.update(
            {
                f"grpc_{defense}": concurrently(pool, over_grpc(defense), args.clients)
                for defense in DEFENSES
            }
        )
        if "upstream" in http:
            fns["upstream_none"] = direct
        reference = {"none": forward().numpy(), "grad2": defended().numpy()}
        for (
            name,
            fn,
        ) in fns.items():  # the servers answer what the same model and defense do in process
            if not name.startswith("inprocess"):
                atol = 1e-5 if name.split("_")[0] in ("json", "binary", "grpc") else GATEWAY_ATOL
                np.testing.assert_allclose(
                    fn(), reference[name.split("_")[1]], rtol=0, atol=atol, err_msg=name
                )
        timed = round_robin(fns, args.repeats, inner=max(1, 64 // b))
        base = timed["inprocess_none_ratio"]
        for name in fns:
            mode, defense = name.split("_")
            images = b if mode == "inprocess" else b * args.clients
            rows.append(
                {
                    "batch": b,
                    "mode": mode,
                    "defense": defense,
                    "seconds": timed[name],
                    "images_per_second": images / timed[name],
                    "throughput_over_inprocess_forward": (images / b)
                    * base
                    / timed[f"{name}_ratio"],
                }
            )
            log.info(
                "B=%-4d %-9s %-6s %9.1f images/s (%.3f of the in-process forward)",
                b,
                mode,
                defense,
                rows[-1]["images_per_second"],
                rows[-1]["throughput_over_inprocess_forward"],
            )
    return rows


def concurrently(pool: ThreadPoolExecutor, fn, clients: int):
    """``fn`` called by ``clients`` threads at once, returning the first answer (one client: a
    plain call)."""
    if clients == 1:
        return fn

    def call():
        answers = [future.result() for future in [pool.submit(fn) for _ in range(clients)]]
        return answers[0]

    return call


def targets(rows: list[dict]) -> dict[str, float]:
    """The throughput targets' ratios, per batch size: served binary undefended over the in-process
    forward (target ≥ 0.5 at 256) and GRAD² served over undefended served, per transport (≥ 0.8)."""
    at = {
        (r["batch"], r["mode"], r["defense"]): r["throughput_over_inprocess_forward"] for r in rows
    }
    out = {}
    for b in sorted({r["batch"] for r in rows}):
        out[f"B{b}_binary_none_over_inprocess_forward"] = at[b, "binary", "none"]
        out[f"B{b}_json_none_over_inprocess_forward"] = at[b, "json", "none"]
        out[f"B{b}_grpc_none_over_inprocess_forward"] = at[b, "grpc", "none"]
        for mode in MODES:
            if (b, mode, "none") in at:
                out[f"B{b}_{mode}_grad2_over_{mode}_none"] = (
                    at[b, mode, "grad2"] / at[b, mode, "none"]
                )
        if (b, "gateway", "none") in at:  # what mirage in front costs over MLServer alone
            out[f"B{b}_gateway_none_over_upstream_none"] = (
                at[b, "gateway", "none"] / at[b, "upstream", "none"]
            )
    return out


if __name__ == "__main__":
    main()
