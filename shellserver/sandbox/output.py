"""The console's terminal, read and written by the server itself.

Init in the sandbox opens the console's PTY (a PTY of the sandbox's own
devpts) and hands its master to the server over a unix datagram socket
(SCM_RIGHTS), then closes its own copy: from then on the server reads the
console's output from that master and writes its keystrokes and size to it,
and no process of the sandbox copies the bytes in between (init only reaps
and reports the exit status). The socket lives in a directory only root can
enter; the launcher connects to it and unlinks it at once, before anything of
the console runs, and only init ever sends on it.

Reads are gathered: a console printing line by line (a print loop, IPython's
``!`` passing a pipeline on) would otherwise cost the server a wake-up and a
message per write. A lone write (an echo) is read and passed on at once.
Output that keeps coming within STREAM_GAP is a stream, and its pace (what
a wake-up read over the time since the last one emptied the PTY; for pieces
of TINY_READ or more, over PACE_WINDOW) decides how it is read:

- slow enough that the PTY would not fill within a rest (REST_TARGET bytes
  take at least REST_MIN): the terminal stops reading for a rest after each
  wake-up, sized from what the last rest gathered so that each wake-up reads
  about REST_TARGET, and passes on what it read once per wake-up. The
  reactor's timers have a resolution of 1 ms (epoll_wait's timeout), so a
  rest is never shorter than that;
- faster (or a rest found the PTY full, so the console had waited in its
  write): no rests, the master is read as it delivers; full reads (a flood)
  are passed on once BATCH is together or nothing more came for HOLD.

A rest costs the console nothing as long as the PTY does not fill (about
12 KB of output processed by the terminal, 20 KB raw): it writes on into
the PTY meanwhile.

Pausing (flow control) stops reading the master: the PTY fills and the
console blocks in its write.
"""

from __future__ import annotations

import array
import errno
import fcntl
import os
import socket
import stat
import struct
import termios
from collections.abc import Callable

from twisted.internet import abstract, main
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IReadDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

log = Logger()

READ_SIZE = 65536  # bytes asked for per read (a PTY gives at most 4 KiB)
FLOOD_READ = 4000  # a read this long took a full PTY buffer: more is coming
BATCH = 65536  # a flood is passed on in pieces of this much
HOLD = 0.001  # seconds a flood's piece waits for more
STREAM_GAP = 0.002  # output this close to the last is a stream
PACE_WINDOW = 0.002  # seconds a stream of larger pieces is measured over
TINY_READ = 512  # two reads in a row shorter than this (lines): their own pace counts
REST_TARGET = 8192  # bytes a rest lets gather (the PTY holds about 12 KB cooked)
REST_FULL = 12000  # a rest that gathered this much found the PTY full
REST_MIN = 0.001  # seconds: the reactor's timer resolution
REST_MAX = 0.004  # seconds: a slow stream's output waits at most this
FLUSH_BYTES = 1 << 20  # what is passed on once the sandbox has ended, at most
PTMX_MAJOR, PTMX_MINOR = 5, 2  # a PTY master's device (any devpts instance's)


class IOutputPipe(Interface):
    """One session's console terminal, as the running sandbox uses it."""

    def pause() -> None:
        """Stop reading (the client is behind)."""

    def resume() -> None:
        """Read again."""

    def write(data: bytes) -> None:
        """Keystrokes for the console (held until its terminal has arrived)."""

    def resize(cols: int, rows: int) -> None:
        """Set the console's terminal size (it gets SIGWINCH)."""

    def registerProducer(producer, streaming: bool) -> None:
        """Paused while more keystrokes wait than the terminal takes."""

    def finish() -> None:
        """The sandbox has ended: pass on what the terminal still holds, then close."""


class IOutputPipes(Interface):
    def open(session: str, deliver: Callable[[bytes], None]) -> tuple[str, IOutputPipe]:
        """A new handoff for ``session``: its socket's path (for the launcher)
        and the terminal that receives the console's PTY master through it.

        Raises OSError if it cannot be made.
        """


