"""A console: one sandboxed IPython, and the SockJS connections it is seen through.

A ``ConsoleSession`` owns the console: it waits for the token, redeems it,
starts a sandbox, then shuttles keystrokes, resizes and output, keeps the
output that is sent but not yet acknowledged, and enforces the
authentication, idle, maximum-age and reattach-grace timeouts on the injected
clock. An ``Attachment`` is the console protocol over one SockJS connection
(the SockJS handler): it hands messages to its console, and handles the
reattach (``A``) that moves a console to a new connection (docs/protocol.md,
"Reattach"). A console outlives its attachment for
``console.reattach_grace`` seconds. Neither holds transport or process
details: the connection and the sandbox are given to them.
"""

from __future__ import annotations

import codecs
import hashlib
import hmac
import math
import re
import secrets
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from attrs import define, field, frozen
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from shellserver.admission import IAdmission, Refused, Slot
from shellserver.auth import TokenAuthority, TokenError
from shellserver.logs import ClientEventLog
from shellserver.metrics import Metrics
from shellserver.sandbox.service import (
    SETUP_FAILED,
    IConsoleProcessEvents,
    ISandbox,
    ISandboxStarter,
    SandboxUnavailable,
)
from shellserver.users import UnregisteredUsers

if TYPE_CHECKING:
    from shellserver.config import Config
    from shellserver.sockjs.session import SockJSConnection

log = Logger()

# Close codes (docs/protocol.md).
CLOSE_NORMAL = 3000
CLOSE_AUTH_FAILED = 4001
CLOSE_SANDBOX_FAILED = 4002
CLOSE_PROTOCOL_ERROR = 4003
CLOSE_NOT_ADMITTED = 4004
CLOSE_REATTACH_REFUSED = 4005
CLOSE_TAKEN_OVER = 4006

TAKEN_OVER_MESSAGE = "This console was opened in another window."
# A warning goes out this long before an idle or maximum-age ending (half the
# limit when the limit is shorter than twice this).
WARNING_LEAD = 60.0
_REATTACH = re.compile(r"\A([A-Za-z0-9_-]{43}),([0-9]{1,15})\Z")

DEFAULT_COLS, DEFAULT_ROWS = 80, 24
# Output read within this window after a send of at least COALESCE_STREAM
# characters is coalesced into one message: a stream (a print loop, a
# pipeline) goes out in fewer, larger messages, each of which costs the
# server (and the browser) far more than its bytes do. Output after a quiet
# spell or after a small message, such as a keystroke's echo or the prompt's
# redraw, goes out at once: keystrokes never wait for the window.
COALESCE_WINDOW = 0.008
COALESCE_STREAM = 512
# Pending output is sent at once from this size on. One read of the output
# pipe (up to 64 KiB) is one message at most; past the websocket message size
# limit a message goes out through autobahn's fragment API (websocket.py).
COALESCE_MAX = 32768
MAX_COLS, MAX_ROWS = 1000, 500
_SIZE = re.compile(r"\A([0-9]{1,4}),([0-9]{1,4})\Z")
# ASCII digits only: str.isdigit() also accepts "²" or "١", which int() refuses
# (or reads as another number).
_COUNT = re.compile(r"\A[0-9]{1,15}\Z")
# A timer that fires this close to its due time counts as due (the float sums
# of the clock and of the timer's own time differ in the last bits).
_TIMER_SLACK = 0.001


class ProtocolError(Exception):
    """The client broke the console protocol."""


def utf16_units(text: str) -> int:
    """The length of ``text`` as JavaScript counts it (UTF-16 code units)."""
    if text.isascii():
        return len(text)
    return len(text.encode("utf-16-le")) // 2


@implementer(IPushProducer)
@define
class OutputGate:
    """Pauses a sandbox's output while any reason to pause holds.

    Two parties may ask: the SockJS connection (its own queue is full) and
    the console's flow control (the browser has not acknowledged enough).
    """

    _sandbox: IPushProducer
    reasons: set[str] = field(factory=set)
    _metrics: Metrics | None = None

    def pause(self, reason: str) -> None:
        if not self.reasons:
            self._sandbox.pauseProducing()
        if reason not in self.reasons and self._metrics is not None:
            self._metrics.output_paused(reason)
        self.reasons.add(reason)

    def resume(self, reason: str) -> None:
        if reason in self.reasons:
            self.reasons.discard(reason)
            if not self.reasons:
                self._sandbox.resumeProducing()

    # As the SockJS connection's producer: its reason is "transport".
    def pauseProducing(self) -> None:
        self.pause("transport")

    def resumeProducing(self) -> None:
        self.resume("transport")

    def stopProducing(self) -> None:
        self._sandbox.stopProducing()


