"""The admin page over a cluster: every live node with its charts of the
last hour, and controls that act on the whole cluster through Redis.

Each node's sampler publishes its samples to a capped list in Redis
(``<prefix>samples:<node>``); the page keeps the samples it has read of each
live node and, on each overview, reads only the newest ones it lacks.
Pause and resume are the cluster kill switch, drain and undrain the
operator's drain key (as ``shellserver-ctl`` sets them).
Consoles are ended on this node only: another node's are ended from its own
page. While Redis is down the page shows this node alone and says so.
"""

from __future__ import annotations

import math
from collections import deque

from attrs import define, evolve, field
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from shellserver.admin import (
    SAMPLE_INTERVAL,
    SAMPLES_KEPT,
    ControlUnavailable,
    IAdminControls,
    IAdminNodes,
    LocalNode,
    NodeView,
    Sample,
    SampleRing,
    sample_columns,
    sample_from_json,
    sample_to_json,
)
from shellserver.cluster.membership import Membership
from shellserver.cluster.store import IClusterStore, NodeInfo, RedisUnavailable, View

log = Logger()

REDIS_DOWN = "Redis is down: this page shows this node only, and cannot pause or drain."
SLOW_SAMPLES = "Redis did not answer in time: some nodes are shown without their charts."
# The most nodes whose samples one overview reads, each node's list in a
# call of its own (an hour of one node's samples is about 280 kB, within
# redis_timeout): a bigger cluster shows the rest without charts.
MOST_NODES_CHARTED = 16
# Samples read beyond those published since the last read: the newest one
# already held (the overlap that shows nothing was missed), one published
# between that read and its sample, and one for a late or early timer.
READ_MARGIN = 3
# A stopped node's list outlives its last sample by the hour and a few samples.
SAMPLES_TTL = SAMPLES_KEPT * SAMPLE_INTERVAL + 3 * SAMPLE_INTERVAL


def node_state(node: NodeInfo, switch: str | None) -> str:
    """How the page names a node's state (pure)."""
    if node.draining:
        return "draining"
    if switch is not None or not node.accepting:
        return "paused"
    return "accepting"


@define
class _Held:
    """The samples of one other node the page has read (oldest first, at
    most ``keep``), and when it last read them (this node's clock: the
    other node's may be skewed)."""

    samples: deque[Sample]
    read_at: float


def _parsed(texts: list[str]) -> list[Sample]:
    return [sample for sample in map(sample_from_json, texts) if sample is not None]


def _unavailable(failure, what: str):
    failure.trap(RedisUnavailable)
    raise ControlUnavailable(f"Redis is down: cannot {what} now ({failure.value})")


