"""Malformed requests: every one a 4xx with the JSON error body, never a 500, never a redirect,
and never a change to the quota or the audit log (docs/design.md §service-errors). Includes the
property-based fuzz tests (hypothesis over request structures)."""

from __future__ import annotations

import http.client
import json
import random
import socket
import time

import httpx
import pytest
import torch
from conftest import KEYS, auth, body, make_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mirage.serve.app import create_app
from mirage.serve.audit import AuditLog
from mirage.serve.quotas import QuotaStore
from mirage.serve.runner import ServerThread

URL_INFER = "/v2/models/digits/infer"
FUZZ = settings(
    max_examples=1000,  # 2 tests: 2,000 requests
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


class Reply:
    """The parts of an http.client response the checks read."""

    def __init__(self, response: http.client.HTTPResponse) -> None:
        self.status_code, self.headers = (
            response.status,
            {k.lower(): v for k, v in response.getheaders()},
        )
        self.text = response.read().decode("utf-8", "replace")

    def json(self):
        return json.loads(self.text)


class Server:
    """The fuzz tests' server, sent to with http.client (one send() per small request)."""

    def __init__(self, config):
        self.config = config
        self.thread = ServerThread(create_app(config))
        self.url = self.thread.start()
        self.http = httpx.Client(base_url=self.url, timeout=30)
        host, port = self.url.removeprefix("http://").split(":")
        self.raw = http.client.HTTPConnection(host, int(port), timeout=30)
        self.quotas, self.audit = QuotaStore(config.storage.database), AuditLog(config.audit_path)

    def send(self, method: str, path: str, content: bytes | None, headers: dict) -> Reply:
        try:
            self.raw.request(method, path, body=content, headers=headers)
            return Reply(self.raw.getresponse())
        except (http.client.HTTPException, OSError):
            self.raw.close()
            raise

    def state(self):
        return self.quotas.usage(), self.audit.count()

    def close(self):
        self.raw.close()
        self.http.close()
        self.quotas.close()
        self.audit.close()
        self.thread.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory, checkpoints):
    config = make_config(
        tmp_path_factory.mktemp("fuzz"),
        checkpoints,
        clients=[{"name": "alice", "quota": 10**9}, {"name": "dave", "quota": 0}],
        access={"auth_failures": 10**9},
        limits={"max_batch": 4, "max_payload_bytes": 1 << 20},
    )
    server = Server(config)
    yield server
    server.close()


def check(server: Server, response, before) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:300])
    assert not 300 <= response.status_code < 400, response.headers
    if response.status_code >= 400:
        payload = response.json()
        assert set(payload) == {"error", "reason"}, payload
        assert server.state() == before, "a rejected request changed the quota or the audit log"


def test_known_bugs_are_4xx_json(server):
    x = torch.rand(2, 1, 8, 8)
    flat = x.reshape(-1).tolist()
    cases = [
        ("datatype list", body(x, datatype=["FP32"]), 400),
        ("datatype dict", body(x, datatype={"a": 1}), 400),
        ("name list", body(x, name=["images"]), 400),
        ("shape dict", body(x, shape={"0": 2}), 400),
        ("id list", {**body(x), "id": ["a"]}, 400),
        ("booleans mixed in", body(x, data=[True] + flat[1:]), 400),
        ("null mixed in", body(x, data=flat[:-1] + [None]), 400),
        ("object mixed in", body(x, data=[{"v": 0.5}] + flat[1:]), 400),
        ("list mixed in", body(x, data=[[0.5]] + flat[1:]), 400),
        ("ragged nesting with the right count", body(x, data=[flat[:100], flat[100:]]), 400),
        (
            "too deep",
            body(x, data=[[[[[v]] for v in flat[:64]]], [[[[v]] for v in flat[64:]]]]),
            400,
        ),
        ("long id", {**body(x), "id": "i" * 257}, 400),
        ("long name", body(x, name="n" * 257), 400),
        ("huge integer", body(x, data=[10**400] + flat[1:]), 400),
        ("1 MB id", {**body(x), "id": "i" * 1_000_000}, 413),
    ]
    before = server.state()
    for name, payload, status in cases:
        response = server.http.post(URL_INFER, content=json.dumps(payload), headers=auth("alice"))
        assert response.status_code == status, (name, response.text[:200])
        check(server, response, before)
    ok = server.http.post(URL_INFER, json={**body(x), "id": "i" * 256}, headers=auth("alice"))
    assert ok.status_code == 200 and ok.json()["id"] == "i" * 256


