"""The admin page over a cluster (shellserver.cluster.admin): every live
node with its published samples, cluster-wide pause and drain, this node
alone while Redis is down (FakeClusterStore, Clock; no real I/O)."""

from __future__ import annotations

import json
from io import BytesIO

from attrs import evolve
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest
from zope.interface.verify import verifyObject

from shellserver.admin import (
    AdminAPI,
    AdminAuth,
    ControlUnavailable,
    IAdminControls,
    IAdminNodes,
    LocalNode,
    Readings,
    SampleRing,
    sample_between,
    sample_columns,
    sample_from_json,
    sample_to_json,
)
from shellserver.admission import Admission, KillSwitch
from shellserver.auth import TokenAuthority
from shellserver.cluster.admin import REDIS_DOWN, SAMPLES_TTL, SLOW_SAMPLES, ClusterNodes
from shellserver.cluster.admission import ClusterAdmission
from shellserver.cluster.membership import Membership
from shellserver.cluster.node import ClusterSwitch
from shellserver.cluster.store import IClusterStore, NodeInfo, RedisUnavailable
from shellserver.console import ConsoleFactory, ConsoleSettings
from shellserver.testing import FakeClusterStore, FakeSandboxStarter

TTL = 10.0
TOKEN = "the-admin-token"


def readings(time: float, started: float = 0.0) -> Readings:
    return Readings(time=time, active=1, capacity=4, started=started, start_seconds=0.0,
                    refused={"full": 0.0}, memory_used=2**30, memory_total=4 * 2**30,
                    cpu_busy=100, cpu_total=1000, cpu_cores=2)


class ClusterMember:
    """One node: its admission, membership, console factory and admin provider."""

    def __init__(self, store: FakeClusterStore, clock: Clock, name: str, *,
                 keep: int = 720) -> None:
        self.admission = Admission(clock, capacity=4, per_address=4,
                                   per_address_per_minute=100)
        switch = ClusterSwitch(self.admission, lambda message: None)

        def describe() -> NodeInfo:
            me = self.cluster.describe()
            return NodeInfo(name, f"https://{name}.example", me.accepting, me.active,
                            me.capacity, me.draining, 0.0)

        self.membership = Membership(store, clock, name, f"https://{name}.example", TTL,
                                     describe, lambda: self.cluster.active_by_address(),
                                     switch.apply)
        self.cluster = ClusterAdmission(self.admission, store, self.membership, clock, TTL)
        tokens = TokenAuthority(b"k" * 32, node=name, clock=clock, ttl=60.0)
        consoles = ConsoleFactory(
            clock, tokens, FakeSandboxStarter(),
            ConsoleSettings(auth_timeout=5.0, idle_timeout=600.0, max_age=1800.0, node=name),
            self.cluster)
        kill_switch = KillSwitch(clock, self.admission, f"/{name}/kill-switch",
                                 lambda message: None, read=lambda path: None)
        self.ring = SampleRing(lambda: readings(clock.seconds()))
        local = LocalNode(name, clock, self.admission, kill_switch, consoles, self.ring)
        self.admin = ClusterNodes(local, store, self.membership, self.ring, clock,
                                  keep=keep)


class ClusterNodesTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1000)
        self.store = FakeClusterStore(self.clock)
        self.a = ClusterMember(self.store, self.clock, "a")
        self.b = ClusterMember(self.store, self.clock, "b")
        self.beat()

    def beat(self):
        self.a.membership.beat()
        self.b.membership.beat()

    def shown(self, member: ClusterMember):
        return {view.name: view for view in self.successResultOf(member.admin.nodes())}

    def test_provides_both_interfaces(self):
        """ClusterNodes is the nodes to show and the controls; the fake store
        with its sample lists is still an IClusterStore."""
        self.assertTrue(verifyObject(IAdminNodes, self.a.admin))
        self.assertTrue(verifyObject(IAdminControls, self.a.admin))
        self.assertTrue(verifyObject(IClusterStore, self.store))

    def test_every_live_node_with_its_published_samples(self):
        """A's page lists A and B with URL, counts and the samples B published;
        only A's own consoles are listed as endable (local)."""
        for _ in range(3):
            self.clock.advance(5)
            self.beat()
            self.b.admin.take_and_publish()
        shown = self.shown(self.a)
        self.assertEqual(sorted(shown), ["a", "b"])
        b = shown["b"]
        self.assertEqual((b.url, b.state, b.active, b.capacity, b.local),
                         ("https://b.example", "accepting", 0, 4, False))
        self.assertEqual(b.samples["time"], [1005.0, 1010.0, 1015.0])
        self.assertEqual(b.samples["capacity"], [4, 4, 4])
        self.assertEqual((shown["a"].url, shown["a"].local), ("https://a.example", True))
        self.assertIsNone(self.a.admin.notice)

    def test_published_list_is_capped_and_expires(self):
        """A node's list keeps the newest ``keep`` samples and expires after
        the hour (and a few samples) without new ones."""
        c = ClusterMember(self.store, self.clock, "c", keep=2)
        c.membership.beat()
        for _ in range(4):
            self.clock.advance(5)
            c.admin.take_and_publish()
        self.assertEqual([json.loads(text)["time"] for text in self.store.samples["c"][0]],
                         [1020.0, 1015.0])
        self.clock.advance(SAMPLES_TTL + 1)
        self.assertEqual(self.successResultOf(self.store.read_samples(["c"], 2)), {"c": []})

    def test_a_sample_is_published_once(self):
        """A take that found no new sample, or a publish still waiting,
        sends nothing more."""
        self.clock.advance(5)
        self.a.admin.take_and_publish()
        self.a.admin.publish()
        self.store.hang = True
        self.clock.advance(5)
        self.a.admin.take_and_publish()
        self.clock.advance(5)
        self.a.admin.take_and_publish()
        self.assertEqual(self.store.calls.count("publish_sample"), 2)
        self.store.answer_waiting()
        self.assertEqual(len(self.store.samples["a"][0]), 2)

    def test_pause_is_the_cluster_switch(self):
        """Pause sets the cluster kill switch: this node at once, the others
        at their next heartbeat; resume clears it."""
        self.successResultOf(self.a.admin.set_paused(True))
        self.assertEqual(self.store.switch, "pause")
        self.assertTrue(self.a.admission.cluster_paused)
        self.b.membership.beat()
        self.assertTrue(self.b.admission.cluster_paused)
        self.assertEqual({view.state for view in self.shown(self.a).values()}, {"paused"})
        self.successResultOf(self.a.admin.set_paused(False))
        self.assertIsNone(self.store.switch)
        self.assertFalse(self.a.admission.cluster_paused)

    def test_drain_any_live_node(self):
        """Drain and undrain set another node's drain key; an unknown node is
        refused (False) and nothing is set."""
        self.assertTrue(self.successResultOf(self.a.admin.set_draining("b", True)))
        self.assertEqual(self.store.drains, {"b"})
        self.assertEqual(self.shown(self.a)["b"].state, "draining")
        self.b.membership.beat()
        self.assertTrue(self.b.admission.cluster_drained)
        self.assertFalse(self.successResultOf(self.a.admin.set_draining("nobody", True)))
        self.assertEqual(self.store.drains, {"b"})
        self.assertTrue(self.successResultOf(self.a.admin.set_draining("b", False)))
        self.assertEqual(self.store.drains, set())

    def test_end_console_on_another_node_is_refused(self):
        """Only this node's consoles can be ended from its page."""
        self.assertFalse(self.a.admin.end_console("b", "s1"))

    def test_redis_down_shows_this_node_only(self):
        """With Redis down the page shows this node alone and says so; pause
        and drain fail with a clear message; nothing is published."""
        self.store.up = False
        shown = self.successResultOf(self.a.admin.nodes())
        self.assertEqual([view.name for view in shown], ["a"])
        self.assertEqual(self.a.admin.notice, REDIS_DOWN)
        failure = self.failureResultOf(self.a.admin.set_paused(True), ControlUnavailable)
        self.assertIn("Redis is down", str(failure.value))
        self.failureResultOf(self.a.admin.set_draining("b", True), ControlUnavailable)
        self.clock.advance(5)
        self.a.admin.take_and_publish()
        self.assertNotIn("publish_sample", self.store.calls)

    def test_samples_read_per_node_and_slow_reads_said(self):
        """Each other node's list is read in a call of its own; a read Redis
        does not answer leaves the nodes shown without charts, and says so."""
        c = ClusterMember(self.store, self.clock, "c")
        c.membership.beat()
        self.store.calls.clear()
        self.assertEqual(sorted(self.shown(self.a)), ["a", "b", "c"])
        self.assertEqual(self.store.calls.count("read_samples"), 2)
        self.store.hang = True
        answer = self.a.admin.nodes()
        self.store.hang = False
        self.store.error = RedisUnavailable("no answer within 0.5s")
        self.store.answer_waiting()
        shown = {view.name: view for view in self.successResultOf(answer)}
        self.assertEqual(sorted(shown), ["a", "b", "c"])
        self.assertEqual(shown["b"].samples["time"], [])
        self.assertEqual(self.a.admin.notice, SLOW_SAMPLES)

    def test_redis_failing_mid_call(self):
        """Redis that fails a call (timeout) gives this node alone, and a 503
        message for controls."""
        self.store.failing = True
        self.assertEqual([view.name for view in self.successResultOf(self.a.admin.nodes())],
                         ["a"])
        self.assertEqual(self.a.admin.notice, REDIS_DOWN)
        failure = self.failureResultOf(self.a.admin.set_paused(False), ControlUnavailable)
        self.assertIn("cannot resume the cluster", str(failure.value))


