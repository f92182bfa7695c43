"""The server's side of the fork server (``sandbox.fork_server``).

``ForkServer`` runs the template (forkserver.py) as a child of the server,
in the server's cgroup, restarts it when it dies, and asks it for a
launcher per console. ``ForkedLauncher`` is that launcher's transport as
``RunningSandbox`` uses it: the PTY master (keystrokes, size, the
launcher's messages), signals through a pidfd, and the exit, which the
pidfd reports and the launcher's status message (on the request's
connection) explains. It does not depend on the template once started:
a template that dies leaves running consoles as they are.
"""

from __future__ import annotations

import array
import ctypes
import os
import pty
import signal
import socket

from attrs import define, field
from twisted.application.service import Service
from twisted.internet import abstract, fdesc, process
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.interfaces import IDelayedCall, IProcessTransport, IReadDescriptor
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from shellserver.interfaces import IProcessReactor
from shellserver.sandbox.spec import console_argv, console_env

log = Logger()

TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "forkserver.py")
# How long the server waits for the template's answer (it forks at once).
ANSWER_TIMEOUT = 2.0
FIRST_RESTART = 0.5
MAX_RESTART = 30.0
# How often the server looks for orphans it must reap (see OrphanReaper).
ORPHAN_SWEEP = 5.0
PR_SET_CHILD_SUBREAPER = 36


# What a console costs in memory, measured with bench/console_cost.py (PSS:
# shared pages split among their sharers; the table is in docs/sandbox.md):
# an idle console, everything counted (launcher, init, IPython, the server's
# share), on each path; the template, once per server.
FORKED_CONSOLE_MB = 10.0
CLASSIC_CONSOLE_MB = 28.5
TEMPLATE_MB = 41.0
# What a console in use adds over an idle one, for sizing: completions
# (jedi's caches), tracebacks, a few modules and some data. A console that
# uses more is bounded by sandbox.memory_mb, not by this.
CONSOLE_IN_USE_MB = 16.0


def console_cost_mb(fork_server: bool) -> tuple[float, float]:
    """(fixed, per console) memory in MB the admission capacity is derived from."""
    if fork_server:
        return TEMPLATE_MB, FORKED_CONSOLE_MB + CONSOLE_IN_USE_MB
    return 0.0, CLASSIC_CONSOLE_MB + CONSOLE_IN_USE_MB


class OrphanReaper:
    """The server as its descendants' reaper: orphans come to it, and it reaps them.

    A forked launcher is the template's child; when the template dies
    (killed, crashed), its running launchers are orphaned. Without a
    subreaper they would go to the host's PID 1, which on some hosts (a
    container's, this machine's) never reaps: each would stay a zombie
    after its console ends. As ``PR_SET_CHILD_SUBREAPER`` the server gets
    them instead, and ``reap`` collects every child that has exited and
    that Twisted does not know (Twisted reaps its own spawned processes:
    the template and classic launchers). The same goes for a classic
    sandbox's init whose launcher was killed before it.
    """

    def become_subreaper(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(error)}")

    def children(self) -> set[int]:
        found: set[int] = set()
        for task in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{task}/children") as f:
                    found.update(int(pid) for pid in f.read().split())
            except FileNotFoundError:  # a thread that has ended
                continue
        return found

    def reap(self) -> list[int]:
        """Reap the exited children Twisted does not watch; their pids."""
        reaped = []
        for pid in sorted(self.children() - set(process.reapProcessHandlers)):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                continue
            if done:
                reaped.append(done)
        return reaped


class ForkServerUnavailable(Exception):
    """The template could not fork a launcher; str() says why.

    ``sent``: the request had reached the template, which may have forked a
    launcher for it after all: that spec's uid and cgroups must not be used
    again (nor the spec started another way).
    """

    def __init__(self, message: str, sent: bool = False) -> None:
        super().__init__(message)
        self.sent = sent


@implementer(IReadDescriptor)
@define(eq=False)
class _ExitWatch:
    """The launcher's pidfd in the reactor: readable once it has exited."""

    _launcher: ForkedLauncher
    _pidfd: int

    def fileno(self) -> int:
        return self._pidfd

    def doRead(self) -> None:
        self._launcher.exited()

    def connectionLost(self, reason) -> None:
        pass

    def logPrefix(self) -> str:
        return "ForkedLauncherExit"


