"""
SockJS sessions, independent of the transports that carry them.

A session outlives the HTTP requests of the polling and streaming transports:
it queues outgoing messages while no receiver is attached, times out
C{disconnect_delay} after the last receiver went, and sends heartbeats to the
attached receiver.  Transports are thin adapters that implement L{Receiver}
and call the session's transport-side methods (those with a leading
underscore, used only inside this package).
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from attrs import define, evolve, field, frozen
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.logger import Logger, LogLevel

from ..logs import ClientEventLog
from .budget import InputBudget
from .options import SockJSOptions

if TYPE_CHECKING:
    from shellserver.config import InputBudgetSettings

log = Logger()

# Held input is handed to the application at most this many messages per
# reactor turn, so that one session's backlog never keeps the others waiting.
DELIVER_PER_TURN = 256
# The count of messages handed over in a turn is reset by a call on the next
# turn, started only once this many are counted: a keystroke now and then
# costs no timer, and the count may include up to this many messages of
# earlier turns (a turn may then hand over a few fewer, never more).
COUNTED_BEFORE_TIMER = 32

GO_AWAY = (3000, "Go away!")
ANOTHER_CONNECTION_OPEN = (2010, "Another connection still open")
CONNECTION_INTERRUPTED = (1002, "Connection interrupted")
MESSAGE_TOO_BIG = (1009, "Message too big")
INTERNAL_ERROR = (1011, "Internal error")
BROKEN_FRAMING = (3000, "Broken framing.")
# 1013 is the websocket registry's "Try Again Later"
TOO_MANY_SESSIONS = (1013, "Too many sessions from your address")


class SockJSHandler(Protocol):
    """
    What C{open_session(connection)} returns: the application's side of one
    session.
    """

    def message_received(self, text: str) -> None:
        """
        One message from the client, in order.
        """

    def closed(self) -> None:
        """
        The session is gone; called exactly once.
        """


class Receiver(Protocol):
    """
    The transport side of a session: one websocket, or one xhr response.

    Each C{write_*} method returns whether the receiver stays attached; a
    polling response takes a single frame and ends, a streaming response
    ends when it reaches its size limit.  C{write_close} always ends it.
    """

    transport_name: str

    def write_open(self) -> bool: ...

    def write_heartbeat(self) -> bool: ...

    def write_messages(self, encoded: list[bytes]) -> bool: ...

    def write_close(self, code: int, reason: str) -> None: ...


class _State(enum.Enum):
    OPEN = "open"
    # closed for the application; the close frame is still served to new
    # receivers until the session expires
    CLOSING = "closing"
    CLOSED = "closed"


def _nothing_to_forget(connection: SockJSConnection) -> None:
    pass


def _message_bytes(text: str) -> int:
    if text.isascii():
        return len(text)
    return len(text.encode("utf-8", "surrogatepass"))


@define(eq=False)
class _HeldInput:
    """
    Messages the session has accepted from its transport but not yet handed
    to the application (the session is over its input budget), and whom to
    tell once they have been: C{done(True)}, or C{done(False)} if the
    session ended first.
    """

    messages: list[str]
    done: Callable[[bool], None] | None
    delivered: int = 0


@define(eq=False)
class SockJSConnection:
    """
    One SockJS session, as the application sees it.

    @ivar peer_host: the client's IP address as text (empty if the
        connection has no IP address, e.g. a UNIX socket).
    @ivar origin: the origin the session shows: the C{Origin} header of
        the first of its requests that carried one (the opening request, or
        for sessions opened without, such as JSONP's script tags, a later
        send), or None while none has.  Every later request that carries an
        C{Origin} must carry the same (L{SessionRegistry.find}).  Checking
        it is the application's job.
    @ivar transport_name: the transport attached last: C{"websocket"},
        C{"websocket-raw"}, C{"xhr-streaming"}, C{"xhr-polling"},
        C{"eventsource"}, C{"htmlfile"} or C{"jsonp-polling"}.
    @ivar session_id: the client-chosen session id from the URL.
    """

    session_id: str
    peer_host: str
    origin: str | None
    transport_name: str
    _clock: IReactorTime
    _options: SockJSOptions
    _encode: Callable[[str], bytes]
    # True for websocket sessions: their life is the life of one receiver
    _bound: bool = False
    _forget: Callable[[SockJSConnection], None] = _nothing_to_forget
    # the JSESSIONID the opening request carried, when cookies are in use:
    # later requests for the session must carry the same
    _jsessionid: bytes | None = None
    # told how many held messages were dropped when the session ended
    _input_dropped: Callable[[int], None] | None = None

    _handler: SockJSHandler | None = field(default=None, init=False)
    _opening: bool = field(default=False, init=False)
    _state: _State = field(default=_State.OPEN, init=False)
    _close_reason: tuple[int, str] = field(default=GO_AWAY, init=False)
    _closed_notified: bool = field(default=False, init=False)
    _open_frame_sent: bool = field(default=False, init=False)
    _outgoing: list[bytes] = field(factory=list, init=False)
    _pending_bytes: int = field(default=0, init=False)
    _receiver: Receiver | None = field(default=None, init=False)
    _receiver_paused: bool = field(default=False, init=False)
    _heartbeat_call: IDelayedCall | None = field(default=None, init=False)
    _expiry_call: IDelayedCall | None = field(default=None, init=False)
    _producer: IPushProducer | None = field(default=None, init=False)
    _producer_paused: bool = field(default=False, init=False)
    _budget: InputBudget = field(init=False)
    _held: deque[_HeldInput] = field(factory=deque, init=False)
    _drain_call: IDelayedCall | None = field(default=None, init=False)
    # when the current stretch over the input budget began, if one is on
    _slowed_since: float | None = field(default=None, init=False)
    _slowed_count: int = field(default=0, init=False)
    # messages handed over in this reactor turn, and the call that starts
    # the next turn's count
    _turn_count: int = field(default=0, init=False)
    _turn_call: IDelayedCall | None = field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        self._budget = InputBudget(
            clock=self._clock,
            messages_per_second=self._options.input_messages_per_second,
            bytes_per_second=self._options.input_bytes_per_second,
            burst_messages=self._options.input_burst_messages,
            burst_bytes=self._options.input_burst_bytes,
        )

    # -- the application's side ---------------------------------------------

    @property
    def is_open(self) -> bool:
        """
        Whether messages can still be sent and received.
        """
        return self._state is _State.OPEN

    @property
    def pending_bytes(self) -> int:
        """
        Bytes of messages queued and not yet handed to a transport.
        """
        return self._pending_bytes

    def send(self, text: str) -> None:
        """
        Queue one message for the client.  Messages are delivered in order,
        across reconnects of the polling transports; after the session
        closed they are dropped.
        """
        if self._state is not _State.OPEN:
            log.debug(
                "dropped a message for closed session {session}",
                session=self.session_id,
            )
            return
        encoded = self._encode(text)
        self._outgoing.append(encoded)
        self._pending_bytes += len(encoded)
        self._flush()
        self._check_watermarks()

    def close(self, code: int = GO_AWAY[0], reason: str = GO_AWAY[1]) -> None:
        """
        Send the close frame and end the session; C{handler.closed()}
        follows.  Messages queued before are delivered first.
        """
        if self._state is not _State.OPEN:
            return
        self._state = _State.CLOSING
        self._close_reason = (code, reason)
        self._stop_heartbeat()
        receiver = self._receiver
        if receiver is not None:
            # The session ends: whatever was queued goes out now, even to
            # a receiver whose transport asked for a pause.
            if self._send_outgoing(receiver) and self._receiver is receiver:
                self._receiver = None
                receiver.write_close(code, reason)
                self._receiver_gone()
        self._notify_closed()

    def register_producer(self, producer: IPushProducer) -> None:
        """
        Pause C{producer} while more than C{high_watermark} bytes are
        pending, resume it once fewer than C{low_watermark} are.

        @raise RuntimeError: if a producer is registered already.
        """
        if self._producer is not None:
            raise RuntimeError(f"{self._producer!r} is registered already")
        self._producer = producer
        self._producer_paused = False
        self._check_watermarks()

    def unregister_producer(self) -> None:
        """
        Stop pausing and resuming the registered producer.
        """
        self._producer = None
        self._producer_paused = False

    # -- the transports' side -----------------------------------------------

    def _start(self, open_session: Callable[[SockJSConnection], SockJSHandler]) -> None:
        """
        Announce the session to the application.
        """
        self._opening = True
        try:
            handler = open_session(self)
        except Exception:
            log.failure("opening SockJS session {session} failed", session=self.session_id)
            self._opening = False
            self.close(*INTERNAL_ERROR)
        else:
            self._opening = False
            self._handler = handler
            if self._state is not _State.OPEN:
                # open_session closed the session itself
                self._call_closed()
        if self._receiver is None and not self._bound:
            self._schedule_expiry()

    def _attach(self, receiver: Receiver) -> None:
        """
        A transport wants the session's output.
        """
        if self._state is _State.CLOSED:
            receiver.write_close(*self._close_reason)
            return
        if self._receiver is not None:
            receiver.write_close(*ANOTHER_CONNECTION_OPEN)
            return
        self._cancel_expiry()
        self._receiver = receiver
        self._receiver_paused = False
        self.transport_name = receiver.transport_name
        if not self._open_frame_sent:
            self._open_frame_sent = True
            if not receiver.write_open():
                self._detach()
                return
        if self._state is _State.OPEN:
            self._flush()
            if self._receiver is receiver:
                self._start_heartbeat()
            self._check_watermarks()
        elif self._send_outgoing(receiver) and self._receiver is receiver:
            self._receiver = None
            receiver.write_close(*self._close_reason)
            self._receiver_gone()

    def _receiver_lost(self, receiver: Receiver) -> None:
        """
        The receiver's connection went away before it ended by itself: the
        client's state is unknown now, so the session closes (code 1002).
        """
        if receiver is not self._receiver:
            return
        self._receiver = None
        self._stop_heartbeat()
        if self._state is _State.OPEN:
            self._state = _State.CLOSING
            self._close_reason = CONNECTION_INTERRUPTED
            self._notify_closed()
        self._receiver_gone()

    def _pause_receiver(self, receiver: Receiver) -> None:
        """
        The receiver's transport buffer is full: hold output in the queue.
        """
        if receiver is self._receiver:
            self._receiver_paused = True

    def _resume_receiver(self, receiver: Receiver) -> None:
        """
        The receiver's transport can take output again.
        """
        if receiver is self._receiver and self._receiver_paused:
            self._receiver_paused = False
            self._flush()
            self._check_watermarks()

    @property
    def _held_count(self) -> int:
        """
        How many batches of input (websocket messages, send requests) wait
        for the input budget.
        """
        return len(self._held)

    def _receive(self, messages: list[str], done: Callable[[bool], None]) -> bool:
        """
        Messages from the client, within the session's input budget: handed
        to the application now if the budget allows and nothing is held
        before them; otherwise held, in order, and handed over as the budget
        refills (at most L{DELIVER_PER_TURN} per reactor turn).

        @param done: called once with C{True} when held messages have all
            been handed over, or with C{False} if the session ended first;
            not called when this returns C{True}.
        @return: whether all of C{messages} were handed over now.  If not,
            the transport should stop reading from the client until
            C{done} is called: that is how a flood is slowed.
        """
        if self._state is not _State.OPEN:
            return True
        if not self._held and self._slowed_since is not None and self._budget.is_full():
            self._slowed_since = None
        if (len(messages) == 1 and not self._held and self._drain_call is None
                and self._turn_count < DELIVER_PER_TURN and self._budget.allows()):
            # One message (a keystroke) with nothing before it: handed over
            # as _drain would, without holding it first.
            self._hand_over(messages[0])
            return True
        item = _HeldInput(messages, None)
        self._held.append(item)
        if len(self._held) == 1 and self._drain_call is None:
            self._drain()
            if not self._held:
                # all handed over (or the session ended meanwhile)
                return True
        item.done = done
        return False

    def _drain(self) -> None:
        """
        Hand held input to the application while the budget allows.
        """
        self._drain_call = None
        while self._held and self._state is _State.OPEN:
            item = self._held[0]
            while item.delivered < len(item.messages):
                if self._turn_count >= DELIVER_PER_TURN:
                    # let the reactor serve the others first
                    self._drain_call = self._clock.callLater(0, self._drain)
                    return
                if not self._budget.allows():
                    self._note_slowed()
                    self._drain_call = self._clock.callLater(
                        self._budget.seconds_until_allowed(), self._drain
                    )
                    return
                text = item.messages[item.delivered]
                item.delivered += 1
                self._hand_over(text)
                if self._state is not _State.OPEN:
                    # ending the session dropped what was held
                    return
            self._held.popleft()
            if item.done is not None:
                item.done(True)

    def _hand_over(self, text: str) -> None:
        """One message to the application, counted in this turn and charged
        to the input budget."""
        self._count_in_turn()
        self._budget.charge(_message_bytes(text))
        self._deliver([text])

    def _count_in_turn(self) -> None:
        # a raw websocket hands over one message per frame, each in its own
        # call: the count spans calls, until the reactor turns
        self._turn_count += 1
        if self._turn_count >= COUNTED_BEFORE_TIMER and self._turn_call is None:
            self._turn_call = self._clock.callLater(0, self._next_turn)

    def _next_turn(self) -> None:
        self._turn_call = None
        self._turn_count = 0

    def _note_slowed(self) -> None:
        if self._slowed_since is not None:
            return
        self._slowed_since = self._clock.seconds()
        self._slowed_count += 1
        log.info(
            "SockJS session {session} ({transport}) from {peer} is over its input "
            "budget: its input is slowed",
            session=self.session_id,
            transport=self.transport_name,
            peer=self.peer_host,
        )

    def _drop_held(self) -> None:
        """
        The session ends: held input will never be handed over.
        """
        if self._drain_call is not None:
            if self._drain_call.active():
                self._drain_call.cancel()
            self._drain_call = None
        if self._turn_call is not None:
            if self._turn_call.active():
                self._turn_call.cancel()
            self._turn_call = None
            self._turn_count = 0
        held = list(self._held)
        self._held.clear()
        dropped = sum(len(item.messages) - item.delivered for item in held)
        if dropped and self._input_dropped is not None:
            self._input_dropped(dropped)
        for item in held:
            if item.done is not None:
                item.done(False)

    def _deliver(self, messages: list[str]) -> None:
        """
        Hand messages from the client to the application, in order.
        """
        for text in messages:
            if self._state is not _State.OPEN or self._handler is None:
                return
            try:
                self._handler.message_received(text)
            except Exception:
                log.failure(
                    "SockJS session {session} failed to handle a message",
                    session=self.session_id,
                )
                self.close(*INTERNAL_ERROR)
                return

    # -- internals ----------------------------------------------------------

    def _flush(self) -> None:
        receiver = self._receiver
        if receiver is not None and not self._receiver_paused:
            self._send_outgoing(receiver)

    def _send_outgoing(self, receiver: Receiver) -> bool:
        """
        Hand the queue to C{receiver}; return whether it is still attached.
        """
        if not self._outgoing:
            return True
        batch = self._outgoing
        self._outgoing = []
        self._pending_bytes = 0
        if receiver.write_messages(batch):
            return True
        self._detach()
        return False

    def _detach(self) -> None:
        self._receiver = None
        self._stop_heartbeat()
        self._receiver_gone()

    def _receiver_gone(self) -> None:
        if self._bound:
            # a websocket session ends with its one connection
            if self._state is _State.OPEN:
                self._state = _State.CLOSING
                self._close_reason = CONNECTION_INTERRUPTED
                self._notify_closed()
            self._forget_session()
        else:
            self._schedule_expiry()

    def _check_watermarks(self) -> None:
        producer = self._producer
        if producer is None:
            return
        if not self._producer_paused:
            if self._pending_bytes > self._options.high_watermark:
                self._producer_paused = True
                producer.pauseProducing()
        elif self._pending_bytes < self._options.low_watermark:
            self._producer_paused = False
            producer.resumeProducing()

    def _start_heartbeat(self) -> None:
        self._stop_heartbeat()
        self._heartbeat_call = self._clock.callLater(
            self._options.heartbeat_interval, self._heartbeat
        )

    def _stop_heartbeat(self) -> None:
        if self._heartbeat_call is not None:
            if self._heartbeat_call.active():
                self._heartbeat_call.cancel()
            self._heartbeat_call = None

    def _heartbeat(self) -> None:
        self._heartbeat_call = None
        receiver = self._receiver
        if receiver is None or self._state is not _State.OPEN:
            return
        # a paused transport is busy with data anyway; skip this beat
        if not self._receiver_paused and not receiver.write_heartbeat():
            self._detach()
            return
        self._start_heartbeat()

    def _schedule_expiry(self) -> None:
        self._cancel_expiry()
        self._expiry_call = self._clock.callLater(self._options.disconnect_delay, self._expire)

    def _cancel_expiry(self) -> None:
        if self._expiry_call is not None:
            if self._expiry_call.active():
                self._expiry_call.cancel()
            self._expiry_call = None

    def _expire(self) -> None:
        self._expiry_call = None
        if self._state is _State.OPEN:
            self._state = _State.CLOSING
            self._notify_closed()
        self._forget_session()

    def _forget_session(self) -> None:
        self._cancel_expiry()
        self._stop_heartbeat()
        self._state = _State.CLOSED
        self._outgoing = []
        self._pending_bytes = 0
        self._producer = None
        self._forget(self)

    def _notify_closed(self) -> None:
        self._drop_held()
        if self._slowed_count:
            log.info(
                "SockJS session {session} from {peer} went over its input budget "
                "{count} times",
                session=self.session_id,
                peer=self.peer_host,
                count=self._slowed_count,
            )
            self._slowed_count = 0
        if self._opening:
            # _start calls the handler's closed() once open_session returns
            return
        self._call_closed()

    def _call_closed(self) -> None:
        handler = self._handler
        if handler is None or self._closed_notified:
            return
        self._closed_notified = True
        try:
            handler.closed()
        except Exception:
            log.failure(
                "SockJS session {session} failed to handle its end",
                session=self.session_id,
            )


@frozen(auto_exc=True)
class ForeignSession(Exception):
    """
    A request named a session that another client opened.

    @ivar session_id: the session asked for.
    @ivar peer_host: the address of the client that asked.
    """

    session_id: str
    peer_host: str


@define
class SessionRegistry:
    """
    The sessions of one endpoint: those that outlive single requests (all
    but the websocket ones) by session id, and all of them by client
    address, for the per-address limit.
    """

    _open_session: Callable[[SockJSConnection], SockJSHandler]
    _clock: IReactorTime
    _options: SockJSOptions
    # told how many messages held over the input budget a session dropped
    input_dropped: Callable[[int], None] | None = None
    _sessions: dict[str, SockJSConnection] = field(factory=dict, init=False)
    _by_peer: dict[str, set[SockJSConnection]] = field(factory=dict, init=False)
    # refusals are the client's doing: logged within a budget per address
    _client_events: ClientEventLog = field(init=False)

    def __attrs_post_init__(self) -> None:
        self._client_events = ClientEventLog(log, self._clock)

    def use_input_budget(self, budget: InputBudgetSettings) -> None:
        """Give sessions opened from now on this input budget (a reload);
        open ones keep theirs."""
        self._options = evolve(self._options, **budget)

    def get(self, session_id: str) -> SockJSConnection | None:
        """
        The live session with this id, if any, whoever opened it.
        """
        return self._sessions.get(session_id)

    def find(
        self,
        session_id: str,
        *,
        peer_host: str,
        jsessionid: bytes | None,
        origin: str | None = None,
    ) -> SockJSConnection | None:
        """
        The live session with this id, if any, for a request from
        C{peer_host} carrying C{jsessionid} and the C{Origin} C{origin}.

        A session id is chosen by the client and travels in URLs, so it is
        no secret: a session answers only the address that opened it (and,
        if that request carried a JSESSIONID cookie, only that cookie).  It
        also answers only requests whose C{Origin}, if they carry one, is
        the origin it shows; the first such request of a session opened
        without one sets it (a JSONP session opened by a script tag, whose
        sends come from a form with the page's Origin).

        @raise ForeignSession: if the session belongs to another client, or
            shows another origin.
        """
        session = self._sessions.get(session_id)
        if session is None:
            return None
        if session.peer_host != peer_host or (
            session._jsessionid is not None and session._jsessionid != jsessionid
        ):
            self._client_events.warn(
                peer_host,
                "foreign session",
                "refused {peer} access to SockJS session {session} of {owner}",
                peer=peer_host,
                session=session_id,
                owner=session.peer_host,
            )
            raise ForeignSession(session_id, peer_host)
        if origin is not None:
            if session.origin is None:
                session.origin = origin
            elif session.origin != origin:
                log.warn(
                    "refused {peer} access to SockJS session {session}: Origin "
                    "{origin!r}, not the session's {shown!r}",
                    peer=peer_host,
                    session=session_id,
                    origin=origin[:100],
                    shown=session.origin[:100],
                )
                raise ForeignSession(session_id, peer_host)
        return session

    def has_room_for(self, peer_host: str) -> bool:
        """
        Whether C{peer_host} may open one more session.  Peers without an
        IP address (UNIX sockets, hence usually a proxy) are not limited.
        """
        if not peer_host:
            return True
        held = len(self._by_peer.get(peer_host, ()))
        if held < self._options.max_sessions_per_address:
            return True
        self._client_events.warn(
            peer_host,
            "too many sessions",
            "refused a new SockJS session to {peer}, which holds {count}",
            peer=peer_host,
            count=held,
        )
        return False

    def open(
        self,
        *,
        session_id: str,
        peer_host: str,
        origin: str | None,
        transport_name: str,
        encode: Callable[[str], bytes],
        bound: bool,
        jsessionid: bytes | None = None,
    ) -> SockJSConnection:
        """
        Create a session and announce it to the application; unbound
        sessions are registered under their id until they expire.  Callers
        check L{has_room_for} first.
        """
        connection = SockJSConnection(
            session_id=session_id,
            peer_host=peer_host,
            origin=origin,
            transport_name=transport_name,
            clock=self._clock,
            options=self._options,
            encode=encode,
            bound=bound,
            forget=self._forget,
            jsessionid=jsessionid,
            input_dropped=self.input_dropped,
        )
        if not bound:
            self._sessions[session_id] = connection
        self._by_peer.setdefault(peer_host, set()).add(connection)
        # Anyone can open sessions at any rate: within the address's budget.
        self._client_events.emit(
            LogLevel.debug,
            peer_host,
            "session opened",
            "SockJS session {session} opened over {transport} from {peer}",
            session=session_id,
            transport=transport_name,
            peer=peer_host,
        )
        connection._start(self._open_session)
        return connection

    def _forget(self, connection: SockJSConnection) -> None:
        if self._sessions.get(connection.session_id) is connection:
            del self._sessions[connection.session_id]
        held = self._by_peer.get(connection.peer_host)
        if held is not None:
            held.discard(connection)
            if not held:
                del self._by_peer[connection.peer_host]

    def __len__(self) -> int:
        return len(self._sessions)