def test_trailing_slash_with_a_foreign_host_is_not_redirected(server):
    for path in (URL_INFER + "/", "/v2/models/digits/", "/v2/health/live/", "/metrics/"):
        response = server.http.post(
            path, json={}, headers={"Host": "evil.example", **auth("alice")}
        )
        assert response.status_code in (404, 405) and "location" not in response.headers, path
        assert response.json()["reason"] in ("not_found", "method_not_allowed")


def raw_request(
    url: str, head: bytes, body: bytes = b"", *, wait: float = 15.0
) -> tuple[bytes, float]:
    """Send ``head`` + ``body`` on a raw socket and keep it open; (the response, seconds to it)."""
    host, port = url.removeprefix("http://").split(":")
    start = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=wait) as sock:
        sock.sendall(head + body)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return data, time.monotonic() - start


def test_a_client_without_quota_is_refused_before_its_body_is_read(server):
    head = (
        f"POST {URL_INFER} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {KEYS.get('dave', 'key-dave')}\r\nContent-Length: 900000\r\n\r\n"
    ).encode()
    response, seconds = raw_request(server.url, head)  # no body is ever sent
    assert response.startswith(b"HTTP/1.1 429") and seconds < 5, response[:200]
    wrong = head.replace(b"key-dave", b"key-wrong")
    response, seconds = raw_request(server.url, wrong)
    assert response.startswith(b"HTTP/1.1 401") and seconds < 5, response[:200]


def test_a_body_over_what_the_model_can_take_is_413_from_the_header(server):
    # max_batch 4 images of 64 values: far below the configured 1 MiB
    head = (
        f"POST {URL_INFER} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {KEYS['alice']}\r\nContent-Length: 200000\r\n\r\n"
    ).encode()
    response, seconds = raw_request(server.url, head)
    assert response.startswith(b"HTTP/1.1 413") and seconds < 5, response[:200]


@pytest.mark.slow
def test_a_stalled_body_is_cut(tmp_path, checkpoints):
    config = make_config(tmp_path, checkpoints, limits={"body_timeout_s": 1.0})
    with ServerThread(create_app(config)) as url:
        head = (
            f"POST {URL_INFER} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {KEYS['alice']}\r\nContent-Length: 5000\r\n\r\n"
        ).encode()
        response, seconds = raw_request(url, head, b'{"inputs": [')
    assert response.startswith(b"HTTP/1.1 408") and seconds < 5, response[:200]


@pytest.mark.slow
def test_stalled_headers_are_cut(tmp_path, checkpoints):
    config = make_config(tmp_path, checkpoints, limits={"header_timeout_s": 1.0})
    with ServerThread(create_app(config)) as url:
        response, seconds = raw_request(
            url, b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nX-API-"
        )
        assert response == b"" and seconds < 5  # closed, not answered: there is no request yet
        with httpx.Client(base_url=url) as http:  # a keep-alive connection that then stalls
            assert http.get("/v2/health/live").status_code == 200
            time.sleep(1.5)
            assert http.get("/v2/health/live").status_code == 200


def test_a_client_hanging_up_mid_body_logs_no_traceback(tmp_path, checkpoints, caplog):
    config = make_config(tmp_path, checkpoints)
    with ServerThread(create_app(config)) as url:
        host, port = url.removeprefix("http://").split(":")
        for _ in range(3):
            with socket.create_connection((host, int(port))) as sock:
                sock.sendall(
                    (
                        f"POST {URL_INFER} HTTP/1.1\r\nHost: x\r\n"
                        f"Authorization: Bearer {KEYS['alice']}\r\n"
                        'Content-Length: 5000\r\n\r\n{"inputs"'
                    ).encode()
                )
        time.sleep(0.5)
        assert httpx.get(url + "/v2/health/live").status_code == 200
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records]


