"""A warm pool: sandboxes started ahead of demand, waiting at the prompt.

IPython needs a few hundred milliseconds to its first prompt; a sandbox that
is already there can be handed to a visitor at once. The pool keeps up to
``size`` of them (each with its own uid and cgroups, each counted against
the node's capacity), hands each out at most once, applies the visitor's
terminal size and replays what it printed while it waited, then starts a
replacement in the background. With none waiting it falls back to a cold
start.
"""

from __future__ import annotations

from collections.abc import Callable

from attrs import define, field
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from shellserver.metrics import Metrics
from shellserver.sandbox.service import (
    IConsoleProcessEvents,
    ISandbox,
    ISandboxStarter,
    SandboxUnavailable,
)

log = Logger()

# What a waiting console may print before it is handed out (banner and
# prompt need about 1 KiB); more means something is wrong with it.
MAX_BUFFERED = 64 * 1024
PROMPT = b"In ["
FIRST_RETRY = 1.0
MAX_RETRY = 60.0


@implementer(IConsoleProcessEvents)
@define(eq=False)
class WaitingSandbox:
    """A pooled sandbox's events until a console takes it over."""

    _pool: SandboxPool
    sandbox: ISandbox | None = None
    ready: bool = False
    _buffer: list[bytes] = field(factory=list)
    _buffered: int = 0
    _events: IConsoleProcessEvents | None = None

    @property
    def started(self) -> ISandbox:
        """The sandbox, which every entry taken from the pool has."""
        assert self.sandbox is not None, "entries wait in the pool once started"
        return self.sandbox

    def output(self, data: bytes) -> None:
        if self._events is not None:
            self._events.output(data)
            return
        self._buffer.append(data)
        self._buffered += len(data)
        if not self.ready and PROMPT in b"".join(self._buffer[-2:]):
            self.ready = True
            self._pool.became_ready(self)
        if self._buffered > MAX_BUFFERED:
            log.warn("pooled console printed {n} bytes while waiting: discarded",
                     n=self._buffered)
            self._pool.discard(self)

    def exited(self, status: int | None, signal: int | None) -> None:
        if self._events is not None:
            self._events.exited(status, signal)
        else:
            self._pool.died(self, status, signal)

    def notice(self, message: str) -> None:
        if self._events is not None:
            self._events.notice(message)

    def ending(self, message: str) -> None:
        if self._events is not None:
            self._events.ending(message)
        else:
            self._pool.discard(self)

    def hand_over(self, events: IConsoleProcessEvents, cols: int, rows: int) -> ISandbox:
        """Make ``events`` the console's owner: resize, then replay the wait."""
        self._events = events
        self.started.resize(cols, rows)
        replay, self._buffer = b"".join(self._buffer), []
        if replay:
            events.output(replay)
        return self.started


@implementer(ISandboxStarter)
@define
class SandboxPool:
    """Starts consoles from the pool when it can, cold otherwise."""

    _starter: ISandboxStarter
    _clock: IReactorTime
    size: int
    _room: Callable[[], int] | None = None  # how many more sandboxes capacity allows
    waiting: list[WaitingSandbox] = field(factory=list)
    handed_out: int = 0
    cold_starts: int = 0
    _running: bool = False
    _retry: float = FIRST_RETRY
    _fill_call: IDelayedCall | None = None
    _metrics: Metrics | None = None
    # Where the last start() came from, for the start-latency metric.
    last_source: str = "cold"

    def __attrs_post_init__(self) -> None:
        if self._metrics is not None:
            self._metrics.watch_pool(lambda: len(self.waiting))

    def start(self, events: IConsoleProcessEvents, cols: int, rows: int) -> ISandbox:
        entry = self._take()
        if entry is None:
            self.cold_starts += 1
            self.last_source = "cold"
            return self._starter.start(events, cols, rows)
        self.handed_out += 1
        self.last_source = "pool"
        self._schedule_fill(0)
        log.info("console {session} handed out from the warm pool ({state})",
                 session=entry.started.session, state="ready" if entry.ready else "starting")
        return entry.hand_over(events, cols, rows)

    def _take(self) -> WaitingSandbox | None:
        # The one at the prompt first; else the one closest to it (oldest).
        for entry in self.waiting:
            if entry.ready:
                self.waiting.remove(entry)
                return entry
        if self.waiting:
            return self.waiting.pop(0)
        return None

    # -- filling ----------------------------------------------------------------

    def start_filling(self) -> None:
        self._running = True
        self._schedule_fill(0)

    def stop(self) -> None:
        """Stop refilling and end the waiting sandboxes."""
        self._running = False
        if self._fill_call is not None and self._fill_call.active():
            self._fill_call.cancel()
        self._fill_call = None
        for entry in list(self.waiting):
            self.discard(entry)

    def _schedule_fill(self, delay: float) -> None:
        if self._running and (self._fill_call is None or not self._fill_call.active()):
            self._fill_call = self._clock.callLater(delay, self._fill)

    def _fill(self) -> None:
        """Start one more waiting sandbox if there is a place for it.

        One at a time: the next starts when this one reaches its prompt, so
        a refill never competes with visitors' consoles for the CPU.
        """
        self._fill_call = None
        if not self._running or len(self.waiting) >= self.size:
            return
        if any(not entry.ready for entry in self.waiting):
            return  # one is starting; became_ready() continues
        if self._room is not None and self._room() <= len(self.waiting):
            self._schedule_fill(FIRST_RETRY)
            return
        entry = WaitingSandbox(self)
        try:
            entry.sandbox = self._starter.start(entry, 80, 24)
        except SandboxUnavailable as e:
            log.info("warm pool waits: {reason}", reason=str(e))
            self._back_off()
            return
        self.waiting.append(entry)
        if self._metrics is not None:
            self._metrics.pool_refills.inc()

    def retry_now(self) -> None:
        """Conditions changed (the runtime is built): try to fill at once."""
        self._retry = FIRST_RETRY
        if self._fill_call is not None and self._fill_call.active():
            self._fill_call.cancel()
        self._fill_call = None
        self._schedule_fill(0)

    def resize(self, size: int) -> None:
        """Keep ``size`` sandboxes waiting from now on (a reload): the extra
        ones end, missing ones are started one at a time."""
        self.size = size
        for entry in self.waiting[size:]:
            self.waiting.remove(entry)
            if entry.sandbox is not None:
                entry.sandbox.terminate()
        self._schedule_fill(0)

    def _back_off(self) -> None:
        self._schedule_fill(self._retry)
        self._retry = min(self._retry * 2, MAX_RETRY)

    def became_ready(self, entry: WaitingSandbox) -> None:
        self._retry = FIRST_RETRY
        self._schedule_fill(0)

    def died(self, entry: WaitingSandbox, status: int | None, signal: int | None) -> None:
        """A waiting sandbox ended by itself: replace it, more slowly each time."""
        if entry in self.waiting:
            self.waiting.remove(entry)
            log.warn("a pooled console ended while waiting: status {status}, signal {signal}",
                     status=status, signal=signal)
            if self._metrics is not None:
                self._metrics.sandbox_failed("pool_died")
            self._back_off()

    def discard(self, entry: WaitingSandbox) -> None:
        if entry in self.waiting:
            self.waiting.remove(entry)
        if entry.sandbox is not None:
            entry.sandbox.terminate()
        self._schedule_fill(FIRST_RETRY)
