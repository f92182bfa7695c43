"""Wiring a cluster node: one call from makeService builds the Redis link,
the store, membership, the cluster's admission and its switch, and the
service that runs them."""

from __future__ import annotations

from collections.abc import Callable

from attrs import define
from prometheus_client import Gauge
from twisted.application.service import MultiService

from shellserver.admission import Admission
from shellserver.cluster.admission import ClusterAdmission
from shellserver.cluster.membership import ClusterService, Membership
from shellserver.cluster.redis import RedisLink, parse_redis_url, redis_endpoint
from shellserver.cluster.store import NodeInfo, RedisClusterStore
from shellserver.config import ClusterConfig

TERMINATED = "The operator has ended all consoles."


@define
class ClusterSwitch:
    """Applies what a heartbeat learnt to this node's admission: the cluster
    kill switch (``terminate`` ends this node's consoles once per turn to
    it) and the operator's drain."""

    _admission: Admission
    _end_all: Callable[[str], None]
    _terminated: bool = False

    def apply(self, membership: Membership) -> None:
        self._admission.cluster_paused = membership.switch is not None
        self._admission.cluster_drained = membership.drained
        terminate = membership.switch == "terminate"
        if terminate and not self._terminated:
            self._end_all(TERMINATED)
        self._terminated = terminate


def cluster_node(reactor, cluster: ClusterConfig, *, admission: Admission,
                 end_all: Callable[[str], None], idle: Callable[[], bool], most_wait: float,
                 metrics=None) -> tuple[ClusterAdmission, MultiService]:
    """Make this node part of ``cluster``: the admission the web and console
    layers use from now on, and the service (for the server's tree) that
    keeps the node connected and announced."""
    address = parse_redis_url(cluster.redis_url)
    link = RedisLink(reactor, redis_endpoint(reactor, address, cluster.redis_ca_file),
                     address, cluster.redis_timeout)
    store = RedisClusterStore(link, cluster.key_prefix)
    started_at = reactor.seconds()
    switch = ClusterSwitch(admission, end_all)
    provider: ClusterAdmission | None = None

    # The membership calls back only once started, after ``provider`` is set.
    def describe() -> NodeInfo:
        assert provider is not None
        node = provider.describe()
        return NodeInfo(name=cluster.node_name, url=cluster.public_url,
                        accepting=node.accepting, active=node.active,
                        capacity=node.capacity, draining=node.draining,
                        started_at=started_at)

    def active_by_address() -> dict[str, int]:
        assert provider is not None
        return provider.active_by_address()

    membership = Membership(store, reactor, cluster.node_name, cluster.public_url,
                            cluster.node_ttl, describe,
                            active_by_address, switch.apply)
    provider = ClusterAdmission(admission, store, membership, reactor, cluster.node_ttl)
    # Back from an outage: announce ourselves at once, not a beat later.
    link.when_up(membership.beat)
    service = ClusterService(link, membership, interval=cluster.heartbeat_interval,
                             clock=reactor, idle=idle, most_wait=most_wait, store=store)
    if metrics is not None:
        Gauge("shellserver_redis_up", "1 while this node reaches the cluster's Redis, else 0.",
              registry=metrics.registry).set_function(lambda: 1 if link.up else 0)
        Gauge("shellserver_cluster_nodes", "Live nodes of the cluster as this node sees them.",
              registry=metrics.registry).set_function(
                  lambda: len(membership.live_nodes()))
    return provider, service
