"""CPU time budgets: a console that burns its budget is slowed, then ended.

Anonymous public compute attracts crypto-miners. Every console may use at
most ``budget`` seconds of CPU time (read from its cgroup's cpu.stat); past
that it is moved to a tarpit (its CPU quota cut to ``tarpit_quota`` of one
CPU) and told so, and ``grace`` seconds later it is ended with a message.
The watcher polls on the injected clock; it reads one small file per console
per interval.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from attrs import define, field
from twisted.application.internet import TimerService
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from shellserver.sandbox.cgroups import CPU_PERIOD_US, CgroupGroup

log = Logger()


def read_usage_seconds(groups: tuple[CgroupGroup, ...]) -> float | None:
    """CPU seconds used by a session, from the cgroup2 cpu.stat (None if gone)."""
    for group in groups:
        path = os.path.join(group.path, "cpu.stat")
        try:
            with open(path) as f:
                for line in f:
                    if line.startswith("usage_usec "):
                        return int(line.split()[1]) / 1e6
        except FileNotFoundError:
            continue
    return None


# Where the kernel counts the processes it killed for memory: cgroup v2's
# memory.events, v1's memory.oom_control (both have an ``oom_kill`` line).
OOM_FILES = {"memory.max": "memory.events", "memory.limit_in_bytes": "memory.oom_control"}


def oom_kill_count(text: str) -> int:
    """The ``oom_kill`` count in a memory.events or memory.oom_control text (pure)."""
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == "oom_kill":
            return int(value)
    return 0


def read_oom_kills(groups: tuple[CgroupGroup, ...]) -> int | None:
    """How many of a session's processes the kernel killed for memory (None if gone)."""
    for group in groups:
        for limit, events in OOM_FILES.items():
            if limit in group.limits:
                try:
                    with open(os.path.join(group.path, events)) as f:
                        return oom_kill_count(f.read())
                except FileNotFoundError:
                    return None
    return None


def tarpit_writes(groups: tuple[CgroupGroup, ...], quota: float) -> list[tuple[str, str]]:
    """The (file, value) writes that cut a session's CPU quota (pure)."""
    quota_us = max(1000, int(quota * CPU_PERIOD_US))
    writes = []
    for group in groups:
        if "cpu.cfs_quota_us" in group.limits:
            writes.append((os.path.join(group.path, "cpu.cfs_quota_us"), str(quota_us)))
        if "cpu.max" in group.limits:
            writes.append((os.path.join(group.path, "cpu.max"), f"{quota_us} {CPU_PERIOD_US}"))
    return writes


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


@define
class CpuBudgetWatcher:
    """Polls the running sandboxes' CPU use and enforces the budget."""

    _clock: IReactorTime
    _running: Callable[[], list]  # the RunningSandboxes now
    budget: float
    tarpit_quota: float
    grace: float
    interval: float = 2.0
    _read: Callable = read_usage_seconds
    _write: Callable[[str, str], None] = _write
    _read_oom: Callable = read_oom_kills
    _tarpitted: dict[str, float] = field(factory=dict)  # session -> when
    _oom_kills: dict[str, int] = field(factory=dict)  # session -> count told

    def service(self) -> TimerService | None:
        """The service that checks every ``interval`` seconds on the clock
        while it runs; None when there is no budget (0: nothing to watch)."""
        if self.budget <= 0:
            return None
        timer = TimerService(self.interval, self.check)
        timer.clock = self._clock
        timer.setName("cpu-budget")
        return timer

    def check(self) -> None:
        now = self._clock.seconds()
        alive = set()
        for sandbox in self._running():
            alive.add(sandbox.session)
            self._tell_oom_kills(sandbox)
            since = self._tarpitted.get(sandbox.session)
            if since is not None:
                if now - since >= self.grace:
                    log.info("console {session} ended: CPU budget spent",
                             session=sandbox.session)
                    sandbox.events.ending(
                        "Console ended: it used up its CPU time allowance.")
                continue
            used = self._read(sandbox.spec.cgroups)
            if used is not None and used > self.budget:
                self._tarpit(sandbox, used, now)
        for session in list(self._tarpitted):
            if session not in alive:
                del self._tarpitted[session]
        for session in list(self._oom_kills):
            if session not in alive:
                del self._oom_kills[session]

    def _tell_oom_kills(self, sandbox) -> None:
        """Tell the user when the kernel killed a process of theirs for memory:
        the console lives on, and without a word the program just vanishes."""
        kills = self._read_oom(sandbox.spec.cgroups)
        told = self._oom_kills.get(sandbox.session, 0)
        if kills is None or kills <= told:
            return
        self._oom_kills[sandbox.session] = kills
        log.info("console {session}: {count} processes killed for memory",
                 session=sandbox.session, count=kills - told)
        sandbox.events.notice(
            "A program in this console ran out of memory and was killed "
            "(the console's memory limit).")

    def _tarpit(self, sandbox, used: float, now: float) -> None:
        for path, value in tarpit_writes(sandbox.spec.cgroups, self.tarpit_quota):
            try:
                self._write(path, value)
            except OSError as e:
                log.warn("tarpit of {session} failed: {error}", session=sandbox.session,
                         error=e)
        self._tarpitted[sandbox.session] = now
        log.info("console {session} tarpitted after {used:.1f}s of CPU",
                 session=sandbox.session, used=used)
        sandbox.events.notice(
            f"This console has used its CPU time allowance ({self.budget:g} s) and is "
            f"slowed down; it will end in {self.grace:g} s.")
