"""Property tests: every parser of client input refuses clearly and never crashes.

Hypothesis drives the real parsers and the real resource tree (ShellSite,
the SockJS endpoint, the console protocol) in memory, over StringTransport
and a Clock, with fake sandboxes. Whatever arrives, the answer is a clear
refusal (a 4xx, a SockJS close, a console protocol error) and nothing is
logged as a failure; 500 appears only where the SockJS protocol prescribes it
for a broken payload or callback, with its fixed text.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from shellserver.admission import Admission
from shellserver.auth import TokenAuthority, TokenClaims, TokenError
from shellserver.console import (
    CLOSE_AUTH_FAILED,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_REATTACH_REFUSED,
    ConsoleFactory,
    ConsoleSettings,
    ProtocolError,
    parse_size,
)
from shellserver.sockjs import SockJSOptions, SockJSResource
from shellserver.sockjs.framing import (
    BrokenPayload,
    InvalidCallback,
    check_callback,
    decode_payload,
)
from shellserver.testing import FakeConnection, FakeSandboxStarter
from shellserver.users import UnregisteredUsers
from shellserver.web import MAX_HOST_LENGTH, ShellSite, build_resource, host_header_problem

WEB_DIR = str(Path(__file__).resolve().parents[2] / "web")
ORIGIN = "https://console.example"
# FakeConnection's client address, which tokens are bound to.
PEER = "192.0.2.7"

# Reproducible in CI and quick: each property runs in well under 5 s.
PROPERTY = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])

# The only 500s a client can cause: texts the SockJS protocol prescribes.
SOCKJS_500_TEXTS = {
    b"Payload expected.",
    b"Broken JSON encoding.",
    b'"callback" parameter required',
    b'invalid "callback" parameter',
}

# Characters that reach parsers and surprise them: non-ASCII digits ("k²"),
# separators, NUL and controls, surrogates, quotes, percent signs.
TRICKY = st.sampled_from([
    "\u00b2", "\u0661", "\uff11", "\u00b9", "\x00", "\r", "\n", "\t", " ", ",", ";",
    "=", ":", ".", "/", "\\", "%", "%00", "%ff", '"', "'", "<", "\ud800", "\udfff",
    "\u2028", "\ufeff", "\U0010ffff", "-", "+", "0", "9", "a", "[", "]", "{", "}",
])
CLIENT_TEXT = st.lists(st.one_of(TRICKY, st.text(max_size=8)), max_size=12).map("".join)
CLIENT_BYTES = st.one_of(
    st.binary(max_size=64),
    CLIENT_TEXT.map(lambda text: text.encode("utf-8", "surrogatepass")),
)
# Header values travel as bytes without CR or LF (those would end the header).
HEADER_VALUE = CLIENT_BYTES.map(lambda value: value.replace(b"\r", b"").replace(b"\n", b""))
# Host-like values of every length up to and past what fits in a token.
LONG_HOST = st.tuples(
    st.text(alphabet="abc.-:[]019", min_size=1, max_size=20), st.integers(1, 2000),
).map(lambda parts: (parts[0] * (parts[1] // len(parts[0]) + 1))[:parts[1]].encode())

# Arrays or objects nested up to 60,000 deep (a message may be 64 KiB).
NESTED_JSON = st.tuples(st.sampled_from([b"[", b'{"a":', b'["a",']),
                        st.integers(1, 60000)).map(lambda parts: parts[0] * parts[1])

PATHS = [
    b"/", b"/console/", b"/console", b"/status", b"/embed.js", b"/static/console.js",
    b"/static/vendor/xterm.js", b"/sockjs", b"/sockjs/", b"/sockjs/info",
    b"/sockjs/iframe.html", b"/sockjs/websocket", b"/sockjs/000/abc/xhr",
    b"/sockjs/000/abc/xhr_send", b"/sockjs/000/abc/xhr_streaming",
    b"/sockjs/000/abc/jsonp", b"/sockjs/000/abc/jsonp_send", b"/sockjs/000/abc/eventsource",
    b"/sockjs/000/abc/htmlfile", b"/sockjs/000/abc/websocket",
]
PATH_SUFFIX = CLIENT_BYTES.map(
    lambda value: bytes(b for b in value if b > 0x20 and b not in (0x7f, ord("#"))))
METHODS = st.sampled_from([b"GET", b"POST", b"OPTIONS", b"HEAD", b"PUT", b"DELETE", b"X"])
HEADER_NAMES = st.sampled_from([
    b"Host", b"Origin", b"Cookie", b"Content-Type", b"Upgrade", b"Connection",
    b"Sec-WebSocket-Key", b"Sec-WebSocket-Version", b"Access-Control-Request-Headers",
    b"If-None-Match", b"Range", b"Accept-Encoding", b"X-Forwarded-For",
])


class AccessLog:
    """Stands in for the site's access log file."""

    def __init__(self, lines: list[str]) -> None:
        self._lines = lines

    def write(self, line: str) -> None:
        self._lines.append(line)


