"""
The EventSource transport: C{GET .../eventsource}, a C{text/event-stream}
response with one C{data:} event per frame.
"""

from __future__ import annotations

from twisted.web.iweb import IRequest

from .endpoint import Endpoint
from .receiver import serve_receiver

EVENT_STREAM = b"text/event-stream"

# Opera needed a new line before the first event.
EVENTSOURCE_PRELUDE = b"\r\n"


def _event(frame: bytes) -> bytes:
    # frames are JSON or single letters: never a new line inside
    return b"data: " + frame + b"\r\n\r\n"


def render_eventsource(endpoint: Endpoint, request: IRequest, session_id: str) -> bytes | int:
    """
    C{GET .../eventsource}: open or attach to a session; answers with
    events until C{response_limit} bytes.
    """
    return serve_receiver(
        endpoint,
        request,
        session_id,
        transport_name="eventsource",
        content_type=EVENT_STREAM,
        format_frame=_event,
        streaming=True,
        prelude=EVENTSOURCE_PRELUDE,
    )