def parse_size(payload: str) -> tuple[int, int]:
    """``"120,40"`` -> (120, 40), within sane bounds, or ProtocolError."""
    match = _SIZE.match(payload)
    if not match:
        raise ProtocolError(f"resize needs COLS,ROWS, got {payload[:40]!r}")
    cols, rows = int(match.group(1)), int(match.group(2))
    if not (1 <= cols <= MAX_COLS and 1 <= rows <= MAX_ROWS):
        raise ProtocolError(f"terminal size {cols}x{rows} is out of range")
    return cols, rows


def describe_duration(seconds: float) -> str:
    """A duration as a person says it: "45 seconds", "10 minutes", "2 hours"."""
    for unit, size in (("hour", 3600), ("minute", 60)):
        if seconds >= size and seconds % size == 0 or seconds >= 10 * size:
            count = round(seconds / size)
            return f"{count} {unit}{'s' if count != 1 else ''}"
    count = round(seconds)
    return f"{count} second{'s' if count != 1 else ''}"


@define
class ConsoleSettings:
    auth_timeout: float
    idle_timeout: float
    max_age: float
    output_high_water: int = 262144
    output_low_water: int = 65536
    node: str = ""  # this node's name, in the lifecycle log events
    # How long a console whose connection went away waits for a reattach;
    # 0: it ends with its connection.
    reattach_grace: float = 0.0

    @classmethod
    def from_config(cls, config: Config) -> ConsoleSettings:
        """What each new console takes from the configuration (at start and on reload)."""
        return cls(
            auth_timeout=config.console.auth_timeout,
            idle_timeout=config.console.idle_timeout,
            max_age=config.console.max_age,
            output_high_water=config.console.output_high_water,
            output_low_water=config.console.output_low_water,
            node=config.node_name(),
            reattach_grace=(min(config.console.reattach_grace, config.console.max_age)
                            if config.console.max_age else config.console.reattach_grace),
        )


def _utf16_tail(text: str, units: int) -> str | None:
    """``text`` without its first ``units`` UTF-16 code units; None when
    that would split a surrogate pair (a character outside the BMP)."""
    if text.isascii():
        return text[units:]
    encoded = text.encode("utf-16-le", "surrogatepass")
    if units * 2 < len(encoded) and 0xDC00 <= int.from_bytes(
            encoded[units * 2:units * 2 + 2], "little") <= 0xDFFF:
        return None
    return encoded[units * 2:].decode("utf-16-le", "surrogatepass")


@define
class ReattachSecrets:
    """The current reattach secret of each running console, as a SHA-256.

    A console holds at most one secret (issuing a new one forgets the old),
    and ending it forgets it: the registry is bounded by the console count.
    The secrets themselves are never kept, so they cannot leak from memory
    or into a log.
    """

    _by_digest: dict[bytes, tuple[ConsoleSession, str | None]] = field(factory=dict)
    _digest_of: dict[ConsoleSession, bytes] = field(factory=dict)

    def issue(self, console: ConsoleSession, origin: str | None) -> str:
        """A new secret for ``console`` opened from ``origin``; the old one stops working."""
        self.forget(console)
        secret = secrets.token_urlsafe(32)
        digest = hashlib.sha256(secret.encode("ascii")).digest()
        self._by_digest[digest] = (console, origin)
        self._digest_of[console] = digest
        return secret

    def find(self, secret: str) -> tuple[ConsoleSession, str | None] | None:
        """The console ``secret`` is the current secret of, with its origin."""
        digest = hashlib.sha256(secret.encode("ascii", "replace")).digest()
        entry = self._by_digest.get(digest)
        if entry is None or not hmac.compare_digest(self._digest_of.get(entry[0], b""), digest):
            return None
        return entry

    def holds(self, console: ConsoleSession) -> bool:
        return console in self._digest_of

    def forget(self, console: ConsoleSession) -> None:
        digest = self._digest_of.pop(console, None)
        if digest is not None:
            self._by_digest.pop(digest, None)

    def __len__(self) -> int:
        return len(self._digest_of)


@define
class DetachedLine:
    """Where a detached console's messages go: nowhere. It remembers who
    the console was last seen through, for the log events."""

    peer_host: str
    origin: str | None
    transport_name: str
    is_open: bool = False

    def send(self, text: str) -> None:
        pass

    def close(self, code: int, reason: str) -> None:
        pass

    def register_producer(self, producer: IPushProducer) -> None:
        pass

    def unregister_producer(self) -> None:
        pass


@frozen
class ConsoleSummary:
    """A running console, for the admin page: its sandbox's session id, when
    its token was redeemed (clock seconds), its client and transport."""

    console: str
    started: float
    client: str
    transport: str


