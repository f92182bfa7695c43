"""Console transports for the benchmark: the server's wire, and a raw PTY.

Both are `Terminal`s: "send keys" and "output arrives" with a timestamp, so
the measurement code in scenarios.py is the same for the server and for the
baseline (the same IPython command read straight from a local PTY).

`WireConsole` speaks docs/protocol.md over the raw SockJS websocket with a
minimal RFC 6455 client on asyncio (a Protocol, no streams, no per-message
copies beyond the decode), so that the client is not the bottleneck.
`PtyConsole` runs the console runtime's IPython, with the argv and env of
shellserver.sandbox.spec but no sandbox, on a local PTY.
"""

from __future__ import annotations

import asyncio
import base64
import codecs
import fcntl
import json
import os
import pty
import re
import secrets
import signal
import ssl
import struct
import subprocess
import termios
import time
from collections.abc import Callable

from shellserver.sandbox.spec import console_argv, console_env

TOKEN = re.compile(r'<meta name="shellserver-token" content="([^"]*)"')
ANSI = re.compile(r"\x1b(?:\[[0-9;?]*[ -/]*[@-~]|\][^\x07]*\x07|[@-Z\\-_])")
PROMPT = re.compile(r"In \[(\d+)\]: ")
# How much earlier output expect() searches again with each new message.
OVERLAP_CHARS = 512
RECENT_CHARS = 1000

now = time.perf_counter


class Closed(Exception):
    """The console went away while we waited for something."""


class _Expectation:
    """A pattern awaited in the output that arrives after its creation."""

    def __init__(self, terminal: Terminal, pattern: re.Pattern[str] | str | None) -> None:
        self.pattern = re.compile(re.escape(pattern)) if isinstance(pattern, str) else pattern
        self.future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self.text = ""  # recent raw output (escapes stripped only when searching)
        self.match: re.Match[str] | None = None
        self._terminal = terminal

    def feed(self, text: str, at: float) -> None:
        if self.future.done():
            return
        if self.pattern is None:
            self.future.set_result(at)
            return
        # Search the new text plus a little of the old (a match or an escape
        # sequence may straddle two messages); floods arrive in big pieces.
        self.text = self.text[-OVERLAP_CHARS:] + text
        self.match = self.pattern.search(ANSI.sub("", self.text))
        if self.match:
            self.future.set_result(at)

    async def wait(self, timeout: float) -> float:
        """The arrival time of the output that completed the match."""
        try:
            return await asyncio.wait_for(asyncio.shield(self.future), timeout)
        except TimeoutError:
            raise TimeoutError(
                f"{self._terminal.name}: no {self.pattern and self.pattern.pattern!r} within "
                f"{timeout} s; last output: {self.text[-300:]!r}") from None
        finally:
            self._terminal._expectations.discard(self)


class Terminal:
    """What the measurements need of a console, whatever carries it."""

    name = "terminal"

    def __init__(self) -> None:
        self._expectations: set[_Expectation] = set()
        self.sink: Callable[[str, float], None] | None = None
        self.chars = 0
        self.messages = 0
        self.last_output_at = 0.0
        self.closed = asyncio.get_running_loop().create_future()
        self.prompt_number = 0
        self.recent = ""  # the last output, for error messages

    def _output(self, text: str) -> None:
        at = now()
        self.chars += len(text)
        self.messages += 1
        self.last_output_at = at
        if self.sink is not None:
            self.sink(text, at)
        self.recent = (self.recent + text)[-RECENT_CHARS:]
        for expectation in list(self._expectations):
            expectation.feed(text, at)

    def _ended(self, reason: str) -> None:
        if not self.closed.done():
            self.closed.set_result(reason)
        for expectation in list(self._expectations):
            if not expectation.future.done():
                expectation.future.set_exception(Closed(
                    f"{self.name}: {reason}; last output: {ANSI.sub('', self.recent)!r}"))

    def expect(self, pattern: re.Pattern[str] | str | None = None) -> _Expectation:
        """Start watching for ``pattern`` (None: any output); create before sending."""
        expectation = _Expectation(self, pattern)
        if self.closed.done():
            expectation.future.set_exception(Closed(f"{self.name}: {self.closed.result()}"))
        self._expectations.add(expectation)
        return expectation

    async def wait_prompt(self, timeout: float, expectation: _Expectation | None = None) -> float:
        expectation = expectation or self.expect(PROMPT)
        at = await expectation.wait(timeout)
        self.prompt_number = int(expectation.match.group(1)) if expectation.match else 0
        return at

    async def quiet(self, seconds: float, timeout: float = 10.0) -> None:
        """Wait until no output arrived for ``seconds`` (bounded by ``timeout``)."""
        deadline = now() + timeout
        while now() < deadline:
            idle = now() - self.last_output_at
            if idle >= seconds:
                return
            await asyncio.sleep(seconds - idle)

    async def run_line(self, line: str, timeout: float = 30.0) -> float:
        """Type a line and Enter; wait for the next prompt."""
        expectation = self.expect(PROMPT)
        self.send_keys(line + "\r")
        return await self.wait_prompt(timeout, expectation)

    # -- what each transport provides ------------------------------------

    def send_keys(self, text: str) -> None:
        raise NotImplementedError

    def pause_reading(self) -> None:
        raise NotImplementedError

    def resume_reading(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


# -- the server's wire --------------------------------------------------------


def client_ssl_context(cafile: str) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=cafile)


