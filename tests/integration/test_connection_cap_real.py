"""The server-wide connection cap and the open-files limit, on a real server."""

from __future__ import annotations

import resource
import socket
import subprocess
import time

import pytest
from conftest import GENEROUS_ADMISSION, RUNTIME, TWISTD, start_server, wait_until

pytestmark = pytest.mark.integration

UIDS = 224000


def open_files_limit(pid: int) -> tuple[int, int]:
    """Soft and hard "Max open files" of a process, from /proc/<pid>/limits."""
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return int(soft), int(hard)
    raise AssertionError("no open-files line")


def limit_open_files(soft: int, hard: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return apply


def is_reset(sock: socket.socket, timeout: float = 3.0) -> bool:
    """The server ended the connection without a word (reset or closed)."""
    sock.settimeout(timeout)
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_connections_in_all_are_capped(tmp_path):
    """Past server.max_connections a new connection is reset, whatever its
    address; once one closes, the server accepts again."""
    server = start_server(tmp_path, uid_min=UIDS, uid_max=UIDS + 9,
                          server="max_connections = 6")
    held = []
    try:
        # From six addresses: the per-address cap (64) is nowhere near.
        for index in range(6):
            held.append(socket.create_connection(
                ("127.0.0.1", server.port), timeout=5,
                source_address=(f"127.0.0.{index + 2}", 0)))
        time.sleep(0.3)  # the server has accepted them all
        extra = socket.create_connection(("127.0.0.1", server.port), timeout=5,
                                         source_address=("127.0.0.20", 0))
        assert is_reset(extra)
        extra.close()
        assert "connections are open (server.max_connections): refusing more" \
            in server.log()
        held.pop().close()

        def served() -> bool:
            try:
                return server.get("/").status == 200
            except OSError:
                return False
        assert wait_until(served, timeout=10)
    finally:
        for sock in held:
            sock.close()
        server.stop()


def test_open_files_soft_limit_is_raised(tmp_path):
    """A server started with a low soft limit (a root shell's 1024) raises it
    to the hard limit, and keeps server.max_connections when that fits."""
    server = start_server(tmp_path, uid_min=UIDS + 10, uid_max=UIDS + 19,
                          admission="capacity = 10\n" + GENEROUS_ADMISSION,
                          preexec_fn=limit_open_files(1024, 8192))
    try:
        assert open_files_limit(server.process.pid) == (8192, 8192)
        assert "server.max_connections lowered" not in server.log()
    finally:
        server.stop()


def test_too_few_open_files_lower_the_cap(tmp_path):
    """With fewer files than server.max_connections needs, the cap is lowered
    to what fits, and start-up says so."""
    server = start_server(tmp_path, uid_min=UIDS + 20, uid_max=UIDS + 29,
                          admission="capacity = 10\n" + GENEROUS_ADMISSION,
                          preexec_fn=limit_open_files(1000, 1000))
    try:
        # 1000 files - 256 reserved - 4 for each of 10 consoles (the launcher's
        # PTY, the output pipe, and the fork server's pidfd and status socket) = 704.
        assert "server.max_connections lowered from 4096 to 704" in server.log()
    finally:
        server.stop()


def test_too_few_open_files_is_a_clear_start_up_error(tmp_path):
    """A hard limit too low for the consoles and a few connections stops
    start-up with the limit and what to change."""
    config = tmp_path / "c.toml"
    config.write_text(f'[server]\nstate_dir = "{tmp_path / "s"}"\n'
                      f'[admission]\ncapacity = 10\n[sandbox]\nruntime = "{RUNTIME}"\n')
    result = subprocess.run(
        [TWISTD, "--nodaemon", "--pidfile=", "--logfile", "-", "shellserver",
         "--config", str(config), "--listen", "tcp:0"],
        cwd=str(tmp_path), capture_output=True, text=True, timeout=60,
        preexec_fn=limit_open_files(280, 280),
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "the process may open only 280 files" in output, output
    assert "LimitNOFILE" in output
    assert "Traceback" not in output
