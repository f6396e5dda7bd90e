"""Run the service under uvicorn — in the foreground (``mirage serve``, or
``python -m mirage.serve.runner --config FILE --port N``, which skips the command line's imports),
or in a background thread on a free loopback port (tests, benchmarks)."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn
from fastapi import FastAPI


def serve_forever(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "info") -> None:
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)


class ServerThread:
    """``with ServerThread(app) as url:`` — uvicorn on 127.0.0.1, a free port, a daemon thread."""

    def __init__(self, app: FastAPI, *, host: str = "127.0.0.1", startup_timeout: float = 30.0) -> None:
        self.app = app
        self.host = host
        self.startup_timeout = startup_timeout
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                                    timeout_graceful_shutdown=5))
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
