"""
Tests for the websocket transports of shellserver.sockjs: autobahn's
twisted.web integration over a StringTransport, frames built by hand.
"""

import json
import struct

from attrs import define, field
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from shellserver.sockjs import SockJSConnection, SockJSOptions, SockJSResource

TEXT = 0x1
BINARY = 0x2
CLOSE = 0x8
PING = 0x9
PONG = 0xA


class NoDelayTransport(StringTransport):
    """
    A StringTransport that records TCP_NODELAY.
    """

    no_delay = False

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.no_delay = enabled

    def getTcpNoDelay(self) -> bool:
        return self.no_delay


def client_frame(payload: bytes, opcode: int = TEXT, fin: bool = True) -> bytes:
    """
    A masked client frame (with a zero mask, so the payload reads as is).
    """
    first = (0x80 if fin else 0) | opcode
    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", first, 0x80 | length)
    elif length < 2**16:
        header = struct.pack("!BBH", first, 0x80 | 126, length)
    else:
        header = struct.pack("!BBQ", first, 0x80 | 127, length)
    return header + b"\x00\x00\x00\x00" + payload


def masked_frame(payload: bytes, mask: bytes = b"\x5a\xc3\x0f\x96", opcode: int = TEXT,
                 fin: bool = True, masked: bool = True) -> bytes:
    """
    A client frame of fewer than 126 payload bytes with a real mask (or
    none, which clients must not send).
    """
    assert len(payload) < 126
    first = (0x80 if fin else 0) | opcode
    if not masked:
        return struct.pack("!BB", first, len(payload)) + payload
    body = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
    return struct.pack("!BB", first, 0x80 | len(payload)) + mask + body


def server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """
    Split unmasked server frames into (opcode, payload); continuation
    frames are joined to their message.
    """
    frames: list[tuple[int, bytes]] = []
    continuing = False
    while len(data) >= 2:
        first, second = data[0], data[1]
        length, offset = second & 0x7F, 2
        if length == 126:
            (length,) = struct.unpack("!H", data[2:4])
            offset = 4
        elif length == 127:
            (length,) = struct.unpack("!Q", data[2:10])
            offset = 10
        payload = data[offset : offset + length]
        data = data[offset + length :]
        opcode = first & 0x0F
        if opcode == 0 and continuing:
            frames[-1] = (frames[-1][0], frames[-1][1] + payload)
        else:
            frames.append((opcode, payload))
        continuing = not first & 0x80 and opcode in (0, TEXT, BINARY)
    return frames


@define
class RecordingHandler:
    connection: SockJSConnection
    messages: list[str] = field(factory=list)
    closed_count: int = 0

    def message_received(self, text: str) -> None:
        self.messages.append(text)
        if text == "boom":
            raise ZeroDivisionError(text)
        self.connection.send(text)

    def closed(self) -> None:
        self.closed_count += 1


@define
class WebSocketClient:
    """
    The client end of one websocket over a StringTransport.
    """

    transport: NoDelayTransport
    _read: int = 0

    @property
    def protocol(self):
        return self.transport.protocol

    def send(self, payload: bytes, opcode: int = TEXT) -> None:
        self.protocol.dataReceived(client_frame(payload, opcode))

    def received(self) -> list[tuple[int, bytes]]:
        """
        The frames the server wrote since the last call.
        """
        data = self.transport.value()
        new, self._read = data[self._read :], len(data)
        return server_frames(new)

    def texts(self) -> list[bytes]:
        return [payload for opcode, payload in self.received() if opcode == TEXT]

    def lose_connection(self) -> None:
        self.protocol.connectionLost(Failure(ConnectionLost()))


