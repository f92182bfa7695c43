"""Reattach: a console outlives its connection (docs/protocol.md, "Reattach"),
and warnings before its endings; with fakes and a Clock."""

import hashlib

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from shellserver.admission import Admission
from shellserver.auth import TokenAuthority
from shellserver.console import (
    CLOSE_NORMAL,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_REATTACH_REFUSED,
    CLOSE_TAKEN_OVER,
    TAKEN_OVER_MESSAGE,
    ConsoleFactory,
    ConsoleSettings,
    _utf16_tail,
)
from shellserver.testing import FakeConnection, FakeSandboxStarter

ORIGIN = "https://console.example"
CLIENT = "192.0.2.7"  # FakeConnection's peer_host
SETTINGS = ConsoleSettings(auth_timeout=5.0, idle_timeout=600.0, max_age=1800.0,
                           output_high_water=1000, output_low_water=200,
                           reattach_grace=60.0)


class ReattachTestCase(SynchronousTestCase):
    settings = SETTINGS

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.tokens = TokenAuthority(b"k" * 32, node="node-1", clock=self.clock, ttl=60.0)
        self.starter = FakeSandboxStarter()
        self.admission = Admission(self.clock, capacity=10, per_address=5,
                                   per_address_per_minute=50, auth_failures_per_minute=3)
        self.factory = ConsoleFactory(self.clock, self.tokens, self.starter, self.settings,
                                      self.admission)

    def open(self, origin=ORIGIN):
        connection = FakeConnection(origin=origin)
        attachment = self.factory(connection)
        connection.handler = attachment
        return connection

    def running(self):
        """A console at its prompt: (connection, console, sandbox, secret)."""
        connection = self.open()
        connection.handler.message_received(
            "a" + self.tokens.mint(user_id="u1", origin=ORIGIN, client_address=CLIENT))
        console = connection.handler.console
        sandbox = self.starter.started[-1]
        self.out(console, b"In [1]: ")
        return connection, console, sandbox, self.secret(connection)

    def out(self, console, data):
        console.output(data)
        self.clock.advance(0.01)

    def secret(self, connection):
        return [m[1:] for m in connection.sent if m.startswith("t")][-1].split(",")[1]

    def output(self, connection):
        return "".join(m[1:] for m in connection.sent if m.startswith("o"))

    def reattach(self, secret, count, origin=ORIGIN):
        connection = self.open(origin)
        connection.handler.message_received(f"A{secret},{count}")
        return connection


class SecretTests(ReattachTestCase):
    def test_secret_follows_ready(self):
        """``t`` with the grace and a 43-character URL-safe secret follows ``sready``."""
        connection, console, sandbox, secret = self.running()
        kinds = [m[0] for m in connection.sent]
        self.assertEqual(kinds[:3], ["s", "s", "t"])
        self.assertEqual(connection.sent[2], f"t60,{secret}")
        self.assertRegex(secret, r"\A[A-Za-z0-9_-]{43}\Z")

    def test_only_a_digest_is_kept(self):
        """The registry holds the secret's SHA-256, never the secret."""
        connection, console, sandbox, secret = self.running()
        digest = hashlib.sha256(secret.encode()).digest()
        self.assertEqual(self.factory.secrets._by_digest, {digest: (console, ORIGIN)})
        self.assertEqual(list(self.factory.secrets._digest_of.values()), [digest])

    def test_registry_bounded_by_consoles(self):
        """However often a console reattaches, it holds one secret; ending forgets it."""
        connection, console, sandbox, secret = self.running()
        for _ in range(20):
            connection = self.reattach(secret, console._sent_units)
            secret = self.secret(connection)
        self.assertEqual(len(self.factory.secrets), 1)
        sandbox.exit(0)
        self.assertEqual(len(self.factory.secrets), 0)

    def test_no_secret_without_grace(self):
        """With a grace of 0 no secret is sent, and a lost connection ends the console."""
        self.factory.use_settings(ConsoleSettings(auth_timeout=5.0, idle_timeout=600.0,
                                                  max_age=1800.0))
        connection = self.open()
        connection.handler.message_received(
            "a" + self.tokens.mint(user_id="u1", origin=ORIGIN, client_address=CLIENT))
        sandbox = self.starter.started[-1]
        self.out(connection.handler.console, b"In [1]: ")
        self.assertFalse([m for m in connection.sent if m.startswith("t")])
        connection.close()
        self.assertEqual(sandbox.terminated, 1)


