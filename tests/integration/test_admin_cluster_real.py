"""The admin page over a real cluster: a real `redis-server` and two real
nodes; node A runs the admin page (--admin), node B does not and still
publishes its samples. From A's page: both nodes with their charts, pause
that makes B refuse new consoles, drain of B, and this node alone (said so)
while Redis is down."""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request

import pytest
from cluster_helpers import (
    console_page,
    leftover_processes,
    request,
    sockjs_url,
    start_node,
    start_redis,
)
from conftest import free_port, wait_until

from shellserver.admin import Readings, sample_between, sample_to_json

pytestmark = pytest.mark.integration

UIDS = 253100  # this module's range: 253100-253299
LIMITS = "capacity = 2\nper_address = 2\nper_address_per_minute = 100\n"
# A node publishes a sample every 5 s (shellserver.admin.SAMPLE_INTERVAL);
# the first may go before its Redis link is up.
SAMPLES_BOUND = 20


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Redis, node A with its admin page, node B without one."""
    base = tmp_path_factory.mktemp("admincluster")
    redis = start_redis(base / "redis")
    secret = base / "secret"
    admin_port = free_port()
    nodes = {}
    try:
        nodes["A"] = start_node(base / "A", "A", redis, secret, uid_min=UIDS,
                                uid_max=UIDS + 49, admission=LIMITS,
                                extra_args=("--admin", f"tcp:{admin_port}:interface=127.0.0.1"))
        nodes["B"] = start_node(base / "B", "B", redis, secret, uid_min=UIDS + 100,
                                uid_max=UIDS + 149, admission=LIMITS)
        token = (nodes["A"].server.state_dir / "admin-token").read_text().strip()
        yield redis, nodes, f"http://127.0.0.1:{admin_port}/", token
    finally:
        for node in nodes.values():
            node.stop()
        redis.stop()
    pids = [redis.process.pid] + [node.server.process.pid for node in nodes.values()]
    assert leftover_processes(pids) == []
    for node in nodes.values():
        assert "Traceback" not in node.server.log(), node.name


def admin(admin_url: str, token: str, action: str = "overview",
          body: dict | None = None) -> tuple[int, dict]:
    """GET api/overview, or POST api/ACTION with ``body``: (status, answer)."""
    data = None if body is None and action == "overview" else json.dumps(body or {}).encode()
    call = urllib.request.Request(admin_url + "api/" + action, data=data, headers={
        "Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(call, timeout=15) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as refused:
        return refused.code, json.loads(refused.read())


def shown(admin_url: str, token: str) -> dict[str, dict]:
    status, answer = admin(admin_url, token)
    assert status == 200, answer
    return {node["name"]: node for node in answer["nodes"]}


def placed_on(node, nodes) -> str:
    """The node a console page from ``node`` sends its SockJS connection to."""
    status, page = console_page(node, "127.0.0.1")
    assert status == 200, page[:300]
    port = int(re.match(r"https://127\.0\.0\.1:(\d+)", sockjs_url(page)).group(1))
    return next(name for name, other in nodes.items() if other.port == port)


def test_lists_both_nodes_with_their_samples(cluster):
    """A's admin API lists A and B (URL, state, counts), with samples B
    published to Redis; only A's consoles are endable from A's page."""
    redis, nodes, admin_url, token = cluster
    assert wait_until(lambda: len(shown(admin_url, token).get("B", {}).get(
        "samples", {}).get("time", [])) >= 2, timeout=SAMPLES_BOUND, interval=0.5)
    views = shown(admin_url, token)
    assert sorted(views) == ["A", "B"]
    b = views["B"]
    assert (b["url"], b["state"], b["capacity"], b["local"], b["consoles"]) == (
        nodes["B"].public_url, "accepting", 2, False, [])
    assert b["samples"]["capacity"][-1] == 2
    assert b["samples"]["memory_total_mb"][-1] > 0
    assert (views["A"]["url"], views["A"]["local"]) == (nodes["A"].public_url, True)
    # B's list is capped and expires a little over the hour after its last sample.
    assert 3600 * 1000 < int(redis.cli("PTTL", "shellserver:samples:B")) <= 3700 * 1000
    assert int(redis.cli("LLEN", "shellserver:samples:B")) <= 720


def filler_sample(at: float) -> str:
    """A sample as a node publishes it, taken at ``at``."""
    readings = Readings(time=at, active=0, capacity=0, started=0.0, start_seconds=0.0,
                        refused={"full": 0.0}, memory_used=2**30, memory_total=4 * 2**30,
                        cpu_busy=100, cpu_total=1000, cpu_cores=2)
    return sample_to_json(sample_between(None, readings))


def redis_output_bytes(redis) -> int:
    """What Redis has sent its clients so far (INFO stats)."""
    stats = dict(line.split(":", 1) for line in redis.cli("INFO", "stats").splitlines()
                 if ":" in line)
    return int(stats["total_net_output_bytes"])


def test_polls_read_only_new_samples(cluster):
    """A node's hour of samples (720) is read by A's page once;
    the next polls read only the new ones, and the charts equal the list."""
    redis, nodes, admin_url, token = cluster
    # A third node, C, announced as a draining node of no capacity (so no
    # console goes to it) with a whole hour of samples.
    now = time.time()
    hour = [filler_sample(now - 5 * age) for age in range(720)]  # newest first
    redis.cli("SET", "shellserver:node:C", json.dumps({
        "name": "C", "url": "https://127.0.0.1:9", "accepting": False, "active": 0,
        "capacity": 0, "draining": True, "started_at": now}), "PX", "120000")
    redis.cli("SADD", "shellserver:nodes", "C")
    redis.cli("RPUSH", "shellserver:samples:C", *hour)
    try:
        before = redis_output_bytes(redis)
        first = shown(admin_url, token)["C"]["samples"]["time"]
        whole = redis_output_bytes(redis) - before
        assert len(first) == 720
        assert whole > sum(map(len, hour)), whole
        redis.cli("LPUSH", "shellserver:samples:C", filler_sample(now + 5))
        before = redis_output_bytes(redis)
        views = shown(admin_url, token)
        new_only = redis_output_bytes(redis) - before
        assert new_only < whole / 10, (new_only, whole)
        listed = [json.loads(text)["time"] for text in reversed(
            redis.cli("LRANGE", "shellserver:samples:C", "0", "719").splitlines())]
        assert views["C"]["samples"]["time"] == listed
        assert listed[-1] == round(now + 5, 4) and len(listed) == 720
        assert views["B"]["samples"]["time"], views["B"]
    finally:
        redis.cli("DEL", "shellserver:node:C", "shellserver:samples:C")
        redis.cli("SREM", "shellserver:nodes", "C")


def test_pause_from_a_makes_b_refuse(cluster):
    """Pause on A's page sets the cluster kill switch: B refuses new
    consoles (503, switched-off); resume lets B take them again."""
    redis, nodes, admin_url, token = cluster
    try:
        assert admin(admin_url, token, "pause") == (200, {"done": "pause"})
        assert redis.cli("GET", "shellserver:switch") == "pause"
        assert wait_until(lambda: nodes["B"].status()["accepting"] is False, timeout=10)
        assert nodes["B"].status()["reason"] == "switched-off"
        assert console_page(nodes["B"], "127.0.0.1")[0] == 503
        assert {view["state"] for view in shown(admin_url, token).values()} == {"paused"}
    finally:
        assert admin(admin_url, token, "resume") == (200, {"done": "resume"})
    assert wait_until(lambda: nodes["B"].status()["accepting"] is True, timeout=10)
    assert console_page(nodes["B"], "127.0.0.1")[0] == 200


def test_drain_b_from_a(cluster):
    """Drain B on A's page: B is shown draining and its pages place on A;
    undrain brings B back; an unknown node is 404."""
    redis, nodes, admin_url, token = cluster
    try:
        assert admin(admin_url, token, "drain", {"node": "B"})[0] == 200
        assert redis.cli("EXISTS", "shellserver:drain:B") == "1"
        assert shown(admin_url, token)["B"]["state"] == "draining"
        assert wait_until(lambda: placed_on(nodes["B"], nodes) == "A", timeout=10)
        status, answer = admin(admin_url, token, "drain", {"node": "nobody"})
        assert (status, answer["error"]) == (404, "no node 'nobody'")
    finally:
        assert admin(admin_url, token, "undrain", {"node": "B"})[0] == 200
    assert shown(admin_url, token)["B"]["state"] == "accepting"
    assert redis.cli("EXISTS", "shellserver:drain:B") == "0"


def test_redis_down_shows_this_node_only(cluster):
    """With Redis killed, A's page shows A alone and says Redis is down;
    pause answers 503; once Redis is back, B is shown again."""
    redis, nodes, admin_url, token = cluster
    redis.kill()
    try:
        assert wait_until(lambda: sorted(shown(admin_url, token)) == ["A"], timeout=15)
        status, answer = admin(admin_url, token)
        assert "Redis is down" in answer["notice"]
        status, answer = admin(admin_url, token, "pause")
        assert status == 503 and "Redis is down" in answer["error"], answer
        assert request(nodes["A"], "/status")[0] == 200
    finally:
        redis.start()
    assert wait_until(lambda: sorted(shown(admin_url, token)) == ["A", "B"], timeout=30)
    assert admin(admin_url, token)[1]["notice"] is None
