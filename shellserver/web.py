"""The resource tree: /, /status, /embed.js, /console/, /static/, /sockjs.

Resources only translate HTTP into calls and pages; the console policy lives
in shellserver.console, the transport in shellserver.sockjs.
"""

from __future__ import annotations

import html
import json
import os
import re
from collections.abc import Sequence

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.http import combinedLogFormatter
from twisted.web.pages import notFound
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from twisted.web.static import File

from shellserver.admission import AdmissionStatus, IAdmission, PagePlan
from shellserver.auth import TokenAuthority, new_unregistered_user
from shellserver.limits import ConnectionLimits, LimitedHTTPChannel, LimitedRequest
from shellserver.logs import ClientEventLog
from shellserver.metrics import Metrics
from shellserver.proxies import TrustedProxies
from shellserver.sockjs.headers import client_address
from shellserver.users import UnregisteredUsers

log = Logger()

# Where the browser libraries installed by `npm ci` in web/ are served from.
VENDOR_FILES = {
    b"xterm.js": ("@xterm", "xterm", "lib", "xterm.js"),
    b"xterm.css": ("@xterm", "xterm", "css", "xterm.css"),
    b"addon-fit.js": ("@xterm", "addon-fit", "lib", "addon-fit.js"),
    b"addon-web-links.js": ("@xterm", "addon-web-links", "lib", "addon-web-links.js"),
    b"addon-serialize.js": ("@xterm", "addon-serialize", "lib", "addon-serialize.js"),
    b"sockjs.min.js": ("sockjs-client", "dist", "sockjs.min.js"),
    # the admin page's charts (shellserver.admin)
    b"uPlot.iife.min.js": ("uplot", "dist", "uPlot.iife.min.js"),
    b"uPlot.min.css": ("uplot", "dist", "uPlot.min.css"),
}

# The terminal page loads only our own origin's scripts. xterm.js sets
# element styles from script, hence 'unsafe-inline' for styles only. The
# SockJS fallbacks need our own origin for frames (iframe transports) and
# form posts (jsonp_send); JSONP scripts come from 'self' as well.
CONSOLE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "connect-src 'self'; img-src 'self' data:; font-src 'self'; frame-src 'self'; "
    "frame-ancestors 'self'; base-uri 'none'; form-action 'self'"
)
PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "frame-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'self'"
)


REFUSED_CSP = (
    "default-src 'none'; style-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'self'"
)


def with_frame_ancestors(csp: str, host_origins: Sequence[str]) -> str:
    """``csp`` letting the host origins frame the page besides our own."""
    ancestors = " ".join(["'self'", *host_origins])
    return csp.replace("frame-ancestors 'self'", f"frame-ancestors {ancestors}")


def with_node_origins(csp: str, origins: Sequence[str]) -> str:
    """``csp`` letting the page connect to (and frame, for SockJS's iframe
    transports) a cluster's node origins besides its own."""
    frames = " ".join(origins)
    # An https: source does not match wss: URLs (only 'self' does both), so
    # each node's websocket origin is listed beside it.
    sockets = " ".join(f"{origin} {origin.replace('https://', 'wss://', 1)}"
                       if origin.startswith("https://") else origin for origin in origins)
    return (csp.replace("connect-src 'self'", f"connect-src 'self' {sockets}")
            .replace("frame-src 'self'", f"frame-src 'self' {frames}"))


def render_when_decided(request, body: Deferred):
    """What a render method returns for a body that ``body`` gives: the body
    itself when it is decided already (one node), else NOT_DONE_YET and the
    body written when it comes (a cluster asks Redis), unless the client went
    away meanwhile. A failure is a 500 with a short message, and logged."""
    answered: list[bytes] = []
    waiting = False
    gone = False

    def went_away(_) -> None:
        nonlocal gone
        gone = True

    def failed(failure) -> bytes:
        log.failure("{path} failed", failure, path=request.path)
        request.setResponseCode(500)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"The console service failed to answer; try again.\n"

    def deliver(data: bytes) -> None:
        if not waiting:
            answered.append(data)
        elif not gone:
            request.write(data)
            request.finish()

    body.addErrback(failed).addCallback(deliver)
    if answered:
        return answered[0]
    waiting = True
    request.notifyFinish().addErrback(went_away)
    return NOT_DONE_YET


class MissingWebAssets(Exception):
    """web/ or its npm packages are missing; str() says what to run."""


