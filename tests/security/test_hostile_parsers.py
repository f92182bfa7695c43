"""Hostile parser input to a real server: clear refusals, no tracebacks, a bounded log.

One `twistd shellserver` of its own (uids 234000-234099, used by no other
test) with the hostile suite's short limits. Hostile clients connect from
127.0.0.3 and up. docs/security.md lists the cases and outcomes; the
property tests in tests/unit/test_parser_properties.py cover the parsers
themselves with generated input.
"""

from __future__ import annotations

import os
import socket
import time

import pytest
from conftest import sandbox_leftovers, start_server, wait_until
from hostile_helpers import (
    SERVER_LIMITS,
    RawWebSocket,
    body_of,
    console_token,
    get_request,
    http_exchange,
    read_until_closed,
    status_of,
    tls_connect,
    ws_frame,
)

pytestmark = pytest.mark.integration

UID_MIN, UID_MAX = 234000, 234099
LONG_HOST = b"h" * 1500
# Each kind of client-caused message is logged 5 times per address and
# minute (shellserver.logs); a burst touches a handful of kinds.
MAX_LOG_LINES_FOR_A_BURST = 60


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.fail("the hostile-parser suite needs root (it starts real sandboxes)")
    srv = start_server(
        tmp_path_factory.mktemp("parsers"), uid_min=UID_MIN, uid_max=UID_MAX,
        server="\n".join(f"{name} = {value}" for name, value in SERVER_LIMITS.items()),
        console="auth_timeout = 10.0\n",
    )
    yield srv
    srv.stop()
    assert wait_until(lambda: sandbox_leftovers(srv) == [], timeout=20), \
        sandbox_leftovers(srv)
    assert "Traceback" not in srv.log(), "the server logged a traceback"


@pytest.fixture(autouse=True)
def no_traceback(server):
    yield
    assert server.process.poll() is None, "the server died"
    assert "Traceback" not in server.log(), server.log()[-3000:]
    status, _ = get(server, b"/")
    assert status == 200


def get(server, path: bytes, *, host: bytes = b"127.0.0.1",
        source: str = "127.0.0.1") -> tuple[int | None, bytes]:
    response, _ = http_exchange(server, get_request(path, host=host), source=source)
    return status_of(response), body_of(response)


def log_lines(server) -> int:
    return len(server.log().splitlines())


def settled_log_lines(server) -> int:
    """The log's length once it has stopped growing (bounded wait)."""
    seen = [log_lines(server)]

    def unchanged() -> bool:
        seen.append(log_lines(server))
        return seen[-1] == seen[-2]

    wait_until(unchanged, timeout=10, interval=0.5)
    return seen[-1]


def test_superscript_acknowledgement_is_a_protocol_error(server):
    """``k²`` on a running console closes it with 4003 and a clear message, no traceback."""
    token = console_token(server, source="127.0.0.3")
    with RawWebSocket(server, source="127.0.0.3", timeout=30) as ws:
        ws.send_text("a" + token)
        ws.read_output_until("In [", timeout=30)
        ws.send_text("k\u00b2")
        messages = ws.messages_until_close(timeout=15)
    assert ws.closed is not None and ws.closed[0] == 4003, (ws.closed, messages[-3:])
    assert "Protocol error: an acknowledgement needs a count" in ws.closed[1]
    assert messages[-1].startswith("eProtocol error: an acknowledgement needs a count")
    assert "Internal error" not in server.log()


@pytest.mark.parametrize("path", [b"/console/", b"/", b"/status", b"/sockjs/info",
                                  b"/static/console.js", b"/sockjs/websocket"])
def test_long_host_is_a_bad_request(server, path):
    """A 1,500-character Host gets 400 with a short reason on every path, no traceback."""
    status, body = get(server, path, host=LONG_HOST, source="127.0.0.4")
    assert status == 400
    assert body == b"The Host header is longer than 255 characters.\n"


@pytest.mark.parametrize("host", [b"a b", b"example.org:99999", b"[::1", b"\xc3\xa9.example",
                                  b"example.org/path", b"user@example.org"])