class WebSocketTestsMixin:
    options = SockJSOptions()

    def setUp(self) -> None:
        self.clock = Clock()
        self.handlers: list[RecordingHandler] = []
        root = Resource()
        root.putChild(
            b"sockjs",
            SockJSResource(self.open_session, clock=self.clock, options=self.options),
        )
        self.site = Site(root, reactor=self.clock)

    def open_session(self, connection: SockJSConnection) -> RecordingHandler:
        handler = RecordingHandler(connection)
        self.handlers.append(handler)
        return handler

    def connect(self, path: str = "/sockjs/000/s1/websocket") -> WebSocketClient:
        transport = NoDelayTransport(
            peerAddress=IPv4Address("TCP", "10.0.0.7", 54321),
            hostAddress=IPv4Address("TCP", "10.0.0.1", 80),
        )
        channel = self.site.buildProtocol(None)
        # autobahn hands the connection over by setting transport.protocol,
        # as real TCP transports have it
        transport.protocol = channel
        channel.makeConnection(transport)
        handshake = "\r\n".join(
            [
                f"GET {path} HTTP/1.1",
                "Host: example.com",
                "Upgrade: websocket",
                "Connection: Upgrade",
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                "Sec-WebSocket-Version: 13",
                "Origin: https://example.com",
                "",
                "",
            ]
        )
        channel.dataReceived(handshake.encode())
        head, _, rest = transport.value().partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        client = WebSocketClient(transport)
        client._read = len(head) + 4
        return client


