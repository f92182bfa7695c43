"""The resource tree: /, /console/, /static/, /sockjs.

Resources only translate HTTP into calls and pages; the console policy lives
in shellserver.console, the transport in shellserver.sockjs.
"""

from __future__ import annotations

import html
import os

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.pages import notFound
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.static import File

from shellserver.auth import TokenAuthority, new_unregistered_user

log = Logger()

# Where the browser libraries installed by `npm ci` in web/ are served from.
VENDOR_FILES = {
    b"xterm.js": ("@xterm", "xterm", "lib", "xterm.js"),
    b"xterm.css": ("@xterm", "xterm", "css", "xterm.css"),
    b"addon-fit.js": ("@xterm", "addon-fit", "lib", "addon-fit.js"),
    b"sockjs.min.js": ("sockjs-client", "dist", "sockjs.min.js"),
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


class MissingWebAssets(Exception):
    """web/ or its npm packages are missing; str() says what to run."""


def request_origin(request) -> str:
    """The origin the browser sees for this request: scheme://host[:port]."""
    scheme = "https" if request.isSecure() else "http"
    host = request.getHeader(b"host") or b"localhost"
    return f"{scheme}://{host.decode('ascii', 'replace')}"


class StaticFiles(File):
    """Files without directory listings."""

    def directoryListing(self):
        return notFound()

    def createSimilarFile(self, path):
        similar = super().createSimilarFile(path)
        similar.__class__ = StaticFiles
        return similar


class ConsolePage(Resource):
    """``GET /console/``: a new unregistered user and a page holding its token."""

    isLeaf = True

    def __init__(self, template: str, tokens: TokenAuthority, clock: IReactorTime,
                 sockjs_url: str = "/sockjs") -> None:
        super().__init__()
        self._template = template
        self._tokens = tokens
        self._clock = clock
        self._sockjs_url = sockjs_url

    def render_GET(self, request) -> bytes:
        if request.postpath not in ([], [b""]):
            request.setResponseCode(404)
            return b"Not found"
        if not request.path.endswith(b"/"):
            request.redirect(request.path + b"/")
            return b""
        user = new_unregistered_user(self._clock, request.getClientAddress().host)
        token = self._tokens.mint(user_id=user.user_id, origin=request_origin(request))
        log.info("unregistered user {user} from {address}",
                 user=user.user_id, address=user.client_address)
        page = (
            self._template
            .replace("{{token}}", html.escape(token, quote=True))
            .replace("{{sockjs_url}}", html.escape(self._sockjs_url, quote=True))
        )
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"content-security-policy", CONSOLE_CSP.encode())
        return page.encode("utf-8")


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
    for name in ("index.html", "console.html", "static"):
        if not os.path.exists(os.path.join(web_dir, name)):
            missing.append(os.path.join(web_dir, name))
    if missing:
        raise MissingWebAssets(
            "browser files are missing (run `npm ci` in web/): " + ", ".join(missing)
        )


def build_resource(*, web_dir: str, tokens: TokenAuthority, clock: IReactorTime,
                   sockjs: Resource) -> Resource:
    """The whole tree; ``sockjs`` is the SockJS endpoint for consoles."""
    check_web_assets(web_dir)
    with open(os.path.join(web_dir, "index.html"), "rb") as f:
        host_page = f.read()
    with open(os.path.join(web_dir, "console.html"), encoding="utf-8") as f:
        console_template = f.read()
    root = Root(HostPage(host_page))
    root.putChild(b"console", ConsolePage(console_template, tokens, clock))
    static = StaticFiles(os.path.join(web_dir, "static"))
    static.putChild(b"vendor", vendor_resource(os.path.join(web_dir, "node_modules")))
    root.putChild(b"static", static)
    root.putChild(b"sockjs", sockjs)
    return root


class ShellSite(Site):
    """A Site that sets the headers every response carries."""

    def getResourceFor(self, request):
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"referrer-policy", b"no-referrer")
        return super().getResourceFor(request)
