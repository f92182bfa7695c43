"""Prometheus metrics (shellserver.metrics): each counted where it happens, with fakes."""

from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.protocols.haproxy._wrapper import HAProxyWrappingFactory
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.test.requesthelper import DummyRequest

from shellserver.admission import Admission
from shellserver.auth import TokenAuthority
from shellserver.console import ConsoleFactory, ConsoleSettings
from shellserver.limits import ConnectionGuard
from shellserver.metrics import Metrics, MetricsPage, bounded, metrics_site
from shellserver.sandbox.pool import SandboxPool
from shellserver.sandbox.service import SETUP_FAILED
from shellserver.sockjs.options import SockJSOptions
from shellserver.sockjs.session import SessionRegistry
from shellserver.tap import Options
from shellserver.testing import FakeConnection, FakeSandboxStarter
from shellserver.web import ShellSite
from tests.unit.test_limits import LIMITS, AbortableTransport, Echo, Hello, peer

ORIGIN = "https://console.example"
CLIENT = "192.0.2.7"  # FakeConnection's peer_host
SETTINGS = ConsoleSettings(auth_timeout=5.0, idle_timeout=600.0, max_age=1800.0,
                           output_high_water=100, output_low_water=10)
PROMPT = b"Python 3\r\n\x1b[0;32mIn [\x1b[0;92;1m1\x1b[0;32m]: "


class ConsoleMetricsTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.metrics = Metrics()
        self.tokens = TokenAuthority(b"k" * 32, node="node-1", clock=self.clock, ttl=60.0)
        self.starter = FakeSandboxStarter()
        self.admission = Admission(self.clock, capacity=1, per_address=5,
                                   per_address_per_minute=50)
        self.factory = ConsoleFactory(self.clock, self.tokens, self.starter, SETTINGS,
                                      self.admission, metrics=self.metrics)

    def value(self, name, **labels):
        return self.metrics.value(name, **labels)

    def open(self, transport="websocket"):
        connection = FakeConnection(origin=ORIGIN)
        connection.transport_name = transport
        attachment = self.factory(connection)
        connection.handler = attachment
        return connection, attachment.console

    def running(self, delay=0.0):
        connection, session = self.open()
        session.message_received(
            "a" + self.tokens.mint(user_id="u1", origin=ORIGIN, client_address=CLIENT))
        self.clock.advance(delay)
        session.output(b"In [1]: ")
        return connection, session, self.starter.started[-1]

    def test_connection_counted_by_transport(self):
        """Each new SockJS connection counts once under its transport."""
        self.open("xhr-streaming")
        self.open("websocket")
        self.open("websocket")
        self.assertEqual(self.value("shellserver_connections_total",
                                    transport="xhr_streaming"), 1)
        self.assertEqual(self.value("shellserver_connections_total", transport="websocket"), 2)

    def test_start_counted_with_its_latency(self):
        """A console's first output counts a cold start and observes its latency."""
        self.running(delay=0.3)
        self.assertEqual(self.value("shellserver_consoles_started_total", source="cold"), 1)
        self.assertEqual(self.value("shellserver_console_start_seconds_count", source="cold"),
                         1)
        self.assertAlmostEqual(
            self.value("shellserver_console_start_seconds_sum", source="cold"), 0.3)
        self.assertEqual(self.value("shellserver_console_start_seconds_bucket",
                                    source="cold", le="0.25"), 0)

    def test_active_follows_admission(self):
        """consoles_active reads the admission slots held now."""
        self.metrics.watch_active(lambda: self.admission.active)
        _, session, sandbox = self.running()
        self.assertEqual(self.value("shellserver_consoles_active"), 1)
        sandbox.exit(0)
        self.assertEqual(self.value("shellserver_consoles_active"), 0)

    def test_exit_counted(self):
        """A console whose IPython exits counts as ended by exit."""
        _, _, sandbox = self.running()
        sandbox.exit(0)
        self.assertEqual(self.value("shellserver_consoles_ended_total", reason="exit"), 1)

    def test_idle_counted(self):
        """A console ended by the idle timeout counts as ended by idle, once."""
        _, _, sandbox = self.running()
        self.clock.advance(SETTINGS.idle_timeout + 1)
        sandbox.exit(None, 15)
        self.assertEqual(self.value("shellserver_consoles_ended_total", reason="idle"), 1)
        self.assertEqual(self.value("shellserver_consoles_ended_total", reason="exit"), 0)

    def test_max_age_counted(self):
        """A console that reaches max_age counts as ended by max_age."""
        _, session, sandbox = self.running()
        for _ in range(4):
            self.clock.advance(SETTINGS.max_age / 4)
            session.message_received("i ")
        sandbox.exit(None, 15)
        self.assertEqual(self.value("shellserver_consoles_ended_total", reason="max_age"), 1)

    def test_budget_counted(self):
        """A console the CPU budget ends (ending()) counts as ended by budget."""
        _, session, sandbox = self.running()
        session.ending("Console ended: it used its CPU budget.")
        sandbox.exit(None, 9)
        self.assertEqual(self.value("shellserver_consoles_ended_total", reason="budget"), 1)

    def test_kill_switch_and_shutdown_counted(self):
        """The kill switch's end and a shutdown's end count under their own reasons."""
        _, _, first = self.running()
        self.factory.end_all_by_kill_switch("The service is paused.")
        first.exit(None, 15)
        self.admission = None
        _, _, second = self.running()
        self.factory.end_all("The server has shut down.")
        second.exit(None, 15)
        self.assertEqual(self.value("shellserver_consoles_ended_total", reason="kill_switch"), 1)
        self.assertEqual(self.value("shellserver_consoles_ended_total", reason="shutdown"), 1)

    def test_client_left_and_setup_failure_counted(self):
        """A closed tab counts as client_left; a sandbox that could not be built
        counts as error and as a setup failure."""
        connection, session, sandbox = self.running()
        session.closed()
        sandbox.exit(None, 15)
        _, _, broken = self.running()
        broken.exit(SETUP_FAILED)
        self.assertEqual(self.value("shellserver_consoles_ended_total", reason="client_left"), 1)
        self.assertEqual(self.value("shellserver_consoles_ended_total", reason="error"), 1)
        self.assertEqual(self.value("shellserver_sandbox_failures_total", stage="setup"), 1)

    def test_refusals_counted_by_reason(self):
        """A full node and a bad token count as refusals; the token's reason too."""
        self.running()
        connection, session = self.open()
        session.message_received(
            "a" + self.tokens.mint(user_id="u2", origin=ORIGIN, client_address=CLIENT))
        connection, session = self.open()
        session.message_received("anot-a-token")
        self.assertEqual(self.value("shellserver_consoles_refused_total", reason="full"), 1)
        self.assertEqual(self.value("shellserver_consoles_refused_total", reason="token"), 1)
        self.assertEqual(self.value("shellserver_token_failures_total", reason="malformed"), 1)

    def test_unavailable_counted(self):
        """A sandbox that cannot start counts as a refusal and a sandbox failure."""
        self.starter.refuse_with = "all consoles are in use"
        connection, session = self.open()
        session.message_received(
            "a" + self.tokens.mint(user_id="u1", origin=ORIGIN, client_address=CLIENT))
        self.assertEqual(self.value("shellserver_consoles_refused_total", reason="unavailable"),
                         1)
        self.assertEqual(self.value("shellserver_sandbox_failures_total", stage="unavailable"),
                         1)

    def test_start_from_a_pool_console_at_its_prompt(self):
        """A pooled console already at its prompt hands its output over within
        the start: it still counts as a pool start, not a cold one."""
        pool = SandboxPool(self.starter, self.clock, 1, metrics=self.metrics)
        pool.start_filling()
        self.clock.advance(0)
        self.starter.started[0].events.output(PROMPT)
        self.factory = ConsoleFactory(self.clock, self.tokens, pool, SETTINGS,
                                      self.admission, metrics=self.metrics)
        connection, session = self.open()
        session.message_received(
            "a" + self.tokens.mint(user_id="u1", origin=ORIGIN, client_address=CLIENT))
        self.assertEqual(self.value("shellserver_consoles_started_total", source="pool"), 1)
        self.assertEqual(self.value("shellserver_consoles_started_total", source="cold"), 0)

    def test_output_bytes_and_pauses_counted(self):
        """Output bytes are counted, and a flow-control pause counts under who asked."""
        connection, session, sandbox = self.running()
        session.message_received("k0")
        session.output(b"x" * 200)
        self.clock.advance(0.01)
        self.assertEqual(self.value("shellserver_output_bytes_total"), len(b"In [1]: ") + 200)
        self.assertEqual(self.value("shellserver_flow_control_pauses_total", party="client"), 1)


class PoolMetricsTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.metrics = Metrics()
        self.starter = FakeSandboxStarter()
        self.pool = SandboxPool(self.starter, self.clock, 1, metrics=self.metrics)
        self.pool.start_filling()
        self.clock.advance(0)

    def test_refills_and_size(self):
        """Each sandbox started for the pool counts as a refill; the size gauge
        reads the waiting sandboxes."""
        self.assertEqual(self.metrics.value("shellserver_pool_refills_total"), 1)
        self.assertEqual(self.metrics.value("shellserver_pool_waiting"), 1)
        self.starter.started[0].events.output(PROMPT)
        self.pool.start(_Quiet(), 80, 24)
        self.assertEqual(self.pool.last_source, "pool")
        self.assertEqual(self.metrics.value("shellserver_pool_waiting"), 0)

    def test_died_while_waiting(self):
        """A pooled sandbox that dies while waiting counts as a sandbox failure."""
        self.starter.started[0].exit(1)
        self.assertEqual(
            self.metrics.value("shellserver_sandbox_failures_total", stage="pool_died"), 1)