class FramedWebSocketTests(WebSocketTestsMixin, SynchronousTestCase):
    def test_handshake_and_open(self) -> None:
        """
        The handshake succeeds and the session opens with an "o" frame, on
        a connection without Nagle, with the request's details.
        """
        client = self.connect()
        self.assertEqual(client.texts(), [b"o"])
        self.assertTrue(client.transport.no_delay)
        connection = self.handlers[0].connection
        self.assertEqual(
            (
                connection.session_id,
                connection.peer_host,
                connection.origin,
                connection.transport_name,
            ),
            ("s1", "10.0.0.7", "https://example.com", "websocket"),
        )

    def test_echo(self) -> None:
        """
        A JSON array of messages or a single JSON string are delivered in
        order; replies come back as a-frames.
        """
        client = self.connect()
        client.received()
        client.send(b'["a","b"]')
        client.send(b'"c"')
        self.assertEqual(self.handlers[0].messages, ["a", "b", "c"])
        self.assertEqual(client.texts(), [b'a["a"]', b'a["b"]', b'a["c"]'])

    def test_empty_messages_ignored(self) -> None:
        """
        Empty websocket messages and empty arrays deliver nothing and keep
        the session open.
        """
        client = self.connect()
        client.send(b"")
        client.send(b"[]")
        self.assertEqual(self.handlers[0].messages, [])
        self.assertTrue(self.handlers[0].connection.is_open)

    def test_broken_json_closes(self) -> None:
        """
        Broken JSON ends the session and closes the websocket with 3000,
        without a close frame (as the reference server does).
        """
        client = self.connect()
        client.received()
        client.send(b'["a')
        frames = client.received()
        self.assertEqual(frames, [(CLOSE, struct.pack("!H", 3000) + b"Broken framing.")])
        self.assertEqual(self.handlers[0].closed_count, 1)
        self.assertFalse(self.handlers[0].connection.is_open)

    def test_binary_closes(self) -> None:
        """
        A binary message is not SockJS either: the websocket closes.
        """
        client = self.connect()
        client.received()
        client.send(b'["a"]', BINARY)
        self.assertEqual(client.received()[0][0], CLOSE)
        self.assertEqual(self.handlers[0].messages, [])

    def test_heartbeat(self) -> None:
        """
        An h frame goes out every heartbeat_interval.
        """
        client = self.connect()
        client.received()
        self.clock.advance(self.options.heartbeat_interval)
        self.assertEqual(client.texts(), [b"h"])

    def test_server_close(self) -> None:
        """
        close() sends the c-frame, then a websocket close with the same
        code and reason.
        """
        client = self.connect()
        client.received()
        self.handlers[0].connection.close(4001, "authentication failed")
        frames = client.received()
        self.assertEqual(frames[0], (TEXT, b'c[4001,"authentication failed"]'))
        self.assertEqual(frames[1], (CLOSE, struct.pack("!H", 4001) + b"authentication failed"))
        self.assertEqual(self.handlers[0].closed_count, 1)

    def test_client_disconnect(self) -> None:
        """
        Losing the connection ends the session at once.
        """
        client = self.connect()
        client.lose_connection()
        self.assertEqual(self.handlers[0].closed_count, 1)
        self.assertFalse(self.handlers[0].connection.is_open)

    def test_sessions_not_shared(self) -> None:
        """
        Two websockets with the same session id are separate sessions.
        """
        first = self.connect()
        second = self.connect()
        first.send(b'["1"]')
        second.send(b'["2"]')
        self.assertEqual(first.texts(), [b"o", b'a["1"]'])
        self.assertEqual(second.texts(), [b"o", b'a["2"]'])

    def test_message_too_big(self) -> None:
        """
        A message over max_message_bytes closes the session with 1009 and a
        reason, and is not delivered.
        """
        client = self.connect()
        client.received()
        client.send(b'["' + b"x" * self.options.max_message_bytes + b'"]')
        frames = client.received()
        self.assertEqual(frames[0], (TEXT, b'c[1009,"Message too big"]'))
        self.assertEqual(frames[1][0], CLOSE)
        self.assertEqual(frames[1][1][:2], struct.pack("!H", 1009))
        self.assertEqual(self.handlers[0].messages, [])
        self.assertEqual(self.handlers[0].closed_count, 1)

    def test_fragmented_message_too_big(self) -> None:
        """
        The limit holds for a message split into small fragments.
        """
        client = self.connect()
        client.received()
        half = self.options.max_message_bytes // 2 + 1
        client.protocol.dataReceived(client_frame(b'["' + b"x" * half, TEXT, fin=False))
        client.protocol.dataReceived(client_frame(b"x" * half + b'"]', 0, fin=True))
        self.assertEqual(client.texts(), [b'c[1009,"Message too big"]'])
        self.assertEqual(self.handlers[0].messages, [])

    def test_large_output(self) -> None:
        """
        Output larger than max_message_bytes (which limits the client) is
        still delivered whole.
        """
        client = self.connect()
        client.received()
        big = "y" * (self.options.max_message_bytes * 2)
        self.handlers[0].connection.send(big)
        self.assertEqual(client.texts(), [b'a["' + big.encode() + b'"]'])

    def test_frame_lengths_around_the_short_header(self) -> None:
        """
        Frames of 0 to 130 payload bytes (short ones framed by the transport
        itself, longer ones by autobahn) arrive whole as text frames.
        """
        client = self.connect()
        client.received()
        texts = ["z" * (length - 4) for length in range(4, 131)]  # a["..."]: 4 more
        for text in texts:
            self.handlers[0].connection.send(text)
        frames = client.received()
        self.assertEqual([opcode for opcode, _ in frames], [TEXT] * len(texts))
        self.assertEqual([payload for _, payload in frames],
                         [b'a["' + text.encode() + b'"]' for text in texts])
        raw = client.transport.value()
        self.assertIn(b"\x81\x7d" + b'a["' + b"z" * 120 + b'"]', raw)
        self.assertIn(b"\x81\x7e\x00\x7e" + b'a["' + b"z" * 121 + b'"]', raw)

    def test_short_frames_in_one_read(self) -> None:
        """
        Short masked text frames (keystrokes, any UTF-8), a frame of 126
        bytes and a ping read at once are all taken, in order.
        """
        client = self.connect()
        client.received()
        texts = ["i" + key for key in ("a", "\u00e9", "\u20ac", "\U0001f600", "\x00")]
        long_text = "i" + "y" * 119  # 126 bytes as ["..."]
        data = b"".join(masked_frame(json.dumps([text]).encode(), mask=bytes((n, 7, 255, n)))
                        for n, text in enumerate(texts))
        data += client_frame(json.dumps([long_text]).encode())
        data += masked_frame(b"p!", opcode=PING)
        data += masked_frame(b'["last"]')
        client.protocol.dataReceived(data)
        self.assertEqual(self.handlers[0].messages, [*texts, long_text, "last"])
        frames = client.received()
        self.assertIn((PONG, b"p!"), frames)
        self.assertEqual(len([f for f in frames if f[0] == TEXT]), len(texts) + 2)

    def test_short_frame_split_across_reads(self) -> None:
        """
        A short frame that arrives a byte at a time is delivered once, whole.
        """
        client = self.connect()
        frame = masked_frame(b'["split"]')
        for index in range(len(frame)):
            client.protocol.dataReceived(frame[index:index + 1])
        client.protocol.dataReceived(masked_frame(b'["next"]'))
        self.assertEqual(self.handlers[0].messages, ["split", "next"])

    def test_short_frame_invalid_utf8(self) -> None:
        """
        A short text frame that is not UTF-8 fails the websocket with 1007
        and is not delivered.
        """
        client = self.connect()
        client.received()
        client.protocol.dataReceived(masked_frame(b'["\xff"]'))
        self.assertEqual(self.handlers[0].messages, [])
        self.assertEqual([(opcode, payload[:2]) for opcode, payload in client.received()],
                         [(CLOSE, struct.pack("!H", 1007))])

    def test_short_frame_unmasked(self) -> None:
        """
        An unmasked short frame is a protocol violation (1002), not a message.
        """
        client = self.connect()
        client.received()
        client.protocol.dataReceived(masked_frame(b'["a"]', masked=False))
        self.assertEqual(self.handlers[0].messages, [])
        self.assertEqual([(opcode, payload[:2]) for opcode, payload in client.received()],
                         [(CLOSE, struct.pack("!H", 1002))])

    def test_short_frame_inside_fragmented_message(self) -> None:
        """
        A whole text frame while a fragmented message is open is a protocol
        violation (1002), as autobahn has it.
        """
        client = self.connect()
        client.received()
        client.protocol.dataReceived(masked_frame(b'["par', fin=False))
        client.protocol.dataReceived(masked_frame(b'["b"]'))
        self.assertEqual(self.handlers[0].messages, [])
        self.assertEqual([(opcode, payload[:2]) for opcode, payload in client.received()],
                         [(CLOSE, struct.pack("!H", 1002))])

    def test_handler_exception(self) -> None:
        """
        A handler that raises is logged and its session closed with 1011;
        the server goes on.
        """
        client = self.connect()
        client.received()
        client.send(b'["boom"]')
        frames = client.received()
        self.assertEqual(frames[0], (TEXT, b'c[1011,"Internal error"]'))
        self.assertEqual(frames[1][1][:2], struct.pack("!H", 1011))
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        other = self.connect()
        other.send(b'["fine"]')
        self.assertEqual(other.texts(), [b"o", b'a["fine"]'])

    def test_transport_back_pressure(self) -> None:
        """
        While the socket buffer is full, output waits in the session and
        is counted in pending_bytes; it flows when the buffer drains.
        """
        client = self.connect()
        client.received()
        connection = self.handlers[0].connection
        client.transport.producer.pauseProducing()
        connection.send("held")
        self.assertEqual(connection.pending_bytes, len(b'"held"'))
        self.assertEqual(client.texts(), [])
        client.transport.producer.resumeProducing()
        self.assertEqual(connection.pending_bytes, 0)
        self.assertEqual(client.texts(), [b'a["held"]'])


