"""A console client for integration tests: the real wire, and a pyte screen.

It loads /console/ like a browser (taking the token from the page), opens the
raw SockJS websocket over TLS, speaks docs/protocol.md, and feeds output to a
pyte screen so tests can assert on what a user would see.
"""

from __future__ import annotations

import http.client
import re
import socket
import ssl
import time

import pyte
import websocket

TOKEN = re.compile(r'<meta name="shellserver-token" content="([^"]*)"')


def fetch_token(server, source: str | None = None) -> str:
    """A token from the console page, fetched from ``source`` (default
    127.0.0.1): the token is bound to that address."""
    if source is None:
        page = server.get("/console/").read().decode()
    else:
        connection = http.client.HTTPSConnection(
            "127.0.0.1", server.port, timeout=10, context=server.ssl_context(),
            source_address=(source, 0))
        try:
            connection.request("GET", "/console/")
            page = connection.getresponse().read().decode()
        finally:
            connection.close()
    match = TOKEN.search(page)
    assert match, "the console page carries no token"
    return match.group(1)


class ConsoleClient:
    def __init__(self, server, *, cols: int = 100, rows: int = 30,
                 origin: str | None = None, sock=None, source: str | None = None,
                 headers: list[str] | None = None) -> None:
        """``sock``: a connected TLS socket to use (it may have sent
        something first); ``source``: the local address to connect from;
        ``headers``: extra handshake headers."""
        self.server = server
        self.screen = pyte.Screen(cols, rows)
        self.stream = pyte.Stream(self.screen)
        self.messages: list[str] = []
        self.raw_output: list[str] = []
        self.closed = False
        if sock is None and source is not None:
            raw = socket.create_connection(("127.0.0.1", server.port), timeout=10,
                                           source_address=(source, 0))
            sock = server.ssl_context().wrap_socket(raw, server_hostname="127.0.0.1")
        self.ws = websocket.create_connection(
            f"wss://127.0.0.1:{server.port}/sockjs/websocket",
            sslopt={"cert_reqs": ssl.CERT_REQUIRED, "ca_certs": server.cert},
            origin=origin or server.origin,
            timeout=10,
            socket=sock,
            header=headers or [],
        )
        self.size = (cols, rows)

    def send(self, message: str) -> None:
        self.ws.send(message)

    def login(self, token: str | None = None) -> None:
        self.send("a" + (token if token is not None else fetch_token(self.server)))
        self.send(f"r{self.size[0]},{self.size[1]}")

    def type(self, text: str) -> None:
        self.send("i" + text)

    def pump(self, timeout: float) -> bool:
        """Read one message within ``timeout``; False when closed or none."""
        if self.closed:
            return False
        self.ws.settimeout(timeout)
        try:
            message = self.ws.recv()
        except websocket.WebSocketTimeoutException:
            return False
        except (websocket.WebSocketConnectionClosedException, OSError):
            self.closed = True
            return False
        if message == "" or message is None:
            self.closed = True
            return False
        self.messages.append(message)
        if message.startswith("o"):
            self.raw_output.append(message[1:])
            self.stream.feed(message[1:])
        return True

    def display(self) -> str:
        return "\n".join(line.rstrip() for line in self.screen.display)

    def wait_for(self, predicate, timeout: float = 15.0) -> bool:
        deadline = time.monotonic() + timeout
        while not predicate(self):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.closed:
                return predicate(self)
            self.pump(min(remaining, 0.5))
        return True

    def wait_for_screen(self, text: str, timeout: float = 15.0) -> bool:
        return self.wait_for(lambda c: text in c.display(), timeout)

    def wait_for_prompt(self, number: int, timeout: float = 15.0) -> bool:
        return self.wait_for_screen(f"In [{number}]:", timeout)

    def wait_closed(self, timeout: float = 15.0) -> bool:
        return self.wait_for(lambda c: c.closed, timeout)

    def run(self, line: str, prompt_after: int, timeout: float = 15.0) -> str:
        """Type a line and Enter; wait for the next prompt; return the screen."""
        self.type(line + "\r")
        assert self.wait_for_prompt(prompt_after, timeout), self.display()
        return self.display()

    def last_message(self, kind: str) -> str | None:
        for message in reversed(self.messages):
            if message.startswith(kind):
                return message[1:]
        return None

    def close(self) -> None:
        try:
            self.ws.close()
        except Exception:
            pass
        self.closed = True
