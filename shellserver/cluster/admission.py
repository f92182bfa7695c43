"""The cluster's provider of IAdmission: this node's own L{Admission} for
its capacity and switches, Redis for what holds across the nodes (the
per-address limits, the page rate, single-use tokens), and placement.

While Redis is down every decision is the local one (docs/cluster.md says
what is weaker then); a call Redis does not answer in time counts the same.
"""

from __future__ import annotations

from collections.abc import Callable

from attrs import define, field
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from shellserver.admission import (
    FULL,
    FULL_RETRY_AFTER,
    RATE_LIMITED,
    WINDOW,
    Admission,
    AdmissionStatus,
    IAdmission,
    PagePlan,
    Refused,
    Slot,
)
from shellserver.cluster.membership import Membership
from shellserver.cluster.store import IClusterStore, NodeInfo, RedisUnavailable

log = Logger()


def choose_node(nodes, me: str) -> NodeInfo | None:
    """The least loaded accepting node (active/capacity), this one on a tie,
    then the first by name; None when no node accepts (pure)."""
    candidates = [node for node in nodes
                  if node.accepting and not node.draining and node.active < node.capacity]
    if not candidates:
        return None
    return min(candidates, key=lambda node: (node.load, node.name != me, node.name))


def node_origin(url: str) -> str:
    """scheme://host[:port] of a node's public URL."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}"


@define
class _ClusterSlot:
    """A local slot whose release is also told to Redis."""

    _slot: Slot
    _release_in_cluster: Callable[[], None]

    @property
    def address(self) -> str:
        return self._slot.address

    @property
    def released(self) -> bool:
        return self._slot.released

    def release(self) -> None:
        if not self._slot.released:
            self._slot.release()
            self._release_in_cluster()


@implementer(IAdmission)
@define
class ClusterAdmission:
    """L{IAdmission} for a node of a cluster."""

    local: Admission
    _store: IClusterStore
    _membership: Membership
    _clock: IReactorTime
    _ttl: float  # node_ttl: how long this node's per-address counts last unrefreshed
    # Admissions sent to Redis and not answered yet, per address: counted in
    # the heartbeat's snapshot so that a beat crossing them loses none.
    _admitting: dict[str, int] = field(factory=dict)

    # -- what the rest of the server reads -------------------------------------

    @property
    def active(self) -> int:
        return self.local.active

    @property
    def capacity(self) -> int:
        return self.local.capacity

    def auth_failed(self, address: str) -> None:
        self.local.auth_failed(address)

    def auth_retry_after(self, address: str) -> int | None:
        return self.local.auth_retry_after(address)

    def active_by_address(self) -> dict[str, int]:
        counts = self.local.active_by_address()
        for address, pending in self._admitting.items():
            counts[address] = counts.get(address, 0) + pending
        return counts

    def describe(self) -> NodeInfo:
        """This node as the heartbeat announces it."""
        status = self.local.status("")
        return NodeInfo(name="", url="", accepting=status.accepting, active=self.local.active,
                        capacity=self.local.capacity,
                        draining=self.local.draining or self.local.cluster_drained,
                        started_at=0.0)

    # -- IAdmission ---------------------------------------------------------------

    def plan_page(self, address: str) -> defer.Deferred:
        limit = self.local.pages_per_address_per_minute
        if not limit or not address:
            return self._place(address)
        if not self._store.up:
            return self.local.plan_page(address).addCallback(self._placed_locally, address)
        d = self._store.take_page(address, limit, WINDOW)

        def counted(wait: int | None):
            if wait is not None:
                return PagePlan(refusal=AdmissionStatus(
                    accepting=False, reason=RATE_LIMITED, active=self.local.active,
                    capacity=self.local.capacity, retry_after=wait), logged=False)
            return self._place(address)

        def unavailable(failure) -> defer.Deferred:
            failure.trap(RedisUnavailable)
            return self.local.plan_page(address).addCallback(self._placed_locally, address)

        return d.addCallbacks(counted, unavailable)

    def _placed_locally(self, plan: PagePlan, address: str):
        # The local page count was taken; placement is on this node alone.
        if plan.refusal is not None:
            return plan
        return self._place(address)

    def _address_limit(self, address: str, nodes) -> defer.Deferred:
        """The visitor's own limits across the cluster: None, or the refusal
        (a rate-limited AdmissionStatus). Local counts while Redis is down."""
        def local() -> AdmissionStatus | None:
            mine = self.local.status(address)
            return mine if mine.reason == RATE_LIMITED else None

        if not self._store.up or not address:
            return defer.succeed(local())
        d = self._store.check_address(address, [node.name for node in nodes],
                                      self.local.per_address,
                                      self.local.per_address_per_minute, WINDOW)

        def checked(result) -> AdmissionStatus | None:
            reason, retry_after = result
            if reason is None:
                return None
            return AdmissionStatus(accepting=False, reason=reason, active=self.local.active,
                                   capacity=self.local.capacity, retry_after=retry_after)

        def unavailable(failure) -> AdmissionStatus | None:
            failure.trap(RedisUnavailable)
            return local()

        return d.addCallbacks(checked, unavailable)

    def _live_nodes(self):
        """The live nodes, none accepting while the cluster's switch is off
        (it holds on every node, whatever their last announcement said)."""
        nodes = self._membership.live_nodes()
        if self.local.cluster_paused:
            return tuple(NodeInfo(n.name, n.url, False, n.active, n.capacity, n.draining,
                                  n.started_at) for n in nodes)
        return nodes

    def _place(self, address: str) -> defer.Deferred:
        nodes = self._live_nodes()
        origins = tuple(sorted({node_origin(node.url) for node in nodes}))
        chosen = choose_node(nodes, self._membership.name)
        if chosen is None:
            return defer.succeed(PagePlan(refusal=self._cluster_refusal(address, nodes)))
        if chosen.name == self._membership.name:
            status = self.local.status(address)
            if not status.accepting:
                return defer.succeed(PagePlan(refusal=status))

        def limited(refusal: AdmissionStatus | None) -> PagePlan:
            if refusal is not None:
                return PagePlan(refusal=refusal)
            return PagePlan(node=chosen.name, sockjs_url=chosen.url + "/sockjs",
                            connect_origins=origins)

        return self._address_limit(address, nodes).addCallback(limited)

    def _cluster_refusal(self, address: str, nodes) -> AdmissionStatus:
        """Why no node takes a console: this node's reason when it is one of
        the service's (paused, shutting down), else full."""
        mine = self.local.status(address)
        active = sum(node.active for node in nodes)
        capacity = sum(node.capacity for node in nodes)
        if not mine.accepting and mine.reason != FULL and (
                len(nodes) == 1 or self.local.cluster_paused):
            return mine
        return AdmissionStatus(accepting=False, reason=FULL, active=active,
                               capacity=capacity, retry_after=FULL_RETRY_AFTER)

    def console_slot(self, address: str) -> defer.Deferred:
        status = self.local.status(address)
        if not status.accepting:
            return defer.fail(Refused(status))
        if not self._store.up:
            return self.local.console_slot(address)
        live = [node.name for node in self._membership.live_nodes()]
        self._admitting[address] = self._admitting.get(address, 0) + 1
        d = self._store.admit(self._membership.name, address, live,
                              self.local.per_address, self.local.per_address_per_minute,
                              WINDOW, self._ttl)

        def answered(result):
            self._done_admitting(address)
            reason, retry_after = result
            if reason is not None:
                raise Refused(AdmissionStatus(
                    accepting=False, reason=reason, active=self.local.active,
                    capacity=self.local.capacity, retry_after=retry_after))
            try:
                slot = self.local.admit(address)
            except Refused:
                self._release_in_cluster(address)
                raise
            return _ClusterSlot(slot, lambda: self._release_in_cluster(address))

        def unavailable(failure):
            self._done_admitting(address)
            failure.trap(RedisUnavailable)
            return self.local.console_slot(address)

        return d.addCallbacks(answered, unavailable)

    def _done_admitting(self, address: str) -> None:
        left = self._admitting.get(address, 0) - 1
        if left > 0:
            self._admitting[address] = left
        else:
            self._admitting.pop(address, None)

    def _release_in_cluster(self, address: str) -> None:
        # Best effort: the next heartbeat rewrites this node's counts anyway.
        if self._store.up:
            self._store.release(self._membership.name, address).addErrback(
                lambda failure: failure.trap(RedisUnavailable))

    def spend_token(self, nonce: str, expires_at: float) -> defer.Deferred:
        if not self._store.up:
            return defer.succeed(True)
        ttl = max(1.0, expires_at - self._clock.seconds())

        def unavailable(failure) -> bool:
            failure.trap(RedisUnavailable)
            return True  # this node's own memory and file already hold it

        return self._store.spend_token(nonce, ttl).addErrback(unavailable)

    def status_json(self, address: str) -> defer.Deferred:
        nodes = self._live_nodes()
        chosen = choose_node(nodes, self._membership.name)
        active = sum(node.active for node in nodes)
        capacity = sum(node.capacity for node in nodes)

        def answer(limit: AdmissionStatus | None) -> dict:
            if chosen is not None and limit is None:
                body = AdmissionStatus(accepting=True, reason=None, active=active,
                                       capacity=capacity, retry_after=None).to_json()
            else:
                refusal = limit or self._cluster_refusal(address, nodes)
                body = AdmissionStatus(accepting=False, reason=refusal.reason, active=active,
                                       capacity=capacity,
                                       retry_after=refusal.retry_after).to_json()
            body["cluster"] = {
                "node": self._membership.name,
                "redis": "up" if self._store.up else "down",
                "nodes": [node.public_json() for node in nodes],
            }
            return body

        if chosen is None:
            return defer.succeed(answer(None))
        return self._address_limit(address, nodes).addCallback(answer)
