"""Tests for shellserver.cluster: placement, membership, the cluster's
admission and its fallback to local admission, the Redis link's timeouts
and states (no real I/O: FakeClusterStore, StringTransport, Clock)."""

from __future__ import annotations

import re

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Site
from zope.interface.verify import verifyObject

from shellserver.admission import RATE_LIMITED, Admission, IAdmission, Refused
from shellserver.auth import TokenAuthority
from shellserver.cluster.admission import ClusterAdmission, choose_node
from shellserver.cluster.membership import Membership
from shellserver.cluster.node import ClusterSwitch
from shellserver.cluster.redis import RedisLink, RedisUnavailable, parse_redis_url
from shellserver.cluster.store import IClusterStore, NodeInfo
from shellserver.console import CLOSE_AUTH_FAILED, CLOSE_NOT_ADMITTED, ConsoleFactory
from shellserver.testing import FakeClusterStore, FakeConnection, FakeSandboxStarter
from shellserver.web import ConsolePage

TOKEN = re.compile(r'name="shellserver-token" content="([^"]*)"')

TTL = 5.0
CLIENT = "192.0.2.7"  # FakeConnection's peer_host
ORIGIN = "https://console.example"


def node(name: str, active: int = 0, capacity: int = 10, accepting: bool = True,
         draining: bool = False) -> NodeInfo:
    return NodeInfo(name=name, url=f"https://{name}.example", accepting=accepting,
                    active=active, capacity=capacity, draining=draining, started_at=0.0)


class PlacementTests(SynchronousTestCase):
    def test_least_loaded(self) -> None:
        """The node with the lowest active/capacity is chosen, not the fewest consoles."""
        chosen = choose_node([node("a", 2, 4), node("b", 3, 10), node("c", 1, 2)], "a")
        self.assertEqual(chosen.name, "b")

    def test_tie_prefers_this_node(self) -> None:
        """On a tie this node wins, then the first by name."""
        self.assertEqual(choose_node([node("a", 1), node("b", 1), node("c", 1)], "b").name, "b")
        self.assertEqual(choose_node([node("c", 1), node("b", 1)], "x").name, "b")

    def test_skips_refusing_nodes(self) -> None:
        """Draining, non-accepting and full nodes are never chosen."""
        nodes = [node("a", draining=True), node("b", accepting=False), node("c", 10, 10),
                 node("d", 9, 10)]
        self.assertEqual(choose_node(nodes, "a").name, "d")
        self.assertIsNone(choose_node(nodes[:3], "a"))


class Node:
    """One node's admission, membership and cluster admission over a shared store."""

    def __init__(self, store: FakeClusterStore, clock: Clock, name: str, *,
                 capacity: int = 10, per_address: int = 3, per_minute: int = 10,
                 pages: int = 0) -> None:
        self.local = Admission(clock, capacity=capacity, per_address=per_address,
                               per_address_per_minute=per_minute,
                               pages_per_address_per_minute=pages)
        self.ended: list[str] = []
        switch = ClusterSwitch(self.local, self.ended.append)

        def describe() -> NodeInfo:
            me = self.cluster.describe()
            return NodeInfo(name, f"https://{name}.example", me.accepting, me.active,
                            me.capacity, me.draining, 0.0)

        self.membership = Membership(store, clock, name, f"https://{name}.example", TTL,
                                     describe, lambda: self.cluster.active_by_address(),
                                     switch.apply)
        self.cluster = ClusterAdmission(self.local, store, self.membership, clock, TTL)

    def page(self, address: str = CLIENT):
        return self.cluster.plan_page(address)


class ClusterAdmissionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.store = FakeClusterStore(self.clock)

    def nodes(self, **limits) -> tuple[Node, Node]:
        a, b = Node(self.store, self.clock, "a", **limits), Node(self.store, self.clock, "b",
                                                                  **limits)
        for each in (a, b, a):
            self.successResultOf(each.membership.beat())
        return a, b

    def test_fakes_keep_to_the_interfaces(self) -> None:
        """FakeClusterStore is an IClusterStore; both admissions are IAdmissions."""
        a, _ = self.nodes()
        verifyObject(IClusterStore, self.store)
        verifyObject(IAdmission, a.cluster)
        verifyObject(IAdmission, a.local)

    def test_page_placed_on_least_loaded_node(self) -> None:
        """A page from a busier node names the idle node, its SockJS URL and
        every node origin."""
        a, b = self.nodes()
        self.successResultOf(a.cluster.console_slot("198.51.100.1"))
        plan = self.successResultOf(a.page())
        self.assertEqual((plan.node, plan.sockjs_url), ("b", "https://b.example/sockjs"))
        self.assertEqual(plan.connect_origins, ("https://a.example", "https://b.example"))
        self.assertIsNone(plan.refusal)

    def test_per_address_limit_across_nodes(self) -> None:
        """An address at its per_address limit on node a is refused on node b."""
        a, b = self.nodes(per_address=1)
        self.successResultOf(a.cluster.console_slot(CLIENT))
        refused = self.failureResultOf(b.cluster.console_slot(CLIENT), Refused)
        self.assertEqual(refused.value.status.reason, RATE_LIMITED)
        self.assertEqual(b.local.active, 0)

    def test_release_frees_the_address_everywhere(self) -> None:
        """A released console lets the address start one on another node."""
        a, b = self.nodes(per_address=1)
        slot = self.successResultOf(a.cluster.console_slot(CLIENT))
        slot.release()
        self.successResultOf(b.cluster.console_slot(CLIENT))

    def test_dead_node_counts_do_not_leak(self) -> None:
        """A node that stops beating stops counting against its addresses
        after node_ttl, and leaves placement."""
        a, b = self.nodes(per_address=1)
        self.successResultOf(a.cluster.console_slot(CLIENT))
        self.clock.advance(TTL + 0.1)
        self.successResultOf(b.membership.beat())  # a is dead: it beats no more
        self.assertEqual([n.name for n in b.membership.live_nodes()], ["b"])
        self.successResultOf(b.cluster.console_slot(CLIENT))

    def test_heartbeat_keeps_counts_of_live_nodes(self) -> None:
        """Counts survive as long as their node beats, beyond one node_ttl."""
        a, b = self.nodes(per_address=1)
        self.successResultOf(a.cluster.console_slot(CLIENT))
        for _ in range(3):
            self.clock.advance(TTL / 2)
            self.successResultOf(a.membership.beat())
            self.successResultOf(b.membership.beat())
        self.failureResultOf(b.cluster.console_slot(CLIENT), Refused)

    def test_starts_per_minute_across_nodes(self) -> None:
        """per_address_per_minute counts starts on every node, with Retry-After."""
        a, b = self.nodes(per_minute=2)
        self.successResultOf(a.cluster.console_slot(CLIENT)).release()
        self.successResultOf(b.cluster.console_slot(CLIENT)).release()
        refused = self.failureResultOf(a.cluster.console_slot(CLIENT), Refused)
        self.assertEqual(refused.value.status.reason, RATE_LIMITED)
        self.assertGreater(refused.value.status.retry_after, 0)

    def test_pages_per_minute_across_nodes(self) -> None:
        """The console-page rate limit counts pages from every node."""
        a, b = self.nodes(pages=2)
        self.assertIsNone(self.successResultOf(a.page()).refusal)
        self.assertIsNone(self.successResultOf(b.page()).refusal)
        plan = self.successResultOf(a.page())
        self.assertEqual(plan.refusal.reason, RATE_LIMITED)
        self.assertFalse(plan.logged)

    def test_token_spent_once_in_the_cluster(self) -> None:
        """A nonce spent through one node is refused through the other."""
        a, b = self.nodes()
        self.assertTrue(self.successResultOf(a.cluster.spend_token("n1", 1060.0)))
        self.assertFalse(self.successResultOf(b.cluster.spend_token("n1", 1060.0)))

    def test_cluster_switch_and_terminate_once(self) -> None:
        """The cluster's pause refuses consoles; terminate ends them once; the
        last known switch holds while Redis is down."""
        a, _ = self.nodes()
        self.store.switch = "terminate"
        self.successResultOf(a.membership.beat())
        self.successResultOf(a.membership.beat())
        self.assertEqual(a.ended, ["The operator has ended all consoles."])
        self.assertEqual(self.successResultOf(a.page()).refusal.reason, "switched-off")
        self.store.up = False
        self.store.switch = None
        self.successResultOf(a.membership.beat())
        self.assertEqual(self.successResultOf(a.page()).refusal.reason, "switched-off")
        self.store.up = True
        self.successResultOf(a.membership.beat())
        self.assertIsNone(self.successResultOf(a.page()).refusal)

    def test_drained_node_left_out(self) -> None:
        """A drained node is placed on by nobody and refuses consoles itself."""
        a, b = self.nodes()
        self.store.drains.add("a")
        self.successResultOf(a.membership.beat())
        self.successResultOf(b.membership.beat())
        self.assertEqual(self.successResultOf(a.page()).node, "b")
        self.assertEqual(self.successResultOf(b.page()).node, "b")
        self.failureResultOf(a.cluster.console_slot(CLIENT), Refused)

    def test_stopping_node_announces_draining(self) -> None:
        """On SIGTERM the node's next announcement, sent at once, says draining."""
        a, b = self.nodes()
        self.successResultOf(a.membership.announce_stopping())
        self.successResultOf(b.membership.beat())
        self.assertEqual([n.draining for n in b.membership.live_nodes()], [True, False])

    def test_status_for_the_cluster(self) -> None:
        """/status sums live nodes and lists them, with Redis up."""
        a, b = self.nodes(capacity=4)
        self.successResultOf(b.cluster.console_slot("198.51.100.1"))
        self.successResultOf(b.membership.beat())
        self.successResultOf(a.membership.beat())
        body = self.successResultOf(a.cluster.status_json(CLIENT))
        self.assertEqual((body["accepting"], body["active"], body["capacity"]), (True, 1, 8))
        self.assertEqual(body["cluster"]["node"], "a")
        self.assertEqual(body["cluster"]["redis"], "up")
        self.assertEqual([n["name"] for n in body["cluster"]["nodes"]], ["a", "b"])
        self.assertEqual(set(body["cluster"]["nodes"][0]),
                         {"name", "url", "accepting", "active", "capacity", "draining"})

    def test_status_and_page_for_a_limited_visitor(self) -> None:
        """A visitor at its per-address limit on node a gets "rate-limited"
        from b's /status and a refused page from b; others do not."""
        a, b = self.nodes(per_address=1)
        self.successResultOf(a.cluster.console_slot(CLIENT))
        body = self.successResultOf(b.cluster.status_json(CLIENT))
        self.assertEqual((body["accepting"], body["reason"]), (False, RATE_LIMITED))
        self.assertEqual(self.successResultOf(b.page()).refusal.reason, RATE_LIMITED)
        self.assertTrue(self.successResultOf(b.cluster.status_json("198.51.100.5"))["accepting"])

    def test_full_cluster_refuses_with_sums(self) -> None:
        """When no node accepts, /status and the page say full, summed."""
        a, b = self.nodes(capacity=1)
        self.successResultOf(a.cluster.console_slot("198.51.100.1"))
        self.successResultOf(b.cluster.console_slot("198.51.100.2"))
        for each in (b, a, b):
            self.successResultOf(each.membership.beat())
        body = self.successResultOf(a.cluster.status_json(CLIENT))
        self.assertEqual((body["accepting"], body["reason"], body["active"], body["capacity"]),
                         (False, "full", 2, 2))
        self.assertEqual(self.successResultOf(b.page()).refusal.reason, "full")