class LimitMetricsTests(SynchronousTestCase):
    def test_connection_refusals_counted(self):
        """Connections past the per-address cap count under per_address."""
        guard = ConnectionGuard(Factory.forProtocol(Echo), LIMITS, Clock())
        guard.metrics = metrics = Metrics()
        for _ in range(3):
            protocol = guard.buildProtocol(peer())
            protocol.makeConnection(AbortableTransport(address=peer()))
        self.assertEqual(metrics.value("shellserver_requests_rejected_total",
                                       limit="per_address"), 1)

    def test_proxied_connection_refusals_counted(self):
        """Only connections past the cap for the visitor a PROXY header names
        count under per_address (not those of other visitors)."""
        guard = ConnectionGuard(Factory.forProtocol(Echo), LIMITS, Clock())
        guard.metrics = metrics = Metrics()
        proxy = HAProxyWrappingFactory(guard)
        for visitor in (b"192.0.2.1", b"192.0.2.1", b"192.0.2.2", b"192.0.2.1"):
            protocol = proxy.buildProtocol(peer())
            protocol.makeConnection(AbortableTransport(address=peer()))
            protocol.dataReceived(b"PROXY TCP4 %s 10.0.0.1 4000 443\r\nx" % (visitor,))
        self.assertEqual(metrics.value("shellserver_requests_rejected_total",
                                       limit="per_address"), 1)

    def test_request_refusals_counted(self):
        """A request line over the limit counts under line_too_long."""
        root = Resource()
        root.putChild(b"", Hello())
        site = ShellSite(root, limits=LIMITS, reactor=Clock())
        site.metrics = metrics = Metrics()
        channel = site.buildProtocol(peer())
        channel.makeConnection(AbortableTransport(address=peer()))
        channel.dataReceived(b"GET /" + b"a" * 2000 + b" HTTP/1.1\r\n")
        self.assertEqual(metrics.value("shellserver_requests_rejected_total",
                                       limit="line_too_long"), 1)


class InputDroppedTests(SynchronousTestCase):
    def test_held_input_dropped_is_counted(self):
        """Messages held over the input budget when the session ends are counted."""
        metrics = Metrics()
        clock = Clock()
        options = SockJSOptions(input_messages_per_second=1, input_burst_messages=1)
        registry = SessionRegistry(lambda connection: _Quiet(), clock, options,
                                   metrics.input_dropped.inc)
        connection = registry.open(session_id="s1", peer_host=CLIENT, origin=None,
                                   transport_name="xhr-polling", encode=str.encode,
                                   bound=False)
        connection._receive(["a", "b", "c"], lambda delivered: None)
        connection.close()
        self.assertEqual(metrics.value("shellserver_input_dropped_total"), 2)


class _Quiet:
    def message_received(self, text):
        pass

    def output(self, data):
        pass

    def closed(self):
        pass


class LabelAndScrapeTests(SynchronousTestCase):
    def test_labels_are_bounded(self):
        """Unknown label values are counted as other, never as a new series."""
        self.assertEqual(bounded("wrong node", ("wrong_node",)), "wrong_node")
        self.assertEqual(bounded("198.51.100.9", ("full",)), "other")
        metrics = Metrics()
        metrics.console_refused("something new")
        self.assertEqual(metrics.value("shellserver_consoles_refused_total", reason="other"), 1)

    def test_registries_are_separate(self):
        """Two Metrics never share counts (no global registry)."""
        first, second = Metrics(), Metrics()
        first.output_read(5)
        self.assertEqual(second.value("shellserver_output_bytes_total"), 0)

    def test_site_serves_the_registry(self):
        """GET /metrics renders the service's registry in the text format."""
        metrics = Metrics()
        metrics.capacity.set(7)
        site = metrics_site(metrics)
        request = DummyRequest([b"metrics"])
        resource = site.getResourceFor(request)
        self.assertIsInstance(resource, MetricsPage)
        body = resource.render_GET(request)
        self.assertIn(b"shellserver_capacity 7.0", body)
        self.assertTrue(request.responseHeaders.getRawHeaders(b"content-type")[0]
                        .startswith(b"text/plain"))


class MetricsOptionTests(SynchronousTestCase):
    def test_bad_endpoint_is_refused(self):
        """--metrics with a description no endpoint parses is a usage error naming it."""
        options = Options()
        options["metrics"] = "nonsense:9100"
        with self.assertRaises(usage.UsageError) as caught:
            options._check_metrics()
        self.assertIn("--metrics 'nonsense:9100'", str(caught.exception))

    def test_metrics_off_unless_given(self):
        """Without --metrics nothing is checked and no listener is planned."""
        options = Options()
        options._check_metrics()
        self.assertIsNone(options["metrics"])
