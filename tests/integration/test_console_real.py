"""End to end on real parts: twistd, TLS, SockJS websocket, sandboxed IPython.

Each test opens consoles on the shared real server and reads what a user
would see through a pyte screen, or the raw output stream.
"""

from __future__ import annotations

import os
import re
import time

import pytest
from conftest import (
    RUNTIME,
    parent_of,
    processes_of_uids,
    sandbox_inits,
    sandbox_leftovers,
    server_pipe_fds,
    session_cgroups,
    session_launcher,
    wait_until,
)
from console_client import ConsoleClient, fetch_token

from shellserver.sandbox.spec import waiter_path

pytestmark = pytest.mark.integration


def output_of(client: ConsoleClient) -> str:
    return "".join(client.raw_output)


@pytest.fixture
def console(server):
    client = ConsoleClient(server)
    client.login()
    assert client.wait_for_prompt(1, timeout=20), client.display()
    yield client
    client.close()


def ask(console: ConsoleClient, expression: str, prompt_after: int) -> str:
    """Evaluate an expression in the console; return the line printed after RES."""
    console.run(f"print('RES', {expression}, 'END')", prompt_after)
    text = output_of(console)
    start = text.rindex("RES ")
    return text[start + 4:text.index(" END", start)]


def test_print_six_times_seven(console):
    """print(6*7) in a real sandboxed IPython shows 42 on the screen."""
    screen = console.run("print(6*7)", 2)
    lines = screen.splitlines()
    at = next(i for i, line in enumerate(lines) if "print(6*7)" in line)
    assert lines[at + 1].strip() == "42"
    assert console.messages[0] == "sstarting"
    assert console.messages[1] == "sready"


def test_runs_as_session_uid_without_groups(console, server):
    """The console's uid is non-zero, in the configured range, with no groups."""
    console.run("import os", 2)
    uid, gid, groups = eval(ask(console, "(os.getuid(), os.getgid(), os.getgroups())",
                                3))
    assert uid != 0
    assert server.uid_min <= uid <= server.uid_max
    assert gid == uid
    assert groups == []


def test_cannot_read_shadow(console):
    """open('/etc/shadow') fails inside the sandbox."""
    console.run("import os", 2)
    result = ask(console, "(lambda: (open('/etc/shadow').read()[:5], 'READ'))() "
                 "if os.path.exists('/etc/shadow') else 'ABSENT'", 3)
    assert result == "ABSENT"
    assert os.path.exists("/etc/shadow"), "the host has /etc/shadow"


def test_root_is_the_sandbox_root(console):
    """/ shows only the sandbox's own root, not the host's."""
    listing = set(eval(ask(console, "sorted(__import__('os').listdir('/'))", 2)))
    assert {"usr", "proc", "dev", "tmp", "home", "etc"} <= listing
    host_only = set(os.listdir("/")) - listing
    assert {"root", "boot", "srv"} & set(os.listdir("/")) <= host_only
    assert "root" not in listing and "boot" not in listing


def test_state_dir_and_tls_key_invisible(console, server):
    """The server's state directory, secret and TLS key are not visible inside."""
    paths = [str(server.state_dir), str(server.state_dir / "secret"),
             server.cert, server.cert.replace("certificate.pem", "private-key.pem")]
    result = eval(ask(console, f"[__import__('os').path.exists(p) for p in {paths!r}]",
                      2))
    assert result == [False] * len(paths)
    assert all(os.path.exists(p) for p in paths), "the host has them"


def test_no_network(console, server):
    """A TCP connection to the server's own port fails: there is no network."""
    console.run("import socket", 2)
    result = ask(
        console,
        f"(lambda s: (s.settimeout(3), s.connect_ex(('127.0.0.1', {server.port}))))"
        "(socket.socket())[1]",
        3,
    )
    assert int(result) != 0
    interfaces = eval(ask(console, "[n for _, n in socket.if_nameindex()]", 4))
    assert interfaces == ["lo"]


def test_ctrl_c_interrupts_a_loop(console):
    """Ctrl-C stops `while True: pass` and gives the prompt back; the console lives."""
    console.type("while True: pass\r")
    time.sleep(0.5)
    console.type("\x03")
    assert console.wait_for_screen("KeyboardInterrupt", timeout=10), console.display()
    assert console.wait_for_prompt(2, timeout=10), console.display()
    assert ask(console, "6*7", 3) == "42"


def test_resize_reaches_the_terminal(console):
    """A resize message changes the size the console's terminal reports."""
    console.send("r123,41")
    time.sleep(0.2)
    size = ask(console, "tuple(__import__('os').get_terminal_size())", 2)
    assert size == "(123, 41)"


