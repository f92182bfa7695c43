"""Console tokens bound to where they were issued, on a real server.

A token is bound to the origin its session shows (whatever the transport)
and to the address that fetched its page; single use survives a restart;
the console page is rate-limited per address; TLS responses carry HSTS; and
``--listen ssl:`` without its files is a usage message. Each test talks to a
real `twistd shellserver` over TLS from its own loopback addresses
(127.0.0.20 and up), with uids 235000-235099.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.parse
import uuid

import pytest
from conftest import GENEROUS_ADMISSION, TWISTD, sandbox_leftovers, start_server, wait_until
from hostile_helpers import (
    RawWebSocket,
    body_of,
    console_token,
    consoles_started,
    get_request,
    headers_of,
    http_exchange,
    status_of,
    tls_connect,
)

UIDS = 235000
ANSI_CONTROL = re.compile(r"\x1b(\[[0-9;?]*[A-Za-z]|[()][A-Z0-9]|[=>])")
REFUSED_ORIGIN = "Console refused: console token was issued for another origin."
REFUSED_NO_ORIGIN = ("Console refused: console token needs the Origin of its page, "
                     "and this connection sent none.")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One real server for the binding tests."""
    srv = start_server(tmp_path_factory.mktemp("binding"), uid_min=UIDS, uid_max=UIDS + 19)
    yield srv
    srv.stop()
    # Sandboxes ending at the stop finish their teardown at idle priority.
    assert wait_until(lambda: sandbox_leftovers(srv) == []), sandbox_leftovers(srv)


class JsonpSession:
    """A SockJS session over jsonp-polling, as raw requests from one address:
    polls carry no Origin (a script tag's), sends carry what the test says."""

    def __init__(self, server, source: str) -> None:
        self.server = server
        self.source = source
        self.path = f"/sockjs/000/{uuid.uuid4().hex}"
        self.frames: list[str] = []

    def poll(self, timeout: float = 30.0) -> str:
        request = get_request(f"{self.path}/jsonp?c=cb".encode(),
                              host=f"127.0.0.1:{self.server.port}".encode())
        response, _ = http_exchange(self.server, request, source=self.source, timeout=timeout)
        assert status_of(response) == 200, response[:300]
        match = re.fullmatch(rb'/\*\*/cb\((".*")\);\r\n', body_of(response), re.DOTALL)
        assert match, response[-300:]
        frame = json.loads(match.group(1))
        self.frames.append(frame)
        return frame

    def send(self, messages: list[str], *, origin: str | None) -> int:
        body = b"d=" + urllib.parse.quote(json.dumps(messages)).encode()
        lines = [f"POST {self.path}/jsonp_send HTTP/1.1", f"Host: 127.0.0.1:{self.server.port}",
                 "Connection: close", "Content-Type: application/x-www-form-urlencoded",
                 f"Content-Length: {len(body)}"]
        if origin is not None:
            lines.append(f"Origin: {origin}")
        raw = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
        response, _ = http_exchange(self.server, raw, source=self.source)
        return status_of(response)

    def until_closed(self, timeout: float = 30.0) -> tuple[list[str], list]:
        """Poll until the close frame (bounded): (messages, [code, reason])."""
        messages = []
        deadline = time.monotonic() + timeout
        while True:
            assert time.monotonic() < deadline, self.frames[-3:]
            frame = self.poll()
            if frame.startswith("a"):
                messages += json.loads(frame[1:])
            elif frame.startswith("c"):
                return messages, json.loads(frame[1:])

    def output_until(self, text: str, timeout: float = 30.0) -> str:
        """Poll until the console's output holds ``text`` (bounded)."""
        output = ""
        deadline = time.monotonic() + timeout
        while text not in output:
            assert time.monotonic() < deadline, (output, self.frames[-3:])
            frame = self.poll()
            assert not frame.startswith("c"), frame
            if frame.startswith("a"):
                output += "".join(m[1:] for m in json.loads(frame[1:]) if m.startswith("o"))
                output = ANSI_CONTROL.sub("", output)
        return output


def test_jsonp_send_from_another_origin_refused(server):
    """A JSONP session opened without Origin, with a token sent from another Origin: 4001."""
    started = consoles_started(server)
    token = console_token(server, source="127.0.0.20")
    session = JsonpSession(server, "127.0.0.20")
    assert session.poll() == "o"
    assert session.send(["a" + token, "r80,24"], origin="https://evil.example") == 200
    assert session.until_closed() == (["e" + REFUSED_ORIGIN], [4001, REFUSED_ORIGIN])
    assert consoles_started(server) == started


def test_jsonp_console_from_its_own_page(server):
    """The same JSONP flow with the page's own Origin on its sends runs a console."""
    token = console_token(server, source="127.0.0.21")
    session = JsonpSession(server, "127.0.0.21")
    assert session.poll() == "o"
    assert session.send(["a" + token, "r80,24"], origin=server.origin) == 200
    session.output_until("In [1]:")
    assert session.send(["iprint(6*7)\r"], origin=server.origin) == 200
    assert "42" in session.output_until("In [2]:")
    assert session.send(["iexit\r"], origin=server.origin) == 200