# A Host header is host[:port] (RFC 9110 7.2, RFC 3986 3.2.2): a DNS name or
# IPv4 address, or an IPv6 literal in brackets. Only the characters a browser
# sends are accepted, since the host becomes the console token's origin.
MAX_HOST_LENGTH = 255
_HOST = re.compile(rb"(?:\[[0-9A-Fa-f:.]{2,45}\]|[A-Za-z0-9._~-]+)(?::([0-9]{1,5}))?")


def host_header_problem(request) -> str | None:
    """Why the request's Host header is unusable, or None if it is fine.

    A request without one (HTTP/1.0) is served as ``localhost``.
    """
    values = request.requestHeaders.getRawHeaders(b"host")
    if values is None:
        return None
    if len(values) > 1:
        return "The request has more than one Host header."
    host = values[0]
    if len(host) > MAX_HOST_LENGTH:
        return f"The Host header is longer than {MAX_HOST_LENGTH} characters."
    match = _HOST.fullmatch(host)
    if match is None or (match.group(1) is not None and int(match.group(1)) > 65535):
        return "The Host header is not a host name or address with an optional port."
    return None


class BadRequestPage(Resource):
    """A ``400`` with a short plain-text reason, for any method."""

    isLeaf = True

    def __init__(self, message: str) -> None:
        super().__init__()
        self._body = message.encode("utf-8") + b"\n"

    def render(self, request) -> bytes:
        request.setResponseCode(400)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        return self._body


def request_origin(request) -> str:
    """The origin the browser sees for this request: scheme://host[:port]."""
    scheme = "https" if request.isSecure() else "http"
    host = request.getHeader(b"host") or b"localhost"
    return f"{scheme}://{host.decode('ascii', 'replace')}"


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class StaticFiles(File):
    """Files without directory listings."""

    def directoryListing(self):
        return notFound()

    def getChild(self, path, request):
        # A NUL (from %00) would make the file lookup fail with a 500; File
        # logs a traceback for every name that is not UTF-8 (%ff).
        if b"\0" in path or not _is_utf8(path):
            return notFound()
        return super().getChild(path, request)

    def createSimilarFile(self, path):
        similar = super().createSimilarFile(path)
        similar.__class__ = StaticFiles
        return similar


