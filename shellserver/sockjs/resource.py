"""
L{SockJSResource}: the URL space of one SockJS endpoint, mounted with
C{putChild}.  Routes the static pages (greeting, C{info}, iframe), the raw
websocket and the session transports, which come from a registry.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import re
import secrets
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, cast
from urllib.parse import urlsplit

from twisted.internet.interfaces import IReactorTime
from twisted.web import http
from twisted.web.iweb import IRequest
from twisted.web.pages import notFound
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request

from . import eventsource, htmlfile, jsonp, websocket, xhr
from .endpoint import Endpoint, SessionTransport
from .headers import (
    HTML,
    JSON,
    TEXT_PLAIN,
    render_method_not_allowed,
    render_not_found,
    render_preflight,
    set_cors,
    set_long_cache,
    set_no_cache,
)
from .options import SockJSOptions
from .session import SessionRegistry, SockJSConnection, SockJSHandler

if TYPE_CHECKING:
    from shellserver.config import InputBudgetSettings

SESSION_TRANSPORTS: Mapping[bytes, SessionTransport] = {
    b"xhr": SessionTransport(methods=(b"POST",), render=xhr.render_polling),
    b"xhr_send": SessionTransport(methods=(b"POST",), render=xhr.render_send),
    b"xhr_streaming": SessionTransport(methods=(b"POST",), render=xhr.render_streaming),
    b"eventsource": SessionTransport(
        methods=(b"GET",), render=eventsource.render_eventsource, preflight=False
    ),
    b"htmlfile": SessionTransport(
        methods=(b"GET",), render=htmlfile.render_htmlfile, preflight=False
    ),
    b"jsonp": SessionTransport(methods=(b"GET",), render=jsonp.render_polling, preflight=False),
    b"jsonp_send": SessionTransport(methods=(b"POST",), render=jsonp.render_send, preflight=False),
    b"websocket": SessionTransport(
        methods=(b"GET",),
        render=websocket.render_framed,
        preflight=False,
        needs_websocket=True,
    ),
}
"""
The transports at C{<prefix>/<server>/<session>/<name>}, by name.
"""

_IFRAME_NAME = re.compile(rb"iframe[0-9a-z_.-]*\.html")

_IFRAME_SCRIPT = """
    document.domain = document.domain;
    SockJS.bootstrap_iframe();
  """

_IFRAME_PAGE = """\
<!DOCTYPE html>
<html>
<head>
  <meta http-equiv="X-UA-Compatible" content="IE=edge" />
  <meta http-equiv="Content-Type" content="text/html; charset=UTF-8" />
  <script src="{client_url}"></script>
  <script>{script}</script>
</head>
<body>
  <h2>Don't panic!</h2>
  <p>This is a SockJS hidden iframe. It's used for cross domain magic.</p>
