"""A console client for integration tests: the real wire, and a pyte screen.

It loads /console/ like a browser (taking the token from the page), opens the
raw SockJS websocket over TLS (or SockJS's xhr-streaming), speaks
docs/protocol.md, and feeds output to a pyte screen so tests can assert on
what a user would see. Like the page, it can lose its connection
(``cut``) and reattach (``reconnect``) with the secret and its output count.
"""

from __future__ import annotations

import http.client
import json
import queue
import re
import socket
import ssl
import threading
import time
import uuid

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


def utf16_units(text: str) -> int:
    """The length of ``text`` as the page (JavaScript) counts it."""
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class StreamingWire:
    """One SockJS session over xhr-streaming (receiving) and xhr_send (sending),
    over TLS, through ``port`` (the server's, or a proxy's in front of it)."""

    def __init__(self, server, *, origin: str, port: int) -> None:
        self.server, self.origin, self.port = server, origin, port
        self.url = f"/sockjs/000/{uuid.uuid4()}"
        self.received: queue.Queue = queue.Queue()
        self._socket = None
        self._cut = False
        # cut() and the reader's next request (a response ends at the
        # response limit, mid-flood often) must not cross: a request sent
        # just after a cut would keep the session's receiver alive.
        self._lock = threading.Lock()
        self._opened = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _connection(self) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection("127.0.0.1", self.port, timeout=30,
                                           context=self.server.ssl_context())

    def _read(self) -> None:
        try:
            while not self._cut:
                # A response ends at the response limit; the next one goes on.
                connection = self._connection()
                connection.request("POST", self.url + "/xhr_streaming",
                                   headers={"Origin": self.origin})
                with self._lock:
                    self._socket = connection.sock
                    cut = self._cut
                if cut:
                    _shut(connection.sock)
                    break
                response = connection.getresponse()
                if response.status != 200:
                    self.received.put(("lost", f"xhr_streaming answered {response.status}"))
                    return
                while line := response.readline():
                    frame = line.rstrip(b"\n").decode()
                    if frame == "o":
                        self._opened.set()
                    elif frame.startswith("a"):
                        for message in json.loads(frame[1:]):
                            self.received.put(("message", message))
                    elif frame.startswith("c"):
                        code, reason = json.loads(frame[1:])
                        self.received.put(("closed", code, reason))
                        return
                connection.close()
        except (OSError, http.client.HTTPException, ValueError) as e:
            self.received.put(("lost", str(e)))
            return
        self.received.put(("lost", "cut"))

    def send(self, message: str) -> None:
        # The session exists once the stream has opened it.
        if not self._opened.wait(timeout=10):
            raise OSError("the xhr_streaming session did not open")
        connection = self._connection()
        try:
            connection.request("POST", self.url + "/xhr_send",
                               body=json.dumps([message]).encode(),
                               headers={"Origin": self.origin})
            response = connection.getresponse()
            response.read()
        finally:
            connection.close()
        if response.status != 204:
            raise OSError(f"xhr_send answered {response.status}")

    def recv(self, timeout: float):
        try:
            return self.received.get(timeout=timeout)
        except queue.Empty:
            return ("timeout",)

    def cut(self) -> None:
        """Drop the TCP connection under the stream, as a network change does
        (and make no new one)."""
        with self._lock:
            self._cut = True
            sock = self._socket
        if sock is not None:
            _shut(sock)

    def close(self) -> None:
        self.cut()


class WebSocketWire:
    """One raw SockJS websocket over TLS, through ``port``."""

    def __init__(self, server, *, origin: str, port: int, sock=None,
                 headers: list[str] | None = None) -> None:
        if sock is None and port != server.port:
            raw = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock = server.ssl_context().wrap_socket(raw, server_hostname="127.0.0.1")
        self.ws = websocket.create_connection(
            f"wss://127.0.0.1:{server.port}/sockjs/websocket",
            sslopt={"cert_reqs": ssl.CERT_REQUIRED, "ca_certs": server.cert},
            origin=origin,
            timeout=10,
            socket=sock,
            header=headers or [],
        )

    def send(self, message: str) -> None:
        self.ws.send(message)

    def recv(self, timeout: float):
        self.ws.settimeout(timeout)
        try:
            opcode, frame = self.ws.recv_data_frame(control_frame=True)
        except websocket.WebSocketTimeoutException:
            return ("timeout",)
        except (websocket.WebSocketConnectionClosedException, OSError) as e:
            return ("lost", str(e))
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            data = frame.data
            code = int.from_bytes(data[:2], "big") if len(data) >= 2 else None
            return ("closed", code, data[2:].decode(errors="replace"))
        if opcode in (websocket.ABNF.OPCODE_TEXT, websocket.ABNF.OPCODE_BINARY):
            return ("message", frame.data.decode() if isinstance(frame.data, bytes)
                    else frame.data)
        return ("timeout",)  # a ping or pong: nothing for the console

    def cut(self) -> None:
        """Drop the TCP connection under the websocket, without a close frame."""
        try:
            self.ws.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.ws.sock.close()

    def close(self) -> None:
        try:
            self.ws.close()
        except Exception:
            pass


