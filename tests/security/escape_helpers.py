"""Helpers for the escape suite: hostile snippets in real consoles, host-side checks.

An attempt is a Python snippet run inside a real sandboxed IPython. It is
sent as one line (zlib + base64, so the echoed input never contains the
outcome marker) and reports with ``report(value)``, which prints the value's
repr between markers; the test reads it back with ``ast.literal_eval``.
The snippet starts with ``PRELUDE``'s helpers in scope.
"""

from __future__ import annotations

import ast
import base64
import os
import re
import textwrap
import zlib

from conftest import wait_until  # tests/, on the path through conftest.py
from console_client import ConsoleClient

START = "<<OUTCOME "
END = " OUTCOME>>"

PRELUDE = '''
import ctypes, errno, os, signal, socket, subprocess, sys, time

def report(value):
    print("<<OUT" + "COME", repr(value), "OUTCOME>>", flush=True)

def name_of(error):
    return errno.errorcode.get(error, str(error))

def attempt(fn, *args, **kwargs):
    """'ok' if fn(*args) succeeds, else the errno name (or the exception type)."""
    try:
        fn(*args, **kwargs)
    except OSError as e:
        return name_of(e.errno) if e.errno else type(e).__name__
    except Exception as e:
        return type(e).__name__
    return "ok"

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

def syscall(number, *args):
    """A raw syscall: 'ok' or the errno name."""
    ctypes.set_errno(0)
    values = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    if libc.syscall(ctypes.c_long(number), *values) < 0:
        return name_of(ctypes.get_errno())
    return "ok"
'''


def encode(code: str) -> str:
    source = PRELUDE + textwrap.dedent(code)
    packed = base64.b64encode(zlib.compress(source.encode(), 9)).decode()
    return (f"exec(__import__('zlib').decompress(__import__('base64').b64decode("
            f"'{packed}')).decode(), {{'__name__': 'attempt'}})")


class Sandbox:
    """One real console, driven with snippets; tracks IPython's prompt numbers."""

    def __init__(self, server, *, start_timeout: float = 20.0) -> None:
        self.server = server
        self.client = ConsoleClient(server)
        self.client.login()
        self.prompt = 1
        assert self.client.wait_for_prompt(1, timeout=start_timeout), self.client.display()
        self._seen = 0
        self.uid = self.run("report(os.getuid())")

    def output(self) -> str:
        return "".join(self.client.raw_output)

    def send(self, line: str) -> None:
        """Type a line without waiting for the prompt (the attempt blocks)."""
        self.client.type(encode(line) + "\r")
        self.prompt += 1

    def run(self, code: str, timeout: float = 30.0):
        """Run ``code``; return the value it reported (the last one)."""
        self.send(code)
        return self.wait_report(timeout)

    def wait_prompt(self, timeout: float = 30.0) -> None:
        """Wait for the prompt after the last sent line (which reported nothing)."""
        assert self.client.wait_for_prompt(self.prompt, timeout), self.client.display()

    def wait_report(self, timeout: float = 30.0):
        """Wait for the next prompt after a sent snippet; return its report."""
        assert self.client.wait_for_prompt(self.prompt, timeout), self.client.display()
        text = self.output()
        start = text.rfind(START)
        assert start >= self._seen, f"no outcome reported:\n{self.client.display()}"
        end = text.index(END, start)
        self._seen = end
        value = ast.literal_eval(text[start + len(START):end].replace("\r\n", ""))
        print(f"uid {self.uid if hasattr(self, 'uid') else '?'} reported: {value!r}")
        return value

    def interrupt(self) -> None:
        self.client.type("\x03")

    def alive(self) -> bool:
        return not self.client.closed

    def close(self) -> None:
        self.client.close()


# -- host-side checks ---------------------------------------------------------

def attack_console(server):
    """A fresh console for one attack (a fixture body: ``yield from``); closing
    it must leave no process of its uid behind."""
    sandbox = Sandbox(server)
    yield sandbox
    sandbox.close()
    assert wait_until(lambda: not pids_of_uid(sandbox.uid), timeout=15), \
        f"processes of uid {sandbox.uid} outlived their console"


def pids_of_uid(uid: int) -> list[int]:
    from conftest import processes_of_uids

    return processes_of_uids(uid, uid)


def cgroup_of(pid: int, controller: str) -> str | None:
    """The pid's cgroup path in the v1 hierarchy of ``controller`` (or v2: '')."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            for line in f:
                hierarchy, controllers, path = line.rstrip("\n").split(":", 2)
                if controller in controllers.split(",") or (
                        controller == "" and hierarchy == "0"):
                    return path
    except OSError:
        return None
    return None


def escaped_processes(uid_min: int, uid_max: int) -> list[str]:
    """Processes of the session uids that are not inside a session cgroup."""
    from conftest import processes_of_uids

    found = []
    for pid in processes_of_uids(uid_min, uid_max):
        for controller in ("pids", "memory", ""):
            path = cgroup_of(pid, controller)
            if path is None:
                continue  # it ended meanwhile
            # .../shellserver/[instance/]s<session>
            parts = path.rstrip("/").split("/")
            if "shellserver" not in parts[:-1] or not re.fullmatch(r"s[0-9a-f]+", parts[-1]):
                found.append(f"pid {pid} in {controller or 'cgroup2'} {path}")
    return found


def server_leftovers(server) -> list[str]:
    """conftest's sandbox_leftovers, less other servers' live sandboxes.

    Concurrent runs of this suite use the same uid range; a process inside
    another server's session cgroup is theirs. A process of the range outside
    any session cgroup still counts.
    """
    from conftest import sandbox_leftovers

    ours = set(re.findall(r"console (s[0-9a-f]+) started", server.log()))
    problems = []
    for item in sandbox_leftovers(server):
        if item.startswith("process "):
            path = cgroup_of(int(item.split()[1]), "pids") or ""
            session = path.rstrip("/").rsplit("/", 1)[-1]
            if re.fullmatch(r"s[0-9a-f]+", session) and session not in ours:
                continue
        problems.append(item)
    return problems


def cgroup_dir(pid: int, controller: str) -> str | None:
    """The directory of the pid's cgroup in the v1 hierarchy of ``controller``."""
    path = cgroup_of(pid, controller)
    if path is None:
        return None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.startswith("cgroup ") and controller in right.split()[2].split(","):
                fields = left.split()
                root, mount_point = fields[3], fields[4]
                relative = path[len(root):] if root != "/" and path.startswith(root) else path
                return mount_point + relative
    return None


def file_state(path: str | os.PathLike) -> tuple:
    """What a write would change: content hash, size, mode, owner, mtime."""
    import hashlib

    st = os.stat(path)
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    return digest, st.st_size, st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns
