"""Hostile connections, opened with plain sockets on 127.0.0.1 (docs/design.md §connections):
trickled bodies after an early answer, bodies of 1-byte chunks, conflicting framing, oversized
heads, Unicode digits, duplicate keys, forged X-Forwarded-For, a connection cap. Each asserts the
fixed behaviour and that the server keeps answering others."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest
import torch
from conftest import KEYS, auth, body, make_config
from test_hardening import URL_INFER

from mirage.serve.app import create_app
from mirage.serve.audit import AuditLog
from mirage.serve.quotas import MAX_AUTH_SOURCES, QuotaStore
from mirage.serve.runner import LINGER_S, RepeatLimit, ServerThread


def one_image() -> dict:
    return body(torch.rand(1, 1, 8, 8))


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def read_reply(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """What the server sends until it closes the connection or ``timeout`` passes."""
    sock.settimeout(timeout)
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except (TimeoutError, ConnectionResetError):
        pass
    return b"".join(chunks)


def closed_within(
    sock: socket.socket, seconds: float, *, trickle: bytes = b""
) -> tuple[bytes, float]:
    """(everything the server sent, seconds until it closed), sending ``trickle`` one byte every
    50 ms meanwhile; ``seconds`` is never exceeded by more than 1 s."""
    start, received = time.monotonic(), []
    sock.settimeout(0.05)
    position = 0
    while time.monotonic() - start < seconds + 1:
        if trickle:
            try:
                sock.sendall(trickle[position % len(trickle) : position % len(trickle) + 1])
                position += 1
            except OSError:
                pass
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            break
        if not chunk:
            break
        received.append(chunk)
    return b"".join(received), time.monotonic() - start


@pytest.fixture
def served(tmp_path, checkpoints):
    config = make_config(
        tmp_path,
        checkpoints,
        clients=[{"name": "alice", "quota": 10_000}, {"name": "bob", "quota": 10_000}],
    )
    with ServerThread(create_app(config)) as url:
        yield url, config


def test_a_trickled_body_after_an_early_answer_does_not_hold_the_connection(served):
    """An early 401 (no key) and a 413 (declared too large) are answered with Connection: close;
    a client that keeps trickling the body is cut within the linger time, not kept for ever."""
    url, _ = served
    heads = [
        f"POST {URL_INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n",
        (
            f"POST {URL_INFER} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEYS['alice']}\r\n"
            "Content-Length: 100000000\r\n\r\n"
        ),
        "GET /v2/health/live HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n",
    ]
    for head in heads:
        with connect(url) as sock:
            sock.sendall(head.encode() + b'{"inputs": [')
            reply, seconds = closed_within(sock, LINGER_S + 1, trickle=b"0,")
        status = reply.split(b"\r\n", 1)[0]
        assert status.split()[1] in (b"401", b"413", b"200"), reply[:200]
        assert b"connection: close" in reply.lower(), reply[:300]
        assert seconds < LINGER_S + 1, f"{head.splitlines()[0]}: still open after {seconds:.1f}s"
    assert httpx.get(url + "/v2/health/live").status_code == 200


def test_an_early_answer_reaches_a_client_that_is_still_sending(served):
    """The lingering close: the client reads the 401 rather than a reset, and its next request on
    a fresh connection is served."""
    url, _ = served
    with connect(url) as sock:
        sock.sendall(
            f"POST {URL_INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: 300000\r\n\r\n".encode()
        )
        for _ in range(30):
            try:
                sock.sendall(b"0" * 8192)
            except OSError:
                break
        reply = read_reply(sock, 5)
    assert reply.startswith(b"HTTP/1.1 401"), reply[:200]
    assert httpx.post(url + URL_INFER, json=one_image(), headers=auth("alice")).status_code == 200


def test_a_body_of_one_byte_chunks_is_cut_and_costs_others_nothing(served):
    """A chunked body of 1-byte chunks is a 400 after 256 pieces and the connection closes; a
    keyless client streaming such chunks after its 401 is cut too. Others' liveness stays fast."""
    url, _ = served
    chunks = b"".join(b"1\r\n0\r\n" for _ in range(20_000))
    latencies = []

    def probe(stop: threading.Event) -> None:
        with httpx.Client(base_url=url, timeout=10) as http:
            while not stop.is_set():
                start = time.monotonic()
                try:
                    http.get("/v2/health/live").raise_for_status()
                    latencies.append(time.monotonic() - start)
                except httpx.HTTPError:
                    latencies.append(float("inf"))
                time.sleep(0.02)

    stop = threading.Event()
    prober = threading.Thread(target=probe, args=(stop,))
    prober.start()
    try:
        for key in [f"Authorization: Bearer {KEYS['alice']}\r\n", ""] * 5:
            with connect(url) as sock:
                sock.sendall(
                    (
                        f"POST {URL_INFER} HTTP/1.1\r\nHost: x\r\n"
                        f"{key}Transfer-Encoding: chunked\r\n\r\n"
                    ).encode()
                )
                try:
                    for start in range(0, len(chunks), 6000):
                        sock.sendall(chunks[start : start + 6000])
                except OSError:
                    pass
                reply, seconds = closed_within(sock, LINGER_S + 2)
            assert reply.split(b" ", 2)[1] in (b"400", b"401"), reply[:200]
            assert seconds < LINGER_S + 2
        time.sleep(0.5)
    finally:
        stop.set()
        prober.join()
    latencies.sort()
    assert latencies and latencies[-1] < 1.0 and latencies[len(latencies) // 2] < 0.25, latencies


def test_conflicting_framing_closes_and_the_hidden_request_is_never_answered(served):
    """Content-Length and Transfer-Encoding together (RFC 9112 §6.3): 400 and close, so the
    request hidden after the chunked body is neither answered nor charged."""
    url, config = served
    hidden = (
        f"POST {URL_INFER} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEYS['alice']}\r\n"
        "Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
    )
    smuggled = (
        "POST /v2/health/live HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
        f"0\r\n\r\n{hidden}"
    )
    with connect(url) as sock:
        sock.sendall(smuggled.encode())
        reply = read_reply(sock, 5)
    assert reply.startswith(b"HTTP/1.1 400") and reply.count(b"HTTP/1.1") == 1, reply[:300]
    usage = QuotaStore(config.storage.database)
    try:
        assert usage.usage() == {}
    finally:
        usage.close()


def test_heads_are_bounded_however_the_bytes_arrive(served):
    """10,000 header fields in one write, or a head past 16 KiB in one write: 431 and close."""
    url, _ = served
    many = "".join(f"X-{i}: a\r\n" for i in range(10_000))
    large = "X-Large: " + "a" * 20_000 + "\r\n"
    for extra in (many, large):
        with connect(url) as sock:
            sock.sendall(f"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode())
            reply = read_reply(sock, 5)
        assert reply.split(b" ", 2)[1] in (b"431", b"400"), reply[:200]
    with connect(url) as sock:  # a hundred is fine
        sock.sendall(
            (
                "GET /v2/health/live HTTP/1.1\r\nHost: x\r\n"
                + "".join(f"X-{i}: a\r\n" for i in range(90))
                + "Connection: close\r\n\r\n"
            ).encode()
        )
        assert read_reply(sock, 5).startswith(b"HTTP/1.1 200")


def test_a_unicode_digit_is_a_400_not_a_500(served, caplog):
    url, _ = served
    for header in ("Inference-Header-Content-Length", "Content-Length"):
        with connect(url) as sock:
            sock.sendall(
                f"POST {URL_INFER} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEYS['alice']}\r\n"
                f"{header}: ²\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}".replace(
                    "Content-Length: 2\r\n" if header == "Content-Length" else "\0", ""
                ).encode("utf-8")
            )
            reply = read_reply(sock, 5)
        assert reply.split(b" ", 2)[1] == b"400", reply[:300]
    assert not [r for r in caplog.records if r.exc_info]


def test_two_key_headers_are_refused_before_any_key_is_checked(served):
    url, _ = served
    with connect(url) as sock:
        sock.sendall(
            (
                f"POST {URL_INFER} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEYS['bob']}\r\n"
                f"Authorization: Bearer {KEYS['alice']}\r\n"
                "Content-Length: 0\r\nConnection: close\r\n\r\n"
            ).encode()
        )
        reply = read_reply(sock, 5)
    assert reply.startswith(b"HTTP/1.1 400") and b"exactly one API key" in reply, reply[:300]
    both = {**auth("alice"), "X-API-Key": KEYS["bob"]}
    assert httpx.post(url + URL_INFER, json=one_image(), headers=both).status_code == 400


@pytest.mark.slow
def test_x_forwarded_for_is_trusted_only_from_configured_proxies(tmp_path, checkpoints):
    """By default the throttle counts the peer's address whatever X-Forwarded-For says: 60 wrong
    keys naming 60 addresses get 10 × 401 then 429. From a trusted proxy, each named address has
    its own count, and naming another client's address cannot lock anybody else out."""
    for trusted, expected in (((), (10, 50)), (("127.0.0.1",), (60, 0))):
        config = make_config(
            tmp_path / str(len(trusted)),
            checkpoints,
            access={"auth_failures": 10, "auth_window_s": 600, "trusted_proxies": list(trusted)},
        )
        with ServerThread(create_app(config)) as url, httpx.Client(base_url=url) as http:
            codes = [
                http.post(
                    URL_INFER,
                    json=one_image(),
                    headers={"X-API-Key": "wrong", "X-Forwarded-For": f"10.0.0.{i}"},
                ).status_code
                for i in range(60)
            ]
            assert (codes.count(401), codes.count(429)) == expected, codes
            good = http.post(
                URL_INFER,
                json=one_image(),
                headers={**auth("alice"), "X-Forwarded-For": "10.0.0.1"},
            )
            assert good.status_code == (429 if not trusted else 200)
    with pytest.raises(ValueError, match="trusted_proxies"):
        make_config(tmp_path / "bad", checkpoints, access={"trusted_proxies": ["not-an-address"]})


@pytest.mark.slow
def test_failed_authentication_counts_are_bounded_and_expire(tmp_path):
    now = [1000.0]
    store = QuotaStore(tmp_path / "q.sqlite", clock=lambda: now[0])
    try:
        for i in range(MAX_AUTH_SOURCES + 500):
            if i % 1000 == 0:
                now[0] += 1
            store.auth_failed(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", window=60)
        rows = store.connection().execute("SELECT COUNT(*) FROM auth_failures").fetchone()[0]
        assert rows == MAX_AUTH_SOURCES
        now[0] += 61
        store.auth_failed("192.0.2.1", window=60)
        assert store.connection().execute("SELECT COUNT(*) FROM auth_failures").fetchone()[0] == 1
    finally:
        store.close()


def test_security_events_expire_and_answered_requests_stay(tmp_path):
    log = AuditLog(tmp_path / "a.sqlite", events_retention_days=1)
    try:
        log.record_event("auth_failed", source="192.0.2.1", detail="x")
        with log.transaction() as conn:
            conn.execute("UPDATE events SET time = time - 2 * 86400")
        log.record_event("auth_failed", source="192.0.2.2", detail="y")
        assert log.expire_events() == 1
        assert [e["source"] for e in log.events()] == ["192.0.2.2"]
    finally:
        log.close()


def test_a_connection_cap_answers_503_and_frees_its_descriptors(tmp_path, checkpoints):
    config = make_config(tmp_path, checkpoints, limits={"max_connections": 8})
    with ServerThread(create_app(config)) as url:
        held = [connect(url) for _ in range(8)]
        time.sleep(0.2)
        try:
            with connect(url) as extra:
                reply = read_reply(extra, 5)
            assert reply.startswith(b"HTTP/1.1 503"), reply[:200]
        finally:
            for sock in held:
                sock.close()
        time.sleep(0.2)
        assert httpx.get(url + "/v2/health/live").status_code == 200


def test_database_files_are_private(served):
    url, config = served
    assert httpx.post(url + URL_INFER, json=one_image(), headers=auth("alice")).status_code == 200
    for path in config.storage.database.parent.glob("serve.sqlite*"):
        assert path.stat().st_mode & 0o777 == 0o600, path


def test_repeated_log_messages_are_limited(caplog):
    import logging

    logger = logging.getLogger("mirage.test.repeats")
    limit = RepeatLimit(burst=3, interval=0.3)
    logger.addFilter(limit)
    try:
        with caplog.at_level(logging.WARNING, logger="mirage.test.repeats"):
            for _ in range(1000):
                logger.warning("socket.accept() out of system resource")
            time.sleep(0.35)
            logger.warning("socket.accept() out of system resource")
    finally:
        logger.removeFilter(limit)
    messages = [r.getMessage() for r in caplog.records if r.name == "mirage.test.repeats"]
    assert len(messages) == 4 and "997 similar messages dropped" in messages[-1], messages


def test_one_address_cannot_take_every_connection(tmp_path, checkpoints):
    """127.0.0.2 holds its 4 connections; its fifth is a 503, while 127.0.0.1 is still served."""
    config = make_config(tmp_path, checkpoints, limits={"max_connections_per_address": 4})
    with ServerThread(create_app(config)) as url:
        host, port = url.removeprefix("http://").split(":")
        held = [
            socket.create_connection((host, int(port)), source_address=("127.0.0.2", 0))
            for _ in range(4)
        ]
        try:
            time.sleep(0.2)
            with socket.create_connection(
                (host, int(port)), source_address=("127.0.0.2", 0)
            ) as extra:
                assert read_reply(extra, 5).startswith(b"HTTP/1.1 503")
            assert httpx.get(url + "/v2/health/live").status_code == 200
        finally:
            for sock in held:
                sock.close()
