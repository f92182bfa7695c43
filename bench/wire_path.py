"""What twistd spends per output message and per keystroke, without processes.

    .venv/bin/python bench/wire_path.py [--megabytes N] [--chunk BYTES] [--keys N]
                                        [--transport websocket|xhr-streaming|eventsource]
                                        [--profile]

The server's own path, in this process: a ConsoleSession behind the real
SockJS resource and (for websocket) autobahn, over a StringTransport, with a
fake sandbox (shellserver.testing) whose output arrives in ``--chunk`` byte
reads, as twistd's PTY reads do for ``print`` in a loop. The client
acknowledges every 8 KiB as the page does. A deterministic Clock stands in
for the reactor, advanced past the coalescing window between reads, so
each read is one message (the worst case: every read of a slow printer).

Prints CPU microseconds per message and per MB of output, and per
keystroke (an ``i`` message in, its one-byte echo out); ``--profile``
adds the cProfile lines that cost most. Not a test: numbers only.
"""

from __future__ import annotations

import argparse
import cProfile
import heapq
import io
import itertools
import json
import os
import pstats
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), os.path.join(os.path.dirname(HERE), "tests", "unit")]

from twisted.internet.address import IPv4Address  # noqa: E402
from twisted.internet.base import DelayedCall  # noqa: E402
from twisted.internet.interfaces import IReactorTime  # noqa: E402
from twisted.internet.testing import StringTransport  # noqa: E402
from twisted.web.resource import Resource  # noqa: E402
from twisted.web.server import Site  # noqa: E402
from zope.interface import implementer  # noqa: E402

from shellserver.auth import TokenAuthority  # noqa: E402
from shellserver.console import COALESCE_WINDOW, ConsoleFactory, ConsoleSettings  # noqa: E402
from shellserver.metrics import Metrics  # noqa: E402
from shellserver.sockjs import SockJSOptions, SockJSResource  # noqa: E402
from shellserver.testing import FakeSandboxStarter  # noqa: E402

ORIGIN = "https://console.example"
ACK_EVERY = 8192
# between reads: past the coalescing window, so each read is one message
PAST_WINDOW = COALESCE_WINDOW + 0.001


@implementer(IReactorTime)
class HeapClock:
    """A clock advanced by hand whose calls sit in a heap, as the reactor's do.

    (twisted's Clock sorts its whole list on every callLater: its cost
    would hide what the server itself spends.)
    """

    def __init__(self) -> None:
        self._now = 1_000_000.0
        self._calls: list[tuple[float, int, DelayedCall]] = []
        self._order = itertools.count()

    def seconds(self) -> float:
        return self._now

    def callLater(self, delay, function, *args, **kwargs) -> DelayedCall:
        call = DelayedCall(self._now + delay, function, args, kwargs,
                           lambda c: None, self._reset, self.seconds)
        heapq.heappush(self._calls, (call.time, next(self._order), call))
        return call

    def _reset(self, call: DelayedCall) -> None:
        heapq.heappush(self._calls, (call.time, next(self._order), call))

    def getDelayedCalls(self):
        return [c for _, _, c in self._calls if c.active()]

    def advance(self, seconds: float) -> None:
        self._now += seconds
        while self._calls and self._calls[0][0] <= self._now:
            due, _, call = heapq.heappop(self._calls)
            if call.cancelled or call.called or call.time != due:
                continue  # cancelled, or reset to later (pushed again then)
            call.called = 1
            call.func(*call.args, **call.kw)


class NoDelayTransport(StringTransport):
    def setTcpNoDelay(self, enabled: bool) -> None:
        pass

    def getTcpNoDelay(self) -> bool:
        return True


def client_frame(payload: bytes) -> bytes:
    """A masked text frame with a zero mask."""
    import struct

    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", 0x81, 0x80 | length)
    elif length < 2**16:
        header = struct.pack("!BBH", 0x81, 0x80 | 126, length)
    else:
        header = struct.pack("!BBQ", 0x81, 0x80 | 127, length)
    return header + b"\x00\x00\x00\x00" + payload