class ForkedLauncher(abstract.FileDescriptor):
    """One forked launcher: its PTY master, pidfd and status connection.

    Like Twisted's PTYProcess, ``processEnded`` comes once the launcher has
    exited and its terminal has closed (so all its output was read).
    """

    pid: int | None  # None once ended, as in Twisted's process transports

    def __init__(self, reactor, protocol: ProcessProtocol, master: int, pid: int,
                 pidfd: int, status: socket.socket, on_exit=None) -> None:
        super().__init__(reactor)
        # Called once the launcher has exited (the fork server reaps it if
        # it is an orphan of a dead template).
        self._on_exit = on_exit
        fdesc.setNonBlocking(master)
        self.fd, self.pid, self._pidfd, self._status = master, pid, pidfd, status
        self._exit_status: int | None = None
        self._exited = False
        self._lost = 0
        self.proto = protocol
        self.connected = 1  # FileDescriptor.write drops data otherwise
        self._watch = _ExitWatch(self, pidfd)
        protocol.makeConnection(self)
        self.startReading()
        reactor.addReader(self._watch)

    def fileno(self) -> int:
        return self.fd

    def doRead(self):
        return fdesc.readFromFD(self.fd, lambda data: self.proto.childDataReceived(1, data))

    def writeSomeData(self, data):
        return fdesc.writeToFD(self.fd, data)

    def signalProcess(self, signal_name) -> None:
        if self._exited:
            raise ProcessExitedAlready()
        number = getattr(signal, f"SIG{signal_name}") if isinstance(signal_name, str) \
            else signal_name
        signal.pidfd_send_signal(self._pidfd, number)

    def exited(self) -> None:
        """The pidfd says the launcher has exited: read its status, once."""
        if self._exited:
            return
        self._exited = True
        self.reactor.removeReader(self._watch)
        try:
            message = self._status.recv(32, socket.MSG_DONTWAIT)
        except OSError:
            message = b""
        self._status.close()
        os.close(self._pidfd)
        if self._on_exit is not None:
            self._on_exit()
        # No status message: the launcher was killed (KILL is the only
        # signal it does not handle and write its status for).
        self._exit_status = int(message) if message.isdigit() else None
        self._lost += 1
        self._maybe_ended()

    def connectionLost(self, reason) -> None:
        super().connectionLost(reason)
        os.close(self.fd)
        self._lost += 1
        self._maybe_ended()

    def _maybe_ended(self) -> None:
        if self._lost != 2:
            return
        pid, self.pid = self.pid, None
        status = self._exit_status
        reason: ProcessDone | ProcessTerminated
        if status == 0:
            reason = ProcessDone(0)
        elif status is None:
            reason = ProcessTerminated(None, signal.SIGKILL, None)
        else:
            reason = ProcessTerminated(status, None, None)
        log.debug("forked launcher {pid} ended: {status}", pid=pid, status=status)
        self.proto.processEnded(Failure(reason))

    def logPrefix(self) -> str:
        return "ForkedLauncher"


class _TemplateProtocol(ProcessProtocol):
    def __init__(self, server: ForkServer) -> None:
        self._server = server
        self._seen = b""

    def outReceived(self, data: bytes) -> None:
        self._seen = (self._seen + data)[-64:]
        if b"ready\n" in self._seen:
            self._seen = b""
            self._server.template_ready(self)

    def errReceived(self, data: bytes) -> None:
        for line in data.decode("utf-8", "replace").splitlines():
            log.warn("fork server template: {line}", line=line)

    def processEnded(self, reason: Failure) -> None:
        self._server.template_ended(self, reason)


