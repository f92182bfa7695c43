"""
The JSONP transport: C{GET .../jsonp?c=callback} polls with a script that
calls the callback with one frame; C{POST .../jsonp_send} takes messages
from a hidden form (C{d=<payload>}) or as a plain body.
"""

from __future__ import annotations

from functools import partial
from urllib.parse import parse_qs

from twisted.web.iweb import IRequest

from .endpoint import Endpoint
from .framing import (
    InvalidCallback,
    check_callback,
    encode_script_string,
)
from .headers import (
    JAVASCRIPT,
    render_text,
)
from .receiver import PayloadTooBig, receive_sent, serve_receiver

FORM_ENCODED = b"application/x-www-form-urlencoded"

# Percent-encoding writes a byte as up to three.
_FORM_EXPANSION = 3


def _call(callback: bytes, frame: bytes) -> bytes:
    # the leading comment keeps the body from starting with bytes the
    # client chose (Rosetta Flash)
    return b"/**/" + callback + b"(" + encode_script_string(frame) + b");\r\n"


def render_polling(endpoint: Endpoint, request: IRequest, session_id: str) -> bytes | int:
    """
    C{GET .../jsonp?c=callback}: open or poll a session; answers with one
    frame, as a call of C{callback}.
    """
    try:
        callback = check_callback(request.args.get(b"c", [None])[0])
    except InvalidCallback as invalid:
        return render_text(request, 500, invalid.reason)
    return serve_receiver(
        endpoint,
        request,
        session_id,
        transport_name="jsonp-polling",
        content_type=JAVASCRIPT,
        format_frame=partial(_call, callback),
        streaming=False,
    )


def _read_payload(request: IRequest, limit: int) -> bytes:
    """
    The payload of a C{jsonp_send} request: the C{d} field of a form, or
    the whole body otherwise.

    @raise PayloadTooBig: if it is over C{limit} bytes.
    """
    content_type = request.getHeader(b"content-type") or b""
    form = content_type.split(b";")[0].strip().lower() == FORM_ENCODED
    raw_limit = limit * _FORM_EXPANSION + len(b"d=") if form else limit
    request.content.seek(0)
    body = request.content.read(raw_limit + 1)
    if len(body) > raw_limit:
        raise PayloadTooBig()
    if not form:
        return body
    try:
        fields = parse_qs(body, keep_blank_values=True, max_num_fields=8)
    except ValueError:
        # more fields than sockjs-client's form ever has
        return b""
    payload = fields.get(b"d", [b""])[0]
    if len(payload) > limit:
        raise PayloadTooBig()
    return payload


def _ok(request: IRequest) -> bytes:
    return b"ok"


def render_send(endpoint: Endpoint, request: IRequest, session_id: str) -> bytes | int:
    """
    C{POST .../jsonp_send}: messages from the client; answers "ok" (some
    browsers mishandle 204 in an iframe) once they are handed to the session
    (later, past its input budget).
    """
    return receive_sent(endpoint, request, session_id, _read_payload, _ok)
