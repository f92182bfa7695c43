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
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
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
    _tarpitted: dict[str, float] = field(factory=dict)  # session -> when
    _loop: LoopingCall | None = None

    def start(self) -> None:
        if self.budget <= 0:
            return
        self._loop = LoopingCall(self.check)
        self._loop.clock = self._clock
        self._loop.start(self.interval, now=False)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def check(self) -> None:
        now = self._clock.seconds()
        alive = set()
        for sandbox in self._running():
            alive.add(sandbox.session)
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
