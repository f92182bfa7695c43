"""Helpers for the hostile-input suite: a server with short limits, raw TLS,
HTTP and websocket clients that send what browsers never would, and the
measurements the leak checks use.

Hostile clients connect from other loopback addresses (127.0.0.2 and up, all
to 127.0.0.1), so per-address limits they trip never touch the legitimate
consoles on 127.0.0.1.
"""

from __future__ import annotations

import base64
import os
import re
import socket
import ssl
import struct
import time
from pathlib import Path

from conftest import RunningServer, processes_of_uids, start_server
from console_client import TOKEN, ConsoleClient

UID_MIN, UID_MAX = 231000, 231049

# Short enough to test in seconds; long enough for a loaded machine.
SERVER_LIMITS = {
    "max_connections_per_address": 16,
    "tls_handshake_timeout": 2.0,
    "request_timeout": 3.0,
    "idle_connection_timeout": 4.0,
    "auth_failures_per_minute": 5,
}
HOST_ORIGIN = "https://host.example"

TEXT, BINARY, CLOSE, PING, PONG = 0x1, 0x2, 0x8, 0x9, 0xA


def start_hostile_server(tmp: Path) -> RunningServer:
    """A real server with SERVER_LIMITS in [server] (bounded wait)."""
    return start_server(
        tmp, uid_min=UID_MIN, uid_max=UID_MAX,
        server="\n".join(f"{name} = {value}" for name, value in SERVER_LIMITS.items()),
        console="auth_timeout = 10.0\n",
        embed=f'host_origins = ["{HOST_ORIGIN}"]\n',
    )


# -- the server from outside ---------------------------------------------------

def server_rss_kb(server: RunningServer) -> int:
    with open(f"/proc/{server.process.pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))


def server_sockets(server: RunningServer) -> int:
    """Sockets the server process holds open (listener and clients)."""
    count = 0
    fd_dir = f"/proc/{server.process.pid}/fd"
    for name in os.listdir(fd_dir):
        try:
            if os.readlink(os.path.join(fd_dir, name)).startswith("socket:"):
                count += 1
        except FileNotFoundError:
            pass
    return count


def sandbox_uids(server: RunningServer) -> set[int]:
    """The uids of the server's range that own a process now."""
    uids = set()
    for pid in processes_of_uids(server.uid_min, server.uid_max):
        try:
            uids.add(os.stat(f"/proc/{pid}").st_uid)
        except FileNotFoundError:
            pass
    return uids


def consoles_started(server: RunningServer) -> int:
    return len(re.findall(r"console s[0-9a-f]+ started", server.log()))


# -- raw clients ---------------------------------------------------------------

def tls_connect(server: RunningServer, *, source: str = "127.0.0.1",
                timeout: float = 5.0) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", server.port), timeout=timeout,
                                   source_address=(source, 0))
    try:
        return server.ssl_context().wrap_socket(raw, server_hostname="127.0.0.1")
    except BaseException:
        raw.close()
        raise


def read_until_closed(sock: socket.socket, *, timeout: float = 5.0,
                      limit: int = 1 << 20) -> tuple[bytes, str]:
    """What the server sends until it closes (bounded): (data, how it ended)."""
    data = b""
    deadline = time.monotonic() + timeout
    while len(data) < limit:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return data, "timeout"
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return data, "timeout"
        except (ConnectionResetError, ssl.SSLError, OSError) as e:
            return data, type(e).__name__
        if not chunk:
            return data, "closed"
        data += chunk
    return data, "limit"


def http_exchange(server: RunningServer, raw: bytes, *, source: str = "127.0.0.1",
                  timeout: float = 5.0) -> tuple[bytes, str]:
    """Send ``raw`` bytes on a fresh TLS connection; (everything read, how it ended)."""
    with tls_connect(server, source=source, timeout=timeout) as sock:
        sock.sendall(raw)
        return read_until_closed(sock, timeout=timeout)


def get_request(path: bytes, *headers: bytes, host: bytes = b"127.0.0.1") -> bytes:
    lines = [b"GET " + path + b" HTTP/1.1", b"Host: " + host, b"Connection: close", *headers]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def status_of(response: bytes) -> int | None:
    match = re.match(rb"HTTP/1\.[01] (\d{3})", response)
    return int(match.group(1)) if match else None


def headers_of(response: bytes) -> dict[bytes, bytes]:
    head = response.partition(b"\r\n\r\n")[0]
    pairs = (line.partition(b":") for line in head.split(b"\r\n")[1:])
    return {name.strip().lower(): value.strip() for name, _, value in pairs}


def body_of(response: bytes) -> bytes:
    """The body, de-chunked if it came chunked (as far as it came)."""
    body = response.partition(b"\r\n\r\n")[2]
    if headers_of(response).get(b"transfer-encoding", b"").lower() != b"chunked":
        return body
    decoded = b""
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        decoded += rest[:size]
        body = rest[size + 2:]
    return decoded


def console_token(server: RunningServer, *, host: bytes | None = None,
                  source: str = "127.0.0.1") -> str:
    """A fresh console token, as the console page gives it (to ``Host: host``),
    fetched from ``source`` (the address the token is bound to)."""
    request = get_request(b"/console/", host=host or f"127.0.0.1:{server.port}".encode())
    response, _ = http_exchange(server, request, source=source)
    match = TOKEN.search(response.decode("utf-8", "replace"))
    assert match, response[:300]
    return match.group(1)


