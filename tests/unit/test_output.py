"""Tests for shellserver.sandbox.output: the server's end of a console's output pipe."""

import errno

from twisted.internet import main
from twisted.trial.unittest import SynchronousTestCase

from shellserver.sandbox.output import READ_SIZE, FifoReader


class FakeReactor:
    """Records which readers are registered."""

    def __init__(self):
        self.readers = set()

    def addReader(self, reader):
        self.readers.add(reader)

    def removeReader(self, reader):
        self.readers.discard(reader)


class Pipe:
    """What the FIFO holds: reads take from it, then EAGAIN, or EOF once closed."""

    def __init__(self):
        self.held = []
        self.writer_gone = False
        self.sizes = []
        self.closed = []
        self.unlinked = []

    def read(self, fd, size):
        self.sizes.append(size)
        if not self.held:
            if self.writer_gone:
                return b""
            raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
        data = self.held.pop(0)
        if len(data) > size:
            self.held.insert(0, data[size:])
            data = data[:size]
        return data


class FifoReaderTests(SynchronousTestCase):
    def setUp(self):
        self.reactor = FakeReactor()
        self.pipe = Pipe()
        self.delivered = []
        self.reader = FifoReader(self.reactor, "/state/pipes/s1", 7, self.delivered.append,
                                 read=self.pipe.read, close=self.pipe.closed.append,
                                 unlink=self.pipe.unlinked.append)
        self.reader.startReading()

    def test_read_delivers(self):
        """Each wake-up reads up to READ_SIZE and delivers it."""
        self.pipe.held = [b"a" * (READ_SIZE + 5)]
        self.assertIsNone(self.reader.doRead())
        self.assertEqual(self.delivered, [b"a" * READ_SIZE])
        self.assertEqual(self.pipe.sizes, [READ_SIZE])

    def test_nothing_waiting(self):
        """EAGAIN delivers nothing and keeps reading."""
        self.assertIsNone(self.reader.doRead())
        self.assertEqual(self.delivered, [])
        self.assertIn(self.reader, self.reactor.readers)

    def test_end_of_stream(self):
        """EOF (init has gone) ends reading; the fd stays open until finish()."""
        self.pipe.writer_gone = True
        self.assertIs(self.reader.doRead(), main.CONNECTION_DONE)
        self.reader.connectionLost(None)
        self.assertNotIn(self.reader, self.reactor.readers)
        self.assertEqual(self.pipe.closed, [])
        self.reader.resume()
        self.assertNotIn(self.reader, self.reactor.readers)

    def test_read_error(self):
        """Any other read error ends the stream as lost."""
        def broken(fd, size):
            raise OSError(errno.EIO, "Input/output error")
        self.reader._read = broken
        self.assertIs(self.reader.doRead(), main.CONNECTION_LOST)

    def test_pause_and_resume(self):
        """Pausing unregisters the reader (the pipe fills); resuming registers it."""
        self.reader.pause()
        self.assertNotIn(self.reader, self.reactor.readers)
        self.reader.resume()
        self.assertIn(self.reader, self.reactor.readers)

    def test_finish_drains_closes_and_unlinks(self):
        """finish() delivers everything held, even when paused, then closes once."""
        self.pipe.held = [b"x" * READ_SIZE, b"tail"]
        self.reader.pause()
        self.reader.finish()
        self.assertEqual(self.delivered, [b"x" * READ_SIZE, b"tail"])
        self.assertEqual(self.pipe.closed, [7])
        self.assertEqual(self.pipe.unlinked, ["/state/pipes/s1"])
        self.reader.finish()
        self.reader.resume()
        self.assertEqual(self.pipe.closed, [7])
        self.assertNotIn(self.reader, self.reactor.readers)

    def test_finish_after_eof(self):
        """finish() after the stream ended only closes."""
        self.pipe.writer_gone = True
        self.reader.doRead()
        self.reader.connectionLost(None)
        self.reader.finish()
        self.assertEqual((self.delivered, self.pipe.closed), ([], [7]))
