"""
Listening services from C{--listen} endpoint strings.

strports serves them all but one: on C{haproxy:ssl:...} Twisted's PROXY
protocol wrapper sits inside the endpoint it wraps, so it would expect the
PROXY header inside TLS, while HAProxy (C{send-proxy} with C{ssl}) writes it
in the clear before the TLS handshake.  For that prefix the layers are put
the other way round: TCP, then the PROXY header, then TLS, then the site.
"""

from twisted.application.internet import StreamServerEndpointService
from twisted.application.strports import service as strports_service
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ServerEndpoint, serverFromString
from twisted.internet.interfaces import IProtocolFactory
from twisted.protocols.haproxy import proxyEndpoint
from twisted.protocols.tls import TLSMemoryBIOFactory

PROXY_BEFORE_TLS = "haproxy:ssl:"


def listener_service(reactor, description: str, factory: IProtocolFactory
                     ) -> StreamServerEndpointService:
    """A service listening on C{description} with C{factory}, as
    C{strports.service}, but with the PROXY header before TLS on
    C{haproxy:ssl:} (see the module docstring)."""
    if not description.startswith(PROXY_BEFORE_TLS):
        return strports_service(description, factory)
    tls = serverFromString(reactor, "ssl:" + description[len(PROXY_BEFORE_TLS):])
    if not isinstance(tls, SSL4ServerEndpoint):
        raise ValueError(f"{description!r} does not describe a TLS listener")
    # What Twisted's ssl: parser read (port, interface, backlog, certificate)
    # is only kept on the endpoint; it has served the same fields since 10.x.
    tcp = TCP4ServerEndpoint(reactor, tls._port, tls._backlog, tls._interface)
    listener = StreamServerEndpointService(
        proxyEndpoint(tcp), TLSMemoryBIOFactory(tls._sslContextFactory, False, factory))
    # as strports.service does: a port that cannot be bound fails start-up
    listener._raiseSynchronously = True
    return listener
