"""Fakes shared by the tests: a SockJS connection, sandboxes and their starter.

They implement the same interfaces as the real parts (checked with
``verifyObject`` in tests/unit/test_testing.py) and record what happens.
"""

from __future__ import annotations

import errno
import math
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from attrs import define, field
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from shellserver.cluster.store import IClusterStore, NodeInfo, RedisUnavailable, View
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
    """One session's console terminal: ``send`` delivers bytes as if the
    console wrote them; keystrokes and sizes are recorded."""

    path: str
    deliver: Callable[[bytes], None]
    reading: bool = True
    held: list[bytes] = field(factory=list)  # in the terminal, not read yet
    finished: bool = False
    written: list[bytes] = field(factory=list)
    sizes: list[tuple[int, int]] = field(factory=list)
    producer: object = None

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def resize(self, cols: int, rows: int) -> None:
        self.sizes.append((cols, rows))

    def registerProducer(self, producer, streaming: bool) -> None:
        self.producer = producer

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


@implementer(IClusterStore)
@define
class FakeClusterStore:
    """The cluster's Redis state in memory on a clock (shellserver.cluster.store).

    ``up = False`` makes every call fail at once with RedisUnavailable, as the
    real store does while its link is down; ``failing = True`` makes calls
    fail so while ``up`` (Redis went away under a call, or was too slow);
    ``hang = True`` holds the answers in ``waiting`` until ``answer_waiting()``.
    ``calls`` records the operations asked for.
    """

    clock: IReactorTime
    up: bool = True
    failing: bool = False
    # When set, every call fails with it (a bug, or an answer nobody expected).
    error: Exception | None = None
    hang: bool = False
    waiting: list = field(factory=list)
    calls: list[str] = field(factory=list)
    nodes: dict[str, tuple[str, float]] = field(factory=dict)
    active: dict[str, dict[str, int]] = field(factory=dict)
    active_expiry: dict[str, float] = field(factory=dict)
    drains: set[str] = field(factory=set)
    switch: str | None = None
    starts: dict[str, list[float]] = field(factory=dict)
    pages: dict[str, list[float]] = field(factory=dict)
    tokens: dict[str, float] = field(factory=dict)
    # Each node's published samples (newest first) and when the list expires.
    samples: dict[str, tuple[list[str], float]] = field(factory=dict)
    # Each read_samples call's (names, how many per node it asked for).
    sample_reads: list[tuple[list, int]] = field(factory=list)

    def _call(self, name: str, answer) -> Deferred:
        self.calls.append(name)
        if not self.up or self.failing:
            return fail(RedisUnavailable("Redis is down"))
        if self.error is not None:
            return fail(self.error)
        if self.hang:
            d: Deferred[Any] = Deferred()
            self.waiting.append((d, answer))
            return d
        return succeed(answer())

    def answer_waiting(self) -> None:
        """Answer the calls held while ``hang`` was set, in order."""
        waiting, self.waiting = self.waiting, []
        for d, answer in waiting:
            d.callback(answer())

    def _now(self) -> float:
        return self.clock.seconds()

    def _live(self) -> dict[str, str]:
        now = self._now()
        return {name: text for name, (text, expires) in self.nodes.items() if expires > now}

    def _view(self, name: str) -> View:
        found = []
        for member, text in sorted(self._live().items()):
            node = NodeInfo.from_json(text, drained=member in self.drains)
            if node is not None:
                found.append(node)
        return View(nodes=tuple(found), switch=self.switch, drained=name in self.drains)

    def _active_of(self, node: str) -> dict[str, int]:
        if self.active_expiry.get(node, 0) <= self._now():
            self.active.pop(node, None)
        return self.active.setdefault(node, {})

    def heartbeat(self, node: NodeInfo, ttl: float, active: dict) -> Deferred:
        def answer() -> View:
            self.nodes[node.name] = (node.to_json(), self._now() + ttl)
            self.active[node.name] = {a: c for a, c in active.items() if c}
            self.active_expiry[node.name] = self._now() + ttl
            return self._view(node.name)
        return self._call("heartbeat", answer)

    def read_view(self, name: str) -> Deferred:
        return self._call("read_view", lambda: self._view(name))

    def leave(self, name: str) -> Deferred:
        def answer() -> None:
            self.nodes.pop(name, None)
            self.active.pop(name, None)
        return self._call("leave", answer)

    def _window(self, times: list[float], window: float) -> list[float]:
        now = self._now()
        times[:] = [t for t in times if t > now - window]
        return times

    def take_page(self, address: str, limit: int, window: float) -> Deferred:
        def answer() -> int | None:
            times = self._window(self.pages.setdefault(address, []), window)
            if len(times) >= limit:
                return max(1, math.ceil(times[0] + window - self._now()))
            times.append(self._now())
            return None
        return self._call("take_page", answer)

    def admit(self, node: str, address: str, live: list, per_address: int, per_minute: int,
              window: float, ttl: float) -> Deferred:
        def answer():
            if sum(self._active_of(name).get(address, 0) for name in live) >= per_address:
                return ("rate-limited", 15)
            times = self._window(self.starts.setdefault(address, []), window)
            if len(times) >= per_minute:
                return ("rate-limited", max(1, math.ceil(times[0] + window - self._now())))
            times.append(self._now())
            mine = self._active_of(node)
            mine[address] = mine.get(address, 0) + 1
            self.active_expiry[node] = self._now() + ttl
            return (None, None)
        return self._call("admit", answer)

    def check_address(self, address: str, live: list, per_address: int, per_minute: int,
                      window: float) -> Deferred:
        def answer():
            if sum(self._active_of(name).get(address, 0) for name in live) >= per_address:
                return ("rate-limited", 15)
            times = self._window(self.starts.setdefault(address, []), window)
            if len(times) >= per_minute:
                return ("rate-limited", max(1, math.ceil(times[0] + window - self._now())))
            return (None, None)
        return self._call("check_address", answer)

    def release(self, node: str, address: str) -> Deferred:
        def answer() -> None:
            mine = self._active_of(node)
            if mine.get(address, 0) <= 1:
                mine.pop(address, None)
            else:
                mine[address] -= 1
        return self._call("release", answer)

    def spend_token(self, nonce: str, ttl: float) -> Deferred:
        def answer() -> bool:
            if self.tokens.get(nonce, 0) > self._now():
                return False
            self.tokens[nonce] = self._now() + ttl
            return True
        return self._call("spend_token", answer)

    def set_switch(self, state: str | None) -> Deferred:
        return self._call("set_switch", lambda: setattr(self, "switch", state))

    def set_drain(self, node: str, draining: bool) -> Deferred:
        def answer() -> None:
            if draining:
                self.drains.add(node)
            else:
                self.drains.discard(node)
        return self._call("set_drain", answer)

    def publish_sample(self, node: str, sample: str, keep: int, ttl: float) -> Deferred:
        def answer() -> None:
            kept = self._samples_of(node)
            self.samples[node] = ([sample, *kept][:keep], self._now() + ttl)
        return self._call("publish_sample", answer)

    def read_samples(self, names: list, keep: int) -> Deferred:
        self.sample_reads.append((list(names), keep))
        return self._call("read_samples",
                          lambda: {name: self._samples_of(name)[:keep] for name in names})

    def _samples_of(self, node: str) -> list[str]:
        kept, expires = self.samples.get(node, ([], 0.0))
        return kept if expires > self._now() else []
