"""What one client connection may cost the server, and for how long.

Two layers, both configured by one frozen L{ConnectionLimits}:

- L{ConnectionGuard} wraps the site's factory (inside TLS): a cap on
  concurrent connections per client address, a deadline for the TLS
  handshake, and a deadline for a closing connection to be gone.
- L{LimitedHTTPChannel} and L{LimitedRequest} (used by
  L{shellserver.web.ShellSite}): bounded request heads and bodies, answered
  with 414, 431 or 413, and a deadline (408) for a request to arrive once it
  has begun, so a client trickling bytes cannot hold a connection.

Connections that have become websockets or streaming responses are not
touched by these timeouts: they have their own heartbeats.
"""

from __future__ import annotations

from io import BytesIO
from typing import cast

from attrs import frozen
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHandshakeListener,
    IProtocol,
    IProtocolFactory,
    IProtocolNegotiationFactory,
    IReactorTime,
    ISSLTransport,
    ITransport,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger

# Twisted exports only proxyEndpoint; its wrapper is how a connection behind
# a PROXY header is recognised (tests/unit/test_limits.py pins it).
from twisted.protocols.haproxy._wrapper import HAProxyProtocolWrapper
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.server import Request
from zope.interface import directlyProvides, implementer, providedBy

from shellserver.interfaces import IConnectionTransport
from shellserver.logs import ClientEventLog, PeerLogger
from shellserver.metrics import Metrics
from shellserver.sockjs.headers import client_address

log = Logger()

# RFC 9110 and 6585 names; twisted.web.http.RESPONSES lacks 431.
_REASONS = {
    408: b"Request Timeout",
    413: b"Content Too Large",
    414: b"URI Too Long",
    431: b"Request Header Fields Too Large",
}

# Seconds a refused client has to read its answer before the connection is
# reset (nothing it sends meanwhile is read).
REFUSAL_LINGER = 2.0

# Seconds a connection told to close may take to be gone (a TLS peer that
# never answers our close_notify would otherwise keep it open).
CLOSING_TIMEOUT = 10.0


@frozen(kw_only=True)
class ConnectionLimits:
    """Limits on one client's connections; see etc/shellserver.toml."""

    max_connections: int = 4096
    max_connections_per_address: int = 64
    tls_handshake_timeout: float = 10.0
    request_timeout: float = 15.0
    idle_connection_timeout: float = 60.0
    max_request_header_bytes: int = 16384
    max_request_headers: int = 100
    max_request_body_bytes: int = 262144

    @classmethod
    def from_config(cls, server) -> ConnectionLimits:
        """The limits of a L{shellserver.config.ServerConfig}."""
        return cls(
            max_connections=server.max_connections,
            max_connections_per_address=server.max_connections_per_address,
            tls_handshake_timeout=server.tls_handshake_timeout,
            request_timeout=server.request_timeout,
            idle_connection_timeout=server.idle_connection_timeout,
            max_request_header_bytes=server.max_request_header_bytes,
            max_request_headers=server.max_request_headers,
            max_request_body_bytes=server.max_request_body_bytes,
        )


def _address_host(address: IAddress | None) -> str | None:
    """The IP address of a peer; None for peers without one (UNIX sockets)."""
    return getattr(address, "host", None)


def _behind_proxy_header(transport) -> bool:
    """Whether ``transport`` (or one it is layered on, as TLS is on the
    PROXY wrapper of a C{haproxy:ssl:} listener) reads a PROXY header first.

    Twisted's PROXY wrapper connects the protocols it wraps at accept time,
    before the header arrives, and only then does C{getPeer()} name the
    visitor instead of the balancer; it passes nothing on (no data, hence no
    TLS handshake) before the header is read."""
    while transport is not None:
        if isinstance(transport, HAProxyProtocolWrapper):
            return True
        # vars(): a ProtocolWrapper answers any other name from its transport.
        transport = vars(transport).get("transport") if hasattr(transport, "__dict__") else None
    return False


class _RefusedConnection(Protocol):
    """A connection over a cap (in all, or per address): reset at once, nothing read."""

    transport: IConnectionTransport

    def connectionMade(self) -> None:
        self.transport.abortConnection()


@implementer(IHandshakeListener)
class _GuardedConnection(ProtocolWrapper):
    """One connection under a L{ConnectionGuard}: its TLS and closing deadlines."""

    factory: ConnectionGuard
    transport: IConnectionTransport
    # The client's IP address, counted against its cap; None until known
    # (behind a PROXY header) and for peers without one (UNIX sockets).
    address: str | None = None
    # Behind a PROXY header whose visitor is not attributed yet.
    _awaiting_visitor = False
    # Refused for its address: nothing more passes to the wrapped protocol.
    _refused = False
    _wrapped_connected = False
    _handshake: IDelayedCall | None = None
    _closing: IDelayedCall | None = None

    secure = False

    def makeConnection(self, transport) -> None:
        # As ProtocolWrapper does, but without claiming to be the TLS
        # transport: autobahn, given this wrapper when it takes a connection
        # over, would ask it for TLS details only TLSMemoryBIOProtocol has.
        # LimitedHTTPChannel.isSecure asks ``secure`` instead.
        self.secure = ISSLTransport.providedBy(transport)
        directlyProvides(self, providedBy(transport) - ISSLTransport)
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        if _behind_proxy_header(transport):
            # The peer is the balancer until the header is read: the visitor
            # is attributed at the first data or TLS handshake that follows.
            # Meanwhile max_connections and the deadlines bound it.
            self._awaiting_visitor = True
        elif not self.factory.attribute(self, _address_host(transport.getPeer())):
            self._refuse()
            return
        if self.secure:
            self._handshake = self.factory.clock.callLater(
                self.factory.limits.tls_handshake_timeout, self._handshake_too_slow)
        self._wrapped_connected = True
        # It provides the transport's interfaces (directlyProvides above).
        self.wrappedProtocol.makeConnection(cast(ITransport, self))

    def _visitor_known(self) -> bool:
        """Attribute the connection to the visitor the PROXY header named,
        once, and say whether it may go on (else it is being reset)."""
        if self._awaiting_visitor:
            self._awaiting_visitor = False
            if not self.factory.attribute(self, _address_host(self.transport.getPeer())):
                self._refuse()
        return not self._refused

    def _refuse(self) -> None:
        self._refused = True
        _cancel(self._handshake)
        self._handshake = None
        self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        if self._visitor_known():
            super().dataReceived(data)

    def _handshake_too_slow(self) -> None:
        self._handshake = None
        self.factory.client_events.info(
            self.address or _address_host(self.transport.getPeer()), "slow handshake",
            "TLS handshake from {peer} took too long: dropped",
            peer=self.address or _address_host(self.transport.getPeer()))
        self.transport.abortConnection()

    def handshakeCompleted(self) -> None:
        _cancel(self._handshake)
        self._handshake = None
        if not self._visitor_known():
            return
        if IHandshakeListener.providedBy(self.wrappedProtocol):
            self.wrappedProtocol.handshakeCompleted()

    def loseConnection(self) -> None:
        if not self.disconnecting and self.connected:
            self._closing = self.factory.clock.callLater(CLOSING_TIMEOUT, self._closing_too_slow)
        super().loseConnection()

    def _closing_too_slow(self) -> None:
        self._closing = None
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        for call in (self._handshake, self._closing):
            _cancel(call)
        self._handshake = self._closing = None
        if self._wrapped_connected:
            super().connectionLost(reason)
        else:
            # Refused before the wrapped protocol was connected: it has
            # nothing to lose.
            self.factory.unregisterProtocol(self)
            # As ProtocolWrapper.connectionLost does; its annotation omits None.
            self.wrappedProtocol = None  # type: ignore[assignment]


def _cancel(call: IDelayedCall | None) -> None:
    if call is not None and call.active():
        call.cancel()


