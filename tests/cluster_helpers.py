"""A real cluster for tests: Debian's `redis-server` and several real nodes.

`RedisServer` runs its own `redis-server` (a password, no persistence) in a
temporary directory, on a loopback port, a unix socket, or a TLS port, and
can be SIGKILLed and started again on the same address. `ClusterNode` is a
real `twistd shellserver` started by `conftest.start_server` with a
`[cluster]` section pointing at that Redis, its own port (its public URL),
state directory and uid range, and the secret file every node shares; it can
be SIGKILLed and restarted on the same port. `leftover_processes` is what a
teardown checks: no `redis-server` and no `twistd` of ours is left.
"""

from __future__ import annotations

import base64
import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import attrs
from conftest import REPO, RunningServer, free_port, start_server, wait_until

REDIS_SERVER = "/usr/bin/redis-server"
REDIS_CLI = "/usr/bin/redis-cli"
PASSWORD = "cluster-test-password"
SOCKJS_URL = re.compile(r'<meta name="shellserver-sockjs-url" content="([^"]*)"')
# Fast membership for tests: a node is gone 2 s after its last heartbeat.
HEARTBEAT = 0.5
NODE_TTL = 2.0


@attrs.define
class RedisServer:
    """A `redis-server` of the test's own, with a password and no persistence."""

    directory: Path
    port: int = 0  # 0: no TCP port
    unix_socket: Path | None = None
    tls: bool = False  # the port speaks TLS (rediss://)
    password: str = PASSWORD
    process: subprocess.Popen | None = None

    @property
    def cert(self) -> str:
        return str(self.directory / "tls" / "certificate.pem")

    @property
    def url(self) -> str:
        """The `redis_url` nodes use to reach it."""
        if self.port:
            scheme = "rediss" if self.tls else "redis"
            return f"{scheme}://:{self.password}@127.0.0.1:{self.port}/0"
        return f"unix://{self.unix_socket}?db=0&password={self.password}"

    def start(self) -> None:
        """Start it (again, on the same address) and wait until it answers."""
        args = [REDIS_SERVER, "--bind", "127.0.0.1", "--dir", str(self.directory),
                "--save", "", "--appendonly", "no", "--daemonize", "no",
                "--requirepass", self.password,
                "--logfile", str(self.directory / "redis.log")]
        if self.tls:
            from shellserver.tls import ensure_self_signed

            cert, key = ensure_self_signed(str(self.directory / "tls"))
            assert cert == self.cert, cert
            args += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", cert,
                     "--tls-key-file", key, "--tls-ca-cert-file", cert,
                     "--tls-auth-clients", "no"]
        else:
            args += ["--port", str(self.port)]
        if self.unix_socket is not None:
            args += ["--unixsocket", str(self.unix_socket), "--unixsocketperm", "700"]
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        if not wait_until(lambda: self.process.poll() is not None or self.answers(),
                          timeout=15, interval=0.05) or self.process.poll() is not None:
            log = (self.directory / "redis.log").read_text(errors="replace")
            self.kill()
            raise RuntimeError(f"redis-server did not start:\n{log}")

    def answers(self) -> bool:
        try:
            return self.cli("PING") == "PONG"
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
            return False

    def cli(self, *args: str) -> str:
        """One redis-cli command; its output, stripped."""
        where = (["-s", str(self.unix_socket)] if not self.port
                 else ["-h", "127.0.0.1", "-p", str(self.port)])
        if self.tls:
            where += ["--tls", "--cacert", self.cert]
        done = subprocess.run([REDIS_CLI, *where, "-a", self.password, "--no-auth-warning",
                               *args], capture_output=True, text=True, timeout=10,
                              check=True)
        return done.stdout.strip()

    def keys(self, pattern: str = "*") -> list[str]:
        return sorted(line for line in self.cli("--scan", "--pattern", pattern).splitlines()
                      if line)

    def kill(self) -> None:
        """SIGKILL, as a crash or an OOM kill would."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


def start_redis(directory: Path, *, unix: bool = False, tls: bool = False) -> RedisServer:
    """A running Redis in ``directory``: on a loopback port, or only on a
    unix socket (``unix``), with TLS on its port (``tls``)."""
    directory.mkdir(parents=True, exist_ok=True)
    redis = RedisServer(directory, port=0 if unix else free_port(),
                        unix_socket=directory / "redis.sock" if unix else None, tls=tls)
    redis.start()
    return redis


@attrs.define
class ClusterNode:
    """A real node of a cluster, restartable on the same port and state."""

    name: str
    directory: Path
    port: int
    uid_min: int
    uid_max: int
    cluster: str  # its [cluster] lines
    options: dict  # the rest of start_server's arguments
    server: RunningServer | None = None

    @property
    def public_url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.directory / "shellserver.toml"

    @property
    def kill_switch(self) -> Path:
        """The node's own kill-switch file (the state directory's default)."""
        return self.directory / "state" / "kill-switch"

    def start(self) -> RunningServer:
        self.server = start_server(self.directory, uid_min=self.uid_min, uid_max=self.uid_max,
                                   port=self.port, cluster=self.cluster, **self.options)
        return self.server

    def kill(self) -> None:
        """SIGKILL the node (its sandboxes die with their PTYs)."""
        self.server.process.send_signal(signal.SIGKILL)
        self.server.process.wait(timeout=10)

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()

    def running(self) -> bool:
        return self.server is not None and self.server.process.poll() is None

    def status(self, headers: dict | None = None) -> dict:
        return json.load(self.server.get("/status", headers))

    def live_nodes(self) -> list[str]:
        """The node names this node's /status lists (live members)."""
        return sorted(node["name"] for node in self.status()["cluster"]["nodes"])


