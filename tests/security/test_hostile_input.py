"""Hostile input to a real server: each case gets a clear error and leaks nothing.

One `twistd shellserver` of its own (uids 231000-231049, used by no other
test) with short connection limits (hostile_helpers.SERVER_LIMITS), and one
legitimate console (the witness) open for the whole module. Hostile clients
connect from 127.0.0.2 and up, so the per-address limits they trip never
touch the witness. After every test: the server lives, no sandbox process
exists besides the witness's (or the test's own legitimate console, once
closed), the server's sockets and memory are back near their baseline, and
the witness still prints 42. docs/security.md lists the cases and outcomes.
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import pytest
from conftest import REPO, sandbox_leftovers, wait_until
from hostile_helpers import (
    BINARY,
    HOST_ORIGIN,
    PING,
    PONG,
    SERVER_LIMITS,
    TEXT,
    RawWebSocket,
    Witness,
    body_of,
    console_token,
    consoles_started,
    get_request,
    headers_of,
    http_exchange,
    read_until_closed,
    sandbox_uids,
    server_rss_kb,
    server_sockets,
    start_hostile_server,
    status_of,
    tls_connect,
    ws_frame,
)

pytestmark = pytest.mark.integration

MAX_MESSAGE = 64 * 1024  # SockJSOptions.max_message_bytes
MAX_BODY = 262144  # server.max_request_body_bytes (default)
RSS_SLACK_KB = 32 * 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.fail("the hostile-input suite needs root (it starts real sandboxes)")
    srv = start_hostile_server(tmp_path_factory.mktemp("hostile"))
    yield srv
    srv.stop()
    assert wait_until(lambda: sandbox_leftovers(srv) == [], timeout=20), \
        sandbox_leftovers(srv)
    assert "Traceback" not in srv.log(), "the server logged a traceback"


@pytest.fixture(scope="module")
def witness(server):
    console = Witness(server)
    yield console
    console.close()


@pytest.fixture(scope="module")
def baseline(server, witness):
    """The server's sockets, memory and sandbox uids with just the witness."""
    assert witness.answers()
    uids = sandbox_uids(server)
    assert len(uids) == 1, uids
    return {"sockets": server_sockets(server), "rss": server_rss_kb(server), "uids": uids}


@pytest.fixture(autouse=True)
def leaks_nothing(server, witness, baseline):
    yield
    assert server.process.poll() is None, "the server died"
    assert wait_until(lambda: sandbox_uids(server) <= baseline["uids"], timeout=10), \
        f"sandboxes left: {sandbox_uids(server)}"
    assert wait_until(lambda: server_sockets(server) <= baseline["sockets"] + 1,
                      timeout=12), f"{server_sockets(server)} sockets, {baseline}"
    assert server_rss_kb(server) < baseline["rss"] + RSS_SLACK_KB
    assert witness.answers(), witness.client.display()


def new_session_path(transport: str) -> str:
    return f"/sockjs/000/{uuid.uuid4().hex}/{transport}"


def post(path: str, body: bytes, *headers: bytes) -> bytes:
    lines = [b"POST " + path.encode() + b" HTTP/1.1", b"Host: 127.0.0.1",
             b"Connection: close", b"Content-Length: %d" % len(body), *headers]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


# -- malformed SockJS frames and JSON ------------------------------------------

@pytest.mark.parametrize("payload", [b"not json", b'["unterminated', b"[1,2]", b'{"a":"b"}',
                                     b"42"])
def test_framed_websocket_broken_json(server, payload):
    """Framed websocket: what is not SockJS JSON ends the websocket with 3000."""
    with RawWebSocket(server, new_session_path("websocket"), source="127.0.0.2") as ws:
        assert ws.recv_frame() == (TEXT, b"o")
        ws.send_text(payload)
        assert ws.messages_until_close() == []
        assert ws.closed == (3000, "Broken framing.")


def test_framed_websocket_binary(server):
    """Framed websocket: a binary message is broken framing too (3000)."""
    with RawWebSocket(server, new_session_path("websocket"), source="127.0.0.2") as ws:
        assert ws.recv_frame() == (TEXT, b"o")
        ws.send(BINARY, b'["a"]')
        ws.messages_until_close()
        assert ws.closed == (3000, "Broken framing.")


def test_raw_websocket_binary(server):
    """Raw websocket: a binary message is refused with 1003."""
    with RawWebSocket(server, source="127.0.0.2") as ws:
        ws.send(BINARY, b"\x00\x01\x02")
        ws.messages_until_close()
        assert ws.closed == (1003, "Binary messages are not supported")


