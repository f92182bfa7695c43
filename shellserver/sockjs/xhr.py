"""
The XMLHttpRequest transports: C{xhr} (polling), C{xhr_streaming} and
C{xhr_send} (messages from the client for both).
"""

from __future__ import annotations

from twisted.internet.interfaces import IPushProducer
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.server import NOT_DONE_YET
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
    JAVASCRIPT,
    TEXT_PLAIN,
    disable_nagle,
    peer_host,
    render_not_found,
    render_text,
    request_origin,
    set_cors,
    set_no_cache,
    set_session_cookie,
)
from .session import MESSAGE_TOO_BIG, SockJSConnection

# Some browsers only hand a streaming response to the page once they have
# seen this much of it.
STREAMING_PRELUDE = b"h" * 2048 + b"\n"


@implementer(IPushProducer)
class _XhrReceiver:
    """
    One xhr response as the receiver of a session.  Polling responses
    carry one frame; streaming responses carry frames until
    C{response_limit} bytes, and relay their transport's back-pressure to
    the session.
    """

    def __init__(self, request: IRequest, transport_name: str, limit: int | None) -> None:
        self.transport_name = transport_name
        self._request = request
        self._limit = limit
        self._written = 0
        self._done = False
        self._session: SockJSConnection | None = None

    def start(self, session: SockJSConnection) -> None:
        self._session = session
        self._request.notifyFinish().addErrback(self._lost)
        if self._limit is not None:
            self._request.registerProducer(self, True)
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
        data = frame + b"\n"
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
        if self._limit is not None:
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


def _start_response(request: IRequest, endpoint: Endpoint) -> None:
    disable_nagle(request.transport)
    request.setHeader(b"Content-Type", JAVASCRIPT)
    set_no_cache(request)
    set_cors(request)
    set_session_cookie(request, endpoint.options)


def _session_for(
    endpoint: Endpoint, request: IRequest, session_id: str, transport_name: str
) -> SockJSConnection:
    session = endpoint.registry.get(session_id)
    if session is None:
        session = endpoint.registry.open(
            session_id=session_id,
            peer_host=peer_host(request.getClientAddress()),
            origin=request_origin(request),
            transport_name=transport_name,
            encode=encode_message,
            bound=False,
        )
    return session


def render_polling(endpoint: Endpoint, request: IRequest, session_id: str) -> int:
    """
    C{POST .../xhr}: open or poll a session; answers with one frame.
    """
    _start_response(request, endpoint)
    receiver = _XhrReceiver(request, "xhr-polling", limit=None)
    receiver.start(_session_for(endpoint, request, session_id, "xhr-polling"))
    return NOT_DONE_YET


def render_streaming(endpoint: Endpoint, request: IRequest, session_id: str) -> int:
    """
    C{POST .../xhr_streaming}: open or attach to a session; answers with a
    prelude and then frames, one per line, until C{response_limit}.
    """
    _start_response(request, endpoint)
    request.write(STREAMING_PRELUDE)
    receiver = _XhrReceiver(request, "xhr-streaming", limit=endpoint.options.response_limit)
    receiver.start(_session_for(endpoint, request, session_id, "xhr-streaming"))
    return NOT_DONE_YET


def render_send(endpoint: Endpoint, request: IRequest, session_id: str) -> bytes:
    """
    C{POST .../xhr_send}: messages from the client, a JSON array of strings.
    """
    disable_nagle(request.transport)
    set_no_cache(request)
    set_cors(request)
    set_session_cookie(request, endpoint.options)
    session = endpoint.registry.get(session_id)
    if session is None:
        return render_not_found(request)
    limit = endpoint.options.max_message_bytes
    data = request.content.read(limit + 1)
    if len(data) > limit:
        session.close(*MESSAGE_TOO_BIG)
        return render_text(request, 413, MESSAGE_TOO_BIG[1] + ".")
    try:
        messages = decode_payload(data)
    except BrokenPayload as broken:
        return render_text(request, 500, broken.reason)
    request.setResponseCode(204)
    request.setHeader(b"Content-Type", TEXT_PLAIN)
    session._deliver(messages)
    return b""