def holders_of(inode: tuple[int, int], pids: list[int]) -> list[int]:
    """Which of ``pids`` have a descriptor open on the file ``inode`` (dev, ino)."""
    holders = []
    for pid in pids:
        for name in os.listdir(f"/proc/{pid}/fd"):
            try:
                st = os.stat(f"/proc/{pid}/fd/{name}")
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == inode:
                holders.append(pid)
    return holders


def test_console_terminal_and_terminals(console, server):
    """The handoff socket is unlinked at once; the console's PTY master (of the
    sandbox's own devpts) is held by the server alone, not by init or the
    console; the console holds nothing of the server's PTY."""
    uid = int(ask(console, "__import__('os').getuid()", 2))
    assert list((server.state_dir / "pipes").iterdir()) == []
    pids = processes_of_uids(uid, uid)
    inits = sandbox_inits(uid)
    consoles = [pid for pid in pids if pid not in inits]
    assert len(inits) == 1 and consoles, pids
    # The console's terminal: its devpts is the one of the console's stdout.
    console_devpts = os.stat(f"/proc/{consoles[0]}/fd/1").st_dev
    masters = []
    for fd, _ in server_pipe_fds(server):
        st = os.stat(f"/proc/{server.process.pid}/fd/{fd}")
        if st.st_dev == console_devpts:
            masters.append((st.st_dev, st.st_ino))
    (master,) = masters
    assert holders_of(master, pids) == []
    # The launcher's PTY (the server's) is init's fd 0; no console process has it.
    st = os.stat(f"/proc/{inits[0]}/fd/0")
    assert holders_of((st.st_dev, st.st_ino), consoles) == []
    tty = ask(console, "__import__('os').ttyname(1)", 3)
    assert tty == "/dev/pts/0"


def test_running_sandbox_waits_without_python(console, server):
    """Once the console runs, its init and its root launcher are the runtime's
    waiter (waiter.c), not Python: one interpreter per running sandbox."""
    uid = int(ask(console, "__import__('os').getuid()", 2))
    (init,) = sandbox_inits(uid)
    launcher = parent_of(init)
    assert launcher is not None
    waiter = waiter_path(RUNTIME)
    assert os.readlink(f"/proc/{launcher}/exe") == waiter
    # Init ran it inside the sandbox's root, where the runtime is bound.
    assert os.readlink(f"/proc/{init}/exe") == f"{server.state_dir}/sandbox-root{waiter}"
    # The console's status still comes back through both: _exit(7) ends the
    # session with the console's own code in the server's log.
    console.type("__import__('os')._exit(7)\r")
    deadline = time.monotonic() + 20
    while not console.closed and time.monotonic() < deadline:
        console.pump(0.1)
    assert console.closed, console.display()
    ended = re.compile(rf"\(uid {uid}\) ended: status 7,")
    assert wait_until(lambda: ended.search(server.log()), 10), server.log()[-2000:]


def test_last_output_arrives_before_the_exit(server):
    """What the console prints just before it exits arrives whole, then the close."""
    client = ConsoleClient(server)
    client.login()
    assert client.wait_for_prompt(1, timeout=20)
    client.send("k0")  # acknowledging: the output is paused above the high watermark
    client.type("print('z' * 600000 + 'END'); exit()\r")
    deadline = time.monotonic() + 30
    while not client.closed and time.monotonic() < deadline:
        client.send(f"k{sum(len(chunk) for chunk in client.raw_output)}")
        client.pump(0.1)
    assert client.closed
    text = output_of(client).replace("\r\n", "")
    assert "z" * 600000 + "END" in text
    assert client.last_message("x") == "The console has exited."


def test_keys_typed_before_the_prompt_are_kept(server):
    """Keystrokes sent while the sandbox is still being built reach IPython
    once it is up and run once. They are echoed as type-ahead by the console's
    terminal, as on any terminal, and not also by the server's PTY."""
    client = ConsoleClient(server)
    client.login()
    client.type("print(6*7)\r")
    assert client.wait_for_prompt(2, timeout=20), client.display()
    lines = [line.strip() for line in client.display().splitlines()]
    assert lines.count("42") == 1, client.display()
    assert "In [1]: print(6*7)" in lines, client.display()
    assert sum("print(6*7)" in line for line in lines) <= 2, client.display()
    client.close()


def test_start_up_heap_is_frozen(console):
    """IPython's start-up objects are frozen out of the collector (no full
    collection walks them), and the freeze leaves no name behind."""
    frozen = int(ask(console, "__import__('gc').get_freeze_count()", 2))
    assert frozen > 10000
    assert ask(console, "'gc' in dir()", 3) == "False"


def test_utf8_output_intact(console):
    """Large multi-byte output arrives without a corrupted character."""
    console.run("print('S' + '☃é€😀' * 3000 + 'E')", 2, timeout=20)
    text = output_of(console)
    assert "S" + "☃é€😀" * 3000 + "E" in text.replace("\r\n", "")
    assert "\ufffd" not in text