def is_pty_master(fd: int) -> bool:
    """Whether ``fd`` is a PTY master (opened through some devpts's ptmx)."""
    mode = os.fstat(fd)
    return (stat.S_ISCHR(mode.st_mode) and os.major(mode.st_rdev) == PTMX_MAJOR
            and os.minor(mode.st_rdev) == PTMX_MINOR)


@implementer(IOutputPipe)
class ConsoleTerminal(abstract.FileDescriptor):
    """The server's hold on one console's PTY master, as a reactor reader and
    writer (keystrokes are buffered, with producer support, as on a socket)."""

    def __init__(self, reactor, deliver: Callable[[bytes], None],
                 read: Callable[[int, int], bytes] = os.read,
                 write: Callable[[int, bytes], int] = os.write,
                 close: Callable[[int], None] = os.close,
                 ioctl: Callable[[int, int, bytes], object] = fcntl.ioctl) -> None:
        super().__init__(reactor)
        # The same reactor, for its timers (FileDescriptor types its own
        # attribute as the descriptor set only).
        self._clock: IReactorTime = reactor
        self.fd = -1  # until init hands the master over
        self._deliver = deliver
        self._read, self._write, self._close, self._ioctl = read, write, close, ioctl
        self.connected = 1  # FileDescriptor.write buffers only while connected
        self.paused = False
        self.hung_up = False  # the console's side has closed (init exited)
        self.finished = False
        self._size: tuple[int, int] | None = None
        # Read, held to gather a flood: the reads themselves, joined once when
        # passed on (a lone read is passed on as it is, without a copy).
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._wait: IDelayedCall | None = None  # a rest: not reading
        self._flush: IDelayedCall | None = None  # a flood's piece passed on then
        self._holding = False
        self._last_read = -STREAM_GAP  # the last read that got output (or a rest's end)
        self._emptied = -STREAM_GAP  # when the last wake-up read the PTY empty
        self._rest = 0.0  # seconds of rest after each wake-up (0: none)
        self._window_start = 0.0  # a stream's pace measured, while not resting
        self._last_got = READ_SIZE  # what the last wake-up of the stream read
        self._window_bytes = 0

    def fileno(self) -> int:
        return self.fd

    def attach(self, master: int) -> None:
        """The console's master has arrived: size it, type what waits, read."""
        if self.finished:
            self._close(master)
            return
        os.set_blocking(master, False)
        self.fd = master
        if self._size is not None:
            self._set_size(*self._size)
        if self.dataBuffer or self._tempDataBuffer:
            self.startWriting()
        if not self.paused:
            self.startReading()

    # -- output ---------------------------------------------------------------

    def doRead(self):
        got = 0
        while self._pending_bytes < BATCH:
            try:
                data = self._read(self.fd, READ_SIZE)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                self._pass_on()
                return main.CONNECTION_DONE  # EIO: init exited, the slave is closed
            if not data:
                self._pass_on()
                return main.CONNECTION_DONE
            self._pending.append(data)
            self._pending_bytes += len(data)
            got += len(data)
            if len(data) < FLOOD_READ:
                # The master's buffer is drained: what the console writes from
                # here on comes with the next wake-up. (Reading on until EAGAIN
                # chases a writer of small pieces running beside the server, a
                # few bytes per read: 22000 reads per MB of a print loop.)
                break
            # A full read: on, a read that finds the master's buffer empty first
            # waits for the kernel's pending flush into it.
        now = self._clock.seconds()
        resting = False
        if got:
            if now - self._last_read < STREAM_GAP:
                resting = self._paced(got, now)
            else:  # a lone write, or a stream's first
                self._unrested(now)
                self._last_got = got
            self._last_read = now
        self._emptied = now
        # Without a rest, a full read means a flood: pass it on once BATCH is
        # together (or nothing more came within HOLD), not at each 4 KiB. The
        # master stays read meanwhile: a console writing large pieces fills
        # the PTY in well under HOLD and would wait for the server.
        self._holding = (not resting and got >= FLOOD_READ
                         and self._pending_bytes < BATCH)
        if not self._holding and not (got == 0 and self._flush is not None):
            self._pass_on()
            self._cancel_flush()
        if resting:
            self.stopReading()
            self._wait = self._clock.callLater(self._rest, self._rest_over)
        elif self._holding and self._flush is None:
            self._flush = self._clock.callLater(HOLD, self._flush_over)
        return None

    def _paced(self, got: int, now: float) -> bool:
        """Whether to rest after this wake-up of a stream (and for how long:
        ``_rest``). ``got`` came since the last wake-up emptied the PTY: after
        a rest, or at the second tiny write in a row (a print loop's lines),
        that is the console's pace, known at once (a print loop resumed after a pause cost
        a read per line while its pace was measured). Larger pieces (IPython's
        ``!`` passing a pipeline on, with a small one now and then) come too
        unevenly for one interval to tell: their pace is measured over
        PACE_WINDOW."""
        tiny = got < TINY_READ and self._last_got < TINY_READ
        self._last_got = got
        if got >= REST_FULL:  # the PTY filled: the console waited in its write
            self._unrested(now)
            return False
        if self._rest or tiny:
            rest = max(now - self._emptied, 0.0) * REST_TARGET / got
        else:
            self._window_bytes += got
            span = now - self._window_start
            if span < PACE_WINDOW:
                return False
            rest = span * REST_TARGET / self._window_bytes
            self._window_start, self._window_bytes = now, 0
        if rest < REST_MIN:  # the PTY would fill within the shortest rest
            self._unrested(now)
            return False
        self._rest = min(REST_MAX, rest)  # REST_TARGET's time at this pace
        return True

    def _unrested(self, now: float) -> None:
        self._rest = 0.0
        self._window_start, self._window_bytes = now, 0

    def _flush_over(self) -> None:
        self._flush = None
        self._holding = False
        self._pass_on()

    def _cancel_flush(self) -> None:
        if self._flush is not None:
            if self._flush.active():
                self._flush.cancel()
            self._flush = None

    def _rest_over(self) -> None:
        self._wait = None
        if self.hung_up or self.finished:
            return
        self._last_read = self._clock.seconds()
        if not self.paused:
            self.startReading()

    def startReading(self) -> None:
        if self.fd >= 0 and not self.hung_up and not self.finished:
            super().startReading()

    def _pass_on(self) -> None:
        if self._pending:
            data = b"".join(self._pending)
            self._pending.clear()
            self._pending_bytes = 0
            self._deliver(data)

    def connectionLost(self, reason: Failure) -> None:
        # The console's side has gone; finish() closes, once the launcher ended.
        self.stopReading()
        self.stopWriting()
        self.hung_up = True

    def pause(self) -> None:
        self.paused = True
        self.stopReading()

    def resume(self) -> None:
        self.paused = False
        if self.fd >= 0 and self._wait is None and not self.hung_up and not self.finished:
            self.startReading()

    def finish(self) -> None:
        """Deliver what the terminal holds now (at most FLUSH_BYTES), then close."""
        if self.finished:
            return
        self.finished = True
        if self._wait is not None and self._wait.active():
            self._wait.cancel()
        self._wait = None
        self._cancel_flush()
        self.stopReading()
        self.stopWriting()
        if self.fd < 0:
            self._pass_on()
            return
        total = 0
        while total < FLUSH_BYTES:
            try:
                data = self._read(self.fd, READ_SIZE)
            except OSError:
                break
            if not data:
                break
            self._pending.append(data)
            total += len(data)
        self._pass_on()
        self._close(self.fd)
        self.fd = -1

    # -- keystrokes and size ---------------------------------------------------

    def startWriting(self) -> None:
        if self.fd >= 0 and not self.hung_up and not self.finished:
            super().startWriting()

    def write(self, data: bytes) -> None:
        if self.finished or self.hung_up:
            return
        if self.fd >= 0 and data and not self.dataBuffer and not self._tempDataBuffer:
            # Nothing waits before these keystrokes: written now rather than
            # at the reactor's next turn (an echo's round trip is mostly turns).
            try:
                written = self._write(self.fd, data)
            except BlockingIOError:
                written = 0
            except OSError as e:
                if e.errno != errno.EINTR:
                    return  # the console's side has gone: its keystrokes go nowhere
                written = 0
            data = data[written:]
            if not data:
                return
        super().write(data)

    def writeSomeData(self, data: bytes) -> int:
        try:
            return self._write(self.fd, data)
        except BlockingIOError:
            return 0
        except OSError as e:
            if e.errno == errno.EINTR:
                return 0
            # The console's side has gone: its keystrokes go nowhere.
            return len(data)

    def resize(self, cols: int, rows: int) -> None:
        self._size = (cols, rows)
        if self.fd >= 0 and not self.finished:
            self._set_size(cols, rows)

    def _set_size(self, cols: int, rows: int) -> None:
        try:
            self._ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        except OSError as e:
            log.warn("console terminal resize failed: {error}", error=e)

    def logPrefix(self) -> str:
        return "ConsoleTerminal"