class HeldSamplesTests(SynchronousTestCase):
    """A's page keeps what it read of B's samples and reads only the new ones."""

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1000)
        self.store = FakeClusterStore(self.clock)
        self.a = ClusterMember(self.store, self.clock, "a")
        self.b = ClusterMember(self.store, self.clock, "b")

    def publish(self, count: int) -> None:
        """B (and A) run for ``count`` sample intervals, B publishing each."""
        for _ in range(count):
            self.clock.advance(5)
            self.a.membership.beat()
            self.b.membership.beat()
            self.b.admin.take_and_publish()

    def b_on_a(self) -> dict:
        shown = {view.name: view for view in self.successResultOf(self.a.admin.nodes())}
        return shown["b"].samples

    def full_read(self) -> dict:
        texts = self.store.samples["b"][0][:720]
        return sample_columns([sample_from_json(text) for text in reversed(texts)])

    def reads(self) -> list[int]:
        """How many samples each read of B's list asked for, then forget them."""
        asked = [count for names, count in self.store.sample_reads if names == ["b"]]
        self.store.sample_reads.clear()
        return asked

    def test_first_poll_reads_the_hour_then_only_new_samples(self):
        """The first poll reads B's whole hour; the next ones only about the
        samples published since, and the charts equal a whole read."""
        self.publish(730)
        self.assertEqual(len(self.b_on_a()["time"]), 720)
        self.assertEqual(self.reads(), [720])
        self.publish(3)
        charts = self.b_on_a()
        self.assertEqual(self.reads(), [3 + 3])
        self.assertEqual(charts, self.full_read())
        self.assertEqual(len(charts["time"]), 720)
        self.clock.advance(2)
        self.assertEqual(self.b_on_a(), self.full_read())
        self.assertEqual(self.reads(), [1 + 3])

    def test_a_node_that_left_is_forgotten(self):
        """Once B is no longer live, A holds none of its samples: when B
        comes back, A reads its whole list again."""
        self.publish(5)
        self.b_on_a()
        self.store.leave("b")
        shown = [view.name for view in self.successResultOf(self.a.admin.nodes())]
        self.assertEqual(shown, ["a"])
        self.assertEqual(self.a.admin._held, {})
        self.publish(1)
        self.reads()
        self.assertEqual(self.b_on_a(), self.full_read())
        self.assertEqual(self.reads(), [720])

    def test_a_gap_reads_all_once(self):
        """More new samples than the time since the last read allows for
        (the newest held one is not among those read) make one whole read."""
        self.publish(20)
        self.b_on_a()
        self.reads()
        kept, expires = self.store.samples["b"]
        burst = [sample_to_json(sample_between(None, readings(self.clock.seconds() + n / 10)))
                 for n in range(1, 11)]
        self.store.samples["b"] = ([*reversed(burst), *kept], expires)
        self.clock.advance(5)
        charts = self.b_on_a()
        self.assertEqual(self.reads(), [1 + 3, 720])
        self.assertEqual(charts, self.full_read())
        self.assertEqual(len(charts["time"]), 30)

    def test_a_new_short_list_replaces_the_held_samples(self):
        """A list that holds nothing A has seen, and is shorter than the
        read, is B's whole list (B's old list expired): no second read."""
        self.publish(10)
        self.b_on_a()
        self.reads()
        fresh = sample_to_json(sample_between(None, readings(self.clock.seconds() + 5)))
        self.store.samples["b"] = ([fresh], self.store.samples["b"][1])
        self.clock.advance(5)
        self.assertEqual(self.b_on_a()["time"], [self.clock.seconds()])
        self.assertEqual(self.reads(), [1 + 3])

    def test_polls_at_once_share_one_read(self):
        """Two pages polling while B's read is under way cause one read."""
        self.publish(5)
        self.store.hang = True
        first, second = self.a.admin.nodes(), self.a.admin.nodes()
        self.store.answer_waiting()  # the views
        self.store.answer_waiting()  # B's samples
        self.assertEqual(self.reads(), [720])
        self.assertEqual(self.successResultOf(first), self.successResultOf(second))