@define(eq=False)
class ForkServer:
    """The template process: started, watched, restarted; asked for launchers."""

    reactor: IProcessReactor
    python: str  # the console runtime's interpreter
    socket_path: str
    template: str = TEMPLATE
    answer_timeout: float = ANSWER_TIMEOUT
    ready: bool = False
    restarts: int = 0
    pid: int | None = None
    _protocol: _TemplateProtocol | None = None
    _transport: IProcessTransport | None = None
    _stopping: bool = False
    _retry: float = FIRST_RESTART
    _restart_call: IDelayedCall | None = None
    _waiters: list = field(factory=list)
    reaper: OrphanReaper = field(factory=OrphanReaper)
    _sweep: LoopingCall | None = None

    def start(self) -> None:
        self._stopping = False
        if self._sweep is None:
            # Before the first template: its launchers, if it dies, come to us.
            self.reaper.become_subreaper()
            self._sweep = LoopingCall(self.reap_orphans)
            self._sweep.clock = self.reactor
            self._sweep.start(ORPHAN_SWEEP, now=False)
        self._protocol = _TemplateProtocol(self)
        # The console's environment: modules that read it at import (where
        # caches go, the terminal type) see what a console would. The
        # consoles' argv follows the socket: the template prebuilds the
        # IPython application it makes (template_shell.py).
        runtime = os.path.dirname(os.path.dirname(self.python))
        self._transport = self.reactor.spawnProcess(
            self._protocol, self.python,
            [self.python, "-I", self.template, self.socket_path, *console_argv(runtime)],
            env=console_env(runtime, 0), path="/",
        )
        self.pid = self._transport.pid
        log.info("fork server template starting (pid {pid})", pid=self.pid)

    def template_ready(self, protocol: _TemplateProtocol) -> None:
        if protocol is not self._protocol:
            return
        self.ready = True
        self._retry = FIRST_RESTART
        log.info("fork server template ready (pid {pid})", pid=self.pid)

    def template_ended(self, protocol: _TemplateProtocol, reason: Failure) -> None:
        if protocol is not self._protocol:
            return
        self.ready, self.pid, self._protocol = False, None, None
        # Its launchers that had already ended but were not yet reaped by
        # it are ours now.
        self.reap_orphans()
        if self._stopping:
            return
        log.warn("fork server template ended ({reason}); restarting in {delay}s "
                 "(consoles start the classic way meanwhile)",
                 reason=reason.getErrorMessage(), delay=self._retry)
        self.restarts += 1
        self._restart_call = self.reactor.callLater(self._retry, self._restart)
        self._retry = min(MAX_RESTART, self._retry * 2)

    def reap_orphans(self) -> None:
        reaped = self.reaper.reap()
        if reaped:
            log.info("reaped {count} orphaned processes: {pids}", count=len(reaped), pids=reaped)

    def _restart(self) -> None:
        self._restart_call = None
        if not self._stopping:
            self.start()

    def stop(self) -> None:
        self._stopping = True
        self.ready = False
        if self._sweep is not None and self._sweep.running:
            self._sweep.stop()
        self._sweep = None
        if self._restart_call is not None and self._restart_call.active():
            self._restart_call.cancel()
        if self._transport is not None:
            try:
                self._transport.signalProcess("TERM")
            except (ProcessExitedAlready, OSError):
                pass

    def spawn(self, protocol: ProcessProtocol, spec_json: str) -> ForkedLauncher:
        """A launcher forked by the template for ``spec_json``, on a new PTY."""
        if not self.ready:
            raise ForkServerUnavailable("the template is not ready")
        master, slave = pty.openpty()
        os.set_inheritable(master, False)
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        sent = False
        try:
            connection.settimeout(self.answer_timeout)
            connection.connect(self.socket_path)
            connection.sendmsg([spec_json.encode()], [
                (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [slave]))])
            sent = True
            answer, ancillary, _, _ = connection.recvmsg(64, socket.CMSG_SPACE(4))
            fds = array.array("i")
            for level, kind, data in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
            if not answer.startswith(b"pid ") or len(fds) != 1:
                for fd in fds:
                    os.close(fd)
                raise ForkServerUnavailable(
                    f"the template answered {answer.decode('utf-8', 'replace')!r}", sent=True)
        except (OSError, ForkServerUnavailable) as e:
            os.close(master)
            connection.close()
            if isinstance(e, OSError):
                # Not answering in time, or gone: have it replaced.
                self._replace_template()
                raise ForkServerUnavailable(f"the template did not answer: {e}",
                                            sent=sent) from e
            raise
        finally:
            os.close(slave)
        os.set_inheritable(fds[0], False)
        connection.setblocking(False)
        return ForkedLauncher(self.reactor, protocol, master, int(answer[4:]), fds[0],
                              connection, on_exit=self.reap_orphans)

    def _replace_template(self) -> None:
        self.ready = False
        if self._transport is not None:
            try:
                self._transport.signalProcess("KILL")
            except (ProcessExitedAlready, OSError):
                pass


class ForkServerService(Service):
    """The template's life in the service tree: started and stopped with it."""

    name = "fork-server"

    def __init__(self, fork_server: ForkServer) -> None:
        self.fork_server = fork_server

    def startService(self) -> None:
        super().startService()
        self.fork_server.start()

    def stopService(self):
        super().stopService()
        self.fork_server.stop()