@implementer(IReadDescriptor)
class _Handoff:
    """The bound datagram socket one console's master arrives on, once."""

    def __init__(self, reactor, path: str, sock: socket.socket,
                 terminal: ConsoleTerminal) -> None:
        self.reactor, self.path, self._socket, self._terminal = reactor, path, sock, terminal
        self.open = True

    def fileno(self) -> int:
        return self._socket.fileno()

    def doRead(self) -> None:
        try:
            _, ancillary, flags, _ = self._socket.recvmsg(
                16, socket.CMSG_SPACE(4 * array.array("i").itemsize))
        except BlockingIOError:
            return
        except OSError as e:
            log.warn("console terminal handoff failed: {error}", error=e)
            self.close()
            return
        fds = array.array("i")
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
        master = fds[0] if len(fds) == 1 and not flags & socket.MSG_CTRUNC else None
        if master is not None and not is_pty_master(master):
            master = None
        for fd in fds:
            if fd != master:
                os.close(fd)
        if master is None:
            log.error("console terminal handoff {path}: not one PTY master "
                      "({count} descriptors); ignored", path=self.path, count=len(fds))
            return
        self.close()
        os.set_inheritable(master, False)
        self._terminal.attach(master)

    def close(self) -> None:
        if self.open:
            self.open = False
            self.reactor.removeReader(self)
            self._socket.close()
            unlink_quietly(self.path)  # the launcher unlinks it, unless it died first

    def connectionLost(self, reason) -> None:
        pass

    def logPrefix(self) -> str:
        return "ConsoleTerminalHandoff"