</body>
</html>"""


class _Page(Resource):
    """
    A page without children.
    """

    def getChild(self, path: bytes, request: IRequest) -> IResource:
        return notFound()


class _Greeting(_Page):
    """
    C{<prefix>} and C{<prefix>/}.
    """

    def render_GET(self, request: IRequest) -> bytes:
        request.setHeader(b"Content-Type", TEXT_PLAIN)
        return b"Welcome to SockJS!\n"


class _Info(_Page):
    """
    C{<prefix>/info}: what the server offers, asked before every session.
    """

    def __init__(self, options: SockJSOptions, clock: IReactorTime) -> None:
        super().__init__()
        self._options = options
        self._clock = clock

    def render_GET(self, request: IRequest) -> bytes:
        request.setHeader(b"Content-Type", JSON)
        set_no_cache(request)
        set_cors(request)
        info = {
            "websocket": self._options.websocket,
            "cookie_needed": self._options.cookie_needed,
            "origins": ["*:*"],
            # browsers lack a good source of randomness; sockjs-client
            # seeds from this
            "entropy": secrets.randbits(32),
        }
        return json.dumps(info).encode("ascii")

    def render_OPTIONS(self, request: IRequest) -> bytes:
        return render_preflight(request, self._clock, [b"OPTIONS", b"GET"])


class _IframePage(_Page):
    """
    C{<prefix>/iframe*.html}: the page sockjs-client loads for its
    cross-domain transports.  The same for every version suffix, strongly
    cached, with an ETag.
    """

    def __init__(self, client_url: str, clock: IReactorTime) -> None:
        super().__init__()
        page = _IFRAME_PAGE.format(
            client_url=html.escape(client_url, quote=True), script=_IFRAME_SCRIPT
        )
        self._body = page.encode("utf-8")
        self._etag = b'"%s"' % (hashlib.sha256(self._body).hexdigest()[:32].encode(),)
        self._csp = iframe_page_policy(client_url).encode("ascii")
        self._clock = clock

    def render_GET(self, request: IRequest) -> bytes:
        set_long_cache(request, self._clock)
        request.setHeader(b"Content-Security-Policy", self._csp)
        if request.setETag(self._etag) is http.CACHED:
            cast(Request, request).defaultContentType = None  # not in IRequest
            return b""
        request.setHeader(b"Content-Type", HTML)
        return self._body


_HOST_SOURCE = re.compile(r"[A-Za-z0-9.:\[\]-]+")


def iframe_page_policy(client_url: str) -> str:
    """
    The Content-Security-Policy of the iframe page: its one inline script
    (by hash), sockjs-client from C{client_url}, and the requests and
    frames of the transports it relays, all to this origin.
    """
    digest = hashlib.sha256(_IFRAME_SCRIPT.encode("utf-8")).digest()
    scripts = ["'self'", f"'sha256-{base64.b64encode(digest).decode('ascii')}'"]
    location = urlsplit(client_url)
    if location.netloc and not _HOST_SOURCE.fullmatch(location.netloc):
        raise ValueError(f"client_url has an unusable host: {client_url!r}")
    if location.netloc:
        # a client on another host (a CDN); only the host, for a script
        scripts.append(
            f"{location.scheme}://{location.netloc}" if location.scheme else location.netloc
        )
    return (
        f"default-src 'none'; script-src {' '.join(scripts)}; connect-src 'self'; "
        "frame-src 'self'; base-uri 'none'; form-action 'none'"
    )


class _RawWebSocketEntry(_Page):
    """
    C{<prefix>/websocket}.
    """

    def __init__(self, endpoint: Endpoint) -> None:
        super().__init__()
        self._endpoint = endpoint

    def render(self, request: IRequest) -> bytes | int:
        if not self._endpoint.options.websocket:
            return render_not_found(request)
        return websocket.render_upgrade(self._endpoint.raw_websocket, request)


def _is_valid_id(segment: bytes) -> bool:
    return bool(segment) and b"." not in segment


class _SessionRoute(Resource):
    """
    C{<prefix>/<server>/<session>/<transport>}.  The server id only matters
    to load balancers.
    """

    isLeaf = True

    def __init__(
        self,
        endpoint: Endpoint,
        transports: Mapping[bytes, SessionTransport],
        server_id: bytes,
    ) -> None:
        super().__init__()
        self._endpoint = endpoint
        self._transports = transports
        self._server_id = server_id

    def render(self, request: IRequest) -> bytes | int:
        if len(request.postpath) != 2:
            return render_not_found(request)
        session_id, name = request.postpath
        transport = self._transports.get(name)
        if (
            transport is None
            or not _is_valid_id(self._server_id)
            or not _is_valid_id(session_id)
            or (transport.needs_websocket and not self._endpoint.options.websocket)
        ):
            return render_not_found(request)
        if request.method == b"OPTIONS" and transport.preflight:
            return render_preflight(
                request, self._endpoint.clock, (b"OPTIONS",) + transport.methods
            )
        if request.method not in transport.methods:
            allowed = transport.methods + ((b"OPTIONS",) if transport.preflight else ())
            return render_method_not_allowed(request, allowed)
        return transport.render(self._endpoint, request, session_id.decode("utf-8", "replace"))


class SockJSResource(Resource):
    """
    A SockJS endpoint (protocol 0.3.3): mount it with
    C{root.putChild(b"sockjs", resource)}.

    @param open_session: called with a L{SockJSConnection} whenever a
        session opens, over any transport; returns the handler of that
        session (C{message_received(text)}, C{closed()}).
    @param clock: drives heartbeats and session expiry.
    @param options: the endpoint's settings.
    @param input_dropped: told how many client messages, held over the
        input budget, a session dropped when it ended (for the metrics).
    """

    def __init__(
        self,
        open_session: Callable[[SockJSConnection], SockJSHandler],
        *,
        clock: IReactorTime,
        options: SockJSOptions = SockJSOptions(),  # noqa: B008 (frozen value)
        input_dropped: Callable[[int], None] | None = None,
    ) -> None:
        super().__init__()
        registry = SessionRegistry(open_session, clock, options, input_dropped)
        self._endpoint = Endpoint(
            registry=registry,
            options=options,
            clock=clock,
            framed_websocket=websocket.build_websocket_resource(
                registry, options, clock, raw=False
            ),
            raw_websocket=websocket.build_websocket_resource(registry, options, clock, raw=True),
        )
        self._greeting = _Greeting()
        self._iframe = _IframePage(options.client_url, clock)
        self.putChild(b"info", _Info(options, clock))
        self.putChild(b"websocket", _RawWebSocketEntry(self._endpoint))

    def use_input_budget(self, budget: InputBudgetSettings) -> None:
        """The input budget (SockJSOptions' C{input_*}) of sessions opened
        from now on; open sessions keep theirs."""
        self._endpoint.registry.use_input_budget(budget)

    @property
    def session_count(self) -> int:
        """
        How many sessions of the polling and streaming transports are alive
        (websocket sessions are not counted here).
        """
        return len(self._endpoint.registry)

    def render(self, request: IRequest) -> bytes | int:
        # the prefix without a trailing slash
        return self._greeting.render(request)

    def getChild(self, path: bytes, request: IRequest) -> IResource:
        if path == b"":
            return self._greeting
        if _IFRAME_NAME.fullmatch(path):
            return self._iframe
        return _SessionRoute(self._endpoint, SESSION_TRANSPORTS, path)
