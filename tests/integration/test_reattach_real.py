"""Reattach on real parts: a real server and sandboxes, connections cut under
the client or dropped by a loopback TCP proxy, and the output stream checked
to arrive exactly once (docs/protocol.md, "Reattach")."""

from __future__ import annotations

import hashlib
import re
import socket
import threading

import pytest
from conftest import (
    processes_of_uids,
    sandbox_leftovers,
    session_cgroups,
    start_server,
    wait_until,
)
from console_client import ConsoleClient

pytestmark = pytest.mark.integration

GRACE = 8
# The program floods its terminal with numbered lines, hashing what it writes:
# the hash it prints at the end must equal the hash of what the client got
# between BEGIN and HASH. One line, so that IPython runs it at once.
FLOOD = ("import hashlib, sys; h = hashlib.sha256(); print('BEGIN'); "
         "[(h.update(line.encode()), sys.stdout.write(line)) for line in "
         "(f'{i:07d} ' + 'xé€' * 20 + '\\n' for i in range({lines}))]; "
         "sys.stdout.flush(); print('HASH', h.hexdigest())\r")
STREAM = re.compile(r"BEGIN\r\n(.*?)HASH ([0-9a-f]{64})\r\n", re.S)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A server of its own (uids 247000-247099), consoles waiting GRACE seconds detached."""
    srv = start_server(tmp_path_factory.mktemp("reattach"), uid_min=247000, uid_max=247099,
                       console=f"reattach_grace = {GRACE}")
    yield srv
    srv.stop()
    assert sandbox_leftovers(srv) == []


class DroppingProxy:
    """A loopback TCP proxy in front of the server whose connections can be
    dropped all at once (as a NAT or a proxy timing out does), staying down
    (resetting new connections) until restored."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        # Down: a connection arriving after drop() (an xhr-streaming client
        # opens its next response mid-flood) is reset too, else it would
        # carry the session on and the server would never see it dropped.
        self.down = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self.lock:
                if self.down:
                    # Nothing was relayed yet: the server saw no request.
                    _reset(client)
                    _reset(upstream)
                    continue
                self.sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._relay, args=(source, sink), daemon=True).start()

    @staticmethod
    def _relay(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass

    def drop(self) -> None:
        """Reset every connection through the proxy, both sides, and every
        new one until `restore`."""
        with self.lock:
            self.down = True
            sockets, self.sockets = self.sockets, []
        for sock in sockets:
            _reset(sock)

    def restore(self) -> None:
        """Relay new connections again."""
        with self.lock:
            self.down = False

    def close(self) -> None:
        self.listener.close()
        self.drop()


def _reset(sock: socket.socket) -> None:
    """Close ``sock`` with a reset (no FIN): the peer sees it at once."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


def started(server, **options) -> ConsoleClient:
    client = ConsoleClient(server, acknowledge=True, **options)
    client.login()
    client.send("k0")
    assert client.wait_for_prompt(1, timeout=30), client.display()
    assert client.secret and client.grace
    return client


def output(client: ConsoleClient) -> str:
    return "".join(client.raw_output)


def detached_count(server) -> int:
    return server.log().count("detached: it waits")


def flood_cut_and_resume(server, client: ConsoleClient, cut, lines: int = 20000,
                         restore=lambda: None) -> None:
    """Start the flood, cut the connection mid-flood with ``cut``, reattach
    (after ``restore``), and check that the whole stream arrived exactly once."""
    detached = detached_count(server)
    client.type(FLOOD.replace("{lines}", str(lines)))
    assert client.wait_for(lambda c: c.written > 200_000, timeout=60)
    # Cut with some output written but not yet acknowledged (as the page's
    # acknowledgements lag its writes), and more in flight: without further
    # acknowledgements the flood cannot end before the cut.
    client.acknowledge = False
    assert client.wait_for(lambda c: c.written > c._acked, timeout=30)
    cut()
    client.closed = True
    # The server sees the connection go; the console waits, detached.
    assert wait_until(lambda: detached_count(server) > detached, timeout=GRACE)
    assert client.grace == GRACE
    restore()
    before = client.written
    client.acknowledge = True
    client.reconnect()
    assert client.wait_for(lambda c: "sresumed" in c.messages, timeout=10), client.messages[-3:]
    assert client.wait_for(lambda c: STREAM.search(output(c)), timeout=90), output(client)[-300:]
    match = STREAM.search(output(client))
    assert client.written > before
    stream = match.group(1).replace("\r\n", "\n")
    assert stream.count("\n") == lines
    assert hashlib.sha256(stream.encode()).hexdigest() == match.group(2)
    assert client.wait_for_prompt(2, timeout=30)
    assert client.run("print(6 * 7)", 3) and "42" in client.display()


@pytest.mark.parametrize("transport", ["websocket", "xhr_streaming"])
def test_socket_cut_mid_flood_resumes_exactly_once(server, transport):
    """Closing the socket under the client mid-flood, then reattaching, delivers the
    whole output stream exactly once (its SHA-256 as computed in the console)."""
    client = started(server, transport=transport)
    flood_cut_and_resume(server, client, client.wire.cut)
    client.close()


@pytest.mark.parametrize("transport", ["websocket", "xhr_streaming"])
def test_proxy_drop_mid_flood_resumes_exactly_once(server, transport):
    """A loopback proxy resetting its connections mid-flood loses nothing and repeats
    nothing once the client reattaches through it."""
    proxy = DroppingProxy(server.port)
    try:
        client = started(server, transport=transport, port=proxy.port)
        flood_cut_and_resume(server, client, proxy.drop, restore=proxy.restore)
        client.close()
    finally:
        proxy.close()


def test_detached_past_grace_ends_and_cleans_up(server):
    """A console left detached past its grace ends: its processes and cgroup are
    gone, and its secret is refused."""
    client = started(server)
    assert client.run("import os; print('UID', os.getuid())", 2)
    uid = int(re.search(r"UID (\d+)", client.display()).group(1))
    cgroups_before = set(session_cgroups(server))
    assert processes_of_uids(uid, uid)
    client.cut()
    assert wait_until(lambda: not processes_of_uids(uid, uid), timeout=GRACE + 20)
    assert wait_until(lambda: not set(session_cgroups(server)) & cgroups_before, timeout=20)
    client.reconnect()
    assert client.wait_closed(timeout=10)
    assert client.close_code == 4005, (client.close_code, client.close_reason)


def test_quit_then_close_never_detaches(server):
    """A console ended with ``q`` whose connection then closes never detaches, and
    its secret gets 4005 at once (issue 15)."""
    client = started(server)
    assert client.run("import os; print('UID', os.getuid())", 2)
    uid = int(re.search(r"UID (\d+)", client.display()).group(1))
    secret, seen = client.secret, len(server.log())
    # ``q``, then the close handshake: the server has read the ``q`` first.
    client.close()
    thief = ConsoleClient(server)
    thief.reconnect(secret=secret, count=0)
    assert thief.wait_closed(timeout=10)
    assert thief.close_code == 4005, (thief.close_code, thief.close_reason)
    assert "sresumed" not in thief.messages
    ended = re.compile(rf"console (\S+) \(uid {uid}\) ended")
    assert wait_until(lambda: ended.search(server.log()[seen:]), timeout=20)
    session = ended.search(server.log()[seen:]).group(1)
    assert f"console {session} detached" not in server.log()


def test_wrong_replayed_or_foreign_secret_refused_console_unaffected(server):
    """A wrong secret, a used one, and the right one from another origin get 4005,
    and the console goes on for its owner; no secret reaches the log."""
    client = started(server)
    used = client.secret
    client.cut()
    client.reconnect()
    assert client.wait_for(lambda c: c.secret != used, timeout=10)
    attempts = [{"secret": "A" * 43}, {"secret": used},
                {"secret": client.secret, "origin": "https://evil.example"}]
    for attempt in attempts:
        thief = ConsoleClient(server)
        thief.reconnect(count=0, **attempt)
        assert thief.wait_closed(timeout=10)
        assert thief.close_code == 4005, (attempt, thief.close_code, thief.close_reason)
        assert "resumed" not in thief.messages
    assert client.run("print(6 * 7)", 2) and "42" in client.display()
    assert client.close_code is None
    # Refusals are logged, secrets never.
    assert "reattach refused" in server.log()
    assert used not in server.log() and client.secret not in server.log()
    client.close()


def test_takeover_closes_the_older_connection(server):
    """A second attach takes the console: the first gets the notice and 4006."""
    first = started(server)
    second = ConsoleClient(server, acknowledge=True)
    second.reconnect(secret=first.secret, count=first.written)
    assert second.wait_for(lambda c: "sresumed" in c.messages, timeout=10)
    assert first.wait_closed(timeout=10)
    assert first.close_code == 4006
    assert "eThis console was opened in another window." in first.messages
    assert second.run("print(6 * 7)", 2) and "42" in second.display()
    second.close()



def test_idle_warning_and_its_withdrawal(tmp_path):
    """A real console warns before its idle ending (``w``), and a keystroke
    withdraws the warning (``c``)."""
    srv = start_server(tmp_path, uid_min=247100, uid_max=247109, console="idle_timeout = 6")
    try:
        client = started(srv)
        assert client.wait_for(lambda c: "widle,3" in c.messages, timeout=10), client.messages
        client.type("1")
        assert client.wait_for(lambda c: "cidle" in c.messages, timeout=10), client.messages
        client.close()
    finally:
        srv.stop()
    assert sandbox_leftovers(srv) == []


def test_shutdown_warning_counts_down(tmp_path):
    """When the server stops with a shutdown grace, consoles get the notice and
    ``wshutdown,SECONDS``, then end."""
    srv = start_server(tmp_path, uid_min=247200, uid_max=247209,
                       console="shutdown_grace = 3")
    try:
        client = started(srv)
        srv.process.terminate()
        assert client.wait_for(lambda c: "wshutdown,3" in c.messages, timeout=10), \
            client.messages
        assert client.last_message("n") and "shutting down" in client.last_message("n")
        assert client.wait_closed(timeout=20)
    finally:
        srv.stop()
    assert sandbox_leftovers(srv) == []
