"""ClientEventLog: client-caused messages, bounded per address and window."""

from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from shellserver.logs import OTHER_ADDRESSES, ClientEventLog, PeerLogger


class ClientEventLogTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.events = []
        self.log = ClientEventLog(Logger(observer=self.events.append), self.clock,
                                  per_window=3, window=60.0, max_tracked=4)

    def texts(self):
        return [formatEvent(event) for event in self.events]

    def test_first_messages_are_logged_with_their_fields(self):
        """The first messages of a window are logged at their level, with their fields."""
        self.assertTrue(self.log.warn("192.0.2.1", "bad token", "bad token from {peer}",
                                      peer="192.0.2.1"))
        self.log.info("192.0.2.1", "slow", "slow {peer}", peer="192.0.2.1")
        self.assertEqual(self.texts(), ["bad token from 192.0.2.1", "slow 192.0.2.1"])
        self.assertEqual([e["log_level"] for e in self.events], [LogLevel.warn, LogLevel.info])
        self.assertEqual(self.events[0]["peer"], "192.0.2.1")

    def test_flood_is_suppressed_then_summarised(self):
        """Past the budget nothing is logged; the next event after the window
        (from any address) brings one summary first."""
        for _ in range(500):
            self.log.warn("192.0.2.1", "bad token", "bad token")
        self.assertEqual(self.texts(), ["bad token"] * 3)
        self.clock.advance(59.9)
        self.log.warn("192.0.2.1", "bad token", "bad token")
        self.assertEqual(len(self.events), 3)
        self.clock.advance(0.1)
        self.log.warn("192.0.2.9", "other", "next")
        self.assertEqual(self.texts()[3:], [
            "suppressed 498 similar messages (bad token) from 192.0.2.1 in 60 s", "next"])
        self.assertEqual(self.events[3]["log_level"], LogLevel.warn)
        self.assertEqual(self.log.tracked, 1)

    def test_no_timers(self):
        """Nothing is left on the clock: windows close as time passes, lazily."""
        for number in range(10):
            self.log.warn(f"192.0.2.{number}", "e", "m")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_new_window_logs_again(self):
        """After the window, the address's messages are logged again."""
        for _ in range(4):
            self.log.warn("192.0.2.1", "e", "m")
        self.clock.advance(60)
        self.assertTrue(self.log.warn("192.0.2.1", "e", "m"))

    def test_no_summary_without_suppression(self):
        """A window that suppressed nothing ends silently."""
        self.log.warn("192.0.2.1", "e", "m")
        self.clock.advance(60)
        self.log.flush()
        self.assertEqual(self.texts(), ["m"])

    def test_addresses_and_events_count_apart(self):
        """Each (address, event) has its own budget."""
        for _ in range(5):
            self.log.warn("192.0.2.1", "a", "a1")
            self.log.warn("192.0.2.2", "a", "a2")
            self.log.warn("192.0.2.1", "b", "b1")
        self.assertEqual(sorted(self.texts()), sorted(["a1", "a2", "b1"] * 3))

    def test_tracked_addresses_are_bounded(self):
        """Past max_tracked, further addresses share one budget per event."""
        for number in range(100):
            for _ in range(10):
                self.log.warn(f"198.51.100.{number}", "e", "m {n}", n=number)
        self.assertLessEqual(self.log.tracked, 5)
        self.assertEqual(len(self.events), 4 * 3 + 3)
        self.clock.advance(60)
        self.log.flush()
        summaries = [t for t in self.texts() if t.startswith("suppressed")]
        self.assertIn(f"suppressed {96 * 10 - 3} similar messages (e) from {OTHER_ADDRESSES} "
                      "in 60 s", summaries)
        self.assertEqual(self.log.tracked, 0)

    def test_missing_address(self):
        """Peers without an address (UNIX sockets) share one budget."""
        for _ in range(5):
            self.log.warn(None, "e", "m")
        self.assertEqual(len(self.events), 3)

    def test_flush_summarises(self):
        """flush() logs the summaries of windows still open, and forgets them."""
        for _ in range(5):
            self.log.warn("192.0.2.1", "e", "m")
        self.log.flush()
        self.assertEqual(self.texts()[-1],
                         "suppressed 2 similar messages (e) from 192.0.2.1 in 60 s")
        self.assertEqual(self.log.tracked, 0)


class PeerLoggerTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.events = []
        self.library_log = Logger(observer=self.events.append)
        self.budget = ClientEventLog(Logger(observer=self.events.append), self.clock,
                                     per_window=2)

    def test_notices_and_warnings_within_the_budget(self):
        """A library's notices and warnings for one peer are logged within its budget."""
        logger = PeerLogger(self.library_log, self.budget, "192.0.2.1", "websocket")
        for _ in range(10):
            logger.warn("dropping {peer}", peer="x")
            logger.info("failing handshake")
        self.assertEqual([formatEvent(e) for e in self.events],
                         ["dropping x", "failing handshake"] * 2)

    def test_errors_and_debug_pass(self):
        """Errors, failures and debug messages are never held back."""
        logger = PeerLogger(self.library_log, self.budget, "192.0.2.1", "websocket")
        for _ in range(5):
            logger.error("bug")
            logger.debug("detail")
            try:
                raise RuntimeError("a bug")
            except RuntimeError:
                logger.failure("failed")
        self.assertEqual(len(self.events), 15)
