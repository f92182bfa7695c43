"""The fork server on a real server: forked consoles, and a template that dies."""

from __future__ import annotations

import os
import re
import signal

import pytest
from conftest import (
    parent_of,
    processes_of_uids,
    sandbox_inits,
    sandbox_ipythons,
    sandbox_leftovers,
    start_server,
    wait_until,
)
from console_client import ConsoleClient

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def forking(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("forking"), uid_min=252200, uid_max=252219,
                       config="fork_server = true\n")
    yield srv
    srv.stop()
    assert sandbox_leftovers(srv) == []
    # The template stays its launchers' parent until they have ended.
    assert wait_until(lambda: not template_pids(srv), timeout=15), "the template stayed"


def template_pids(server) -> list[int]:
    """Host pids of this server's templates (the runtime Python on its socket)."""
    socket_path = str(server.state_dir / "forkserver.sock").encode()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = open(f"/proc/{entry}/cmdline", "rb").read()
            except FileNotFoundError:
                continue
            if b"forkserver.py" in cmdline and socket_path in cmdline:
                if parent_of(int(entry)) == server.process.pid:
                    found.append(int(entry))
    return found


def ready_template(server) -> int:
    """The pid of the template the log last called ready."""
    return int(re.findall(r"fork server template ready \(pid (\d+)\)", server.log())[-1])


def open_console(server) -> tuple[ConsoleClient, int]:
    client = ConsoleClient(server)
    client.login()
    assert client.wait_for_prompt(1, timeout=20), client.display()
    output = client.run("print('UID', __import__('os').getuid())", 2)
    return client, int(re.search(r"UID (\d+)", output).group(1))


def test_console_is_a_fork_of_the_template(forking):
    """A console's IPython is a fork (no exec) under a launcher forked by the template."""
    client, uid = open_console(forking)
    try:
        (init,) = sandbox_inits(uid)
        (ipython,) = sandbox_ipythons(uid)
        assert b"forkserver.py" in open(f"/proc/{ipython}/cmdline", "rb").read()
        launcher = parent_of(init)
        assert parent_of(launcher) == ready_template(forking)
        assert "42" in client.run("6*7", 3)
        # As a console exec'd on its terminal: prompt_toolkit, not the plain
        # prompt (IPython decides that at import, in the template).
        assert "SIMPLE False" in client.run("print('SIMPLE', get_ipython().simple_prompt)", 4)
    finally:
        client.close()
    assert wait_until(lambda: not processes_of_uids(uid, uid), timeout=15)


def test_prebuilt_shell_keeps_nothing_between_consoles(forking):
    """Consoles start from the template's prebuilt IPython, each bound to its own
    home and history, and what one console does to its shell the next never sees."""
    assert "not prebuilt" not in forking.log()
    first, _ = open_console(forking)
    try:
        first.run("leak = 'L' * 3; get_ipython().run_line_magic('alias', 'leaky echo hi')", 3)
        first.run("get_ipython().separate_in = 'XX'", 4)
    finally:
        first.close()
    second, _ = open_console(forking)
    try:
        output = second.run("print('SEEN', 'leak' in globals(), "
                            "get_ipython().alias_manager.is_alias('leaky'), "
                            "repr(get_ipython().separate_in))", 3)
        assert "SEEN False False '\\n'" in output, output
        output = second.run("print('HOME', get_ipython().profile_dir.location, _dh[0])", 4)
        assert "HOME /home/console/.ipython/profile_default /home/console" in output, output
        output = second.run("print('HIST', len(get_ipython().history_manager.input_hist_raw))",
                            5)
        # Its own inputs only: IPython's empty first entry and the four lines
        # typed here (this one stored before it runs).
        assert "HIST 5" in output, output
    finally:
        second.close()


def test_template_death_spares_running_consoles(forking):
    """Killing the template leaves a running console working and its end noticed;
    the template is restarted and new consoles are forked by the new one."""
    before, uid_before = open_console(forking)
    template = ready_template(forking)
    os.kill(template, signal.SIGKILL)
    assert wait_until(lambda: forking.log().count("fork server template ready") >= 2
                      and ready_template(forking) != template, timeout=30), forking.log()
    assert "42" in before.run("6*7", 3)
    after, uid_after = open_console(forking)
    (init,) = sandbox_inits(uid_after)
    assert parent_of(parent_of(init)) == ready_template(forking)
    # The orphaned launcher's exit still reaches the server: the console ends
    # with its message and everything of it goes.
    before.type("exit\r")
    assert before.wait_closed(timeout=15), before.display()
    assert wait_until(lambda: not processes_of_uids(uid_before, uid_before), timeout=15)
    assert wait_until(lambda: f"uid {uid_before}) ended" in forking.log(), timeout=15)
    after.close()
    assert wait_until(lambda: not processes_of_uids(uid_after, uid_after), timeout=15)


def test_orphaned_launcher_is_reaped(forking):
    """A launcher orphaned by its template's death is adopted by the server and
    reaped when its console ends: no zombie is left (PID 1 here never reaps)."""
    client, uid = open_console(forking)
    (init,) = sandbox_inits(uid)
    launcher = parent_of(init)
    template = ready_template(forking)
    assert parent_of(launcher) == template
    os.kill(template, signal.SIGKILL)
    assert wait_until(lambda: ready_template(forking) != template, timeout=30), forking.log()
    assert parent_of(launcher) == forking.process.pid
    client.type("exit\r")
    assert client.wait_closed(timeout=15), client.display()
    assert wait_until(lambda: not os.path.exists(f"/proc/{launcher}"), timeout=15), \
        open(f"/proc/{launcher}/status").read()


@pytest.fixture(scope="module")
def classic(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("classic"), uid_min=252220, uid_max=252229,
                       config="fork_server = false\n")
    yield srv
    srv.stop()
    assert sandbox_leftovers(srv) == []


def test_classic_path_stays(classic):
    """With fork_server = false no template runs and IPython is exec'd as before."""
    client, uid = open_console(classic)
    try:
        assert template_pids(classic) == []
        (ipython,) = sandbox_ipythons(uid)
        assert b"-m\0IPython" in open(f"/proc/{ipython}/cmdline", "rb").read()
    finally:
        client.close()
    assert wait_until(lambda: not processes_of_uids(uid, uid), timeout=15)


STREAMS = ("import sys; print('STREAMS', *(f'{type(s.buffer).__name__}/{s.line_buffering}/"
           "{s.write_through}/{s.errors}' for s in (sys.stdin, sys.stdout, sys.stderr)))")


def console_streams(server) -> str:
    client, uid = open_console(server)
    try:
        output = client.run(STREAMS, 3)
    finally:
        client.close()
    assert wait_until(lambda: not processes_of_uids(uid, uid), timeout=15)
    return re.search(r"STREAMS ([^\r\n]+)", output).group(1)


def test_forked_console_streams_are_the_classic_ones(forking, classic):
    """A forked console's standard streams are those `python -I` makes on a terminal
    (buffered, line-buffered: a print is one write), as an exec'd console's are."""
    forked = console_streams(forking)
    assert forked == console_streams(classic)
    assert forked.startswith("BufferedReader/True/False")
    assert "BufferedWriter/True/False/surrogateescape" in forked