class Rig:
    """One console behind the real SockJS resource, driven by hand."""

    def __init__(self, transport_name: str) -> None:
        self.clock = HeapClock()
        self.tokens = TokenAuthority(b"k" * 32, node="node-1", clock=self.clock, ttl=60.0)
        self.starter = FakeSandboxStarter()
        self.factory = ConsoleFactory(self.clock, self.tokens, self.starter,
                                      ConsoleSettings(auth_timeout=5.0, idle_timeout=600.0,
                                                      max_age=1800.0, reattach_grace=30.0),
                                      metrics=Metrics())
        root = Resource()
        root.putChild(b"sockjs", SockJSResource(self.factory, clock=self.clock,
                                                options=SockJSOptions()))
        self.site = Site(root, reactor=self.clock)
        self.transport_name = transport_name
        self.sent_units = 0
        self.acked_units = 0
        self.transport = self._connect()
        token = self.tokens.mint(user_id="u1", origin=ORIGIN, client_address="10.0.0.7")
        self.send("a" + token)
        self.sandbox = self.starter.started[-1]
        self.sandbox.events.output(b"In [1]: ")
        self.clock.advance(0.01)
        self.drain()

    def _connect(self) -> NoDelayTransport:
        transport = NoDelayTransport(peerAddress=IPv4Address("TCP", "10.0.0.7", 54321),
                                     hostAddress=IPv4Address("TCP", "10.0.0.1", 80))
        channel = self.site.buildProtocol(None)
        transport.protocol = channel
        channel.makeConnection(transport)
        if self.transport_name == "websocket":
            request = ("GET /sockjs/000/s1/websocket HTTP/1.1\r\nHost: example.com\r\n"
                       "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                       "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                       "Sec-WebSocket-Version: 13\r\n"
                       f"Origin: {ORIGIN}\r\n\r\n")
            channel.dataReceived(request.encode())
        else:
            channel.dataReceived(self._stream_request())
        return transport

    def _stream_request(self) -> bytes:
        path = {"xhr-streaming": "xhr_streaming", "eventsource": "eventsource"}[
            self.transport_name]
        method = "GET" if self.transport_name == "eventsource" else "POST"
        return (f"{method} /sockjs/000/s1/{path} HTTP/1.1\r\nHost: example.com\r\n"
                f"Origin: {ORIGIN}\r\nContent-Length: 0\r\n\r\n").encode()

    def send(self, message: str) -> None:
        body = json.dumps([message]).encode()
        if self.transport_name == "websocket":
            self.transport.protocol.dataReceived(client_frame(body))
            return
        # the polling transports' sends come in on a request of their own
        sender = NoDelayTransport(peerAddress=IPv4Address("TCP", "10.0.0.7", 54322),
                                  hostAddress=IPv4Address("TCP", "10.0.0.1", 80))
        channel = self.site.buildProtocol(None)
        channel.makeConnection(sender)
        channel.dataReceived(
            (f"POST /sockjs/000/s1/xhr_send HTTP/1.1\r\nHost: example.com\r\n"
             f"Origin: {ORIGIN}\r\nContent-Type: text/plain\r\n"
             f"Content-Length: {len(body)}\r\n\r\n").encode() + body)
        channel.connectionLost(None)

    def drain(self) -> int:
        """Drop what the server wrote; acknowledge what the page would have."""
        data = self.transport.value()
        self.transport.clear()
        if self.transport_name != "websocket" and data.endswith(b"\r\n0\r\n\r\n"):
            # a streaming response ends after its byte limit (its last
            # chunk): the client asks for the next, as sockjs-client does
            self.transport.protocol.dataReceived(self._stream_request())
            return len(data) + self.drain()
        return len(data)

    def acknowledge(self, units: int) -> None:
        self.sent_units += units
        if self.sent_units - self.acked_units >= ACK_EVERY:
            self.acked_units = self.sent_units
            self.send(f"k{self.sent_units}")


def flood(rig: Rig, megabytes: float, chunk: int) -> dict:
    line = b"".join(b"%d\r\n" % i for i in range(chunk))[:chunk]
    reads = int(megabytes * 1e6 / chunk)
    wire = 0
    started = time.process_time()
    for _ in range(reads):
        rig.sandbox.events.output(line)
        rig.clock.advance(PAST_WINDOW)  # one message per read
        wire += rig.drain()
        rig.acknowledge(chunk)
    seconds = time.process_time() - started
    mb = reads * chunk / 1e6
    return {"messages": reads, "us_per_message": seconds / reads * 1e6,
            "ms_per_mb": seconds * 1000 / mb, "wire_bytes_per_byte": wire / (reads * chunk)}


def keys(rig: Rig, count: int) -> dict:
    started = time.process_time()
    for i in range(count):
        key = "abcdefghij"[i % 10]
        rig.send("i" + key)
        rig.sandbox.events.output(key.encode())
        rig.clock.advance(PAST_WINDOW)
        rig.drain()
        rig.acknowledge(1)
    seconds = time.process_time() - started
    return {"us_per_key": seconds / max(count, 1) * 1e6}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=float, default=20.0)
    parser.add_argument("--chunk", type=int, default=4095, help="bytes per PTY read")
    parser.add_argument("--keys", type=int, default=20000)
    parser.add_argument("--transport", default="websocket",
                        choices=("websocket", "xhr-streaming", "eventsource"))
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    rig = Rig(args.transport)
    profiler = cProfile.Profile() if args.profile else None
    if profiler:
        profiler.enable()
    output = flood(rig, args.megabytes, args.chunk)
    typing = keys(rig, args.keys)
    if profiler:
        profiler.disable()
    print(f"{args.transport}, {args.chunk}-byte reads: "
          f"{output['us_per_message']:.1f} us/message, {output['ms_per_mb']:.2f} ms/MB, "
          f"{output['wire_bytes_per_byte']:.3f} wire bytes per output byte; "
          f"keystroke in + echo out: {typing['us_per_key']:.1f} us")
    if profiler:
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
        print(text.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
