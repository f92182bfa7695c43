"""
Tests for the HTTP side of shellserver.sockjs: greeting, info, iframe and
the xhr transports, through a real twisted.web Site over StringTransport.
"""

import base64
import hashlib
import json
from urllib.parse import quote

from attrs import define, field
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import Site

from shellserver.sockjs import SockJSConnection, SockJSOptions, SockJSResource
from shellserver.sockjs.resource import iframe_page_policy

NO_CACHE = "no-store, no-cache, no-transform, must-revalidate, max-age=0"


class NoDelayTransport(StringTransport):
    """
    A StringTransport that records TCP_NODELAY.
    """

    no_delay = False

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.no_delay = enabled

    def getTcpNoDelay(self) -> bool:
        return self.no_delay


@define
class Response:
    status: int
    headers: dict[str, list[str]]
    body: bytes
    complete: bool

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[-1] if values else None


def _dechunk(data: bytes) -> tuple[bytes, bool]:
    body = b""
    while data:
        size_line, separator, rest = data.partition(b"\r\n")
        if not separator:
            break
        size = int(size_line, 16)
        if size == 0:
            return body, True
        if len(rest) < size + 2:
            break
        body += rest[:size]
        data = rest[size + 2 :]
    return body, False


def parse_response(data: bytes) -> Response:
    """
    Parse what the server wrote so far: status, headers, (dechunked) body.
    """
    head, separator, raw_body = data.partition(b"\r\n\r\n")
    if not separator:
        return Response(0, {}, b"", False)
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, list[str]] = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    status = int(status_line.split()[1])
    if headers.get("transfer-encoding") == ["chunked"]:
        body, complete = _dechunk(raw_body)
    else:
        length = int(headers.get("content-length", ["0"])[0])
        body, complete = raw_body[:length], len(raw_body) >= length
    return Response(status, headers, body, complete)


@define
class Exchange:
    """
    One HTTP request on its own connection.
    """

    channel: HTTPChannel
    transport: NoDelayTransport

    def response(self) -> Response:
        return parse_response(self.transport.value())

    def lose_connection(self) -> None:
        self.channel.connectionLost(Failure(ConnectionLost()))


@define
class RecordingHandler:
    connection: SockJSConnection
    messages: list[str] = field(factory=list)
    closed_count: int = 0

    def message_received(self, text: str) -> None:
        self.messages.append(text)
        self.connection.send(text)

    def closed(self) -> None:
        self.closed_count += 1