class RawWebSocketTests(WebSocketTestsMixin, SynchronousTestCase):
    def test_echo(self) -> None:
        """
        Each websocket text message is one message, both ways, unframed.
        """
        client = self.connect("/sockjs/websocket")
        client.send("Hello world!\uffff".encode())
        self.assertEqual(self.handlers[0].messages, ["Hello world!\uffff"])
        self.assertEqual(client.texts(), ["Hello world!\uffff".encode()])
        self.assertEqual(self.handlers[0].connection.transport_name, "websocket-raw")

    def test_short_masked_messages(self) -> None:
        """
        Short masked messages read at once are each one message, in order.
        """
        client = self.connect("/sockjs/websocket")
        texts = ["a", "\u00e9t\u00e9", "", "z" * 125]
        client.protocol.dataReceived(b"".join(masked_frame(text.encode()) for text in texts))
        self.assertEqual(self.handlers[0].messages, texts)

    def test_no_heartbeat_frames(self) -> None:
        """
        The raw websocket carries no SockJS frames at all.
        """
        client = self.connect("/sockjs/websocket")
        self.clock.advance(self.options.heartbeat_interval)
        self.assertEqual(client.texts(), [])

    def test_close(self) -> None:
        """
        close() closes the websocket with the code and reason.
        """
        client = self.connect("/sockjs/websocket")
        self.handlers[0].connection.close()
        self.assertEqual(client.received(), [(CLOSE, struct.pack("!H", 3000) + b"Go away!")])

    def test_binary_refused(self) -> None:
        """
        A binary message closes the connection with 1003.
        """
        client = self.connect("/sockjs/websocket")
        client.send(b"\x00\x01", BINARY)
        frames = client.received()
        self.assertEqual(frames[0][1][:2], struct.pack("!H", 1003))
        self.assertEqual(self.handlers[0].messages, [])


