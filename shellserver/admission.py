"""Admission control: who may start a console now, and why not.

One node's limits, kept in memory: a global capacity (concurrent consoles),
per-client-address limits on concurrent consoles and on new consoles per
minute, and an operator's kill switch (a file, watched on the clock). The
decision is pure bookkeeping on an injected clock; the web and console layers
ask it and show its answer.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from attrs import define, field, frozen
from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

log = Logger()

FULL = "full"
RATE_LIMITED = "rate-limited"
SWITCHED_OFF = "switched-off"
SHUTTING_DOWN = "shutting-down"

WINDOW = 60.0  # seconds of the per-address start rate
FULL_RETRY_AFTER = 15  # seconds to suggest when the node is full
OFF_RETRY_AFTER = 60

_MESSAGES = {
    FULL: "All consoles are in use right now.",
    RATE_LIMITED: "You have started too many consoles.",
    SWITCHED_OFF: "The console service is paused by its operator.",
    SHUTTING_DOWN: "The console service is restarting.",
}


@frozen
class AdmissionStatus:
    """Whether a new console would be admitted now, for one client address."""

    accepting: bool
    reason: str | None
    active: int
    capacity: int
    retry_after: int | None

    @property
    def message(self) -> str | None:
        if self.reason is None:
            return None
        text = _MESSAGES[self.reason]
        if self.retry_after:
            text += f" Try again in {self.retry_after} seconds."
        return text

    @property
    def http_status(self) -> int:
        """429 when it is this client's doing, 503 when it is the service's."""
        return 429 if self.reason == RATE_LIMITED else 503

    def to_json(self) -> dict:
        return {
            "accepting": self.accepting,
            "reason": self.reason,
            "message": self.message,
            "active": self.active,
            "capacity": self.capacity,
            "retry_after": self.retry_after,
        }


class Refused(Exception):
    """A console was not admitted; ``status`` says why."""

    def __init__(self, status: AdmissionStatus) -> None:
        super().__init__(status.message)
        self.status = status


@frozen
class PagePlan:
    """Where a console page sends its visitor: the node its token is for and
    that node's SockJS URL, or ``refusal`` (no token then)."""

    refusal: AdmissionStatus | None = None
    node: str | None = None  # None: this node
    sockjs_url: str | None = None  # None: the page's own default
    # Origins besides the page's own that the page may connect to (a cluster's nodes).
    connect_origins: tuple[str, ...] = ()
    # Whether the refusal was logged already (page floods are logged once a minute).
    logged: bool = True


class IAdmission(Interface):
    """Who may have a console page and a console: one node's bookkeeping
    (L{Admission}) or the cluster's (shellserver.cluster.admission). The web
    and console layers use only this."""

    active = Attribute("Consoles holding a slot on this node.")
    capacity = Attribute("The most consoles this node runs at once.")

    def plan_page(address: str) -> Deferred:
        """Count a console page for ``address``; a L{PagePlan}."""

    def console_slot(address: str) -> Deferred:
        """A L{Slot} for a console of ``address`` on this node, or a L{Refused} failure."""

    def spend_token(nonce: str, expires_at: float) -> Deferred:
        """True if this redeemed token's nonce was never spent before (the
        token authority checked this node's own memory already)."""

    def status_json(address: str) -> Deferred:
        """The body of GET /status for ``address`` (a dict)."""

    def auth_failed(address: str) -> None:
        """``address`` presented a console token that was refused."""

    def auth_retry_after(address: str) -> int | None:
        """Seconds until ``address`` may present a token again, or None."""


@define
class Slot:
    """One admitted console; release it when the console is gone."""

    _admission: Admission
    address: str
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._admission._release(self.address)


