"""A cluster on real parts: three real nodes (their own ports, state
directories and uid ranges, one shared secret file) and Debian's real
`redis-server`, as docs/cluster.md describes it.

Placement, the per-address limits, the kill switch, single-use tokens,
membership (SIGKILL and return) and Redis going away and coming back are
checked from the outside, over real sockets, with consoles that really run.
Each test takes visitor addresses of its own (127.0.x.y), so the cluster-wide
per-address budgets of one test never touch another's.
"""

from __future__ import annotations

import itertools
import json
import re
import time
import urllib.request

import attrs
import pytest
from cluster_helpers import (
    HEARTBEAT,
    NODE_TTL,
    ClusterNode,
    RedisServer,
    accepting_for,
    console_page,
    ctl,
    leftover_processes,
    request,
    sockjs_url,
    start_node,
    start_redis,
    token_claims,
)
from conftest import free_port, sandbox_leftovers, wait_until
from console_client import TOKEN, ConsoleClient
from test_proxy_real import proxied_socket, proxy_v1, proxy_v2, read_response

pytestmark = pytest.mark.integration

UIDS = 244000  # this module's range: 244000-244299
# Small budgets, so that crossing them across nodes takes a few requests.
LIMITS = "per_address = 2\nper_address_per_minute = 3\npages_per_address_per_minute = 6\n"
# How long a dead node may stay in a peer's view: its TTL, one heartbeat for
# the peer's next look, and slack for a busy 2-core machine.
MEMBERSHIP_BOUND = NODE_TTL + HEARTBEAT + 1.5
_addresses = itertools.count(2)


def visitor() -> str:
    """A loopback address no other request of this run has used."""
    n = next(_addresses)
    return f"127.0.{10 + n // 250}.{n % 250 + 2}"


