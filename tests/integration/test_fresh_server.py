"""A server started with nothing prepared: it builds its runtime, and its
idle and maximum-age limits end consoles with a message."""

from __future__ import annotations

import os
import stat
import time

import pytest
from conftest import sandbox_leftovers, start_server, wait_until
from console_client import ConsoleClient

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def fresh_server(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("fresh"), uid_min=220000, uid_max=220009,
                       console="idle_timeout = 3\nmax_age = 8\n", runtime=None)
    yield srv
    srv.stop()
    assert sandbox_leftovers(srv) == []


def open_console(server, timeout: float = 240.0) -> ConsoleClient:
    """A console at its first prompt, retrying while the runtime is being built."""
    deadline = time.monotonic() + timeout
    while True:
        client = ConsoleClient(server)
        client.login()
        if client.wait_for_prompt(1, timeout=20):
            return client
        message = client.last_message("e") or ""
        client.close()
        assert "being built" in message, client.messages
        assert time.monotonic() < deadline, "the runtime was not built in time"
        time.sleep(2)


def test_builds_its_runtime_on_first_start(fresh_server):
    """With no runtime configured the server builds one, says so, then serves;
    the build compiled the runtime's waiter, executable but unreadable to
    others, and the console's launcher runs it."""
    client = open_console(fresh_server)
    runtime = fresh_server.state_dir / "runtime"
    waiter = runtime / "libexec" / "shellserver-waiter"
    assert stat.S_IMODE(waiter.stat().st_mode) == 0o711
    launchers = [pid for pid in pids_running(str(waiter))
                 if os.stat(f"/proc/{pid}").st_uid == 0]
    assert launchers, "no launcher runs the waiter"
    client.close()
    log = fresh_server.log()
    assert "building the console runtime into" in log
    assert "console runtime ready" in log
    assert (runtime / ".shellserver-runtime").exists()


def pids_running(program: str) -> list[int]:
    """Host pids whose executable is ``program``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.readlink(f"/proc/{entry}/exe") == program:
                    found.append(int(entry))
            except OSError:
                continue
    return found


def test_idle_console_is_ended(fresh_server):
    """A console without input for idle_timeout is ended with a message."""
    client = open_console(fresh_server)
    started = time.monotonic()
    assert client.wait_closed(timeout=15)
    assert time.monotonic() - started >= 1.5  # not at once: the timer started with the sandbox
    assert client.last_message("x") == "Console ended after 3 seconds without input."


def test_busy_console_ends_at_max_age(fresh_server):
    """A console in use is still ended at max_age, with a message."""
    client = open_console(fresh_server)
    started = time.monotonic()
    while not client.closed and time.monotonic() - started < 20:
        client.type("1\r")
        client.pump(1.0)
    assert client.closed
    assert client.last_message("x") == "Console ended: the 8 seconds time limit was reached."
    assert wait_until(lambda: sandbox_leftovers(fresh_server) == [], timeout=15)
