"""
Tests for shellserver.sockjs.framing and shellserver.sockjs.options.
"""

import json

from twisted.trial.unittest import SynchronousTestCase

from shellserver.sockjs import SockJSOptions
from shellserver.sockjs.framing import (
    BROKEN_JSON,
    LONG_LINE,
    PAYLOAD_EXPECTED,
    BrokenPayload,
    InvalidCallback,
    check_callback,
    close_frame,
    decode_payload,
    encode_message,
    encode_raw_message,
    encode_script_string,
    messages_frame,
)

# What the SockJS protocol suite requires servers to escape (its
# escapable_by_server), plus the lone surrogates no UTF-8 can carry.
_MUST_ESCAPE = (
    [chr(code) for code in range(0x00, 0x20)]
    + [chr(code) for code in range(0x200C, 0x2010)]
    + [chr(code) for code in range(0x2028, 0x2030)]
    + [chr(code) for code in range(0x2060, 0x2070)]
    + [chr(code) for code in range(0xFFF0, 0x10000)]
    + [chr(0xD800), chr(0xDBFF), chr(0xDC00), chr(0xDFFF)]
)


class EncodeMessageTests(SynchronousTestCase):
    def test_plain_text(self) -> None:
        """
        Plain text becomes a quoted JSON string in UTF-8.
        """
        self.assertEqual(encode_message("hello"), b'"hello"')

    def test_non_ascii_stays_verbatim(self) -> None:
        """
        Non-ASCII characters outside the escaped ranges are sent as UTF-8,
        not as six-byte escapes.
        """
        self.assertEqual(encode_message("é─😀"), '"é─😀"'.encode())

    def test_json_specials(self) -> None:
        """
        Quotes, backslashes and newlines are escaped as JSON requires.
        """
        encoded = encode_message('a"b\\c\nd')
        self.assertEqual(encoded, b'"a\\"b\\\\c\\nd"')

    def test_escapes_every_required_character(self) -> None:
        """
        Every character SockJS servers must escape leaves as a JSON escape
        sequence, and the result decodes back to the original text.
        """
        for character in _MUST_ESCAPE:
            encoded = encode_message(character)
            self.assertTrue(encoded.isascii(), repr(character))
            self.assertEqual(encoded[:2], b'"\\', repr(character))
            if not "\ud800" <= character <= "\udfff":
                self.assertEqual(json.loads(encoded), character)

    def test_every_ascii_character_round_trips(self) -> None:
        """
        Every ASCII character (controls, quote, backslash, DEL) decodes back
        to itself, alone and beside non-ASCII text.
        """
        for code in range(128):
            for text in (chr(code) + "x", chr(code) + "é\u2028"):
                self.assertEqual(json.loads(encode_message(text)), text, repr(text))

    def test_terminal_output_round_trips(self) -> None:
        """
        Terminal output (escape sequences, CR LF, tabs, "/") decodes back to
        itself, escaped as json escapes it.
        """
        text = "\x1b[1;32mIn [\x1b[1;32m1\x1b[0m]: \tprint(1/2)\r\n0.5\r\n\x07"
        self.assertEqual(json.loads(encode_message(text)), text)
        self.assertEqual(encode_message(text), json.dumps(text).encode())
        self.assertEqual(json.loads(encode_message(text + "\x7f")), text + "\x7f")

    def test_long_and_short_lines_encode_as_json_does(self) -> None:
        """
        ASCII output of long lines (orjson's) and of short ones (ujson's),
        every ASCII character but DEL among them, is json's encoding.
        """
        characters = "".join(chr(code) for code in range(127))
        long_lines = ("x" * LONG_LINE * 2 + characters + "\r\n") * 40
        short_lines = "".join(f"{i}\r\n" for i in range(2000)) + characters
        for text in (long_lines, short_lines, characters, "x"):
            self.assertEqual(encode_message(text), json.dumps(text).encode(), text[:40])

    def test_escape_is_lowercase_hex(self) -> None:
        """
        Escapes use four lowercase hex digits, as the protocol suite expects.
        """
        self.assertEqual(encode_message("\u202f\ufffe"), b'"\\u202f\\ufffe"')

    def test_raw_message(self) -> None:
        """
        The raw websocket sends the text itself; a lone surrogate, which
        UTF-8 cannot carry, becomes a replacement.
        """
        self.assertEqual(encode_raw_message("a\u2028"), "a\u2028".encode())
        self.assertEqual(encode_raw_message("\ud800"), b"?")


class FrameTests(SynchronousTestCase):
    def test_messages_frame(self) -> None:
        """
        An a-frame is a JSON array of the encoded messages.
        """
        frame = messages_frame([encode_message("x"), encode_message("y")])
        self.assertEqual(frame, b'a["x","y"]')

    def test_close_frame(self) -> None:
        """
        A c-frame holds the code and the reason, without spaces.
        """
        self.assertEqual(close_frame(3000, "Go away!"), b'c[3000,"Go away!"]')

    def test_close_frame_escapes_reason(self) -> None:
        """
        The reason of a close frame is escaped like any message.
        """
        self.assertEqual(close_frame(4003, 'a"\u2028'), b'c[4003,"a\\"\\u2028"]')


