"""Two real cluster nodes and a real Redis (Debian's redis-server on loopback):
single-use tokens, per-address limits across nodes, and Redis going away
and coming back. The three-node matrix and the browser are in other modules.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest
from conftest import free_port, sandbox_leftovers, start_server, wait_until
from console_client import ConsoleClient

pytestmark = pytest.mark.integration

REDIS = shutil.which("redis-server") or "/usr/bin/redis-server"
SOCKJS_URL = re.compile(r'<meta name="shellserver-sockjs-url" content="([^"]*)"')
TOKEN = re.compile(r'<meta name="shellserver-token" content="([^"]*)"')
UIDS = {"a": 243000, "b": 243200}


class RedisServer:
    """A redis-server of our own on a loopback port, no persistence."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [REDIS, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.directory)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        wait_until(self.answers, timeout=10)

    def answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


@pytest.fixture
def redis(tmp_path):
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.kill()


def start_node(tmp: Path, name: str, redis_url: str, secret: Path, *,
               admission: str = "", port: int | None = None):
    port = port or free_port()
    cluster = "\n".join([
        f'redis_url = "{redis_url}"',
        f'node_name = "{name}"',
        f'public_url = "https://127.0.0.1:{port}"',
        f'secret_file = "{secret}"',
        "heartbeat_interval = 0.2",
        "node_ttl = 1.0",
        "redis_timeout = 0.5",
    ])
    (tmp / name).mkdir(exist_ok=True)
    return start_server(tmp / name, uid_min=UIDS[name], uid_max=UIDS[name] + 199,
                        cluster=cluster, port=port,
                        admission=admission or "capacity = 4\nper_address = 100\n"
                        "per_address_per_minute = 10000\npages_per_address_per_minute = 0\n")


def status(node) -> dict:
    return json.loads(node.get("/status").read())


def page(node) -> tuple[str, str]:
    """The console page's token and SockJS URL."""
    text = node.get("/console/").read().decode()
    return TOKEN.search(text).group(1), SOCKJS_URL.search(text).group(1)


def sees(node, names: set[str]) -> bool:
    body = status(node)
    return {n["name"] for n in body["cluster"]["nodes"]} == names


@pytest.fixture
def cluster(tmp_path, redis):
    secret = tmp_path / "secret"
    nodes = {}
    try:
        for name in ("a", "b"):
            nodes[name] = start_node(tmp_path, name, redis.url, secret)
        wait_until(lambda: all(sees(node, {"a", "b"}) for node in nodes.values()), timeout=10)
        yield nodes, tmp_path, secret
    finally:
        for node in nodes.values():
            node.stop()
        for node in nodes.values():
            assert sandbox_leftovers(node) == []


def login(node, token: str, origin: str) -> ConsoleClient:
    client = ConsoleClient(node, origin=origin)
    client.login(token)
    return client


def test_token_single_use_across_restart_and_nodes(cluster, redis):
    """A token used on its node is refused on the other node and, through
    Redis, on its node restarted without its own used-tokens file."""
    nodes, tmp, secret = cluster
    a, b = nodes["a"], nodes["b"]
    token, sockjs = page(b)
    assert sockjs == f"https://127.0.0.1:{b.port}/sockjs"
    client = login(b, token, b.origin)
    assert client.wait_for_prompt(1), client.display()
    client.close()
    other = login(a, token, b.origin)
    assert other.wait_closed()
    assert "another node" in (other.last_message("e") or "")
    b.stop()
    # A fresh state directory: only Redis remembers the token now.
    os.remove(b.state_dir / "used-tokens")
    nodes["b"] = b = start_node(tmp, "b", redis.url, secret, port=b.port)
    again = login(b, token, b.origin)
    assert again.wait_closed()
    assert "already used" in (again.last_message("e") or "")


def test_per_address_limit_across_nodes(tmp_path, redis):
    """With per_address = 1, a console on node a makes node b refuse the
    same address a second one: b's /status and page say rate-limited, and a
    token b minted before is refused on b."""
    secret = tmp_path / "secret"
    limits = ("capacity = 4\nper_address = 1\nper_address_per_minute = 10000\n"
              "pages_per_address_per_minute = 0\n")
    a = start_node(tmp_path, "a", redis.url, secret, admission=limits)
    b = start_node(tmp_path, "b", redis.url, secret, admission=limits)
    try:
        wait_until(lambda: sees(a, {"a", "b"}) and sees(b, {"a", "b"}), timeout=10)
        token, _ = page(a)
        early, sockjs = page(b)  # before a has a console: an idle b places on itself
        first = login(a, token, a.origin)
        assert first.wait_for_prompt(1), first.display()
        body = status(b)
        assert (body["accepting"], body["reason"]) == (False, "rate-limited"), body
        with pytest.raises(urllib.error.HTTPError) as refused:
            page(b)
        assert refused.value.code == 429
        assert sockjs == f"https://127.0.0.1:{b.port}/sockjs"
        second = login(b, early, b.origin)
        assert second.wait_closed()
        assert "too many consoles" in (second.last_message("e") or ""), second.messages
        first.close()
        # b's view of a's release comes through Redis (a's own active is a's).
        assert wait_until(lambda: status(b)["accepting"], timeout=10), status(b)
        token, _ = page(b)
        third = login(b, token, b.origin)
        assert third.wait_for_prompt(1), third.display()
        third.close()
    finally:
        a.stop()
        b.stop()


