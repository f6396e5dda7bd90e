"""Upstream OIP V2 servers for the gateway (docs/design.md §gateway): MLServer, a real
third-party server, in its own venv (REST and gRPC), and tiny scriptable ones in threads, REST
(:class:`FakeUpstream`) and gRPC (:class:`FakeGrpcUpstream`), for the failures a real server will
not produce on demand. Used by tests/serve/test_gateway.py and benchmarks/oip_throughput.py."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import httpx

from mirage.serve.oip import grpc_predict_v2_pb2 as pb

ROOT = Path(__file__).resolve().parents[2]
RUNTIMES = Path(__file__).resolve().parent / "third_party"  # runtimes.py: MLServer's side


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def mlserver_executable() -> Path | None:
    """``mlserver`` in the venv scripts/bootstrap.sh makes ($MIRAGE_MLSERVER_VENV, default
    <repo>/.venv-mlserver), or ``None`` when it is missing."""
    venv = Path(os.environ.get("MIRAGE_MLSERVER_VENV", ROOT / ".venv-mlserver"))
    executable = venv / "bin" / "mlserver"
    return executable if executable.is_file() else None


class MLServerProcess:
    """``mlserver start`` on 127.0.0.1 and a free port, in ``directory``, serving ``models``:
    ``{name: (implementation, parameters)}``, e.g. ``{"linear": ("runtimes.Linear", {"uri": …})}``.
    gRPC gets another free port (``grpc_url``, the same across restarts), metrics are off,
    inference runs in the server process (``parallel_workers = 0``), so killing its pid stops
    everything it started."""

    def __init__(
        self,
        executable: Path,
        directory: Path,
        models: dict[str, tuple[str, dict]],
        *,
        port: int | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.executable, self.directory = executable, directory
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.grpc_port = free_port()
        self.grpc_url = f"grpc://127.0.0.1:{self.grpc_port}"
        self.models = models
        self.env = env or {}
        self.log = directory / f"mlserver-{self.port}.log"
        self.proc: subprocess.Popen | None = None
        directory.mkdir(parents=True, exist_ok=True)
        for name, (implementation, parameters) in models.items():
            (directory / name).mkdir(exist_ok=True)
            (directory / name / "model-settings.json").write_text(
                json.dumps(
                    {"name": name, "implementation": implementation, "parameters": parameters}
                )
            )

    def start(self, timeout: float = 60.0) -> MLServerProcess:
        (self.directory / "settings.json").write_text(
            json.dumps(
                {
                    "host": "127.0.0.1",
                    "http_port": self.port,
                    "grpc_port": self.grpc_port,
                    "metrics_endpoint": None,
                    "parallel_workers": 0,
                    "load_models_at_startup": True,
                    "debug": False,
                }
            )
        )
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("PYTHON", "VIRTUAL_ENV"))
        }
        env.update(PYTHONPATH=str(RUNTIMES), **self.env)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [str(self.executable), "start", str(self.directory)],
                cwd=self.directory,
                stdout=log,
                stderr=log,
                env=env,
            )
        deadline = time.monotonic() + timeout
        name = next(iter(self.models))
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"MLServer exited: {self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/v2/models/{name}/ready", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(
            f"MLServer did not become ready in {timeout:g}s: {self.log.read_text()[-3000:]}"
        )

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(30)
        self.proc = None


class FakeUpstream:
    """A scriptable OIP V2 endpoint on 127.0.0.1 in a daemon thread: ``answer(request)`` returns
    ``(status, headers, body)`` for each inference request, whose path, headers, body and
    connection (the client's address and port) are kept in ``requests``; ``ready`` sets the
    answer to ``…/ready``. Stops with ``stop()``."""

    def __init__(self, answer: Callable[[dict], tuple[int, dict, bytes]]) -> None:
        self.answer = answer
        self.ready = True
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _send(self, status: int, headers: dict, body: bytes | Callable) -> None:
                """``body``: the bytes, or a function that writes them to the socket itself
                (a slow drip, an answer too large to hold)."""
                self.send_response(status)
                length = {} if callable(body) else {"Content-Length": str(len(body))}
                for key, value in {**length, **headers}.items():
                    self.send_header(key, value)
                self.end_headers()
                if callable(body):
                    body(self.wfile)
                else:
                    self.wfile.write(body)

            def do_GET(self) -> None:
                self._send(200 if upstream.ready else 400, {}, b"")

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                request = {
                    "path": self.path,
                    "headers": dict(self.headers),
                    "body": body,
                    "connection": self.client_address,
                }
                with upstream.lock:
                    upstream.requests.append(request)
                status, headers, content = upstream.answer(request)
                try:
                    self._send(status, headers, content)
                except OSError:
                    pass  # the gateway gave up (a timeout) and hung up

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def start(self) -> FakeUpstream:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)

    def count(self) -> int:
        with self.lock:
            return len(self.requests)


class FakeGrpcUpstream:
    """A scriptable ``inference.GRPCInferenceService`` on 127.0.0.1 in a thread pool:
    ``answer(request, context)`` returns the ``ModelInferResponse`` for each ``ModelInfer`` (or
    aborts the call with a status); each request and its metadata are kept in ``requests``;
    ``ready`` sets what ``ServerReady`` and ``ModelReady`` answer. It binds ``port`` (default: a
    free one). Stops with ``stop()``."""

    SERVICE = "inference.GRPCInferenceService"

    def __init__(
        self,
        answer: Callable[[pb.ModelInferRequest, grpc.ServicerContext], pb.ModelInferResponse],
        *,
        port: int = 0,
    ) -> None:
        self.answer = answer
        self.ready = True
        self.requests: list[tuple[pb.ModelInferRequest, dict[str, str]]] = []
        self.ready_calls: list[tuple[str, object]] = []
        self.lock = threading.Lock()

        def infer(request: pb.ModelInferRequest, context: grpc.ServicerContext):
            with self.lock:
                self.requests.append((request, dict(context.invocation_metadata())))
            return self.answer(request, context)

        def server_ready(request: pb.ServerReadyRequest, context: grpc.ServicerContext):
            with self.lock:
                self.ready_calls.append(("ServerReady", request))
            return pb.ServerReadyResponse(ready=self.ready)

        def model_ready(request: pb.ModelReadyRequest, context: grpc.ServicerContext):
            with self.lock:
                self.ready_calls.append(("ModelReady", request))
            return pb.ModelReadyResponse(ready=self.ready)

        def unary(function: Callable, request: type, response: type) -> grpc.RpcMethodHandler:
            return grpc.unary_unary_rpc_method_handler(
                function, request.FromString, response.SerializeToString
            )

        handler = grpc.method_handlers_generic_handler(
            self.SERVICE,
            {
                "ModelInfer": unary(infer, pb.ModelInferRequest, pb.ModelInferResponse),
                "ServerReady": unary(server_ready, pb.ServerReadyRequest, pb.ServerReadyResponse),
                "ModelReady": unary(model_ready, pb.ModelReadyRequest, pb.ModelReadyResponse),
            },
        )
        self.server = grpc.server(futures.ThreadPoolExecutor(8))
        self.server.add_generic_rpc_handlers((handler,))
        self.port = self.server.add_insecure_port(f"127.0.0.1:{port}")
        self.url = f"grpc://127.0.0.1:{self.port}"

    def start(self) -> FakeGrpcUpstream:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop(0).wait(5)

    def count(self) -> int:
        with self.lock:
            return len(self.requests)
