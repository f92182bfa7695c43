"""Tests for shellserver.sandbox.output: the server's hold on a console's PTY master."""

import errno
import os
import socket
import termios

from twisted.internet import main
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from shellserver.sandbox import output
from shellserver.sandbox.output import (
    BATCH,
    HOLD,
    READ_SIZE,
    REST_FULL,
    REST_MAX,
    REST_MIN,
    REST_TARGET,
    STREAM_GAP,
    TINY_READ,
    ConsoleTerminal,
)


class Terminal:
    """What the PTY master gives: reads take from it, then EAGAIN, or EIO once
    the console's side has closed; writes take up to ``room`` bytes."""

    def __init__(self):
        self.held = []
        self.hung_up = False
        self.reads = 0
        self.closed = []
        self.written = bytearray()
        self.room = 1 << 20
        self.sizes = []

    def read(self, fd, size):
        self.reads += 1
        if not self.held:
            if self.hung_up:
                raise OSError(errno.EIO, "Input/output error")
            raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
        data = self.held.pop(0)
        if len(data) > size:
            self.held.insert(0, data[size:])
            data = data[:size]
        return data

    def write(self, fd, data):
        if not self.room:
            raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
        taken = min(self.room, len(data))
        self.room -= taken
        self.written += data[:taken]
        return taken

    def ioctl(self, fd, request, argument):
        self.sizes.append((fd, request, argument))