@attrs.define
class Cluster:
    redis: RedisServer
    nodes: dict[str, ClusterNode]

    def __getitem__(self, name: str) -> ClusterNode:
        return self.nodes[name]

    def node_at(self, url: str) -> ClusterNode:
        """The node whose public URL starts ``url`` (a page's SockJS URL)."""
        port = int(re.match(r"https://127\.0\.0\.1:(\d+)", url).group(1))
        (node,) = [node for node in self.nodes.values() if node.port == port]
        return node

    def entry(self, seen_from: str, name: str) -> dict | None:
        """Node ``name`` as ``seen_from``'s /status lists it (None: absent)."""
        for node in self[seen_from].status()["cluster"]["nodes"]:
            if node["name"] == name:
                return node
        return None

    def wait_members(self, names: set[str], timeout: float = 15) -> bool:
        """Until every running node lists exactly ``names``."""
        return wait_until(lambda: all(set(node.live_nodes()) == names
                                      for node in self.nodes.values() if node.running()),
                          timeout=timeout, interval=0.1)

    def sees(self, seen_from: str, names: set[str], **fields) -> bool:
        """Whether ``seen_from``'s /status lists exactly the nodes ``names``,
        each with ``fields`` (e.g. accepting=False)."""
        entries = self[seen_from].status()["cluster"]["nodes"]
        return {entry["name"] for entry in entries} == names and all(
            entry[key] == value for entry in entries for key, value in fields.items())

    def all_see(self, names: set[str], **fields) -> bool:
        """Whether every running node's view lists nodes ``names`` with
        ``fields``: placement, asked of any node, goes by that view."""
        return all(self.sees(node.name, names, **fields)
                   for node in self.nodes.values() if node.running())

    def wait_idle(self) -> None:
        """Until every running node's view (placement decides from its own,
        up to a heartbeat old) lists every running node as running no
        console and taking new ones (a previous test's consoles in their
        reattach grace have ended, its switch files are gone)."""
        names = {node.name for node in self.nodes.values() if node.running()}
        # The reattach grace (10 s in tests), the sandbox's teardown after
        # it and a heartbeat: slack for a busy 2-core machine.
        assert wait_until(lambda: self.all_see(names, active=0, accepting=True,
                                               draining=False),
                          timeout=30, interval=0.1), {
            node.name: node.status()["cluster"]["nodes"] for node in self.nodes.values()
            if node.running()}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Redis and nodes A (capacity 1), B and C (capacity 4), shared by the
    module; stopped at the end with nothing left behind."""
    base = tmp_path_factory.mktemp("cluster")
    redis = start_redis(base / "redis")
    secret = base / "secret"
    nodes: dict[str, ClusterNode] = {}
    try:
        for index, (name, capacity) in enumerate([("A", 1), ("B", 4), ("C", 4)]):
            nodes[name] = start_node(
                base / name, name, redis, secret, uid_min=UIDS + 50 * index,
                uid_max=UIDS + 50 * index + 49, admission=LIMITS + f"capacity = {capacity}\n")
        running = Cluster(redis, nodes)
        assert running.wait_members({"A", "B", "C"}), [n.live_nodes() for n in nodes.values()]
        yield running
    finally:
        for node in nodes.values():
            node.stop()
        redis.stop()
    pids = [redis.process.pid] + [node.server.process.pid for node in nodes.values()]
    assert leftover_processes(pids) == []
    for node in nodes.values():
        assert sandbox_leftovers(node.server) == [], node.name
        assert "Traceback" not in node.server.log(), node.name


def open_console(cluster: Cluster, via: ClusterNode,
                 source: str | None = None) -> tuple[ConsoleClient, ClusterNode, str]:
    """Load /console/ from ``via`` as visitor ``source``, connect to the node
    its SockJS URL names, log in: (client at its first prompt, that node,
    the token)."""
    source = source or visitor()
    status, page = console_page(via, source)
    assert status == 200, page[:300]
    token = TOKEN.search(page).group(1)
    target = cluster.node_at(sockjs_url(page))
    client = ConsoleClient(target.server, origin=via.public_url, source=source)
    client.login(token)
    assert client.wait_for_prompt(1, timeout=30), (target.name, client.display(),
                                                   client.messages[-3:])
    return client, target, token


def answers(client: ConsoleClient) -> bool:
    """Type ``6*7``: whether ``42`` comes back (the console still works)."""
    before = "".join(client.raw_output).count("42")
    client.type("6*7\r")
    return client.wait_for(lambda c: "".join(c.raw_output).count("42") > before, timeout=20)


def refused(client: ConsoleClient, token: str) -> str:
    """Log in with ``token`` and expect a refusal: its message."""
    client.login(token)
    assert client.wait_for(lambda c: c.closed or "In [1]:" in c.display(), timeout=20)
    assert "In [1]:" not in client.display(), "the token was accepted"
    return client.last_message("e") or ""


def placed_on(cluster: Cluster, via: ClusterNode, source: str | None = None) -> ClusterNode:
    """Where a console page loaded from ``via`` sends its SockJS connection
    (the token's node too)."""
    status, page = console_page(via, source or visitor())
    assert status == 200, page[:300]
    target = cluster.node_at(sockjs_url(page))
    assert token_claims(TOKEN.search(page).group(1))["node"] == target.name
    return target


def close_all(clients: list[ConsoleClient]) -> None:
    for client in clients:
        client.close()


def test_every_node_answers_for_the_cluster(cluster):
    """Each node's /status sums the live nodes (capacity 1 + 4 + 4), says
    Redis is up and lists all three with their public URLs."""
    for name in "ABC":
        status = cluster[name].status()
        assert status["accepting"] is True
        assert status["capacity"] == 9
        assert status["cluster"]["node"] == name
        assert status["cluster"]["redis"] == "up"
        urls = {node["name"]: node["url"] for node in status["cluster"]["nodes"]}
        assert urls == {n: cluster[n].public_url for n in "ABC"}


def test_console_page_allows_exactly_the_node_origins(cluster):
    """The console page's CSP connect-src names the three nodes' origins and
    no other port."""
    response = cluster["B"].server.get("/console/", {"User-Agent": "t"})
    policy = response.headers["Content-Security-Policy"]
    connect = re.search(r"connect-src ([^;]*)", policy).group(1)
    assert set(re.findall(r"127\.0\.0\.1:(\d+)", connect)) == {
        str(cluster[n].port) for n in "ABC"}, connect


def test_idle_cluster_places_on_the_node_asked(cluster):
    """With every node idle (a tie), a page from any node places on itself."""
    cluster.wait_idle()
    for name in "ABC":
        assert placed_on(cluster, cluster[name]).name == name


def test_full_node_places_elsewhere(cluster):
    """A (capacity 1) holding a console sends the next page's console to
    another node, where it runs and is counted."""
    cluster.wait_idle()
    clients = []
    try:
        client, on_a, _ = open_console(cluster, cluster["A"])
        clients.append(client)
        assert on_a.name == "A"
        assert wait_until(lambda: cluster.entry("B", "A")["active"] == 1, timeout=10)
        assert cluster.entry("B", "A")["accepting"] is False
        client, elsewhere, _ = open_console(cluster, cluster["A"])
        clients.append(client)
        assert elsewhere.name in ("B", "C")
        assert answers(client)
        assert wait_until(lambda: cluster.entry(elsewhere.name, elsewhere.name)["active"] == 1)
        assert answers(clients[0])
    finally:
        close_all(clients)


def test_drained_node_takes_no_new_consoles(cluster):
    """`shellserver-ctl drain A`: pages from A place elsewhere while A's own
    console goes on; `undrain A` brings A back into placement."""
    cluster.wait_idle()
    clients = []
    try:
        client, on_a, _ = open_console(cluster, cluster["A"])
        clients.append(client)
        assert on_a.name == "A"
        done = ctl(cluster["B"].config_path, "drain", "A")
        assert done.returncode == 0, done.stderr
        assert "A" in done.stdout
        assert wait_until(lambda: cluster.entry("C", "A")["draining"] is True, timeout=10)
        for _ in range(3):
            assert placed_on(cluster, cluster["A"]).name in ("B", "C")
        assert answers(client)  # A's own console goes on
        client.close()
        done = ctl(cluster["B"].config_path, "undrain", "A")
        assert done.returncode == 0, done.stderr
        assert wait_until(lambda: cluster.entry("C", "A")["draining"] is False, timeout=10)
        cluster.wait_idle()
        assert placed_on(cluster, cluster["A"]).name == "A"
    finally:
        ctl(cluster["B"].config_path, "undrain", "A")
        close_all(clients)


def test_node_kill_switch_file_affects_that_node_only(cluster):
    """A's own kill-switch file: pause takes A out of placement while its
    console runs on; terminate ends A's console and not B's; removing the
    file brings A back."""
    cluster.wait_idle()
    clients = []
    switch = cluster["A"].kill_switch
    try:
        on_a, node, _ = open_console(cluster, cluster["A"])
        assert node.name == "A"
        on_b, node, _ = open_console(cluster, cluster["B"])
        assert node.name == "B"
        clients += [on_a, on_b]
        switch.write_text("")
        assert wait_until(lambda: cluster.entry("B", "A")["accepting"] is False, timeout=10)
        assert cluster["A"].status()["accepting"] is True  # B and C still accept
        assert placed_on(cluster, cluster["A"]).name in ("B", "C")
        assert answers(on_a)
        switch.write_text("terminate\n")
        assert on_a.wait_closed(timeout=15), on_a.display()
        assert answers(on_b)
        for name in "BC":
            assert cluster.entry(name, name)["accepting"] is True
    finally:
        switch.unlink(missing_ok=True)
        close_all(clients)
    assert wait_until(lambda: cluster.entry("B", "A")["accepting"] is True, timeout=10)


def test_cluster_pause_and_resume(cluster):
    """`shellserver-ctl pause` stops new consoles on every node (pages 503,
    /status switched-off) while running ones go on; `resume` undoes it."""
    clients = []
    try:
        client, _, _ = open_console(cluster, cluster["C"])
        clients.append(client)
        done = ctl(cluster["A"].config_path, "pause")
        assert done.returncode == 0, done.stderr
        assert "pause" in done.stdout
        for name in "ABC":
            assert wait_until(lambda n=name: cluster[n].status()["accepting"] is False,
                              timeout=10), name
            assert cluster[name].status()["reason"] == "switched-off"
            status, _ = console_page(cluster[name], visitor())
            assert status == 503
        assert answers(client)
        done = ctl(cluster["A"].config_path, "resume")
        assert done.returncode == 0, done.stderr
        for name in "ABC":
            assert wait_until(lambda n=name: cluster[n].status()["accepting"] is True,
                              timeout=10), name
        more, _, _ = open_console(cluster, cluster["B"])
        clients.append(more)
        assert answers(more)
    finally:
        ctl(cluster["A"].config_path, "resume")
        close_all(clients)


def test_cluster_terminate_ends_consoles_on_every_node(cluster):
    """`shellserver-ctl terminate` ends the consoles running on two nodes,
    each with a message, and keeps the cluster off until `resume`."""
    cluster.wait_idle()
    clients = []
    try:
        for name in "BC":
            client, node, _ = open_console(cluster, cluster[name])
            assert node.name == name
            clients.append(client)
        done = ctl(cluster["A"].config_path, "terminate")
        assert done.returncode == 0, done.stderr
        for client in clients:
            assert client.wait_closed(timeout=15), client.display()
            assert client.last_message("e") or client.last_message("x"), client.messages[-3:]
        for name in "ABC":
            assert wait_until(lambda n=name: cluster[n].status()["accepting"] is False,
                              timeout=10), name
        done = ctl(cluster["A"].config_path, "resume")
        assert done.returncode == 0, done.stderr
        assert wait_until(lambda: cluster["B"].status()["accepting"] is True, timeout=10)
        client, _, _ = open_console(cluster, cluster["B"])
        clients.append(client)
        assert answers(client)
    finally:
        ctl(cluster["A"].config_path, "resume")
        close_all(clients)


def test_ctl_status_lists_the_nodes(cluster):
    """`shellserver-ctl status` names every live node and exits 0."""
    done = ctl(cluster["C"].config_path, "status")
    assert done.returncode == 0, done.stderr
    for name in "ABC":
        assert re.search(rf"\b{name}\b", done.stdout), done.stdout


def no_console_for(cluster: Cluster, via: ClusterNode, source: str) -> str:
    """Ask ``via`` for a console as ``source`` and expect a refusal: the page
    is a 429, or the console it places is refused ("No console now").
    Which of the two it was."""
    status, page = console_page(via, source)
    if status == 429:
        return "page"
    assert status == 200, page[:300]
    target = cluster.node_at(sockjs_url(page))
    client = ConsoleClient(target.server, origin=via.public_url, source=source)
    try:
        message = refused(client, TOKEN.search(page).group(1))
    finally:
        client.close()
    assert "No console now" in message, message
    return "console"


def test_concurrent_limit_holds_across_nodes(cluster):
    """One visitor with two consoles (per_address = 2) on the cluster gets no
    third from another node, and /status there says so for that visitor;
    once one console ends, it may start again."""
    source = visitor()
    clients = []
    try:
        for name in "AB":
            client, _, _ = open_console(cluster, cluster[name], source)
            clients.append(client)
        # As on one node: the page itself is the refusal (429, try again).
        assert no_console_for(cluster, cluster["C"], source) == "page"
        assert console_page(cluster["C"], visitor())[0] == 200  # others are not limited
        # The contract: /status accepts "for this client" only if a node would.
        status = json.loads(request(cluster["C"], "/status", source)[1])
        assert (status["accepting"], status["reason"]) == (False, "rate-limited"), status
        clients[0].type("exit\r")
        assert clients[0].wait_closed(timeout=20)
        assert wait_until(lambda: accepting_for(cluster["C"], source), timeout=15)
        client, _, _ = open_console(cluster, cluster["C"], source)
        clients.append(client)
    finally:
        close_all(clients)


def test_starts_per_minute_hold_across_nodes(cluster):
    """Three consoles started by one visitor, one from each node's page
    (per_address_per_minute = 3): no fourth anywhere, and every /status says
    so for that visitor."""
    source = visitor()
    for name in "ABC":
        client, _, _ = open_console(cluster, cluster[name], source)
        client.type("exit\r")
        assert client.wait_closed(timeout=20)
        client.close()
    # The concurrent count is back to 0: only the per-minute budget is left.
    for name in "ABC":
        assert no_console_for(cluster, cluster[name], source) == "page", name
    for name in "ABC":
        status = json.loads(request(cluster[name], "/status", source)[1])
        assert (status["accepting"], status["reason"]) == (False, "rate-limited"), status


def test_console_pages_per_minute_hold_across_nodes(cluster):
    """Six console pages for one visitor spread over the nodes
    (pages_per_address_per_minute = 6); the seventh, anywhere, is a 429."""
    source = visitor()
    for name in "ABCABC":
        assert console_page(cluster[name], source)[0] == 200, name
    status, page = console_page(cluster["B"], source)
    assert status == 429, page[:300]
    assert console_page(cluster["B"], visitor())[0] == 200


def test_token_for_one_node_is_refused_on_another(cluster):
    """A token names its node; any other node refuses it ("another node")
    and it still works on its own node afterwards."""
    source = visitor()
    status, page = console_page(cluster["A"], source)
    assert status == 200
    token = TOKEN.search(page).group(1)
    owner = cluster.node_at(sockjs_url(page))
    other = next(node for node in cluster.nodes.values() if node is not owner)
    wrong = ConsoleClient(other.server, origin=cluster["A"].public_url, source=source)
    try:
        assert "another node" in refused(wrong, token)
    finally:
        wrong.close()
    right = ConsoleClient(owner.server, origin=cluster["A"].public_url, source=source)
    try:
        right.login(token)
        assert right.wait_for_prompt(1, timeout=30), right.display()
    finally:
        right.close()


def test_used_token_is_refused_everywhere_and_after_restart(cluster):
    """A redeemed token is refused again on its node and on every other;
    after that node's SIGKILL, with its local used-tokens file removed, the
    restarted node still refuses it (Redis remembers)."""
    source = visitor()
    client, owner, token = open_console(cluster, cluster["C"], source)
    client.close()
    for node in cluster.nodes.values():
        again = ConsoleClient(node.server, origin=cluster["C"].public_url, source=source)
        try:
            message = refused(again, token)
            assert "Console refused" in message, (node.name, message)
        finally:
            again.close()
    owner.kill()
    used = owner.directory / "state" / "used-tokens"
    assert used.exists()  # the local record is still written too
    used.unlink()
    owner.start()
    try:
        again = ConsoleClient(owner.server, origin=cluster["C"].public_url, source=source)
        try:
            assert "already used" in refused(again, token)
        finally:
            again.close()
    finally:
        assert cluster.wait_members({"A", "B", "C"})


def test_sigkilled_node_leaves_and_returns(cluster):
    """With A and B paused by their files, pages place on C; C SIGKILLed
    leaves every view within its TTL (pages then 503) while A's and B's
    consoles keep answering; C restarted is seen again and placed on."""
    cluster.wait_idle()
    clients = []
    try:
        for name in "AB":
            client, node, _ = open_console(cluster, cluster[name])
            assert node.name == name
            clients.append(client)
            cluster[name].kill_switch.write_text("")
        # Placement asked of A goes by A's view: wait until A (and every
        # node) sees A and B paused, not only C.
        assert wait_until(lambda: all(
            (cluster.entry(seen_from, "A") or {}).get("accepting") is False
            and (cluster.entry(seen_from, "B") or {}).get("accepting") is False
            for seen_from in "ABC"), timeout=10)
        assert placed_on(cluster, cluster["A"]).name == "C"
        cluster["C"].kill()
        killed = time.monotonic()
        assert wait_until(lambda: all("C" not in cluster[n].live_nodes() for n in "AB"),
                          timeout=MEMBERSHIP_BOUND + 5, interval=0.05)
        gone_after = time.monotonic() - killed
        assert gone_after <= MEMBERSHIP_BOUND, gone_after
        status, page = console_page(cluster["A"], visitor())
        assert status == 503, page[:300]
        assert cluster["B"].status()["accepting"] is False
        for client in clients:
            assert answers(client)
        cluster["C"].start()
        assert cluster.wait_members({"A", "B", "C"})
        assert wait_until(lambda: (cluster.entry("B", "C") or {}).get("accepting") is True,
                          timeout=10)
        assert placed_on(cluster, cluster["B"]).name == "C"
        for client in clients:
            assert answers(client)
    finally:
        for name in "AB":
            cluster[name].kill_switch.unlink(missing_ok=True)
        close_all(clients)
        if not cluster["C"].running():
            cluster["C"].start()


def test_redis_down_then_back(cluster):
    """Redis SIGKILLed: every node says "redis": "down", logs one warning,
    keeps its console answering and places new ones on itself only; Redis back
    on its port: every node says "up" and the membership is whole again."""
    cluster.wait_idle()
    clients = []
    try:
        client, node, _ = open_console(cluster, cluster["B"])
        assert node.name == "B"
        clients.append(client)
        cluster.redis.kill()
        for name in "ABC":
            assert wait_until(lambda n=name: cluster[n].status()["cluster"]["redis"] == "down",
                              timeout=10), name
        assert answers(client)
        # B already runs one console and A and C none: with Redis up a page
        # from B would place on A or C; without it, B places on itself.
        more, node, _ = open_console(cluster, cluster["B"])
        clients.append(more)
        assert node.name == "B"
        assert answers(more)
        assert [entry["name"] for entry in cluster["B"].status()["cluster"]["nodes"]] == ["B"]
        # Several heartbeats later, still one warning per node.
        deadline = time.monotonic() + 4 * HEARTBEAT
        wait_until(lambda: time.monotonic() > deadline, timeout=5)
        for name in "ABC":
            assert cluster[name].server.log().count("Redis unreachable") == 1, name
        cluster.redis.start()
        for name in "ABC":
            assert wait_until(lambda n=name: cluster[n].status()["cluster"]["redis"] == "up",
                              timeout=20), name
        assert cluster.wait_members({"A", "B", "C"})
        assert answers(client)
        for name in "ABC":
            assert cluster[name].server.log().count("Redis unreachable") == 1, name
    finally:
        if cluster.redis.process.poll() is not None:
            cluster.redis.start()
        close_all(clients)


def test_sigterm_announces_draining_at_once(cluster, tmp_path):
    """A node D told to stop (SIGTERM, 10 s shutdown grace, one console
    running) shows as draining to the others while it still runs, is not
    placed on, and leaves the membership when it has stopped."""
    d = start_node(tmp_path / "D", "D", cluster.redis, cluster["A"].directory.parent / "secret",
                   uid_min=UIDS + 270, uid_max=UIDS + 299, admission=LIMITS,
                   console="shutdown_grace = 10\n")
    cluster.nodes["D"] = d
    try:
        assert wait_until(lambda: "D" in cluster["A"].live_nodes(), timeout=10)
        cluster.wait_idle()
        client, node, _ = open_console(cluster, d)
        assert node.name == "D"
        d.server.process.terminate()
        assert wait_until(lambda: (cluster.entry("A", "D") or {}).get("draining") is True,
                          timeout=3 * HEARTBEAT + 1, interval=0.05)
        assert d.running(), "D stopped before it was seen draining"
        client.close()
        d.server.process.wait(timeout=30)
        assert wait_until(lambda: "D" not in cluster["A"].live_nodes(), timeout=5)
    finally:
        del cluster.nodes["D"]
        d.stop()
    assert sandbox_leftovers(d.server) == []


# --- Behind a load balancer: a second cluster (its own key prefix) whose node
# X listens with the PROXY protocol and whose node Y trusts X-Forwarded-For
# from 127.0.0.1; one console per visitor, cluster-wide.

ONE_PER_VISITOR = ("per_address = 1\nper_address_per_minute = 100\n"
                   "pages_per_address_per_minute = 0\n")


@pytest.fixture(scope="module")
def proxied_cluster(tmp_path_factory):
    base = tmp_path_factory.mktemp("proxied-cluster")
    redis = start_redis(base / "redis")
    secret = base / "secret"
    nodes: dict[str, ClusterNode] = {}
    trusted = 'trusted_proxies = ["127.0.0.1"]\n'
    try:
        nodes["X"] = start_node(base / "X", "X", redis, secret, uid_min=UIDS + 150,
                                uid_max=UIDS + 199, admission=ONE_PER_VISITOR, server=trusted,
                                listen_prefix="haproxy:")
        nodes["Y"] = start_node(base / "Y", "Y", redis, secret, uid_min=UIDS + 200,
                                uid_max=UIDS + 249, admission=ONE_PER_VISITOR, server=trusted)
        # X answers only behind a PROXY header: watch the membership from Y.
        assert wait_until(lambda: nodes["Y"].live_nodes() == ["X", "Y"], timeout=15)
        yield Cluster(redis, nodes)
    finally:
        for node in nodes.values():
            node.stop()
        redis.stop()
    pids = [redis.process.pid] + [node.server.process.pid for node in nodes.values()]
    assert leftover_processes(pids) == []
    for node in nodes.values():
        assert sandbox_leftovers(node.server) == [], node.name


def page_through_proxy(node: ClusterNode, header: bytes) -> tuple[int, str]:
    """GET /console/ on a PROXY-protocol node, as ``header``'s visitor."""
    with proxied_socket(node.server, header) as sock:
        sock.sendall(f"GET /console/ HTTP/1.1\r\nHost: 127.0.0.1:{node.port}\r\n"
                     "Connection: close\r\n\r\n".encode())
        answer = read_response(sock).decode("utf-8", "replace")
    return int(answer.split()[1]), answer


def connect_as(cluster: Cluster, target: ClusterNode, visitor_address: str,
               origin: str) -> ConsoleClient:
    """A console connection to ``target`` on behalf of ``visitor_address``:
    a PROXY header to X, X-Forwarded-For from 127.0.0.1 to Y."""
    if target.name == "X":
        return ConsoleClient(target.server, origin=origin,
                             sock=proxied_socket(target.server, proxy_v2(visitor_address)))
    return ConsoleClient(target.server, origin=origin, source="127.0.0.1",
                         headers=[f"X-Forwarded-For: {visitor_address}"])


def proxied_outcome(cluster: Cluster, answer: tuple[int, str], visitor_address: str,
                    origin: str) -> str:
    """What a visitor gets from a console page ``answer``: "page refused"
    (429), "console" (it starts; closed again) or "console refused"."""
    status, page = answer
    if status == 429:
        return "page refused"
    assert status == 200, page[:300]
    target = cluster.node_at(sockjs_url(page))
    client = connect_as(cluster, target, visitor_address, origin)
    try:
        client.login(TOKEN.search(page).group(1))
        assert client.wait_for(lambda c: c.closed or "In [1]:" in c.display(), timeout=30)
        return "console refused" if client.closed else "console"
    finally:
        client.close()


def test_proxy_protocol_visitor_is_limited_across_nodes(proxied_cluster):
    """A visitor's console started through X's PROXY header counts on Y
    behind a trusted X-Forwarded-For (no second console), while another
    visitor is not limited and an untrusted peer's X-Forwarded-For is
    ignored."""
    x, y = proxied_cluster["X"], proxied_cluster["Y"]
    first = "198.51.100.21"
    status, page = page_through_proxy(x, proxy_v1(first))
    assert status == 200, page[:300]
    target = proxied_cluster.node_at(sockjs_url(page))
    client = connect_as(proxied_cluster, target, first, x.public_url)
    try:
        client.login(TOKEN.search(page).group(1))
        assert client.wait_for_prompt(1, timeout=30), client.display()
        through_y = console_page(y, "127.0.0.1", {"X-Forwarded-For": first})
        assert proxied_outcome(proxied_cluster, through_y, first, y.public_url) != "console"
        through_x = page_through_proxy(x, proxy_v2(first))
        assert proxied_outcome(proxied_cluster, through_x, first, x.public_url) != "console"
        other = "198.51.100.22"
        through_y = console_page(y, "127.0.0.1", {"X-Forwarded-For": other})
        assert proxied_outcome(proxied_cluster, through_y, other, y.public_url) == "console"
        # 127.0.0.3 is no trusted proxy: its header names nobody, it is itself.
        # Its console must be Y's (X would need a PROXY header naming
        # 127.0.0.3), and placement picks the less loaded node from views up
        # to a heartbeat old, with consoles in their reattach grace counted:
        # X's own kill-switch file takes X out of placement so Y is certain.
        x.kill_switch.write_text("")
        assert wait_until(lambda: proxied_cluster.entry("Y", "X")["accepting"] is False,
                          timeout=10)
        status, page = console_page(y, "127.0.0.3", {"X-Forwarded-For": first})
        assert status == 200, page[:300]
        target = proxied_cluster.node_at(sockjs_url(page))
        assert target.name == "Y"
        untrusted = ConsoleClient(y.server, origin=y.public_url, source="127.0.0.3",
                                  headers=[f"X-Forwarded-For: {first}"])
        try:
            untrusted.login(TOKEN.search(page).group(1))
            assert untrusted.wait_for_prompt(1, timeout=30), untrusted.messages[-3:]
        finally:
            untrusted.close()
    finally:
        x.kill_switch.unlink(missing_ok=True)
        client.close()
    assert wait_until(lambda: proxied_cluster.entry("Y", "X")["accepting"] is True, timeout=10)
    assert f"from {first}" in target.server.log() or f"from {first}" in x.server.log()


def test_trusted_forwarded_visitor_is_limited_across_nodes(proxied_cluster):
    """A visitor's console started through Y with a trusted X-Forwarded-For
    keeps the same visitor from a second one through X's PROXY protocol."""
    x, y = proxied_cluster["X"], proxied_cluster["Y"]
    second = "203.0.113.31"
    status, page = console_page(y, "127.0.0.1", {"X-Forwarded-For": second})
    assert status == 200, page[:300]
    target = proxied_cluster.node_at(sockjs_url(page))
    client = connect_as(proxied_cluster, target, second, y.public_url)
    try:
        client.login(TOKEN.search(page).group(1))
        assert client.wait_for_prompt(1, timeout=30), client.display()
        through_x = page_through_proxy(x, proxy_v1(second))
        assert proxied_outcome(proxied_cluster, through_x, second, x.public_url) != "console"
        other = "203.0.113.32"
        through_x = page_through_proxy(x, proxy_v1(other))
        assert proxied_outcome(proxied_cluster, through_x, other, x.public_url) == "console"
    finally:
        client.close()


# --- Redis on a unix socket and over TLS: the node joins and says Redis is up.

@pytest.mark.parametrize("transport", ["unix", "tls"])
def test_node_reaches_redis(tmp_path, transport):
    """A node whose redis_url is unix:///... or rediss://... (with the CA
    file) announces itself and reports Redis up."""
    redis = start_redis(tmp_path / "redis", **{transport: True})
    uids = UIDS + 250 + (10 if transport == "tls" else 0)
    node = None
    metrics_port = free_port()
    try:
        node = start_node(tmp_path / "N", "N", redis, tmp_path / "secret",
                          uid_min=uids, uid_max=uids + 9,
                          extra_args=("--metrics", f"tcp:{metrics_port}:interface=127.0.0.1"))
        assert wait_until(lambda: node.status()["cluster"]["redis"] == "up", timeout=10)
        assert wait_until(lambda: node.live_nodes() == ["N"], timeout=10)
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                         timeout=10).read().decode()
        assert re.search(r"^shellserver_redis_up(\{[^}]*\})? 1(\.0)?$", metrics, re.M), metrics
        assert re.search(r"^shellserver_cluster_nodes(\{[^}]*\})? 1(\.0)?$", metrics, re.M)
        assert "shellserver:node:N" in redis.keys()
        node.stop()
        assert wait_until(lambda: "shellserver:node:N" not in redis.keys(), timeout=5)
    finally:
        if node is not None:
            node.stop()
        redis.stop()
    assert leftover_processes([redis.process.pid]
                              + ([node.server.process.pid] if node else [])) == []


def test_ctl_refuses_without_cluster_or_redis(tmp_path):
    """`shellserver-ctl` exits 2 with a clear message when the config has no
    cluster, and when its Redis does not answer."""
    config = tmp_path / "shellserver.toml"
    config.write_text(f'[server]\nstate_dir = "{tmp_path}/state"\n')
    done = ctl(config, "status")
    assert done.returncode == 2
    assert "cluster" in (done.stderr + done.stdout).lower()
    config.write_text(
        f'[server]\nstate_dir = "{tmp_path}/state"\n[cluster]\n'
        f'redis_url = "redis://127.0.0.1:{free_port()}"\nnode_name = "n"\n'
        f'public_url = "https://127.0.0.1:1"\n')
    done = ctl(config, "pause")
    assert done.returncode == 2
    assert "redis" in (done.stderr + done.stdout).lower()
