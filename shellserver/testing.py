"""Fakes shared by the tests: a SockJS connection, sandboxes and their starter.

They implement the same interfaces as the real parts (checked with
``verifyObject`` in tests/unit/test_testing.py) and record what happens.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from attrs import define, field
from zope.interface import implementer

from shellserver.sandbox.cgroups import ICgroupFiles
from shellserver.sandbox.output import IOutputPipe, IOutputPipes
from shellserver.sandbox.service import (
    IConsoleProcessEvents,
    ISandbox,
    ISandboxStarter,
    SandboxUnavailable,
)

if TYPE_CHECKING:
    from shellserver.sockjs.session import SockJSHandler


@define
class FakeConnection:
    """Stands in for shellserver.sockjs.SockJSConnection."""

    origin: str | None = "https://console.example"
    peer_host: str = "192.0.2.7"
    transport_name: str = "websocket"
    session_id: str = "fake"
    sent: list[str] = field(factory=list)
    close_code: int | None = None
    close_reason: str | None = None
    handler: SockJSHandler | None = None
    pending_bytes: int = 0
    producer: object = None

    @property
    def is_open(self) -> bool:
        return self.close_code is None

    def send(self, text: str) -> None:
        assert self.is_open, "send() after close()"
        self.sent.append(text)

    def register_producer(self, producer) -> None:
        if self.producer is not None:
            raise RuntimeError(f"{self.producer!r} is registered already")
        self.producer = producer

    def unregister_producer(self) -> None:
        self.producer = None

    def close(self, code: int = 3000, reason: str = "Go away!") -> None:
        if self.close_code is not None:
            return
        self.close_code, self.close_reason = code, reason
        if self.handler is not None:
            self.handler.closed()


@implementer(ISandbox)
@define
class FakeSandbox:
    """A sandbox that records keystrokes and resizes and ends when told to."""

    events: IConsoleProcessEvents
    session: str
    uid: int
    size: tuple[int, int]
    written: list[bytes] = field(factory=list)
    resizes: list[tuple[int, int]] = field(factory=list)
    terminated: int = 0
    ended: bool = False
    paused: bool = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        self.terminate()

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def resize(self, cols: int, rows: int) -> None:
        self.resizes.append((cols, rows))

    def terminate(self) -> None:
        self.terminated += 1

    def exit(self, status: int | None = 0, signal: int | None = None) -> None:
        """Make the console exit as a real one would."""
        self.ended = True
        self.events.exited(status, signal)


@implementer(ISandboxStarter)
@define
class FakeSandboxStarter:
    """Starts FakeSandboxes; can be told to refuse."""

    started: list[FakeSandbox] = field(factory=list)
    refuse_with: str | None = None
    _next_uid: int = 200000

    def start(self, events: IConsoleProcessEvents, cols: int, rows: int) -> FakeSandbox:
        if self.refuse_with is not None:
            raise SandboxUnavailable(self.refuse_with)
        sandbox = FakeSandbox(events, f"fake{len(self.started)}", self._next_uid,
                              (cols, rows))
        self._next_uid += 1
        self.started.append(sandbox)
        return sandbox


@implementer(IOutputPipe)
@define
class FakeOutputPipe:
    """One session's output pipe: ``send`` delivers bytes as if init wrote them."""

    path: str
    deliver: Callable[[bytes], None]
    reading: bool = True
    held: list[bytes] = field(factory=list)  # in the pipe, not read yet
    finished: bool = False

    def send(self, data: bytes) -> None:
        """Output arrives; read at once unless paused."""
        self.held.append(data)
        if self.reading:
            self._read_all()

    def _read_all(self) -> None:
        while self.held:
            self.deliver(self.held.pop(0))

    def pause(self) -> None:
        self.reading = False

    def resume(self) -> None:
        self.reading = True
        self._read_all()

    def finish(self) -> None:
        if not self.finished:
            self.finished = True
            self._read_all()


@implementer(IOutputPipes)
@define
class FakeOutputPipes:
    """Makes FakeOutputPipes; can be told to fail as mkfifo would."""

    directory: str = "/state/pipes"
    opened: dict[str, FakeOutputPipe] = field(factory=dict)
    error: OSError | None = None

    def open(self, session: str, deliver) -> tuple[str, FakeOutputPipe]:
        if self.error is not None:
            raise self.error
        pipe = FakeOutputPipe(f"{self.directory}/{session}", deliver)
        self.opened[session] = pipe
        return pipe.path, pipe


