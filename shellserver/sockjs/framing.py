"""
SockJS frames: what the server writes (C{o}, C{h}, C{a[...]}, C{c[...]}) and
the JSON payloads the client sends.  Pure functions, no I/O.
"""

import json
import re
from json.encoder import encode_basestring

import orjson
import ujson
from attrs import frozen

OPEN_FRAME = b"o"
# Output whose lines average this many characters or more is encoded by
# orjson (see encode_message), judged by the first LINE_SAMPLE characters.
LONG_LINE = 32
LINE_SAMPLE = 256
HEARTBEAT_FRAME = b"h"

# JSON leaves these characters raw, but browsers and proxies mangle them
# (invisible formatting characters, line separators, non-characters), and
# lone surrogates are not even encodable as UTF-8; SockJS escapes them as
# \uXXXX.  json itself already escapes U+0000..U+001F, quote and backslash.
_ESCAPABLE = re.compile("[\u200c-\u200f\u2028-\u202f\u2060-\u206f\ufff0-\uffff\ud800-\udfff]")

# ensure_ascii=False keeps non-ASCII text at its UTF-8 size instead of
# six bytes per character; one encoder, built once.
_STRING_ENCODER = json.JSONEncoder(ensure_ascii=False)


def _escape_character(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


def encode_message(text: str) -> bytes:
    """
    Encode one message as the JSON string that goes inside an C{a[...]}
    frame, escaped as SockJS requires, in UTF-8.
    """
    if text.isascii():
        # Console output mostly is (isascii is a flag, not a scan): nothing
        # in it is one of SockJS's extra escapes. orjson and ujson write the
        # same JSON (json's, but for DEL, which JSON allows raw); orjson in
        # 0.05-0.16 ms per MB of long lines (a pipeline's, 64 KB blocks)
        # where ujson takes 0.8, but where escapes are dense (a print
        # loop's short lines) in 1.9 where ujson takes 1.0. The lines are
        # counted in the first LINE_SAMPLE characters only (counting them
        # all would cost 0.55 ms per MB).
        if LINE_SAMPLE >= LONG_LINE * text.count("\n", 0, LINE_SAMPLE):
            return orjson.dumps(text)
        return ujson.dumps(text, escape_forward_slashes=False).encode("ascii")
    quoted = _ESCAPABLE.sub(_escape_character, encode_basestring(text))
    return quoted.encode("utf-8")


def encode_raw_message(text: str) -> bytes:
    """
    Encode one message for the raw websocket, which carries the text
    itself; a lone surrogate (not valid UTF-8) becomes U+FFFD.
    """
    return text.encode("utf-8", "replace")


# Inside an HTML <script> block "</script>" or "<!--" would end or
# change the script; in JavaScript source U+2028 and U+2029 ended string
# literals before ES2019.  Written as \uXXXX they are the same string.
_SCRIPT_UNSAFE = re.compile("[<>&\u2028\u2029]")


def encode_script_string(frame: bytes) -> bytes:
    """
    Encode a frame as a JavaScript string literal that is safe to place
    inside an HTML C{<script>} element as well as in a script file (the
    htmlfile and JSONP transports).
    """
    quoted = _STRING_ENCODER.encode(frame.decode("utf-8"))
    return _SCRIPT_UNSAFE.sub(_escape_character, quoted).encode("utf-8")


def messages_frame(encoded: list[bytes]) -> bytes:
    """
    Build an C{a[...]} frame from messages made by L{encode_message}.
    """
    return b"a[" + b",".join(encoded) + b"]"


def close_frame(code: int, reason: str) -> bytes:
    """
    Build a C{c[code,"reason"]} frame.
    """
    return b"c[%d,%s]" % (code, encode_message(reason))


@frozen(auto_exc=True)
class BrokenPayload(Exception):
    """
    The client sent something that is not a SockJS payload.

    @ivar reason: what was wrong, for the client (the SockJS protocol fixes
        these texts for C{xhr_send}).
    """

    reason: str


PAYLOAD_EXPECTED = "Payload expected."
BROKEN_JSON = "Broken JSON encoding."


def decode_payload(data: bytes, *, allow_single: bool = False) -> list[str]:
    """
    Decode what a client sent: a JSON array of strings, or (websocket only,
    C{allow_single}) a single JSON string.

    @raise BrokenPayload: if C{data} is empty or not such JSON.
    """
    if not data:
        raise BrokenPayload(PAYLOAD_EXPECTED)
    try:
        decoded = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError):
        # UnicodeDecodeError and JSONDecodeError are both ValueErrors; arrays
        # nested thousands deep ("[[[[...") exhaust json's recursion instead.
        raise BrokenPayload(BROKEN_JSON) from None
    if isinstance(decoded, str) and allow_single:
        return [decoded]
    if isinstance(decoded, list) and all(isinstance(item, str) for item in decoded):
        return decoded
    raise BrokenPayload(BROKEN_JSON)


CALLBACK_REQUIRED = '"callback" parameter required'
INVALID_CALLBACK = 'invalid "callback" parameter'
MAX_CALLBACK_LENGTH = 64

# A dotted path of JavaScript identifiers (sockjs-client sends "_jp.a1b2c3"):
# nothing that could call, index, or end the surrounding code.  The length
# cap and the /**/ before every JSONP body keep responses from starting with
# attacker-chosen bytes (Rosetta Flash, CVE-2014-4671).
_CALLBACK = re.compile(rb"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")


@frozen(auto_exc=True)
class InvalidCallback(Exception):
    """
    The C{c} parameter of a JSONP or htmlfile request is missing or unsafe.

    @ivar reason: the text the SockJS protocol prescribes for the client.
    """

    reason: str


def check_callback(value: bytes | None) -> bytes:
    """
    Return C{value} if it is a safe callback name for the htmlfile and JSONP
    transports.

    @raise InvalidCallback: if it is missing, empty or not a dotted path of
        ASCII identifiers of at most C{MAX_CALLBACK_LENGTH} bytes.
    """
    if not value:
        raise InvalidCallback(CALLBACK_REQUIRED)
    if len(value) > MAX_CALLBACK_LENGTH or not _CALLBACK.fullmatch(value):
        raise InvalidCallback(INVALID_CALLBACK)
    return value
