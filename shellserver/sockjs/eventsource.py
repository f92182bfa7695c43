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
    # sockjs-client passes each event's data through decodeURI: a bare "%"
    # would throw ("URI malformed") or decode what the program printed, so
    # it is escaped, as are the characters an event cannot hold.
    escaped = (frame.replace(b"%", b"%25").replace(b"\r", b"%0D")
               .replace(b"\n", b"%0A").replace(b"\x00", b"%00"))
    return b"data: " + escaped + b"\r\n\r\n"


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