def test_redis_down_then_back(cluster, redis):
    """Redis killed: each node goes on alone (consoles start, /status says
    down, one warning); Redis back: both rejoin by themselves."""
    nodes, _, _ = cluster
    a = nodes["a"]
    redis.kill()
    wait_until(lambda: status(a)["cluster"]["redis"] == "down", timeout=10)
    body = status(a)
    assert body["accepting"] is True
    assert [n["name"] for n in body["cluster"]["nodes"]] == ["a"]
    token, sockjs = page(a)
    assert sockjs == f"https://127.0.0.1:{a.port}/sockjs"
    client = login(a, token, a.origin)
    assert client.wait_for_prompt(1), client.display()
    assert a.log().count("Redis unreachable") == 1
    redis.start()
    wait_until(lambda: all(sees(node, {"a", "b"}) for node in nodes.values()), timeout=20)
    assert status(a)["cluster"]["redis"] == "up"
    assert "Redis reachable" in a.log()
    assert a.log().count("Redis unreachable") == 1
    client.close()


def ctl(node_dir: Path, *command: str) -> subprocess.CompletedProcess:
    """shellserver-ctl against a node's configuration file."""
    return subprocess.run(
        [sys.executable, "-m", "shellserver.ctl", "--config",
         str(node_dir / "shellserver.toml"), *command],
        capture_output=True, text=True, timeout=30)


def test_kill_switch_and_drain_across_nodes(cluster):
    """shellserver-ctl pause stops admission on every node, terminate ends
    every node's consoles, and drain keeps placement off the drained node."""
    nodes, tmp, _ = cluster
    a, b = nodes["a"], nodes["b"]
    token, _ = page(b)
    on_b = login(b, token, b.origin)
    assert on_b.wait_for_prompt(1), on_b.display()
    done = ctl(tmp / "a", "pause")
    assert done.returncode == 0, done.stderr
    assert "pause" in done.stdout
    wait_until(lambda: status(a)["reason"] == "switched-off", timeout=10)
    wait_until(lambda: status(b)["reason"] == "switched-off", timeout=10)
    assert on_b.run("1 + 1", 2)  # paused: running consoles go on
    assert ctl(tmp / "a", "terminate").returncode == 0
    assert on_b.wait_closed()
    assert "operator" in (on_b.last_message("x") or on_b.last_message("e") or "")
    assert ctl(tmp / "b", "resume").returncode == 0
    wait_until(lambda: status(a)["accepting"] and status(b)["accepting"], timeout=10)
    drained = ctl(tmp / "a", "drain", "a")
    assert drained.returncode == 0, drained.stderr
    wait_until(lambda: all(any(n["name"] == "a" and n["draining"]
                               for n in status(node)["cluster"]["nodes"])
                           for node in (a, b)), timeout=10)
    for _ in range(3):
        _, sockjs = page(a)
        assert sockjs == f"https://127.0.0.1:{b.port}/sockjs"
    assert ctl(tmp / "a", "undrain", "a").returncode == 0
    wait_until(lambda: page(a)[1] == f"https://127.0.0.1:{a.port}/sockjs", timeout=10)
    listed = ctl(tmp / "b", "status")
    assert listed.returncode == 0 and "a  https://127.0.0.1" in listed.stdout, listed.stdout
    unknown = ctl(tmp / "b", "drain", "nobody")
    assert unknown.returncode == 0 and "no live node" in unknown.stderr


def test_redis_frozen_is_down_without_blocking(cluster, redis):
    """Redis frozen (SIGSTOP): calls time out, the node says "down" and keeps
    answering pages and /status; thawed (SIGCONT), it is up again by itself."""
    nodes, _, _ = cluster
    a = nodes["a"]
    os.kill(redis.process.pid, signal.SIGSTOP)
    try:
        wait_until(lambda: status(a)["cluster"]["redis"] == "down", timeout=10)
        token, sockjs = page(a)
        assert sockjs == f"https://127.0.0.1:{a.port}/sockjs"
        client = login(a, token, a.origin)
        assert client.wait_for_prompt(1), client.display()
        client.close()
    finally:
        os.kill(redis.process.pid, signal.SIGCONT)
    wait_until(lambda: all(sees(node, {"a", "b"}) for node in nodes.values()), timeout=20)
    assert status(a)["cluster"]["redis"] == "up"
    assert a.log().count("Redis unreachable") == 1