@implementer(IProtocolNegotiationFactory)
class ConnectionGuard(WrappingFactory):
    """
    Wraps the site's factory (put it where the listener is built; TLS wraps
    it in turn): at most C{max_connections} connections in all and
    C{max_connections_per_address} per client IP address at once, beyond
    which a new connection is reset at once; a TLS handshake must finish
    within C{tls_handshake_timeout}; a connection told to close is aborted
    after L{CLOSING_TIMEOUT}.

    The wrapper stays in place when autobahn takes a connection over for a
    websocket, so websockets count against the cap until they close.
    """

    protocol = _GuardedConnection
    noisy = False
    # set by makeService: refusals are counted there
    metrics: Metrics | None = None

    def __init__(self, wrapped: IProtocolFactory, limits: ConnectionLimits,
                 clock: IReactorTime) -> None:
        super().__init__(wrapped)
        self.limits = limits
        self.clock = clock
        self._per_address: dict[str, int] = {}
        self._refusing: set[str] = set()
        self._total = 0
        self._full = False  # refusing for the total, logged once per episode
        self.client_events = ClientEventLog(log, clock)

    def acceptableProtocols(self) -> list[bytes]:
        # TLS asks the factory it wraps for the ALPN protocols; with none
        # offered, a browser's ALPN hello ends in an internal-error alert.
        negotiation = IProtocolNegotiationFactory(self.wrappedFactory, None)
        return list(negotiation.acceptableProtocols()) if negotiation else [b"http/1.1"]

    def connections_from(self, address: str) -> int:
        """How many connections ``address`` holds now."""
        return self._per_address.get(address, 0)

    @property
    def connections(self) -> int:
        """How many connections are held now, from every address."""
        return self._total

    # Twisted types WrappingFactory.buildProtocol as returning its wrapper;
    # a listener takes any protocol, and a refused one needs no wrapper.
    def buildProtocol(self, addr: IAddress | None) -> IProtocol | None:  # type: ignore[override]
        if self._total >= self.limits.max_connections:
            if not self._full:
                self._full = True
                log.warn("{count} connections are open (server.max_connections): "
                         "refusing more", count=self._total)
            self._count_refusal("max_connections")
            return _RefusedConnection()
        # The per-address cap waits for the connection's address, which
        # behind a PROXY header is not ``addr`` (the balancer's): see
        # _GuardedConnection.makeConnection and attribute().
        return super().buildProtocol(addr)

    def attribute(self, protocol: _GuardedConnection, host: str | None) -> bool:
        """Count ``protocol`` against ``host``'s cap, or refuse it (False)
        when ``host`` already holds C{max_connections_per_address}."""
        if host is None:
            return True
        if self.connections_from(host) >= self.limits.max_connections_per_address:
            if host not in self._refusing:
                # Logged once per episode, not once per connection of a flood.
                self._refusing.add(host)
                # An episode ends when one closes: a client cycling at the
                # cap starts many, hence the per-address budget as well.
                self.client_events.warn(
                    host, "too many connections",
                    "{address} holds {count} connections: refusing more",
                    address=host, count=self.connections_from(host))
            self._count_refusal("per_address")
            return False
        protocol.address = host
        self._per_address[host] = self.connections_from(host) + 1
        return True

    def _count_refusal(self, limit: str) -> None:
        if self.metrics is not None:
            self.metrics.request_rejected(limit)

    def registerProtocol(self, p: _GuardedConnection) -> None:
        super().registerProtocol(p)
        self._total += 1

    def unregisterProtocol(self, p: _GuardedConnection) -> None:
        super().unregisterProtocol(p)
        self._total -= 1
        if self._total < self.limits.max_connections:
            self._full = False
        if p.address is not None:
            remaining = self.connections_from(p.address) - 1
            if remaining > 0:
                self._per_address[p.address] = remaining
            else:
                self._per_address.pop(p.address, None)
            if remaining < self.limits.max_connections_per_address:
                self._refusing.discard(p.address)


# The limit each refusal's status stands for (shellserver.metrics).
_LIMIT_NAMES = {408: "slow_request", 413: "body_too_large", 414: "line_too_long",
                431: "headers_too_large"}