class FallbackTests(SynchronousTestCase):
    """Redis down or slow: local decisions, this node alone, and back."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.store = FakeClusterStore(self.clock)
        self.a = Node(self.store, self.clock, "a", per_address=1)
        self.b = Node(self.store, self.clock, "b", per_address=1)
        for each in (self.a, self.b, self.a):
            self.successResultOf(each.membership.beat())

    def test_down_means_local_and_alone(self) -> None:
        """While Redis is down a node places on itself, admits by its own
        counts and spends tokens locally; /status says down."""
        self.successResultOf(self.a.cluster.console_slot(CLIENT))
        self.store.up = False
        self.successResultOf(self.b.membership.beat())
        plan = self.successResultOf(self.b.page())
        self.assertEqual(plan.node, "b")
        self.assertEqual(plan.connect_origins, ("https://b.example",))
        self.successResultOf(self.b.cluster.console_slot(CLIENT))  # a's count unseen
        self.assertTrue(self.successResultOf(self.b.cluster.spend_token("n", 1060.0)))
        body = self.successResultOf(self.b.cluster.status_json(CLIENT))
        self.assertEqual(body["cluster"]["redis"], "down")
        self.assertEqual([n["name"] for n in body["cluster"]["nodes"]], ["b"])

    def test_back_up_rejoins(self) -> None:
        """When Redis answers again the next beat restores the cluster view and
        the node's own counts (so the limits hold across nodes again)."""
        self.store.up = False
        self.successResultOf(self.a.membership.beat())
        self.successResultOf(self.a.cluster.console_slot(CLIENT))
        self.store.up = True
        self.store.active.clear()  # a restarted Redis knows nothing
        self.successResultOf(self.a.membership.beat())
        self.successResultOf(self.b.membership.beat())
        self.assertEqual([n.name for n in self.b.membership.live_nodes()], ["a", "b"])
        self.failureResultOf(self.b.cluster.console_slot(CLIENT), Refused)

    def test_failed_call_decides_locally(self) -> None:
        """A call that fails (Redis went away under it) is decided locally."""
        self.store.failing = True
        self.successResultOf(self.a.cluster.console_slot(CLIENT))
        self.assertEqual(self.a.local.active, 1)
        self.assertIsNone(self.successResultOf(self.a.page("198.51.100.3")).refusal)
        self.assertTrue(self.successResultOf(self.a.cluster.spend_token("n", 1060.0)))

    def test_beat_while_one_is_waiting(self) -> None:
        """A slow Redis never piles heartbeats up: one at a time."""
        self.store.hang = True
        self.a.membership.beat()
        self.a.membership.beat()
        self.assertEqual(self.store.calls.count("heartbeat"), 4)  # 3 in setUp, 1 now
        self.store.answer_waiting()
        self.a.membership.beat()
        self.assertEqual(self.store.calls.count("heartbeat"), 5)