class ConsoleClient:
    def __init__(self, server, *, cols: int = 100, rows: int = 30,
                 origin: str | None = None, sock=None, source: str | None = None,
                 headers: list[str] | None = None, transport: str = "websocket",
                 port: int | None = None, acknowledge: bool = False) -> None:
        """``sock``: a connected TLS socket to use (it may have sent
        something first); ``source``: the local address to connect from;
        ``headers``: extra handshake headers; ``transport``: "websocket" or
        "xhr_streaming"; ``port``: where to connect (a proxy in front of the
        server); ``acknowledge``: send ``k`` as the page does (every 32768 units)."""
        self.server = server
        self.screen = pyte.Screen(cols, rows)
        self.stream = pyte.Stream(self.screen)
        self.messages: list[str] = []
        self.raw_output: list[str] = []
        self.closed = False
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self.origin = origin or server.origin
        self.transport = transport
        self.port = port or server.port
        self.acknowledge = acknowledge
        # What the page keeps: the secret, and how much output it has written.
        self.secret: str | None = None
        self.grace: int | None = None
        self.written = 0
        self._acked = 0
        if sock is None and source is not None:
            raw = socket.create_connection(("127.0.0.1", server.port), timeout=10,
                                           source_address=(source, 0))
            sock = server.ssl_context().wrap_socket(raw, server_hostname="127.0.0.1")
        self.wire = self._connect(sock, headers)
        self.size = (cols, rows)

    def _connect(self, sock=None, headers=None):
        if self.transport == "xhr_streaming":
            return StreamingWire(self.server, origin=self.origin, port=self.port)
        wire = WebSocketWire(self.server, origin=self.origin, port=self.port, sock=sock,
                             headers=headers)
        self.ws = wire.ws
        return wire

    def send(self, message: str) -> None:
        self.wire.send(message)

    def cut(self) -> None:
        """Lose the connection under the client (no close handshake)."""
        self.wire.cut()
        self.closed = True

    def reconnect(self, *, secret: str | None = None, count: int | None = None,
                  origin: str | None = None) -> None:
        """A new connection that reattaches (``A``) with the secret last received
        and the output written so far (or the ones given)."""
        if origin is not None:
            self.origin = origin
        self.wire = self._connect()
        self.closed = False
        self.close_code = self.close_reason = None
        self.send(f"A{secret or self.secret},{self.written if count is None else count}")
        self._acked = self.written if count is None else count

    def login(self, token: str | None = None) -> None:
        self.send("a" + (token if token is not None else fetch_token(self.server)))
        self.send(f"r{self.size[0]},{self.size[1]}")

    def type(self, text: str) -> None:
        self.send("i" + text)

    def pump(self, timeout: float) -> bool:
        """Read one message within ``timeout``; False when closed or none."""
        if self.closed:
            return False
        event = self.wire.recv(timeout)
        if event[0] == "timeout":
            return False
        if event[0] in ("closed", "lost"):
            self.closed = True
            if event[0] == "closed":
                self.close_code, self.close_reason = event[1], event[2]
            return False
        message = event[1]
        self.messages.append(message)
        if message.startswith("o"):
            self.raw_output.append(message[1:])
            self.stream.feed(message[1:])
            self.written += utf16_units(message[1:])
            if self.acknowledge and self.written - self._acked >= 32768:
                self._acked = self.written
                self.send(f"k{self.written}")
        elif message.startswith("t"):
            grace, self.secret = message[1:].split(",")
            self.grace = int(grace)
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

    def has_started(self) -> bool:
        """Whether the server said the console started (ready or resumed)."""
        return any(m in ("sready", "sresumed") for m in self.messages)

    def close(self) -> None:
        """Close the console as the page's close button does: ``q`` ends it at
        once (a lost connection would leave it waiting for a reattach)."""
        if not self.closed and self.has_started():
            try:
                self.send("q")
            except Exception:
                pass
        self.wire.close()
        self.closed = True
