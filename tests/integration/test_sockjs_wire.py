"""
The SockJS server on real sockets: the echo app (sockjs_echo_app.py) as a
subprocess on 127.0.0.1, driven with websocket-client and http.client.
"""

from __future__ import annotations

import http.client
import json
import re
import select
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import websocket

pytestmark = pytest.mark.integration

APP = Path(__file__).resolve().parent / "sockjs_echo_app.py"
TIMEOUT = 5.0


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    """
    Start the echo app on a free port; stop it whatever happens.
    """
    process = subprocess.Popen(
        [sys.executable, str(APP), "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        ready, _, _ = select.select([process.stdout], [], [], 15)
        line = process.stdout.readline() if ready else ""
        assert line.startswith("listening "), f"echo app did not start: {line!r}"
        yield int(line.split()[1])
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def session_url(prefix: str = "/echo") -> str:
    return f"{prefix}/000/{uuid.uuid4()}"


def request(
    port: int, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> tuple[http.client.HTTPResponse, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response, response.read()
    finally:
        connection.close()


def open_stream(
    port: int, path: str
) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    connection.request("POST", path, body=b"")
    return connection, connection.getresponse()


def read_line(response: http.client.HTTPResponse) -> bytes:
    return response.readline()


def test_info(port: int) -> None:
    """info answers JSON with the websocket flag and fresh entropy."""
    response, body = request(port, "GET", "/echo/info", headers={"Origin": "http://a"})
    assert response.status == 200
    assert response.getheader("Access-Control-Allow-Origin") == "http://a"
    info = json.loads(body)
    assert info["websocket"] is True and info["origins"] == ["*:*"]
    _, body = request(port, "GET", "/disabled_websocket_echo/info")
    assert json.loads(body)["websocket"] is False


def test_framed_websocket_echo(port: int) -> None:
    """The framed websocket opens with "o" and echoes messages as a-frames."""
    ws = websocket.create_connection(
        f"ws://127.0.0.1:{port}{session_url()}/websocket", timeout=TIMEOUT
    )
    try:
        assert ws.recv() == "o"
        ws.send('["a","\\u2028"]')
        assert ws.recv() == 'a["a"]'
        assert ws.recv() == 'a["\\u2028"]'
        ws.send('"single"')
        assert ws.recv() == 'a["single"]'
    finally:
        ws.close()


def test_framed_websocket_every_character(port: int) -> None:
    """Every ASCII character, alone and beside non-ASCII text, comes back intact in a-frames."""
    ws = websocket.create_connection(
        f"ws://127.0.0.1:{port}{session_url()}/websocket", timeout=TIMEOUT
    )
    try:
        assert ws.recv() == "o"
        ascii_text = "".join(chr(code) for code in range(128))
        texts = [ascii_text, ascii_text + "é\u2028😀", "\x1b[1;32mIn [1]:\x1b[0m \r\n"]
        ws.send(json.dumps(texts))
        received = [json.loads(ws.recv()[1:]) for _ in texts]
        assert received == [[text] for text in texts]
    finally:
        ws.close()


def test_framed_websocket_close(port: int) -> None:
    """The close service sends "o", the 3000 close frame, and closes cleanly."""
    ws = websocket.create_connection(
        f"ws://127.0.0.1:{port}{session_url('/close')}/websocket", timeout=TIMEOUT
    )
    try:
        assert ws.recv() == "o"
        assert ws.recv() == 'c[3000,"Go away!"]'
        opcode, frame = ws.recv_data_frame(control_frame=True)
        assert opcode == websocket.ABNF.OPCODE_CLOSE
        assert frame.data[:2] == (3000).to_bytes(2, "big")
        # after the closing handshake the server ends TCP in order (no reset)
        with pytest.raises(websocket.WebSocketConnectionClosedException):
            ws.recv()
    finally:
        ws.close()


def test_framed_websocket_broken_json(port: int) -> None:
    """Broken JSON from the client ends the websocket."""
    ws = websocket.create_connection(
        f"ws://127.0.0.1:{port}{session_url()}/websocket", timeout=TIMEOUT
    )
    try:
        assert ws.recv() == "o"
        ws.send('["a')
        opcode, frame = ws.recv_data_frame(control_frame=True)
        assert opcode == websocket.ABNF.OPCODE_CLOSE
        assert frame.data == (3000).to_bytes(2, "big") + b"Broken framing."
    finally:
        ws.close()


def test_framed_websocket_too_big(port: int) -> None:
    """A message over 64 KiB closes the session with 1009."""
    ws = websocket.create_connection(
        f"ws://127.0.0.1:{port}{session_url()}/websocket", timeout=TIMEOUT
    )
    try:
        assert ws.recv() == "o"
        ws.send('["' + "x" * 70000 + '"]')
        assert ws.recv() == 'c[1009,"Message too big"]'
    finally:
        ws.close()


def test_raw_websocket(port: int) -> None:
    """The raw websocket echoes text messages as they are."""
    ws = websocket.create_connection(f"ws://127.0.0.1:{port}/echo/websocket", timeout=TIMEOUT)
    try:
        ws.send("Hello world!\uffff")
        assert ws.recv() == "Hello world!\uffff"
    finally:
        ws.close()


def test_raw_websocket_close(port: int) -> None:
    """The close service closes the raw websocket with 3000 "Go away!"."""
    ws = websocket.create_connection(f"ws://127.0.0.1:{port}/close/websocket", timeout=TIMEOUT)
    try:
        opcode, frame = ws.recv_data_frame(control_frame=True)
        assert opcode == websocket.ABNF.OPCODE_CLOSE
        assert frame.data == (3000).to_bytes(2, "big") + b"Go away!"
    finally:
        ws.close()


def test_disabled_websocket(port: int) -> None:
    """With websockets off the upgrade is refused."""
    with pytest.raises(websocket.WebSocketBadStatusException):
        websocket.create_connection(
            f"ws://127.0.0.1:{port}{session_url('/disabled_websocket_echo')}/websocket",
            timeout=TIMEOUT,
        )


def test_xhr_polling_and_send(port: int) -> None:
    """xhr opens with "o", xhr_send answers 204, the next poll echoes."""
    url = session_url()
    response, body = request(port, "POST", url + "/xhr")
    assert (response.status, body) == (200, b"o\n")
    response, body = request(port, "POST", url + "/xhr_send", b'["x","y"]')
    assert (response.status, body) == (204, b"")
    response, body = request(port, "POST", url + "/xhr")
    assert body == b'a["x","y"]\n'
    response, body = request(port, "POST", url + "/xhr_send", b'["x')
    assert (response.status, body) == (500, b"Broken JSON encoding.")
    response, _ = request(port, "POST", session_url() + "/xhr_send", b'["x"]')
    assert response.status == 404


def test_xhr_polling_close(port: int) -> None:
    """The close service answers polls with "o", then the close frame."""
    url = session_url("/close")
    assert request(port, "POST", url + "/xhr")[1] == b"o\n"
    for _ in range(2):
        assert request(port, "POST", url + "/xhr")[1] == b'c[3000,"Go away!"]\n'


def test_xhr_streaming(port: int) -> None:
    """xhr_streaming sends the prelude, "o", then echoes as they come."""
    url = session_url()
    connection, response = open_stream(port, url + "/xhr_streaming")
    try:
        assert response.status == 200
        assert read_line(response) == b"h" * 2048 + b"\n"
        assert read_line(response) == b"o\n"
        sent, _ = request(port, "POST", url + "/xhr_send", b'["x"]')
        assert sent.status == 204
        assert read_line(response) == b'a["x"]\n'
    finally:
        connection.close()


def test_xhr_streaming_response_limit(port: int) -> None:
    """The stream ends once 4096 bytes of frames went out (test app limit)."""
    url = session_url()
    connection, response = open_stream(port, url + "/xhr_streaming")
    try:
        read_line(response)
        assert read_line(response) == b"o\n"
        message = '"' + "x" * 128 + '"'
        for _ in range(31):
            request(port, "POST", url + "/xhr_send", f"[{message}]".encode())
            assert read_line(response) == f"a[{message}]\n".encode()
        assert response.read() == b""
    finally:
        connection.close()


def test_xhr_streaming_second_receiver(port: int) -> None:
    """A second stream on a session gets 2010; aborting the first gets 1002."""
    url = session_url()
    first, first_response = open_stream(port, url + "/xhr_streaming")
    try:
        read_line(first_response)
        assert read_line(first_response) == b"o\n"
        second, second_response = open_stream(port, url + "/xhr_streaming")
        try:
            read_line(second_response)
            assert read_line(second_response) == b'c[2010,"Another connection still open"]\n'
            assert second_response.read() == b""
        finally:
            second.close()
    finally:
        first.close()
    deadline = time.monotonic() + TIMEOUT
    body = b""
    while time.monotonic() < deadline:
        body = request(port, "POST", url + "/xhr")[1]
        if body != b'c[2010,"Another connection still open"]\n':
            break
        time.sleep(0.05)
    assert body in (b"o\n", b'c[1002,"Connection interrupted"]\n')


def test_cookie_needed(port: int) -> None:
    """cookie_needed_echo sets JSESSIONID on session transports."""
    response, _ = request(port, "POST", session_url("/cookie_needed_echo") + "/xhr")
    assert response.getheader("Set-Cookie") == "JSESSIONID=dummy; Path=/"


def test_eventsource(port: int) -> None:
    """eventsource streams a new line, then one "data:" event per frame."""
    url = session_url()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        connection.request("GET", url + "/eventsource")
        response = connection.getresponse()
        assert response.status == 200
        assert response.getheader("Content-Type") == "text/event-stream"
        assert read_line(response) == b"\r\n"
        assert read_line(response) + read_line(response) == b"data: o\r\n\r\n"
        request(port, "POST", url + "/xhr_send", b'["x"]')
        assert read_line(response) + read_line(response) == b'data: a["x"]\r\n\r\n'
    finally:
        connection.close()


def test_htmlfile(port: int) -> None:
    """htmlfile sends the page binding the callback, then script blocks."""
    url = session_url()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        connection.request("GET", url + "/htmlfile?c=_jp.abc")
        response = connection.getresponse()
        assert response.status == 200
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            head += read_line(response)
        assert b"var c = parent._jp.abc;" in head and len(head) > 1024
        assert read_line(response) == b"<script>\n"
        assert read_line(response) == b'p("o");\n'
        assert read_line(response) == b"</script>\r\n"
        request(port, "POST", url + "/xhr_send", b'["</script>"]')
        assert read_line(response) == b"<script>\n"
        assert read_line(response) == b'p("a[\\"\\u003c/script\\u003e\\"]");\n'
    finally:
        connection.close()


def test_jsonp(port: int) -> None:
    """jsonp polls with callback calls; jsonp_send takes the form's d field."""
    url = session_url()
    response, body = request(port, "GET", url + "/jsonp?c=cb")
    assert (response.status, body) == (200, b'/**/cb("o");\r\n')
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    response, body = request(port, "POST", url + "/jsonp_send", b"d=%5B%22x%22%5D", form)
    assert (response.status, body) == (200, b"ok")
    assert request(port, "GET", url + "/jsonp?c=cb")[1] == b'/**/cb("a[\\"x\\"]");\r\n'
    response, body = request(port, "GET", url + "/jsonp?c=alert(1)")
    assert (response.status, body) == (500, b'invalid "callback" parameter')


def request_from(
    source: str, port: int, method: str, path: str, body: bytes = b""
) -> tuple[http.client.HTTPResponse, bytes]:
    connection = http.client.HTTPConnection(
        "127.0.0.1", port, timeout=TIMEOUT, source_address=(source, 0)
    )
    try:
        connection.request(method, path, body=body)
        response = connection.getresponse()
        return response, response.read()
    finally:
        connection.close()


def test_session_readable_only_from_its_address(port: int) -> None:
    """
    A session opened from 127.0.0.1 answers another address (127.0.0.2)
    404 on every transport, receiving and sending, and keeps its output
    for its owner.
    """
    url = session_url()
    assert request(port, "POST", url + "/xhr")[1] == b"o\n"
    request(port, "POST", url + "/xhr_send", b'["secret"]')
    for method, name in [
        ("POST", "xhr"),
        ("POST", "xhr_streaming"),
        ("GET", "eventsource"),
        ("GET", "htmlfile?c=cb"),
        ("GET", "jsonp?c=cb"),
        ("POST", "xhr_send"),
        ("POST", "jsonp_send"),
    ]:
        response, body = request_from("127.0.0.2", port, method, f"{url}/{name}", b'["x"]')
        assert response.status == 404, name
        assert b"secret" not in body
    assert request(port, "POST", url + "/xhr")[1] == b'a["secret"]\n'


ANSI_CONTROL = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class PollingConsole:
    """
    One console of the real server over xhr polling (TLS), from a chosen
    client address.
    """

    def __init__(self, server, url: str) -> None:
        self.server = server
        self.url = url
        self.output = ""
        self.closed_with = ""

    def post(self, name: str, body: bytes = b"", source: str = "127.0.0.1") -> tuple[int, bytes]:
        connection = http.client.HTTPSConnection(
            "127.0.0.1",
            self.server.port,
            timeout=30,
            context=self.server.ssl_context(),
            source_address=(source, 0),
        )
        try:
            # As a browser's xhr does: the token is bound to the page's origin.
            connection.request("POST", f"{self.url}/{name}", body=body,
                               headers={"Origin": self.server.origin})
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def send(self, *messages: str) -> None:
        assert self.post("xhr_send", json.dumps(messages).encode())[0] == 204

    def poll(self) -> None:
        status, body = self.post("xhr")
        assert status == 200
        if body.startswith(b"a"):
            for message in json.loads(body[1:]):
                if message.startswith("o"):
                    # the text without colours and cursor movements
                    self.output += ANSI_CONTROL.sub("", message[1:])
        elif body.startswith(b"c"):
            self.closed_with = body.decode()

    def poll_until(self, text: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output and not self.closed_with:
            assert time.monotonic() < deadline, self.output
            self.poll()
        assert text in self.output, (self.output, self.closed_with)

    def poll_until_closed(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.closed_with:
            assert time.monotonic() < deadline, self.output
            self.poll()


def test_console_output_only_for_its_address(server) -> None:
    """
    After authentication, a console's output and input are out of reach of
    another address that knows the session id: both are 404 there, and the
    owner still gets all of the output.
    """
    from console_client import fetch_token

    console = PollingConsole(server, f"/sockjs/000/{uuid.uuid4()}")
    assert console.post("xhr") == (200, b"o\n")
    console.send("a" + fetch_token(server), "r80,24")
    console.poll_until("In [1]:")
    console.send("iprint('SE' + 'CRET')\r")
    for name, body in [("xhr", b""), ("xhr_send", b'["iprint(1)\\r"]')]:
        status, answer = console.post(name, body, source="127.0.0.2")
        assert status == 404, name
        assert b"SECRET" not in answer
    console.poll_until("In [2]:")
    assert "\nSECRET" in console.output.replace("\r", "")
    console.send("iexit\r")
    console.poll_until_closed()
    assert console.closed_with.startswith("c[3000,"), console.closed_with