class ConsolePage(Resource):
    """``GET /console/``: a new unregistered user and a page holding its token.

    When no console would be admitted now, a friendly page says why and when
    to try again (429 or 503 with Retry-After), and no token is issued. So
    does an address past C{admission.pages_per_address_per_minute}, at the
    cost of a few dictionary lookups: no token, no user, no log line (the
    refusals are logged once a minute per address by admission).
    """

    isLeaf = True

    def __init__(self, template: str, tokens: TokenAuthority, clock: IReactorTime,
                 *, refused_template: str, admission: IAdmission | None = None,
                 users: UnregisteredUsers | None = None,
                 host_origins: Sequence[str] = (), sockjs_url: str = "../sockjs") -> None:
        super().__init__()
        self._template = template
        self._refused_template = refused_template
        self._tokens = tokens
        self._clock = clock
        self._admission = admission
        self._users = users
        self._sockjs_url = sockjs_url
        self.set_host_origins(host_origins)

    def set_host_origins(self, host_origins: Sequence[str]) -> None:
        """Allow these embedding origins from now on (a reload)."""
        self._host_origins = tuple(host_origins)
        self._csp = with_frame_ancestors(CONSOLE_CSP, self._host_origins).encode()
        self._refused_csp = with_frame_ancestors(REFUSED_CSP, self._host_origins).encode()

    def render_GET(self, request) -> bytes:
        if request.postpath not in ([], [b""]):
            request.setResponseCode(404)
            return b"Not found"
        if not request.path.endswith(b"/"):
            query = request.uri[len(request.path):]
            request.redirect(request.path + b"/" + query)
            return b""
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        address = client_address(request)
        if self._admission is None:
            return self._page(request, address, PagePlan())
        decided = self._admission.plan_page(address)
        decided.addCallback(lambda plan: self._page(request, address, plan))
        return render_when_decided(request, decided)

    def _page(self, request, address: str, plan: PagePlan) -> bytes:
        """The console page for ``plan``, or the refusal it holds."""
        if plan.refusal is not None:
            if not plan.logged:
                request.access_log_skipped = True
            return self._refuse(request, plan.refusal, logged=plan.logged)
        user = new_unregistered_user(self._clock, address, self._host_origin(request))
        if self._users is not None:
            self._users.add(user)
        try:
            # A token for another node only when the cluster placed it there.
            elsewhere = {} if plan.node is None else {"node": plan.node}
            token = self._tokens.mint(user_id=user.user_id, origin=request_origin(request),
                                      client_address=address, **elsewhere)
        except ValueError:
            # ShellSite refuses such Host headers first; this keeps a bad one
            # from ever being a 500 here.
            if self._users is not None:
                self._users.forget(user.user_id)
            return BadRequestPage("The Host header cannot be used for a console.").render(
                request)
        log.info("unregistered user {user} from {address} (host {host})",
                 user=user.user_id, address=address, host=user.host_origin or "-")
        page = (
            self._template
            .replace("{{token}}", html.escape(token, quote=True))
            .replace("{{sockjs_url}}",
                     html.escape(plan.sockjs_url or self._sockjs_url, quote=True))
        )
        csp = self._csp
        if plan.connect_origins:
            csp = with_node_origins(csp.decode(), plan.connect_origins).encode()
        request.setHeader(b"content-security-policy", csp)
        # Under no-referrer, browsers send "Origin: null" on the form POSTs
        # of jsonp_send, and the token is bound to the page's origin; the
        # referrer still goes to nobody but ourselves.
        request.setHeader(b"referrer-policy", b"same-origin")
        return page.encode("utf-8")

    def _host_origin(self, request) -> str:
        """The embedding page's origin, as embed.js reports it, if allowed."""
        values = request.args.get(b"host", [])
        host = values[0].decode("utf-8", "replace") if values else ""
        return host if host in self._host_origins else ""

    def _refuse(self, request, status: AdmissionStatus, *, logged: bool = True) -> bytes:
        if logged:
            log.info("console page refused: {reason}", reason=status.reason)
        request.setResponseCode(status.http_status)
        if status.retry_after:
            request.setHeader(b"retry-after", str(status.retry_after).encode())
        request.setHeader(b"content-security-policy", self._refused_csp)
        title = "Try again soon" if status.reason != "switched-off" else "Consoles are paused"
        page = (
            self._refused_template
            .replace("{{title}}", html.escape(title))
            .replace("{{message}}", html.escape(status.message or ""))
            .replace("{{reason}}", html.escape(status.reason or ""))
        )
        return page.encode("utf-8")


class StatusPage(Resource):
    """``GET /status``: whether a console would start now; starts nothing.

    Host pages ping it on load (embed.js), so it is small, cacheable for a few
    seconds, and answers CORS for the configured host origins.
    """

    isLeaf = True

    def __init__(self, admission: IAdmission, *, host_origins: Sequence[str],
                 selector: str, max_age: int) -> None:
        super().__init__()
        self._admission = admission
        self._host_origins = frozenset(host_origins)
        self._selector = selector
        self._max_age = max_age

    def set_host_origins(self, host_origins: Sequence[str]) -> None:
        """Answer CORS for these origins from now on (a reload)."""
        self._host_origins = frozenset(host_origins)

    def _cors(self, request) -> None:
        request.setHeader(b"vary", b"Origin")
        origin = request.getHeader(b"origin")
        if origin is not None and origin.decode("ascii", "replace") in self._host_origins:
            request.setHeader(b"access-control-allow-origin", origin)

    def render_OPTIONS(self, request) -> bytes:
        self._cors(request)
        request.setHeader(b"access-control-allow-methods", b"GET")
        request.setHeader(b"access-control-max-age", b"86400")
        request.setResponseCode(204)
        return b""

    def render_GET(self, request) -> bytes:
        self._cors(request)
        decided = self._admission.status_json(client_address(request))

        def write(status: dict) -> bytes:
            body = dict(status, selector=self._selector)
            request.setHeader(b"content-type", b"application/json")
            # Per client address (rate limits), so private; short-lived.
            request.setHeader(b"cache-control",
                              f"private, max-age={self._max_age}".encode())
            return json.dumps(body, separators=(",", ":")).encode()

        return render_when_decided(request, decided.addCallback(write))


