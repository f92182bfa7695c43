"""Tests for shellserver.web: the console and host pages, headers, static files."""

import io
import json
import os
import shutil
import tempfile

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import server
from twisted.web.resource import Resource
from twisted.web.test.requesthelper import DummyChannel, DummyRequest

from shellserver.auth import WRONG_ORIGIN, TokenAuthority, TokenError
from shellserver.web import (
    CONSOLE_CSP,
    PAGE_CSP,
    VENDOR_FILES,
    ConsolePage,
    HostPage,
    MissingWebAssets,
    Root,
    ShellSite,
    StaticFiles,
    build_resource,
    check_web_assets,
)

TEMPLATE = (
    '<meta name="shellserver-token" content="{{token}}">'
    '<meta name="shellserver-sockjs-url" content="{{sockjs_url}}">'
)
HOST_PAGE = b"<!doctype html><title>host</title>"
REFUSED = "<title>{{title}}</title><p>{{message}}</p><body data-reason=\"{{reason}}\">"
HOST = b"console.example:8443"
ORIGIN = "https://console.example:8443"


class RecordingTokens:
    """A token authority that returns a fixed token and records what it minted."""

    def __init__(self, token):
        self.token = token
        self.minted = []

    def mint(self, *, user_id, origin, client_address):
        self.minted.append((user_id, origin, client_address))
        return self.token


PEER = "198.51.100.9"


def get(site, path, host=HOST, secure=True, origin=None, peer_host=PEER):
    """GET ``path`` from ``site`` over an in-memory channel: (request, body)."""
    peer = IPv4Address("TCP", peer_host, 40000)
    channel = DummyChannel(peer)
    if secure:
        channel.transport = DummyChannel.SSL(peer)
    channel.site = site
    channel.factory = site  # where a finished request is logged
    request = server.Request(channel)
    request.gotLength(0)
    if host is not None:
        request.requestHeaders.setRawHeaders(b"host", [host])
    if origin is not None:
        request.requestHeaders.setRawHeaders(b"origin", [origin.encode()])
    request.requestReceived(b"GET", path, b"HTTP/1.1")
    _, _, body = channel.transport.written.getvalue().partition(b"\r\n\r\n")
    return request, body


def header(request, name):
    return request.responseHeaders.getRawHeaders(name, [None])[0]


class ConsolePageTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.tokens = TokenAuthority(b"s" * 32, node="node-1", clock=self.clock,
                                     ttl=60.0)
        self.site = self.make_site(self.tokens)

    def make_site(self, tokens, sockjs_url="/sockjs"):
        root = Root(HostPage(HOST_PAGE))
        root.putChild(b"console", ConsolePage(TEMPLATE, tokens, self.clock,
                                              refused_template=REFUSED,
                                              sockjs_url=sockjs_url))
        return ShellSite(root, reactor=self.clock)

    def token_in(self, body):
        start = body.index(b'token" content="') + len(b'token" content="')
        return body[start:body.index(b'"', start)].decode("ascii")

    def test_page_holds_redeemable_token(self):
        """The page's token is redeemable from the page's own https origin."""
        request, body = get(self.site, b"/console/")
        self.assertEqual(request.code, 200)
        claims = self.tokens.redeem(self.token_in(body), origin=ORIGIN, client_address=PEER)
        self.assertEqual(claims.origin, ORIGIN)

    def test_token_bound_to_origin(self):
        """The token is refused when presented from another origin."""
        _, body = get(self.site, b"/console/")
        with self.assertRaises(TokenError) as caught:
            self.tokens.redeem(self.token_in(body), origin="https://evil.example",
                               client_address=PEER)
        self.assertEqual(caught.exception.reason, WRONG_ORIGIN)

    def test_plain_http_origin(self):
        """Over plain HTTP the token's origin is http://Host."""
        tokens = RecordingTokens("t")
        get(self.make_site(tokens), b"/console/", host=b"127.0.0.1:8080",
            secure=False)
        self.assertEqual(tokens.minted[0][1], "http://127.0.0.1:8080")

    def test_values_escaped(self):
        """The token and the SockJS URL are HTML-escaped into the template."""
        tokens = RecordingTokens('a"b<c>&d')
        site = self.make_site(tokens, sockjs_url='/sockjs?x="1"&y=<2>')
        _, body = get(site, b"/console/")
        self.assertEqual(
            body.decode("utf-8"),
            '<meta name="shellserver-token" content="a&quot;b&lt;c&gt;&amp;d">'
            '<meta name="shellserver-sockjs-url" '
            'content="/sockjs?x=&quot;1&quot;&amp;y=&lt;2&gt;">',
        )

    def test_headers(self):
        """The page is HTML, never cached, and framed only by its own origin."""
        request, _ = get(self.site, b"/console/")
        self.assertEqual(header(request, b"content-type"), b"text/html; charset=utf-8")
        self.assertEqual(header(request, b"cache-control"), b"no-store")
        csp = header(request, b"content-security-policy")
        self.assertEqual(csp, CONSOLE_CSP.encode())
        self.assertIn(b"frame-ancestors 'self'", csp)

    def test_referrer_policy_same_origin(self):
        """The console page's policy is same-origin, so its form POSTs (jsonp_send)
        carry its Origin instead of null; other pages keep no-referrer."""
        request, _ = get(self.site, b"/console/")
        self.assertEqual(header(request, b"referrer-policy"), b"same-origin")
        request, _ = get(self.site, b"/")
        self.assertEqual(header(request, b"referrer-policy"), b"no-referrer")

    def test_new_user_per_load(self):
        """Each load mints a token for a new unregistered user."""
        _, first = get(self.site, b"/console/")
        _, second = get(self.site, b"/console/")
        self.assertNotEqual(self.token_in(first), self.token_in(second))
        one = self.tokens.redeem(self.token_in(first), origin=ORIGIN, client_address=PEER)
        two = self.tokens.redeem(self.token_in(second), origin=ORIGIN, client_address=PEER)
        self.assertNotEqual(one.user_id, two.user_id)

    def test_redirect_to_slash(self):
        """/console redirects to /console/ and mints nothing."""
        tokens = RecordingTokens("t")
        request, _ = get(self.make_site(tokens), b"/console")
        self.assertEqual(request.code, 302)
        self.assertEqual(header(request, b"location"), b"/console/")
        self.assertEqual(tokens.minted, [])

    def test_subpath_not_found(self):
        """Paths below /console/ are 404 and mint nothing."""
        tokens = RecordingTokens("t")
        site = self.make_site(tokens)
        for path in (b"/console/x", b"/console/x/", b"/console//"):
            request, _ = get(site, path)
            self.assertEqual(request.code, 404, path)
        self.assertEqual(tokens.minted, [])


class HostPageTests(SynchronousTestCase):
    def setUp(self):
        self.site = ShellSite(Root(HostPage(HOST_PAGE)), reactor=Clock())

    def test_root(self):
        """/ serves the host page with its CSP."""
        request, body = get(self.site, b"/")
        self.assertEqual((request.code, body), (200, HOST_PAGE))
        self.assertEqual(header(request, b"content-security-policy"),
                         PAGE_CSP.encode())

    def test_unknown_paths(self):
        """Paths the tree does not have are 404."""
        for path in (b"/nothing", b"/index.html", b"/nothing/deeper"):
            request, body = get(self.site, path)
            self.assertEqual(request.code, 404, path)
            self.assertNotIn(HOST_PAGE, body)


class ShellSiteTests(SynchronousTestCase):
    def test_security_headers(self):
        """Every response, found or not, has nosniff and no-referrer."""
        site = ShellSite(Root(HostPage(HOST_PAGE)), reactor=Clock())
        for path, code in ((b"/", 200), (b"/missing", 404)):
            request, _ = get(site, path)
            self.assertEqual(request.code, code)
            self.assertEqual(header(request, b"x-content-type-options"), b"nosniff")
            self.assertEqual(header(request, b"referrer-policy"), b"no-referrer")


