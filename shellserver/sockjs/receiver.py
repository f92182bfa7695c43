"""
What the HTTP transports share: a response as the receiver of a session,
and finding (or opening) the session a request names, for its own client
only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

from twisted.internet.interfaces import IPushProducer
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from .endpoint import Endpoint
from .framing import (
    HEARTBEAT_FRAME,
    OPEN_FRAME,
    BrokenPayload,
    close_frame,
    decode_payload,
    encode_message,
    messages_frame,
)
from .headers import (
    TEXT_PLAIN,
    client_address,
    disable_nagle,
    render_not_found,
    render_text,
    request_origin,
    set_cors,
    set_no_cache,
    set_session_cookie,
)
from .session import MESSAGE_TOO_BIG, TOO_MANY_SESSIONS, ForeignSession, SockJSConnection


@implementer(IPushProducer)
class HttpReceiver:
    """
    One HTTP response as the receiver of a session.  Polling responses
    (no C{limit}) carry one frame; streaming responses carry frames until
    C{limit} bytes, and relay their transport's back-pressure to the
    session.

    @param format_frame: turns a SockJS frame into what the transport
        writes (a line, an event, a script block, a JSONP call).
    """

    def __init__(
        self,
        request: IRequest,
        transport_name: str,
        *,
        format_frame: Callable[[bytes], bytes],
        limit: int | None,
    ) -> None:
        self.transport_name = transport_name
        # twisted.web's Request: IRequest omits notifyFinish and producers
        self._request = cast(Request, request)
        self._format_frame = format_frame
        self._limit = limit
        self._written = 0
        self._done = False
        self._registered = False
        self._session: SockJSConnection | None = None

    def start(self, session: SockJSConnection) -> None:
        """
        Attach to C{session}.
        """
        self._session = session
        self._request.notifyFinish().addErrback(self._lost)
        if self._limit is not None:
            self._request.registerProducer(self, True)
            self._registered = True
        session._attach(self)

    def write_open(self) -> bool:
        return self._write_frame(OPEN_FRAME)

    def write_heartbeat(self) -> bool:
        return self._write_frame(HEARTBEAT_FRAME)

    def write_messages(self, encoded: list[bytes]) -> bool:
        return self._write_frame(messages_frame(encoded))

    def write_close(self, code: int, reason: str) -> None:
        if self._write_frame(close_frame(code, reason)):
            self._finish()

    def _write_frame(self, frame: bytes) -> bool:
        if self._done:
            return False
        data = self._format_frame(frame)
        self._request.write(data)
        if self._limit is None:
            self._finish()
            return False
        self._written += len(data)
        if self._written >= self._limit:
            self._finish()
            return False
        return True

    def _finish(self) -> None:
        if self._done:
            return
        self._done = True
        if self._registered:
            self._request.unregisterProducer()
        self._request.finish()

    def _lost(self, reason: Failure) -> None:
        if self._done:
            return
        self._done = True
        if self._session is not None:
            self._session._receiver_lost(self)

    # IPushProducer, registered with the response's transport

    def pauseProducing(self) -> None:
        if self._session is not None:
            self._session._pause_receiver(self)

    def resumeProducing(self) -> None:
        if self._session is not None:
            self._session._resume_receiver(self)

    def stopProducing(self) -> None:
        # connection lost: notifyFinish's errback tells the session
        pass


def request_jsessionid(endpoint: Endpoint, request: IRequest) -> bytes | None:
    """
    The JSESSIONID cookie of C{request} when the endpoint uses cookies.
    """
    if not endpoint.options.cookie_needed:
        return None
    return request.getCookie(b"JSESSIONID")


def find_session(
    endpoint: Endpoint, request: IRequest, session_id: str
) -> SockJSConnection | None:
    """
    The live session C{request} names, if any.

    @raise ForeignSession: if another client opened it, or it shows
        another origin than C{request}'s.
    """
    return endpoint.registry.find(
        session_id,
        peer_host=client_address(request),
        jsessionid=request_jsessionid(endpoint, request),
        origin=request_origin(request),
    )


class PayloadTooBig(Exception):
    """A send request carries more than C{max_message_bytes}."""


# Send requests of one session that may wait for its input budget at once.
# sockjs-client sends one at a time; more in flight is a client pipelining
# or sending in parallel to get around the budget, and gets 429.
MAX_HELD_SENDS = 4
TOO_MANY_SENDS = "Too many sends waiting for the input budget."


def _answer_when_delivered(
    request: IRequest, answer: Callable[[IRequest], bytes]
) -> Callable[[bool], None]:
    """
    What answers a send request once its messages, held for the session's
    input budget, have been handed over (or the session ended first: 404,
    as for a session that is gone).
    """
    lost: list[Failure] = []
    cast(Request, request).notifyFinish().addErrback(lost.append)

    def done(delivered: bool) -> None:
        if lost:
            # the client gave up waiting; its messages were still handed over
            return
        body = answer(request) if delivered else render_not_found(request)
        if body:
            request.write(body)
        request.finish()

    return done


def receive_sent(
    endpoint: Endpoint,
    request: IRequest,
    session_id: str,
    read_payload: Callable[[IRequest, int], bytes],
    answer: Callable[[IRequest], bytes],
    *,
    cors: bool = False,
) -> bytes | int:
    """
    What the send transports (C{xhr_send}, C{jsonp_send}) share: find the
    session, read the messages with C{read_payload} (which raises
    L{PayloadTooBig}) and deliver them within the session's input budget.

    Past the budget the messages are held and the request is answered
    (by C{answer}) only once they have been handed over; meanwhile its HTTP
    channel reads no further requests (twisted.web stops reading a
    connection whose request is unanswered), so the client is slowed.

    @return: the body of C{answer} when delivered at once, C{NOT_DONE_YET}
        when held, or the body of an error response: 404 for no session
        (or another client's), 413 for too much (the session is closed),
        429 for more than L{MAX_HELD_SENDS} held, 500 for a broken payload.
    """
    try:
        session = find_session(endpoint, request, session_id)
    except ForeignSession:
        session = None
    disable_nagle(cast(Request, request).transport)
    set_no_cache(request)
    if cors:
        set_cors(request)
    set_session_cookie(request, endpoint.options)
    if session is None:
        return render_not_found(request)
    if session._held_count >= MAX_HELD_SENDS:
        return render_text(request, 429, TOO_MANY_SENDS)
    try:
        payload = read_payload(request, endpoint.options.max_message_bytes)
    except PayloadTooBig:
        session.close(*MESSAGE_TOO_BIG)
        return render_text(request, 413, MESSAGE_TOO_BIG[1] + ".")
    try:
        messages = decode_payload(payload)
    except BrokenPayload as broken:
        return render_text(request, 500, broken.reason)
    request.setHeader(b"Content-Type", TEXT_PLAIN)
    if session._receive(messages, _answer_when_delivered(request, answer)):
        return answer(request)
    return NOT_DONE_YET


def serve_receiver(
    endpoint: Endpoint,
    request: IRequest,
    session_id: str,
    *,
    transport_name: str,
    content_type: bytes,
    format_frame: Callable[[bytes], bytes],
    streaming: bool,
    prelude: bytes = b"",
    cors: bool = False,
) -> bytes | int:
    """
    Answer a receiver request: attach its response to the session it
    names, opening the session if it does not exist yet.

    A session of another client is answered 404, as if it did not exist;
    a client over its session limit gets the close frame 1013 in the
    transport's own framing, so sockjs-client reports it as a close.
    """
    try:
        session = find_session(endpoint, request, session_id)
    except ForeignSession:
        return render_not_found(request)
    disable_nagle(cast(Request, request).transport)
    request.setHeader(b"Content-Type", content_type)
    set_no_cache(request)
    if cors:
        set_cors(request)
    set_session_cookie(request, endpoint.options)
    if prelude:
        request.write(prelude)
    receiver = HttpReceiver(
        request,
        transport_name,
        format_frame=format_frame,
        limit=endpoint.options.response_limit if streaming else None,
    )
    if session is None:
        peer = client_address(request)
        if not endpoint.registry.has_room_for(peer):
            receiver.write_close(*TOO_MANY_SESSIONS)
            return NOT_DONE_YET
        session = endpoint.registry.open(
            session_id=session_id,
            peer_host=peer,
            origin=request_origin(request),
            transport_name=transport_name,
            encode=encode_message,
            bound=False,
            jsessionid=request_jsessionid(endpoint, request),
        )
    receiver.start(session)
    return NOT_DONE_YET