@implementer(IConsoleProcessEvents)
@define(eq=False)
class ConsoleSession:
    """The console protocol over one connection; the SockJS handler."""

    _connection: Attachment | DetachedLine
    _clock: IReactorTime
    _tokens: TokenAuthority
    _sandboxes: ISandboxStarter
    _settings: ConsoleSettings
    _admission: IAdmission | None = None
    _users: UnregisteredUsers | None = None
    _on_end: Callable[[ConsoleSession], None] | None = None
    # What clients cause before they hold a console is logged within a
    # budget per address (shared by all sessions: the factory's).
    _client_events: ClientEventLog | None = None
    _metrics: Metrics | None = None
    state: str = "authenticating"  # -> admitting -> starting -> running -> ended
    sandbox: ISandbox | None = None
    _size: tuple[int, int] = (DEFAULT_COLS, DEFAULT_ROWS)
    _decoder: codecs.IncrementalDecoder = field(
        factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace")
    )
    _timers: dict[str, IDelayedCall] = field(factory=dict)
    _end_message: str | None = None
    _stopping: bool = False
    _slot: Slot | None = None
    _gate: OutputGate | None = None
    # Flow control: output sent and acknowledged, in UTF-16 code units.
    _sent_units: int = 0
    _acked_units: int = 0
    _acks_enabled: bool = False
    _pending: list[str] = field(factory=list)
    _pending_units: int = 0
    _last_send: float = float("-inf")
    _last_send_size: int = 0
    user_id: str | None = None
    # For the metrics: when the token was redeemed, whether the sandbox came
    # from the warm pool, and the first reason the console was ended for.
    _start_time: float | None = None
    _start_source: str | None = None  # "cold" or "pool", once start() returned
    _end_reason: str | None = None
    # Reattach: the registry of secrets, the output sent and not yet
    # acknowledged (chunks of (units, text) from the count _retained_from on),
    # and the warnings out (kind -> when the console ends).
    _secrets: ReattachSecrets | None = None
    _retained: deque[tuple[int, str]] = field(factory=deque)
    _retained_from: int = 0
    _warned: dict[str, float] = field(factory=dict)
    # When the last keystroke came (or the sandbox started): the idle time
    # counts from it.
    _input_at: float = 0.0

    def __attrs_post_init__(self) -> None:
        self._start_timer("auth", self._settings.auth_timeout, self._auth_timed_out)

    # -- timers ---------------------------------------------------------------

    def _start_timer(self, name: str, delay: float, action) -> None:
        self._cancel_timer(name)
        if delay > 0:
            self._timers[name] = self._clock.callLater(delay, action)
        if name in ("idle", "age"):
            self._schedule_warning(name, delay)

    def _schedule_warning(self, kind: str, delay: float) -> None:
        """Warn of the ``kind`` ending due in ``delay``; withdraw a warning out."""
        if self._warned.pop(kind, None) is not None:
            self._connection.send("c" + kind)
        self._cancel_timer(kind + "_warning")
        if delay > 0:
            lead = min(WARNING_LEAD, delay / 2)
            self._timers[kind + "_warning"] = self._clock.callLater(
                delay - lead, self._warning_due, kind, lead)

    def _warning_due(self, kind: str, seconds: float) -> None:
        self._timers.pop(kind + "_warning", None)
        if kind == "idle":
            later = self._input_at + self._settings.idle_timeout - seconds - self._clock.seconds()
            if later > _TIMER_SLACK:
                # input came since the timer was set (keystrokes leave the timers be)
                self._timers["idle_warning"] = self._clock.callLater(
                    later, self._warning_due, kind, seconds)
                return
        self.warn(kind, seconds)

    def warn(self, kind: str, seconds: float) -> None:
        """Tell the user the console ends in ``seconds`` for ``kind``."""
        if self.state == "ended":
            return
        self._warned[kind] = self._clock.seconds() + seconds
        self._flush_output()
        self._connection.send(f"w{kind},{math.ceil(seconds)}")

    def _cancel_timer(self, name: str) -> None:
        call = self._timers.pop(name, None)
        if call is not None and call.active():
            call.cancel()

    def _auth_timed_out(self) -> None:
        self._timers.pop("auth", None)
        self._fail(CLOSE_AUTH_FAILED, "No console token arrived in time.")

    def _idle_timed_out(self) -> None:
        self._timers.pop("idle", None)
        later = self._input_at + self._settings.idle_timeout - self._clock.seconds()
        if later > _TIMER_SLACK:
            # input came since the timer was set: the rest of the time from it
            self._timers["idle"] = self._clock.callLater(later, self._idle_timed_out)
            return
        self._ended_for("idle")
        self._end(f"Console ended after {describe_duration(self._settings.idle_timeout)}"
                  " without input.")

    def _max_age_reached(self) -> None:
        self._timers.pop("age", None)
        self._ended_for("max_age")
        self._end(f"Console ended: the {describe_duration(self._settings.max_age)}"
                  " time limit was reached.")

    # -- from the client (SockJS handler) -------------------------------------

    def message_received(self, text: str) -> None:
        if self.state == "ended":
            return
        kind, payload = text[:1], text[1:]
        try:
            if self.state == "authenticating":
                if kind != "a":
                    raise ProtocolError("the first message must be the console token")
                self._authenticate(payload)
            elif kind == "i":
                if self.sandbox is not None:
                    self.sandbox.write(payload.encode("utf-8", "surrogatepass"))
                    # The idle timers look at this when they fire: a keystroke
                    # costs no timer of its own (one cancel and schedule each
                    # of two timers, per key, before).
                    self._input_at = self._clock.seconds()
                    if "idle" in self._warned:
                        # the warning is out: withdraw it now, start the time anew
                        self._start_timer("idle", self._settings.idle_timeout,
                                          self._idle_timed_out)
            elif kind == "r":
                self._size = parse_size(payload)
                if self.sandbox is not None:
                    self.sandbox.resize(*self._size)
            elif kind == "k":
                self._acknowledged(payload)
            elif kind == "q" and not payload:
                self.end("The console was closed.", reason="client_left")
            elif kind == "a":
                raise ProtocolError("already authenticated")
            else:
                raise ProtocolError(f"unknown message type {kind!r}")
        except ProtocolError as e:
            self._log_client_event("protocol error", "console protocol error from {peer}: {error}",
                                   peer=self._connection.peer_host, error=str(e))
            self._fail(CLOSE_PROTOCOL_ERROR, f"Protocol error: {e}.")

    def closed(self) -> None:
        """The connection is gone: wait for a reattach, or end the sandbox."""
        # An ending console (``q``, a limit, the operator: its end reason is
        # set) waits for its sandbox's exit, not for a reattach.
        if (self.state == "running" and self._end_reason is None
                and self._settings.reattach_grace > 0
                and self._secrets is not None and self._secrets.holds(self)):
            self._detach()
            return
        self._gone()

    def _detach(self) -> None:
        """Keep running without a connection for the reattach grace."""
        self._flush_output()  # into the retained output: a reattach replays it
        connection = self._connection
        self._connection = DetachedLine(connection.peer_host, connection.origin,
                                        connection.transport_name)
        if self._gate is not None:
            # The old connection's pause is over; the flow control's holds,
            # and holds whatever the client acknowledged (memory stays flat).
            self._gate.resume("transport")
            if self._sent_units - self._acked_units > self._settings.output_high_water:
                self._gate.pause("client")
        self._start_timer("grace", self._settings.reattach_grace, self._grace_expired)
        log.info("console {console} detached: it waits {grace}s for a reattach",
                 grace=self._settings.reattach_grace,
                 **self._lifecycle_fields("console_detached"))

    def _grace_expired(self) -> None:
        self._timers.pop("grace", None)
        self._gone()

    def _gone(self) -> None:
        """Nobody will see this console again: end the sandbox."""
        if self._secrets is not None:
            self._secrets.forget(self)
        if self.state != "ended":
            self._ended_for("client_left")
            if self.sandbox is not None:
                log.info("console {session}: client went away", session=self.sandbox.session)
            else:
                self._log_client_event("left early", "console {session}: client went away",
                                       session=None)
        self.state = "ended"
        for name in list(self._timers):
            self._cancel_timer(name)
        self._stop_sandbox()
        if self.sandbox is None:
            self._release()

    def abandon(self) -> None:
        """This never-authenticated console is not needed (its connection
        reattaches to another): drop it without a trace."""
        if self.state == "authenticating":
            self.state = "ended"
            for name in list(self._timers):
                self._cancel_timer(name)
            self._release()

    def reattach(self, attachment: Attachment, count: int) -> str | None:
        """Continue on ``attachment``, replaying the output from ``count`` on;
        or why not (the console is then unaffected)."""
        if self.state != "running":
            return "the console has ended"
        self._flush_output()  # everything read so far counts as sent
        first = max(self._acked_units, self._retained_from)
        if not first <= count <= self._sent_units:
            return (f"the terminal's output count {count} is outside "
                    f"{first}..{self._sent_units}")
        replay, skip = [], count - self._retained_from
        for units, text in self._retained:
            if skip >= units:
                skip -= units
                continue
            tail = _utf16_tail(text, skip) if skip else text
            if tail is None:
                return f"the output count {count} splits a character"
            replay.append(tail)
            skip = 0
        previous = self._connection
        if isinstance(previous, Attachment):
            previous.taken_over()
        self._cancel_timer("grace")
        self._connection = attachment
        attachment.send("sresumed")
        # The new secret first: a connection lost during the replay can
        # reattach with it (the old one is spent).
        self._issue_secret()
        for text in replay:
            attachment.send("o" + text)
        self._acked_units = count
        self._acks_enabled = True
        self._trim_retained()
        if self._gate is not None:
            self._gate.resume("transport")
            if self._sent_units - self._acked_units < self._settings.output_low_water:
                self._gate.resume("client")
            attachment.register_producer(self._gate)
        now = self._clock.seconds()
        for kind, ends in self._warned.items():
            if ends > now:
                attachment.send(f"w{kind},{math.ceil(ends - now)}")
        log.info("console {console} reattached from {client} over {transport}"
                 " ({takeover}), {replayed} units replayed",
                 takeover="takeover" if isinstance(previous, Attachment) else "detached",
                 replayed=self._sent_units - count,
                 **self._lifecycle_fields("console_reattached"))
        return None

    def _issue_secret(self) -> None:
        """Send a new reattach secret (``t``): the old one stops working."""
        grace = self._settings.reattach_grace
        if self._secrets is None or grace <= 0:
            return
        secret = self._secrets.issue(self, self._connection.origin)
        self._connection.send(f"t{max(1, int(grace))},{secret}")

    def _trim_retained(self) -> None:
        """Forget retained output the terminal has acknowledged."""
        while self._retained:
            units = self._retained[0][0]
            if self._retained_from + units > self._acked_units:
                break
            self._retained.popleft()
            self._retained_from += units

    def _release(self) -> None:
        """Give back what this console held: its admission slot, its user."""
        if self._secrets is not None:
            self._secrets.forget(self)
        if self._slot is not None:
            self._slot.release()
            self._slot = None
        if self._users is not None and self.user_id is not None:
            self._users.forget(self.user_id)
        if self._on_end is not None:
            on_end, self._on_end = self._on_end, None
            on_end(self)

    def ending(self, message: str) -> None:
        """The server ends this console (a limit); IConsoleProcessEvents."""
        self.end(message, reason="budget")

    def notice(self, message: str) -> None:
        """A notice for the user; the console goes on (IConsoleProcessEvents)."""
        if self.state != "ended":
            self._flush_output()
            self._connection.send("n" + message)

    def end(self, message: str, reason: str = "shutdown") -> None:
        """End this console by the operator's or the server's decision;
        ``reason`` is counted in the metrics (kill_switch, shutdown, budget)."""
        if self.state != "ended":
            self._ended_for(reason)
            self._end(message)

    def _ended_for(self, reason: str) -> None:
        """Every ending comes here first: record its reason, and forget the
        reattach secret at once (an ending console is never reattached)."""
        if self._end_reason is None:
            self._end_reason = reason
        if self._secrets is not None:
            self._secrets.forget(self)

    def _refused(self, reason: str | None, event: str = "console refused",
                 format: str = "console refused to {client}: {reason}",
                 **detail: object) -> None:
        if self._metrics is not None:
            self._metrics.console_refused(reason)
        # Refusals are the client's doing: within its address's log budget.
        self._log_client_event(event, format,
                               **self._lifecycle_fields("console_refused", reason), **detail)

    def _lifecycle_fields(self, event: str, reason: str | None = None) -> dict:
        """The named fields of a console lifecycle log event (docs/operations.md);
        never the token."""
        return {
            "console_event": event,
            "console": self.sandbox.session if self.sandbox is not None else None,
            "user": self.user_id,
            "client": self._connection.peer_host,
            "transport": self._connection.transport_name,
            "node": self._settings.node,
            "reason": reason,
        }

    def summary(self) -> ConsoleSummary | None:
        """What the admin page lists of this console while it runs (never
        its token); None before it runs and once it ended."""
        if self.state != "running" or self.sandbox is None:
            return None
        return ConsoleSummary(console=self.sandbox.session,
                              started=(self._clock.seconds() if self._start_time is None
                                       else self._start_time),
                              client=self._connection.peer_host,
                              transport=self._connection.transport_name)

    def _stop_sandbox(self) -> None:
        if self.sandbox is not None and not self._stopping:
            self._stopping = True
            self.sandbox.terminate()

    def _log_client_event(self, event: str, format: str, **fields: object) -> None:
        peer = self._connection.peer_host
        if self._client_events is not None:
            self._client_events.info(peer, event, format, **fields)
        else:
            log.info(format, **fields)

    # -- authentication and start ---------------------------------------------

    def _authenticate(self, token: str) -> None:
        self._cancel_timer("auth")
        peer = self._connection.peer_host
        wait = self._admission.auth_retry_after(peer) if self._admission else None
        if wait is not None:
            # Checked before the token: guessing costs a guesser time, not us work.
            self._refused("auth_rate_limited")
            self._fail(CLOSE_NOT_ADMITTED, "No console now: too many wrong console tokens "
                       f"came from your address. Try again in {wait} seconds.")
            return
        try:
            claims = self._tokens.redeem(token, origin=self._connection.origin,
                                          client_address=peer)
        except TokenError as e:
            if self._metrics is not None:
                self._metrics.token_failed(e.reason)
            self._refused("token", "refused token", "console refused for {client}: {token_failure}",
                          token_failure=e.reason)
            if self._admission is not None:
                self._admission.auth_failed(peer)
            self._fail(CLOSE_AUTH_FAILED, f"Console refused: {e}.")
            return
        if self._admission is None:
            self._start(claims)
            return
        # A cluster's admission answers later (Redis): meanwhile the session
        # is "admitting", and whatever ends it first wins.
        self.state = "admitting"
        decided = self._admission.spend_token(claims.nonce, claims.expires_at)
        decided.addCallback(self._token_spent, claims)
        decided.addErrback(self._admission_failed)

    def _token_spent(self, fresh: bool, claims) -> None:
        # Only the admission's own answer (spend_token) comes here.
        assert self._admission is not None
        if self.state == "ended":
            return
        if not fresh:
            # Redeemed on another node of the cluster (or before its restart).
            from shellserver.auth import REPLAYED

            if self._metrics is not None:
                self._metrics.token_failed(REPLAYED)
            self._refused("token", "refused token",
                          "console refused for {client}: {token_failure}",
                          token_failure=REPLAYED)
            self._admission.auth_failed(self._connection.peer_host)
            self._fail(CLOSE_AUTH_FAILED, f"Console refused: {TokenError(REPLAYED)}.")
            return
        slot = self._admission.console_slot(self._connection.peer_host)
        slot.addCallbacks(self._admitted, self._not_admitted, callbackArgs=(claims,))
        slot.addErrback(self._admission_failed)

    def _not_admitted(self, failure) -> None:
        failure.trap(Refused)
        if self.state == "ended":
            return
        status = failure.value.status
        self._refused(status.reason)
        self._fail(CLOSE_NOT_ADMITTED, f"No console now: {status.message}")

    def _admission_failed(self, failure) -> None:
        log.failure("console admission failed", failure)
        if self.state != "ended":
            self._fail(CLOSE_SANDBOX_FAILED, "No console could be started: the service "
                       "failed to decide; try again.")

    def _admitted(self, slot: Slot, claims) -> None:
        if self.state == "ended":
            slot.release()  # the client left while we asked
            return
        self._slot = slot
        self._start(claims)

    def _start(self, claims) -> None:
        self.user_id = claims.user_id
        if self._users is not None:
            self._users.claim(claims.user_id)
        self.state = "starting"
        self._connection.send("sstarting")
        self._start_time = self._clock.seconds()
        try:
            self.sandbox = self._sandboxes.start(self, *self._size)
            # The start was synchronous: the starter says where it came from.
            self._start_source = getattr(self._sandboxes, "last_source", "cold")
        except SandboxUnavailable as e:
            self._refused("unavailable")
            if self._metrics is not None:
                self._metrics.sandbox_failed("unavailable")
            self._fail(CLOSE_SANDBOX_FAILED, f"No console could be started: {e}")
            self._release()
            return
        # Stop reading the PTY while the client has too much output pending.
        self._gate = OutputGate(self.sandbox, metrics=self._metrics)
        self._connection.register_producer(self._gate)
        self._input_at = self._clock.seconds()
        self._start_timer("idle", self._settings.idle_timeout, self._idle_timed_out)
        self._start_timer("age", self._settings.max_age, self._max_age_reached)

    # -- from the sandbox (IConsoleProcessEvents) ------------------------------

    def output(self, data: bytes) -> None:
        if self._metrics is not None:
            self._metrics.output_read(len(data))
        if self.state == "starting":
            self.state = "running"
            self._connection.send("sready")
            self._issue_secret()
            # A console from the warm pool may be at its prompt already and
            # hand its output over within start(), before start() returned
            # its source: the starter's own word is current then.
            source: str = (self._start_source if self._start_source is not None
                           else getattr(self._sandboxes, "last_source", "cold"))
            log.info("console {console} started for {user} from {client} over {transport}",
                     source=source, **self._lifecycle_fields("console_started"))
            if self._metrics is not None and self._start_time is not None:
                self._metrics.console_started(source, self._clock.seconds() - self._start_time)
        text = self._decoder.decode(data)
        if text and self.state != "ended":
            self._queue_output(text)

    def _queue_output(self, text: str) -> None:
        self._pending.append(text)
        self._pending_units += len(text)
        if self._pending_units >= COALESCE_MAX:
            self._flush_output()
        elif "flush" not in self._timers:
            if (self._last_send_size < COALESCE_STREAM
                    or self._clock.seconds() - self._last_send >= COALESCE_WINDOW):
                self._flush_output()
            else:
                self._start_timer("flush", COALESCE_WINDOW, self._flush_output)

    def _flush_output(self) -> None:
        self._cancel_timer("flush")
        if self._pending:
            text = "".join(self._pending)
            self._pending.clear()
            self._pending_units = 0
            self._last_send = self._clock.seconds()
            self._last_send_size = len(text)
            self._send_output(text)

    def _send_output(self, text: str) -> None:
        self._connection.send("o" + text)
        units = utf16_units(text)
        self._sent_units += units
        if self._secrets is not None and self._settings.reattach_grace > 0:
            # Kept until acknowledged, for a reattach to replay.
            self._retained.append((units, text))
            if not self._acks_enabled:
                # A client that never acknowledges: keep the last high-water's worth.
                while (self._retained and self._sent_units - self._retained_from
                       - self._retained[0][0] >= self._settings.output_high_water):
                    self._retained_from += self._retained.popleft()[0]
        detached = isinstance(self._connection, DetachedLine)
        if ((self._acks_enabled or detached) and self._gate is not None
                and self._sent_units - self._acked_units > self._settings.output_high_water):
            self._gate.pause("client")

    def _acknowledged(self, payload: str) -> None:
        """``k<n>``: the browser has written ``n`` units of output in all."""
        if not _COUNT.match(payload):
            raise ProtocolError(f"an acknowledgement needs a count, got {payload[:20]!r}")
        units = int(payload)
        if not self._acked_units <= units <= self._sent_units:
            raise ProtocolError(
                f"acknowledged {units} units, but {self._acked_units} were acknowledged "
                f"already and {self._sent_units} sent"
            )
        self._acked_units = units
        self._acks_enabled = True
        self._trim_retained()
        if (self._gate is not None
                and self._sent_units - self._acked_units < self._settings.output_low_water):
            self._gate.resume("client")

    def exited(self, status: int | None, signal: int | None) -> None:
        if status == SETUP_FAILED:
            self._ended_for("error")
            if self._metrics is not None:
                self._metrics.sandbox_failed("setup")
        self._ended_for("exit")
        log.info("console {console} of {user} from {client} ended: {reason}",
                 status=status, signal=signal,
                 **self._lifecycle_fields("console_ended", self._end_reason))
        if self._metrics is not None:
            self._metrics.console_ended(self._end_reason)
        self._release()
        tail = self._decoder.decode(b"", final=True)
        if tail and self.state != "ended":
            self._queue_output(tail)
        if self.state == "ended":
            return
        if self._end_message is not None:
            message = self._end_message
        elif status == SETUP_FAILED:
            self._fail(CLOSE_SANDBOX_FAILED, "The console sandbox could not be built.")
            return
        else:
            message = "The console has exited."
        self._finish(CLOSE_NORMAL, "x", message)

    # -- ending ---------------------------------------------------------------

    def _end(self, message: str) -> None:
        """End the console by policy (timeouts): tell the user, stop the sandbox."""
        if self.sandbox is None:
            self._finish(CLOSE_NORMAL, "x", message)
            return
        self._end_message = message
        self._stop_sandbox()

    def _fail(self, code: int, message: str) -> None:
        self._ended_for("error")
        self._finish(code, "e", message)
        self._stop_sandbox()

    def _finish(self, code: int, kind: str, message: str) -> None:
        if self.state == "ended":
            return
        self._flush_output()  # the output before the end goes first
        self.state = "ended"
        for name in list(self._timers):
            self._cancel_timer(name)
        self._connection.send(kind + message)
        self._connection.close(code, message)


