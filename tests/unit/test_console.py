"""Console session logic: the protocol, tokens, timeouts, with fakes and a Clock."""

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from shellserver.auth import TokenAuthority
from shellserver.console import (
    CLOSE_AUTH_FAILED,
    CLOSE_NORMAL,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_SANDBOX_FAILED,
    ConsoleFactory,
    ConsoleSettings,
    ProtocolError,
    parse_size,
)
from shellserver.sandbox.service import SETUP_FAILED
from shellserver.testing import FakeConnection, FakeSandboxStarter

ORIGIN = "https://console.example"
CLIENT = "192.0.2.7"  # FakeConnection's peer_host
SETTINGS = ConsoleSettings(auth_timeout=5.0, idle_timeout=600.0, max_age=1800.0)


class ConsoleTestCase(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.tokens = TokenAuthority(b"k" * 32, node="node-1", clock=self.clock, ttl=60.0)
        self.starter = FakeSandboxStarter()
        self.factory = ConsoleFactory(self.clock, self.tokens, self.starter, SETTINGS)

    def open(self, origin=ORIGIN):
        connection = FakeConnection(origin=origin)
        attachment = self.factory(connection)
        connection.handler = attachment
        return connection, attachment.console

    def token(self):
        return self.tokens.mint(user_id="u1", origin=ORIGIN, client_address=CLIENT)

    def out(self, session, data):
        """PTY output, then time for it to leave the coalescing window."""
        session.output(data)
        self.clock.advance(0.01)

    def running(self):
        connection, session = self.open()
        session.message_received("a" + self.token())
        sandbox = self.starter.started[-1]
        session.output(b"In [1]: ")
        return connection, session, sandbox


class AuthenticationTests(ConsoleTestCase):
    def test_good_token_starts_one_sandbox(self):
        """A valid token as the first message starts exactly one sandbox."""
        connection, session = self.open()
        session.message_received("a" + self.token())
        self.assertEqual(len(self.starter.started), 1)
        self.assertEqual(connection.sent, ["sstarting"])
        self.assertEqual(session.user_id, "u1")

    def test_forged_token_starts_nothing(self):
        """A token signed with another secret closes with 4001 and starts nothing."""
        other = TokenAuthority(b"x" * 32, node="node-1", clock=self.clock, ttl=60.0)
        connection, session = self.open()
        session.message_received("a" + other.mint(user_id="u", origin=ORIGIN,
                                                  client_address=CLIENT))
        self.assertEqual(self.starter.started, [])
        self.assertEqual(connection.close_code, CLOSE_AUTH_FAILED)
        self.assertIn("invalid signature", connection.sent[-1])

    def test_replayed_token_starts_nothing(self):
        """The same token used twice is refused the second time."""
        token = self.token()
        self.open()[1].message_received("a" + token)
        connection, session = self.open()
        session.message_received("a" + token)
        self.assertEqual(len(self.starter.started), 1)
        self.assertEqual(connection.close_code, CLOSE_AUTH_FAILED)

    def test_expired_token_starts_nothing(self):
        """A token presented after its lifetime is refused."""
        token = self.token()
        self.clock.advance(61)
        connection, session = self.open()
        session.message_received("a" + token)
        self.assertEqual(self.starter.started, [])
        self.assertEqual(connection.close_code, CLOSE_AUTH_FAILED)

    def test_token_from_other_origin_refused(self):
        """A connection whose Origin differs from the page's is refused."""
        connection, session = self.open(origin="https://evil.example")
        session.message_received("a" + self.token())
        self.assertEqual(self.starter.started, [])
        self.assertEqual(connection.close_code, CLOSE_AUTH_FAILED)

    def test_input_before_token_is_protocol_error(self):
        """Keystrokes before the token close the connection with 4003."""
        connection, session = self.open()
        session.message_received("iprint(1)\r")
        self.assertEqual(self.starter.started, [])
        self.assertEqual(connection.close_code, CLOSE_PROTOCOL_ERROR)
        self.assertTrue(connection.sent[-1].startswith("e"))

    def test_no_token_in_time(self):
        """Without a token within auth_timeout the connection is closed."""
        connection, session = self.open()
        self.clock.advance(4.9)
        self.assertIsNone(connection.close_code)
        self.clock.advance(0.2)
        self.assertEqual(connection.close_code, CLOSE_AUTH_FAILED)
        self.assertEqual(self.starter.started, [])

    def test_no_capacity(self):
        """When no sandbox can start the user is told why and nothing leaks."""
        self.starter.refuse_with = "all consoles are in use"
        connection, session = self.open()
        session.message_received("a" + self.token())
        self.assertEqual(connection.close_code, CLOSE_SANDBOX_FAILED)
        self.assertIn("all consoles are in use", connection.sent[-1])
        self.assertEqual(self.clock.getDelayedCalls(), [])


class ShuttleTests(ConsoleTestCase):
    def test_keystrokes_reach_the_pty(self):
        """Input messages are written to the sandbox as UTF-8."""
        connection, session, sandbox = self.running()
        session.message_received("iprint('é')\r")
        self.assertEqual(sandbox.written, ["print('é')\r".encode()])

    def test_output_split_utf8(self):
        """A character split across two PTY reads arrives whole."""
        connection, session, sandbox = self.running()
        snowman = "☃".encode()
        self.out(session, b"a" + snowman[:1])
        self.out(session, snowman[1:] + b"b")
        text = "".join(m[1:] for m in connection.sent if m.startswith("o"))
        self.assertTrue(text.endswith("a☃b"), text)

    def test_first_output_means_ready(self):
        """The first output is preceded by a ready state message."""
        connection, session, sandbox = self.running()
        self.assertEqual(connection.sent[:3], ["sstarting", "sready", "oIn [1]: "])

    def test_resize(self):
        """A resize message sets the terminal size."""
        connection, session, sandbox = self.running()
        session.message_received("r120,40")
        self.assertEqual(sandbox.resizes, [(120, 40)])

    def test_size_before_start_is_used(self):
        """The size sent before the sandbox started is the size it starts with."""
        connection, session = self.open()
        session.message_received("a" + self.token())
        self.assertEqual(self.starter.started[0].size, (80, 24))

    def test_bad_resize_is_protocol_error(self):
        """A malformed resize ends the session with a clear error."""
        connection, session, sandbox = self.running()
        session.message_received("r99999,1")
        self.assertEqual(connection.close_code, CLOSE_PROTOCOL_ERROR)
        self.assertEqual(sandbox.terminated, 1)

    def test_unknown_message_type(self):
        """An unknown message type is a protocol error, not ignored."""
        connection, session, sandbox = self.running()
        session.message_received("zzz")
        self.assertEqual(connection.close_code, CLOSE_PROTOCOL_ERROR)

    def test_exit_tells_the_user(self):
        """When IPython exits the user gets an exit message and a normal close."""
        connection, session, sandbox = self.running()
        sandbox.exit(0)
        self.assertEqual(connection.sent[-1], "xThe console has exited.")
        self.assertEqual(connection.close_code, CLOSE_NORMAL)

    def test_setup_failure_is_an_error(self):
        """A launcher that could not build the sandbox gives an error message."""
        connection, session, sandbox = self.running()
        sandbox.exit(SETUP_FAILED)
        self.assertEqual(connection.close_code, CLOSE_SANDBOX_FAILED)
        self.assertTrue(connection.sent[-1].startswith("e"))

    def test_client_gone_terminates_sandbox(self):
        """Closing the connection terminates the sandbox and all timers."""
        connection, session, sandbox = self.running()
        connection.close()
        self.assertEqual(sandbox.terminated, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class TimeoutTests(ConsoleTestCase):
    def test_idle_timeout(self):
        """No input for idle_timeout ends the console with a message."""
        connection, session, sandbox = self.running()
        self.clock.advance(599)
        session.message_received("i1\r")
        self.clock.advance(599)
        self.assertEqual(sandbox.terminated, 0)
        self.clock.advance(2)
        self.assertEqual(sandbox.terminated, 1)
        sandbox.exit(None, 15)
        self.assertIn("10 minutes without input", connection.sent[-1])
        self.assertEqual(connection.close_code, CLOSE_NORMAL)

    def test_max_age(self):
        """A console ends at max_age even while it is being used."""
        connection, session, sandbox = self.running()
        for _ in range(30):
            self.clock.advance(60)
            session.message_received("i1\r")
        self.assertEqual(sandbox.terminated, 1)
        sandbox.exit(None, 15)
        self.assertIn("30 minutes time limit", connection.sent[-1])


class CoalescingTests(ConsoleTestCase):
    def test_output_after_quiet_goes_at_once(self):
        """Output after a quiet spell (a keystroke's echo) is sent immediately."""
        connection, session, sandbox = self.running()
        self.clock.advance(1)
        session.output(b"x")
        self.assertEqual(connection.sent[-1], "ox")

    def test_burst_is_one_message(self):
        """Reads within the window after a large send go out together, in order."""
        from shellserver.console import COALESCE_STREAM, COALESCE_WINDOW

        connection, session, sandbox = self.running()
        self.clock.advance(1)
        session.output(b"s" * COALESCE_STREAM)
        before = len(connection.sent)
        for chunk in (b"a", b"b", b"c"):
            session.output(chunk)
        self.assertEqual(len(connection.sent), before)
        self.clock.advance(COALESCE_WINDOW)
        self.assertEqual(connection.sent[before:], ["oabc"])

    def test_small_messages_never_wait(self):
        """Output after a small message (an echo after an echo) goes out at once."""
        from shellserver.console import COALESCE_STREAM

        connection, session, sandbox = self.running()
        self.clock.advance(1)
        for key in "abcdef":
            session.output(key.encode())
            self.assertEqual(connection.sent[-1], "o" + key)
            self.clock.advance(0.001)
        session.output(b"p" * (COALESCE_STREAM - 1))
        self.clock.advance(0.001)
        session.output(b"x")
        self.assertEqual(connection.sent[-1], "ox")

    def test_stream_goes_in_fewer_messages(self):
        """A stream of reads 2 ms apart goes out one message per window, nothing lost."""
        from shellserver.console import COALESCE_STREAM, COALESCE_WINDOW

        connection, session, sandbox = self.running()
        self.clock.advance(1)
        before = len(connection.sent)
        chunks = [b"%04d" % i * (COALESCE_STREAM // 4) for i in range(40)]
        for chunk in chunks:
            session.output(chunk)
            self.clock.advance(0.002)
        self.clock.advance(COALESCE_WINDOW)
        sent = connection.sent[before:]
        self.assertEqual("".join(m[1:] for m in sent), b"".join(chunks).decode())
        self.assertLessEqual(len(sent), 40 * 0.002 / COALESCE_WINDOW + 2)

    def test_large_burst_not_held(self):
        """A window's worth over COALESCE_MAX is sent without waiting for the timer."""
        from shellserver.console import COALESCE_MAX, COALESCE_STREAM

        connection, session, sandbox = self.running()
        session.output(b"s" * COALESCE_STREAM)  # a stream: the window holds what follows
        half = COALESCE_MAX // 2 + 1
        session.output(b"x" * half)
        self.assertFalse(connection.sent[-1].startswith("ox"))
        session.output(b"y" * half)
        self.assertEqual(connection.sent[-1], "o" + "x" * half + "y" * half)

    def test_pending_output_precedes_the_end(self):
        """Output still in the window is sent before the exit message."""
        connection, session, sandbox = self.running()
        session.output(b"bye")
        sandbox.exit(0)
        self.assertEqual(connection.sent[-2:], ["obye", "xThe console has exited."])
        self.assertEqual(self.clock.getDelayedCalls(), [])


class ParseSizeTests(SynchronousTestCase):
    def test_valid(self):
        """COLS,ROWS parses into integers."""
        self.assertEqual(parse_size("80,24"), (80, 24))

    def test_invalid(self):
        """Non-numeric, zero and huge sizes are refused."""
        for bad in ("", "80", "80x24", "0,24", "80,0", "-1,5", "1001,24", "80,24,1"):
            self.assertRaises(ProtocolError, parse_size, bad)


class FlowControlTests(ConsoleTestCase):
    def setUp(self):
        super().setUp()
        settings = ConsoleSettings(auth_timeout=5.0, idle_timeout=600.0, max_age=1800.0,
                                   output_high_water=1000, output_low_water=200)
        self.factory = ConsoleFactory(self.clock, self.tokens, self.starter, settings)

    def test_transport_backpressure_pauses_the_sandbox(self):
        """The connection's producer pauses and resumes the sandbox's output."""
        connection, session, sandbox = self.running()
        connection.producer.pauseProducing()
        self.assertTrue(sandbox.paused)
        connection.producer.resumeProducing()
        self.assertFalse(sandbox.paused)

    def test_no_producer_before_start(self):
        """Nothing is registered while the token is awaited."""
        connection, session = self.open()
        self.assertIsNone(connection.producer)

    def test_unacknowledged_output_pauses_above_high_water(self):
        """Past the high watermark of unacknowledged output the PTY is paused;
        below the low watermark it is read again."""
        connection, session, sandbox = self.running()  # 8 units sent: "In [1]: "
        session.message_received("k0")
        self.out(session, b"x" * 992)
        self.assertFalse(sandbox.paused)  # exactly 1000 unacknowledged
        self.out(session, b"y")
        self.assertTrue(sandbox.paused)
        session.message_received("k500")
        self.assertTrue(sandbox.paused)  # 501 still unacknowledged
        session.message_received("k801")
        self.assertTrue(sandbox.paused)  # 200: not below the low watermark
        session.message_received("k802")
        self.assertFalse(sandbox.paused)

    def test_no_output_lost_while_paused(self):
        """Output that arrives while paused is still sent, in order."""
        connection, session, sandbox = self.running()
        session.message_received("k0")
        for chunk in (b"a" * 1200, b"b" * 10, b"c" * 10):
            self.out(session, chunk)
        text = "".join(m[1:] for m in connection.sent if m.startswith("o"))
        self.assertEqual(text, "In [1]: " + "a" * 1200 + "b" * 10 + "c" * 10)

    def test_both_reasons_must_clear(self):
        """The sandbox resumes only when neither the client nor the transport holds it."""
        connection, session, sandbox = self.running()
        session.message_received("k0")
        self.out(session, b"x" * 2000)
        connection.producer.pauseProducing()
        session.message_received(f"k{2008}")
        self.assertTrue(sandbox.paused)
        connection.producer.resumeProducing()
        self.assertFalse(sandbox.paused)

    def test_without_acks_no_client_pause(self):
        """A client that never acknowledges is only held back by the transport."""
        connection, session, sandbox = self.running()
        self.out(session, b"x" * 5000)
        self.assertFalse(sandbox.paused)

    def test_units_are_utf16(self):
        """Acknowledgements count UTF-16 units, as the browser does."""
        connection, session, sandbox = self.running()
        self.out(session, "😀é".encode())
        session.message_received(f"k{8 + 3}")  # the emoji is 2 units, é is 1
        self.assertIsNone(connection.close_code)
        session.message_received(f"k{8 + 4}")
        self.assertEqual(connection.close_code, CLOSE_PROTOCOL_ERROR)

    def test_bad_acknowledgements(self):
        """Acknowledging more than was sent, going backwards, or garbage is an error."""
        for bad in ("k", "k-1", "kabc", "k99999"):
            connection, session, sandbox = self.running()
            session.message_received("k4")
            session.message_received(bad)
            self.assertEqual(connection.close_code, CLOSE_PROTOCOL_ERROR, bad)
        connection, session, sandbox = self.running()
        session.message_received("k5")
        session.message_received("k4")
        self.assertEqual(connection.close_code, CLOSE_PROTOCOL_ERROR)

    def test_acknowledgement_with_non_ascii_digits(self):
        """Digits that are not ASCII ("k²", Arabic-Indic, full-width) are a protocol error."""
        for bad in ("k\u00b2", "k\u0661", "k\uff11", "k1\u00b9"):
            connection, session, sandbox = self.running()
            session.message_received(bad)
            self.assertEqual(connection.close_code, CLOSE_PROTOCOL_ERROR, bad)
            self.assertIn("an acknowledgement needs a count", connection.close_reason)


class DescribeDurationTests(SynchronousTestCase):
    def test_units(self):
        """Durations read naturally in seconds, minutes or hours."""
        from shellserver.console import describe_duration

        self.assertEqual(describe_duration(1), "1 second")
        self.assertEqual(describe_duration(45), "45 seconds")
        self.assertEqual(describe_duration(90), "90 seconds")
        self.assertEqual(describe_duration(600), "10 minutes")
        self.assertEqual(describe_duration(60), "1 minute")
        self.assertEqual(describe_duration(7200), "2 hours")
        self.assertEqual(describe_duration(1800), "30 minutes")


class AdmissionTests(ConsoleTestCase):
    def setUp(self):
        super().setUp()
        from shellserver.admission import Admission
        from shellserver.users import UnregisteredUsers

        self.admission = Admission(self.clock, capacity=1, per_address=5,
                                   per_address_per_minute=50)
        self.users = UnregisteredUsers(self.clock, 60.0)
        self.factory = ConsoleFactory(self.clock, self.tokens, self.starter, SETTINGS,
                                      self.admission, self.users)

    def test_full_node_refuses_after_token(self):
        """A good token on a full node gets a clear refusal and starts nothing."""
        self.running()
        connection, session = self.open()
        session.message_received("a" + self.token())
        self.assertEqual(len(self.starter.started), 1)
        self.assertEqual(connection.close_code, 4004)
        self.assertIn("All consoles are in use", connection.sent[-1])

    def test_slot_released_when_console_exits(self):
        """The admission slot is given back when the console exits."""
        connection, session, sandbox = self.running()
        self.assertEqual(self.admission.active, 1)
        sandbox.exit(0)
        self.assertEqual(self.admission.active, 0)

    def test_slot_released_when_start_fails(self):
        """A sandbox that cannot start releases its slot at once."""
        self.starter.refuse_with = "broken"
        connection, session = self.open()
        session.message_received("a" + self.token())
        self.assertEqual(self.admission.active, 0)

    def test_end_all(self):
        """end_all ends every console with the operator's message."""
        connection, session, sandbox = self.running()
        self.factory.end_all("The operator has ended all consoles.")
        self.assertEqual(sandbox.terminated, 1)
        sandbox.exit(None, 15)
        self.assertEqual(connection.sent[-1], "xThe operator has ended all consoles.")
        self.assertEqual(self.factory.sessions, set())