@implementer(IAdminNodes, IAdminControls)
@define
class ClusterNodes:
    """Every live node of the cluster for the admin page; this node's own
    part (its consoles, its samples) comes from its L{LocalNode}."""

    _local: LocalNode
    _store: IClusterStore
    _membership: Membership
    _ring: SampleRing
    _clock: IReactorTime
    keep: int = SAMPLES_KEPT
    notice: str | None = field(default=None, init=False)
    # Each charted node's samples read so far, so that a poll reads only the
    # new ones: a whole hour per node per poll is a Redis call long enough to
    # time out, and a timed-out call takes the whole link down (admission
    # goes local) -- an operator's page must not do that to the cluster.
    _held: dict[str, _Held] = field(factory=dict, init=False)
    _charted: set[str] = field(factory=set, init=False)  # at the last overview
    # The read under way per node, which a concurrent poll shares.
    _reading: dict[str, list[defer.Deferred]] = field(factory=dict, init=False)
    _publishing: defer.Deferred | None = field(default=None, init=False)
    _published: float | None = field(default=None, init=False)  # its sample's time

    # -- this node's samples, for the others' pages ----------------------------

    def take_and_publish(self) -> None:
        """The sampler's turn: take a sample, then L{publish} it."""
        self._ring.take()
        self.publish()

    def publish(self) -> None:
        """Send the ring's newest sample to Redis (after each take): one
        bounded call, skipped while Redis is down or the last one waits."""
        sample = self._ring.latest()
        if (sample is None or sample.time == self._published or not self._store.up
                or self._publishing is not None):
            return
        self._published = sample.time
        d = self._store.publish_sample(self._membership.name, sample_to_json(sample),
                                       self.keep, SAMPLES_TTL)
        self._publishing = d

        def failed(failure) -> None:
            if not failure.check(RedisUnavailable):
                log.failure("admin page: cannot publish this node's sample", failure)

        def done(_) -> None:
            self._publishing = None

        d.addErrback(failed).addBoth(done)

    # -- IAdminNodes -----------------------------------------------------------

    def nodes(self) -> defer.Deferred:
        mine = self._local.nodes()[0]
        mine = evolve(mine, url=self._membership.url)
        if not self._store.up:
            self.notice = REDIS_DOWN
            return defer.succeed([mine])
        d = self._store.read_view(self._membership.name)

        def with_samples(view: View) -> defer.Deferred:
            others = [node for node in view.nodes if node.name != self._membership.name]
            charted = [node.name for node in others][:MOST_NODES_CHARTED]
            self._charted = set(charted)
            for gone in set(self._held) - self._charted:
                del self._held[gone]
            reads = defer.DeferredList([self._samples_of(name) for name in charted],
                                       consumeErrors=True)
            return reads.addCallback(lambda results: self._views(mine, view, others, results))

        def alone(failure) -> list[NodeView]:
            failure.trap(RedisUnavailable)
            self.notice = REDIS_DOWN
            return [mine]

        return d.addCallback(with_samples).addErrback(alone)

    def _samples_of(self, name: str) -> defer.Deferred:
        """Node ``name``'s samples, oldest first: {name: [Sample]}. Polls
        at the same time share one read."""
        waiters = self._reading.get(name)
        if waiters is not None:
            shared: defer.Deferred = defer.Deferred()
            waiters.append(shared)
            return shared
        waiters = self._reading[name] = []

        def done(result):
            del self._reading[name]
            for waiter in waiters:
                waiter.callback(result)
            return result

        return self._refresh(name).addBoth(done)

    def _refresh(self, name: str) -> defer.Deferred:
        """Read what node ``name`` published since the last read (all of it
        the first time), at most one whole read per poll."""
        held = self._held.get(name)
        now = self._clock.seconds()
        if held is None:
            return self._read_all(name, now)
        since = max(0.0, now - held.read_at)
        count = min(self.keep, math.ceil(since / SAMPLE_INTERVAL) + READ_MARGIN)

        def merge(lists: dict) -> dict | defer.Deferred:
            texts = lists.get(name, [])
            newest_first = _parsed(texts)
            newest = held.samples[-1].time if held.samples else None
            overlap = next((index for index, sample in enumerate(newest_first)
                            if sample.time == newest), None)
            if overlap is not None:
                held.samples.extend(reversed(newest_first[:overlap]))
                held.read_at = now
                return self._keep(name, held)
            if len(texts) < count or count >= self.keep:
                # The whole list (a node restarted with a new list, or it is short).
                return self._keep(name, _Held(deque(reversed(newest_first), maxlen=self.keep),
                                              now))
            # More samples than the time allows for (a gap): read them all once.
            log.info("admin page: {node}'s new samples do not meet those held; reading all",
                     node=name)
            return self._read_all(name, now)

        return self._store.read_samples([name], count).addCallback(merge)

    def _read_all(self, name: str, now: float) -> defer.Deferred:
        def whole(lists: dict) -> dict:
            samples = deque(reversed(_parsed(lists.get(name, []))), maxlen=self.keep)
            return self._keep(name, _Held(samples, now))

        return self._store.read_samples([name], self.keep).addCallback(whole)

    def _keep(self, name: str, held: _Held) -> dict[str, list[Sample]]:
        # A node that left while its read was under way is not held again.
        if name in self._charted:
            self._held[name] = held
        return {name: list(held.samples)}

    def _views(self, mine: NodeView, view: View, others: list[NodeInfo],
               results: list) -> list[NodeView]:
        samples: dict[str, list[Sample]] = {}
        self.notice = None
        for succeeded, result in results:
            if succeeded:
                samples.update(result)
            elif result.check(RedisUnavailable):
                self.notice = SLOW_SAMPLES
            else:
                log.failure("admin page: cannot read a node's samples", result)
        announced = {node.name: node for node in view.nodes}
        me = announced.get(self._membership.name)
        shown = [evolve(mine, state=node_state(evolve(me, active=mine.active), view.switch)
                        if me is not None and mine.state == "accepting" else mine.state)]
        for node in others:
            shown.append(NodeView(
                name=node.name, url=node.url, state=node_state(node, view.switch),
                active=node.active, capacity=node.capacity,
                samples=sample_columns(samples.get(node.name, [])),
                consoles=(), local=False))
        return sorted(shown, key=lambda node: node.name)

    # -- IAdminControls ----------------------------------------------------------

    def set_paused(self, paused: bool) -> defer.Deferred:
        if not self._store.up:
            return defer.fail(ControlUnavailable(REDIS_DOWN))
        what = "pause the cluster" if paused else "resume the cluster"
        d = self._store.set_switch("pause" if paused else None)

        def done(_) -> None:
            log.warn("admin page: cluster {state}", state="paused" if paused else "resumed")
            # This node applies it at once; the others at their next heartbeat.
            self._membership.beat()

        return d.addErrback(_unavailable, what).addCallback(done)

    def set_draining(self, node: str, draining: bool) -> defer.Deferred:
        if not self._store.up:
            return defer.fail(ControlUnavailable(REDIS_DOWN))
        what = f"drain {node}" if draining else f"undrain {node}"

        def live(view: View) -> defer.Deferred | bool:
            if node not in {known.name for known in view.nodes}:
                return False
            d = self._store.set_drain(node, draining)

            def done(_) -> bool:
                log.warn("admin page: node {node} {state}", node=node,
                         state="draining" if draining else "admitting again")
                if node == self._membership.name:
                    self._membership.beat()
                return True

            return d.addCallback(done)

        d = self._store.read_view(self._membership.name)
        return d.addCallback(live).addErrback(_unavailable, what)

    def end_console(self, node: str, console: str) -> bool:
        # Another node's consoles are its own: its page ends them.
        return self._local.end_console(node, console)