# ---- property-based fuzzing -------------------------------------------------------------------

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
JSON = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
FIELDS = ("name", "shape", "datatype", "data")


@st.composite
def mutated_requests(draw) -> bytes:
    """A valid request with some of its parts replaced, removed, or added to."""
    n = draw(st.integers(1, 4))
    pixels = random.Random(draw(st.integers(0, 2**32)))
    values = [pixels.random() for _ in range(64 * n)]
    tensor: dict = {"name": "images", "shape": [n, 1, 8, 8], "datatype": "FP32", "data": values}
    payload: dict = {"inputs": [tensor]}
    for field in draw(st.lists(st.sampled_from(FIELDS), unique=True, max_size=3)):
        if draw(st.booleans()):
            tensor[field] = draw(JSON)
        else:
            del tensor[field]
    if draw(st.booleans()):  # poison some pixels
        for _ in range(draw(st.integers(1, 3))):
            if "data" in tensor and isinstance(tensor["data"], list) and tensor["data"]:
                tensor["data"][draw(st.integers(0, len(tensor["data"]) - 1))] = draw(JSON)
    if draw(st.booleans()):
        payload["id"] = draw(JSON)
    if draw(st.integers(0, 9)) == 0:
        payload["inputs"] = draw(JSON)
    if draw(st.integers(0, 9)) == 0:
        payload = draw(JSON)
    text = json.dumps(payload)
    if draw(st.integers(0, 9)) == 0:  # truncate or corrupt the text
        cut = draw(st.integers(0, len(text)))
        text = text[:cut] + draw(st.text(max_size=4))
    return text.encode("utf-8", "surrogatepass")


@FUZZ
@given(content=mutated_requests())
@pytest.mark.slow
def test_fuzz_request_structures(server, content):
    before = server.state()
    response = server.send("POST", URL_INFER, content, auth("alice"))
    check(server, response, before)


HEADER_TEXT = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40).map(
    str.strip
)
PATHS = st.sampled_from(
    [
        "/v2/models/digits/infer",
        "/v2/models/digits/infer/",
        "/v2/models/digits",
        "/v2/models/digits/",
        "/v2/models/digits/ready",
        "/v2/health/ready",
        "/metrics",
        "/v2/models//infer",
        "/v2/models/%00/infer",
        "/v2/models/digits/infer?x=1",
        "/v2/models/" + "a" * 300 + "/infer",
        "/../etc/passwd",
        "//evil.example/",
    ]
)


@FUZZ
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]),
    path=PATHS,
    key=st.sampled_from([KEYS["alice"], KEYS["alice"] + "x", "", "Bearer", "x" * 300]),
    scheme=st.sampled_from(["Bearer ", "bearer ", "Basic ", "", "Bearer  x"]),
    headers=st.dictionaries(
        st.sampled_from(
            [
                "Content-Type",
                "Host",
                "X-API-Key",
                "Content-Encoding",
                "Accept",
                "Transfer-Encoding-Hint",
            ]
        ),
        HEADER_TEXT,
        max_size=3,
    ),
    content=st.binary(max_size=300) | mutated_requests(),
)
@pytest.mark.slow
def test_fuzz_routes_headers_and_bytes(server, method, path, key, scheme, headers, content):
    before = server.state()
    request_headers = {"Authorization": (scheme + key).strip(), **headers}
    response = server.send(
        method, path, content if method not in ("GET", "HEAD") else None, request_headers
    )
    assert response.status_code < 500, (method, path, response.status_code, response.text[:300])
    assert not 300 <= response.status_code < 400
    if response.status_code >= 400:
        if method != "HEAD":
            assert set(response.json()) == {"error", "reason"}
        assert server.state() == before