def test_exit_ends_the_console_with_a_message(server):
    """`exit` ends the console: the browser gets an exit message and a close."""
    client = ConsoleClient(server)
    client.login()
    assert client.wait_for_prompt(1, timeout=20)
    client.type("exit\r")
    assert client.wait_closed(timeout=15)
    assert client.last_message("x") == "The console has exited."


def test_closing_releases_everything(server):
    """Closing the connection kills the sandbox: no processes, cgroups remain."""
    client = ConsoleClient(server)
    client.login()
    assert client.wait_for_prompt(1, timeout=20)
    uid = int(ask(client, "__import__('os').getuid()", 2))
    assert processes_of_uids(uid, uid)
    client.close()
    assert wait_until(lambda: not processes_of_uids(uid, uid), timeout=15)
    assert wait_until(lambda: not session_cgroups(server), timeout=15)


SCHED_OTHER, SCHED_IDLE = 0, 5


def scheduling_policy(pid: int) -> int | None:
    """A process's scheduling policy (field 41 of /proc/<pid>/stat), None once gone."""
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except FileNotFoundError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[38])


def test_an_ending_sandbox_runs_on_spare_cpu_only(server):
    """Once its tab has gone, a sandbox's launcher drops to SCHED_IDLE for the
    rest of the teardown: it no longer competes with consoles in use."""
    client = ConsoleClient(server)
    client.login()
    assert client.wait_for_prompt(1, timeout=20)
    session = re.findall(r"console (s[0-9a-f]+) started", server.log())[-1]
    launcher = find_launcher(session)
    assert scheduling_policy(launcher) == SCHED_OTHER
    # A child cgroup keeps the session's cgroup from being removed, so the
    # launcher stays in its teardown long enough to be seen there.
    group = next(path for path in session_cgroups(server) if session in path)
    hold = os.path.join(group, "hold")
    os.mkdir(hold)
    try:
        client.close()
        assert wait_until(lambda: scheduling_policy(launcher) in (SCHED_IDLE, None),
                          timeout=10)
        assert scheduling_policy(launcher) == SCHED_IDLE
    finally:
        os.rmdir(hold)
    assert wait_until(lambda: scheduling_policy(launcher) is None, timeout=10)
    assert wait_until(lambda: not any(session in path for path in session_cgroups(server)),
                      timeout=15)


def find_launcher(session: str) -> int:
    return session_launcher(session)


def test_twenty_consoles_leave_nothing_behind(server):
    """20 consoles opened and closed in a row leave no processes, cgroups, mounts."""
    for _ in range(20):
        client = ConsoleClient(server)
        client.login()
        assert client.wait_for_prompt(1, timeout=20), client.display()
        client.close()
    assert wait_until(lambda: sandbox_leftovers(server) == [], timeout=30), \
        sandbox_leftovers(server)


def test_bad_tokens_start_no_process(server):
    """Forged, replayed, malformed and missing tokens start no sandbox."""
    before = len(server.log().splitlines())
    good = fetch_token(server)
    forged = good[:-4] + ("AAAA" if not good.endswith("AAAA") else "BBBB")
    for token, reason in [(forged, "invalid signature"), ("not-a-token", "malformed"),
                          ("", "malformed")]:
        client = ConsoleClient(server)
        client.login(token)
        assert client.wait_closed(timeout=10)
        assert reason in (client.last_message("e") or ""), client.messages
        assert not processes_of_uids(server.uid_min, server.uid_max)
    # A token redeemed once cannot be replayed.
    first = ConsoleClient(server)
    first.login(good)
    assert first.wait_for_prompt(1, timeout=20)
    replay = ConsoleClient(server)
    replay.login(good)
    assert replay.wait_closed(timeout=10)
    assert "already used" in (replay.last_message("e") or "")
    first.close()
    started = [line for line in server.log().splitlines()[before:]
               if "started as uid" in line]
    assert len(started) == 1, started


def test_token_must_come_in_time(server):
    """A connection that sends no token is closed after the auth timeout."""
    client = ConsoleClient(server)
    assert client.wait_closed(timeout=15)
    assert "in time" in (client.last_message("e") or "")


def test_wrong_origin_refused(server):
    """A token used from a page on another origin is refused."""
    client = ConsoleClient(server, origin="https://evil.example")
    client.login()
    assert client.wait_closed(timeout=10)
    assert "another origin" in (client.last_message("e") or "")


def test_tls_with_alpn(server):
    """A browser-like TLS hello offering ALPN (h2, http/1.1) gets http/1.1."""
    import socket

    context = server.ssl_context()
    context.set_alpn_protocols(["h2", "http/1.1"])
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            assert tls.selected_alpn_protocol() == "http/1.1"
            tls.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            assert tls.recv(64).startswith(b"HTTP/1.1 200")