@define(eq=False)
class Attachment:
    """The console protocol over one SockJS connection: the SockJS handler.

    It hands the messages to its console, and moves a detached (or
    another connection's) console to this connection on ``A``. To its
    console it stands for the connection (send, close, who is at the other
    end); once the connection is gone, or a newer one took the console
    over, it has no console.
    """

    _connection: SockJSConnection
    _factory: ConsoleFactory
    console: ConsoleSession | None = None
    _first: bool = True

    @property
    def peer_host(self) -> str:
        return self._connection.peer_host

    @property
    def origin(self) -> str | None:
        return self._connection.origin

    @property
    def transport_name(self) -> str:
        return self._connection.transport_name

    @property
    def is_open(self) -> bool:
        return self._connection.is_open

    def send(self, text: str) -> None:
        if self._connection.is_open:
            self._connection.send(text)

    def close(self, code: int, reason: str) -> None:
        self._connection.close(code, reason)

    def register_producer(self, producer: IPushProducer) -> None:
        self._connection.register_producer(producer)

    def unregister_producer(self) -> None:
        self._connection.unregister_producer()

    # -- the SockJS handler ---------------------------------------------------

    def message_received(self, text: str) -> None:
        first, self._first = self._first, False
        if first and text[:1] == "A":
            # This connection continues a console: the one made for it is not needed.
            fresh, self.console = self.console, None
            if fresh is not None:
                fresh.abandon()
            refusal = self._factory.reattach(self, text[1:])
            if refusal is not None:
                message = f"Console not resumed: {refusal}."
                self.send("e" + message)
                self.close(CLOSE_REATTACH_REFUSED, message)
        elif self.console is not None:
            self.console.message_received(text)

    def closed(self) -> None:
        console, self.console = self.console, None
        if console is not None:
            console.closed()

    def taken_over(self) -> None:
        """A newer connection took the console: tell this one, and close it."""
        self.console = None
        self._connection.unregister_producer()  # the console's output is no longer ours
        self.send("e" + TAKEN_OVER_MESSAGE)
        self.close(CLOSE_TAKEN_OVER, TAKEN_OVER_MESSAGE)