async def http_get(host: str, port: int, path: str, *, tls: ssl.SSLContext | None,
                   source: str | None = None, timeout: float = 10.0) -> tuple[int, str]:
    """A one-shot HTTP/1.1 GET (Connection: close): status and body."""
    async def get() -> tuple[int, str]:
        reader, writer = await asyncio.open_connection(
            host, port, ssl=tls, server_hostname=host if tls else None,
            local_addr=(source, 0) if source else None)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                     "Connection: close\r\n\r\n".encode())
        data = await reader.read()
        writer.close()
        head, _, body = data.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        if b"transfer-encoding: chunked" in head.lower():
            body = _dechunk(body)
        return status, body.decode("utf-8", "replace")

    return await asyncio.wait_for(get(), timeout)


def _dechunk(body: bytes) -> bytes:
    out, pos = [], 0
    while True:
        end = body.index(b"\r\n", pos)
        size = int(body[pos:end].split(b";")[0], 16)
        if size == 0:
            return b"".join(out)
        out.append(body[end + 2:end + 2 + size])
        pos = end + 2 + size + 2


class _WebSocketProtocol(asyncio.Protocol):
    """RFC 6455 client framing: masked frames out, unmasked frames in."""

    def __init__(self, console: WireConsole, request: bytes, key: str) -> None:
        self.console = console
        self.request = request
        self.accept = base64.b64encode(
            __import__("hashlib").sha1(
                (key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()
        self.handshake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.buffer = bytearray()
        self.upgraded = False
        self.fragments: list[bytes] = []
        self.transport: asyncio.Transport | None = None
        self.close_code: int | None = None
        self.close_reason = ""

    def connection_made(self, transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            import socket
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        if not self.upgraded:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buffer[:end]).decode("latin-1")
            del buffer[:end + 4]
            if not head.startswith("HTTP/1.1 101") or self.accept not in head:
                self.handshake.set_exception(ConnectionError(f"handshake refused: {head!r}"))
                self.transport.close()
                return
            self.upgraded = True
            self.handshake.set_result(None)
        pos, size = 0, len(buffer)
        while size - pos >= 2:
            b0, b1 = buffer[pos], buffer[pos + 1]
            length = b1 & 0x7F
            header = 2
            if length == 126:
                if size - pos < 4:
                    break
                length = int.from_bytes(buffer[pos + 2:pos + 4], "big")
                header = 4
            elif length == 127:
                if size - pos < 10:
                    break
                length = int.from_bytes(buffer[pos + 2:pos + 10], "big")
                header = 10
            if size - pos < header + length:
                break
            payload = bytes(buffer[pos + header:pos + header + length])
            pos += header + length
            self._frame(b0 & 0x80, b0 & 0x0F, payload)
        if pos:
            del buffer[:pos]

    def _frame(self, fin: int, opcode: int, payload: bytes) -> None:
        if opcode in (0x1, 0x2, 0x0):
            if fin and not self.fragments:
                self.console._message(payload.decode("utf-8"))
                return
            self.fragments.append(payload)
            if fin:
                message = b"".join(self.fragments)
                self.fragments = []
                self.console._message(message.decode("utf-8"))
        elif opcode == 0x8:
            if len(payload) >= 2:
                self.close_code = int.from_bytes(payload[:2], "big")
                self.close_reason = payload[2:].decode("utf-8", "replace")
            self.send_frame(0x8, payload[:2])
            self.transport.close()
        elif opcode == 0x9:
            self.send_frame(0xA, payload)

    def send_frame(self, opcode: int, payload: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        length = len(payload)
        if length < 126:
            header = struct.pack("!BB", 0x80 | opcode, 0x80 | length)
        elif length < 65536:
            header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
        else:
            header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, length)
        mask = secrets.token_bytes(4)
        repeated = (mask * (length // 4 + 1))[:length]
        masked = (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")
                  ).to_bytes(length, "big") if length else b""
        self.transport.write(header + mask + masked)

    def connection_lost(self, exc) -> None:
        if not self.handshake.done():
            self.handshake.set_exception(ConnectionError(f"connection lost: {exc}"))
        self.console._ended(f"closed {self.close_code} {self.close_reason}".strip())


# Acknowledgements as the terminal page (web/static/console.js) sends them.
ACK_UNITS = 32768
ACK_IDLE = 0.040


def utf16_units(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-16-le")) // 2


class WireConsole(Terminal):
    """One console over the server's raw SockJS websocket (docs/protocol.md).

    Like the terminal page, it acknowledges output (`k`) every 32768 units
    and 40 ms after it has caught up; it "writes" each message at once.
    """

    def __init__(self, host: str, port: int, *, tls: ssl.SSLContext | None,
                 source: str | None = None, name: str = "wire", acks: bool = True,
                 framed: bool = False) -> None:
        super().__init__()
        self.acks = acks
        # framed: SockJS frames over the session's websocket, as sockjs-client
        # (the page) speaks; else the raw websocket, one message per message
        self.framed = framed
        self.written_units = self.acked_units = 0
        self._ack_timer: asyncio.TimerHandle | None = None
        self.host, self.port, self.tls, self.source = host, port, tls, source
        self.name = name
        self.origin = f"{'https' if tls else 'http'}://{host}:{port}"
        self.protocol: _WebSocketProtocol | None = None
        self.states: list[str] = []
        self.ends: list[str] = []

    async def fetch_token(self) -> str:
        status, page = await http_get(self.host, self.port, "/console/", tls=self.tls,
                                      source=self.source)
        match = TOKEN.search(page)
        if status != 200 or not match:
            raise ConnectionError(f"GET /console/ answered {status} without a token: "
                                  f"{page[:200]!r}")
        return match.group(1)

    async def connect(self, timeout: float = 10.0) -> None:
        key = base64.b64encode(secrets.token_bytes(16)).decode()
        request = (
            f"GET {self._websocket_path()} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Origin: {self.origin}\r\n\r\n").encode()
        loop = asyncio.get_running_loop()
        _, protocol = await asyncio.wait_for(loop.create_connection(
            lambda: _WebSocketProtocol(self, request, key), self.host, self.port,
            ssl=self.tls, server_hostname=self.host if self.tls else None,
            local_addr=(self.source, 0) if self.source else None), timeout)
        self.protocol = protocol
        await asyncio.wait_for(protocol.handshake, timeout)

    def _websocket_path(self) -> str:
        if self.framed:
            return f"/sockjs/000/{secrets.token_hex(8)}/websocket"
        return "/sockjs/websocket"

    def send(self, message: str) -> None:
        payload = json.dumps([message]) if self.framed else message
        self.protocol.send_frame(0x1, payload.encode("utf-8"))

    def authenticate(self, token: str, cols: int = 100, rows: int = 30) -> None:
        self.send("a" + token)
        self.send(f"r{cols},{rows}")
        if self.acks:
            self.send("k0")

    def _send_ack(self) -> None:
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        if self.written_units > self.acked_units:
            self.acked_units = self.written_units
            self.send(f"k{self.written_units}")

    def _acknowledge(self, text: str) -> None:
        self.written_units += utf16_units(text)
        if self.written_units - self.acked_units >= ACK_UNITS:
            self._send_ack()
        elif self._ack_timer is None:
            self._ack_timer = asyncio.get_running_loop().call_later(ACK_IDLE, self._send_ack)

    async def open(self, cols: int = 100, rows: int = 30, timeout: float = 30.0) -> float:
        """Token, connect, authenticate, first prompt: the seconds from `a` to prompt."""
        token = await self.fetch_token()
        await self.connect()
        expectation = self.expect(PROMPT)
        start = now()
        self.authenticate(token, cols, rows)
        return await self.wait_prompt(timeout, expectation) - start

    def _message(self, message: str) -> None:
        if not self.framed:
            self._console_message(message)
        elif message[:1] == "a":
            for each in json.loads(message[1:]):
                self._console_message(each)
        elif message[:1] == "c":
            self.ends.append(message)
        # "o" (open) and "h" (heartbeat) carry nothing for the console

    def _console_message(self, message: str) -> None:
        kind = message[:1]
        if kind == "o":
            text = message[1:]
            self._output(text)
            if self.acks:
                self._acknowledge(text)
        elif kind == "s":
            self.states.append(message[1:])
        elif kind in "xen":
            self.ends.append(message)

    def send_keys(self, text: str) -> None:
        self.send("i" + text)

    def pause_reading(self) -> None:
        self.protocol.transport.pause_reading()

    def resume_reading(self) -> None:
        self.protocol.transport.resume_reading()

    def close(self) -> None:
        """Drop the connection at once, as a browser tab that goes away."""
        if self._ack_timer is not None:
            self._ack_timer.cancel()
        if self.protocol and self.protocol.transport:
            self.protocol.transport.abort()


# -- the baseline: the same IPython on a local PTY ------------------------------


class PtyConsole(Terminal):
    """The console runtime's IPython on a local PTY: no server, no sandbox."""

    def __init__(self, runtime: str, home: str, name: str = "pty") -> None:
        super().__init__()
        self.runtime, self.home, self.name = runtime, home, name
        self.master = -1
        self.process: subprocess.Popen | None = None
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._reading = False

    async def open(self, cols: int = 100, rows: int = 30, timeout: float = 30.0) -> float:
        """Spawn IPython on a fresh PTY: the seconds from spawn to the first prompt."""
        env = console_env(self.runtime, os.getuid())
        env.update(HOME=self.home, IPYTHONDIR=f"{self.home}/.ipython", MPLCONFIGDIR=self.home)
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

        def controlling_terminal() -> None:
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        expectation = self.expect(PROMPT)
        start = now()
        self.process = subprocess.Popen(
            list(console_argv(self.runtime)), env=env, cwd=self.home,
            stdin=slave, stdout=slave, stderr=slave, preexec_fn=controlling_terminal,
            close_fds=True)
        os.close(slave)
        os.set_blocking(master, False)
        self.master = master
        self.resume_reading()
        return await self.wait_prompt(timeout, expectation) - start

    def _readable(self) -> None:
        try:
            data = os.read(self.master, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.pause_reading()
            self._ended("pty closed")
            return
        text = self._decoder.decode(data)
        if text:
            self._output(text)

    def send_keys(self, text: str) -> None:
        data = text.encode("utf-8")
        while data:
            try:
                written = os.write(self.master, data)
            except BlockingIOError:
                time.sleep(0.001)
                continue
            data = data[written:]

    def pause_reading(self) -> None:
        if self._reading:
            asyncio.get_running_loop().remove_reader(self.master)
            self._reading = False

    def resume_reading(self) -> None:
        if not self._reading and self.master >= 0:
            asyncio.get_running_loop().add_reader(self.master, self._readable)
            self._reading = True

    def close(self) -> None:
        """Hang up (as closing a terminal window does); the kernel sends SIGHUP."""
        self.pause_reading()
        if self.master >= 0:
            os.close(self.master)
            self.master = -1
        self._ended("closed by us")

    def reap(self, timeout: float = 5.0) -> None:
        """Wait for IPython to go (bounded), then kill its session."""
        if self.process is None:
            return
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(5)