class _Endpoint:
    """Connects every attempt to a new StringTransport at once."""

    def __init__(self) -> None:
        self.transports: list[StringTransport] = []
        self.protocols: list = []

    def connect(self, factory):
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        transport.abortConnection = lambda: protocol.connectionLost(None)
        self.transports.append(transport)
        self.protocols.append(protocol)
        protocol.makeConnection(transport)
        return defer.succeed(protocol)


class RedisLinkTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.endpoint = _Endpoint()
        self.link = RedisLink(self.clock, self.endpoint, parse_redis_url("redis://r:1"), 0.5)
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def logged(self, words: str) -> int:
        return sum(words in (event.get("log_format") or "") for event in self.events)

    def test_call_answered(self) -> None:
        """A command goes out as RESP and its answer comes back."""
        self.link.start()
        self.assertTrue(self.link.up)
        d = self.link.execute("GET", "k")
        self.assertIn(b"GET", self.endpoint.transports[0].value())
        self.endpoint.protocols[0].dataReceived(b"$1\r\nv\r\n")
        self.assertEqual(self.successResultOf(d), "v")

    def test_slow_answer_is_down_then_reconnects(self) -> None:
        """No answer within the timeout fails the call, marks the link down with
        one warning, and a new connection brings it back up with one info."""
        self.link.start()
        d = self.link.execute("GET", "k")
        self.clock.advance(0.5)
        self.failureResultOf(d, RedisUnavailable)
        self.assertFalse(self.link.up)
        self.failureResultOf(self.link.execute("GET", "k"), RedisUnavailable)
        self.assertEqual(self.logged("Redis unreachable"), 1)
        self.clock.advance(10)
        self.assertTrue(self.link.up)
        self.assertEqual(len(self.endpoint.transports), 2)
        self.assertEqual(self.logged("Redis reachable"), 2)  # first up, and back
        self.assertEqual(self.logged("Redis unreachable"), 1)

    def test_down_calls_fail_at_once(self) -> None:
        """Before the link is up a call fails at once (never waits on Redis)."""
        self.failureResultOf(self.link.execute("GET", "k"), RedisUnavailable)