class EmbedScript(Resource):
    """``GET /embed.js``: the script host pages include; cacheable, cross-origin."""

    isLeaf = True

    def __init__(self, script: bytes) -> None:
        super().__init__()
        self._script = script

    def render_GET(self, request) -> bytes:
        if request.postpath not in ([], [b""]):
            request.setResponseCode(404)
            return b"Not found"
        request.setHeader(b"content-type", b"text/javascript; charset=utf-8")
        request.setHeader(b"cache-control", b"public, max-age=300")
        # Host pages load it from another origin, possibly with crossorigin=.
        request.setHeader(b"access-control-allow-origin", b"*")
        request.setHeader(b"cross-origin-resource-policy", b"cross-origin")
        return self._script


class HostPage(Resource):
    """``GET /``: the demo host page."""

    isLeaf = True

    def __init__(self, page: bytes) -> None:
        super().__init__()
        self._page = page

    def render_GET(self, request) -> bytes:
        if request.postpath not in ([], [b""]):
            request.setResponseCode(404)
            return b"Not found"
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"content-security-policy", PAGE_CSP.encode())
        return self._page


class Root(Resource):
    def __init__(self, host_page: Resource) -> None:
        super().__init__()
        self._host_page = host_page

    def getChild(self, path: bytes, request):
        if path == b"":
            return self._host_page
        return notFound()


def vendor_resource(node_modules: str) -> Resource:
    vendor = Resource()
    for name, parts in VENDOR_FILES.items():
        path = os.path.join(node_modules, *parts)
        vendor.putChild(name, StaticFiles(path))
    return vendor


def check_web_assets(web_dir: str) -> None:
    missing = [
        os.path.join(web_dir, "node_modules", *parts)
        for parts in VENDOR_FILES.values()
        if not os.path.isfile(os.path.join(web_dir, "node_modules", *parts))
    ]
    for name in ("index.html", "console.html", "refused.html", "static/embed.js"):
        if not os.path.exists(os.path.join(web_dir, name)):
            missing.append(os.path.join(web_dir, name))
    if missing:
        raise MissingWebAssets(
            "browser files are missing (run `npm ci` in web/): " + ", ".join(missing)
        )


def _read(web_dir: str, *parts: str) -> bytes:
    with open(os.path.join(web_dir, *parts), "rb") as f:
        return f.read()


def build_resource(*, web_dir: str, tokens: TokenAuthority, clock: IReactorTime,
                   sockjs: Resource, admission: IAdmission | None = None,
                   users: UnregisteredUsers | None = None,
                   host_origins: Sequence[str] = (), selector: str = "[data-shellserver]",
                   status_max_age: int = 5) -> Resource:
    """The whole tree; ``sockjs`` is the SockJS endpoint for consoles."""
    check_web_assets(web_dir)
    root = Root(HostPage(_read(web_dir, "index.html")))
    root.putChild(b"console", ConsolePage(
        _read(web_dir, "console.html").decode("utf-8"), tokens, clock,
        refused_template=_read(web_dir, "refused.html").decode("utf-8"),
        admission=admission, users=users, host_origins=host_origins,
    ))
    if admission is not None:
        root.putChild(b"status", StatusPage(admission, host_origins=host_origins,
                                            selector=selector, max_age=status_max_age))
    root.putChild(b"embed.js", EmbedScript(_read(web_dir, "static", "embed.js")))
    static = StaticFiles(os.path.join(web_dir, "static"))
    static.putChild(b"vendor", vendor_resource(os.path.join(web_dir, "node_modules")))
    root.putChild(b"static", static)
    root.putChild(b"sockjs", sockjs)
    return root


def under_base_path(root: Resource, base_path: str) -> Resource:
    """Mount ``root`` at ``base_path`` ("/a/b", or "" for the top): for a
    reverse proxy that passes /a/b/... through unchanged. Every page uses
    URLs relative to itself, so nothing else needs to know the prefix."""
    if not base_path:
        return root
    top = outer = Resource()
    segments = base_path.strip("/").split("/")
    for segment in segments[:-1]:
        inner = Resource()
        outer.putChild(segment.encode(), inner)
        outer = inner
    outer.putChild(segments[-1].encode(), _BaseRedirect(root))
    return top


class _BaseRedirect(Resource):
    """The mount point: "/a/b" redirects to "/a/b/" (relative URLs need the
    slash); everything below is the site."""

    def __init__(self, site_root: Resource) -> None:
        super().__init__()
        self._site_root = site_root

    def getChildWithDefault(self, path: bytes, request):
        return self._site_root.getChildWithDefault(path, request)

    def render(self, request) -> bytes:
        query = request.uri[len(request.path):]
        request.redirect(request.path + b"/" + query)
        return b""


