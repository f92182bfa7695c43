"""
Response headers the SockJS protocol prescribes (CORS, caching, the
JSESSIONID cookie) and small helpers shared by the HTTP side.
"""

from collections.abc import Iterable
from typing import cast

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.web.http import datetimeToString
from twisted.web.iweb import IRequest
from twisted.web.server import Request

from .options import SockJSOptions

ONE_YEAR = 365 * 24 * 60 * 60

TEXT_PLAIN = b"text/plain; charset=UTF-8"
JAVASCRIPT = b"application/javascript; charset=UTF-8"
JSON = b"application/json; charset=UTF-8"
HTML = b"text/html; charset=UTF-8"

NO_CACHE = b"no-store, no-cache, no-transform, must-revalidate, max-age=0"


def set_cors(request: IRequest) -> None:
    """
    Allow the requesting origin, with credentials so the JSESSIONID cookie
    flows.  Which origins may use a session is the application's decision
    (L{SockJSConnection.origin}); the protocol itself answers them all.
    """
    origin = request.getHeader(b"origin")
    if origin:
        request.setHeader(b"Access-Control-Allow-Origin", origin)
        request.setHeader(b"Access-Control-Allow-Credentials", b"true")
    else:
        request.setHeader(b"Access-Control-Allow-Origin", b"*")
    request.setHeader(b"Vary", b"Origin")
    asked_headers = request.getHeader(b"access-control-request-headers")
    if asked_headers:
        request.setHeader(b"Access-Control-Allow-Headers", asked_headers)


def set_no_cache(request: IRequest) -> None:
    """
    Forbid caching (iOS 6 even caches POST responses).
    """
    request.setHeader(b"Cache-Control", NO_CACHE)


def set_long_cache(request: IRequest, clock: IReactorTime) -> None:
    """
    Let everybody cache the response for a year.
    """
    request.setHeader(b"Cache-Control", b"public, max-age=%d" % (ONE_YEAR,))
    request.setHeader(b"Expires", datetimeToString(clock.seconds() + ONE_YEAR))


def set_session_cookie(request: IRequest, options: SockJSOptions) -> None:
    """
    Set (or echo) the JSESSIONID cookie sticky load balancers look for.
    """
    if options.cookie_needed:
        value = request.getCookie(b"JSESSIONID") or b"dummy"
        request.addCookie(b"JSESSIONID", value, path=b"/")


def render_preflight(request: IRequest, clock: IReactorTime, methods: Iterable[bytes]) -> bytes:
    """
    Answer a CORS preflight (C{OPTIONS}) request.
    """
    request.setResponseCode(204)
    cast(Request, request).defaultContentType = None  # not in IRequest
    set_long_cache(request, clock)
    request.setHeader(b"Access-Control-Max-Age", b"%d" % (ONE_YEAR,))
    request.setHeader(b"Access-Control-Allow-Methods", b", ".join(methods))
    set_cors(request)
    return b""


def render_text(request: IRequest, code: int, text: str) -> bytes:
    """
    Answer with a short plain-text body.
    """
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", TEXT_PLAIN)
    return text.encode("utf-8")


def render_not_found(request: IRequest) -> bytes:
    return render_text(request, 404, "Not found.\n")


def render_method_not_allowed(request: IRequest, allowed: Iterable[bytes]) -> bytes:
    """
    Answer 405 with an C{Allow} header and neither body nor content type.
    """
    request.setResponseCode(405)
    cast(Request, request).defaultContentType = None  # not in IRequest
    request.setHeader(b"Allow", b", ".join(allowed))
    return b""


def peer_host(address: IAddress) -> str:
    """
    The IP address of a peer as text, or C{""} for non-IP peers.
    """
    if isinstance(address, IPv4Address | IPv6Address):
        return address.host
    return ""


def client_address(request: IRequest) -> str:
    """
    The address of the client that sent C{request}, as text (C{""} for
    non-IP peers): what sessions, console tokens and every per-address
    limit are bound to.  The one place that looks through the trusted
    proxies of the site (its C{trusted_proxies}, a
    L{shellserver.proxies.TrustedProxies}): their forwarding header names
    the visitor; anybody else's is ignored.
    """
    peer = peer_host(request.getClientAddress())
    trusted = getattr(getattr(request, "site", None), "trusted_proxies", None)
    if trusted is None or not trusted.networks:
        return peer
    values = request.requestHeaders.getRawHeaders(trusted.header.encode("ascii"), [])
    return trusted.client_of(peer, [value.decode("latin-1") for value in values])


def request_origin(request: IRequest) -> str | None:
    """
    The C{Origin} header of C{request}, if any.
    """
    origin = request.getHeader(b"origin")
    if origin is None:
        return None
    return origin.decode("latin-1")


def disable_nagle(transport: object) -> None:
    """
    Send small writes (keystroke echoes) at once; some transports (HTTP/2
    streams, UNIX sockets) have no such option.
    """
    set_no_delay = getattr(transport, "setTcpNoDelay", None)
    if set_no_delay is None:
        return
    try:
        set_no_delay(True)
    except OSError:
        pass