class HstsTests(SynchronousTestCase):
    def site(self, max_age=31536000):
        return ShellSite(Root(HostPage(HOST_PAGE)), reactor=Clock(), hsts_max_age=max_age)

    def test_tls_responses_carry_hsts(self):
        """Every response over TLS, found or not, carries Strict-Transport-Security."""
        site = self.site()
        for path in (b"/", b"/missing"):
            request, _ = get(site, path)
            self.assertEqual(header(request, b"strict-transport-security"),
                             b"max-age=31536000")

    def test_plain_http_has_none(self):
        """Responses over plain HTTP carry no Strict-Transport-Security."""
        request, _ = get(self.site(), b"/", secure=False)
        self.assertIsNone(header(request, b"strict-transport-security"))

    def test_zero_disables(self):
        """hsts_max_age 0 sends no Strict-Transport-Security."""
        request, _ = get(self.site(0), b"/")
        self.assertIsNone(header(request, b"strict-transport-security"))

    def test_not_for_localhost(self):
        """localhost names get no HSTS (it would pin every local dev server to https)."""
        site = self.site()
        for host in (b"localhost:8443", b"LOCALHOST", b"app.localhost:8443", b"localhost."):
            request, _ = get(site, b"/", host=host)
            self.assertIsNone(header(request, b"strict-transport-security"), host)
        request, _ = get(site, b"/", host=b"127.0.0.1:8443")
        self.assertIsNotNone(header(request, b"strict-transport-security"))


class WebDirTestCase(SynchronousTestCase):
    """A web/ directory in a temporary directory, removed afterwards."""

    def setUp(self):
        self.web_dir = tempfile.mkdtemp(prefix="shellserver-web-")
        self.addCleanup(shutil.rmtree, self.web_dir)

    def write(self, *parts, content=b"x"):
        path = os.path.join(self.web_dir, *parts)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(content)
        return path

    def complete(self):
        for parts in VENDOR_FILES.values():
            self.write("node_modules", *parts)
        self.write("index.html", content=HOST_PAGE)
        self.write("console.html", content=TEMPLATE.encode())
        self.write("refused.html", content=REFUSED.encode())
        self.write("static", "embed.js", content=b"(function () {}());")


class CheckWebAssetsTests(WebDirTestCase):
    def test_complete(self):
        """A complete web/ passes the check."""
        self.complete()
        check_web_assets(self.web_dir)

    def test_empty(self):
        """An empty web/ names every missing file and says to run npm ci."""
        with self.assertRaises(MissingWebAssets) as caught:
            check_web_assets(self.web_dir)
        message = str(caught.exception)
        self.assertIn("npm ci", message)
        for parts in VENDOR_FILES.values():
            self.assertIn(os.path.join(self.web_dir, "node_modules", *parts), message)
        for name in ("index.html", "console.html", "refused.html", "static/embed.js"):
            self.assertIn(os.path.join(self.web_dir, name), message)

    def test_one_missing(self):
        """Only the missing file is named."""
        self.complete()
        xterm = VENDOR_FILES[b"xterm.js"]
        os.remove(os.path.join(self.web_dir, "node_modules", *xterm))
        with self.assertRaises(MissingWebAssets) as caught:
            check_web_assets(self.web_dir)
        self.assertIn("xterm.js", str(caught.exception))
        self.assertNotIn("addon-fit", str(caught.exception))
        self.assertNotIn("index.html", str(caught.exception))