def set_host_origins(root: Resource, host_origins: Sequence[str]) -> None:
    """Change the embedding origins of a tree from L{build_resource} (a
    reload): the console page's frame-ancestors and the status CORS."""
    for name in (b"console", b"status"):
        page = root.children.get(name)
        if page is not None:
            page.set_host_origins(host_origins)


class _VisitorRequest:
    """A request whose client address is its visitor's (L{client_address})."""

    def __init__(self, request) -> None:
        self._request = request

    def __getattr__(self, name: str):
        # the formatter reads attributes beyond IRequest (clientproto, sentLength)
        return getattr(self._request, name)

    def getClientAddress(self):
        visitor = client_address(self._request)
        if not visitor:
            return self._request.getClientAddress()
        kind = IPv6Address if ":" in visitor else IPv4Address
        return kind("TCP", visitor, 0)


def visitor_log_formatter(timestamp: str, request) -> str:
    """The combined access log line, naming the visitor behind a trusted
    proxy rather than the proxy."""
    return combinedLogFormatter(timestamp, _VisitorRequest(request))


class ShellSite(Site):
    """A Site that sets the headers every response carries, with bounded
    requests (shellserver.limits): wrap it in a ConnectionGuard to listen."""

    # Twisted types it as the factory of its HTTP/2-capable channel; a plain
    # HTTPChannel class is called the same way (with no arguments).
    protocol = LimitedHTTPChannel  # type: ignore[assignment]
    requestFactory = LimitedRequest
    displayTracebacks = False
    # shellserver.metrics.Metrics, set by makeService: LimitedHTTPChannel
    # counts the requests it refuses there
    metrics: Metrics | None = None

    def __init__(self, resource, *, limits: ConnectionLimits = ConnectionLimits(),  # noqa: B008
                 reactor: IReactorTime | None = None, hsts_max_age: int = 0,
                 trusted_proxies: TrustedProxies = TrustedProxies()) -> None:  # noqa: B008
        # No resource reads form bodies through request.args (jsonp_send
        # parses its own, with a field cap): parsing them is work for nothing.
        super().__init__(resource, timeout=limits.idle_connection_timeout, reactor=reactor,
                         parsePOSTFormSubmission=False, logFormatter=visitor_log_formatter)
        self.limits = limits
        # Refused requests, logged within a budget per client address.
        self.client_events = ClientEventLog(log, self.reactor)
        self._hsts = f"max-age={hsts_max_age}".encode() if hsts_max_age else None
        # Read by client_address(request) for every request of this site.
        self.trusted_proxies = trusted_proxies

    def buildProtocol(self, addr):
        channel = super().buildProtocol(addr)
        channel.limits = self.limits
        channel.client_events = self.client_events
        channel.MAX_LENGTH = self.limits.max_request_header_bytes
        channel.totalHeadersSize = self.limits.max_request_header_bytes
        channel.maxHeaders = self.limits.max_request_headers
        return channel

    def getResourceFor(self, request):
        # Our versions are nobody's business.
        request.responseHeaders.removeHeader(b"server")
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"referrer-policy", b"no-referrer")
        if self._hsts is not None and request.isSecure() and hsts_applies(request):
            request.setHeader(b"strict-transport-security", self._hsts)
        # Checked before any resource: the Host becomes the origin in tokens
        # and redirects, for every path.
        problem = host_header_problem(request)
        if problem is not None:
            address = client_address(request) or None
            self.client_events.info(address, "bad host header",
                                    "refused a request from {address}: {problem}",
                                    address=address, problem=problem)
            return BadRequestPage(problem)
        return super().getResourceFor(request)

    def log(self, request) -> None:
        # Refused page floods are logged once a minute (admission), not per request.
        if getattr(request, "access_log_skipped", False):
            return
        # The access log line of a refused request (4xx, 5xx) is client-caused
        # too: within the same per-address budget, so a flood of bad requests
        # cannot flood the log.
        if request.code >= 400:
            address = client_address(request) or None
            if not self.client_events.allow(address, "refused request"):
                return
        super().log(request)


def hsts_applies(request) -> bool:
    """Whether a TLS response to ``request`` should carry HSTS: not for
    localhost names, where a remembered policy would force https on every
    other development server of the machine for max-age (browsers ignore it
    for IP addresses and untrusted certificates anyway)."""
    host = request.getRequestHostname().lower().rstrip(b".")
    return host != b"localhost" and not host.endswith(b".localhost")