class ConsoleTerminalTests(SynchronousTestCase):
    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.pty = Terminal()
        self.delivered = []
        self.terminal = ConsoleTerminal(self.reactor, self.delivered.append,
                                        read=self.pty.read, write=self.pty.write,
                                        close=self.pty.closed.append, ioctl=self.pty.ioctl)
        self.patch(os, "set_blocking", lambda fd, blocking: None)

    def attach(self):
        self.terminal.attach(7)
        self.assertIn(self.terminal, self.reactor.getReaders())

    def test_nothing_read_before_the_master_arrives(self):
        """Until init hands the master over, nothing is registered with the reactor."""
        self.terminal.resume()
        self.terminal.write(b"early")
        self.assertEqual((self.reactor.getReaders(), self.reactor.getWriters()), ([], []))

    def test_keystrokes_and_size_wait_for_the_master(self):
        """Keystrokes typed and the size set before the master arrives are
        written and set once it does."""
        self.terminal.write(b"print(1)\r")
        self.terminal.resize(100, 30)
        self.attach()
        self.assertEqual(len(self.pty.sizes), 1)
        self.assertEqual(self.pty.sizes[0][:2], (7, termios.TIOCSWINSZ))
        self.terminal.doWrite()
        self.assertEqual(bytes(self.pty.written), b"print(1)\r")

    def test_a_flood_is_read_while_reads_are_full(self):
        """After a full read, reading goes on while reads are full; a short read
        (the master's buffer drained) ends the wake-up, so that a writer of
        small pieces is not chased a few bytes per read."""
        self.attach()
        self.pty.held = [b"x" * 4096, b"x" * 4096, b"y" * 100, b"z" * 4096]
        self.terminal.doRead()
        self.assertEqual(self.pty.reads, 3)
        self.reactor.advance(HOLD)
        self.assertEqual(b"".join(self.delivered), b"x" * 8192 + b"y" * 100)
        self.terminal.doRead()
        self.reactor.advance(HOLD)
        self.assertEqual(b"".join(self.delivered), b"x" * 8192 + b"y" * 100 + b"z" * 4096)

    def test_a_lone_write_is_delivered_at_once(self):
        """A short read (an echo) is delivered in the same wake-up, without a rest."""
        self.attach()
        self.pty.held = [b"a"]
        self.assertIsNone(self.terminal.doRead())
        self.assertEqual(self.delivered, [b"a"])
        self.assertIn(self.terminal, self.reactor.getReaders())

    def stream(self, piece: bytes, gap: float, until: float) -> None:
        """The console writes ``piece`` every ``gap`` seconds for ``until``
        seconds, each read at once (the terminal is not resting)."""
        for _ in range(round(until / gap) + 1):
            self.pty.held = [piece]
            self.terminal.doRead()
            if self.terminal._wait is not None:
                return
            self.reactor.advance(gap)

    def test_a_lone_read_is_passed_on_as_read(self):
        """A wake-up's single read is delivered as the very bytes read (no copy)."""
        self.attach()
        echo = b"x" * 10
        self.pty.held = [echo]
        self.terminal.doRead()
        self.assertIs(self.delivered[0], echo)

    def test_a_slow_stream_rests_between_reads(self):
        """Small writes close together, at a pace that would not fill the PTY
        within a rest, make the terminal rest (not read) after a wake-up; it
        reads again after the rest, and every byte is delivered in order."""
        self.attach()
        self.stream(b"1\r\n", 0.0001, STREAM_GAP)
        self.assertNotIn(self.terminal, self.reactor.getReaders())
        self.assertEqual(b"".join(self.delivered), b"1\r\n" * len(self.delivered))
        self.reactor.advance(REST_MAX)
        self.assertIn(self.terminal, self.reactor.getReaders())

    def test_a_fast_stream_is_read_without_rests(self):
        """A pace that would fill the PTY within the shortest rest is read as
        it comes (the console would wait in its write during a rest)."""
        self.attach()
        per_gap = int(REST_TARGET * 0.0002 / REST_MIN) + 1000
        self.stream(b"x" * min(per_gap, 3000), 0.0002, 3 * STREAM_GAP)
        self.assertIn(self.terminal, self.reactor.getReaders())
        self.assertIsNone(self.terminal._wait)

    def test_small_writes_after_a_full_pty_rest_at_once(self):
        """After a read that found the PTY full (the console resumed after a
        pause), the stream's second small read in a row already starts a
        rest: a print loop's tiny writes do not cost a read each while its
        pace is learnt."""
        self.attach()
        self.pty.held = [b"x" * 4095] * 4
        self.terminal.doRead()
        self.assertIsNone(self.terminal._wait)
        self.reactor.advance(0.00005)
        self.pty.held = [b"7\r\n"]
        self.terminal.doRead()
        self.reactor.advance(0.00005)
        self.pty.held = [b"8\r\n"]
        self.terminal.doRead()
        self.assertIsNotNone(self.terminal._wait)
        self.assertEqual(self.terminal._rest, REST_MAX)

    def test_larger_pieces_are_paced_over_a_window(self):
        """Pieces of TINY_READ or more (a pipeline passed on by IPython, at an
        uneven pace) do not start a rest from one interval: their pace is
        measured over PACE_WINDOW first, as is a lone small one among them."""
        self.attach()
        self.pty.held = [b"x" * 3000]
        self.terminal.doRead()
        self.reactor.advance(0.0005)
        self.pty.held = [b"y" * TINY_READ]
        self.terminal.doRead()
        self.reactor.advance(0.0005)
        self.pty.held = [b"z" * 100]
        self.terminal.doRead()
        self.assertIsNone(self.terminal._wait)
        self.assertIn(self.terminal, self.reactor.getReaders())

    def start_resting(self):
        self.attach()
        self.stream(b"1\r\n", 0.0001, STREAM_GAP)
        self.assertIsNotNone(self.terminal._wait)
        return self.terminal._rest

    def test_a_rest_that_found_the_pty_full_ends_the_rests(self):
        """When a rest gathered about as much as the PTY holds, the terminal
        stops resting and reads the stream as it comes."""
        rest = self.start_resting()
        self.reactor.advance(rest)
        self.pty.held = [b"x" * 4095] * (REST_FULL // 4095 + 1)
        self.terminal.doRead()
        self.assertIsNone(self.terminal._wait)
        self.assertIn(self.terminal, self.reactor.getReaders())

    def test_a_rest_is_sized_by_what_it_gathered(self):
        """A rest that gathered more than REST_TARGET is followed by a shorter
        one, one that gathered less by a longer one (within REST_MIN and
        REST_MAX); each wake-up after a rest delivers what it read at once."""
        rest = self.start_resting()
        self.reactor.advance(rest)
        self.pty.held = [b"a" * 4095, b"b" * 4095, b"c" * 2000]
        delivered = len(self.delivered)
        self.terminal.doRead()
        self.assertTrue(self.delivered[delivered:] == [b"a" * 4095 + b"b" * 4095 + b"c" * 2000])
        shorter = self.terminal._rest
        self.assertTrue(REST_MIN <= shorter < rest, (shorter, rest))
        self.reactor.advance(shorter)
        self.pty.held = [b"d" * (REST_TARGET // 4)]
        self.terminal.doRead()
        self.assertEqual(self.terminal._rest, min(REST_MAX, 4 * shorter))
        self.assertNotIn(self.terminal, self.reactor.getReaders())

    def test_ctrl_c_written_during_a_rest(self):
        """Keystrokes typed while the terminal rests reach the console at once."""
        self.start_resting()
        self.terminal.write(b"\x03")
        self.assertEqual(bytes(self.pty.written), b"\x03")

    def test_a_flood_is_held_until_a_batch_is_together(self):
        """Full reads are not delivered one by one: held (reading on) until
        BATCH is together."""
        self.attach()
        self.pty.held = [b"x" * 4096]
        self.terminal.doRead()
        self.assertEqual(self.delivered, [])
        self.assertIn(self.terminal, self.reactor.getReaders())
        self.pty.held = [b"x" * 4096] * (BATCH // 4096)
        self.terminal.doRead()
        self.assertEqual([len(d) for d in self.delivered], [BATCH])
        self.assertEqual(self.pty.held, [b"x" * 4096])  # the rest: next wake-up
        self.reactor.advance(HOLD)
        self.assertEqual([len(d) for d in self.delivered], [BATCH])

    def test_a_held_flood_goes_when_nothing_more_comes(self):
        """A held piece is delivered after HOLD if nothing more came."""
        self.attach()
        self.pty.held = [b"y" * 4096]
        self.terminal.doRead()
        self.reactor.advance(HOLD)
        self.assertEqual(self.delivered, [b"y" * 4096])
        self.assertIn(self.terminal, self.reactor.getReaders())

    def test_pause_and_resume(self):
        """Pausing unregisters the reader (the console blocks); resuming registers it."""
        self.attach()
        self.terminal.pause()
        self.assertNotIn(self.terminal, self.reactor.getReaders())
        self.terminal.resume()
        self.assertIn(self.terminal, self.reactor.getReaders())

    def test_paused_during_a_rest_stays_paused(self):
        """A rest ending while paused does not read again."""
        self.attach()
        self.pty.held = [b"1"]
        self.terminal.doRead()
        self.pty.held = [b"2"]
        self.terminal.doRead()
        self.terminal.pause()
        self.reactor.advance(1)
        self.assertNotIn(self.terminal, self.reactor.getReaders())

    def test_hang_up_ends_reading_and_keeps_the_fd(self):
        """EIO (init exited) delivers what was read and ends reading; the fd is
        closed only by finish()."""
        self.attach()
        self.pty.held = [b"x" * 4096, b"x" * 4096]
        self.pty.hung_up = True
        self.assertIs(self.terminal.doRead(), main.CONNECTION_DONE)
        self.terminal.connectionLost(None)
        self.assertEqual(b"".join(self.delivered), b"x" * 8192)
        self.assertNotIn(self.terminal, self.reactor.getReaders())
        self.terminal.resume()
        self.assertNotIn(self.terminal, self.reactor.getReaders())
        self.assertEqual(self.pty.closed, [])

    def test_finish_drains_and_closes(self):
        """finish() delivers everything held, even when paused, then closes once."""
        self.attach()
        self.pty.held = [b"x" * READ_SIZE, b"tail"]
        self.pty.hung_up = True
        self.terminal.pause()
        self.terminal.finish()
        self.assertEqual(b"".join(self.delivered), b"x" * READ_SIZE + b"tail")
        self.assertEqual(self.pty.closed, [7])
        self.terminal.finish()
        self.terminal.resume()
        self.assertEqual(self.pty.closed, [7])
        self.assertNotIn(self.terminal, self.reactor.getReaders())

    def test_master_arriving_after_the_end_is_closed(self):
        """A master that arrives once the sandbox has ended is closed, not read."""
        self.terminal.finish()
        self.terminal.attach(9)
        self.assertEqual(self.pty.closed, [9])
        self.assertEqual(self.reactor.getReaders(), [])

    def test_keystrokes_wait_while_the_terminal_is_full(self):
        """Keystrokes the terminal does not take now are written later, in order."""
        self.attach()
        self.pty.room = 3
        self.terminal.write(b"abcdef")
        self.terminal.doWrite()
        self.assertEqual(bytes(self.pty.written), b"abc")
        self.pty.room = 10
        self.terminal.doWrite()
        self.assertEqual(bytes(self.pty.written), b"abcdef")

    def test_keystrokes_are_written_at_once(self):
        """A keystroke with nothing waiting before it is written in the same
        call, without waiting for the reactor's next turn."""
        self.attach()
        self.terminal.write(b"a")
        self.assertEqual(bytes(self.pty.written), b"a")
        self.assertEqual(self.reactor.getWriters(), [])

    def test_keystrokes_behind_waiting_ones_keep_their_order(self):
        """While keystrokes wait for room, later ones queue behind them; what
        the terminal does not take at once waits for the reactor."""
        self.attach()
        self.pty.room = 2
        self.terminal.write(b"abc")
        self.assertEqual(bytes(self.pty.written), b"ab")
        self.assertEqual(self.reactor.getWriters(), [self.terminal])
        self.pty.room = 10
        self.terminal.write(b"d")
        self.assertEqual(bytes(self.pty.written), b"ab")
        self.terminal.doWrite()
        self.assertEqual(bytes(self.pty.written), b"abcd")

    def test_keystrokes_after_the_hang_up_are_dropped(self):
        """Once the console's side has gone, keystrokes are not buffered."""
        self.attach()
        self.terminal.connectionLost(None)
        self.terminal.write(b"lost")
        self.assertEqual((bytes(self.pty.written), self.reactor.getWriters()), (b"", []))


class HandoffTests(SynchronousTestCase):
    """The handoff socket, on a real socketpair (no PTY of the host's is opened)."""

    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.directory = self.mktemp()
        os.makedirs(self.directory)
        self.handoffs = output.TerminalHandoffs(self.reactor, self.directory)
        self.path, self.terminal = self.handoffs.open("s1", print)
        self.addCleanup(self.terminal.finish)

    def send(self, fds):
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
            sender.connect(self.path)
            socket.send_fds(sender, [b"pty"], fds)

    def test_socket_is_bound_for_root_alone(self):
        """The handoff socket is bound at its path, mode 0600, and read by the reactor."""
        self.assertEqual(os.stat(self.path).st_mode & 0o777, 0o600)
        self.assertEqual(len(self.reactor.getReaders()), 1)

    def test_anything_but_a_pty_master_is_refused(self):
        """A descriptor that is not a PTY master is closed and the wait goes on."""
        read_end, write_end = os.pipe()
        self.addCleanup(os.close, write_end)
        self.send([read_end])
        os.close(read_end)
        handoff = self.terminal.handoff
        handoff.doRead()
        self.assertEqual(self.terminal.fd, -1)
        self.assertTrue(handoff.open)
        self.assertEqual(self.reactor.getReaders(), [handoff])

    def test_finish_removes_the_socket(self):
        """Finishing before any master arrived closes and unlinks the socket."""
        self.terminal.finish()
        self.assertFalse(os.path.exists(self.path))
        self.assertEqual(self.reactor.getReaders(), [])


class PrepareDirectoryTests(SynchronousTestCase):
    def test_stale_sockets_and_fifos_removed(self):
        """Sockets and FIFOs a previous run left are removed and counted; the
        directory is root's alone."""
        directory = self.mktemp()
        os.makedirs(directory)
        os.mkfifo(os.path.join(directory, "old"))
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(os.path.join(directory, "s1"))
        self.assertEqual(output.prepare_directory(directory), 2)
        self.assertEqual(os.listdir(directory), [])
        self.assertEqual(os.stat(directory).st_mode & 0o777, 0o700)
