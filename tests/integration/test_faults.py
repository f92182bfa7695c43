"""Faults: a server killed with SIGKILL, a drained SIGTERM, sandboxes that cannot
start, and start-up problems that must be reported clearly."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest
from conftest import (
    RUNTIME,
    TWISTD,
    processes_of_uids,
    sandbox_leftovers,
    session_cgroups,
    start_server,
    wait_until,
)
from console_client import ConsoleClient

pytestmark = pytest.mark.integration


def open_consoles(server, count: int) -> list[ConsoleClient]:
    clients = []
    for _ in range(count):
        client = ConsoleClient(server)
        client.login()
        assert client.wait_for_prompt(1, timeout=20), client.display()
        clients.append(client)
    return clients


def children_of(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(child) for child in out.split()]


def launcher_pids(server) -> list[int]:
    """The server's root launchers: its children, or its fork server template's."""
    launchers = []
    for child in children_of(server.process.pid):
        with open(f"/proc/{child}/cmdline", "rb") as f:
            if b"forkserver.py" in f.read():
                launchers += children_of(child)
            else:
                launchers.append(child)
    return launchers


def test_sigkill_then_restart_leaves_nothing(tmp_path):
    """After SIGKILL of the server, its sandboxes go away, and a restart serves
    new consoles with nothing of the old run left."""
    server = start_server(tmp_path, uid_min=222000, uid_max=222009)
    try:
        clients = open_consoles(server, 2)
        old_sessions = session_cgroups(server)
        assert old_sessions
    finally:
        server.process.send_signal(signal.SIGKILL)
        server.process.wait(timeout=10)
    # The PTYs hang up: each launcher kills and removes its own sandbox.
    assert wait_until(lambda: not processes_of_uids(222000, 222009), timeout=15)
    assert wait_until(lambda: not any(os.path.exists(p) for p in old_sessions), timeout=15)
    for client in clients:
        client.close()
    restarted = start_server(tmp_path, uid_min=222000, uid_max=222009)
    try:
        (client,) = open_consoles(restarted, 1)
        assert client.run("print(6*7)", 2).count("42") >= 1
        client.close()
    finally:
        restarted.stop()
    assert sandbox_leftovers(restarted) == []


def test_sigkill_of_server_and_launchers_is_swept_at_start(tmp_path):
    """When the launchers die with the server (no cleanup at all), the next start
    sweeps their cgroups, and every sandbox process is gone."""
    server = start_server(tmp_path, uid_min=222010, uid_max=222019)
    try:
        clients = open_consoles(server, 2)
        old_sessions = session_cgroups(server)
        launchers = launcher_pids(server)
        assert len(launchers) == 2
    finally:
        for pid in [server.process.pid, *launcher_pids(server)]:
            os.kill(pid, signal.SIGKILL)
        server.process.wait(timeout=10)
    # Init had PR_SET_PDEATHSIG: the sandboxes die with their launchers.
    assert wait_until(lambda: not processes_of_uids(222010, 222019), timeout=15)
    assert any(os.path.exists(p) for p in old_sessions), "nothing left to sweep"
    for client in clients:
        client.close()
    # A server killed between binding a console's terminal handoff socket and
    # its launcher connecting to it leaves the socket: the next start removes it.
    stale = server.state_dir / "pipes" / "s0000000000000000"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as bound:
        bound.bind(str(stale))
    restarted = start_server(tmp_path, uid_min=222010, uid_max=222019)
    try:
        assert "removed" in restarted.log() and "cgroups a previous run left" in restarted.log()
        assert "removed 1 terminal handoff sockets a previous run left" in restarted.log()
        assert not stale.exists()
        assert not any(os.path.exists(p) for p in old_sessions)
        (client,) = open_consoles(restarted, 1)
        client.close()
    finally:
        restarted.stop()
    assert sandbox_leftovers(restarted) == []


def test_busy_uids_are_not_reused(tmp_path):
    """A uid that still owns a process at start-up is never handed out."""
    squatter = subprocess.Popen(["sleep", "60"], user=222020, group=222020)
    try:
        server = start_server(tmp_path, uid_min=222020, uid_max=222021)
        try:
            assert "uids still in use" in server.log()
            client = ConsoleClient(server)
            client.login()
            assert client.wait_for_prompt(1, timeout=20)
            client.run("print('UID', __import__('os').getuid())", 2)
            assert "UID 222021" in "".join(client.raw_output)
            client.close()
        finally:
            server.stop()
    finally:
        squatter.kill()
        squatter.wait()


def test_sigterm_drains(tmp_path):
    """SIGTERM tells running consoles, gives them the grace period, then ends them."""
    server = start_server(tmp_path, uid_min=222030, uid_max=222039,
                          console="shutdown_grace = 2\n")
    try:
        (client,) = open_consoles(server, 1)
    finally:
        server.process.send_signal(signal.SIGTERM)
    assert client.wait_for(lambda c: c.last_message("n") is not None, timeout=10)
    assert "shutting down" in client.last_message("n")
    assert client.wait_closed(timeout=15)
    assert client.last_message("x") == "The server has shut down."
    # twistd ends by re-raising the signal it stopped on.
    assert server.process.wait(timeout=15) in (0, -signal.SIGTERM)
    assert sandbox_leftovers(server) == []


def test_sandbox_that_cannot_start_says_so_and_frees_its_slot(tmp_path):
    """A sandbox that cannot be built gives the user a message and no slot leaks."""
    server = start_server(tmp_path, uid_min=222040, uid_max=222049,
                          admission="capacity = 1\nper_address = 5\n")
    try:
        root = server.state_dir / "sandbox-root"
        root.rmdir()  # the launcher can no longer mount the sandbox's root
        for _ in range(2):  # the second would be refused if the slot leaked
            client = ConsoleClient(server)
            client.login()
            assert client.wait_closed(timeout=15)
            assert client.last_message("e") == "The console sandbox could not be built."
        root.mkdir(mode=0o755)
        assert wait_until(lambda: b'"active":0' in server.get("/status").read(), timeout=10)
    finally:
        server.stop()
    assert sandbox_leftovers(server) == []


def run_failing(tmp: Path, *args: str) -> tuple[int, str]:
    result = subprocess.run(
        [TWISTD, "--nodaemon", "--pidfile=", "--logfile", "-", "shellserver", *args],
        cwd=str(tmp), capture_output=True, text=True, timeout=60,
    )
    return result.returncode, result.stdout + result.stderr


def test_missing_runtime_is_a_clear_start_up_error(tmp_path):
    """A configured runtime that does not exist stops start-up with its name."""
    config = tmp_path / "c.toml"
    config.write_text(f'[server]\nstate_dir = "{tmp_path / "s"}"\n'
                      '[sandbox]\nruntime = "/nonexistent/runtime"\n')
    code, output = run_failing(tmp_path, "--config", str(config), "--listen", "tcp:0")
    assert code != 0
    assert "sandbox.runtime '/nonexistent/runtime' is not a venv" in output
    assert "Traceback" not in output
    # Nothing was set up before the check: no cgroup directory is left.
    from shellserver.sandbox.cgroups import read_layout
    from shellserver.startup import instance_name

    layout = read_layout().for_instance(instance_name(str(tmp_path / "s")))
    assert not any(os.path.exists(path) for path in layout.parents())


def test_full_state_disk_is_a_clear_start_up_error(tmp_path):
    """A state directory on a full disk stops start-up with a clear message."""
    disk = Path(tempfile.mkdtemp(prefix="shellserver-full-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], check=True)
    try:
        with open(disk / "filler", "wb") as f:
            try:
                f.write(b"\0" * 200_000)
            except OSError:
                pass
        config = tmp_path / "c.toml"
        config.write_text(f'[server]\nstate_dir = "{disk / "state"}"\n'
                          f'[sandbox]\nruntime = "{RUNTIME}"\n')
        code, output = run_failing(tmp_path, "--config", str(config), "--listen", "tcp:0")
        assert code != 0
        assert "server.state_dir" in output and "No space left on device" in output, output
        assert "Traceback" not in output
    finally:
        subprocess.run(["umount", str(disk)], check=True)
        disk.rmdir()