def unexpected_failures(events) -> list[str]:
    """Logged failures, errors or criticals: what would be a traceback in the log."""
    return [
        str(event.get("log_format")) for event in events
        if "log_failure" in event
        or event.get("log_level") in (LogLevel.error, LogLevel.critical)
    ]


class HostileSiteTestCase(SynchronousTestCase):
    """The server's whole resource tree in memory, as tap.py builds it."""

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.tokens = TokenAuthority(b"s" * 32, node="node-1", clock=self.clock, ttl=60.0)
        admission = Admission(self.clock, capacity=5, per_address=2,
                              per_address_per_minute=1000, auth_failures_per_minute=5)
        self.users = users = UnregisteredUsers(self.clock, 60.0)
        self.starter = FakeSandboxStarter()
        consoles = ConsoleFactory(
            self.clock, self.tokens, self.starter,
            ConsoleSettings(auth_timeout=5.0, idle_timeout=60.0, max_age=600.0),
            admission, users)
        sockjs = SockJSResource(consoles, clock=self.clock, options=SockJSOptions())
        root = build_resource(web_dir=WEB_DIR, tokens=self.tokens, clock=self.clock,
                              sockjs=sockjs, admission=admission, users=users,
                              host_origins=["https://host.example"])
        self.site = ShellSite(root, reactor=self.clock)
        self.port = 40000

    def exchange(self, raw: bytes, *, settle: float = 120) -> bytes:
        """Send ``raw`` on a new connection; what the server wrote back
        (then ``settle`` seconds pass: sessions expire, log windows end)."""
        self.port += 1
        address = IPv4Address("TCP", "198.51.100.9", self.port)
        channel = self.site.buildProtocol(address)
        transport = StringTransport(peerAddress=address)
        channel.makeConnection(transport)
        channel.dataReceived(raw)
        # the websocket handshake and coalesced output run on the clock
        self.clock.advance(0.1)
        channel.connectionLost(Failure(ConnectionDone("the client went away")))
        self.end_terminated_sandboxes()
        self.clock.advance(settle)
        return transport.value()

    def end_terminated_sandboxes(self) -> None:
        """Sandboxes told to stop exit, as real ones do (freeing their slots)."""
        for sandbox in self.starter.started:
            if sandbox.terminated and not sandbox.ended:
                sandbox.exit(None, 9)

    def assertClearAnswer(self, response: bytes, events) -> int | None:
        """A status line (or nothing, for a connection closed at once), never
        an unprescribed 500, and no failure logged."""
        self.assertEqual(unexpected_failures(events), [], response[:300])
        match = re.match(rb"HTTP/1\.[01] (\d{3}) ", response)
        if response:
            self.assertIsNotNone(match, response[:300])
        status = int(match.group(1)) if match else None
        if status == 500:
            body = response.partition(b"\r\n\r\n")[2]
            self.assertTrue(any(text in body for text in SOCKJS_500_TEXTS), response[:300])
        self.assertNotIn(b"Traceback", response)
        return status