class StaticFilesTests(WebDirTestCase):
    def test_no_directory_listing(self):
        """A directory under /static/ is 404, not a listing of its files."""
        self.write("static", "sub", "secret-name.js")
        site = ShellSite(StaticFiles(os.path.join(self.web_dir, "static")),
                         reactor=Clock())
        for path in (b"/", b"/sub/"):
            request, body = get(site, path)
            self.assertEqual(request.code, 404, path)
            self.assertNotIn(b"secret-name", body)

    def test_children_are_static_files(self):
        """Children of a StaticFiles are StaticFiles too, so they do not list."""
        child = StaticFiles(self.web_dir).createSimilarFile(
            os.path.join(self.web_dir, "sub"))
        self.assertIsInstance(child, StaticFiles)
        request = DummyRequest([b""])
        child.directoryListing().render(request)
        self.assertEqual(request.responseCode, 404)


class BuildResourceTests(WebDirTestCase):
    def test_tree(self):
        """The tree serves /, /console/ and the given SockJS resource at /sockjs."""
        self.complete()
        clock = Clock()
        tokens = TokenAuthority(b"s" * 32, node="n", clock=clock, ttl=60.0)
        sockjs = Resource()
        site = ShellSite(
            build_resource(web_dir=self.web_dir, tokens=tokens, clock=clock,
                           sockjs=sockjs),
            reactor=clock,
        )
        request, body = get(site, b"/")
        self.assertEqual(body, HOST_PAGE)
        request, body = get(site, b"/console/")
        self.assertIn(b'content="../sockjs"', body)
        self.assertNotIn(b"{{token}}", body)
        self.assertIs(site.resource.getStaticEntity(b"sockjs"), sockjs)
        vendor = site.resource.getStaticEntity(b"static").getStaticEntity(b"vendor")
        xterm = vendor.getStaticEntity(b"xterm.js")
        self.assertIsInstance(xterm, StaticFiles)
        self.assertEqual(
            xterm.path,
            os.path.join(self.web_dir, "node_modules", *VENDOR_FILES[b"xterm.js"]),
        )

    def test_missing_assets(self):
        """build_resource refuses a web/ without its assets."""
        self.assertRaises(MissingWebAssets, build_resource, web_dir=self.web_dir,
                          tokens=None, clock=Clock(), sockjs=Resource())