def ws_frame(opcode: int, payload: bytes = b"", *, fin: bool = True, masked: bool = True,
             rsv: int = 0) -> bytes:
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    mask_bit = 0x80 if masked else 0
    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", first, mask_bit | length)
    elif length < 1 << 16:
        header = struct.pack("!BBH", first, mask_bit | 126, length)
    else:
        header = struct.pack("!BBQ", first, mask_bit | 127, length)
    if not masked:
        return header + payload
    key = os.urandom(4)
    masked_payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload)) \
        if length < 4096 else _mask_fast(payload, key)
    return header + key + masked_payload


def _mask_fast(payload: bytes, key: bytes) -> bytes:
    repeated = (key * (len(payload) // 4 + 1))[:len(payload)]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(
        len(payload), "big")


class RawWebSocket:
    """A websocket client over TLS that sends any frame, valid or not."""

    def __init__(self, server: RunningServer, path: str = "/sockjs/websocket", *,
                 origin: str | None = "", source: str = "127.0.0.1",
                 timeout: float = 5.0) -> None:
        self.sock = tls_connect(server, source=source, timeout=timeout)
        self._buffer = b""
        if origin == "":
            origin = server.origin
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{server.port}",
                 "Upgrade: websocket", "Connection: Upgrade",
                 f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13"]
        if origin is not None:
            lines.append(f"Origin: {origin}")
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = self._read_until(b"\r\n\r\n", timeout)
        self.status = status_of(head)
        assert self.status == 101, head[:300]
        self.closed: tuple[int | None, str] | None = None

    def _read_until(self, marker: bytes, timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        while marker not in self._buffer:
            self._fill(deadline)
        head, _, self._buffer = self._buffer.partition(marker)
        return head + marker

    def _fill(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("nothing from the server")
        self.sock.settimeout(remaining)
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionResetError("the server closed the connection")
        self._buffer += chunk

    def send(self, opcode: int, payload: bytes = b"", **options) -> None:
        self.sock.sendall(ws_frame(opcode, payload, **options))

    def send_text(self, text: str | bytes) -> None:
        self.send(TEXT, text.encode() if isinstance(text, str) else text)

    def recv_frame(self, timeout: float = 5.0) -> tuple[int, bytes]:
        """The next frame but pings, which are answered (opcode, payload);
        raises TimeoutError or ConnectionError."""
        deadline = time.monotonic() + timeout
        while True:
            opcode, payload = self._next_frame(deadline)
            if opcode != PING:
                return opcode, payload
            self.send(PONG, payload)

    def _next_frame(self, deadline: float) -> tuple[int, bytes]:
        while len(self._buffer) < 2:
            self._fill(deadline)
        length, offset = self._buffer[1] & 0x7F, 2
        if length == 126:
            while len(self._buffer) < 4:
                self._fill(deadline)
            (length,), offset = struct.unpack("!H", self._buffer[2:4]), 4
        elif length == 127:
            while len(self._buffer) < 10:
                self._fill(deadline)
            (length,), offset = struct.unpack("!Q", self._buffer[2:10]), 10
        while len(self._buffer) < offset + length:
            self._fill(deadline)
        opcode = self._buffer[0] & 0x0F
        payload = self._buffer[offset:offset + length]
        self._buffer = self._buffer[offset + length:]
        return opcode, payload

    def read_output_until(self, text: str, timeout: float = 20.0) -> str:
        """Console output (``o`` messages) until ``text`` has come (bounded)."""
        output = ""
        deadline = time.monotonic() + timeout
        while text not in output:
            remaining = deadline - time.monotonic()
            assert remaining > 0, output
            opcode, payload = self.recv_frame(remaining)
            if payload.startswith(b"o"):
                output += payload[1:].decode("utf-8", "replace")
        return output

    def messages_until_close(self, timeout: float = 10.0) -> list[str]:
        """Text messages until the close frame (kept in ``closed``), bounded."""
        texts = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                opcode, payload = self.recv_frame(deadline - time.monotonic())
            except (TimeoutError, ConnectionError, ssl.SSLError, OSError):
                self.closed = self.closed or (None, "connection dropped")
                break
            if opcode == TEXT:
                texts.append(payload.decode("utf-8", "replace"))
            elif opcode == CLOSE:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                self.closed = (code, payload[2:].decode("utf-8", "replace"))
                break
        return texts

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> RawWebSocket:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Witness:
    """A legitimate console from 127.0.0.1, open for the whole module."""

    def __init__(self, server: RunningServer) -> None:
        self.client = ConsoleClient(server)
        self.client.login()
        self.prompt = 1
        assert self.client.wait_for_prompt(1, timeout=30), self.client.display()

    def answers(self) -> bool:
        """``print(6*7)`` prints 42 at the next prompt."""
        self.prompt += 1
        self.client.type("print(6*7)\r")
        if not self.client.wait_for_prompt(self.prompt, timeout=15):
            return False
        return "\n42" in self.client.display()

    def echo_latency(self, character: str = "x") -> float:
        """Seconds from a keystroke to its echo (then erased again)."""
        before = len(self.client.raw_output)
        started = time.monotonic()
        self.client.type(character)
        assert self.client.wait_for(
            lambda c: character in "".join(c.raw_output[before:]), timeout=5)
        latency = time.monotonic() - started
        after = len(self.client.raw_output)
        self.client.type("\x7f")
        self.client.wait_for(lambda c: len(c.raw_output) > after, timeout=5)
        return latency

    def close(self) -> None:
        self.client.close()
