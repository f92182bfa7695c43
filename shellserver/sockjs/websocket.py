"""
The websocket transports, on autobahn's twisted.web integration: framed
(C{<prefix>/<server>/<session>/websocket}, SockJS frames) and raw
(C{<prefix>/websocket}, one websocket message per message).  A websocket
session lives exactly as long as its connection.
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import unquote

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionRequest
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from zope.interface import implementer

from ..interfaces import IConnectionTransport
from ..logs import ClientEventLog, PeerLogger
from .endpoint import Endpoint
from .framing import (
    HEARTBEAT_FRAME,
    OPEN_FRAME,
    BrokenPayload,
    close_frame,
    decode_payload,
    encode_message,
    encode_raw_message,
    messages_frame,
)
from .headers import (
    client_address,
    disable_nagle,
    peer_host,
    render_method_not_allowed,
    render_text,
)
from .options import SockJSOptions
from .sending import write_through
from .session import (
    BROKEN_FRAMING,
    MESSAGE_TOO_BIG,
    TOO_MANY_SESSIONS,
    SessionRegistry,
    SockJSConnection,
)

BINARY_NOT_SUPPORTED = (1003, "Binary messages are not supported")
TOO_MANY_PINGS = (1008, "Too many pings")
_PING_WINDOW = 60.0

# a close frame's payload is at most 125 bytes, two of them the code
_MAX_CLOSE_REASON_BYTES = 123
# RFC 6455 5.2: a server's final, unmasked text frame of fewer than 126 bytes
# is these two bytes (FIN and opcode 1; the length) and the payload.
_SHORT_TEXT_HEADERS = tuple(bytes((0x81, length)) for length in range(126))

log = Logger()


@implementer(IPushProducer)
class _TransportBackPressure:
    """
    Registered with the websocket's TCP transport in place of the HTTP
    channel that handed it over: holds the session's output in its queue
    (where C{pending_bytes} counts it) while the socket buffer is full.
    """

    def __init__(self, session: SockJSConnection, receiver: _SockJSWebSocket) -> None:
        self._session = session
        self._receiver = receiver

    def pauseProducing(self) -> None:
        self._session._pause_receiver(self._receiver)

    def resumeProducing(self) -> None:
        self._session._resume_receiver(self._receiver)

    def stopProducing(self) -> None:
        # connectionLost follows, and onClose tells the session
        pass


class _SockJSWebSocket(WebSocketServerProtocol):
    """
    What both websocket transports share: opening the session, the size
    limit, closing, back-pressure.
    """

    transport_name = ""
    transport: IConnectionTransport
    maxMessagePayloadSize: int  # set by autobahn from the factory's options
    logOctets: bool  # likewise
    # the client's address: of the upgrade request when the resource built
    # this connection (trusted proxies looked through), else the socket's peer
    client_host: str | None = None
    _encode: Callable[[str], bytes] = staticmethod(encode_message)

    def __init__(self, registry: SessionRegistry, max_message_bytes: int,
                 max_pings_per_minute: int = 120) -> None:
        super().__init__()
        self._registry = registry
        self._max_message_bytes = max_message_bytes
        self._max_pings = max_pings_per_minute
        self._pings = 0
        self._pings_since = float("-inf")
        self._session: SockJSConnection | None = None
        self._origin: str | None = None
        self._session_id = ""
        self._incoming_bytes = 0
        # messages of this connection that wait for the session's input
        # budget; while there are any, autobahn parses no further frames
        # and the socket is not read
        self._held_inputs = 0
        self._input_held = False
        self._socket_paused = False

    def connectionMade(self) -> None:
        # autobahn's messages about this connection (protocol violations, a
        # failed handshake, a dropped connection) are the peer's doing.
        if self.client_host is None:
            self.client_host = peer_host(self.transport.getPeer())
        self.log = PeerLogger(type(self).log, self.factory.client_events,
                              self.client_host, "websocket")
        super().connectionMade()
        disable_nagle(self.transport)

    def dataReceived(self, data: bytes) -> None:
        # autobahn's adapter logs each read at debug level, formatting the
        # log's fields before the level is checked: about a fifth of the
        # websocket's cost per keystroke. The frames go to its parser as
        # they would after that log, once the short ones at the start of
        # the read have been taken (_take_short_texts).
        taken = self._take_short_texts(data)
        if taken < len(data):
            self._dataReceived(data[taken:] if taken else data)

    def _take_short_texts(self, data: bytes) -> int:
        """
        Hand over the short text messages (keystrokes) that C{data} starts
        with, each a whole frame, and return how many bytes they took.

        A keystroke is one masked, final text frame of fewer than 126
        bytes; autobahn's frame parser costs it more than the rest of its
        way to the console. Such a frame is unmasked and its UTF-8 checked
        here, and handed to onMessage as autobahn would; anything else (any
        other frame, a frame split across reads, invalid UTF-8, a fragmented
        message or a ping awaiting its pong, input held over the budget, a
        closing connection) stops this, and autobahn's parser takes the
        rest, as before.
        """
        taken, size = 0, len(data)
        while (size - taken >= 6 and data[taken] == 0x81 and data[taken + 1] & 0x80
               and self.state == self.STATE_OPEN and not self.data
               and self.current_frame is None and not self.inside_message
               and not self._input_held and not self.autoPingTimeoutCall
               and not self.logFrames and not self.logOctets
               and self._perMessageCompress is None):
            length = data[taken + 1] & 0x7F
            end = taken + 6 + length
            if length >= 126 or end > size or length > self._max_message_bytes:
                break
            payload = data[taken + 6:end]
            if length:
                mask = data[taken + 2:taken + 6] * (length // 4 + 1)
                payload = (int.from_bytes(payload, "big")
                           ^ int.from_bytes(mask[:length], "big")).to_bytes(length, "big")
                try:
                    payload.decode("utf-8")
                except UnicodeDecodeError:
                    break  # autobahn fails the connection with 1007
            taken = end
            self.onMessage(payload, False)
        return taken

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        # A frame of an open connection leaves in this call when nothing is
        # queued before it (write_through), instead of on the reactor's next
        # turn; autobahn's own queue (sync writes, chopped writes, the
        # octets log) keeps its path. Its per-write debug log is skipped,
        # as in dataReceived.
        if (sync or chopsize or self.send_queue or self.logOctets
                or self.state != self.STATE_OPEN):
            super().sendData(data, sync, chopsize)
            return
        self.trafficStats.outgoingOctetsWireLevel += len(data)
        write_through(self.transport, data)

    def onConnect(self, request: ConnectionRequest) -> None:
        self._origin = request.origin or None
        self._session_id = self._session_id_from_path(request.path)
        disable_nagle(self.transport)

    def _session_id_from_path(self, path: str) -> str:
        return ""

    # Each transport writes in its own framing (the session's Receiver).
    def write_open(self) -> bool:
        raise NotImplementedError

    def write_heartbeat(self) -> bool:
        raise NotImplementedError

    def write_messages(self, encoded: list[bytes]) -> bool:
        raise NotImplementedError

    def write_close(self, code: int, reason: str) -> None:
        # each transport closes in its own framing
        raise NotImplementedError

    def onOpen(self) -> None:
        peer = self.client_host or ""
        if not self._registry.has_room_for(peer):
            self.write_close(*TOO_MANY_SESSIONS)
            return
        session = self._registry.open(
            session_id=self._session_id,
            peer_host=peer,
            origin=self._origin,
            transport_name=self.transport_name,
            encode=self._encode,
            bound=True,
        )
        self._session = session
        try:
            self.transport.unregisterProducer()
        except RuntimeError:
            # nothing was registered
            pass
        self.transport.registerProducer(_TransportBackPressure(session, self), True)
        session._attach(self)

    def onMessageBegin(self, isBinary: bool) -> None:
        super().onMessageBegin(isBinary)
        self._incoming_bytes = 0

    def onMessageFrameBegin(self, length: int) -> None:
        self._incoming_bytes += length
        if self._incoming_bytes > self._max_message_bytes and self._session:
            # Tell the client why, before autobahn (configured with the same
            # limit) fails the connection.
            self._session.close(*MESSAGE_TOO_BIG)
        super().onMessageFrameBegin(length)

    def _receive(self, session: SockJSConnection, messages: list[str]) -> None:
        """
        Hand messages to the session.  Those over its input budget are held
        there, and meanwhile this connection is not read: the kernel's
        socket buffer and TCP flow control slow the client down, and the
        reactor spends nothing on it.  The frames autobahn has read already
        stay in its buffer, unparsed, until the held messages are handed
        over; then they are parsed, in order, and only once none is left
        is the socket read again (so at most one read is buffered).
        """
        if session._receive(messages, self._held_input_done):
            return
        self._held_inputs += 1
        self._input_held = True
        if not self._socket_paused:
            self._socket_paused = True
            self.transport.pauseProducing()

    def processData(self) -> bool:
        if self._input_held and self.state == self.STATE_OPEN:
            # over the input budget: the rest waits in autobahn's buffer
            return False
        return super().processData()

    def _held_input_done(self, delivered: bool) -> None:
        self._held_inputs -= 1
        if self._held_inputs == 0:
            self._input_held = False
            # on a turn of its own: this runs while the session hands over
            # input, and parsing more would hand it more
            self.factory.reactor.callLater(0, self._continue_reading)

    def _continue_reading(self) -> None:
        """
        Parse what was read while input was held; read the socket again once
        all of it is in (also when the session ended: the closing handshake
        needs reading).
        """
        if self._input_held:
            return
        self.consumeData()
        if not self._input_held and self._socket_paused and self.state != self.STATE_CLOSED:
            self._socket_paused = False
            self.transport.resumeProducing()

    def onPing(self, payload: bytes) -> None:
        # Every ping costs a pong: a flood of them is closed, not answered.
        now = self.factory.reactor.seconds()
        if now - self._pings_since >= _PING_WINDOW:
            self._pings, self._pings_since = 0, now
        self._pings += 1
        if self._pings <= self._max_pings:
            super().onPing(payload)
        elif self._pings == self._max_pings + 1:
            if self._session is not None:
                self._session.close(*TOO_MANY_PINGS)
            else:
                self._close_websocket(*TOO_MANY_PINGS)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self._session is not None:
            self._session._receiver_lost(self)

    def dropConnection(self, abort: bool = False) -> None:
        # After a clean closing handshake autobahn resets the TCP connection;
        # end it with a FIN instead, so clients see an orderly close.  Every
        # unclean case (timeouts, violations) still aborts.
        clean = getattr(self, "wasClean", False)
        super().dropConnection(abort=abort and not clean)

    def _send_text(self, payload: bytes) -> bool:
        if self.state != self.STATE_OPEN:
            return False
        if len(payload) < len(_SHORT_TEXT_HEADERS):
            # A keystroke's echo: framed here, as autobahn's sendMessage would
            # (no compression is negotiated, server frames are not masked),
            # without its per-message checks and counters.
            self.sendData(_SHORT_TEXT_HEADERS[len(payload)] + payload)
        elif len(payload) <= self.maxMessagePayloadSize:
            self.sendMessage(payload)
        else:
            # autobahn applies maxMessagePayloadSize to what it sends as well;
            # the limit is meant for the client, so large output goes out
            # through the fragment API, which does not check it.
            self.beginMessage()
            self.sendMessageFrame(payload)
            self.endMessage()
        return True

    def _close_websocket(self, code: int, reason: str) -> None:
        if self.state != self.STATE_OPEN:
            return
        if code == 1000 or 3000 <= code <= 4999:
            self.sendClose(code, reason)
        else:
            # sendClose only takes the codes meant for applications; the
            # protocol's own (1009 message too big, 1011 internal error)
            # go out through sendCloseFrame.
            truncated = reason.encode("utf-8")[:_MAX_CLOSE_REASON_BYTES]
            self.sendCloseFrame(
                code=code,
                reasonUtf8=truncated.decode("utf-8", "ignore").encode("utf-8"),
            )


class _FramedWebSocket(_SockJSWebSocket):
    """
    C{<prefix>/<server>/<session>/websocket}: SockJS frames over websocket.
    """

    transport_name = "websocket"
    _encode = staticmethod(encode_message)

    def _session_id_from_path(self, path: str) -> str:
        segments = path.rstrip("/").split("/")
        return unquote(segments[-2]) if len(segments) >= 3 else ""

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        session = self._session
        if session is None:
            return
        if not payload and not isBinary:
            # empty websocket messages are allowed, and mean nothing
            return
        try:
            if isBinary:
                raise BrokenPayload(BROKEN_FRAMING[1])
            messages = decode_payload(payload, allow_single=True)
        except BrokenPayload:
            # Like the reference server: no close frame for a client that
            # does not speak SockJS, just the end of the websocket.
            self._close_websocket(*BROKEN_FRAMING)
            session._receiver_lost(self)
            return
        self._receive(session, messages)

    def write_open(self) -> bool:
        return self._send_text(OPEN_FRAME)

    def write_heartbeat(self) -> bool:
        return self._send_text(HEARTBEAT_FRAME)

    def write_messages(self, encoded: list[bytes]) -> bool:
        return self._send_text(messages_frame(encoded))

    def write_close(self, code: int, reason: str) -> None:
        self._send_text(close_frame(code, reason))
        self._close_websocket(code, reason)


class _RawWebSocket(_SockJSWebSocket):
    """
    C{<prefix>/websocket}: each websocket text message is one message; no
    open frame and no heartbeats (autobahn's pings keep it alive).
    """

    transport_name = "websocket-raw"
    _encode = staticmethod(encode_raw_message)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        session = self._session
        if session is None:
            return
        if isBinary:
            session.close(*BINARY_NOT_SUPPORTED)
            return
        # autobahn has validated the UTF-8 of text messages
        self._receive(session, [payload.decode("utf-8")])

    def write_open(self) -> bool:
        return self.state == self.STATE_OPEN

    def write_heartbeat(self) -> bool:
        return self.state == self.STATE_OPEN

    def write_messages(self, encoded: list[bytes]) -> bool:
        for message in encoded:
            if not self._send_text(message):
                return False
        return True

    def write_close(self, code: int, reason: str) -> None:
        self._close_websocket(code, reason)


class _SockJSWebSocketFactory(WebSocketServerFactory):
    def __init__(
        self,
        protocol_class: type[_SockJSWebSocket],
        registry: SessionRegistry,
        max_message_bytes: int,
        clock: IReactorTime,
        max_pings_per_minute: int = 120,
    ) -> None:
        # No Server header: the version of our websocket library is nobody's
        # business.
        super().__init__(server=None, reactor=clock)
        self._protocol_class = protocol_class
        self._registry = registry
        self._max_message_bytes = max_message_bytes
        self._max_pings_per_minute = max_pings_per_minute
        self.client_events = ClientEventLog(log, clock)
        # set by the resource while it builds a protocol for an upgrade request
        self.upgrading_client: str | None = None

    def buildProtocol(self, addr: object) -> _SockJSWebSocket:
        protocol = self._protocol_class(self._registry, self._max_message_bytes,
                                        self._max_pings_per_minute)
        protocol.factory = self
        if self.upgrading_client is not None:
            protocol.client_host = self.upgrading_client
        return protocol


def build_websocket_resource(
    registry: SessionRegistry,
    options: SockJSOptions,
    clock: IReactorTime,
    *,
    raw: bool,
) -> IResource:
    """
    Build the autobahn resource for one websocket transport, with every
    option that matters set here rather than left at autobahn's (permissive)
    defaults.

    autobahn's own timers (handshake timeouts, pings) run on txaio's loop,
    the global reactor; the SockJS timers (heartbeats, expiry) use C{clock}.
    """
    factory = _SockJSWebSocketFactory(
        _RawWebSocket if raw else _FramedWebSocket,
        registry,
        options.max_message_bytes,
        clock,
        options.max_client_pings_per_minute,
    )
    factory.setProtocolOptions(
        # RFC 6455 only (hybi-10 browsers are long gone)
        versions=[13],
        # no HTML status page for plain GETs; we answer those with 400
        webStatus=False,
        utf8validateIncoming=True,
        requireMaskedClientFrames=True,
        # what a client may send in one frame and in one message
        maxFramePayloadSize=options.max_message_bytes,
        maxMessagePayloadSize=options.max_message_bytes,
        # on a protocol violation, send a close frame saying why
        failByDrop=False,
        openHandshakeTimeout=5.0,
        closeHandshakeTimeout=2.0,
        tcpNoDelay=True,
        # no permessage-deflate: memory per connection, compression oracles
        perMessageCompressionAccept=lambda offers: None,
        autoPingInterval=options.websocket_ping_interval,
        autoPingTimeout=options.websocket_ping_timeout,
        # The Origin header is exposed as SockJSConnection.origin and the
        # application decides (the polling transports cannot refuse an
        # origin either, so a check here would protect nothing).
        allowedOrigins=["*"],
        allowNullOrigin=True,
        # peers are what the socket says; proxies are the application's call
        trustXForwardedFor=0,
        serveFlashSocketPolicy=False,
    )
    return _ClientAddressWebSocketResource(factory)


class _ClientAddressWebSocketResource(WebSocketResource):
    """
    Tells the connection it builds the client address of the upgrade
    request (L{client_address}: through trusted proxies), which the
    connection's own socket cannot know.
    """

    def render(self, request):
        # autobahn builds the protocol inside render, at once.
        self._factory.upgrading_client = client_address(request)
        try:
            return super().render(request)
        finally:
            self._factory.upgrading_client = None


def render_upgrade(resource: IResource, request: IRequest) -> bytes | int:
    """
    Refuse what is not a websocket handshake (autobahn would answer a
    plain GET with a status page) and hand the rest to C{resource}.
    """
    if request.method != b"GET":
        return render_method_not_allowed(request, [b"GET"])
    upgrade = (request.getHeader(b"upgrade") or b"").strip().lower()
    if upgrade != b"websocket":
        return render_text(request, 400, 'Can "Upgrade" only to "WebSocket".')
    connection = request.getHeader(b"connection") or b""
    tokens = [token.strip().lower() for token in connection.split(b",")]
    if b"upgrade" not in tokens:
        return render_text(request, 400, '"Connection" must be "Upgrade".')
    return resource.render(request)


def render_framed(endpoint: Endpoint, request: IRequest, session_id: str) -> bytes | int:
    """
    C{GET .../<server>/<session>/websocket}.
    """
    return render_upgrade(endpoint.framed_websocket, request)