class SessionLimitTests(WebSocketTestsMixin, SynchronousTestCase):
    options = SockJSOptions(max_sessions_per_address=1)

    def test_framed_refused_beyond_limit(self) -> None:
        """
        A framed websocket beyond max_sessions_per_address gets the 1013
        close frame and a 1013 close, and opens no session; once the first
        session ends there is room again.
        """
        first = self.connect()
        second = self.connect("/sockjs/000/s2/websocket")
        reason = b"Too many sessions from your address"
        self.assertEqual(
            second.received(),
            [(TEXT, b'c[1013,"' + reason + b'"]'), (CLOSE, struct.pack("!H", 1013) + reason)],
        )
        self.assertEqual(len(self.handlers), 1)
        first.lose_connection()
        self.connect("/sockjs/000/s3/websocket")
        self.assertEqual(len(self.handlers), 2)

    def test_raw_refused_beyond_limit(self) -> None:
        """
        The raw websocket beyond the limit is closed with 1013.
        """
        self.connect("/sockjs/websocket")
        refused = self.connect("/sockjs/websocket")
        self.assertEqual(
            refused.received(),
            [(CLOSE, struct.pack("!H", 1013) + b"Too many sessions from your address")],
        )
        self.assertEqual(len(self.handlers), 1)


# Any short client frame: a text frame most often (a keystroke), with any
# payload bytes (UTF-8 or not), any mask, sometimes unmasked, unfinished, or
# another opcode, as a hostile client may send them; and text frames around
# the short header's limit of 125 bytes.
SHORT_FRAMES = st.lists(st.builds(
    lambda payload, mask, opcode, fin, masked: masked_frame(
        payload, mask=mask, opcode=opcode, fin=fin, masked=masked),
    st.one_of(st.binary(max_size=125),
              st.text(max_size=30).map(lambda t: json.dumps([t]).encode()[:125])),
    st.binary(min_size=4, max_size=4),
    st.sampled_from([TEXT, TEXT, TEXT, 0x0, BINARY, PING, 0x3]),
    st.sampled_from([True, True, True, False]),
    st.sampled_from([True, True, True, False]),
) | st.text(st.characters(min_codepoint=32, max_codepoint=126), min_size=120,
          max_size=130).map(lambda t: client_frame(t.encode())), max_size=8)


SHORT_FRAME_PROPERTY = settings(
    max_examples=300, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


class ShortFrameParserTests(WebSocketTestsMixin, SynchronousTestCase):
    """The transport's own parser of short text frames (keystrokes) against
    autobahn's: whatever a client sends, the same messages are delivered and
    the same frames (echoes, close codes) come back."""

    @SHORT_FRAME_PROPERTY
    @given(frames=SHORT_FRAMES, cuts=st.lists(st.integers(0, 1200), max_size=3))
    def test_any_short_frames_on_a_raw_websocket(self, frames, cuts):
        """Any run of short frames on a raw websocket, read at once or cut
        anywhere, gives the messages and replies autobahn's parser alone gives."""
        self.assert_parsed_as_autobahn_does("/sockjs/websocket", frames, cuts)

    @SHORT_FRAME_PROPERTY
    @given(frames=SHORT_FRAMES, cuts=st.lists(st.integers(0, 1200), max_size=3))
    def test_any_short_frames_on_a_framed_websocket(self, frames, cuts):
        """The same on a SockJS framed websocket."""
        self.assert_parsed_as_autobahn_does("/sockjs/000/s1/websocket", frames, cuts)

    def assert_parsed_as_autobahn_does(self, path, frames, cuts):
        data = b"".join(frames)
        bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
        results = []
        for parse in ("transport", "autobahn"):
            self.handlers.clear()
            client = self.connect(path)
            client.received()
            read = (client.protocol.dataReceived if parse == "transport"
                    else client.protocol._dataReceived)
            for start, end in zip(bounds, bounds[1:], strict=False):
                if client.transport.disconnecting:
                    break
                read(data[start:end])
            results.append((self.handlers[0].messages, client.received()))
            client.lose_connection()
        self.assertEqual(results[0], results[1])