class RequestHeadTests(HostileSiteTestCase):
    @PROPERTY
    @given(method=METHODS, path=st.sampled_from(PATHS), suffix=PATH_SUFFIX,
           query=PATH_SUFFIX,
           headers=st.lists(st.one_of(st.tuples(HEADER_NAMES, HEADER_VALUE),
                                      st.tuples(st.just(b"Host"), LONG_HOST)), max_size=6),
           body=st.binary(max_size=64))
    def test_any_request_gets_a_clear_answer(self, method, path, suffix, query, headers, body):
        """Any method, path, query string, headers (Host, Origin, Cookie...) and
        body gets an HTTP answer that is not a crash, and no failure is logged."""
        lines = [method + b" " + path + suffix + b"?" + query + b" HTTP/1.1",
                 *(name + b": " + value for name, value in headers),
                 b"Content-Length: %d" % len(body), b"Connection: close"]
        with capturedLogs() as events:
            response = self.exchange(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        self.assertClearAnswer(response, events)

    @PROPERTY
    @given(raw=st.one_of(st.binary(max_size=300),
                         CLIENT_TEXT.map(lambda t: t.encode("utf-8", "surrogatepass"))))
    def test_any_bytes_as_a_request(self, raw):
        """Arbitrary bytes where a request belongs get a 4xx or a closed
        connection, never a crash."""
        with capturedLogs() as events:
            response = self.exchange(raw + b"\r\n\r\n")
        status = self.assertClearAnswer(response, events)
        self.assertNotEqual(status, 500)


class HostHeaderTests(HostileSiteTestCase):
    def get_console(self, *hosts: bytes, settle: float = 120) -> bytes:
        lines = [b"GET /console/ HTTP/1.1", *(b"Host: " + host for host in hosts),
                 b"Connection: close"]
        return self.exchange(b"\r\n".join(lines) + b"\r\n\r\n", settle=settle)

    @PROPERTY
    @given(host=st.one_of(HEADER_VALUE, LONG_HOST))
    def test_any_host_header(self, host):
        """Any Host on the console page gets the page (a valid host[:port]) or
        a 400 saying what is wrong with it; never a 500, never a failure."""
        with capturedLogs() as events:
            response = self.get_console(host)
        status = self.assertClearAnswer(response, events)
        self.assertIn(status, (200, 400), response[:300])
        body = response.partition(b"\r\n\r\n")[2]
        if status == 400 and body:
            # (twisted.web itself answers a bare 400 to a NUL in any header)
            self.assertIn(b"The Host header ", body)

    def test_long_host_is_refused_before_minting(self):
        """A 1,500-character Host gets 400 naming the limit, and mints no token."""
        with capturedLogs() as events:
            response = self.get_console(b"a" * 1500, settle=0)
        self.assertEqual(self.assertClearAnswer(response, events), 400)
        self.assertIn(f"longer than {MAX_HOST_LENGTH} characters".encode(), response)
        self.assertNotIn(b"shellserver-token", response)
        self.assertEqual(len(self.users), 0)

    def test_host_at_the_limit_is_served(self):
        """A Host of exactly the maximum length still gets a console page."""
        host = b"a" * (MAX_HOST_LENGTH - 6) + b":65535"
        response = self.get_console(host)
        self.assertTrue(response.startswith(b"HTTP/1.1 200 "), response[:300])

    def test_host_forms(self):
        """Names, IPv4 and IPv6 literals with ports pass; junk, two Hosts, bad ports fail."""
        for host in (b"console.example", b"127.0.0.1:8443", b"[::1]:8443", b"[::1]",
                     b"xn--bcher-kva.example", b"localhost"):
            self.assertTrue(self.get_console(host).startswith(b"HTTP/1.1 200 "), host)
        for hosts in ((b"",), (b"a b",), (b"a:",), (b"a:65536",), (b"a:1:2",),
                      (b"\xc3\xa9.example",), (b"a/b",), (b"a@b",), (b"[::1",),
                      (b"a", b"b")):
            response = self.get_console(*hosts)
            self.assertTrue(response.startswith(b"HTTP/1.1 400 "), (hosts, response[:200]))

    def test_refusals_are_logged_within_a_budget(self):
        """A flood of bad Host headers from one address logs a bounded number of lines."""
        access_lines = []
        self.site.logFile = AccessLog(access_lines)
        with capturedLogs() as events:
            for _ in range(200):
                self.get_console(b"a" * 300, settle=0.1)
            self.clock.advance(60)
            self.site.client_events.flush()
        texts = [formatEvent(event) for event in events]
        self.assertEqual(len(texts), 5 + 2, texts)  # 5 refusals and 2 summaries
        self.assertIn("suppressed 195 similar messages (bad host header) from 198.51.100.9 "
                      "in 60 s", texts)
        self.assertIn("suppressed 195 similar messages (refused request) from 198.51.100.9 "
                      "in 60 s", texts)
        self.assertEqual(len(access_lines), 5)

    def test_served_requests_are_all_in_the_access_log(self):
        """Requests that are served keep one access log line each."""
        access_lines = []
        self.site.logFile = AccessLog(access_lines)
        for _ in range(20):
            self.exchange(b"GET /embed.js HTTP/1.1\r\nHost: a\r\n\r\n", settle=0.1)
        self.assertEqual(len(access_lines), 20)


class SockJSSendTests(HostileSiteTestCase):
    def open_session(self, session_id: bytes) -> None:
        response = self.exchange(b"POST /sockjs/000/" + session_id + b"/xhr HTTP/1.1\r\n"
                                 b"Host: console.example\r\nContent-Length: 0\r\n\r\n",
                                 settle=0.1)
        self.assertIn(b"\r\no\n\r\n", response)

    @PROPERTY
    @given(body=st.one_of(
        CLIENT_BYTES, NESTED_JSON,
        st.lists(CLIENT_TEXT, max_size=4).map(
            lambda items: ("[" + ",".join('"' + i.replace('"', "") + '"' for i in items)
                           + "]").encode("utf-8", "surrogatepass")),
    ), transport=st.sampled_from([b"xhr_send", b"jsonp_send"]),
       form=st.booleans())
    def test_any_send_body(self, body, transport, form):
        """Any xhr_send or jsonp_send body (JSON or not, form or not) is
        delivered or refused with the SockJS text; no failure is logged."""
        self.port += 1
        session_id = b"s%d" % self.port
        with capturedLogs() as events:
            self.open_session(session_id)
            headers = [b"Host: console.example", b"Content-Length: %d" % len(body)]
            if form:
                headers.append(b"Content-Type: application/x-www-form-urlencoded")
                body = b"d=" + body
                headers[1] = b"Content-Length: %d" % len(body)
            response = self.exchange(
                b"POST /sockjs/000/" + session_id + b"/" + transport + b" HTTP/1.1\r\n"
                + b"\r\n".join(headers) + b"\r\n\r\n" + body)
        # the session is there: delivered (200, 204) or refused (413, 500), never 404
        self.assertIn(self.assertClearAnswer(response, events), (200, 204, 413, 500))


class ConsoleMessageTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.tokens = TokenAuthority(b"s" * 32, node="node-1", clock=self.clock, ttl=60.0)
        self.factory = ConsoleFactory(
            self.clock, self.tokens, FakeSandboxStarter(),
            ConsoleSettings(auth_timeout=5.0, idle_timeout=60.0, max_age=600.0))

    @PROPERTY
    @given(kind=st.sampled_from(list("airkxz\u00b2 ")), payloads=st.lists(
        st.tuples(st.sampled_from(list("irkaAq\u00b2\x00")), CLIENT_TEXT), max_size=6),
        first=CLIENT_TEXT, authenticate=st.booleans())
    def test_any_console_messages(self, kind, payloads, first, authenticate):
        """Any sequence of console messages keeps the console running or closes
        it with 4001, 4003 or 4005 and a message; nothing escapes to the transport."""
        connection = FakeConnection(origin=ORIGIN)
        session = self.factory(connection)
        connection.handler = session
        console = session.console
        with capturedLogs() as events:
            if authenticate:
                session.message_received("a" + self.tokens.mint(user_id="u", origin=ORIGIN,
                                                                 client_address=PEER))
                console.output(b"In [1]: ")
                self.clock.advance(0.01)
            session.message_received(kind + first)
            for message_kind, payload in payloads:
                session.message_received(message_kind + payload)
        self.assertEqual(unexpected_failures(events), [])
        self.assertIn(connection.close_code, (None, CLOSE_AUTH_FAILED, CLOSE_PROTOCOL_ERROR,
                                                 CLOSE_REATTACH_REFUSED))
        if connection.close_code is not None:
            self.assertTrue(connection.close_reason)
        session.closed()

    @PROPERTY
    @given(payload=CLIENT_TEXT)
    def test_any_acknowledgement(self, payload):
        """``k`` with any payload is accepted as a count or is a protocol error."""
        connection = FakeConnection(origin=ORIGIN)
        session = self.factory(connection)
        connection.handler = session
        session.message_received("a" + self.tokens.mint(user_id="u", origin=ORIGIN,
                                                                 client_address=PEER))
        session.console.output(b"x" * 100)
        self.clock.advance(0.01)
        session.message_received("k" + payload)
        if connection.close_code is not None:
            self.assertEqual(connection.close_code, CLOSE_PROTOCOL_ERROR)
        else:
            self.assertRegex(payload, r"\A[0-9]+\Z")
        session.closed()

    @PROPERTY
    @given(payload=CLIENT_TEXT)
    def test_any_resize(self, payload):
        """parse_size returns sane bounds or raises ProtocolError, nothing else."""
        try:
            cols, rows = parse_size(payload)
        except ProtocolError as error:
            self.assertTrue(str(error))
        else:
            self.assertTrue(1 <= cols <= 1000 and 1 <= rows <= 500)


class PayloadParserTests(SynchronousTestCase):
    @PROPERTY
    @given(data=st.one_of(CLIENT_BYTES, st.binary(max_size=200), NESTED_JSON),
           single=st.booleans())
    def test_any_sockjs_payload(self, data, single):
        """decode_payload returns strings or raises BrokenPayload with a SockJS text."""
        try:
            messages = decode_payload(data, allow_single=single)
        except BrokenPayload as broken:
            self.assertIn(broken.reason.encode(), SOCKJS_500_TEXTS)
        else:
            self.assertTrue(all(isinstance(message, str) for message in messages))

    @PROPERTY
    @given(value=st.one_of(st.none(), CLIENT_BYTES))
    def test_any_callback(self, value):
        """check_callback accepts dotted identifiers only, or raises InvalidCallback."""
        try:
            callback = check_callback(value)
        except InvalidCallback as invalid:
            self.assertIn(invalid.reason.encode(), SOCKJS_500_TEXTS)
        else:
            self.assertRegex(callback, rb"\A[A-Za-z0-9_.]{1,64}\Z")


class TokenTextTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.tokens = TokenAuthority(b"s" * 32, node="node-1", clock=self.clock, ttl=60.0)

    @PROPERTY
    @given(text=st.one_of(CLIENT_TEXT, st.text(max_size=1100),
                          CLIENT_TEXT.map(lambda t: "v1." + t + "." + t)),
           origin=st.one_of(st.none(), CLIENT_TEXT))
    def test_any_token_text(self, text, origin):
        """Redeeming any text gives claims or a TokenError with a reason, nothing else."""
        try:
            claims = self.tokens.redeem(text, origin=origin, client_address=PEER)
        except TokenError as error:
            self.assertTrue(str(error))
        else:
            self.assertIsInstance(claims, TokenClaims)

    @PROPERTY
    @given(origin=st.one_of(CLIENT_TEXT, st.text(min_size=250, max_size=2000)))
    def test_minting_any_origin(self, origin):
        """Minting for any origin gives a redeemable token or a ValueError saying why."""
        try:
            token = self.tokens.mint(user_id="u", origin=origin, client_address=PEER)
        except ValueError as error:
            self.assertIn("origin", str(error))
        else:
            self.assertEqual(
                self.tokens.redeem(token, origin=origin, client_address=PEER).origin, origin)


class HostProblemTests(SynchronousTestCase):
    @PROPERTY
    @given(values=st.lists(HEADER_VALUE, max_size=3))
    def test_any_host_values(self, values):
        """host_header_problem judges any Host values with a sentence or None."""
        from twisted.web.test.requesthelper import DummyRequest

        request = DummyRequest([b""])
        if values:
            request.requestHeaders.setRawHeaders(b"host", values)
        problem = host_header_problem(request)
        if problem is None:
            self.assertLessEqual(len(values), 1)
            if values:
                self.assertLessEqual(len(values[0]), MAX_HOST_LENGTH)
                values[0].decode("ascii")
        else:
            self.assertTrue(problem.startswith("The "))


def client_frame(opcode: int, payload: bytes, *, fin: bool = True, masked: bool = True,
                 rsv: int = 0) -> bytes:
    """One websocket frame as a client sends it (or, unmasked, as it must not)."""
    head = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
    length = len(payload)
    mask_bit = 0x80 if masked else 0
    if length < 126:
        head += bytes([mask_bit | length])
    else:
        head += bytes([mask_bit | 126]) + length.to_bytes(2, "big")
    if not masked:
        return head + payload
    key = b"\x01\x02\x03\x04"
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


# Console messages: a kind letter (or a surprise) and any text.
CONSOLE_MESSAGES = st.lists(st.one_of(
    st.sampled_from(["k\u00b2", "k0", "r80,24", "r\u00b2,1", "ix", "a"]),
    st.tuples(st.sampled_from(list("airkx\u00b2")), CLIENT_TEXT).map("".join),
), min_size=1, max_size=3)
# What a client may put on a websocket: broken frames, junk bytes, or
# console messages (to be framed as the transport expects).
FRAMES = st.lists(st.one_of(
    st.builds(client_frame, st.sampled_from([0x0, 0x1, 0x2, 0x3, 0x8, 0x9, 0xA, 0xF]),
              CLIENT_BYTES, fin=st.booleans(), masked=st.booleans(),
              rsv=st.sampled_from([0, 0, 0, 1, 4])),
    st.binary(max_size=16),
    st.builds(client_frame, st.just(0x1), st.tuples(
        st.sampled_from([b"[", b'["a",']), st.integers(1, 12000)).map(
            lambda parts: parts[0] * parts[1])),
    CONSOLE_MESSAGES,
), max_size=6)


def as_frame(item: bytes | list[str], *, framed: bool) -> bytes:
    """``item`` as websocket bytes: console messages become one text frame
    (a SockJS JSON array when ``framed``), bytes go as they are."""
    if isinstance(item, bytes):
        return item
    if framed:
        return client_frame(0x1, json.dumps(item).encode())
    return client_frame(0x1, item[0].encode("utf-8", "replace"))


class WebSocketFrameTests(HostileSiteTestCase):
    @PROPERTY
    @given(path=st.sampled_from([b"/sockjs/websocket", b"/sockjs/000/abc/websocket"]),
           frames=FRAMES, authenticate=st.booleans())
    def test_any_frames_after_the_handshake(self, path, frames, authenticate):
        """Any frames on a raw or framed websocket are delivered, or end the
        connection with a close code; no failure is logged."""
        self.port += 1
        address = IPv4Address("TCP", "198.51.100.9", self.port)
        channel = self.site.buildProtocol(address)
        transport = StringTransport(peerAddress=address)
        transport.protocol = channel  # autobahn moves the connection to its protocol
        channel.makeConnection(transport)
        with capturedLogs() as events:
            channel.dataReceived(
                b"GET " + path + b" HTTP/1.1\r\nHost: console.example\r\n"
                b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                b"Sec-WebSocket-Version: 13\r\nOrigin: https://console.example\r\n\r\n")
            self.assertTrue(transport.value().startswith(b"HTTP/1.1 101 "),
                            transport.value()[:300])
            websocket = transport.protocol
            framed = path != b"/sockjs/websocket"
            if authenticate:
                token = self.tokens.mint(user_id="u", origin="https://console.example",
                                         client_address="198.51.100.9")
                frames = [["a" + token]] + frames
            for frame in frames:
                if transport.disconnecting:
                    break
                websocket.dataReceived(as_frame(frame, framed=framed))
            self.clock.advance(10)
            websocket.connectionLost(Failure(ConnectionDone("the client went away")))
            self.end_terminated_sandboxes()
            self.clock.advance(120)
        self.assertEqual(unexpected_failures(events), [])
        self.assertNotIn(b"Traceback", transport.value())


class LibraryMessageTests(HostileSiteTestCase):
    def test_head_requests_are_logged_within_a_budget(self):
        """twisted.web's note on every HEAD answered by GET stays within the budget."""
        with capturedLogs() as events:
            for _ in range(100):
                response = self.exchange(b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n", settle=0.1)
                self.assertTrue(response.startswith(b"HTTP/1.1 200 "), response[:200])
        texts = [formatEvent(event) for event in events]
        self.assertEqual(sum("HEAD request" in text for text in texts), 5, texts)

    def test_idle_timeouts_are_logged_within_a_budget(self):
        """twisted.web's "Timing out client" for idle connections stays within the budget."""
        with capturedLogs() as events:
            for _ in range(50):
                self.port += 1
                address = IPv4Address("TCP", "198.51.100.9", self.port)
                channel = self.site.buildProtocol(address)
                channel.makeConnection(StringTransport(peerAddress=address))
            self.clock.advance(self.site.limits.idle_connection_timeout + 1)
        texts = [formatEvent(event) for event in events]
        self.assertEqual(sum("Timing out client" in text for text in texts), 5, texts)


class ConsolePageOriginTests(HostileSiteTestCase):
    def test_console_page_refuses_an_unusable_origin_itself(self):
        """Behind a plain Site (no Host check first), a Host the token cannot
        carry still gets a 400, not a 500, and leaves no user behind."""
        from twisted.web.server import Site

        self.site = Site(self.site.resource, reactor=self.clock)
        with capturedLogs() as events:
            response = self.exchange(b"GET /console/ HTTP/1.1\r\nHost: " + b"h" * 1500
                                     + b"\r\n\r\n", settle=0)
        self.assertEqual(self.assertClearAnswer(response, events), 400)
        self.assertIn(b"The Host header cannot be used for a console.", response)
        self.assertEqual(len(self.users), 0)