def test_originless_session_refused(server):
    """A token on a session that never showed an Origin is refused: jsonp and websocket."""
    started = consoles_started(server)
    token = console_token(server, source="127.0.0.22")
    session = JsonpSession(server, "127.0.0.22")
    assert session.poll() == "o"
    assert session.send(["a" + token], origin=None) == 200
    assert session.until_closed() == (["e" + REFUSED_NO_ORIGIN], [4001, REFUSED_NO_ORIGIN])
    with RawWebSocket(server, source="127.0.0.22", origin=None) as ws:
        ws.send_text("a" + token)
        messages = ws.messages_until_close(timeout=10)
    assert ws.closed == (4001, REFUSED_NO_ORIGIN), (ws.closed, messages)
    assert consoles_started(server) == started


def test_token_from_another_address_refused(server):
    """A token presented from another address than the one that fetched it: 4001,
    and it is not used up for its own address."""
    token = console_token(server, source="127.0.0.23")
    with RawWebSocket(server, source="127.0.0.24") as ws:
        ws.send_text("a" + token)
        ws.messages_until_close(timeout=10)
    assert ws.closed == (4001, "Console refused: console token was issued to another address.")
    with RawWebSocket(server, source="127.0.0.23") as ws:
        ws.send_text("a" + token)
        ws.send_text("r80,24")
        assert ws.recv_frame(timeout=20)[1] == b"sstarting"


def test_hsts_on_tls(server):
    """TLS responses carry Strict-Transport-Security; localhost names do not."""
    response, _ = http_exchange(server, get_request(b"/", host=b"127.0.0.1"))
    assert headers_of(response)[b"strict-transport-security"] == b"max-age=31536000"
    response, _ = http_exchange(server, get_request(b"/", host=b"localhost"))
    assert status_of(response) == 200
    assert b"strict-transport-security" not in headers_of(response)


def test_used_token_refused_after_restart(tmp_path):
    """A token used before SIGTERM is refused as already used by the restarted server."""
    uids = dict(uid_min=UIDS + 20, uid_max=UIDS + 29)
    first = start_server(tmp_path, console="token_ttl = 300\n", **uids)
    try:
        token = console_token(first)
        with RawWebSocket(first) as ws:
            ws.send_text("a" + token)
            ws.send_text("r80,24")
            assert ws.recv_frame(timeout=20)[1] == b"sstarting"
    finally:
        first.stop()
    restarted = start_server(tmp_path, console="token_ttl = 300\n", **uids)
    try:
        # It listens on another port: the page's origin is the first one's.
        with RawWebSocket(restarted, origin=first.origin) as ws:
            ws.send_text("a" + token)
            ws.messages_until_close(timeout=10)
        assert ws.closed == (4001, "Console refused: console token was already used.")
        assert consoles_started(restarted) == 0
    finally:
        restarted.stop()
    assert wait_until(lambda: sandbox_leftovers(restarted) == []), sandbox_leftovers(restarted)


def read_response(sock, deadline: float) -> bytes:
    """One keep-alive HTTP response with a Content-Length (bounded in time)."""
    data = b""
    while b"\r\n\r\n" not in data:
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    length = int(headers_of(data)[b"content-length"])
    head = data.index(b"\r\n\r\n") + 4
    while len(data) < head + length:
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    assert len(data) == head + length, "one response at a time"
    return data


def test_console_page_rate_limited(tmp_path):
    """Past pages_per_address_per_minute, /console/ is a 429 with Retry-After, no token,
    and a flood of them adds a log line per address, not per request."""
    server = start_server(tmp_path, uid_min=UIDS + 30, uid_max=UIDS + 39,
                          admission=GENEROUS_ADMISSION.replace(
                              "pages_per_address_per_minute = 0",
                              "pages_per_address_per_minute = 5"))
    try:
        page = get_request(b"/console/", host=f"127.0.0.1:{server.port}".encode())
        for _ in range(5):
            response, _ = http_exchange(server, page, source="127.0.0.30")
            assert status_of(response) == 200
        response, _ = http_exchange(server, page, source="127.0.0.30")
        assert status_of(response) == 429, response[:300]
        assert 1 <= int(headers_of(response)[b"retry-after"]) <= 60
        assert b"Try again in" in body_of(response)
        assert b"shellserver-token" not in response
        log_lines = server.log().count("\n")
        keep_alive = page.replace(b"Connection: close", b"Connection: keep-alive")
        deadline = time.monotonic() + 30
        for source in ("127.0.0.30", "127.0.0.31", "127.0.0.32", "127.0.0.33"):
            with tls_connect(server, source=source) as sock:
                statuses = []
                for _ in range(200):
                    sock.sendall(keep_alive)
                    statuses.append(status_of(read_response(sock, deadline)))
                assert statuses.count(200) == (0 if source == "127.0.0.30" else 5)
                assert statuses.count(429) == len(statuses) - statuses.count(200)
        # 15 pages served (an access line and a user line each), one refusal
        # notice per address; not one line per refused request.
        assert server.log().count("\n") - log_lines <= 15 * 2 + 4 + 2, server.log()[-3000:]
    finally:
        server.stop()


def test_listen_ssl_without_key_files(tmp_path):
    """--listen ssl: naming a missing key file ends with a usage message, no traceback."""
    missing = tmp_path / "no-such-key.pem"
    result = subprocess.run(
        [TWISTD, "--nodaemon", "--pidfile=", "shellserver",
         "--listen", f"ssl:0:privateKey={missing}:certKey={missing}"],
        cwd=str(tmp_path), capture_output=True, text=True, timeout=60,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert f"cannot read {missing}" in output, output
    assert "privateKey=KEY.pem and certKey=CERT.pem" in output, output
    assert "Traceback" not in output, output
