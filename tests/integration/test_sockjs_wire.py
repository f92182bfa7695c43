"""
The SockJS server on real sockets: the echo app (sockjs_echo_app.py) as a
subprocess on 127.0.0.1, driven with websocket-client and http.client.
"""

from __future__ import annotations

import http.client
import json
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
