"""The warm pool, with fake sandboxes and a Clock."""

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from shellserver.sandbox.pool import MAX_BUFFERED, SandboxPool
from shellserver.testing import FakeSandbox, FakeSandboxStarter


class RecordingEvents:
    def __init__(self):
        self.output_data = []
        self.exits = []

    def output(self, data):
        self.output_data.append(data)

    def exited(self, status, signal):
        self.exits.append((status, signal))


class PoolTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.starter = FakeSandboxStarter()
        self.room = 10
        self.pool = SandboxPool(self.starter, self.clock, 2, room=lambda: self.room)
        self.pool.start_filling()

    def prompt(self, index):
        """Make the index-th started sandbox reach its prompt."""
        sandbox: FakeSandbox = self.starter.started[index]
        sandbox.events.output(b"Python 3\r\n\x1b[0;32mIn [\x1b[0;92;1m1\x1b[0;32m]: ")

    def fill(self):
        self.clock.advance(0)
        self.prompt(0)
        self.clock.advance(0)
        self.prompt(1)
        self.clock.advance(0)

    def test_fills_one_at_a_time(self):
        """The pool starts one sandbox, and the next only when that one is ready."""
        self.clock.advance(0)
        self.assertEqual(len(self.starter.started), 1)
        self.clock.advance(5)
        self.assertEqual(len(self.starter.started), 1)
        self.prompt(0)
        self.clock.advance(0)
        self.assertEqual(len(self.starter.started), 2)
        self.prompt(1)
        self.clock.advance(10)
        self.assertEqual(len(self.starter.started), 2)

    def test_hand_over_resizes_and_replays(self):
        """A visitor gets a waiting sandbox at its size, with what it printed so far."""
        self.fill()
        events = RecordingEvents()
        sandbox = self.pool.start(events, 120, 40)
        self.assertIs(sandbox, self.starter.started[0])
        self.assertEqual(sandbox.resizes, [(120, 40)])
        self.assertIn(b"In [", b"".join(events.output_data))
        sandbox.events.output(b"later")
        self.assertEqual(events.output_data[-1], b"later")

    def test_handed_out_once_and_replaced(self):
        """Each pooled sandbox serves one visitor; a replacement is started."""
        self.fill()
        first = self.pool.start(RecordingEvents(), 80, 24)
        second = self.pool.start(RecordingEvents(), 80, 24)
        self.assertIsNot(first, second)
        self.assertEqual(self.pool.handed_out, 2)
        self.clock.advance(0)
        self.assertEqual(len(self.starter.started), 3)
        self.assertNotIn(first, [w.sandbox for w in self.pool.waiting])

    def test_cold_start_when_empty(self):
        """With nothing waiting, the console starts cold."""
        self.pool.stop()
        sandbox = self.pool.start(RecordingEvents(), 80, 24)
        self.assertEqual(self.pool.cold_starts, 1)
        self.assertEqual(sandbox.size, (80, 24))

    def test_exit_after_hand_over_reaches_the_console(self):
        """Once handed over, the sandbox's exit goes to the console."""
        self.fill()
        events = RecordingEvents()
        sandbox = self.pool.start(events, 80, 24)
        sandbox.exit(0)
        self.assertEqual(events.exits, [(0, None)])

    def test_waiting_sandbox_that_dies_is_replaced_with_back_off(self):
        """A sandbox that dies while waiting is replaced, more slowly each time."""
        self.clock.advance(0)
        self.starter.started[0].exit(1)
        self.assertEqual(self.pool.waiting, [])
        self.clock.advance(0.9)
        self.assertEqual(len(self.starter.started), 1)
        self.clock.advance(0.1)
        self.assertEqual(len(self.starter.started), 2)
        self.starter.started[1].exit(1)
        self.clock.advance(1.9)
        self.assertEqual(len(self.starter.started), 2)
        self.clock.advance(0.1)
        self.assertEqual(len(self.starter.started), 3)

    def test_respects_capacity(self):
        """The pool never holds more sandboxes than the capacity leaves room for."""
        self.room = 1
        self.clock.advance(0)
        self.prompt(0)
        self.clock.advance(5)
        self.assertEqual(len(self.starter.started), 1)
        self.room = 2
        self.clock.advance(1)
        self.assertEqual(len(self.starter.started), 2)

    def test_unavailable_starter_retries(self):
        """While sandboxes cannot start (runtime building), the pool retries later."""
        self.pool.stop()
        self.starter.refuse_with = "the runtime is being built"
        self.pool.start_filling()
        self.clock.advance(0)
        self.assertEqual(self.pool.waiting, [])
        self.starter.refuse_with = None
        self.pool.retry_now()
        self.clock.advance(0)
        self.assertEqual(len(self.pool.waiting), 1)

    def test_chatty_waiting_sandbox_discarded(self):
        """A waiting sandbox that prints too much is terminated and replaced."""
        self.clock.advance(0)
        sandbox = self.starter.started[0]
        sandbox.events.output(b"x" * (MAX_BUFFERED + 1))
        self.assertEqual(sandbox.terminated, 1)
        self.assertEqual(self.pool.waiting, [])

    def test_stop_terminates_waiting(self):
        """Stopping the pool ends its waiting sandboxes and schedules nothing."""
        self.fill()
        self.pool.stop()
        self.assertEqual([s.terminated for s in self.starter.started], [1, 1])
        self.assertEqual(self.clock.getDelayedCalls(), [])
