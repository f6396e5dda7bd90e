"""Run the service under uvicorn — in the foreground (``mirage serve``, or
``python -m mirage.serve.runner --config FILE --port N``, which skips the command line's imports),
or in a background thread on a free loopback port (tests, benchmarks).

The connection layer (docs/design.md §connections) is uvicorn's h11 protocol with the limits a
public endpoint needs and uvicorn does not enforce, in :class:`GuardedH11Protocol`; the request
layer is the app's. In production a reverse proxy in front adds its own limits (README, "In
production"); these hold without one.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import threading
import time
from typing import Any

import h11
import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from mirage.serve.config import LimitsConfig, ServeConfig

log = logging.getLogger(__name__)

FRAGMENT_GRACE = 256
"""Pieces of a body (TCP reads, or chunks of a chunked body) allowed before their average size is
checked against ``limits.min_chunk_bytes``."""
LINGER_S = 2.0
"""After answering a request whose body it did not read, the server stops sending and discards
what still arrives for at most this long (a "lingering close", so the client reads the answer
instead of a reset), then closes."""
LINGER_BYTES = 1 << 20
"""… or until this many bytes were discarded."""
FD_RESERVE = 64
"""File descriptors kept free of connections: the storage files, Redis, logs, the upstream."""


class GuardedConnection(h11.Connection):
    """h11's server side, refusing what h11 accepts but a public endpoint must not: more header
    fields or bytes than allowed however the bytes arrived (h11 bounds only an *incomplete* head),
    a request framed by both ``Content-Length`` and ``Transfer-Encoding`` (RFC 9112 §6.3: the
    connection must close — the way a request hides behind another), and a body that arrives in
    many tiny pieces (each costs a parse)."""

    def __init__(self, limits: LimitsConfig) -> None:
        super().__init__(h11.SERVER, max_incomplete_event_size=limits.max_header_bytes)
        self.limits = limits
        self.pieces = self.body_bytes = 0
        self.rejection: tuple[int, str] | None = None  # (status, why) of the request refused

    def _reject(self, status: int, why: str) -> h11.RemoteProtocolError:
        self.rejection = (status, why)
        return h11.RemoteProtocolError(why, error_status_hint=status)

    def next_event(self) -> Any:
        event = super().next_event()
        if isinstance(event, h11.Request):
            self._check_head(event)
            self.pieces = self.body_bytes = 0
        elif isinstance(event, h11.Data) and self.our_state is not h11.DONE:
            self.pieces += 1
            self.body_bytes += len(event.data)
            if (
                self.pieces > FRAGMENT_GRACE
                and self.body_bytes < self.pieces * self.limits.min_chunk_bytes
            ):
                raise self._reject(
                    400,
                    f"the body arrives in {self.pieces} pieces averaging fewer "
                    f"than {self.limits.min_chunk_bytes} bytes",
                )
        return event

    def send(self, event: Any) -> bytes | None:  # type: ignore[override]  # h11's overloads
        """As h11's, but a response that starts before the request's body was read says
        ``Connection: close``: the connection ends with it (see :class:`LingeringTransport`)."""
        if isinstance(event, h11.Response) and self.their_state is h11.SEND_BODY:
            event = h11.Response(
                status_code=event.status_code,
                reason=event.reason,
                http_version=event.http_version,
                headers=[*event.headers, (b"connection", b"close")],
            )
        return super().send(event)

    def _check_head(self, event: h11.Request) -> None:
        limits = self.limits
        if len(event.headers) > limits.max_headers:
            raise self._reject(431, f"more than {limits.max_headers} header fields")
        size = len(event.target) + sum(len(name) + len(value) + 4 for name, value in event.headers)
        if size > limits.max_header_bytes:
            raise self._reject(431, f"the request head exceeds {limits.max_header_bytes} bytes")
        names = [name for name, _ in event.headers]  # h11 lower-cases them
        if b"transfer-encoding" in names and b"content-length" in names:
            raise self._reject(400, "both Content-Length and Transfer-Encoding frame the body")


class LingeringTransport:
    """A connection's transport whose :meth:`close` lingers while the request's body is unread:
    it stops sending (a half-close, once the answer is flushed), discards what still arrives for
    at most ``LINGER_S`` or ``LINGER_BYTES``, then closes. Closing at once with unread bytes
    would make the kernel send a reset, which can destroy the answer before the client reads it
    (RFC 9112 §9.6)."""

    def __init__(self, transport: asyncio.Transport, protocol: GuardedH11Protocol) -> None:
        self._transport, self._protocol = transport, protocol

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def write(self, data: bytes) -> None:
        if (
            not self._protocol.lingering
        ):  # once lingering, the answer is sent and the write side shut
            self._transport.write(data)

    def close(self) -> None:
        protocol, transport = self._protocol, self._transport
        if (
            transport.is_closing()
            or protocol.lingering
            or protocol.conn.their_state is not h11.SEND_BODY
        ):
            transport.close()
            return
        protocol.lingering = True
        if transport.can_write_eof():
            transport.write_eof()
        protocol.loop.call_later(LINGER_S, transport.close)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the connection discipline of ``limits`` (docs/design.md
    §connections):

    - at most ``max_connections`` open connections, and ``max_connections_per_address`` from one
      client address (more are answered 503 and closed at once);
    - the request line and headers within ``header_timeout_s`` of the connection's start or of
      its previous response (a slow-loris client; uvicorn waits for ever);
    - the head and body checks of :class:`GuardedConnection`, answered 400 or 431 and closed;
    - a request answered before its body was read (an early 401, 413 or 408) ends the
      connection: the answer says ``Connection: close``, then the server stops sending, discards
      at most ``LINGER_BYTES`` for at most ``LINGER_S`` and closes (:class:`LingeringTransport`),
      so a client cannot keep it by trickling the rest of the body.

    The body itself has the app's deadline, ``limits.body_timeout_s``."""

    conn: GuardedConnection
    limits = LimitsConfig()
    max_connections = LimitsConfig().max_connections
    trusted: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conn = GuardedConnection(self.limits)
        self._header_timer: asyncio.TimerHandle | None = None
        self.lingering = False
        self._discarded = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections or self._over_address_limit():
            transport.write(_plain_response(503, "too many connections; retry later"))
            transport.close()
            return
        self.transport = LingeringTransport(transport, self)  # type: ignore[assignment]
        self._arm()

    def _over_address_limit(self) -> bool:
        """Whether the peer holds more than ``max_connections_per_address`` connections (a trusted
        proxy never does: it carries many clients and limits them itself)."""
        if self.client is None:
            return False
        host = self.client[0]
        try:
            if any(ipaddress.ip_address(host) in network for network in self.trusted):
                return False
        except ValueError:
            return False
        peers = (getattr(other, "client", None) for other in self.connections)
        mine = sum(1 for peer in peers if peer is not None and peer[0] == host)
        return mine > self.limits.max_connections_per_address

    def _arm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._header_timer = self.loop.call_later(
            self.limits.header_timeout_s, self._headers_overdue
        )

    def _headers_overdue(self) -> None:
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.lingering:
            self._discarded += len(data)
            if self._discarded > LINGER_BYTES:
                self.transport.close()
            return
        super().data_received(data)

    def send_400_response(self, msg: str) -> None:
        """Refuse the request that broke h11's rules or :class:`GuardedConnection`'s, with the
        rejection's own status and message, and close."""
        status, why = self.conn.rejection or (400, "invalid HTTP request")
        if self.conn.our_state in (
            h11.IDLE,
            h11.SEND_RESPONSE,
        ):  # else the app's answer is on its way
            self.transport.write(_plain_response(status, why))
        if (
            self.cycle is not None and not self.cycle.response_complete
        ):  # the app's request ends here
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        self.transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        super().connection_lost(exc)