class AsyncAdmissionTests(SynchronousTestCase):
    """The console page and session wait for a cluster's answer and cope
    with the client leaving meanwhile."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.store = FakeClusterStore(self.clock)
        self.node = Node(self.store, self.clock, "a")
        self.successResultOf(self.node.membership.beat())
        self.tokens = TokenAuthority(b"k" * 32, node="a", clock=self.clock, ttl=60.0)

    def test_session_waits_and_releases_if_client_left(self) -> None:
        """A session admitted after its client left gives its slot back."""
        self.store.hang = True
        starter = FakeSandboxStarter()
        factory = ConsoleFactory(self.clock, self.tokens, starter,
                                 _settings(), self.node.cluster)
        connection = FakeConnection(origin=ORIGIN)
        attachment = factory(connection)
        session = attachment.console
        attachment.message_received("a" + self.tokens.mint(user_id="u", origin=ORIGIN,
                                                            client_address=CLIENT))
        self.assertEqual(session.state, "admitting")
        self.store.answer_waiting()  # the token is spent; admission is asked
        self.assertEqual(session.state, "admitting")
        attachment.closed()
        self.store.hang = False
        self.store.answer_waiting()
        self.assertEqual(self.node.local.active, 0)
        self.assertEqual(self.store.active["a"], {})
        self.assertEqual(starter.started, [])

    def test_session_refused_by_cluster(self) -> None:
        """A token spent elsewhere in the cluster closes with 4001; a cluster
        refusal with 4004."""
        factory = ConsoleFactory(self.clock, self.tokens, FakeSandboxStarter(), _settings(),
                                 self.node.cluster)
        token = self.tokens.mint(user_id="u", origin=ORIGIN, client_address=CLIENT)
        nonce = self.tokens.redeem(token, origin=ORIGIN, client_address=CLIENT).nonce
        fresh = TokenAuthority(b"k" * 32, node="a", clock=self.clock, ttl=60.0)
        self.store.tokens[nonce] = 2000.0
        factory = ConsoleFactory(self.clock, fresh, FakeSandboxStarter(), _settings(),
                                 self.node.cluster)
        connection = FakeConnection(origin=ORIGIN)
        factory(connection).message_received("a" + token)
        self.assertEqual(connection.close_code, CLOSE_AUTH_FAILED)
        self.assertIn("already used", connection.sent[-1])
        self.store.switch = "pause"
        self.successResultOf(self.node.membership.beat())
        connection = FakeConnection(origin=ORIGIN)
        factory(connection).message_received("a" + fresh.mint(
            user_id="v", origin=ORIGIN, client_address=CLIENT))
        self.assertEqual(connection.close_code, CLOSE_NOT_ADMITTED)

    def test_page_written_when_decided(self) -> None:
        """The console page renders NOT_DONE_YET, then the page with the
        placed node's SockJS URL and CSP; a client gone meanwhile gets nothing."""
        from test_web import PEER, TEMPLATE, get

        self.node.local.pages_per_address_per_minute = 5
        b = Node(self.store, self.clock, "b")
        self.successResultOf(b.membership.beat())
        self.successResultOf(self.node.cluster.console_slot("198.51.100.1"))
        self.successResultOf(self.node.membership.beat())
        page = ConsolePage(TEMPLATE, self.tokens, self.clock, refused_template="",
                           admission=self.node.cluster)
        self.store.hang = True
        request, body = get(Site(page), b"/")
        self.assertEqual(body, b"")
        self.assertFalse(request.finished)
        channel = request.channel
        self.store.answer_waiting()  # the page count
        self.assertFalse(request.finished)
        self.store.answer_waiting()  # the visitor's limits across the cluster
        self.assertTrue(request.finished)
        written = channel.transport.written.getvalue()
        self.assertIn(b"https://b.example/sockjs", written)
        csp = request.responseHeaders.getRawHeaders(b"content-security-policy")[0]
        self.assertIn(b"connect-src 'self' https://a.example wss://a.example https://b.example "
                      b"wss://b.example;", csp)
        self.assertIn(b"frame-src 'self' https://a.example https://b.example;", csp)
        token = TOKEN.search(written.decode()).group(1)
        claims = TokenAuthority(b"k" * 32, node="b", clock=self.clock, ttl=60.0).redeem(
            token, origin="https://console.example:8443", client_address=PEER)
        self.assertEqual(claims.node, "b")
        gone, _ = get(Site(page), b"/")
        channel = gone.channel
        gone.connectionLost(Exception("client went away"))
        self.store.answer_waiting()
        self.store.answer_waiting()
        self.assertNotIn(b"sockjs", channel.transport.written.getvalue())