class DetachTests(ReattachTestCase):
    def test_lost_connection_detaches(self):
        """A running console whose connection goes away keeps its sandbox."""
        connection, console, sandbox, secret = self.running()
        connection.close()
        self.assertEqual(sandbox.terminated, 0)
        self.assertIn(console, self.factory.sessions)

    def test_grace_expiry_ends_and_releases(self):
        """Past the grace the sandbox is stopped, and on its exit the slot and secret go."""
        connection, console, sandbox, secret = self.running()
        connection.close()
        self.clock.advance(59.9)
        self.assertEqual(sandbox.terminated, 0)
        self.clock.advance(0.2)
        self.assertEqual(sandbox.terminated, 1)
        sandbox.exit(0)
        self.assertEqual(self.admission.active, 0)
        self.assertNotIn(console, self.factory.sessions)
        self.assertEqual(len(self.factory.secrets), 0)
        self.assertEqual(self.reattach(secret, 8).close_code, CLOSE_REATTACH_REFUSED)

    def test_detached_output_pauses_at_high_water(self):
        """Detached, output is kept up to the high-water mark, then the program pauses."""
        connection, console, sandbox, secret = self.running()
        connection.handler.message_received("k8")
        connection.close()
        self.out(console, b"x" * 1000)
        self.assertFalse(sandbox.paused)
        self.out(console, b"y")
        self.assertTrue(sandbox.paused)

    def test_detached_pauses_without_acknowledgements(self):
        """A client that never acknowledged is held to the high-water mark once detached."""
        connection, console, sandbox, secret = self.running()
        connection.close()
        self.out(console, b"x" * 2000)
        self.assertTrue(sandbox.paused)
        self.assertLessEqual(sum(units for units, _ in console._retained), 2008)

    def test_idle_timer_runs_while_detached(self):
        """The idle timeout ends a detached console too."""
        settings = ConsoleSettings(auth_timeout=5.0, idle_timeout=30.0, max_age=1800.0,
                                   reattach_grace=60.0)
        self.factory.use_settings(settings)
        connection, console, sandbox, secret = self.running()
        connection.close()
        self.clock.advance(31)
        self.assertEqual(sandbox.terminated, 1)

    def test_quit_ends_at_once(self):
        """``q`` ends the console without a grace: ``x`` and 3000."""
        connection, console, sandbox, secret = self.running()
        connection.handler.message_received("q")
        self.assertEqual(sandbox.terminated, 1)
        sandbox.exit(0)
        self.assertEqual(connection.close_code, CLOSE_NORMAL)
        self.assertEqual(connection.sent[-1], "xThe console was closed.")
        self.assertEqual(self.reattach(secret, 8).close_code, CLOSE_REATTACH_REFUSED)

    def assert_ended_not_detached(self, console, secret):
        """No grace waits for ``console``, and its secret is refused (4005) at once."""
        self.assertNotIn("grace", console._timers)
        self.assertFalse(self.factory.secrets.holds(console))
        self.assertEqual(self.reattach(secret, 8).close_code, CLOSE_REATTACH_REFUSED)

    def test_quit_then_close_does_not_detach(self):
        """After ``q`` a closing connection does not detach the ending console."""
        connection, console, sandbox, secret = self.running()
        connection.handler.message_received("q")
        connection.close()
        self.assert_ended_not_detached(console, secret)

    def test_quit_forgets_secret_before_exit(self):
        """``q`` forgets the secret at once, before the sandbox has exited."""
        connection, console, sandbox, secret = self.running()
        connection.handler.message_received("q")
        self.assertFalse(self.factory.secrets.holds(console))
        self.assertEqual(self.reattach(secret, 8).close_code, CLOSE_REATTACH_REFUSED)

    def test_operator_end_then_close_does_not_detach(self):
        """A console the operator ended does not detach when its connection closes."""
        connection, console, sandbox, secret = self.running()
        self.factory.end_all("Ended by the operator.")
        connection.close()
        self.assert_ended_not_detached(console, secret)
        self.assertEqual(sandbox.terminated, 1)

    def test_exit_message_then_close_does_not_detach(self):
        """After the exit message ``x`` the closed connection detaches nothing."""
        connection, console, sandbox, secret = self.running()
        sandbox.exit(0)
        self.assertEqual(connection.sent[-1], "xThe console has exited.")
        connection.close()
        self.assert_ended_not_detached(console, secret)

    def test_live_console_detaches_and_reattaches(self):
        """A live console whose connection closes still detaches and takes its secret."""
        connection, console, sandbox, secret = self.running()
        connection.close()
        self.assertIn("grace", console._timers)
        again = self.reattach(secret, console._sent_units)
        self.assertIsNone(again.close_code)
        self.assertIn("sresumed", again.sent)

    def test_quit_with_payload_is_protocol_error(self):
        """``q`` carries nothing; with a payload it is a protocol error."""
        connection, console, sandbox, secret = self.running()
        connection.handler.message_received("qx")
        self.assertEqual(connection.close_code, CLOSE_PROTOCOL_ERROR)

    def test_starting_console_ends_with_connection(self):
        """A console whose connection goes before ``sready`` (no secret yet) ends at once."""
        connection = self.open()
        connection.handler.message_received(
            "a" + self.tokens.mint(user_id="u1", origin=ORIGIN, client_address=CLIENT))
        connection.close()
        self.assertEqual(self.starter.started[-1].terminated, 1)