@pytest.mark.parametrize("frame, name", [
    (ws_frame(TEXT, b"ab", masked=False), "unmasked"),
    (ws_frame(TEXT, b"ab", rsv=4), "reserved bit"),
    (ws_frame(0x3, b"ab"), "reserved opcode"),
    (ws_frame(PING, b"x" * 126), "control frame over 125 bytes"),
    (ws_frame(PING, b"x", fin=False), "fragmented control frame"),
    (ws_frame(0x0, b"x"), "continuation without a start"),
])
def test_websocket_protocol_violations(server, frame, name):
    """Frames RFC 6455 forbids end the connection with 1002 (protocol error)."""
    with RawWebSocket(server, source="127.0.0.2") as ws:
        ws.sock.sendall(frame)
        ws.messages_until_close()
        assert ws.closed[0] == 1002, (name, ws.closed)


def open_xhr_session(server) -> str:
    path = new_session_path("xhr")
    response, _ = http_exchange(server, post(path, b""), source="127.0.0.2")
    assert status_of(response) == 200 and body_of(response).endswith(b"o\n"), response
    return path.rsplit("/", 1)[0]


@pytest.mark.parametrize("body, reason", [
    (b"", b"Payload expected."),
    (b"not json", b"Broken JSON encoding."),
    (b'["unterminated', b"Broken JSON encoding."),
    (b'{"a":"b"}', b"Broken JSON encoding."),
    (b"[1,2]", b"Broken JSON encoding."),
    (b'"a single string"', b"Broken JSON encoding."),
    (b'["\xff\xfe"]', b"Broken JSON encoding."),
    (b'["\xed\xa0\x80"]', b"Broken JSON encoding."),
])
def test_xhr_send_malformed(server, body, reason):
    """xhr_send: an empty, non-JSON, non-array or non-UTF-8 body gets 500 and a reason."""
    session = open_xhr_session(server)
    response, _ = http_exchange(server, post(session + "/xhr_send", body),
                                source="127.0.0.2")
    assert status_of(response) == 500, response
    assert body_of(response).strip() == reason


# -- invalid UTF-8 --------------------------------------------------------------

@pytest.mark.parametrize("path", ["/sockjs/websocket", "framed"])
@pytest.mark.parametrize("payload", [b"\xff", b'["\xc3\x28"]', b"a\xed\xa0\x80b",
                                     b"\xf4\x90\x80\x80"])
def test_websocket_invalid_utf8(server, path, payload):
    """A text message that is not UTF-8 is refused with 1007 (autobahn validates)."""
    if path == "framed":
        path = new_session_path("websocket")
    with RawWebSocket(server, path, source="127.0.0.2") as ws:
        if "/000/" in path:
            assert ws.recv_frame() == (TEXT, b"o")
        ws.send_text(payload)
        ws.messages_until_close()
        assert ws.closed[0] == 1007, ws.closed


def test_websocket_invalid_utf8_across_fragments(server):
    """A character broken across fragments fails with 1007 at the fragment."""
    with RawWebSocket(server, source="127.0.0.2") as ws:
        ws.send(TEXT, b"ok \xc3", fin=False)  # valid so far: the start of a character
        ws.send(0x0, b"\x28", fin=True)  # which never completes
        ws.messages_until_close()
        assert ws.closed[0] == 1007, ws.closed


# -- oversized ------------------------------------------------------------------

@pytest.mark.parametrize("fragments", [1, 5])
def test_websocket_message_over_limit(server, fragments):
    """A websocket message over 64 KiB, whole or in fragments, gets 1009."""
    size = MAX_MESSAGE + 1
    piece = size // fragments + 1
    with RawWebSocket(server, source="127.0.0.2") as ws:
        for index in range(fragments):
            opcode = TEXT if index == 0 else 0x0
            ws.send(opcode, b"i" * piece, fin=index == fragments - 1)
        ws.messages_until_close()
        assert ws.closed[0] == 1009, ws.closed


def test_framed_websocket_message_over_limit(server):
    """The framed websocket says why (c[1009,...]) and closes with 1009."""
    with RawWebSocket(server, new_session_path("websocket"), source="127.0.0.2") as ws:
        assert ws.recv_frame() == (TEXT, b"o")
        ws.send_text(b'["' + b"i" * MAX_MESSAGE + b'"]')
        texts = ws.messages_until_close()
        assert texts == ['c[1009,"Message too big"]']
        assert ws.closed[0] == 1009


