"""Log messages that clients cause, rate-limited per client address.

Anyone can send a bad token, a malformed request or a broken frame, at any
rate; logging each one would let a single client flood the log. A
L{ClientEventLog} logs the first few of each kind of event per address per
window, counts the rest, and once the window is over logs one summary line
("suppressed N similar messages").
"""

from __future__ import annotations

import sys
from collections import deque

from attrs import define, field
from twisted.internet.interfaces import IReactorTime
from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    jsonFileLogObserver,
    textFileLogObserver,
)

# Per (address, event) and window: how many messages are logged as they come.
MESSAGES_PER_WINDOW = 5
WINDOW_SECONDS = 60.0
# Addresses tracked at once; past it, all further addresses share one count
# per event, so a botnet cannot grow this table (or the log) without bound.
MAX_TRACKED = 10000
OTHER_ADDRESSES = "other addresses"


@define
class _Window:
    started: float
    logged: int = 0
    suppressed: int = 0


@define
class ClientEventLog:
    """
    Logs client-caused events through C{log}, at most C{per_window} per
    (address, event) within each C{window} seconds of the injected clock.

    C{event} is a short fixed name for the kind of message (not client
    text): it keys the count and names what was suppressed.

    No timers: windows that are over are closed (and their summaries
    logged) when the next event arrives, from any address, or at L{flush}.
    So nothing is left on the clock when the clients are gone, and a flood's
    summary comes as soon as the flood goes on past its window.
    """

    _log: Logger
    _clock: IReactorTime
    per_window: int = MESSAGES_PER_WINDOW
    window: float = WINDOW_SECONDS
    max_tracked: int = MAX_TRACKED
    _windows: dict[tuple[str, str], _Window] = field(factory=dict, init=False)
    # keys in the order their windows started, hence ended (all are as long)
    _order: deque[tuple[str, str]] = field(factory=deque, init=False)

    def warn(self, address: str | None, event: str, format: str, /,
             **fields: object) -> bool:
        """Log a warning unless this address's budget for C{event} is spent."""
        return self.emit(LogLevel.warn, address, event, format, **fields)

    def info(self, address: str | None, event: str, format: str, /,
             **fields: object) -> bool:
        """Log an informational message, within the same budget as L{warn}."""
        return self.emit(LogLevel.info, address, event, format, **fields)

    def emit(self, level: LogLevel, address: str | None, event: str, format: str, /,
             **fields: object) -> bool:
        """Log C{format} with C{fields} at C{level}; return whether it was logged."""
        if not self.allow(address, event):
            return False
        self._log.emit(level, format, **fields)
        return True

    def allow(self, address: str | None, event: str) -> bool:
        """Count one C{event} from C{address}; whether it is within the budget
        (for messages written elsewhere, such as the access log)."""
        now = self._clock.seconds()
        self._close_windows(ended_by=now)
        window = self._window_for(address or "-", event, now)
        if window.logged >= self.per_window:
            window.suppressed += 1
            return False
        window.logged += 1
        return True

    @property
    def tracked(self) -> int:
        """How many (address, event) windows are open (for tests)."""
        return len(self._windows)

    def flush(self) -> None:
        """Close every window now, logging their summaries (at shutdown, in tests)."""
        self._close_windows(ended_by=float("inf"))

    def _window_for(self, address: str, event: str, now: float) -> _Window:
        key = (address, event)
        window = self._windows.get(key)
        if window is not None:
            return window
        if len(self._windows) >= self.max_tracked:
            key = (OTHER_ADDRESSES, event)
            window = self._windows.get(key)
            if window is not None:
                return window
        window = self._windows[key] = _Window(started=now)
        self._order.append(key)
        return window

    def _close_windows(self, *, ended_by: float) -> None:
        while self._order:
            key = self._order[0]
            window = self._windows[key]
            if window.started + self.window > ended_by:
                return
            self._order.popleft()
            del self._windows[key]
            if window.suppressed:
                address, event = key
                self._log.warn(
                    "suppressed {count} similar messages ({event}) from {address} "
                    "in {window:.0f} s",
                    count=window.suppressed, event=event, address=address,
                    window=self.window,
                )


class PeerLogger:
    """
    A library's logger (twisted.web's, autobahn's) for one client
    connection: its warnings and notices there are the client's doing (a
    timed-out connection, a faked HEAD request, a websocket protocol
    violation), so they are logged within that address's budget in
    C{events}. Errors and failures (our bugs) and debug messages pass
    unchanged.
    """

    def __init__(self, logger: Logger, events: ClientEventLog, address: str | None,
                 name: str) -> None:
        self._logger = logger
        self._events = events
        self._address = address
        self._name = name

    def warn(self, format: str | None = None, **fields: object) -> None:
        if self._events.allow(self._address, f"{self._name} warning"):
            self._logger.warn(format, **fields)

    def info(self, format: str | None = None, **fields: object) -> None:
        if self._events.allow(self._address, f"{self._name} notice"):
            self._logger.info(format, **fields)

    def __getattr__(self, name: str) -> object:
        return getattr(self._logger, name)


# twistd resolves its --logger option by name, after the plugin's options
# are parsed: the plugin leaves here where the log lines go (log_to).
_json_destination = "-"

# server.log_level: one predicate shared by the observer twistd makes from
# the names below, so a reload changes the level of the running log.
LOG_LEVELS = ("debug", "info", "warn", "error", "critical")
level_filter = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)


def set_log_level(name: str) -> None:
    """Write events of level ``name`` ("info", ...) and above from now on."""
    level_filter.setLogLevelForNamespace("", LogLevel.levelWithName(name))


def log_to(log_format: str, logfile: str | None, *, nodaemon: bool) -> str:
    """Send twistd's log, filtered by L{level_filter}, as text or JSON lines
    (``log_format``) where twistd would write its own: ``logfile``, or
    standard output when that is "-" or, in the foreground, not given (the
    journal under systemd). Returns the name of the observer factory, for
    twistd's ``logger`` option."""
    global _json_destination
    if logfile == "-" or (nodaemon and not logfile):
        _json_destination = "-"
    else:
        _json_destination = logfile or "twistd.log"
    if log_format == "json":
        return f"{__name__}.twistd_json_observer"
    return f"{__name__}.twistd_text_observer"


def json_log_to(logfile: str | None, *, nodaemon: bool) -> str:
    """L{log_to} for JSON lines."""
    return log_to("json", logfile, nodaemon=nodaemon)


def _destination():
    from twisted.python.logfile import LogFile

    if _json_destination == "-":
        return sys.stdout
    return LogFile.fromFullPath(_json_destination)  # rotated like twistd's own


def twistd_json_observer() -> ILogObserver:
    """A twistd log observer: one JSON object per line, each event's named
    fields included (twisted.logger's eventAsJSON)."""
    # Lines, not the RFC 7464 record separator: what log shippers and
    # journald expect.
    return FilteringLogObserver(jsonFileLogObserver(_destination(), recordSeparator=""),
                                [level_filter])


def twistd_text_observer() -> ILogObserver:
    """A twistd log observer writing twistd's usual text lines."""
    return FilteringLogObserver(textFileLogObserver(_destination()), [level_filter])