def _plain_response(status: int, text: str) -> bytes:
    body = text.encode()
    reason = {
        400: "Bad Request",
        431: "Request Header Fields Too Large",
        503: "Service Unavailable",
    }[status]
    return (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode() + body


def connection_cap(limits: LimitsConfig) -> int:
    """``limits.max_connections``, lowered to fit the process's file-descriptor limit (raised to
    its hard limit first): running out of descriptors fails every accept, storage and log call."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    except (ImportError, ValueError, OSError):
        return limits.max_connections
    if soft == resource.RLIM_INFINITY:
        return limits.max_connections
    return max(1, min(limits.max_connections, soft - FD_RESERVE))


class RepeatLimit(logging.Filter):
    """At most ``burst`` records of one logger and message template per ``interval`` seconds; the
    next one let through says how many were dropped (a descriptor shortage or a hostile client can
    otherwise write a traceback per attempt)."""

    def __init__(self, burst: int = 5, interval: float = 60.0) -> None:
        super().__init__()
        self.burst, self.interval = burst, interval
        self._seen: dict[tuple[str, str], list[float]] = {}  # (start, count, dropped)
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg))
        now = time.monotonic()
        with self._lock:
            if len(self._seen) > 10_000:
                self._seen.clear()
            start, count, dropped = self._seen.get(key, (now, 0, 0))
            if now - start >= self.interval:
                start, count = now, 0
            if count >= self.burst:
                self._seen[key] = [start, count, dropped + 1]
                return False
            self._seen[key] = [start, count + 1, 0]
        if dropped:
            record.msg = f"{record.msg} ({dropped} similar messages dropped)"
        return True


def limit_repeated_logs(burst: int = 5, interval: float = 60.0) -> RepeatLimit:
    """Put one :class:`RepeatLimit` on asyncio's, uvicorn's and every mirage logger."""
    limit = RepeatLimit(burst, interval)
    names = ["asyncio", "uvicorn.error"] + [
        name
        for name in logging.root.manager.loggerDict
        if name == "mirage" or name.startswith("mirage.")
    ]
    for name in names:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RepeatLimit) for f in logger.filters):
            logger.addFilter(limit)
    return limit


def uvicorn_settings(app: FastAPI) -> dict[str, Any]:
    """uvicorn's settings for the app: the guarded protocol with the app's limits, and
    ``X-Forwarded-For`` trusted only from ``access.trusted_proxies`` (uvicorn's default trusts
    127.0.0.1, which would let any local client name its address)."""
    service = getattr(app.state, "service", None)
    limits = service.config.limits if service is not None else LimitsConfig()
    proxies = service.config.access.trusted_proxies if service is not None else ()
    protocol = type(
        "GuardedH11",
        (GuardedH11Protocol,),
        {
            "limits": limits,
            "max_connections": connection_cap(limits),
            "trusted": tuple(ipaddress.ip_network(proxy, strict=False) for proxy in proxies),
        },
    )
    return {
        "http": protocol,
        "proxy_headers": bool(proxies),
        "forwarded_allow_ips": list(proxies) or None,
        "h11_max_incomplete_event_size": limits.max_header_bytes,
        "access_log": False,
    }


def serve_forever(
    app: FastAPI, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "info"
) -> None:
    limit_repeated_logs()
    uvicorn.run(app, host=host, port=port, log_level=log_level, **uvicorn_settings(app))


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (not yet listening), inheritable by worker processes."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def _port_is_free(host: str, port: int) -> None:
    """Raise ``OSError`` when ``host:port`` is taken: with ``SO_REUSEPORT`` the workers' gRPC
    servers would otherwise share it silently with whatever holds it."""
    bind_socket(host, port).close()


def serve_workers(
    config: ServeConfig,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    workers: int,
    log_level: str = "info",
) -> int:
    """Serve ``config`` from ``workers`` processes behind one port (docs/design.md §workers);
    returns the exit code.

    The socket is bound here and inherited by each worker (``spawn``), which loads the model
    itself and runs its own event loop, micro-batcher, defense and, with ``[grpc]``, a gRPC server
    on the shared gRPC port (``SO_REUSEPORT``): the kernel spreads connections over them. Quotas,
    rate limits, reservations, the audit log and ownership evidence live in the storage every
    worker opens (the SQLite files, or Redis), so they stay exact whichever worker answers. What a
    process keeps in memory (a stateful defense's and the stream detector's per-client history,
    the ``/metrics`` request counters) is per worker, as with replicas (§shared-state). Each
    worker gets ``cpu_count // workers`` torch threads. A worker that dies after it served is
    started again; one that dies before it was ready (a model it cannot load, storage it cannot
    reach) stops them all, with its exit code. SIGINT or SIGTERM stops every worker
    gracefully."""
    import multiprocessing
    import os
    import signal

    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if config.grpc is not None:
        _port_is_free(config.grpc.host, config.grpc.port)
    sock = bind_socket(host, port)
    context = multiprocessing.get_context("spawn")
    threads = max(1, (os.cpu_count() or 1) // workers)
    payload = config.model_dump(mode="json")
    stopping = threading.Event()

    def start(index: int) -> tuple[Any, Any]:
        ready = context.Event()
        process = context.Process(
            target=_worker,
            args=(payload, sock, index, threads, log_level, ready),
            name=f"mirage-worker-{index}",
        )
        process.start()
        return process, ready

    previous = {
        sig: signal.signal(sig, lambda *_: stopping.set())
        for sig in (signal.SIGINT, signal.SIGTERM)
    }
    running = [start(i) for i in range(workers)]
    log.info("%d workers serving http://%s:%d", workers, host, port)
    code = 0
    try:
        while not stopping.wait(0.2):
            for index, (process, ready) in enumerate(running):
                if process.is_alive():
                    continue
                if not ready.is_set():
                    log.error(
                        "worker %d exited with code %s while starting; stopping",
                        index,
                        process.exitcode,
                    )
                    code = process.exitcode or 1
                    stopping.set()
                    break
                log.warning(
                    "worker %d (pid %s) exited with code %s; starting another",
                    index,
                    process.pid,
                    process.exitcode,
                )
                running[index] = start(index)
    finally:
        for process, _ in running:
            if process.is_alive():
                process.terminate()  # SIGTERM: uvicorn's graceful shutdown
        for process, _ in running:
            process.join(30)
            if process.is_alive():
                process.kill()
                process.join()
        sock.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code


def _worker(
    payload: dict, sock: socket.socket, index: int, threads: int, log_level: str, ready: Any
) -> None:
    """One worker of :func:`serve_workers`: build the service from the config, serve the
    inherited socket until SIGTERM, and set ``ready`` once it accepts requests. A service that
    cannot start (a model not prepared, storage unreachable) says why in one line and exits
    with code 2."""
    import os
    import sys

    import torch

    from mirage.serve.app import create_app
    from mirage.serve.errors import ServeError

    logging.basicConfig(
        level=getattr(logging, log_level.upper(), logging.INFO),
        format=f"%(asctime)s worker {index} %(levelname)s %(name)s: %(message)s",
    )
    torch.set_num_threads(threads)
    config = ServeConfig.model_validate(payload)
    try:
        app = create_app(config, shared_port=True, announce=_print if index == 0 else log.debug)
    except (ServeError, OSError, ValueError) as error:
        print(f"error: worker {index}: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    limit_repeated_logs()
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, **uvicorn_settings(app)))

    def announce_ready() -> None:
        while not server.started and not server.should_exit:
            time.sleep(0.05)
        if server.started:
            ready.set()
            print(f"worker {index} ready (pid {os.getpid()})", flush=True)

    threading.Thread(target=announce_ready, daemon=True).start()
    server.run(sockets=[sock])


def _print(text: str) -> None:
    print(text, flush=True)


class ServerThread:
    """``with ServerThread(app) as url:`` — uvicorn on 127.0.0.1, a free port, a daemon thread."""

    def __init__(
        self, app: FastAPI, *, host: str = "127.0.0.1", startup_timeout: float = 30.0
    ) -> None:
        self.app = app
        self.host = host
        self.startup_timeout = startup_timeout
        self.server = uvicorn.Server(
            uvicorn.Config(
                app, log_level="warning", timeout_graceful_shutdown=5, **uvicorn_settings(app)
            )
        )
        self.thread: threading.Thread | None = None
        self.url = ""

    def start(self) -> str:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, 0))
        port = sock.getsockname()[1]
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [sock]}, daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + self.startup_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        self.url = f"http://{self.host}:{port}"
        return self.url

    def stop(self) -> None:
        if self.thread is not None:
            self.server.should_exit = True
            self.thread.join(30)
            self.thread = None

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    import argparse

    from mirage.serve.app import create_app
    from mirage.serve.config import load_config

    parser = argparse.ArgumentParser(description="serve a mirage config under uvicorn")
    parser.add_argument("--config", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--grpc-port", type=int, default=None, help="also serve OIP V2 over gRPC on this port"
    )
    parser.add_argument("--log-level", default="warning")
    parser.add_argument("--workers", type=int, default=1, help="processes behind the one port")
    args = parser.parse_args(argv)
    config = with_grpc(load_config(args.config), args.host, args.grpc_port)
    if args.workers > 1:
        raise SystemExit(
            serve_workers(
                config, args.host, args.port, workers=args.workers, log_level=args.log_level
            )
        )
    serve_forever(create_app(config), args.host, args.port, log_level=args.log_level)


def with_grpc(config: ServeConfig, host: str, port: int | None) -> ServeConfig:
    """``config`` with its gRPC endpoint on ``host:port`` (``None``: as configured)."""
    from mirage.serve.config import GrpcConfig

    if port is None:
        return config
    return config.model_copy(update={"grpc": GrpcConfig(port=port, host=host)})


if __name__ == "__main__":
    main()