def _settings():
    from shellserver.console import ConsoleSettings

    return ConsoleSettings(auth_timeout=5.0, idle_timeout=600.0, max_age=1800.0)


class _StubLink:
    """The part of RedisLink that its service drives."""

    def __init__(self) -> None:
        self.started = self.stopped = False

    def start(self) -> None:
        self.started = True

    def stop(self):
        self.stopped = True
        return defer.succeed(None)


class ClusterServiceTests(SynchronousTestCase):
    def test_stop_drains_then_leaves(self) -> None:
        """On stop (SIGTERM) the node announces draining at once, keeps
        beating while its consoles finish, then leaves and disconnects."""
        from shellserver.cluster.membership import ClusterService

        clock = Clock()
        store = FakeClusterStore(clock)
        a, b = Node(store, clock, "a"), Node(store, clock, "b")
        consoles = {"running": True}
        link = _StubLink()
        service = ClusterService(link, a.membership, interval=1.0, clock=clock,
                                 idle=lambda: not consoles["running"], most_wait=30.0)
        service.startService()
        self.assertTrue(link.started)
        self.successResultOf(b.membership.beat())
        stopped = service.stopService()
        self.successResultOf(b.membership.beat())
        self.assertEqual([(n.name, n.draining) for n in b.membership.live_nodes()],
                         [("a", True), ("b", False)])
        beats = store.calls.count("heartbeat")
        clock.advance(3.0)
        self.assertGreater(store.calls.count("heartbeat"), beats)  # still announced
        self.assertNoResult(stopped)
        consoles["running"] = False
        clock.advance(1.0)
        self.successResultOf(stopped)
        self.assertIn("leave", store.calls)
        self.assertTrue(link.stopped)
        self.assertNotIn("a", store.nodes)

    def test_stop_waits_at_most_its_bound(self) -> None:
        """A node whose consoles never finish still leaves after most_wait."""
        from shellserver.cluster.membership import ClusterService

        clock = Clock()
        store = FakeClusterStore(clock)
        a = Node(store, clock, "a")
        service = ClusterService(_StubLink(), a.membership, interval=1.0, clock=clock,
                                 idle=lambda: False, most_wait=10.0)
        service.startService()
        stopped = service.stopService()
        clock.advance(9.0)
        self.assertNoResult(stopped)
        clock.advance(1.5)
        self.successResultOf(stopped)


class RefusedCallTests(SynchronousTestCase):
    def test_refused_call_is_unavailable(self) -> None:
        """A call Redis answers with an error (out of memory, say) fails as
        RedisUnavailable, so callers decide locally, and is logged as an error."""
        clock = Clock()
        endpoint = _Endpoint()
        link = RedisLink(clock, endpoint, parse_redis_url("redis://r:1"), 0.5)
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        link.start()
        d = link.execute("SET", "k", "v")
        endpoint.protocols[0].dataReceived(b"-OOM command not allowed\r\n")
        self.failureResultOf(d, RedisUnavailable)
        self.assertTrue(any("refused a call" in (e.get("log_format") or "") for e in events))
        self.assertTrue(link.up)

    def test_beat_survives_an_unexpected_failure(self) -> None:
        """A heartbeat that fails in an unexpected way leaves the node alone
        and never fails itself (the timer would stop)."""
        clock = Clock()
        store = FakeClusterStore(clock)
        a = Node(store, clock, "a")
        self.successResultOf(a.membership.beat())
        store.error = ValueError("an answer nobody expected")
        self.successResultOf(a.membership.beat())
        self.assertEqual([n.name for n in a.membership.live_nodes()], ["a"])
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
