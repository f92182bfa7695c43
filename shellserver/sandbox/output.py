"""The console's output pipe: a FIFO per session, read by the reactor.

A PTY hands its reader at most 4 KiB per read, each after a round trip
through the kernel's tty worker, so a server reading the PTY itself pays that
per 4 KiB and, while it frames and sends what it read, keeps the console
waiting on a full 12 KiB of PTY buffer. Instead, init in the sandbox reads the
console's terminal and writes a FIFO that the server made and reads here, in
pieces of up to READ_SIZE, with PIPE_SIZE of buffer between the two: the PTY
cost lands on the sandbox's own CPU quota, and the server's work no longer
stalls the console.

The FIFO lives in a directory only root can enter; the launcher opens its
write end and unlinks it at once, before anything of the console runs.
Pausing (flow control) stops reading it: the pipe fills, init stops reading
the console's terminal, and the console blocks in its write.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from collections.abc import Callable

from twisted.internet import abstract, main
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

log = Logger()

READ_SIZE = 65536  # bytes read per wake-up at most
PIPE_SIZE = 262144  # the FIFO's buffer, in the sandbox's memory cgroup
F_SETPIPE_SZ = 1031


class IOutputPipe(Interface):
    """One session's output pipe, as the running sandbox uses it."""

    def pause() -> None:
        """Stop reading (the client is behind)."""

    def resume() -> None:
        """Read again."""

    def finish() -> None:
        """The sandbox has ended: pass on what the pipe still holds, then close."""


class IOutputPipes(Interface):
    def open(session: str, deliver: Callable[[bytes], None]) -> tuple[str, IOutputPipe]:
        """A new pipe for ``session``: its path (for the launcher) and the pipe.

        Raises OSError if it cannot be made.
        """


@implementer(IOutputPipe)
class FifoReader(abstract.FileDescriptor):
    """The server's end of one FIFO, as a reactor reader."""

    def __init__(self, reactor, path: str, fd: int, deliver: Callable[[bytes], None],
                 read: Callable[[int, int], bytes] = os.read,
                 close: Callable[[int], None] = os.close,
                 unlink: Callable[[str], None] | None = None) -> None:
        super().__init__(reactor)
        self.path, self.fd = path, fd
        self._deliver, self._read = deliver, read
        self._close, self._unlink = close, unlink or unlink_quietly
        self.connected = 1
        self.finished = False

    def fileno(self) -> int:
        return self.fd

    def doRead(self):
        try:
            data = self._read(self.fd, READ_SIZE)
        except BlockingIOError:
            return None
        except OSError as e:
            return main.CONNECTION_LOST if e.errno != errno.EINTR else None
        if not data:
            return main.CONNECTION_DONE  # init has gone (and the launcher with it)
        self._deliver(data)
        return None

    def connectionLost(self, reason: Failure) -> None:
        # Only the end of the stream: finish() closes, once the launcher ended.
        self.stopReading()
        self.connected = 0

    def pause(self) -> None:
        self.stopReading()

    def resume(self) -> None:
        if self.connected and not self.finished:
            self.startReading()

    def finish(self) -> None:
        """Deliver what the pipe holds now (at most PIPE_SIZE), then close."""
        if self.finished:
            return
        self.finished = True
        self.stopReading()
        while True:
            try:
                data = self._read(self.fd, READ_SIZE)
            except OSError:
                break
            if not data:
                break
            self._deliver(data)
        self._close(self.fd)
        self._unlink(self.path)  # the launcher unlinks it, unless it died first


def unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warn("could not remove the output pipe {path}: {error}", path=path, error=e)


@implementer(IOutputPipes)
class FifoPipes:
    """Makes the FIFOs, in a directory of the state directory's."""

    def __init__(self, reactor, directory: str) -> None:
        self.reactor, self.directory = reactor, directory

    def open(self, session: str, deliver: Callable[[bytes], None]) -> tuple[str, FifoReader]:
        path = os.path.join(self.directory, session)
        os.mkfifo(path, 0o600)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            unlink_quietly(path)
            raise
        try:
            fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_SIZE)
        except OSError as e:  # a lower fs.pipe-max-size: the default size still works
            log.warn("output pipe size {size} refused: {error}", size=PIPE_SIZE, error=e)
        reader = FifoReader(self.reactor, path, fd, deliver)
        reader.startReading()
        return path, reader


def prepare_directory(directory: str) -> int:
    """Make the FIFO directory (root only), removing what a previous run left.

    Returns how many FIFOs were removed.
    """
    os.makedirs(directory, mode=0o700, exist_ok=True)
    os.chmod(directory, 0o700)
    removed = 0
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if stat.S_ISFIFO(os.lstat(path).st_mode):
            os.unlink(path)
            removed += 1
    return removed
