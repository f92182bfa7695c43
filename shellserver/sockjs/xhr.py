"""
The XMLHttpRequest transports: C{xhr} (polling), C{xhr_streaming} and
C{xhr_send} (messages from the client for every HTTP transport).
"""

from __future__ import annotations

from twisted.web.iweb import IRequest

from .endpoint import Endpoint
from .headers import (
    JAVASCRIPT,
)
from .receiver import PayloadTooBig, receive_sent, serve_receiver

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


def _read_body(request: IRequest, limit: int) -> bytes:
    body = request.content.read(limit + 1)
    if len(body) > limit:
        raise PayloadTooBig()
    return body


def _no_content(request: IRequest) -> bytes:
    request.setResponseCode(204)
    return b""


def render_send(endpoint: Endpoint, request: IRequest, session_id: str) -> bytes | int:
    """
    C{POST .../xhr_send}: messages from the client, a JSON array of strings;
    answered 204 once they are handed to the session (later, past its input
    budget).
    """
    return receive_sent(endpoint, request, session_id, _read_body, _no_content, cors=True)
