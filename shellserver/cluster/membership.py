"""Membership: this node announces itself every ``heartbeat_interval`` with
an expiry of ``node_ttl``, and learns the live nodes, the cluster kill switch
and its own drain from the same round trip.

While Redis is down the view is this node alone, and the last known switch
stays in force.
"""

from __future__ import annotations

from collections.abc import Callable

from attrs import define, field
from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from shellserver.cluster.store import IClusterStore, NodeInfo, RedisUnavailable, View

log = Logger()


@define(eq=False)
class Membership:
    """This node's view of the cluster, refreshed by L{beat}."""

    _store: IClusterStore
    _clock: IReactorTime
    name: str
    url: str
    ttl: float
    # This node as it is now (its admission's counts): a NodeInfo without
    # the draining flag's operator half, which this class adds.
    _describe: Callable[[], NodeInfo]
    # Consoles per client address on this node (and those being admitted).
    _active_by_address: Callable[[], dict[str, int]]
    # Called with this membership after each beat that Redis answered: its
    # switch ("pause", "terminate", None) and drain are new then.
    _on_view: Callable[[Membership], None] = lambda membership: None
    nodes: tuple[NodeInfo, ...] = ()
    switch: str | None = None
    drained: bool = False  # by the operator (the drain key)
    stopping: bool = False  # SIGTERM: announced as draining at once
    _beating: defer.Deferred | None = None
    _joined: bool = field(default=False)

    @property
    def redis_up(self) -> bool:
        return self._store.up

    def me(self) -> NodeInfo:
        node = self._describe()
        draining = node.draining or self.drained or self.stopping
        return NodeInfo(name=self.name, url=self.url,
                        accepting=node.accepting and not draining, active=node.active,
                        capacity=node.capacity, draining=draining,
                        started_at=node.started_at)

    def live_nodes(self) -> tuple[NodeInfo, ...]:
        """The nodes placement may choose from: the last view while Redis
        is up (with this node as it is now), this node alone while it is down."""
        me = self.me()
        if not self._store.up or not self._joined:
            return (me,)
        others = [node for node in self.nodes if node.name != self.name]
        return tuple(sorted((*others, me), key=lambda node: node.name))

    def beat(self) -> defer.Deferred:
        """Announce this node and read the cluster back (one round trip).
        Never fails: a beat Redis cannot answer leaves this node alone."""
        if self._beating is not None:
            # The previous beat is still waiting (bounded by redis_timeout).
            return defer.succeed(None)
        if not self._store.up:
            self._forget()
            return defer.succeed(None)
        d = defer.maybeDeferred(
            lambda: self._store.heartbeat(self.me(), self.ttl, self._active_by_address()))
        self._beating = d

        def learnt(view: View) -> None:
            self._joined = True
            self.nodes = view.nodes
            self.drained = view.drained
            if view.switch != self.switch:
                log.warn("cluster kill switch: {state}", state=view.switch or "on")
            self.switch = view.switch
            self._on_view(self)

        def failed(failure) -> None:
            # Never fails: a failed beat would stop the heartbeat's timer.
            if not failure.check(RedisUnavailable):
                log.failure("cluster heartbeat failed", failure)
            self._forget()

        def done(result):
            self._beating = None
            return result

        return d.addCallbacks(learnt, failed).addBoth(done)

    def _forget(self) -> None:
        # The switch is kept: the last known decision of the operator holds.
        self._joined = False
        self.nodes = ()

    def announce_stopping(self) -> defer.Deferred:
        """SIGTERM: draining from now on, said at once so placement skips us."""
        self.stopping = True
        return self.beat()

    def leave(self) -> defer.Deferred:
        """A clean stop: this node's keys go at once."""
        if not self._store.up:
            return defer.succeed(None)
        return self._store.leave(self.name).addErrback(lambda f: f.trap(RedisUnavailable))


class MembershipService(TimerService):
    """Beats on the clock while the server runs."""

    name = "cluster-membership"

    def __init__(self, membership: Membership, interval: float, clock: IReactorTime) -> None:
        super().__init__(interval, membership.beat)
        self.clock = clock
        self.membership = membership


class ClusterService(MultiService):
    """The Redis link and the heartbeat; on stop (SIGTERM), this node says
    it is draining at once, goes on beating while its consoles finish, then
    leaves the cluster and disconnects."""

    name = "cluster"

    def __init__(self, link, membership: Membership, *, interval: float,
                 clock: IReactorTime, idle: Callable[[], bool], most_wait: float,
                 store: IClusterStore | None = None) -> None:
        super().__init__()
        from shellserver.cluster.redis import RedisLinkService

        self._clock = clock
        # Also what the admin page reads and writes (shellserver.cluster.admin).
        self.membership = membership
        self.store = store
        self._idle = idle
        self._most_wait = most_wait
        self._interval = interval
        RedisLinkService(link).setServiceParent(self)
        MembershipService(membership, interval, clock).setServiceParent(self)

    def stopService(self):
        from twisted.internet.task import deferLater

        self.membership.announce_stopping()
        deadline = self._clock.seconds() + self._most_wait

        def wait_for_idle(_=None):
            if self._idle() or self._clock.seconds() >= deadline:
                return self.membership.leave()
            return deferLater(self._clock, min(0.2, self._interval), wait_for_idle)

        d = wait_for_idle()
        d.addBoth(lambda _: MultiService.stopService(self))
        return d
