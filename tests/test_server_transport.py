"""The transport layer (`server.api.guard`, `server.app.drain`): body limits whatever the framing, the API key before
the body, slow bodies, odd header bytes, and the drain on SIGTERM. Real sockets on 127.0.0.1 where the behaviour
is about bytes on the wire; every test is bounded to seconds."""

import itertools
import json
import select
import signal
import socket
import threading
import time
from contextlib import contextmanager

import httpx
import pytest
from starlette.testclient import TestClient

from server.app import DrainingServer, create_app
from server.settings import ServerSettings
from server_fixtures import ServeProcess, free_port, wait_until_ready

TINY = [{"id": "tiny-flux", "source": "tiny-flux"}]
KEY = "k3y"
MB = 1 << 20


@contextmanager
def running(**overrides):
    """`DrainingServer` (what `accel-server` runs) in a thread on a free port."""
    settings = ServerSettings(port=free_port(), models=TINY, warmup=False, log_level="warning", **overrides)
    app = create_app(settings)
    server = DrainingServer(app, settings)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{settings.port}"
    try:
        assert wait_until_ready(url, 120, probe_timeout=2), "server did not become ready"
        yield server, settings.port, url
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def guarded():
    with running(api_keys=[KEY], body_timeout_s=1.0) as (server, port, url):
        yield port