class ReattachTests(ReattachTestCase):
    def test_replays_exactly_the_unwritten_output(self):
        """Output from COUNT on is replayed once, then live output follows, counted on."""
        connection, console, sandbox, secret = self.running()
        connection.handler.message_received("k0")
        self.out(console, b"abc")
        self.out(console, b"defgh")
        connection.close()
        self.out(console, b"ijk")  # while detached
        again = self.reattach(secret, 10)  # "In [1]: ab" written
        self.assertEqual(again.sent[0], "sresumed")
        self.assertEqual(again.sent[1][0], "t")
        self.assertEqual(self.output(again), "cdefghijk")
        self.out(console, b"l")
        self.assertEqual(self.output(again), "cdefghijkl")
        again.handler.message_received("k19")  # acknowledges in the same count
        self.assertIsNone(again.close_code)
        self.assertEqual(sandbox.terminated, 0)

    def test_new_secret_invalidates_old(self):
        """A secret is good for one attach; the new ``t`` one replaces it."""
        connection, console, sandbox, secret = self.running()
        connection.close()
        again = self.reattach(secret, 8)
        new_secret = self.secret(again)
        self.assertNotEqual(new_secret, secret)
        replayed = self.reattach(secret, 8)
        self.assertEqual(replayed.close_code, CLOSE_REATTACH_REFUSED)
        self.assertIsNone(again.close_code)

    def test_count_out_of_range_refused_console_unaffected(self):
        """COUNT beyond what was sent, or before what was acknowledged, gets 4005;
        the console still waits, and reattaches with a good count."""
        connection, console, sandbox, secret = self.running()
        connection.handler.message_received("k5")
        connection.close()
        for count in (9, 4):
            refused = self.reattach(secret, count)
            self.assertEqual(refused.close_code, CLOSE_REATTACH_REFUSED)
            self.assertIn("outside 5..8", refused.close_reason)
        self.assertEqual(sandbox.terminated, 0)
        self.assertIsNone(self.reattach(secret, 5).close_code)

    def test_wrong_origin_refused_and_counted(self):
        """The right secret from another origin is refused and counts as a wrong token."""
        connection, console, sandbox, secret = self.running()
        connection.close()
        refused = self.reattach(secret, 8, origin="https://evil.example")
        self.assertEqual(refused.close_code, CLOSE_REATTACH_REFUSED)
        self.assertIn("another origin", refused.close_reason)
        self.assertEqual(len(self.admission._failures[CLIENT]), 1)
        self.assertIsNone(self.reattach(secret, 8).close_code)

    def test_wrong_secrets_hit_the_auth_failure_limit(self):
        """Wrong secrets count as wrong tokens; past the limit even the right one is refused."""
        connection, console, sandbox, secret = self.running()
        connection.close()
        for _ in range(3):
            wrong = self.reattach("A" * 43, 8)
            self.assertEqual(wrong.close_code, CLOSE_REATTACH_REFUSED)
        refused = self.reattach(secret, 8)
        self.assertIn("too many wrong", refused.close_reason)
        self.assertEqual(sandbox.terminated, 0)

    def test_malformed_reattach_refused(self):
        """``A`` without SECRET,COUNT is refused with 4005 and a clear reason."""
        refused = self.reattach("short", "x")
        self.assertEqual(refused.close_code, CLOSE_REATTACH_REFUSED)
        self.assertIn("needs SECRET,COUNT", refused.close_reason)

    def test_reattach_starts_no_console(self):
        """The console made for a reattaching connection is dropped: no slot, no sandbox."""
        connection, console, sandbox, secret = self.running()
        connection.close()
        self.reattach(secret, 8)
        self.reattach("B" * 43, 8)
        self.assertEqual(len(self.factory.sessions), 1)
        self.assertEqual(len(self.starter.started), 1)
        self.assertEqual(self.admission.active, 1)

    def test_reattach_later_is_protocol_error(self):
        """``A`` after ``a`` is an unknown message: 4003."""
        connection, console, sandbox, secret = self.running()
        connection.handler.message_received(f"A{secret},8")
        self.assertEqual(connection.close_code, CLOSE_PROTOCOL_ERROR)

    def test_takeover_closes_the_older_with_4006(self):
        """A reattach to an attached console closes the older connection with ``e`` and 4006,
        and the older one's going does not detach or end the console."""
        connection, console, sandbox, secret = self.running()
        self.out(console, b"pending")
        again = self.reattach(secret, 8)
        self.assertEqual(connection.close_code, CLOSE_TAKEN_OVER)
        self.assertEqual(connection.sent[-1], "e" + TAKEN_OVER_MESSAGE)
        self.assertEqual(self.output(again), "pending")
        self.clock.advance(120)
        self.assertEqual(sandbox.terminated, 0)
        again.handler.message_received("ix")
        self.assertEqual(sandbox.written, [b"x"])

    def test_takeover_moves_the_flow_control(self):
        """The sandbox's producer moves to the new connection."""
        connection, console, sandbox, secret = self.running()
        connection.producer.pauseProducing()
        again = self.reattach(secret, 8)
        self.assertFalse(sandbox.paused)
        self.assertIsNone(connection.producer)
        again.producer.pauseProducing()
        self.assertTrue(sandbox.paused)

    def test_reattach_resumes_paused_output(self):
        """Reattaching with everything written resumes a program paused while detached."""
        connection, console, sandbox, secret = self.running()
        connection.close()
        self.out(console, b"x" * 1100)
        self.assertTrue(sandbox.paused)
        self.reattach(secret, 1108)
        self.assertFalse(sandbox.paused)

    def test_count_splitting_a_character_refused(self):
        """A COUNT in the middle of a surrogate pair is refused."""
        connection, console, sandbox, secret = self.running()
        connection.handler.message_received("k8")
        self.out(console, "a\U0001F600".encode())
        refused = self.reattach(secret, 10)
        self.assertEqual(refused.close_code, CLOSE_REATTACH_REFUSED)
        self.assertEqual(self.output(self.reattach(secret, 9)), "\U0001F600")

    def test_utf16_tail(self):
        """Cutting text by UTF-16 units keeps characters whole, or says it cannot."""
        self.assertEqual(_utf16_tail("héllo", 2), "llo")
        self.assertEqual(_utf16_tail("\U0001F600x", 2), "x")
        self.assertIsNone(_utf16_tail("\U0001F600x", 1))