def test_xhr_send_over_limit(server):
    """An xhr_send body over 64 KiB gets 413 and the session closes with 1009."""
    session = open_xhr_session(server)
    body = b'["' + b"i" * MAX_MESSAGE + b'"]'
    response, _ = http_exchange(server, post(session + "/xhr_send", body), source="127.0.0.2")
    assert status_of(response) == 413, response[:200]
    response, _ = http_exchange(server, post(session + "/xhr", b""), source="127.0.0.2")
    assert body_of(response).endswith(b'c[1009,"Message too big"]\n'), response


@pytest.mark.parametrize("request_bytes, status", [
    (b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n", 431),
    (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"a" * 1000)
                                                 for i in range(20)) + b"\r\n", 431),
    (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: a\r\n" % i for i in range(200))
     + b"\r\n", 431),
    (b"GET /" + b"a" * 20000, 414),  # never ends
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n", 400),
    (b"GARBAGE\r\n\r\n", 400),
    (b"\x00\x01\x02\xff\r\n\r\n", 400),
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: x\r\nX-Nul: a\x00b\r\n\r\n", 400),
])
def test_malformed_or_oversized_request_head(server, request_bytes, status):
    """Oversized or malformed request heads get 414/431/400 and the connection ends."""
    response, ended = http_exchange(server, request_bytes, source="127.0.0.3")
    assert status_of(response) == status, response[:200]
    assert ended == "closed"
    assert b"Traceback" not in response and b"Twisted" not in response


def test_declared_body_over_limit(server):
    """A POST declaring 100 MB gets 413 before any of the body is read."""
    head = (b"POST /sockjs/000/abc/xhr_send HTTP/1.1\r\nHost: x\r\n"
            b"Content-Length: 100000000\r\n\r\n")
    started = time.monotonic()
    response, ended = http_exchange(server, head, source="127.0.0.3")
    assert status_of(response) == 413 and ended == "closed", response
    assert time.monotonic() - started < 2
    assert body_of(response) == b"The request body is too large.\n"


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_pushed_100mb_body(server, chunked):
    """Pushing a 100 MB body is cut off early; the server's memory does not grow."""
    rss = server_rss_kb(server)
    total = 100 * 1024 * 1024
    head = b"POST /sockjs/000/abc/xhr_send HTTP/1.1\r\nHost: x\r\n"
    head += b"Transfer-Encoding: chunked\r\n\r\n" if chunked else \
        b"Content-Length: %d\r\n\r\n" % total
    block = b"x" * 65536
    chunk = (b"10000\r\n" + block + b"\r\n") if chunked else block
    sent, error = 0, None
    deadline = time.monotonic() + 15
    with tls_connect(server, source="127.0.0.3", timeout=2) as sock:
        sock.sendall(head)
        try:
            while sent < total and time.monotonic() < deadline:
                sock.sendall(chunk)
                sent += len(block)
        except (OSError, ssl.SSLError) as e:
            error = type(e).__name__
        response, _ = read_until_closed(sock, timeout=3)
    assert error is not None, f"the server took all {sent} bytes"
    assert sent < 32 * 1024 * 1024, sent
    if response:
        assert status_of(response) == 413, response[:200]
    assert server_rss_kb(server) < rss + 16 * 1024


# -- slow clients ---------------------------------------------------------------

def test_tls_handshake_timeout(server):
    """A client that connects and never sends a ClientHello is dropped in time."""
    limit = SERVER_LIMITS["tls_handshake_timeout"]
    for first_bytes in (b"", b"\x16\x03\x01"):  # nothing; half a record header
        with socket.create_connection(("127.0.0.1", server.port), timeout=limit + 5,
                                      source_address=("127.0.0.4", 0)) as sock:
            sock.sendall(first_bytes)
            started = time.monotonic()
            data, ended = read_until_closed(sock, timeout=limit + 5)
            waited = time.monotonic() - started
        assert ended in ("closed", "ConnectionResetError"), ended
        assert limit - 0.5 < waited < limit + 2, waited


def test_idle_connection_timeout(server):
    """A TLS connection that never sends a request is closed after the idle timeout."""
    limit = SERVER_LIMITS["idle_connection_timeout"]
    with tls_connect(server, source="127.0.0.4", timeout=limit + 5) as sock:
        started = time.monotonic()
        data, ended = read_until_closed(sock, timeout=limit + 5)
        waited = time.monotonic() - started
    assert data == b"" and ended in ("closed", "ConnectionResetError", "SSLEOFError"), ended
    assert limit - 0.5 < waited < limit + 2, waited


