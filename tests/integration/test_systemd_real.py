"""The real server under systemd's protocols: READY/WATCHDOG/STOPPING on a real
notify socket, and a host refusal that exits with the status the unit does not
restart on."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest
from conftest import RUNTIME, TWISTD, start_server, wait_until

from shellserver.startup import EXIT_HOST_REFUSED

pytestmark = pytest.mark.integration

UID_MIN, UID_MAX = 236000, 236009


class NotifySocket:
    """A unix datagram socket standing in for systemd's notify socket."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.setblocking(False)
        self.messages: list[str] = []

    def received(self) -> list[str]:
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return self.messages

    def has(self, assignment: str) -> int:
        return sum(assignment in m.split("\n") for m in self.received())

    def close(self) -> None:
        self.sock.close()


def test_ready_watchdog_and_stopping(tmp_path, monkeypatch):
    """Under systemd the server says READY=1 with its listener up, pings WATCHDOG=1
    at half of WatchdogSec, and says STOPPING=1 when it drains."""
    notify = NotifySocket(str(tmp_path / "notify"))
    monkeypatch.setenv("NOTIFY_SOCKET", notify.path)
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    server = start_server(tmp_path, uid_min=UID_MIN, uid_max=UID_MAX)
    try:
        assert wait_until(lambda: notify.has("READY=1"), timeout=20), notify.messages
        # READY=1 means the listener answers now.
        assert server.get("/status").status == 200
        assert wait_until(lambda: notify.has("WATCHDOG=1") >= 3, timeout=10), notify.messages
        assert notify.has("STOPPING=1") == 0
    finally:
        server.stop()
        notify.received()
        notify.close()
    assert sum("STOPPING=1" in m.split("\n") for m in notify.messages) == 1
    assert notify.messages.index(next(m for m in notify.messages if "STOPPING=1" in m)) > \
        notify.messages.index(next(m for m in notify.messages if "READY=1" in m))


def test_read_only_cgroupfs_is_refused_without_restart(tmp_path):
    """A read-only cgroup2 mount stops start-up with exit status 78, one line
    naming the directory and the cause, no traceback, and no directory left."""
    from shellserver.sandbox.cgroups import read_layout
    from shellserver.startup import instance_name

    state = tmp_path / "state"
    config = tmp_path / "c.toml"
    config.write_text(f'[server]\nstate_dir = "{state}"\n'
                      f'[sandbox]\nruntime = "{RUNTIME}"\nuid_min = {UID_MIN}\n'
                      f'uid_max = {UID_MAX}\npool_size = 0\n')
    mount_point = next(
        line.split()[4] for line in open("/proc/self/mountinfo")
        if " - cgroup2 " in line)
    # The server runs in a mount namespace of its own where the cgroup2
    # hierarchy is mounted read-only, as in a container that was not given it.
    script = (f"mount -o remount,bind,ro {mount_point} && exec {TWISTD} --nodaemon "
              f"--pidfile= --logfile - shellserver --config {config} --listen tcp:0")
    result = subprocess.run(["unshare", "--mount", "--propagation", "private",
                             "sh", "-c", script],
                            capture_output=True, text=True, timeout=60, cwd=str(tmp_path))
    output = result.stdout + result.stderr
    assert result.returncode == EXIT_HOST_REFUSED, output
    assert f"shellserver: cannot start: cgroups: {mount_point}/" in output, output
    assert "Read-only file system" in output and "read-only" in output, output
    assert "Traceback" not in output and "Usage:" not in output, output
    instance = read_layout().for_instance(instance_name(str(state)))
    assert [p for p in instance.parents() if os.path.exists(p)] == []