class SampleJSONTests(SynchronousTestCase):
    def test_round_trip(self):
        """A published sample reads back equal, its floats to four decimals."""
        sample = sample_between(readings(1.0), readings(6.0, started=2))
        self.assertEqual(sample.starts_per_minute, 24.0)
        self.assertEqual(sample_from_json(sample_to_json(sample)), sample)
        thirds = sample_between(readings(1.0), readings(4.0, started=1))
        self.assertEqual(sample_from_json(sample_to_json(thirds)).starts_per_minute, 20.0)
        sevenths = evolve(thirds, start_latency=1 / 7)
        self.assertEqual(sample_from_json(sample_to_json(sevenths)).start_latency, 0.1429)

    def test_garbage_is_skipped(self):
        """Text that is not a sample is None, never an error."""
        for text in ("", "[]", "{}", '{"time": "x"}', "nope",
                     sample_to_json(sample_between(None, readings(1.0))).replace(
                         '"cpu_cores":2', '"cpu_cores":[]')):
            self.assertIsNone(sample_from_json(text), text)


class PlainRequest(DummyRequest):
    def isSecure(self):
        return False


class ClusterAPITests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.store = FakeClusterStore(self.clock)
        self.a = ClusterMember(self.store, self.clock, "a")
        self.a.membership.beat()
        self.api = AdminAPI(AdminAuth(TOKEN, self.clock), self.a.admin, self.a.admin)

    def request(self, method, path, body=None):
        request = PlainRequest([path.encode()])
        request.method = method
        request.requestHeaders.setRawHeaders(b"host", [b"127.0.0.1:9200"])
        request.requestHeaders.setRawHeaders(b"authorization", [b"Bearer " + TOKEN.encode()])
        request.requestHeaders.setRawHeaders(b"content-type", [b"application/json"])
        request.content = BytesIO(json.dumps(body or {}).encode())
        return request, self.api.render(request)

    def test_overview_answers_when_redis_does(self):
        """The overview waits for Redis's answer, then sends the nodes and no notice."""
        self.store.hang = True
        request, result = self.request(b"GET", "overview")
        self.assertEqual(result, NOT_DONE_YET)
        self.assertFalse(request.finished)
        self.store.answer_waiting()
        self.store.answer_waiting()
        body = json.loads(b"".join(request.written))
        self.assertEqual(([n["name"] for n in body["nodes"]], body["notice"]), (["a"], None))
        self.assertTrue(request.finished)

    def test_pause_with_redis_down_is_a_clear_503(self):
        """Pausing while Redis is down answers 503 saying so."""
        self.store.up = False
        request, result = self.request(b"POST", "pause")
        self.assertEqual(result, NOT_DONE_YET)
        self.assertEqual(request.responseCode, 503)
        self.assertIn("Redis is down", json.loads(b"".join(request.written))["error"])
        request, _ = self.request(b"GET", "overview")
        self.assertEqual(json.loads(b"".join(request.written))["notice"], REDIS_DOWN)

    def test_drain_unknown_node_is_404(self):
        """Draining a node that is not live answers 404."""
        request, _ = self.request(b"POST", "drain", {"node": "nobody"})
        self.assertEqual(request.responseCode, 404)
        request, _ = self.request(b"POST", "drain", {"node": "a"})
        self.assertEqual(request.responseCode, 200)
        self.assertEqual(self.store.drains, {"a"})