class HTTPTestsMixin:
    """
    Serves a SockJSResource at /sockjs with a Clock and echoing handlers.
    """

    options = SockJSOptions()

    def setUp(self) -> None:
        self.clock = Clock()
        self.handlers: list[RecordingHandler] = []
        self.resource = SockJSResource(self.open_session, clock=self.clock, options=self.options)
        root = Resource()
        root.putChild(b"sockjs", self.resource)
        self.site = Site(root, reactor=self.clock)

    def open_session(self, connection: SockJSConnection) -> RecordingHandler:
        handler = RecordingHandler(connection)
        self.handlers.append(handler)
        return handler

    def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        peer: str = "10.0.0.7",
    ) -> Exchange:
        transport = NoDelayTransport(
            peerAddress=IPv4Address("TCP", peer, 54321),
            hostAddress=IPv4Address("TCP", "10.0.0.1", 80),
        )
        channel = self.site.buildProtocol(None)
        channel.makeConnection(transport)
        lines = [f"{method} {path} HTTP/1.1", "Host: example.com"]
        lines.append(f"Content-Length: {len(body)}")
        lines.extend(f"{name}: {value}" for name, value in (headers or {}).items())
        channel.dataReceived(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        return Exchange(channel, transport)

    def fetch(
        self, method: str, path: str, body: bytes = b"", peer: str = "10.0.0.7", **headers: str
    ) -> Response:
        headers = {name.replace("_", "-"): value for name, value in headers.items()}
        return self.request(method, path, body, headers, peer=peer).response()


class StaticPageTests(HTTPTestsMixin, SynchronousTestCase):
    def test_greeting(self) -> None:
        """
        The prefix, with or without a slash, answers "Welcome to SockJS!".
        """
        for path in ["/sockjs", "/sockjs/"]:
            response = self.fetch("GET", path)
            self.assertEqual(
                (response.status, response.body, response.header("content-type")),
                (200, b"Welcome to SockJS!\n", "text/plain; charset=UTF-8"),
            )

    def test_not_found(self) -> None:
        """
        Unknown paths, malformed session paths and bad iframe names are 404.
        """
        for path in [
            "/sockjs/a",
            "/sockjs/a.html",
            "/sockjs//",
            "/sockjs/a/a",
            "/sockjs/a/a/",
            "/sockjs/a./a/xhr",
            "/sockjs/a/a./xhr",
            "/sockjs//a/xhr",
            "/sockjs/a/a/nonsense",
            "/sockjs/iframe.htm",
            "/sockjs/IFRAME.HTML",
            "/sockjs/iframe-/.html",
        ]:
            self.assertEqual(self.fetch("POST", path).status, 404, path)

    def test_info(self) -> None:
        """
        info describes the server, is never cached and allows the origin
        with credentials.
        """
        response = self.fetch("GET", "/sockjs/info", origin="https://example.com")
        self.assertEqual(response.status, 200)
        self.assertEqual(response.header("content-type"), "application/json; charset=UTF-8")
        self.assertEqual(response.header("cache-control"), NO_CACHE)
        self.assertEqual(response.header("access-control-allow-origin"), "https://example.com")
        self.assertEqual(response.header("access-control-allow-credentials"), "true")
        self.assertIsNone(response.header("set-cookie"))
        info = json.loads(response.body)
        self.assertEqual(
            {key: info[key] for key in ["websocket", "cookie_needed", "origins"]},
            {"websocket": True, "cookie_needed": False, "origins": ["*:*"]},
        )
        self.assertTrue(0 <= info["entropy"] < 2**32)

    def test_info_entropy_varies(self) -> None:
        """
        Every info answer carries new entropy.
        """
        values = {json.loads(self.fetch("GET", "/sockjs/info").body)["entropy"]}
        values.add(json.loads(self.fetch("GET", "/sockjs/info").body)["entropy"])
        self.assertEqual(len(values), 2)

    def test_info_without_origin(self) -> None:
        """
        Without an Origin header, info allows "*" and no credentials.
        """
        response = self.fetch("GET", "/sockjs/info")
        self.assertEqual(response.header("access-control-allow-origin"), "*")
        self.assertIsNone(response.header("access-control-allow-credentials"))

    def test_info_preflight(self) -> None:
        """
        OPTIONS on info is a cacheable CORS preflight answer, echoing the
        requested headers.
        """
        response = self.fetch(
            "OPTIONS",
            "/sockjs/info",
            origin="null",
            access_control_request_method="GET",
            access_control_request_headers="a, b",
        )
        self.assertIn(response.status, (200, 204))
        self.assertEqual(response.body, b"")
        self.assertEqual(response.header("cache-control"), "public, max-age=31536000")
        self.assertIsNotNone(response.header("expires"))
        self.assertEqual(response.header("access-control-max-age"), "31536000")
        self.assertEqual(response.header("access-control-allow-methods"), "OPTIONS, GET")
        self.assertEqual(response.header("access-control-allow-origin"), "null")
        self.assertEqual(response.header("access-control-allow-headers"), "a, b")

    def test_iframe(self) -> None:
        """
        The iframe page, under any version suffix, loads the configured
        client and is cacheable for a year with an ETag.
        """
        bodies = set()
        for path in ["/sockjs/iframe.html", "/sockjs/iframe-0.1.2abc-dirty.2144.html"]:
            response = self.fetch("GET", path + "?t=123")
            self.assertEqual(response.status, 200)
            self.assertEqual(response.header("content-type"), "text/html; charset=UTF-8")
            self.assertEqual(response.header("cache-control"), "public, max-age=31536000")
            self.assertIsNotNone(response.header("expires"))
            self.assertIsNone(response.header("last-modified"))
            self.assertIsNotNone(response.header("etag"))
            bodies.add(response.body)
        self.assertEqual(len(bodies), 1)
        self.assertIn(b'<script src="../static/vendor/sockjs.min.js">', bodies.pop())

    def test_iframe_client_url_escaped(self) -> None:
        """
        The client URL is HTML-escaped into the page.
        """
        resource = SockJSResource(
            self.open_session,
            clock=self.clock,
            options=SockJSOptions(client_url='/x.js?a=1&b="2"'),
        )
        root = Resource()
        root.putChild(b"sockjs", resource)
        self.site = Site(root, reactor=self.clock)
        body = self.fetch("GET", "/sockjs/iframe.html").body
        self.assertIn(b'src="/x.js?a=1&amp;b=&quot;2&quot;"', body)

    def test_iframe_not_modified(self) -> None:
        """
        A request with the page's ETag in If-None-Match gets 304 without a
        body or content type.
        """
        etag = self.fetch("GET", "/sockjs/iframe.html").header("etag")
        response = self.fetch("GET", "/sockjs/iframe.html", if_none_match=etag)
        self.assertEqual(response.status, 304)
        self.assertEqual(response.body, b"")
        self.assertIsNone(response.header("content-type"))


class XhrPollingTests(HTTPTestsMixin, SynchronousTestCase):
    def test_open(self) -> None:
        """
        The first poll opens the session and answers "o", uncached, with
        CORS headers, over a connection without Nagle.
        """
        exchange = self.request("POST", "/sockjs/000/s1/xhr", headers={"Origin": "o"})
        response = exchange.response()
        self.assertEqual((response.status, response.body), (200, b"o\n"))
        self.assertTrue(response.complete)
        self.assertEqual(response.header("content-type"), "application/javascript; charset=UTF-8")
        self.assertEqual(response.header("cache-control"), NO_CACHE)
        self.assertEqual(response.header("access-control-allow-origin"), "o")
        self.assertTrue(exchange.transport.no_delay)
        connection = self.handlers[0].connection
        self.assertEqual(
            (connection.peer_host, connection.origin, connection.transport_name),
            ("10.0.0.7", "o", "xhr-polling"),
        )

    def test_send_and_poll(self) -> None:
        """
        xhr_send delivers messages and answers 204 text/plain; the next poll
        gets the echo.
        """
        self.fetch("POST", "/sockjs/000/s1/xhr")
        response = self.fetch("POST", "/sockjs/000/s1/xhr_send", b'["a","b"]', origin="o")
        self.assertEqual((response.status, response.body), (204, b""))
        self.assertEqual(response.header("content-type"), "text/plain; charset=UTF-8")
        self.assertEqual(response.header("cache-control"), NO_CACHE)
        self.assertEqual(response.header("access-control-allow-origin"), "o")
        self.assertEqual(self.handlers[0].messages, ["a", "b"])
        poll = self.fetch("POST", "/sockjs/999/s1/xhr")
        self.assertEqual(poll.body, b'a["a","b"]\n')

    def test_poll_waits_for_messages(self) -> None:
        """
        A poll with nothing to deliver stays open until a message comes.
        """
        self.fetch("POST", "/sockjs/000/s1/xhr")
        exchange = self.request("POST", "/sockjs/000/s1/xhr")
        self.assertFalse(exchange.response().complete)
        self.handlers[0].connection.send("late")
        response = exchange.response()
        self.assertEqual(response.body, b'a["late"]\n')
        self.assertTrue(response.complete)

    def test_poll_heartbeat(self) -> None:
        """
        A waiting poll is answered "h" after heartbeat_interval.
        """
        self.fetch("POST", "/sockjs/000/s1/xhr")
        exchange = self.request("POST", "/sockjs/000/s1/xhr")
        self.clock.advance(self.options.heartbeat_interval)
        self.assertEqual(exchange.response().body, b"h\n")

    def test_session_expires(self) -> None:
        """
        Without a poll for disconnect_delay the session closes and xhr_send
        to it is 404.
        """
        self.fetch("POST", "/sockjs/000/s1/xhr")
        self.clock.advance(self.options.disconnect_delay)
        self.assertEqual(self.handlers[0].closed_count, 1)
        response = self.fetch("POST", "/sockjs/000/s1/xhr_send", b'["a"]')
        self.assertEqual(response.status, 404)
        self.assertEqual(self.resource.session_count, 0)

    def test_second_poll_2010(self) -> None:
        """
        A poll while another one waits gets the 2010 close frame.
        """
        self.fetch("POST", "/sockjs/000/s1/xhr")
        self.request("POST", "/sockjs/000/s1/xhr")
        response = self.fetch("POST", "/sockjs/000/s1/xhr")
        self.assertEqual(response.body, b'c[2010,"Another connection still open"]\n')
        self.assertTrue(self.handlers[0].connection.is_open)

    def test_aborted_poll_1002(self) -> None:
        """
        A poll whose connection breaks closes the session; the next poll
        gets "Connection interrupted".
        """
        self.fetch("POST", "/sockjs/000/s1/xhr")
        self.request("POST", "/sockjs/000/s1/xhr").lose_connection()
        self.assertEqual(self.handlers[0].closed_count, 1)
        response = self.fetch("POST", "/sockjs/000/s1/xhr")
        self.assertEqual(response.body, b'c[1002,"Connection interrupted"]\n')

    def test_server_close(self) -> None:
        """
        A session closed by the application answers polls with its close
        frame.
        """
        self.fetch("POST", "/sockjs/000/s1/xhr")
        self.handlers[0].connection.close(4001, "authentication failed")
        for _ in range(2):
            response = self.fetch("POST", "/sockjs/000/s1/xhr")
            self.assertEqual(response.body, b'c[4001,"authentication failed"]\n')
        self.assertEqual(self.handlers[0].closed_count, 1)

    def test_send_unknown_session(self) -> None:
        """
        xhr_send to a session that does not exist is 404.
        """
        response = self.fetch("POST", "/sockjs/000/nope/xhr_send", b'["a"]')
        self.assertEqual(response.status, 404)

    def test_send_errors(self) -> None:
        """
        An empty body is "Payload expected.", bad JSON is "Broken JSON
        encoding.", both with 500, and the session stays open.
        """
        self.fetch("POST", "/sockjs/000/s1/xhr")
        empty = self.fetch("POST", "/sockjs/000/s1/xhr_send", b"")
        self.assertEqual((empty.status, empty.body), (500, b"Payload expected."))
        broken = self.fetch("POST", "/sockjs/000/s1/xhr_send", b'["a')
        self.assertEqual((broken.status, broken.body), (500, b"Broken JSON encoding."))
        self.assertTrue(self.handlers[0].connection.is_open)

    def test_send_too_big(self) -> None:
        """
        A body over max_message_bytes closes the session with 1009.
        """
        self.fetch("POST", "/sockjs/000/s1/xhr")
        big = b'["' + b"x" * self.options.max_message_bytes + b'"]'
        response = self.fetch("POST", "/sockjs/000/s1/xhr_send", big)
        self.assertEqual(response.status, 413)
        self.assertEqual(self.handlers[0].messages, [])
        poll = self.fetch("POST", "/sockjs/000/s1/xhr")
        self.assertEqual(poll.body, b'c[1009,"Message too big"]\n')

    def test_preflight(self) -> None:
        """
        The xhr transports answer CORS preflights for POST.
        """
        for name in ["xhr", "xhr_send", "xhr_streaming"]:
            response = self.fetch("OPTIONS", f"/sockjs/abc/abc/{name}", origin="test")
            self.assertEqual(response.status, 204)
            self.assertEqual(response.header("access-control-allow-methods"), "OPTIONS, POST")
            self.assertEqual(response.header("access-control-allow-origin"), "test")
            self.assertEqual(response.header("access-control-max-age"), "31536000")

    def test_method_not_allowed(self) -> None:
        """
        GET on an xhr transport is 405 with an Allow header and no body.
        """
        response = self.fetch("GET", "/sockjs/000/s1/xhr")
        self.assertEqual((response.status, response.body), (405, b""))
        self.assertEqual(response.header("allow"), "POST, OPTIONS")
        self.assertIsNone(response.header("content-type"))


class XhrStreamingTests(HTTPTestsMixin, SynchronousTestCase):
    options = SockJSOptions(response_limit=4096)

    def test_prelude_and_frames(self) -> None:
        """
        A streaming response starts with 2048 "h" and a newline, then the
        open frame, then messages as they come.
        """
        exchange = self.request("POST", "/sockjs/000/s1/xhr_streaming")
        self.handlers[0].connection.send("x")
        response = exchange.response()
        self.assertEqual(response.status, 200)
        self.assertEqual(response.body, b"h" * 2048 + b'\no\na["x"]\n')
        self.assertFalse(response.complete)
        self.assertEqual(response.header("cache-control"), NO_CACHE)
        self.assertTrue(exchange.transport.no_delay)
        self.assertEqual(self.handlers[0].connection.transport_name, "xhr-streaming")

    def test_response_limit(self) -> None:
        """
        The response ends once response_limit bytes of frames went out, and
        the session lives on for the next request.
        """
        exchange = self.request("POST", "/sockjs/000/s1/xhr_streaming")
        connection = self.handlers[0].connection
        sent = 0
        while not exchange.response().complete and sent < 100:
            connection.send("y" * 128)
            sent += 1
        self.assertEqual(sent, 31)
        connection.send("after")
        second = self.request("POST", "/sockjs/000/s1/xhr_streaming")
        self.assertEqual(second.response().body, b"h" * 2048 + b'\na["after"]\n')

    def test_second_streaming_2010(self) -> None:
        """
        A second streaming request gets the prelude, the 2010 close frame,
        and its end.
        """
        self.request("POST", "/sockjs/000/s1/xhr_streaming")
        response = self.request("POST", "/sockjs/000/s1/xhr_streaming").response()
        self.assertEqual(
            response.body,
            b"h" * 2048 + b'\nc[2010,"Another connection still open"]\n',
        )
        self.assertTrue(response.complete)

    def test_close_ends_response(self) -> None:
        """
        Closing the session writes the close frame and ends the response.
        """
        exchange = self.request("POST", "/sockjs/000/s1/xhr_streaming")
        self.handlers[0].connection.close()
        response = exchange.response()
        self.assertTrue(response.body.endswith(b'o\nc[3000,"Go away!"]\n'))
        self.assertTrue(response.complete)

    def test_heartbeats(self) -> None:
        """
        The streaming response carries an h frame every heartbeat_interval.
        """
        exchange = self.request("POST", "/sockjs/000/s1/xhr_streaming")
        for _ in range(2):
            self.clock.advance(self.options.heartbeat_interval)
        self.assertTrue(exchange.response().body.endswith(b"\no\nh\nh\n"))

    def test_transport_back_pressure(self) -> None:
        """
        While the connection's buffer is full, output waits in the session
        (counted in pending_bytes); it flows once the buffer drains.
        """
        exchange = self.request("POST", "/sockjs/000/s1/xhr_streaming")
        connection = self.handlers[0].connection
        exchange.transport.producer.pauseProducing()
        connection.send("held")
        self.assertEqual(connection.pending_bytes, len(b'"held"'))
        self.assertFalse(exchange.response().body.endswith(b'a["held"]\n'))
        exchange.transport.producer.resumeProducing()
        self.assertEqual(connection.pending_bytes, 0)
        self.assertTrue(exchange.response().body.endswith(b'a["held"]\n'))

    def test_lost_stream_1002(self) -> None:
        """
        A streaming request whose connection breaks closes the session.
        """
        exchange = self.request("POST", "/sockjs/000/s1/xhr_streaming")
        exchange.lose_connection()
        self.assertEqual(self.handlers[0].closed_count, 1)
        self.assertFalse(self.handlers[0].connection.is_open)


class CookieTests(HTTPTestsMixin, SynchronousTestCase):
    options = SockJSOptions(cookie_needed=True)

    def test_info_says_cookie_needed(self) -> None:
        """
        info announces cookie_needed but sets no cookie itself.
        """
        response = self.fetch("GET", "/sockjs/info")
        self.assertTrue(json.loads(response.body)["cookie_needed"])
        self.assertIsNone(response.header("set-cookie"))

    def test_session_transports_set_cookie(self) -> None:
        """
        Session transports set JSESSIONID=dummy, or echo the client's.
        """
        polling = self.fetch("POST", "/sockjs/000/s1/xhr")
        self.assertEqual(polling.header("set-cookie"), "JSESSIONID=dummy; Path=/")
        echoed = self.fetch("POST", "/sockjs/000/s2/xhr_streaming", cookie="JSESSIONID=abcdef")
        self.assertEqual(echoed.header("set-cookie"), "JSESSIONID=abcdef; Path=/")
        sent = self.fetch("POST", "/sockjs/000/s1/xhr_send", b'["a"]')
        self.assertEqual(sent.header("set-cookie"), "JSESSIONID=dummy; Path=/")

    def test_no_cookie_by_default(self) -> None:
        """
        Without cookie_needed no cookie is set.
        """
        self.options = SockJSOptions()
        self.setUp()
        self.assertIsNone(self.fetch("POST", "/sockjs/000/s1/xhr").header("set-cookie"))


class WebSocketRequestTests(HTTPTestsMixin, SynchronousTestCase):
    def test_plain_get_refused(self) -> None:
        """
        A GET without an upgrade to websocket is 400.
        """
        for path in ["/sockjs/0/0/websocket", "/sockjs/websocket"]:
            self.assertEqual(self.fetch("GET", path).status, 400, path)

    def test_connection_header_checked(self) -> None:
        """
        An upgrade whose Connection header lost "Upgrade" is 400.
        """
        response = self.fetch(
            "GET", "/sockjs/0/0/websocket", upgrade="WebSocket", connection="close"
        )
        self.assertEqual(response.status, 400)

    def test_post_refused(self) -> None:
        """
        Websocket URLs only take GET: 405 with Allow, without body.
        """
        for path in ["/sockjs/0/0/websocket", "/sockjs/websocket"]:
            response = self.fetch("POST", path, upgrade="WebSocket", connection="Upgrade")
            self.assertEqual((response.status, response.body), (405, b""), path)
            self.assertEqual(response.header("allow"), "GET")

    def test_disabled(self) -> None:
        """
        With websocket off, info says so and both websocket URLs are 404.
        """
        self.options = SockJSOptions(websocket=False)
        self.setUp()
        self.assertFalse(json.loads(self.fetch("GET", "/sockjs/info").body)["websocket"])
        for path in ["/sockjs/0/0/websocket", "/sockjs/websocket"]:
            response = self.fetch("GET", path, upgrade="websocket", connection="Upgrade")
            self.assertEqual(response.status, 404, path)


class IframePolicyTests(HTTPTestsMixin, SynchronousTestCase):
    def test_iframe_policy(self) -> None:
        """
        The iframe page allows its own inline script by hash and everything
        else from its own origin only.
        """
        response = self.fetch("GET", "/sockjs/iframe.html")
        policy = response.header("content-security-policy")
        start = response.body.index(b"<script>") + len(b"<script>")
        script = response.body[start : response.body.index(b"</script>", start)]
        digest = base64.b64encode(hashlib.sha256(script).digest()).decode()
        self.assertEqual(
            policy,
            f"default-src 'none'; script-src 'self' 'sha256-{digest}'; connect-src 'self'; "
            "frame-src 'self'; base-uri 'none'; form-action 'none'",
        )

    def test_iframe_policy_remote_client(self) -> None:
        """
        A client_url on another host adds that origin to script-src.
        """
        self.assertIn(
            " https://cdn.example.com;",
            iframe_page_policy("https://cdn.example.com/sockjs.min.js"),
        )

    def test_iframe_policy_unusable_host(self) -> None:
        """
        A client_url whose host could not be a CSP source is refused.
        """
        self.assertRaises(ValueError, iframe_page_policy, "https://a;script-src */x.js")


class EventSourceTests(HTTPTestsMixin, SynchronousTestCase):
    options = SockJSOptions(response_limit=4096)

    def test_events(self) -> None:
        """
        An eventsource response is an uncached text/event-stream: a new
        line, then one "data:" event per frame.
        """
        exchange = self.request("GET", "/sockjs/000/s1/eventsource")
        self.fetch("POST", "/sockjs/000/s1/xhr_send", b'["  \\u0000\\n\\r "]')
        response = exchange.response()
        self.assertEqual(response.status, 200)
        self.assertEqual(response.header("content-type"), "text/event-stream")
        self.assertEqual(response.header("cache-control"), NO_CACHE)
        self.assertEqual(response.body, b'\r\ndata: o\r\n\r\ndata: a["  \\u0000\\n\\r "]\r\n\r\n')
        self.assertFalse(response.complete)
        self.assertTrue(exchange.transport.no_delay)
        self.assertEqual(self.handlers[0].connection.transport_name, "eventsource")

    def test_percent_survives_decode_uri(self) -> None:
        """
        "%" is escaped as %25 (sockjs-client runs decodeURI on every event), so
        "%zz" cannot throw and "%41" is not turned into "A".
        """
        exchange = self.request("GET", "/sockjs/000/s1/eventsource")
        self.handlers[0].connection.send("100% %zz %41")
        self.assertIn(b'data: a["100%25 %25zz %2541"]\r\n\r\n', exchange.response().body)

    def test_response_limit(self) -> None:
        """
        The event stream ends after response_limit bytes; the session lives.
        """
        exchange = self.request("GET", "/sockjs/000/s1/eventsource")
        self.handlers[0].connection.send("x" * 4096)
        self.assertTrue(exchange.response().complete)
        self.assertTrue(self.handlers[0].connection.is_open)

    def test_only_get(self) -> None:
        """
        eventsource takes GET only and answers no preflight.
        """
        for method in ["POST", "OPTIONS"]:
            response = self.fetch(method, "/sockjs/000/s1/eventsource")
            self.assertEqual((response.status, response.header("allow")), (405, "GET"))


class HtmlFileTests(HTTPTestsMixin, SynchronousTestCase):
    options = SockJSOptions(response_limit=4096)

    def test_page_and_scripts(self) -> None:
        """
        htmlfile answers an uncached HTML page of at least 1 KiB that binds
        the callback, then one script block per frame.
        """
        exchange = self.request("GET", "/sockjs/000/s1/htmlfile?c=%63allback")
        self.handlers[0].connection.send("x")
        response = exchange.response()
        self.assertEqual(response.status, 200)
        self.assertEqual(response.header("content-type"), "text/html; charset=UTF-8")
        self.assertEqual(response.header("cache-control"), NO_CACHE)
        head, _, frames = response.body.partition(b"\r\n\r\n")
        self.assertEqual(len(head), 1024)
        self.assertIn(b"var c = parent.callback;", head)
        self.assertEqual(
            frames,
            b'<script>\np("o");\n</script>\r\n<script>\np("a[\\"x\\"]");\n</script>\r\n',
        )
        self.assertEqual(self.handlers[0].connection.transport_name, "htmlfile")

    def test_message_cannot_end_script(self) -> None:
        """
        Markup in a message reaches the page escaped: no "<" of it is ever
        written inside the script block.
        """
        exchange = self.request("GET", "/sockjs/000/s1/htmlfile?c=cb")
        self.handlers[0].connection.send("</script><script>alert(1)</script><!--&\u2028")
        frame = exchange.response().body.rpartition(b"<script>\np(")[2]
        payload = frame.partition(b");\n</script>\r\n")[0]
        self.assertNotIn(b"<", payload)
        self.assertNotIn("\u2028".encode(), payload)
        self.assertEqual(
            json.loads(json.loads(payload)[1:]),
            ["</script><script>alert(1)</script><!--&\u2028"],
        )

    def test_callback_checked(self) -> None:
        """
        Without a callback, or with one that is not a dotted identifier
        path, htmlfile answers 500 and opens no session.
        """
        required = self.fetch("GET", "/sockjs/a/a/htmlfile")
        self.assertEqual(required.status, 500)
        self.assertEqual(required.body, b'"callback" parameter required')
        for callback in ["%20", "*", "abc(", "abc%28", "a-b", "1a", "a..b", "x" * 65]:
            response = self.fetch("GET", f"/sockjs/a/a/htmlfile?c={callback}")
            self.assertEqual(response.status, 500, callback)
            self.assertEqual(response.body, b'invalid "callback" parameter')
        self.assertEqual(self.handlers, [])

    def test_response_limit(self) -> None:
        """
        The page ends after response_limit bytes of script blocks.
        """
        exchange = self.request("GET", "/sockjs/000/s1/htmlfile?c=cb")
        self.handlers[0].connection.send("x" * 4096)
        self.assertTrue(exchange.response().complete)


class JsonpTests(HTTPTestsMixin, SynchronousTestCase):
    def form(self, path: str, body: bytes, **headers: str) -> Response:
        return self.fetch(
            "POST", path, body, content_type="application/x-www-form-urlencoded", **headers
        )

    def test_poll_and_send(self) -> None:
        """
        jsonp answers one frame as an uncached call of the callback behind
        a comment; jsonp_send takes a form's d field and answers "ok".
        """
        opened = self.fetch("GET", "/sockjs/000/s1/jsonp?c=%63allback")
        self.assertEqual((opened.status, opened.body), (200, b'/**/callback("o");\r\n'))
        self.assertEqual(opened.header("content-type"), "application/javascript; charset=UTF-8")
        self.assertEqual(opened.header("cache-control"), NO_CACHE)
        sent = self.form("/sockjs/000/s1/jsonp_send", b"d=%5B%22x%22%5D")
        self.assertEqual((sent.status, sent.body), (200, b"ok"))
        self.assertEqual(sent.header("content-type"), "text/plain; charset=UTF-8")
        self.assertEqual(sent.header("cache-control"), NO_CACHE)
        polled = self.fetch("GET", "/sockjs/000/s1/jsonp?c=callback")
        self.assertEqual(polled.body, b'/**/callback("a[\\"x\\"]");\r\n')
        self.assertEqual(self.handlers[0].connection.transport_name, "jsonp-polling")

    def test_plain_body(self) -> None:
        """
        jsonp_send takes a body that is not a form as the payload itself.
        """
        self.fetch("GET", "/sockjs/000/s1/jsonp?c=x")
        sent = self.fetch(
            "POST", "/sockjs/000/s1/jsonp_send", b'["%61bc"]', content_type="text/plain"
        )
        self.assertEqual(sent.body, b"ok")
        self.assertEqual(self.handlers[0].messages, ["%61bc"])

    def test_send_errors(self) -> None:
        """
        Broken JSON and a missing or empty payload are 500 with the
        protocol's texts; the session stays open.
        """
        self.fetch("GET", "/sockjs/000/s1/jsonp?c=x")
        broken = self.form("/sockjs/000/s1/jsonp_send", b"d=%5B%22x")
        self.assertEqual((broken.status, broken.body), (500, b"Broken JSON encoding."))
        for body in [b"", b"d=", b"p=p", b"&".join([b"a=1"] * 20)]:
            response = self.form("/sockjs/000/s1/jsonp_send", body)
            self.assertEqual((response.status, response.body), (500, b"Payload expected."))
        self.assertTrue(self.handlers[0].connection.is_open)

    def test_send_fits_encoded(self) -> None:
        """
        The limit applies to the form field once decoded: a payload of
        max_message_bytes passes though percent-encoding triples it.
        """
        limit = self.options.max_message_bytes
        self.fetch("GET", "/sockjs/000/s1/jsonp?c=x")
        payload = b'["' + b"<" * (limit - 4) + b'"]'
        body = b"d=" + quote(payload).encode()
        self.assertGreater(len(body), 2 * limit)
        self.assertEqual(self.form("/sockjs/000/s1/jsonp_send", body).body, b"ok")
        self.assertEqual(self.handlers[0].messages, ["<" * (limit - 4)])

    def test_send_too_big(self) -> None:
        """
        A payload over max_message_bytes, as a form field or as a body, is
        413 and closes the session with 1009.
        """
        too_big = b'["' + b"x" * self.options.max_message_bytes + b'"]'
        self.fetch("GET", "/sockjs/000/s1/jsonp?c=x")
        self.fetch("GET", "/sockjs/000/s2/jsonp?c=x")
        form = self.form("/sockjs/000/s1/jsonp_send", b"d=" + too_big)
        plain = self.fetch("POST", "/sockjs/000/s2/jsonp_send", too_big, content_type="text/plain")
        self.assertEqual((form.status, plain.status), (413, 413))
        for session in ["s1", "s2"]:
            poll = self.fetch("GET", f"/sockjs/000/{session}/jsonp?c=x")
            self.assertEqual(poll.body, b'/**/x("c[1009,\\"Message too big\\"]");\r\n')
        self.assertEqual([handler.messages for handler in self.handlers], [[], []])

    def test_callback_checked(self) -> None:
        """
        jsonp needs a callback that is a dotted identifier path.
        """
        required = self.fetch("GET", "/sockjs/a/a/jsonp")
        self.assertEqual((required.status, required.body), (500, b'"callback" parameter required'))
        invalid = self.fetch("GET", "/sockjs/a/a/jsonp?c=abc%28")
        self.assertEqual((invalid.status, invalid.body), (500, b'invalid "callback" parameter'))
        valid = self.fetch("GET", "/sockjs/a/a/jsonp?c=_jp.a1b2c3")
        self.assertEqual(valid.body, b'/**/_jp.a1b2c3("o");\r\n')

    def test_send_unknown_session(self) -> None:
        """
        jsonp_send to a session that does not exist is 404.
        """
        self.assertEqual(self.form("/sockjs/000/nope/jsonp_send", b"d=%5B%5D").status, 404)

    def test_no_preflight(self) -> None:
        """
        The JSONP URLs are not for XMLHttpRequest: no CORS preflight.
        """
        self.assertEqual(self.fetch("OPTIONS", "/sockjs/000/s1/jsonp").status, 405)
        self.assertEqual(self.fetch("OPTIONS", "/sockjs/000/s1/jsonp_send").status, 405)


OTHER_PEER = "10.0.0.99"


class SessionOwnershipTests(HTTPTestsMixin, SynchronousTestCase):
    def test_other_address_cannot_read(self) -> None:
        """
        Every receiver of a session opened from one address answers 404 to
        another address and leaves the owner's session alone.
        """
        self.fetch("POST", "/sockjs/000/s1/xhr")
        connection = self.handlers[0].connection
        connection.send("secret")
        for method, name in [
            ("POST", "xhr"),
            ("POST", "xhr_streaming"),
            ("GET", "eventsource"),
            ("GET", "htmlfile?c=cb"),
            ("GET", "jsonp?c=cb"),
        ]:
            response = self.fetch(method, f"/sockjs/000/s1/{name}", peer=OTHER_PEER)
            self.assertEqual(response.status, 404, name)
            self.assertNotIn(b"secret", response.body)
        self.assertEqual(len(self.handlers), 1)
        self.assertEqual(self.fetch("POST", "/sockjs/000/s1/xhr").body, b'a["secret"]\n')

    def test_other_address_cannot_send(self) -> None:
        """
        xhr_send and jsonp_send from another address are 404 and deliver
        nothing.
        """
        self.fetch("POST", "/sockjs/000/s1/xhr")
        xhr = self.fetch("POST", "/sockjs/000/s1/xhr_send", b'["a"]', peer=OTHER_PEER)
        jsonp = self.fetch(
            "POST",
            "/sockjs/000/s1/jsonp_send",
            b"d=%5B%22a%22%5D",
            peer=OTHER_PEER,
            content_type="application/x-www-form-urlencoded",
        )
        self.assertEqual((xhr.status, jsonp.status), (404, 404))
        self.assertEqual(self.handlers[0].messages, [])

    def test_streaming_owner_keeps_stream(self) -> None:
        """
        Another address asking for a streamed session gets 404, not the 2010
        close frame, and the owner's stream goes on.
        """
        exchange = self.request("POST", "/sockjs/000/s1/xhr_streaming")
        self.assertEqual(self.fetch("POST", "/sockjs/000/s1/xhr", peer=OTHER_PEER).status, 404)
        self.handlers[0].connection.send("still")
        self.assertTrue(exchange.response().body.endswith(b'o\na["still"]\n'))


@define
class OriginRecordingHandler(RecordingHandler):
    """Records the origin the session showed when each message arrived."""

    origins: list[str | None] = field(factory=list)

    def message_received(self, text: str) -> None:
        self.origins.append(self.connection.origin)
        super().message_received(text)


class SessionOriginTests(HTTPTestsMixin, SynchronousTestCase):
    def form(self, path: str, body: bytes, **headers: str) -> Response:
        return self.fetch(
            "POST", path, body, content_type="application/x-www-form-urlencoded", **headers
        )

    def open_session(self, connection: SockJSConnection) -> RecordingHandler:
        handler = OriginRecordingHandler(connection)
        self.handlers.append(handler)
        return handler

    def test_send_shows_origin_of_originless_session(self) -> None:
        """A JSONP session opened without Origin shows the Origin of its first send."""
        self.fetch("GET", "/sockjs/000/s1/jsonp?c=cb")
        self.assertIsNone(self.handlers[0].connection.origin)
        sent = self.form("/sockjs/000/s1/jsonp_send", b"d=%5B%22x%22%5D",
                         origin="https://page.example")
        self.assertEqual(sent.status, 200)
        self.assertEqual(self.handlers[0].origins, ["https://page.example"])

    def test_other_origin_refused(self) -> None:
        """Once a session shows an origin, requests with another Origin are 404."""
        self.fetch("POST", "/sockjs/000/s1/xhr", origin="https://page.example")
        xhr = self.fetch("POST", "/sockjs/000/s1/xhr_send", b'["a"]',
                         origin="https://evil.example")
        jsonp = self.form("/sockjs/000/s1/jsonp_send", b"d=%5B%22a%22%5D",
                          origin="https://evil.example")
        poll = self.fetch("POST", "/sockjs/000/s1/xhr", origin="https://evil.example")
        self.assertEqual((xhr.status, jsonp.status, poll.status), (404, 404, 404))
        self.assertEqual(self.handlers[0].messages, [])
        self.assertEqual(self.handlers[0].connection.origin, "https://page.example")

    def test_originless_send_to_session_with_origin(self) -> None:
        """A request without Origin still reaches a session that shows one."""
        self.fetch("POST", "/sockjs/000/s1/xhr", origin="https://page.example")
        sent = self.fetch("POST", "/sockjs/000/s1/xhr_send", b'["a"]')
        self.assertEqual(sent.status, 204)
        self.assertEqual(self.handlers[0].messages, ["a"])
        self.assertEqual(self.handlers[0].connection.origin, "https://page.example")


class CookieOwnershipTests(HTTPTestsMixin, SynchronousTestCase):
    options = SockJSOptions(cookie_needed=True)

    def test_cookie_binds_session(self) -> None:
        """
        A session opened with a JSESSIONID answers only requests with that
        cookie.
        """
        self.fetch("POST", "/sockjs/000/s1/xhr", cookie="JSESSIONID=mine")
        other = self.fetch("POST", "/sockjs/000/s1/xhr_send", b'["a"]', cookie="JSESSIONID=x")
        missing = self.fetch("POST", "/sockjs/000/s1/xhr")
        mine = self.fetch("POST", "/sockjs/000/s1/xhr_send", b'["b"]', cookie="JSESSIONID=mine")
        self.assertEqual((other.status, missing.status, mine.status), (404, 404, 204))
        self.assertEqual(self.handlers[0].messages, ["b"])

    def test_without_cookie_address_only(self) -> None:
        """
        A session opened without a cookie (the first request of a visitor)
        is bound to the address only, so the cookie set in its answer works.
        """
        self.fetch("POST", "/sockjs/000/s1/xhr")
        sent = self.fetch("POST", "/sockjs/000/s1/xhr_send", b'["a"]', cookie="JSESSIONID=dummy")
        self.assertEqual(sent.status, 204)


class SessionLimitTests(HTTPTestsMixin, SynchronousTestCase):
    options = SockJSOptions(max_sessions_per_address=2)

    def test_refused_beyond_limit(self) -> None:
        """
        Beyond max_sessions_per_address a new session is refused with the
        close frame 1013 in the transport's framing; other addresses and
        existing sessions are unaffected.
        """
        self.fetch("POST", "/sockjs/000/s1/xhr")
        self.fetch("GET", "/sockjs/000/s2/jsonp?c=cb")
        refused = {
            "xhr": self.fetch("POST", "/sockjs/000/s3/xhr").body,
            "jsonp": self.fetch("GET", "/sockjs/000/s3/jsonp?c=cb").body,
            "eventsource": self.fetch("GET", "/sockjs/000/s3/eventsource").body,
        }
        self.assertEqual(
            refused,
            {
                "xhr": b'c[1013,"Too many sessions from your address"]\n',
                "jsonp": b'/**/cb("c[1013,\\"Too many sessions from your address\\"]");\r\n',
                "eventsource": b'\r\ndata: c[1013,"Too many sessions from your address"]\r\n\r\n',
            },
        )
        self.assertEqual(len(self.handlers), 2)
        self.assertEqual(self.fetch("POST", "/sockjs/000/s3/xhr", peer=OTHER_PEER).body, b"o\n")
        self.assertEqual(self.fetch("POST", "/sockjs/000/s1/xhr_send", b'["a"]').status, 204)

    def test_room_again_after_expiry(self) -> None:
        """
        Sessions stop counting once they are forgotten.
        """
        self.fetch("POST", "/sockjs/000/s1/xhr")
        self.fetch("POST", "/sockjs/000/s2/xhr")
        self.clock.advance(self.options.disconnect_delay)
        self.assertEqual(self.fetch("POST", "/sockjs/000/s3/xhr").body, b"o\n")
