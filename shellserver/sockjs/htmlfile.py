"""
The htmlfile transport: C{GET .../htmlfile?c=callback}, an HTML page that
sockjs-client loads in a hidden iframe and that streams one C{<script>}
per frame, calling C{parent.<callback>}.
"""

from __future__ import annotations

from twisted.web.iweb import IRequest

from .endpoint import Endpoint
from .framing import InvalidCallback, check_callback, encode_script_string
from .headers import HTML, render_text
from .receiver import serve_receiver

_HEAD = b"""\
<!doctype html>
<html><head>
  <meta http-equiv="X-UA-Compatible" content="IE=edge" />
  <meta http-equiv="Content-Type" content="text/html; charset=UTF-8" />
</head><body><h2>Don't panic!</h2>
  <script>
    document.domain = document.domain;
    var c = parent.%s;
    c.start();
    function p(d) {c.message(d);};
    window.onload = function() {c.stop();};
  </script>"""

# Browsers wait for 1 KiB of a document before they run any of it.
_HEAD_SIZE = 1024


def htmlfile_prelude(callback: bytes) -> bytes:
    """
    The start of the page, for a callback that passed L{check_callback}.
    """
    head = _HEAD % (callback,)
    return head + b" " * (_HEAD_SIZE - len(head)) + b"\r\n\r\n"


def _script(frame: bytes) -> bytes:
    # encode_script_string escapes "<", so a message cannot end the script
    return b"<script>\np(" + encode_script_string(frame) + b");\n</script>\r\n"


def render_htmlfile(endpoint: Endpoint, request: IRequest, session_id: str) -> bytes | int:
    """
    C{GET .../htmlfile?c=callback}: open or attach to a session; answers
    with script blocks until C{response_limit} bytes.
    """
    try:
        callback = check_callback(request.args.get(b"c", [None])[0])
    except InvalidCallback as invalid:
        return render_text(request, 500, invalid.reason)
    return serve_receiver(
        endpoint,
        request,
        session_id,
        transport_name="htmlfile",
        content_type=HTML,
        format_frame=_script,
        streaming=True,
        prelude=htmlfile_prelude(callback),
    )