def start_node(directory: Path, name: str, redis: RedisServer, secret_file: Path, *,
               uid_min: int, uid_max: int, cluster: str = "", heartbeat: float = HEARTBEAT,
               node_ttl: float = NODE_TTL, **options) -> ClusterNode:
    """A started node named ``name`` on ``redis``; ``cluster`` adds [cluster]
    lines; ``options`` go to `start_server` (admission, server, ...)."""
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    lines = (f'redis_url = "{redis.url}"\nnode_name = "{name}"\n'
             f'public_url = "https://127.0.0.1:{port}"\nsecret_file = "{secret_file}"\n'
             f"heartbeat_interval = {heartbeat}\nnode_ttl = {node_ttl}\n")
    if redis.tls:
        lines += f'redis_ca_file = "{redis.cert}"\n'
    node = ClusterNode(name, directory, port, uid_min, uid_max, lines + cluster, options)
    node.start()
    return node


def ctl(config: Path, *args: str) -> subprocess.CompletedProcess:
    """`shellserver-ctl --config CONFIG ARGS`, as an operator runs it."""
    return subprocess.run([sys.executable, "-m", "shellserver.ctl", "--config",
                           str(config), *args], capture_output=True, text=True,
                          timeout=30, cwd=str(REPO))


def request(node: ClusterNode, path: str, source: str | None = None,
            headers: dict | None = None) -> tuple[int, str]:
    """GET ``path`` on ``node`` from the local address ``source``: (status, body)."""
    import http.client

    connection = http.client.HTTPSConnection(
        "127.0.0.1", node.port, timeout=10, context=node.server.ssl_context(),
        source_address=(source, 0) if source else None)
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read().decode("utf-8", "replace")
    finally:
        connection.close()


def console_page(node: ClusterNode, source: str | None = None,
                 headers: dict | None = None) -> tuple[int, str]:
    """GET /console/ on ``node`` as ``source``: (status, body)."""
    return request(node, "/console/", source, headers)


def accepting_for(node: ClusterNode, source: str) -> bool:
    """Whether ``node``'s /status says the cluster accepts ``source``."""
    status, body = request(node, "/status", source)
    return status == 200 and json.loads(body)["accepting"] is True


def token_claims(token: str) -> dict:
    """The claims of a console token (``v1.<payload>.<signature>``)."""
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def sockjs_url(page: str) -> str:
    match = SOCKJS_URL.search(page)
    assert match, page[:300]
    return match.group(1)


def leftover_processes(pids: list[int]) -> list[str]:
    """Which of ``pids`` (the redis-servers and twistds a test started) still
    run, as ``pgrep`` sees them: what a teardown must not leave."""
    done = subprocess.run(["pgrep", "-af", "redis-server|twistd"], capture_output=True,
                          text=True)
    return [line for line in done.stdout.splitlines()
            if line.split()[0].isdigit() and int(line.split()[0]) in pids]
