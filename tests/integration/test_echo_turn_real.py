"""
A websocket frame leaves in the reactor turn that produced it: the SockJS
resource behind the production site and connection guard, on a real TCP
connection adopted by the real (epoll) reactor in this process, turned one
iteration at a time. No sandbox, no sleeps: the client's socket is checked
between turns.
"""

from __future__ import annotations

import json
import os
import socket
import struct

import pytest
from twisted.internet import reactor
from twisted.web.resource import Resource

from shellserver.limits import ConnectionGuard, ConnectionLimits
from shellserver.sockjs import SockJSConnection, SockJSResource
from shellserver.web import ShellSite

pytestmark = pytest.mark.integration

TURNS = 200  # iterations any step may take, at most
TURN_SECONDS = 0.05


class Echo:
    """Sends each message back at once, as a console sends a keystroke's echo."""

    def __init__(self, connection: SockJSConnection) -> None:
        self.connection = connection
        self.messages: list[str] = []
        self.ended = False

    def message_received(self, text: str) -> None:
        self.messages.append(text)
        self.connection.send(text)

    def closed(self) -> None:
        self.ended = True


def turn_until(predicate) -> bool:
    """Turn the reactor, one iteration at a time, until ``predicate`` holds (bounded)."""
    for _ in range(TURNS):
        if predicate():
            return True
        reactor.iterate(TURN_SECONDS)
    return bool(predicate())


def masked_text_frame(payload: bytes) -> bytes:
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    assert len(payload) < 126
    return struct.pack("!BB", 0x81, 0x80 | len(payload)) + mask + masked


def text_frames(data: bytes) -> list[bytes]:
    """The payloads of unmasked, unfragmented server frames shorter than 126 bytes."""
    frames = []
    while len(data) >= 2:
        length = data[1] & 0x7F
        assert length < 126, data
        frames.append(data[2:2 + length])
        data = data[2 + length:]
    return frames


def received_now(client: socket.socket) -> bytes:
    """What the client's socket holds at this moment (no waiting)."""
    try:
        return client.recv(65536, socket.MSG_DONTWAIT)
    except BlockingIOError:
        return b""


@pytest.fixture
def connection():
    """A websocket session to the SockJS resource, over real TCP on 127.0.0.1."""
    handlers: list[Echo] = []

    def open_session(connection: SockJSConnection) -> Echo:
        handlers.append(Echo(connection))
        return handlers[-1]

    root = Resource()
    root.putChild(b"sockjs", SockJSResource(open_session, clock=reactor))
    guard = ConnectionGuard(ShellSite(root, reactor=reactor), ConnectionLimits(), reactor)
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname(), timeout=5)
    accepted, _ = listener.accept()
    listener.close()
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    client.settimeout(None)  # blocking: MSG_DONTWAIT reads then never wait
    transport = reactor.adoptStreamConnection(accepted.fileno(), socket.AF_INET, guard)
    accepted.close()  # the reactor holds its own duplicate
    try:
        client.sendall(
            b"GET /sockjs/000/s1/websocket HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            b"Origin: http://127.0.0.1\r\n\r\n")
        answer = bytearray()
        assert turn_until(lambda: answer.extend(received_now(client)) or b'\x81\x01o' in answer)
        assert answer.startswith(b"HTTP/1.1 101"), bytes(answer)
        yield client, handlers[0]
    finally:
        client.close()
        turn_until(lambda: handlers and handlers[0].ended)
        del transport


def test_echo_leaves_in_the_turn_that_read_the_keystroke(connection) -> None:
    """An echo sent while its keystroke is handled is in the client socket before the next turn."""
    client, echo = connection
    for key in "abc":
        client.sendall(masked_text_frame(json.dumps(["i" + key]).encode()))
        count = len(echo.messages)
        # the turn that reads the keystroke hands it over, and the echo is sent
        assert turn_until(lambda: len(echo.messages) > count)  # noqa: B023
        assert text_frames(received_now(client)) == [f'a["i{key}"]'.encode()], (
            "the echo waited for the reactor's next turn")


def test_burst_keeps_order(connection) -> None:
    """Messages sent one after another in one turn arrive whole and in order."""
    client, echo = connection
    sent = [f"m{n}" for n in range(3)] + ["x" * 100]
    for text in sent:
        echo.connection.send(text)
    expected = [f'a["{text}"]'.encode() for text in sent]
    got = bytearray()
    assert turn_until(lambda: got.extend(received_now(client)) or len(text_frames(bytes(got))) >= 4)
    assert text_frames(bytes(got)) == expected