class LimitedHTTPChannel(HTTPChannel):
    """
    An HTTP/1.1 channel with bounded request heads and bodies and a deadline
    for each request to arrive.  L{shellserver.web.ShellSite} sets
    C{limits} on every channel it builds.

    Refusals are a short plain-text response and the end of the connection;
    nothing more is read from it.
    """

    limits = ConnectionLimits()
    transport: IConnectionTransport
    # set by the site: the per-address budget for client-caused messages
    client_events: ClientEventLog | None = None
    _head_bytes = 0
    _head_lines = 0
    _arrival: IDelayedCall | None = None
    _linger: IDelayedCall | None = None
    refused = False

    # A class attribute in Twisted, which only reads it.
    @property
    def _log(self):  # type: ignore[override]
        # twisted.web's messages about a connection ("Timing out client") are
        # the client's doing: within its address's budget.
        logger = vars(HTTPChannel)["_log"].__get__(self, type(self))
        if self.client_events is None:
            return logger
        peer = self.transport.getPeer() if self.transport is not None else None
        return PeerLogger(logger, self.client_events, _address_host(peer), "connection")

    def isSecure(self) -> bool:
        return getattr(self.transport, "secure", False) or super().isSecure()

    def dataReceived(self, data: bytes) -> None:
        # Nothing more once refused or closing (twisted.web's own 400s, too).
        if self.refused or self.transport.disconnecting:
            return
        # In line mode while waiting for a request head (raw mode: a body, or
        # a request being answered); its first byte starts the deadline.
        if self._arrival is None and self.line_mode:
            self._arrival = self.callLater(self.limits.request_timeout, self._too_slow)
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        if self.refused:
            return
        self._head_lines += 1
        self._head_bytes += len(line) + 2
        if self._head_bytes > self.limits.max_request_header_bytes:
            if self._head_lines == 1:
                self.refuse(414, "The request line is too long.")
            else:
                self.refuse(431, "The request headers are too large.")
        elif self._head_lines > self.limits.max_request_headers + 1:
            self.refuse(431, "The request has too many headers.")
        else:
            super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        if self._head_lines == 0:
            self.refuse(414, "The request line is too long.")
        else:
            self.refuse(431, "The request headers are too large.")

    def allHeadersReceived(self) -> None:
        self._head_bytes = self._head_lines = 0
        if self.length is not None and self.length > self.limits.max_request_body_bytes:
            self.refuse(413, "The request body is too large.")
            return
        super().allHeadersReceived()

    def allContentReceived(self) -> None:
        self._cancel_arrival()
        if not self.refused:
            super().allContentReceived()

    def _cancel_arrival(self) -> None:
        _cancel(self._arrival)
        self._arrival = None

    def _too_slow(self) -> None:
        self._arrival = None
        peer = self.transport.getPeer()
        if self.client_events is None:
            log.info("request from {peer} too slow: dropped", peer=peer)
        else:
            self.client_events.info(_address_host(peer), "slow request",
                                    "request from {peer} too slow: dropped", peer=peer)
        self.refuse(408, "The request took too long to arrive.")

    def refuse(self, code: int, message: str) -> None:
        """Answer ``code`` with ``message`` and close; ignore the rest."""
        if self.refused:
            return
        self.refused = True
        self._cancel_arrival()
        # The site (ShellSite) carries the metrics, when makeService gave it some.
        metrics = getattr(getattr(self, "site", None), "metrics", None)
        if metrics is not None:
            metrics.request_rejected(_LIMIT_NAMES.get(code, str(code)))
        body = message.encode("utf-8") + b"\n"
        self.transport.write(b"".join([
            b"HTTP/1.1 %d %s\r\n" % (code, _REASONS[code]),
            b"Content-Type: text/plain; charset=utf-8\r\n",
            b"Content-Length: %d\r\n" % (len(body),),
            b"Cache-Control: no-store\r\n",
            b"X-Content-Type-Options: nosniff\r\n",
            b"Connection: close\r\n\r\n",
            body,
        ]))
        # Read nothing more: a client pushing a huge body costs no decryption.
        self.transport.pauseProducing()
        self.loseConnection()
        self._linger = self.callLater(REFUSAL_LINGER, self._abort)

    def _abort(self) -> None:
        self._linger = None
        if self.transport is not None:
            self.transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_arrival()
        _cancel(self._linger)
        self._linger = None
        super().connectionLost(reason)


class LimitedRequest(Request):
    """A request whose body is kept in memory, up to the channel's limit.

    A declared C{Content-Length} over the limit is refused by the channel
    before any of the body is read; a chunked body is counted as it comes.
    """

    _body_bytes = 0

    # A class attribute in Twisted, which only reads it.
    @property
    def _log(self):  # type: ignore[override]
        # twisted.web's messages about a request (a HEAD answered by GET) are
        # the client's doing: within its address's budget.
        logger = vars(Request)["_log"].__get__(self, type(self))
        events = getattr(self.channel, "client_events", None)
        if events is None:
            return logger
        return PeerLogger(logger, events, client_address(self) or None, "request")

    def gotLength(self, length: int | None) -> None:
        # Bodies are small and bounded: no temporary files.
        self.content = BytesIO()

    def handleContentChunk(self, data: bytes) -> None:
        channel = self.channel
        if channel is None or getattr(channel, "refused", False):
            return
        self._body_bytes += len(data)
        limit = getattr(channel, "limits", ConnectionLimits()).max_request_body_bytes
        if self._body_bytes > limit:
            cast(LimitedHTTPChannel, channel).refuse(413, "The request body is too large.")
            return
        super().handleContentChunk(data)