@define
class ConsoleFactory:
    """Makes an Attachment, with a new ConsoleSession for it, for each new
    SockJS connection (its open_session)."""

    _clock: IReactorTime
    _tokens: TokenAuthority
    _sandboxes: ISandboxStarter
    _settings: ConsoleSettings
    _admission: IAdmission | None = None
    _users: UnregisteredUsers | None = None
    sessions: set[ConsoleSession] = field(factory=set)
    metrics: Metrics = field(factory=Metrics)
    secrets: ReattachSecrets = field(factory=ReattachSecrets)
    _client_events: ClientEventLog = field(init=False)

    def __attrs_post_init__(self) -> None:
        self._client_events = ClientEventLog(log, self._clock)

    def __call__(self, connection) -> Attachment:
        self.metrics.connection_opened(connection.transport_name)
        attachment = Attachment(connection, self)
        session = ConsoleSession(attachment, self._clock, self._tokens, self._sandboxes,
                                 self._settings, self._admission, self._users,
                                 self.sessions.discard, self._client_events, self.metrics,
                                 secrets=self.secrets)
        attachment.console = session
        self.sessions.add(session)
        return attachment

    def reattach(self, attachment: Attachment, payload: str) -> str | None:
        """``A`` on ``attachment``: move the console its secret names to it;
        or why not (the console, if any, is then unaffected)."""
        peer = attachment.peer_host
        wait = self._admission.auth_retry_after(peer) if self._admission else None
        if wait is not None:
            self._client_events.info(peer, "reattach refused",
                                     "reattach refused for {client}: too many wrong secrets",
                                     client=peer)
            return ("too many wrong console tokens came from your address; "
                    f"try again in {wait} seconds")
        match = _REATTACH.match(payload)
        found = self.secrets.find(match.group(1)) if match else None
        if match is None:
            wrong = "the reattach message needs SECRET,COUNT"
        elif found is None:
            wrong = "the console has ended, or its secret was used or is unknown"
        elif found[1] != attachment.origin:
            wrong = "the console was opened from another origin"
        else:
            wrong = None
        if wrong is not None:
            # A wrong secret is a wrong token: the same per-address limit.
            if self._admission is not None:
                self._admission.auth_failed(peer)
            self._client_events.info(peer, "reattach refused",
                                     "reattach refused for {client}: {reason}",
                                     client=peer, reason=wrong)
            return wrong
        assert match is not None and found is not None  # no ``wrong``: both were found
        console = found[0]
        refusal = console.reattach(attachment, int(match.group(2)))
        if refusal is None:
            attachment.console = console
        else:
            self._client_events.info(peer, "reattach refused",
                                     "reattach refused for {client}: {reason}",
                                     client=peer, reason=refusal)
        return refusal

    def use_settings(self, settings: ConsoleSettings) -> None:
        """Give consoles started from now on these settings (a reload);
        running ones keep theirs."""
        self._settings = settings

    def notify_all(self, message: str) -> None:
        """Tell every running console's user something (they go on)."""
        for session in list(self.sessions):
            session.notice(message)

    def warn_all(self, kind: str, seconds: float) -> None:
        """Warn every console's user that it ends in ``seconds`` (``w``)."""
        for session in list(self.sessions):
            session.warn(kind, seconds)

    def end_all(self, message: str, reason: str = "shutdown") -> None:
        """End every console (the kill switch's terminate, a shutdown)."""
        for session in list(self.sessions):
            session.end(message, reason)

    def end_all_by_kill_switch(self, message: str) -> None:
        """End every console: the kill switch's terminate."""
        self.end_all(message, reason="kill_switch")
