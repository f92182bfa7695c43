"""systemd's service notifications (sd_notify(3)) for a ``Type=notify`` unit.

The protocol is one datagram of newline-separated assignments (``READY=1``,
``STOPPING=1``, ``WATCHDOG=1``, ``STATUS=...``) sent to the unix socket named
in ``$NOTIFY_SOCKET`` (a leading ``@`` means the abstract namespace). That
is all of it, and it is documented as stable (systemd's "Interface
Portability and Stability" page), so it is spoken here with the standard
library instead of a dependency: the PyPI wrappers are either unmaintained
or bind libsystemd through a C extension that needs its headers to build.
Without ``$NOTIFY_SOCKET`` (not started by systemd) nothing is sent.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, MutableMapping

from attrs import define
from twisted.application.internet import TimerService
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

log = Logger()


def socket_address(value: str) -> str | bytes | None:
    """The address to send to for a ``$NOTIFY_SOCKET`` value (pure); None when
    it is not one systemd would set."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None


def send_datagram(address: str | bytes, payload: bytes) -> None:
    """Send one datagram without ever blocking the reactor."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.setblocking(False)
        sock.sendto(payload, address)


@define
class SystemdNotifier:
    """Sends notifications to systemd, or nothing when not run by it."""

    _address: str | bytes | None
    _send: Callable[[str | bytes, bytes], None] = send_datagram

    @property
    def active(self) -> bool:
        return self._address is not None

    def notify(self, *assignments: str) -> None:
        """Send ``assignments`` (``"READY=1"``, ...) in one datagram; a failure is
        logged, never raised: systemd's own timeouts catch a lost message."""
        if self._address is None:
            return
        try:
            self._send(self._address, "\n".join(assignments).encode())
        except OSError as e:
            log.warn("systemd notification {assignments} not sent: {error}",
                     assignments=assignments, error=e)


def notifier_from_environment(environ: MutableMapping[str, str]) -> SystemdNotifier:
    """The notifier for ``$NOTIFY_SOCKET``, which is removed from ``environ`` (as
    sd_notify's unset_environment does) so that no child process inherits it."""
    value = environ.pop("NOTIFY_SOCKET", "")
    address = socket_address(value)
    if value and address is None:
        log.warn("NOTIFY_SOCKET {value!r} is not a socket path: not notifying systemd",
                 value=value)
    return SystemdNotifier(address)


def watchdog_interval(environ: MutableMapping[str, str], pid: int) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings: half of ``$WATCHDOG_USEC``, as
    sd_watchdog_enabled(3) advises; None when systemd set no watchdog for
    this process. Both variables are removed from ``environ``."""
    usec = environ.pop("WATCHDOG_USEC", "")
    for_pid = environ.pop("WATCHDOG_PID", "")
    if for_pid and for_pid != str(pid):
        return None
    try:
        interval = int(usec) / 2e6
    except ValueError:
        return None
    return interval if interval > 0 else None


class ReadinessService(Service):
    """Says READY=1 once the listeners are up and the console runtime is
    ready, and STOPPING=1 when the server starts to drain.

    Added to the service tree after the listeners: a MultiService starts its
    children in order (a listener that cannot listen stops twistd before
    this starts) and stops them in reverse, so STOPPING=1 comes first.
    """

    name = "systemd-readiness"

    def __init__(self, notifier: SystemdNotifier,
                 runtime_ready: Callable[[], Deferred]) -> None:
        self._notifier = notifier
        self._runtime_ready = runtime_ready

    def startService(self) -> None:
        super().startService()
        d = self._runtime_ready()
        d.addCallback(self._ready)

    def _ready(self, _) -> None:
        if self.running:
            log.info("ready: listeners up, console runtime ready")
            self._notifier.notify("READY=1", "STATUS=serving consoles")

    def stopService(self):
        self._notifier.notify("STOPPING=1", "STATUS=draining consoles")
        return super().stopService()


def watchdog_service(notifier: SystemdNotifier, interval: float,
                     clock: IReactorTime) -> TimerService:
    """A service that sends WATCHDOG=1 every ``interval`` seconds while the
    reactor turns: a reactor stuck in a blocking call stops the pings, and
    systemd restarts the server."""
    service = TimerService(interval, notifier.notify, "WATCHDOG=1")
    service.clock = clock
    service.setName("systemd-watchdog")
    return service


def systemd_services(runtime_ready: Callable[[], Deferred], clock: IReactorTime,
                     environ: MutableMapping[str, str], pid: int) -> list[Service]:
    """READY/STOPPING notifications and the watchdog when under systemd, else
    none (to add after the listeners: see ReadinessService)."""
    notifier = notifier_from_environment(environ)
    interval = watchdog_interval(environ, pid)
    if not notifier.active:
        return []
    services: list[Service] = [ReadinessService(notifier, runtime_ready)]
    if interval is not None:
        services.append(watchdog_service(notifier, interval, clock))
    return services