@implementer(IAdmission)
@define
class Admission:
    """Capacity, per-address limits and the kill switch, in memory: the local
    provider of L{IAdmission}, and each node's own half of a cluster's."""

    _clock: IReactorTime
    capacity: int
    per_address: int
    per_address_per_minute: int
    switched_off: bool = False
    draining: bool = False  # the server is shutting down
    # Wrong console tokens an address may present per minute (0: no limit).
    auth_failures_per_minute: int = 0
    # Console pages (each mints a token) an address may fetch per minute (0: no limit).
    pages_per_address_per_minute: int = 0
    _active: dict[str, int] = field(factory=dict)
    _starts: dict[str, deque[float]] = field(factory=dict)
    _failures: dict[str, deque[float]] = field(factory=dict)
    _pages: dict[str, deque[float]] = field(factory=dict)
    # when each address's page refusals were last logged
    _pages_refused_logged: dict[str, float] = field(factory=dict)
    _total: int = 0
    _last_sweep: float = 0.0
    # Set from the cluster (shellserver.cluster): its kill switch, and the
    # operator's drain of this node.
    cluster_paused: bool = False
    cluster_drained: bool = False

    @property
    def active(self) -> int:
        return self._total

    def room(self) -> int:
        """Sandboxes that may exist besides the running consoles (the warm pool's
        share of the capacity)."""
        return max(0, self.capacity - self._total)

    def _recent_starts(self, address: str, now: float) -> deque[float]:
        starts = self._starts.get(address)
        if starts is None:
            return deque()
        while starts and starts[0] <= now - WINDOW:
            starts.popleft()
        if not starts:
            del self._starts[address]
        return starts

    def _sweep(self, now: float) -> None:
        """Forget addresses whose starts all left the window (bounded memory)."""
        if now - self._last_sweep < WINDOW:
            return
        self._last_sweep = now
        for address in list(self._starts):
            self._recent_starts(address, now)
        for address in list(self._failures):
            self._recent_failures(address, now)
        for address in list(self._pages):
            self._recent_pages(address, now)
        for address, logged in list(self._pages_refused_logged.items()):
            if logged <= now - WINDOW:
                del self._pages_refused_logged[address]

    def _recent_failures(self, address: str, now: float) -> deque[float]:
        failures = self._failures.get(address)
        if failures is None:
            return deque()
        while failures and failures[0] <= now - WINDOW:
            failures.popleft()
        if not failures:
            del self._failures[address]
        return failures

    def auth_failed(self, address: str) -> None:
        """``address`` presented a console token that was refused."""
        if not self.auth_failures_per_minute or not address:
            return
        now = self._clock.seconds()
        self._sweep(now)
        failures = self._failures.setdefault(
            address, deque(maxlen=self.auth_failures_per_minute))
        failures.append(now)
        if len(failures) == self.auth_failures_per_minute:
            log.warn("{address} presented {count} wrong console tokens within a "
                     "minute: refusing its tokens for a while",
                     address=address, count=len(failures))

    def auth_retry_after(self, address: str) -> int | None:
        """Seconds until ``address`` may present a token again (too many
        wrong ones within a minute), or None when it may now."""
        if not self.auth_failures_per_minute or not address:
            return None
        now = self._clock.seconds()
        failures = self._recent_failures(address, now)
        if len(failures) < self.auth_failures_per_minute:
            return None
        return max(1, int(failures[0] + WINDOW - now + 0.999))

    def _recent_pages(self, address: str, now: float) -> deque[float]:
        pages = self._pages.get(address)
        if pages is None:
            return deque()
        while pages and pages[0] <= now - WINDOW:
            pages.popleft()
        if not pages:
            del self._pages[address]
        return pages

    def take_page(self, address: str) -> int | None:
        """
        Count one console page for ``address`` and return None, or, past
        C{pages_per_address_per_minute}, count nothing and return the
        seconds until it may have one again.  Refusals are logged once a
        minute per address, so a flood costs no log line per request.
        """
        if not self.pages_per_address_per_minute or not address:
            return None
        now = self._clock.seconds()
        self._sweep(now)
        pages = self._recent_pages(address, now)
        if len(pages) < self.pages_per_address_per_minute:
            self._pages.setdefault(
                address, deque(maxlen=self.pages_per_address_per_minute)).append(now)
            return None
        logged = self._pages_refused_logged.get(address)
        if logged is None or logged <= now - WINDOW:
            self._pages_refused_logged[address] = now
            log.warn("{address} asked for more than {count} console pages within a "
                     "minute: refusing them for a while (logged once a minute)",
                     address=address, count=self.pages_per_address_per_minute)
        return max(1, int(pages[0] + WINDOW - now + 0.999))

    def status(self, address: str) -> AdmissionStatus:
        """What ``admit(address)`` would decide now; changes nothing."""
        now = self._clock.seconds()
        reason, retry_after = None, None
        starts = self._recent_starts(address, now)
        if self.draining or self.cluster_drained:
            reason, retry_after = SHUTTING_DOWN, FULL_RETRY_AFTER
        elif self.switched_off or self.cluster_paused:
            reason, retry_after = SWITCHED_OFF, OFF_RETRY_AFTER
        elif self._total >= self.capacity:
            reason, retry_after = FULL, FULL_RETRY_AFTER
        elif self._active.get(address, 0) >= self.per_address:
            reason, retry_after = RATE_LIMITED, FULL_RETRY_AFTER
        elif len(starts) >= self.per_address_per_minute:
            reason = RATE_LIMITED
            retry_after = max(1, int(starts[0] + WINDOW - now + 0.999))
        return AdmissionStatus(
            accepting=reason is None,
            reason=reason,
            active=self._total,
            capacity=self.capacity,
            retry_after=retry_after,
        )

    def admit(self, address: str) -> Slot:
        """Take a console slot for ``address`` or raise Refused."""
        status = self.status(address)
        if not status.accepting:
            raise Refused(status)
        now = self._clock.seconds()
        self._sweep(now)
        self._starts.setdefault(address, deque()).append(now)
        self._active[address] = self._active.get(address, 0) + 1
        self._total += 1
        return Slot(self, address)

    def active_by_address(self) -> dict[str, int]:
        """Running consoles per client address (a copy)."""
        return dict(self._active)

    # -- IAdmission, decided at once -------------------------------------------

    def plan_page(self, address: str) -> Deferred:
        wait = self.take_page(address)
        if wait is not None:
            return succeed(PagePlan(refusal=AdmissionStatus(
                accepting=False, reason=RATE_LIMITED, active=self.active,
                capacity=self.capacity, retry_after=wait), logged=False))
        status = self.status(address)
        return succeed(PagePlan(refusal=None if status.accepting else status))

    def console_slot(self, address: str) -> Deferred:
        try:
            return succeed(self.admit(address))
        except Refused as e:
            return fail(e)

    def spend_token(self, nonce: str, expires_at: float) -> Deferred:
        return succeed(True)

    def status_json(self, address: str) -> Deferred:
        return succeed(self.status(address).to_json())

    def _release(self, address: str) -> None:
        self._total -= 1
        remaining = self._active[address] - 1
        if remaining:
            self._active[address] = remaining
        else:
            del self._active[address]


