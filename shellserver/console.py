"""A console session: one SockJS connection joined to one sandboxed IPython.

The session speaks the console protocol (docs/protocol.md): it waits for the
token, redeems it, starts a sandbox, then shuttles keystrokes, resizes and
output, and enforces the authentication, idle and maximum-age timeouts on the
injected clock. It holds no transport or process details: the connection and
the sandbox are given to it.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Callable

from attrs import define, field
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

log = Logger()

# Close codes (docs/protocol.md).
CLOSE_NORMAL = 3000
CLOSE_AUTH_FAILED = 4001
CLOSE_SANDBOX_FAILED = 4002
CLOSE_PROTOCOL_ERROR = 4003
CLOSE_NOT_ADMITTED = 4004

DEFAULT_COLS, DEFAULT_ROWS = 80, 24
# Output read within this window after a send is coalesced into one message
# (fewer, larger messages under load); output after a quiet spell, such as a
# keystroke's echo, goes out at once.
COALESCE_WINDOW = 0.002
# Pending output is sent at once from this size on. One read of the output
# pipe (up to 64 KiB) is one message at most; past the websocket message size
# limit a message goes out through autobahn's fragment API (websocket.py).
COALESCE_MAX = 32768
MAX_COLS, MAX_ROWS = 1000, 500
_SIZE = re.compile(r"\A([0-9]{1,4}),([0-9]{1,4})\Z")
# ASCII digits only: str.isdigit() also accepts "²" or "١", which int() refuses
# (or reads as another number).
_COUNT = re.compile(r"\A[0-9]{1,15}\Z")


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


@implementer(IConsoleProcessEvents)
@define(eq=False)
class ConsoleSession:
    """The console protocol over one connection; the SockJS handler."""

    _connection: object  # shellserver.sockjs.SockJSConnection
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
    user_id: str | None = None
    # For the metrics: when the token was redeemed, whether the sandbox came
    # from the warm pool, and the first reason the console was ended for.
    _start_time: float | None = None
    _start_source: str = "cold"
    _end_reason: str | None = None

    def __attrs_post_init__(self) -> None:
        self._start_timer("auth", self._settings.auth_timeout, self._auth_timed_out)

    # -- timers ---------------------------------------------------------------

    def _start_timer(self, name: str, delay: float, action) -> None:
        self._cancel_timer(name)
        if delay > 0:
            self._timers[name] = self._clock.callLater(delay, action)

    def _cancel_timer(self, name: str) -> None:
        call = self._timers.pop(name, None)
        if call is not None and call.active():
            call.cancel()

    def _auth_timed_out(self) -> None:
        self._timers.pop("auth", None)
        self._fail(CLOSE_AUTH_FAILED, "No console token arrived in time.")

    def _idle_timed_out(self) -> None:
        self._timers.pop("idle", None)
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
                    self._start_timer("idle", self._settings.idle_timeout,
                                      self._idle_timed_out)
            elif kind == "r":
                self._size = parse_size(payload)
                if self.sandbox is not None:
                    self.sandbox.resize(*self._size)
            elif kind == "k":
                self._acknowledged(payload)
            elif kind == "a":
                raise ProtocolError("already authenticated")
            else:
                raise ProtocolError(f"unknown message type {kind!r}")
        except ProtocolError as e:
            self._log_client_event("protocol error", "console protocol error from {peer}: {error}",
                                   peer=self._connection.peer_host, error=str(e))
            self._fail(CLOSE_PROTOCOL_ERROR, f"Protocol error: {e}.")

    def closed(self) -> None:
        """The connection is gone: end the sandbox."""
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

    def _release(self) -> None:
        """Give back what this console held: its admission slot, its user."""
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
        if self._end_reason is None:
            self._end_reason = reason

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
        self._start_timer("idle", self._settings.idle_timeout, self._idle_timed_out)
        self._start_timer("age", self._settings.max_age, self._max_age_reached)

    # -- from the sandbox (IConsoleProcessEvents) ------------------------------

    def output(self, data: bytes) -> None:
        if self._metrics is not None:
            self._metrics.output_read(len(data))
        if self.state == "starting":
            self.state = "running"
            self._connection.send("sready")
            log.info("console {console} started for {user} from {client} over {transport}",
                     source=self._start_source,
                     **self._lifecycle_fields("console_started"))
            if self._metrics is not None and self._start_time is not None:
                self._metrics.console_started(self._start_source,
                                              self._clock.seconds() - self._start_time)
        text = self._decoder.decode(data)
        if text and self.state != "ended":
            self._queue_output(text)

    def _queue_output(self, text: str) -> None:
        self._pending.append(text)
        self._pending_units += len(text)
        if self._pending_units >= COALESCE_MAX:
            self._flush_output()
        elif "flush" not in self._timers:
            if self._clock.seconds() - self._last_send >= COALESCE_WINDOW:
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
            self._send_output(text)

    def _send_output(self, text: str) -> None:
        self._connection.send("o" + text)
        self._sent_units += utf16_units(text)
        if (self._acks_enabled and self._gate is not None
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


@define
class ConsoleFactory:
    """Makes a ConsoleSession for each new SockJS connection (its open_session)."""

    _clock: IReactorTime
    _tokens: TokenAuthority
    _sandboxes: ISandboxStarter
    _settings: ConsoleSettings
    _admission: IAdmission | None = None
    _users: UnregisteredUsers | None = None
    sessions: set[ConsoleSession] = field(factory=set)
    metrics: Metrics = field(factory=Metrics)
    _client_events: ClientEventLog = field(init=False)

    def __attrs_post_init__(self) -> None:
        self._client_events = ClientEventLog(log, self._clock)

    def __call__(self, connection) -> ConsoleSession:
        self.metrics.connection_opened(connection.transport_name)
        session = ConsoleSession(connection, self._clock, self._tokens, self._sandboxes,
                                 self._settings, self._admission, self._users,
                                 self.sessions.discard, self._client_events, self.metrics)
        self.sessions.add(session)
        return session

    def use_settings(self, settings: ConsoleSettings) -> None:
        """Give consoles started from now on these settings (a reload);
        running ones keep theirs."""
        self._settings = settings

    def notify_all(self, message: str) -> None:
        """Tell every running console's user something (they go on)."""
        for session in list(self.sessions):
            session.notice(message)

    def end_all(self, message: str, reason: str = "shutdown") -> None:
        """End every console (the kill switch's terminate, a shutdown)."""
        for session in list(self.sessions):
            session.end(message, reason)

    def end_all_by_kill_switch(self, message: str) -> None:
        """End every console: the kill switch's terminate."""
        self.end_all(message, reason="kill_switch")
