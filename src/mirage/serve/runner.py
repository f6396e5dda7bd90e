"""Run the service under uvicorn — in the foreground (``mirage serve``, or
``python -m mirage.serve.runner --config FILE --port N``, which skips the command line's imports),
or in a background thread on a free loopback port (tests, benchmarks)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import h11
import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol


class HeaderTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol that closes a connection whose request line and headers have not
    all arrived ``header_timeout`` seconds after it opened or after its last response (a
    slow-loris client; uvicorn itself waits for ever). The body has its own deadline in the app,
    ``limits.body_timeout_s`` (docs/design.md §service-errors)."""

    header_timeout = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def _arm(self) -> None:
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_overdue)

    def _headers_overdue(self) -> None:
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._header_timer.cancel()
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._header_timer.cancel()
        super().connection_lost(exc)


def protocol_for(app: FastAPI) -> type[H11Protocol]:
    """The h11 protocol with the app's body timeout as its header timeout too."""
    service = getattr(app.state, "service", None)
    seconds = service.config.limits.body_timeout_s if service is not None else HeaderTimeoutH11Protocol.header_timeout
    return type("HeaderTimeoutH11", (HeaderTimeoutH11Protocol,), {"header_timeout": seconds})


def serve_forever(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "info") -> None:
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False, http=protocol_for(app))


class ServerThread:
    """``with ServerThread(app) as url:`` — uvicorn on 127.0.0.1, a free port, a daemon thread."""

    def __init__(self, app: FastAPI, *, host: str = "127.0.0.1", startup_timeout: float = 30.0) -> None:
        self.app = app
        self.host = host
        self.startup_timeout = startup_timeout
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                                    timeout_graceful_shutdown=5, http=protocol_for(app)))
        self.thread: threading.Thread | None = None
        self.url = ""

    def start(self) -> str:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, 0))
        port = sock.getsockname()[1]
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
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
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    serve_forever(create_app(load_config(args.config)), args.host, args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