class AdmissionPagesTests(SynchronousTestCase):
    """/console/ refusals, /status and /embed.js, with a real Admission on a Clock."""

    HOST_ORIGIN = "https://docs.example"

    def setUp(self):
        from shellserver.admission import Admission
        from shellserver.users import UnregisteredUsers
        from shellserver.web import EmbedScript, StatusPage

        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.tokens = TokenAuthority(b"s" * 32, node="node-1", clock=self.clock, ttl=60.0)
        self.admission = Admission(self.clock, capacity=2, per_address=1,
                                   per_address_per_minute=5)
        self.users = UnregisteredUsers(self.clock, 60.0)
        root = Root(HostPage(HOST_PAGE))
        root.putChild(b"console", ConsolePage(
            TEMPLATE, self.tokens, self.clock, refused_template=REFUSED,
            admission=self.admission, users=self.users, host_origins=[self.HOST_ORIGIN]))
        root.putChild(b"status", StatusPage(self.admission, host_origins=[self.HOST_ORIGIN],
                                            selector="pre.py", max_age=5))
        root.putChild(b"embed.js", EmbedScript(b"/* embed */"))
        self.site = ShellSite(root, reactor=self.clock)

    def test_console_page_creates_user_with_host_origin(self):
        """A console page load registers an unregistered user with its host origin."""
        get(self.site, b"/console/?host=https%3A%2F%2Fdocs.example")
        self.assertEqual(len(self.users), 1)
        (user,) = self.users._users.values()
        self.assertEqual(user.host_origin, self.HOST_ORIGIN)
        self.assertEqual(user.client_address, "198.51.100.9")

    def test_unknown_host_origin_not_recorded(self):
        """A host origin that is not configured is not trusted."""
        get(self.site, b"/console/?host=https%3A%2F%2Fevil.example")
        (user,) = self.users._users.values()
        self.assertEqual(user.host_origin, "")

    def test_frame_ancestors_include_host_origins(self):
        """The console page may be framed by the configured host origins only."""
        request, _ = get(self.site, b"/console/")
        csp = header(request, b"content-security-policy").decode()
        self.assertIn(f"frame-ancestors 'self' {self.HOST_ORIGIN}", csp)

    def test_full_gives_friendly_503(self):
        """When the node is full, /console/ says so with 503 and Retry-After."""
        self.admission.admit("198.51.100.1")
        self.admission.admit("198.51.100.2")
        request, body = get(self.site, b"/console/")
        self.assertEqual(request.code, 503)
        self.assertEqual(header(request, b"retry-after"), b"15")
        self.assertIn(b"All consoles are in use", body)
        self.assertNotIn(b"shellserver-token", body)
        self.assertEqual(len(self.users), 0)

    def test_rate_limited_gives_429(self):
        """A client over its own limit gets 429."""
        self.admission.admit("198.51.100.9")
        request, body = get(self.site, b"/console/")
        self.assertEqual(request.code, 429)
        self.assertIn(b"too many consoles", body)

    def test_page_flood_gives_429_without_tokens(self):
        """Past pages_per_address_per_minute, /console/ answers 429 with Retry-After,
        mints no token, registers no user and writes no access log line."""
        self.admission.pages_per_address_per_minute = 3
        access_log = io.StringIO()
        self.site._logFile = access_log
        for _ in range(3):
            request, _ = get(self.site, b"/console/")
            self.assertEqual(request.code, 200)
        self.clock.advance(10)
        for _ in range(50):
            request, body = get(self.site, b"/console/")
            self.assertEqual(request.code, 429)
            self.assertEqual(header(request, b"retry-after"), b"50")
            self.assertIn(b"too many consoles", body)
            self.assertNotIn(b"shellserver-token", body)
        self.assertEqual(len(self.users), 3)
        self.assertEqual(access_log.getvalue().count('"GET /console/ HTTP/1.1" 200'), 3)
        self.assertEqual(access_log.getvalue().count("\n"), 3)
        request, _ = get(self.site, b"/console/", peer_host="198.51.100.10")
        self.assertEqual(request.code, 200)

    def test_switched_off(self):
        """With the kill switch on, /console/ refuses with 503 and says it is paused."""
        self.admission.switched_off = True
        request, body = get(self.site, b"/console/")
        self.assertEqual(request.code, 503)
        self.assertIn(b"paused by its operator", body)

    def test_status_json(self):
        """/status reports accepting, counts and the selector, cacheable briefly."""
        self.admission.admit("198.51.100.1")
        request, body = get(self.site, b"/status")
        status = json.loads(body)
        self.assertEqual(status["accepting"], True)
        self.assertEqual((status["active"], status["capacity"]), (1, 2))
        self.assertEqual(status["selector"], "pre.py")
        self.assertEqual(header(request, b"cache-control"), b"private, max-age=5")
        self.assertEqual(header(request, b"content-type"), b"application/json")

    def test_status_not_accepting(self):
        """/status says why not when full."""
        self.admission.admit("198.51.100.1")
        self.admission.admit("198.51.100.2")
        _, body = get(self.site, b"/status")
        status = json.loads(body)
        self.assertEqual((status["accepting"], status["reason"]), (False, "full"))

    def test_status_cors_for_host_origins_only(self):
        """CORS answers a configured host origin and no other."""
        request, _ = get(self.site, b"/status", origin=self.HOST_ORIGIN)
        self.assertEqual(header(request, b"access-control-allow-origin"),
                         self.HOST_ORIGIN.encode())
        request, _ = get(self.site, b"/status", origin="https://evil.example")
        self.assertIsNone(header(request, b"access-control-allow-origin"))

    def test_embed_script_headers(self):
        """/embed.js is JavaScript, cacheable, loadable cross-origin."""
        request, body = get(self.site, b"/embed.js")
        self.assertEqual(body, b"/* embed */")
        self.assertEqual(header(request, b"content-type"), b"text/javascript; charset=utf-8")
        self.assertEqual(header(request, b"cross-origin-resource-policy"), b"cross-origin")