@pytest.mark.parametrize("partial", [
    b"G",  # the request line never ends
    b"GET / HTTP/1.1\r\nHost: x\r\n",  # headers never end
    b"POST /sockjs/000/abc/xhr_send HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nab",
], ids=["request-line", "head", "body"])
def test_slowloris(server, partial):
    """Trickling a request byte by byte gets 408 after request_timeout, whatever comes."""
    limit = SERVER_LIMITS["request_timeout"]
    with tls_connect(server, source="127.0.0.4", timeout=limit + 5) as sock:
        started = time.monotonic()
        sock.sendall(partial)
        ended = None
        while time.monotonic() - started < limit + 3:
            try:
                sock.sendall(b"X" if partial.endswith(b"ab") else b"X-A: b\r\n"[:1])
            except OSError:
                break
            sock.settimeout(0.25)
            try:
                data = sock.recv(4096)
            except TimeoutError:
                continue
            ended = data
            break
        waited = time.monotonic() - started
    assert ended is not None and status_of(ended) == 408, ended
    assert limit - 0.5 < waited < limit + 2, waited


def test_connection_cap_per_address(server):
    """Past the per-address cap new connections are reset at once; others are served."""
    cap = SERVER_LIMITS["max_connections_per_address"]
    held = []
    try:
        for _ in range(cap):
            held.append(tls_connect(server, source="127.0.0.5"))
        with pytest.raises((ConnectionError, ssl.SSLError, OSError)):
            extra = tls_connect(server, source="127.0.0.5", timeout=3)
            # A refused connection may finish nothing; reading shows it.
            extra.sendall(get_request(b"/"))
            data = extra.recv(100)
            extra.close()
            assert data == b"", data
            raise ConnectionResetError("closed without an answer")
        response, _ = http_exchange(server, get_request(b"/"), source="127.0.0.6")
        assert status_of(response) == 200
        # The held connections (no request sent) are still served.
        held[0].sendall(get_request(b"/"))
        data, _ = read_until_closed(held[0])
        assert status_of(data) == 200
    finally:
        for sock in held:
            sock.close()
    wait_until(lambda: server_sockets(server) < cap, timeout=5)
    response, _ = http_exchange(server, get_request(b"/"), source="127.0.0.5")
    assert status_of(response) == 200


def test_websocket_outlives_connection_timeouts(server, witness):
    """An open console is not cut by the idle and request timeouts."""
    time.sleep(SERVER_LIMITS["idle_connection_timeout"] + 1.5)
    assert witness.answers()


def test_streaming_outlives_connection_timeouts(server):
    """An xhr_streaming response stays open past the idle and request timeouts."""
    path = new_session_path("xhr_streaming")
    session = path.rsplit("/", 1)[0]
    with tls_connect(server, source="127.0.0.7", timeout=10) as stream:
        stream.sendall(post(path, b""))
        data = read_until(stream, b"o\n")
        assert data.startswith(b"HTTP/1.1 200"), data[:200]
        time.sleep(SERVER_LIMITS["idle_connection_timeout"] + 1.5)
        response, _ = http_exchange(server, post(session + "/xhr_send", b'["ai am no token"]'),
                                    source="127.0.0.7")
        assert status_of(response) == 204, response
        data = read_until(stream, b"c[4001")
    assert b"Console refused" in data


def read_until(sock, marker: bytes, timeout: float = 10.0) -> bytes:
    """Read until ``marker`` has come (bounded in time)."""
    data = b""
    deadline = time.monotonic() + timeout
    while marker not in data:
        remaining = deadline - time.monotonic()
        assert remaining > 0, data[-200:]
        sock.settimeout(remaining)
        chunk = sock.recv(65536)
        assert chunk, data[-200:]
        data += chunk
    return data


# -- ping floods ----------------------------------------------------------------

