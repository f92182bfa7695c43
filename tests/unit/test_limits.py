"""Connection limits (shellserver.limits, ShellSite): caps, deadlines, bounded requests."""

from io import BytesIO

from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.interfaces import IHandshakeListener, ISSLTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.haproxy._wrapper import HAProxyProtocolWrapper, HAProxyWrappingFactory
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from zope.interface import directlyProvides, implementer

from shellserver.config import ServerConfig
from shellserver.limits import (
    CLOSING_TIMEOUT,
    REFUSAL_LINGER,
    ConnectionGuard,
    ConnectionLimits,
    LimitedHTTPChannel,
)
from shellserver.web import ShellSite

LIMITS = ConnectionLimits(
    max_connections_per_address=2,
    tls_handshake_timeout=5.0,
    request_timeout=3.0,
    idle_connection_timeout=30.0,
    max_request_header_bytes=1024,
    max_request_headers=5,
    max_request_body_bytes=100,
)


def peer(host="198.51.100.9", port=40000):
    return IPv4Address("TCP", host, port)


class AbortableTransport(StringTransport):
    """A StringTransport that records abortConnection, optionally as TLS."""

    aborted = False

    def __init__(self, *, tls=False, address=None):
        super().__init__(peerAddress=address or peer())
        if tls:
            directlyProvides(self, ISSLTransport)

    def abortConnection(self):
        self.aborted = True
        self.disconnecting = True


class Echo(Protocol):
    def dataReceived(self, data):
        self.transport.write(data)


@implementer(IHandshakeListener)
class Listening(Protocol):
    handshakes = 0

    def handshakeCompleted(self):
        self.handshakes += 1


class GuardTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.guard = ConnectionGuard(Factory.forProtocol(Echo), LIMITS, self.clock)

    def connect(self, host="198.51.100.9", *, tls=False):
        address = peer(host)
        protocol = self.guard.buildProtocol(address)
        transport = AbortableTransport(tls=tls, address=address)
        protocol.makeConnection(transport)
        return protocol, transport

    def test_data_passes_through(self):
        """Below the cap a connection is the wrapped protocol's, unchanged."""
        protocol, transport = self.connect()
        protocol.dataReceived(b"hello")
        self.assertEqual(transport.value(), b"hello")
        self.assertFalse(transport.aborted)

    def test_cap_per_address(self):
        """Past the cap a new connection from that address is aborted at once."""
        self.connect()
        self.connect()
        _, third = self.connect()
        self.assertTrue(third.aborted)
        _, other = self.connect("203.0.113.5")
        self.assertFalse(other.aborted)
        self.assertEqual(self.guard.connections_from("198.51.100.9"), 2)

    def test_closed_connections_free_the_cap(self):
        """A closed connection no longer counts; the address is forgotten at zero."""
        first, _ = self.connect()
        self.connect()
        first.connectionLost(None)
        _, again = self.connect()
        self.assertFalse(again.aborted)
        for protocol in list(self.guard.protocols):
            protocol.connectionLost(None)
        self.assertEqual(self.guard.connections_from("198.51.100.9"), 0)
        self.assertEqual(self.guard._per_address, {})

    def test_cap_in_all(self):
        """Past max_connections in all, a new connection from any address (or
        none) is aborted at once; a closed one makes room again."""
        limits = ConnectionLimits(max_connections=3, max_connections_per_address=2)
        guard = ConnectionGuard(Factory.forProtocol(Echo), limits, self.clock)
        self.guard = guard
        first, _ = self.connect("198.51.100.1")
        self.connect("198.51.100.2")
        self.connect("198.51.100.3")
        self.assertEqual(guard.connections, 3)
        _, refused = self.connect("198.51.100.4")
        self.assertTrue(refused.aborted)
        unix = guard.buildProtocol(UNIXAddress(None))
        transport = AbortableTransport()
        unix.makeConnection(transport)
        self.assertTrue(transport.aborted)
        self.assertEqual(guard.connections, 3)
        first.connectionLost(None)
        self.assertEqual(guard.connections, 2)
        _, admitted = self.connect("198.51.100.4")
        self.assertFalse(admitted.aborted)

    def test_unix_peers_not_capped(self):
        """Peers without an IP address (a local proxy) are not capped."""
        for _ in range(5):
            protocol = self.guard.buildProtocol(UNIXAddress(None))
            transport = AbortableTransport(address=UNIXAddress(None))
            protocol.makeConnection(transport)
            self.assertFalse(transport.aborted)

    def proxied(self, header=b"", *, tls=False):
        """A connection accepted from the balancer (127.0.0.1) by Twisted's
        PROXY wrapper around the guard, sent ``header``: its PROXY wrapper,
        guarded connection and transport."""
        balancer = peer("127.0.0.1", 50000)
        proxy = HAProxyWrappingFactory(self.guard).buildProtocol(balancer)
        transport = AbortableTransport(tls=tls, address=balancer)
        proxy.makeConnection(transport)
        if header:
            proxy.dataReceived(header)
        return proxy, proxy.wrappedProtocol, transport

    def test_proxy_wrapper_recognised(self):
        """Twisted's PROXY wrapper is still the class the guard recognises,
        and still connects the guard at accept time, before the header."""
        proxy, guarded, _ = self.proxied()
        self.assertIsInstance(proxy, HAProxyProtocolWrapper)
        self.assertTrue(guarded.connected)
        self.assertTrue(guarded._awaiting_visitor)

    def test_proxy_visitors_capped_apart(self):
        """Behind a PROXY header the cap counts the visitor the header names:
        a visitor past it is reset, another through the same balancer is not."""
        for _ in range(2):
            _, _, transport = self.proxied(b"PROXY TCP4 192.0.2.1 10.0.0.1 4000 443\r\nhi")
            self.assertEqual(transport.value(), b"hi")
        _, _, refused = self.proxied(b"PROXY TCP4 192.0.2.1 10.0.0.1 4001 443\r\nhi")
        self.assertTrue(refused.aborted)
        self.assertEqual(refused.value(), b"")
        _, _, other = self.proxied(b"PROXY TCP4 192.0.2.2 10.0.0.1 4002 443\r\nhi")
        self.assertFalse(other.aborted)
        self.assertEqual(self.guard.connections_from("192.0.2.1"), 2)
        self.assertEqual(self.guard.connections_from("127.0.0.1"), 0)

    def test_proxy_visitor_attributed_at_handshake(self):
        """Behind PROXY and TLS the visitor is attributed when the handshake
        completes, which cannot happen before the header has been read."""
        _, guarded, _ = self.proxied(b"PROXY TCP4 192.0.2.1 10.0.0.1 4000 443\r\n", tls=True)
        self.assertEqual(self.guard.connections_from("192.0.2.1"), 0)
        guarded.handshakeCompleted()
        self.assertEqual(self.guard.connections_from("192.0.2.1"), 1)
        self.assertEqual(guarded.address, "192.0.2.1")

    def test_proxy_header_pending_counts_in_all(self):
        """A connection still waiting for its PROXY header counts against
        max_connections (and no address); closing it leaves nothing behind."""
        limits = ConnectionLimits(max_connections=2, max_connections_per_address=2)
        self.guard = ConnectionGuard(Factory.forProtocol(Echo), limits, self.clock)
        first, _, _ = self.proxied()
        second, _, _ = self.proxied(b"PROXY TCP4 192.0.2.1 10.0.0.1 4000 443\r\nhi")
        self.assertEqual(self.guard.connections, 2)
        self.assertEqual(self.guard._per_address, {"192.0.2.1": 1})
        _, _, refused = self.proxied()
        self.assertTrue(refused.aborted)
        for proxy in (first, second):
            proxy.connectionLost(None)
        self.assertEqual(self.guard.connections, 0)
        self.assertEqual(self.guard._per_address, {})

    def test_proxy_header_pending_handshake_deadline(self):
        """A TLS connection whose PROXY header never arrives is aborted at
        the handshake deadline."""
        _, _, transport = self.proxied(b"PROXY TCP4 192.0", tls=True)
        self.clock.advance(LIMITS.tls_handshake_timeout + 0.1)
        self.assertTrue(transport.aborted)

    def test_refused_connections_leave_counts_balanced(self):
        """Connections refused for their address, directly or behind a PROXY
        header, count nothing once closed; the address is forgotten at zero."""
        held = [self.connect("192.0.2.1")[0] for _ in range(2)]
        refused_direct, transport = self.connect("192.0.2.1")
        self.assertTrue(transport.aborted)
        refused_proxied, _, transport = self.proxied(
            b"PROXY TCP4 192.0.2.1 10.0.0.1 4000 443\r\nhi")
        self.assertTrue(transport.aborted)
        self.assertEqual(self.guard.connections, 4)
        for protocol in (refused_direct, refused_proxied, *held):
            protocol.connectionLost(None)
        self.assertEqual(self.guard.connections, 0)
        self.assertEqual(self.guard._per_address, {})

    def test_handshake_deadline(self):
        """A TLS connection whose handshake does not finish in time is aborted."""
        _, transport = self.connect(tls=True)
        self.clock.advance(LIMITS.tls_handshake_timeout - 0.1)
        self.assertFalse(transport.aborted)
        self.clock.advance(0.2)
        self.assertTrue(transport.aborted)

    def test_handshake_completed_in_time(self):
        """A finished handshake cancels the deadline and is passed on."""
        self.guard.wrappedFactory = Factory.forProtocol(Listening)
        protocol, transport = self.connect(tls=True)
        protocol.handshakeCompleted()
        self.clock.advance(LIMITS.tls_handshake_timeout * 2)
        self.assertFalse(transport.aborted)
        self.assertEqual(protocol.wrappedProtocol.handshakes, 1)

    def test_no_handshake_deadline_without_tls(self):
        """Plain TCP connections have no handshake deadline."""
        _, transport = self.connect()
        self.clock.advance(LIMITS.tls_handshake_timeout * 2)
        self.assertFalse(transport.aborted)

    def test_wrapper_hides_tls_but_knows_it(self):
        """The wrapper does not claim ISSLTransport (autobahn) but records ``secure``."""
        protocol, _ = self.connect(tls=True)
        self.assertFalse(ISSLTransport.providedBy(protocol))
        self.assertTrue(protocol.secure)

    def test_closing_deadline(self):
        """A connection told to close that lingers is aborted after CLOSING_TIMEOUT."""
        protocol, transport = self.connect()
        protocol.loseConnection()
        self.assertTrue(transport.disconnecting)
        self.clock.advance(CLOSING_TIMEOUT + 0.1)
        self.assertTrue(transport.aborted)

    def test_no_timers_after_close(self):
        """Once the connection is gone, no deadline is left on the clock."""
        protocol, _ = self.connect(tls=True)
        protocol.loseConnection()
        protocol.connectionLost(None)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class SiteTestCase(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        root = Resource()
        root.putChild(b"", Hello())
        self.site = ShellSite(root, limits=LIMITS, reactor=self.clock)

    def connect(self):
        channel = self.site.buildProtocol(peer())
        transport = AbortableTransport(address=peer())
        channel.makeConnection(transport)
        return channel, transport


class Hello(Resource):
    isLeaf = True

    def render_GET(self, request):
        return b"hello"

    def render_POST(self, request):
        return b"got %d" % len(request.content.read())


class ChannelTests(SiteTestCase):
    def test_site_builds_limited_channels(self):
        """The site's channels carry its limits and idle timeout."""
        channel, _ = self.connect()
        self.assertIsInstance(channel, LimitedHTTPChannel)
        self.assertIs(channel.limits, LIMITS)
        self.assertEqual(channel.timeOut, LIMITS.idle_connection_timeout)

    def test_ordinary_request(self):
        """A request within every limit is served."""
        channel, transport = self.connect()
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 OK"))
        self.assertTrue(transport.value().endswith(b"hello"))

    def test_no_server_header(self):
        """Responses do not name the server software."""
        channel, transport = self.connect()
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertNotIn(b"server:", transport.value().lower())

    def assertRefused(self, transport, code):
        head = transport.value().split(b"\r\n", 1)[0]
        self.assertEqual(head.split(b" ")[1], b"%d" % code, transport.value())
        self.assertIn(b"Connection: close", transport.value())
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.producerState, "paused")

    def test_request_line_too_long(self):
        """A request line over the header budget gets 414."""
        channel, transport = self.connect()
        channel.dataReceived(b"GET /" + b"a" * 2000 + b" HTTP/1.1\r\n")
        self.assertRefused(transport, 414)

    def test_unterminated_line_too_long(self):
        """A line that never ends is refused once it passes the budget."""
        channel, transport = self.connect()
        channel.dataReceived(b"GET / HTTP/1.1\r\nX-A: " + b"a" * 2000)
        self.assertRefused(transport, 431)

    def test_headers_too_large(self):
        """Headers over the byte budget get 431."""
        channel, transport = self.connect()
        channel.dataReceived(b"GET / HTTP/1.1\r\n" + b"X-A: " + b"a" * 500 + b"\r\n"
                             + b"X-B: " + b"b" * 500 + b"\r\n")
        self.assertRefused(transport, 431)

    def test_too_many_headers(self):
        """More header lines than allowed get 431."""
        channel, transport = self.connect()
        channel.dataReceived(b"GET / HTTP/1.1\r\n"
                             + b"".join(b"X-%d: a\r\n" % i for i in range(6)))
        self.assertRefused(transport, 431)

    def test_declared_body_too_large(self):
        """A Content-Length over the limit gets 413 before the body is read."""
        channel, transport = self.connect()
        channel.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 101\r\n"
                             b"Expect: 100-continue\r\n\r\n")
        self.assertRefused(transport, 413)
        self.assertNotIn(b"100 Continue", transport.value())

    def test_chunked_body_too_large(self):
        """A chunked body is counted as it comes: 413 past the limit, never served."""
        channel, transport = self.connect()
        channel.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        channel.dataReceived(b"60\r\n" + b"a" * 0x60 + b"\r\n")
        self.assertEqual(transport.value(), b"")
        channel.dataReceived(b"10\r\n" + b"a" * 0x10 + b"\r\n0\r\n\r\n")
        self.assertRefused(transport, 413)
        self.assertNotIn(b"got", transport.value())

    def test_body_within_limit_in_memory(self):
        """A body within the limit is served, from memory."""
        channel, transport = self.connect()
        channel.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        self.assertIsInstance(channel.requests[-1].content, BytesIO)
        channel.dataReceived(b"5\r\nhello\r\n0\r\n\r\n")
        self.assertTrue(transport.value().endswith(b"got 5"), transport.value())

    def test_nothing_read_after_refusal(self):
        """After a refusal the rest of what the client sends is ignored."""
        channel, transport = self.connect()
        channel.dataReceived(b"GET /" + b"a" * 2000 + b" HTTP/1.1\r\n")
        written = transport.value()
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(transport.value(), written)

    def test_nothing_read_after_bad_request(self):
        """After twisted.web's own 400 nothing more is parsed."""
        channel, transport = self.connect()
        channel.dataReceived(b"GARBAGE\r\n")
        written = transport.value()
        self.assertTrue(written.startswith(b"HTTP/1.1 400"))
        channel.dataReceived(b"Host: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(transport.value(), written)

    def test_refused_client_reset_after_linger(self):
        """A refused client that does not go is reset after REFUSAL_LINGER."""
        channel, transport = self.connect()
        channel.dataReceived(b"GET /" + b"a" * 2000 + b" HTTP/1.1\r\n")
        self.clock.advance(REFUSAL_LINGER + 0.1)
        self.assertTrue(transport.aborted)

    def test_slow_request_head(self):
        """A request head still incomplete after request_timeout gets 408."""
        channel, transport = self.connect()
        for _ in range(5):
            channel.dataReceived(b"G")
            self.clock.advance(0.5)
        self.assertEqual(transport.value(), b"")
        channel.dataReceived(b"ET / HTTP/1.1\r\n")
        self.clock.advance(LIMITS.request_timeout - 2.5 + 0.1)
        self.assertRefused(transport, 408)

    def test_slow_body(self):
        """A body trickling in past request_timeout gets 408 too."""
        channel, transport = self.connect()
        channel.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n")
        for _ in range(10):
            channel.dataReceived(b"a")
            self.clock.advance(0.5)
        self.assertRefused(transport, 408)

    def test_deadline_ends_with_the_request(self):
        """Once a request has arrived, the deadline no longer applies."""
        channel, transport = self.connect()
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.clock.advance(LIMITS.request_timeout * 2)
        self.assertNotIn(b"408", transport.value())

    def test_idle_connection_closed(self):
        """A connection without a request is closed after the idle timeout."""
        channel, transport = self.connect()
        self.clock.advance(LIMITS.idle_connection_timeout + 0.1)
        self.assertTrue(transport.disconnecting)

    def test_secure_through_the_guard(self):
        """Behind the guard, a TLS connection's requests are still secure."""
        guard = ConnectionGuard(self.site, LIMITS, self.clock)
        wrapper = guard.buildProtocol(peer())
        wrapper.makeConnection(AbortableTransport(tls=True))
        self.assertTrue(wrapper.wrappedProtocol.isSecure())


class LimitsFromConfigTests(SynchronousTestCase):
    def test_defaults_agree(self):
        """ConnectionLimits' defaults are the [server] section's defaults."""
        self.assertEqual(ConnectionLimits.from_config(ServerConfig()), ConnectionLimits())