class HandedTerminal(ConsoleTerminal):
    """A ConsoleTerminal that also closes its handoff socket when it finishes."""

    handoff: _Handoff | None = None

    def finish(self) -> None:
        if self.handoff is not None:
            self.handoff.close()
        super().finish()


def unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warn("could not remove the terminal handoff socket {path}: {error}",
                 path=path, error=e)


@implementer(IOutputPipes)
class TerminalHandoffs:
    """Binds the handoff sockets, in a directory of the state directory's."""

    def __init__(self, reactor, directory: str) -> None:
        self.reactor, self.directory = reactor, directory

    def open(self, session: str, deliver: Callable[[bytes], None]) -> tuple[str, HandedTerminal]:
        path = os.path.join(self.directory, session)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                             | socket.SOCK_NONBLOCK)
        try:
            sock.bind(path)
            os.chmod(path, 0o600)
        except OSError:
            sock.close()
            unlink_quietly(path)
            raise
        terminal = HandedTerminal(self.reactor, deliver)
        terminal.handoff = _Handoff(self.reactor, path, sock, terminal)
        self.reactor.addReader(terminal.handoff)
        return path, terminal


def prepare_directory(directory: str) -> int:
    """Make the handoff directory (root only), removing what a previous run left.

    Returns how many sockets (or FIFOs, of older versions) were removed.
    """
    os.makedirs(directory, mode=0o700, exist_ok=True)
    os.chmod(directory, 0o700)
    removed = 0
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        mode = os.lstat(path).st_mode
        if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
            os.unlink(path)
            removed += 1
    return removed