FLOOD = textwrap.dedent("""
    import socket, ssl, sys, time
    sys.path[:0] = [sys.argv[3], sys.argv[3] + "/tests", sys.argv[3] + "/tests/security"]
    from hostile_helpers import PING, ws_frame
    from conftest import RunningServer
    port, cert = int(sys.argv[1]), sys.argv[2]
    context = ssl.create_default_context(cafile=cert)
    raw = socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.8", 0))
    sock = context.wrap_socket(raw, server_hostname="127.0.0.1")
    import base64, os
    sock.sendall(("GET /sockjs/websocket HTTP/1.1\\r\\nHost: x\\r\\nUpgrade: websocket\\r\\n"
                  "Connection: Upgrade\\r\\nSec-WebSocket-Version: 13\\r\\n"
                  "Sec-WebSocket-Key: " + base64.b64encode(os.urandom(16)).decode() +
                  "\\r\\nOrigin: https://127.0.0.1:%d\\r\\n\\r\\n" % port).encode())
    head = b""
    while b"\\r\\n\\r\\n" not in head:
        head += sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 101"), head
    batch = b"".join(ws_frame(PING, b"%05d" % i) for i in range(400))
    sent, started = 0, time.monotonic()
    try:
        while sent < 20000 and time.monotonic() - started < 5:
            sock.sendall(batch)
            sent += 400
            time.sleep(0.1)
    except OSError as e:
        print("stopped", type(e).__name__, flush=True)
    received = b""
    sock.settimeout(3)
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    except (OSError, ssl.SSLError):
        pass
    print("sent", sent, "received", len(received), "close", received.rfind(b"\\x88"),
          repr(received[-20:]), flush=True)
""")


