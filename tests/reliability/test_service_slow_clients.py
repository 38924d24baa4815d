"""Slow clients cannot hold a connection: a client that trickles its headers or its body one byte a second, or
connects and says nothing, is answered 408 or disconnected within the deadline (plus slack for a noisy
machine). Raw sockets on loopback; the server is the app under uvicorn as `distill serve` configures it, with
2 s deadlines instead of the defaults (10 s for headers, 30 s for a body) to keep the test short.
"""

import socket
import time

import httpx
import pytest
from serving import InProcessServer, served_project

from distill.serve.app import ServeConfig, create_app, uvicorn_config

DEADLINE_S = 2.0
BOUND_S = DEADLINE_S + 4.0          # generous: CI machines are noisy; without deadlines nothing happens at all


@pytest.fixture(scope="module", params=["auto", "h11"])
def served(tmp_path_factory, request):
    """Both HTTP protocols carry the deadline: httptools (the default) and h11 (where httptools is missing)."""
    root, key = served_project(tmp_path_factory.mktemp("slow"))
    s = InProcessServer(create_app(root, config=ServeConfig(header_timeout_s=DEADLINE_S, body_timeout_s=DEADLINE_S)),
                        http=request.param)
    yield {"port": s.port, "url": s.url, "key": key}
    s.stop()


def trickle(port: int, first: bytes, then: bytes) -> tuple[float, bytes, bool]:
    """Send ``first`` at once, then ``then`` one byte a second, until the server closes the connection or
    BOUND_S passes. Returns (seconds until the close, everything the server sent, closed?)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.settimeout(0.2)
    got, t0, i, next_byte = b"", time.monotonic(), 0, time.monotonic() + 1.0
    try:
        if first:
            s.sendall(first)
        while time.monotonic() - t0 < BOUND_S:
            if i < len(then) and time.monotonic() >= next_byte:
                try:
                    s.sendall(then[i:i + 1])
                except (BrokenPipeError, ConnectionResetError):
                    return time.monotonic() - t0, got, True
                i, next_byte = i + 1, next_byte + 1.0
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                continue
            except ConnectionResetError:
                return time.monotonic() - t0, got, True
            if not chunk:
                return time.monotonic() - t0, got, True
            got += chunk
        return time.monotonic() - t0, got, False
    finally:
        s.close()


def test_slow_headers_are_cut_off(served):
    took, got, closed = trickle(served["port"], b"", b"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1\r\n" * 4)
    assert closed, f"a client sending headers at 1 byte/s still held the connection after {took:.1f}s"
    assert took <= BOUND_S and (got == b"" or got.startswith(b"HTTP/1.1 408")), got[:200]


def test_a_silent_connection_is_closed(served):
    took, _, closed = trickle(served["port"], b"", b"")
    assert closed and took <= BOUND_S, f"an idle connection was still open after {took:.1f}s"


def test_slow_body_gets_408(served):
    body = b'{"texts": ["' + b"a" * 60 + b'"]}'
    head = (f"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {served['key']}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    took, got, closed = trickle(served["port"], head + body[:5], body[5:])
    assert got.startswith(b"HTTP/1.1 408"), f"after {took:.1f}s the server had sent {got[:200]!r}"
    assert b"did not arrive within" in got and b"Traceback" not in got
    assert closed and took <= BOUND_S


def test_trickling_the_next_request_on_a_kept_alive_connection_is_cut_off(served):
    first = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"        # answered at once, connection kept alive
    took, got, closed = trickle(served["port"], first, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n" * 4)
    assert got.startswith(b"HTTP/1.1 200"), got[:200]
    assert closed and took <= BOUND_S, f"the connection was still open after {took:.1f}s"


def test_normal_clients_are_unaffected(served):
    h = {"Authorization": f"Bearer {served['key']}"}
    with httpx.Client(base_url=served["url"], headers=h, timeout=30) as c:
        for _ in range(3):                       # one kept-alive connection, requests well within the deadline
            assert c.post("/v1/classify", json={"texts": ["fine"]}).status_code == 200
        time.sleep(DEADLINE_S + 0.5)             # the server closed the idle connection; the client reconnects
        assert c.post("/v1/classify", json={"texts": ["fine"]}).status_code == 200


def test_serve_uses_the_deadlines_by_default(tmp_path):
    cfg = ServeConfig()
    assert cfg.header_timeout_s == 10.0 and cfg.body_timeout_s == 30.0

    class App:                                   # uvicorn_config needs only app.state.config
        class state:
            config = cfg

    uc = uvicorn_config(App(), "127.0.0.1", 1)
    assert uc.http.header_timeout_s == 10.0 and uc.timeout_keep_alive == 5
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    assert issubclass(uc.http, HttpToolsProtocol)       # the C parser, where it is installed (a dependency)