def derived_capacity(memory_mb: int, meminfo: str) -> int:
    """80% of the machine's memory divided by the per-console limit (pure)."""
    for line in meminfo.splitlines():
        if line.startswith("MemTotal:"):
            total_mb = int(line.split()[1]) // 1024
            return max(1, int(total_mb * 0.8) // memory_mb)
    raise ValueError("/proc/meminfo has no MemTotal line")


@define
class KillSwitch:
    """Watches the kill-switch file and flips admission (and ends consoles).

    While the file exists no console is admitted; if it contains the word
    ``terminate``, ``end_all`` is called once to end the running consoles.
    """

    _clock: IReactorTime
    _admission: Admission
    path: str
    _end_all: Callable[[str], None]
    interval: float = 1.0
    _read: Callable[[str], str | None] = field(default=None)
    _terminated: bool = False

    def __attrs_post_init__(self) -> None:
        if self._read is None:
            self._read = _read_switch

    def service(self) -> TimerService:
        """The service that checks the file every ``interval`` seconds (at
        once when it starts) on the clock, while it runs."""
        timer = TimerService(self.interval, self.check)
        timer.clock = self._clock
        timer.setName("kill-switch")
        return timer

    def check(self) -> None:
        content = self._read(self.path)
        on = content is not None
        if on != self._admission.switched_off:
            log.warn("kill switch {state}: {path}", state="on" if on else "off",
                     path=self.path)
        self._admission.switched_off = on
        terminate = content is not None and "terminate" in content
        if terminate and not self._terminated:
            self._end_all("The operator has ended all consoles.")
        self._terminated = terminate


def _read_switch(path: str) -> str | None:
    """The switch file's first KiB, or None when it does not exist."""
    try:
        with open(path, "rb") as f:
            return f.read(1024).decode("utf-8", "replace")
    except FileNotFoundError:
        return None
    except OSError as e:
        # Unreadable counts as on: failing closed is the safe side.
        log.warn("kill switch {path} unreadable ({error}): treated as on",
                 path=path, error=e)
        return ""


def capacity_for_cost(meminfo: str, *, console_mb: float, fixed_mb: float,
                      memory_mb: int) -> int:
    """How many consoles 80% of the machine's memory holds (pure): less the
    fixed part (the fork server's template), divided by what one console
    costs as measured, a cost never counted above its memory limit."""
    for line in meminfo.splitlines():
        if line.startswith("MemTotal:"):
            total_mb = int(line.split()[1]) / 1024
            per_console = min(float(memory_mb), console_mb)
            return max(1, int((total_mb * 0.8 - fixed_mb) // per_console))
    raise ValueError("/proc/meminfo has no MemTotal line")