@implementer(ICgroupFiles)
@define
class FakeCgroupTree:
    """A cgroup2 hierarchy in memory, with the kernel's rules that start-up
    meets: a controller can be enabled below a cgroup only if its parent
    enabled it (ENOENT otherwise), and only while the cgroup holds no
    processes, the root excepted (EBUSY); a cgroup that enables controllers
    takes no processes (EBUSY); a read-only mount refuses every change."""

    root: str
    root_controllers: tuple[str, ...]
    processes: dict[str, list[str]] = field(factory=dict)  # cgroup -> pids
    subtree: dict[str, set[str]] = field(factory=dict)  # cgroup -> enabled below
    read_only: bool = False
    # Cgroups where a new process appears each time the last one is moved
    # out (a shell that keeps forking while the server starts).
    forking: set[str] = field(factory=set)
    # Files whose writes fail with the given errno (a kernel refusal).
    failing: dict[str, int] = field(factory=dict)
    writes: list[tuple[str, str]] = field(factory=list)

    def __attrs_post_init__(self) -> None:
        for path in list(self.processes):
            self._dirs_to(path)
        self.subtree.setdefault(self.root, set())
        self.processes.setdefault(self.root, [])

    def _dirs_to(self, path: str) -> None:
        while path.startswith(self.root):
            self.subtree.setdefault(path, set())
            self.processes.setdefault(path, [])
            if path == self.root:
                break
            path = os.path.dirname(path)

    def controllers(self, path: str) -> set[str]:
        if path == self.root:
            return set(self.root_controllers)
        return set(self.subtree.get(os.path.dirname(path), ()))

    def read(self, path: str) -> str:
        directory, name = os.path.split(path)
        if directory not in self.subtree:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
        if name == "cgroup.controllers":
            return " ".join(sorted(self.controllers(directory))) + "\n"
        if name == "cgroup.subtree_control":
            return " ".join(sorted(self.subtree[directory])) + "\n"
        if name == "cgroup.procs":
            return "".join(pid + "\n" for pid in self.processes[directory])
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)

    def write(self, path: str, text: str) -> None:
        directory, name = os.path.split(path)
        if self.read_only:
            raise OSError(errno.EROFS, "Read-only file system", path)
        if path in self.failing:
            raise OSError(self.failing[path], os.strerror(self.failing[path]), path)
        if directory not in self.subtree:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
        if name == "cgroup.subtree_control":
            wanted = {word[1:] for word in text.split() if word.startswith("+")}
            if not wanted <= self.controllers(directory):
                raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
            if self.processes[directory] and directory != self.root:
                raise OSError(errno.EBUSY, "Device or resource busy", path)
            self.subtree[directory] |= wanted
        elif name == "cgroup.procs":
            pid = text.strip()
            if self.subtree[directory] and directory != self.root:
                raise OSError(errno.EBUSY, "Device or resource busy", path)
            sources = [d for d, pids in self.processes.items() if pid in pids]
            if not sources:
                raise ProcessLookupError(errno.ESRCH, "No such process", path)
            for source in sources:
                self.processes[source].remove(pid)
                if not self.processes[source] and source in self.forking:
                    self.processes[source].append(str(10_000 + len(self.writes)))
            self.processes[directory].append(pid)
        else:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
        self.writes.append((path, text))

    def mkdir(self, path: str) -> bool:
        if self.read_only:
            raise OSError(errno.EROFS, "Read-only file system", path)
        if os.path.dirname(path) not in self.subtree:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
        if path in self.subtree:
            return False
        self.subtree[path] = set()
        self.processes[path] = []
        return True

    def rmdir(self, path: str) -> None:
        if self.read_only:
            raise OSError(errno.EROFS, "Read-only file system", path)
        children = [d for d in self.subtree if os.path.dirname(d) == path and d != path]
        if self.processes.get(path) or children:
            raise OSError(errno.EBUSY, "Device or resource busy", path)
        del self.subtree[path]
        del self.processes[path]