def exchange(port: int, head: bytes, chunks=(), timeout: float = 10) -> tuple[int, dict, bytes, int]:
    """Send `head`, then `chunks` until the server answers or stops reading; read the response to the end.
    Returns (status, headers, body, bytes sent)."""
    sent, response = 0, b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        for chunk in itertools.chain([head], chunks):
            if select.select([sock], [], [], 0)[0]:
                break  # answered already
            try:
                sock.sendall(chunk)
            except OSError:  # the server closed the connection
                break
            sent += len(chunk)
        while True:
            try:
                data = sock.recv(65536)
            except (ConnectionResetError, socket.timeout):
                break
            if not data:
                break
            response += data
    head_part, _, body = response.partition(b"\r\n\r\n")
    lines = head_part.decode("latin-1").split("\r\n")
    headers = {name.lower(): value for name, _, value in (line.partition(": ") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body, sent


def request_head(path: str, *fields: str, method: str = "POST") -> bytes:
    return "\r\n".join([f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close", *fields, "", ""]).encode(
        "latin-1")


def chunked(prefix: bytes, total: int, piece: int = 64 * 1024):
    """`prefix` then filler up to `total` bytes, in chunked transfer coding, generated as it is sent."""
    yield b"%x\r\n%s\r\n" % (len(prefix), prefix)
    for _ in range(total // piece):
        yield b"%x\r\n%s\r\n" % (piece, b"x" * piece)
    yield b"0\r\n\r\n"


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith("VmRSS:")).split()[1]) * 1024


def error_of(body: bytes) -> dict:
    return json.loads(body)["error"]


AUTH = f"Authorization: Bearer {KEY}"


@pytest.mark.parametrize("path, content_type, prefix, framing", [
    ("/v1/images/generations", "application/json", b'{"prompt": "', "chunked"),
    ("/v1/images/generations", "application/json", b'{"prompt": "', "length"),
    ("/v1/videos", "multipart/form-data; boundary=b0", b'--b0\r\nContent-Disposition: form-data; name="input_reference"; '
                                                         b'filename="a.bin"\r\n\r\n', "chunked"),
])
def test_a_body_past_the_limit_is_refused_as_it_arrives(guarded, path, content_type, prefix, framing):
    """32 MB against max_body_bytes=1 MB: 413 at once, the rest never read, the server's memory not grown by it.
    (Before: a chunked body was read in full, then answered 400; RSS grew by several times its size.)"""
    total = 32 * MB
    framing_field = "Transfer-Encoding: chunked" if framing == "chunked" else f"Content-Length: {total}"
    chunks = chunked(prefix, total) if framing == "chunked" else (b"x" * (64 * 1024) for _ in range(total // 65536))
    before, start = rss_bytes(), time.monotonic()
    status, headers, body, sent = exchange(guarded, request_head(path, AUTH, f"Content-Type: {content_type}",
                                                                 framing_field), chunks)
    assert status == 413 and error_of(body)["code"] == "body_too_large"
    assert headers["connection"] == "close"
    assert time.monotonic() - start < 5
    assert sent < total // 2  # the server stopped reading: the client could not push the rest
    assert rss_bytes() - before < 12 * MB


def test_the_api_key_is_checked_before_the_body_is_read(guarded):
    """A wrong key gets 401 while its body is still being sent, and before the size check."""
    chunks = chunked(b'{"prompt": "', 32 * MB)
    status, headers, body, sent = exchange(guarded, request_head(
        "/v1/images/generations", "Authorization: Bearer wrong", "Content-Type: application/json",
        "Transfer-Encoding: chunked"), chunks)
    assert status == 401 and headers["www-authenticate"] == "Bearer"
    assert error_of(body)["type"] == "authentication_error"
    assert sent < 16 * MB
    # a declared length over the limit: still 401 first, without sending a byte of the body
    status, _, _, _ = exchange(guarded, request_head("/v1/images/generations", f"Content-Length: {50 * MB}"))
    assert status == 401
    status, _, _, _ = exchange(guarded, request_head("/v1/models", AUTH, method="GET"))
    assert status == 200


def test_a_stalled_body_gets_408_and_its_connection_closes(guarded):
    """4 of 100 declared bytes, then nothing: 408 after body_timeout_s (1 s here), connection closed.
    (Before: such connections stayed open indefinitely.)"""
    start = time.monotonic()
    status, headers, body, _ = exchange(guarded, request_head(
        "/v1/images/generations", AUTH, "Content-Type: application/json", "Content-Length: 100") + b'{"pr')
    assert status == 408 and error_of(body)["code"] == "body_timeout"
    assert 0.9 < time.monotonic() - start < 5  # `exchange` returned: the server closed the connection
    assert headers["connection"] == "close"


def test_header_bytes_outside_utf8_are_not_a_server_error(guarded):
    """HTTP allows any byte in a header value. (Before: a plain-text 500 on every route, /health included.)"""
    junk = "X-Junk: \xff\xfe"
    for path, fields in [("/health", [junk]), ("/v1/models", [junk, AUTH]), ("/health", ["X-Request-ID: \xff"])]:
        status, headers, body, _ = exchange(guarded, request_head(path, *fields, method="GET"))
        assert status == 200, body
    assert headers["x-request-id"].isalnum()  # not an echo of the odd bytes: a fresh id


def test_endless_headers_are_refused(guarded):
    """Headers still incomplete past max_header_bytes: 400. (Before, with httptools: buffered without a bound.)"""
    head = request_head("/health", method="GET")[:-2] + b"X-Big: "
    status, _, _, sent = exchange(guarded, head, (b"a" * 65536 for _ in range(512)))
    assert status == 400 and sent < 16 * MB


def test_paths_without_a_key_are_the_public_paths():
    """With keys set, only `public_paths` answer without one; the default keeps probes and scrapers working."""
    default = TestClient(create_app(ServerSettings(models=TINY, api_keys=[KEY])))
    assert default.get("/metrics").status_code == 200
    assert default.get("/openapi.json").status_code == 200
    assert default.get("/v1/models").status_code == 401
    assert default.get("/nowhere").status_code == 401  # unknown paths need a key too
    locked = TestClient(create_app(ServerSettings(models=TINY, api_keys=[KEY], public_paths=["/health"])))
    response = locked.get("/metrics")
    assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
    assert response.json()["error"]["type"] == "authentication_error"
    assert locked.get("/openapi.json").status_code == 401
    assert locked.get("/health").status_code == 200
    assert locked.get("/metrics", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_work_still_running_when_the_grace_ends_gets_a_json_503():
    """(Before: uvicorn cancelled the request and answered a plain-text 500.)"""
    with running(shutdown_grace_s=0.5, max_steps=500) as (server, port, url):
        result = {}

        def long_request():
            body = {"prompt": "x", "size": "64x64", "num_inference_steps": 500, "seed": 1}
            result["response"] = httpx.post(url + "/v1/images/generations", json=body, timeout=60)

        thread = threading.Thread(target=long_request)
        thread.start()
        scheduler = server.app_state.scheduler
        deadline = time.monotonic() + 30
        while not scheduler.running and time.monotonic() < deadline:
            time.sleep(0.05)
        server.stop()
        thread.join(timeout=30)
        response = result["response"]
        assert response.status_code == 503 and response.headers["retry-after"]
        assert response.json()["error"]["code"] == "shutting_down"


def test_sigterm_drains_keeps_answering_ready_and_exits_0():
    """SIGTERM during a request: it completes; meanwhile new connections are still accepted, /ready says draining,
    /health is 200 and new work is refused with 503; then the process exits 0. (Before: new connections were
    refused and the process died by the signal, status 143.)"""
    server = ServeProcess(shutdown_grace_s="60", max_steps="500", models=TINY)
    try:
        server.wait_ready()
        result = {}

        def running_request():
            body = {"prompt": "x", "size": "64x64", "num_inference_steps": 100, "seed": 1}
            result["response"] = httpx.post(server.url + "/v1/images/generations", json=body, timeout=60)

        thread = threading.Thread(target=running_request)
        thread.start()
        time.sleep(0.5)
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        ready = httpx.get(server.url + "/ready", timeout=5)
        assert ready.status_code == 503 and ready.json()["reason"] == "draining"
        assert httpx.get(server.url + "/health", timeout=5).status_code == 200
        refused = httpx.post(server.url + "/v1/images/generations", json={"prompt": "x"}, timeout=5)
        assert refused.status_code == 503 and refused.headers["retry-after"]
        assert thread.is_alive()  # all of the above while the first request still ran
        thread.join(timeout=60)
        assert result["response"].status_code == 200
        assert server.process.wait(timeout=30) == 0
        assert "Traceback" not in server.process.stdout.read()
    finally:
        if server.process.poll() is None:
            server.process.kill()
