"""
The XMLHttpRequest transports: C{xhr} (polling), C{xhr_streaming} and
C{xhr_send} (messages from the client for every HTTP transport).
"""

from __future__ import annotations

from twisted.web.iweb import IRequest

from .endpoint import Endpoint
from .framing import BrokenPayload, decode_payload
from .headers import (
    JAVASCRIPT,
    TEXT_PLAIN,
    disable_nagle,
    render_not_found,
    render_text,
    set_cors,
    set_no_cache,
    set_session_cookie,
)
from .receiver import find_session, serve_receiver
from .session import MESSAGE_TOO_BIG, ForeignSession

# Some browsers only hand a streaming response to the page once they have
# seen this much of it.
STREAMING_PRELUDE = b"h" * 2048 + b"\n"


def _line(frame: bytes) -> bytes:
    return frame + b"\n"


def render_polling(endpoint: Endpoint, request: IRequest, session_id: str) -> bytes | int:
    """
    C{POST .../xhr}: open or poll a session; answers with one frame.
    """
    return serve_receiver(
        endpoint,
        request,
        session_id,
        transport_name="xhr-polling",
        content_type=JAVASCRIPT,
        format_frame=_line,
        streaming=False,
        cors=True,
    )


def render_streaming(endpoint: Endpoint, request: IRequest, session_id: str) -> bytes | int:
    """
    C{POST .../xhr_streaming}: open or attach to a session; answers with a
    prelude and then frames, one per line, until C{response_limit}.
    """
    return serve_receiver(
        endpoint,
        request,
        session_id,
        transport_name="xhr-streaming",
        content_type=JAVASCRIPT,
        format_frame=_line,
        streaming=True,
        prelude=STREAMING_PRELUDE,
        cors=True,
    )


def render_send(endpoint: Endpoint, request: IRequest, session_id: str) -> bytes:
    """
    C{POST .../xhr_send}: messages from the client, a JSON array of strings.
    """
    try:
        session = find_session(endpoint, request, session_id)
    except ForeignSession:
        session = None
    disable_nagle(request.transport)
    set_no_cache(request)
    set_cors(request)
    set_session_cookie(request, endpoint.options)
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