def test_ping_flood(server, witness):
    """20k pings in 5 s: the flooder is closed (1008); the witness's echo stays fast."""
    rss = server_rss_kb(server)
    flood = subprocess.Popen(
        [sys.executable, "-c", FLOOD, str(server.port), server.cert, str(REPO)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    latencies = []
    try:
        started = time.monotonic()
        while time.monotonic() - started < 4:
            latencies.append(witness.echo_latency())
        output, _ = flood.communicate(timeout=20)
    finally:
        if flood.poll() is None:
            flood.kill()
            flood.wait(timeout=5)
    assert flood.returncode == 0, output
    assert "Too many pings" in output, output
    latencies.sort()
    assert latencies[len(latencies) * 9 // 10] < 0.1, latencies
    assert server_rss_kb(server) < rss + 8 * 1024


def test_pings_answered_within_limit(server):
    """A client's occasional pings get pongs with the same payload."""
    with RawWebSocket(server, source="127.0.0.8") as ws:
        for index in range(3):
            ws.send(PING, b"p%d" % index)
            assert ws.recv_frame() == (PONG, b"p%d" % index)


# -- tokens ---------------------------------------------------------------------

def present_token(server, token: str, *, source: str, origin: str | None = "") -> RawWebSocket:
    ws = RawWebSocket(server, source=source, origin=origin)
    ws.send_text("a" + token)
    ws.messages = ws.messages_until_close(timeout=10)
    ws.close()
    return ws


def test_token_brute_force(server, baseline):
    """Wrong tokens get 4001 and start nothing; past the per-address limit, 4004."""
    started = consoles_started(server)
    real = console_token(server)
    version, payload, signature = real.split(".")
    wrong = [
        "x",
        "v1.AAAA.BBBB",
        f"{version}.{payload}.{'A' * len(signature)}",  # forged signature
        f"{version}.{payload[:-4]}AAAA.{signature}",  # altered claims
        "v1." + "A" * 5000 + ".B",  # over the length cap
    ]
    outcomes = [present_token(server, token, source="127.0.0.9") for token in wrong]
    for ws in outcomes:
        assert ws.closed[0] == 4001, ws.closed
        assert ws.messages[-1].startswith("eConsole refused: console token"), ws.messages
    limited = present_token(server, "v1.AAAA.BBBB", source="127.0.0.9")
    assert limited.closed[0] == 4004, limited.closed
    assert "too many wrong console tokens" in limited.closed[1]
    # Even the real token is refused from that address now, and not used up.
    assert present_token(server, real, source="127.0.0.9").closed[0] == 4004
    assert consoles_started(server) == started
    assert sandbox_uids(server) == baseline["uids"]


def test_many_wrong_tokens_cost_little(server):
    """200 wrong tokens on 200 connections: all refused, no sandbox, no growth."""
    rss = server_rss_kb(server)
    errors = []

    def attack(source: str) -> None:
        for _ in range(20):
            ws = present_token(server, "v1.AAAA.BBBB", source=source)
            if ws.closed[0] not in (4001, 4004):
                errors.append(ws.closed)

    threads = [threading.Thread(target=attack, args=(f"127.0.1.{n}",)) for n in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert server_rss_kb(server) < rss + 8 * 1024


# -- origins --------------------------------------------------------------------

def test_token_from_another_origin(server):
    """A token presented with a forged Origin is refused (4001, another origin)."""
    started = consoles_started(server)
    ws = present_token(server, console_token(server), source="127.0.0.10",
                       origin="https://evil.example")
    assert ws.closed == (4001, "Console refused: console token was issued for another origin.")
    # A token minted for another Host, presented from our origin: refused too.
    foreign = console_token(server, host=b"evil.example")
    ws = present_token(server, foreign, source="127.0.0.10")
    assert ws.closed[0] == 4001 and "another origin" in ws.closed[1]
    assert consoles_started(server) == started


def test_token_without_origin(server):
    """Without an Origin a token is refused (4001) and starts nothing: browsers always send one."""
    started = consoles_started(server)
    token = console_token(server, source="127.0.0.11")
    ws = present_token(server, token, source="127.0.0.11", origin=None)
    assert ws.closed == (4001, "Console refused: console token needs the Origin of its page, "
                               "and this connection sent none.")
    assert consoles_started(server) == started


def test_status_cors(server):
    """/status answers CORS only for configured host origins."""
    response, _ = http_exchange(server, get_request(b"/status", b"Origin: https://evil.example"))
    assert status_of(response) == 200
    assert b"access-control-allow-origin" not in headers_of(response)
    response, _ = http_exchange(server, get_request(b"/status",
                                                    b"Origin: " + HOST_ORIGIN.encode()))
    assert headers_of(response)[b"access-control-allow-origin"] == HOST_ORIGIN.encode()


# -- static files ---------------------------------------------------------------

TRAVERSALS = [
    b"/static/../../etc/passwd",
    b"/static/%2e%2e/%2e%2e/etc/passwd",
    b"/static/..%2f..%2fetc%2fpasswd",
    b"/static/%252e%252e/%252e%252e/etc/passwd",
    b"/static/..%252f..%252fetc%252fpasswd",
    b"/static/vendor/../../README.md",
    b"/static/vendor/%2e%2e/%2e%2e/README.md",
    b"/static/vendor/xterm.js/../../../README.md",
    b"/static/..\\..\\etc\\passwd",
    b"/static/%5c..%5c..%5cetc%5cpasswd",
    b"/static/%00",
    b"/static/console.js%00.css",
    b"/static/%2fetc%2fpasswd",
    b"/static//etc/passwd",
    b"/static/%c0%ae%c0%ae/%c0%ae%c0%ae/etc/passwd",
    b"/static/%ff",
    b"/static/../../../../../../../../etc/passwd",
    b"/../../etc/passwd",
    b"/static/../tests/conftest.py",
]


@pytest.mark.parametrize("path", TRAVERSALS)
def test_path_traversal(server, path):
    """Traversal attempts on /static/ get 404 (or 400), never a file from outside."""
    response, _ = http_exchange(server, get_request(path))
    assert status_of(response) in (400, 404), response[:300]
    body = body_of(response)
    for secret in ("/etc/passwd", REPO / "README.md", REPO / "tests" / "conftest.py"):
        with open(secret, "rb") as f:
            assert f.read()[:64] not in body


@pytest.mark.parametrize("path", [b"/static/", b"/static/vendor/", b"/static/.",
                                  b"/static/./"])
def test_no_directory_listing(server, path):
    """Directories under /static/ list nothing."""
    response, _ = http_exchange(server, get_request(path))
    assert status_of(response) in (302, 404), response[:300]
    assert b"console.js" not in body_of(response)
    if status_of(response) == 302:
        location = headers_of(response)[b"location"]
        response, _ = http_exchange(server, get_request(location))
        assert status_of(response) == 404
        assert b"console.js" not in body_of(response)


def test_static_file_still_served(server):
    """The real static files are still served (the checks above are not vacuous)."""
    response, _ = http_exchange(server, get_request(b"/static/console.js"))
    assert status_of(response) == 200
    with open(REPO / "web" / "static" / "console.js", "rb") as f:
        assert body_of(response) == f.read()


def test_no_versions_or_tracebacks(server):
    """Responses name no server software; errors carry no traceback."""
    for path in (b"/", b"/missing", b"/static/%00", b"/sockjs/info"):
        response, _ = http_exchange(server, get_request(path))
        assert b"server" not in headers_of(response), response[:300]
        assert b"Traceback" not in response and b"Twisted" not in response


# -- afterwards -----------------------------------------------------------------

def test_fresh_console_after_everything(server):
    """After all of the above a fresh console from 127.0.0.1 prints 42."""
    console = Witness(server)
    try:
        assert console.answers()
    finally:
        console.close()