class DecodePayloadTests(SynchronousTestCase):
    def test_array(self) -> None:
        """
        A JSON array of strings is a list of messages.
        """
        self.assertEqual(decode_payload(b'["a","\\u2028",""]'), ["a", "\u2028", ""])

    def test_empty_array(self) -> None:
        """
        An empty array (a client heartbeat) is no message at all.
        """
        self.assertEqual(decode_payload(b"[]"), [])

    def test_single_string(self) -> None:
        """
        A single JSON string is one message where that is allowed
        (websocket) and broken elsewhere.
        """
        self.assertEqual(decode_payload(b'"a"', allow_single=True), ["a"])
        error = self.assertRaises(BrokenPayload, decode_payload, b'"a"')
        self.assertEqual(error.reason, BROKEN_JSON)

    def test_empty(self) -> None:
        """
        Nothing at all is "Payload expected.".
        """
        error = self.assertRaises(BrokenPayload, decode_payload, b"")
        self.assertEqual(error.reason, PAYLOAD_EXPECTED)

    def test_broken(self) -> None:
        """
        Truncated JSON, invalid UTF-8, non-string items and other JSON types
        are "Broken JSON encoding.".
        """
        for data in [b'["a', b'["\xff"]', b"[1]", b'["a", null]', b"{}", b"1"]:
            error = self.assertRaises(BrokenPayload, decode_payload, data, allow_single=True)
            self.assertEqual(error.reason, BROKEN_JSON, data)


class OptionsTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        """
        The defaults are those of the SockJS reference server.
        """
        options = SockJSOptions()
        self.assertEqual(
            (
                options.heartbeat_interval,
                options.disconnect_delay,
                options.response_limit,
                options.max_message_bytes,
                options.websocket,
                options.cookie_needed,
                options.high_watermark,
                options.low_watermark,
            ),
            (25.0, 5.0, 128 * 1024, 64 * 1024, True, False, 256 * 1024, 64 * 1024),
        )

    def test_watermarks_ordered(self) -> None:
        """
        The low watermark must be below the high one.
        """
        self.assertRaises(ValueError, SockJSOptions, high_watermark=100, low_watermark=100)

    def test_positive(self) -> None:
        """
        Intervals and limits must be positive.
        """
        self.assertRaises(ValueError, SockJSOptions, heartbeat_interval=0)
        self.assertRaises(ValueError, SockJSOptions, max_message_bytes=-1)
        self.assertRaises(ValueError, SockJSOptions, max_sessions_per_address=0)

    def test_session_limit_default(self) -> None:
        """
        One address may hold 50 sessions by default.
        """
        self.assertEqual(SockJSOptions().max_sessions_per_address, 50)


class ScriptStringTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        """
        A frame becomes a JSON string literal that decodes to the frame.
        """
        frame = close_frame(3000, "Go away!")
        self.assertEqual(encode_script_string(frame), b'"c[3000,\\"Go away!\\"]"')
        self.assertEqual(json.loads(encode_script_string(frame)), frame.decode())

    def test_markup_escaped(self) -> None:
        """
        "<", ">", "&", U+2028 and U+2029 are written as \\uXXXX, so the
        literal can neither end a <script> element nor a JavaScript string.
        """
        frame = messages_frame([encode_message("</script><!--&\u2028\u2029>")])
        encoded = encode_script_string(frame)
        for unsafe in [b"<", b">", b"&", "\u2028".encode(), "\u2029".encode()]:
            self.assertNotIn(unsafe, encoded)
        self.assertEqual(json.loads(encoded), frame.decode())


class CallbackTests(SynchronousTestCase):
    def test_valid(self) -> None:
        """
        Dotted paths of ASCII identifiers up to 64 bytes are accepted.
        """
        for callback in [b"callback", b"_jp.a1b2c3", b"x", b"A_b.C_d.e9", b"x" * 64]:
            self.assertEqual(check_callback(callback), callback)

    def test_missing(self) -> None:
        """
        A missing or empty callback is "callback parameter required".
        """
        for callback in [None, b""]:
            with self.assertRaises(InvalidCallback) as raised:
                check_callback(callback)
            self.assertEqual(raised.exception.reason, '"callback" parameter required')

    def test_invalid(self) -> None:
        """
        Anything that could do more than name a function is refused.
        """
        for callback in [
            b" ",
            b"*",
            b"abc(",
            b"a-b",
            b"a[0]",
            b"1abc",
            b"a..b",
            b".a",
            b"a.",
            b"a;alert(1)",
            b"<script>",
            b"\xc3\xa9",
            b"x" * 65,
        ]:
            with self.assertRaises(InvalidCallback, msg=callback) as raised:
                check_callback(callback)
            self.assertEqual(raised.exception.reason, 'invalid "callback" parameter')