def test_malformed_host_is_a_bad_request(server, host):
    """A Host that is not host[:port] gets 400 naming the problem."""
    status, body = get(server, b"/console/", host=host, source="127.0.0.4")
    assert status == 400
    assert body == b"The Host header is not a host name or address with an optional port.\n"


def test_two_hosts_are_a_bad_request(server):
    """Two Host headers get 400."""
    request = b"GET /console/ HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n"
    response, _ = http_exchange(server, request, source="127.0.0.4")
    assert status_of(response) == 400
    assert body_of(response) == b"The request has more than one Host header.\n"


def pipelined_bad_hosts(server, count: int, source: str) -> list[int | None]:
    """``count`` requests with a long Host on one keep-alive connection: their statuses."""
    request = b"GET /console/ HTTP/1.1\r\nHost: " + LONG_HOST + b"\r\n\r\n"
    statuses = []
    with tls_connect(server, source=source, timeout=10) as sock:
        sock.sendall(request * count + get_request(b"/status"))
        data, _ = read_until_closed(sock, timeout=20)
    for part in data.split(b"HTTP/1.1 ")[1:]:
        statuses.append(int(part[:3]))
    return statuses


def test_burst_of_hostile_input_keeps_the_log_bounded(server):
    """550 hostile requests, messages and TLS handshakes from one address add a
    bounded number of log lines, and the server keeps serving."""
    source = "127.0.0.5"
    before = settled_log_lines(server)
    started = time.monotonic()
    statuses = []
    for _ in range(5):  # 300 requests with a bad Host, 60 per connection
        statuses += pipelined_bad_hosts(server, 60, source)
    assert statuses.count(400) == 300, statuses
    for index in range(100):  # console protocol errors before a token
        with RawWebSocket(server, source=source) as ws:
            ws.send_text("x" if index % 2 else "k\u00b2")
            ws.messages_until_close(timeout=5)
            assert ws.closed[0] == 4003, ws.closed
    for _ in range(100):  # websocket protocol violations (an unmasked frame)
        with RawWebSocket(server, source=source) as ws:
            ws.sock.sendall(ws_frame(0x1, b"x", masked=False))
            ws.messages_until_close(timeout=5)
            assert ws.closed[0] == 1002, ws.closed
    for _ in range(50):  # plain HTTP or junk where TLS is expected
        with socket.create_connection(("127.0.0.1", server.port), timeout=5,
                                      source_address=(source, 0)) as raw:
            raw.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n\x16\x03\x01\x00\x05junk")
            read_until_closed(raw, timeout=5)
    assert time.monotonic() - started < 120
    added = settled_log_lines(server) - before
    assert added <= MAX_LOG_LINES_FOR_A_BURST, server.log().splitlines()[before:]
    status, _ = get(server, b"/status", source=source)
    assert status == 200


DEEPLY_NESTED = b"[" * 50000


def test_deeply_nested_json_on_xhr_send(server):
    """An xhr_send body of 50,000 nested arrays is Broken JSON (500, the SockJS
    text), not a crash with a traceback."""
    session = f"/sockjs/000/{os.urandom(8).hex()}"
    source = "127.0.0.6"
    opened, _ = http_exchange(server, post_request(session + "/xhr", b""), source=source)
    assert status_of(opened) == 200 and body_of(opened) == b"o\n", opened[:300]
    response, _ = http_exchange(server, post_request(session + "/xhr_send", DEEPLY_NESTED),
                                source=source)
    assert status_of(response) == 500
    assert body_of(response) == b"Broken JSON encoding."


def test_deeply_nested_json_on_a_framed_websocket(server):
    """50,000 nested arrays on a framed websocket close it with 3000 Broken framing."""
    path = f"/sockjs/000/{os.urandom(8).hex()}/websocket"
    with RawWebSocket(server, path, source="127.0.0.6") as ws:
        assert ws.recv_frame() == (0x1, b"o")
        ws.send_text(DEEPLY_NESTED)
        assert ws.messages_until_close() == []
    assert ws.closed == (3000, "Broken framing.")


def post_request(path: str, body: bytes) -> bytes:
    lines = [b"POST " + path.encode() + b" HTTP/1.1", b"Host: 127.0.0.1",
             b"Connection: close", b"Content-Length: %d" % len(body)]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body