class WarningTests(ReattachTestCase):
    settings = ConsoleSettings(auth_timeout=5.0, idle_timeout=600.0, max_age=1800.0,
                               reattach_grace=60.0)

    def warnings(self, connection):
        return [m for m in connection.sent if m[0] in "wc"]

    def test_idle_warning_a_minute_before(self):
        """A minute before the idle ending ``widle,60`` goes out."""
        connection, console, sandbox, secret = self.running()
        self.clock.advance(539)
        self.assertEqual(self.warnings(connection), [])
        self.clock.advance(1)
        self.assertEqual(self.warnings(connection), ["widle,60"])

    def test_keystroke_withdraws_idle_warning(self):
        """A keystroke during the idle warning withdraws it (``cidle``) and restarts the time."""
        connection, console, sandbox, secret = self.running()
        self.clock.advance(560)
        connection.handler.message_received("ix")
        self.assertEqual(self.warnings(connection), ["widle,60", "cidle"])
        self.clock.advance(100)
        self.assertEqual(sandbox.terminated, 0)

    def test_idle_warning_counts_from_last_keystroke(self):
        """Keystrokes before the warning move it to a minute before the idle ending of the last."""
        connection, console, sandbox, secret = self.running()
        for _ in range(3):
            self.clock.advance(200)
            connection.handler.message_received("ix")
        self.clock.advance(539)
        self.assertEqual(self.warnings(connection), [])
        self.clock.advance(1)
        self.assertEqual(self.warnings(connection), ["widle,60"])
        self.clock.advance(59)
        self.assertEqual(sandbox.terminated, 0)
        self.clock.advance(1)
        self.assertEqual(sandbox.terminated, 1)

    def test_keystroke_schedules_no_timer(self):
        """A keystroke outside a warning leaves the console's timers as they were."""
        connection, console, sandbox, secret = self.running()
        self.clock.advance(10)
        before = list(self.clock.getDelayedCalls())
        for _ in range(5):
            connection.handler.message_received("ix")
        self.assertEqual(self.clock.getDelayedCalls(), before)
        self.assertEqual(sandbox.written, [b"x"] * 5)

    def test_max_age_warning(self):
        """A minute before the maximum age ``wage,60`` goes out."""
        connection, console, sandbox, secret = self.running()
        for _ in range(6):
            connection.handler.message_received("ix")
            self.clock.advance(290)
        self.assertEqual(self.warnings(connection), ["wage,60"])

    def test_short_limit_warns_at_half(self):
        """A limit shorter than two minutes is warned of at its half."""
        self.factory.use_settings(ConsoleSettings(auth_timeout=5.0, idle_timeout=30.0,
                                                  max_age=1800.0, reattach_grace=20.0))
        connection, console, sandbox, secret = self.running()
        self.clock.advance(15)
        self.assertEqual(self.warnings(connection), ["widle,15"])

    def test_warning_repeated_on_reattach(self):
        """A reattach during a warning gets it again with the seconds left."""
        connection, console, sandbox, secret = self.running()
        self.clock.advance(550)
        connection.close()
        self.clock.advance(20)
        again = self.reattach(secret, 8)
        self.assertEqual(self.warnings(again), ["widle,40"])

    def test_shutdown_warning(self):
        """warn_all sends every console ``wshutdown,SECONDS``."""
        connection, console, sandbox, secret = self.running()
        self.factory.warn_all("shutdown", 10.0)
        self.assertEqual(self.warnings(connection), ["wshutdown,10"])
