"""The one seam that spawns sandboxes.

``SandboxStarter.start`` allocates a uid, opens the session's terminal
handoff (output.py), builds the spec, and spawns the root launcher in a fresh
PTY with ``reactor.spawnProcess(..., usePTY=True)``. Init hands the console's
own PTY master to the server through the handoff: the console's output is
read from it, keystrokes and the size are written to it (the launcher's PTY
only carries the launcher's own messages, such as why a sandbox could not be
built, and the size the console starts with). The ``SandboxProcessProtocol`` only turns
bytes and the exit into calls on the console's ``IConsoleProcessEvents``.
When the launcher ends, however it ends, the server kills and removes the
session's cgroups (the launcher may have been SIGKILLed before its own
cleanup) and only then gives the uid back.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import struct
import termios
import tty
from collections.abc import Callable
from typing import cast

from attrs import Factory, define, field
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.interfaces import IDelayedCall, IPushProducer
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer

from shellserver.interfaces import IProcessReactor, IPTYProcessTransport
from shellserver.sandbox.cgroups import CgroupLayout, CgroupReaper
from shellserver.sandbox.forked import ForkServer, ForkServerUnavailable
from shellserver.sandbox.output import IOutputPipe, IOutputPipes
from shellserver.sandbox.spec import SandboxLimits, SandboxSpec, build_spec
from shellserver.sandbox.uids import UidPool, UidsExhausted

log = Logger()

LAUNCHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "launcher.py")
# The launcher's exit status when the sandbox could not be built.
SETUP_FAILED = 111
READ_BATCH = 32768  # bytes of PTY output read per wake-up at most
# Keystrokes the server holds for a console that does not read them (written
# as the console's terminal takes them); past this, more is dropped, as a
# full terminal input queue drops it, and the user is told.
INPUT_BACKLOG_MAX = 1 << 20


class SandboxUnavailable(Exception):
    """No sandbox can be started now; str() is the reason for the user."""


class IConsoleProcessEvents(Interface):
    """What a running sandbox reports to its console."""

    def output(data: bytes) -> None:
        """Bytes the console wrote to its terminal."""

    def exited(status: int | None, signal: int | None) -> None:
        """The sandbox ended; ``status`` 111 means it could not be built."""

    def notice(message: str) -> None:
        """Something the user should know (a limit was reached); it goes on."""

    def ending(message: str) -> None:
        """The server is ending this console for ``message``'s reason."""


class ISandbox(IPushProducer):
    """A running sandbox, as its console sees it.

    As a push producer of terminal output, it can be paused (the server stops
    reading the console's terminal) while the client is behind.
    """

    session = Attribute("The session name (also the cgroup directory name).")
    uid = Attribute("The uid the console runs as.")

    def write(data: bytes) -> None:
        """Send keystrokes to the terminal."""

    def resize(cols: int, rows: int) -> None:
        """Set the terminal size (the console gets SIGWINCH)."""

    def terminate() -> None:
        """End the sandbox: TERM now, KILL later if need be. Idempotent."""


class ISandboxStarter(Interface):
    def start(events: IConsoleProcessEvents, cols: int, rows: int) -> ISandbox:
        """Start a sandbox or raise SandboxUnavailable."""


@define
class SandboxProcessProtocol(ProcessProtocol):
    """The launcher's PTY bytes and the exit, passed on; no policy here.

    The console's output does not come this way (see output.py); what does
    is little (the launcher's messages), but draining what is already there
    (up to READ_BATCH) keeps it one message.
    """

    _sandbox: RunningSandbox

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        read = self._sandbox._starter.read_pty
        fd = cast(IPTYProcessTransport, self.transport).fileno()  # spawned with usePTY
        chunks, total = [data], len(data)
        while total < READ_BATCH:
            try:
                more = read(fd, READ_BATCH - total)
            except OSError:
                break  # EAGAIN: drained; EIO: the end, which Twisted sees next
            if not more:
                break
            chunks.append(more)
            total += len(more)
        self._sandbox.events.output(data if len(chunks) == 1 else b"".join(chunks))

    def processEnded(self, reason: Failure) -> None:
        self._sandbox.process_ended(reason)


@implementer(IPushProducer)
@define
class InputBacklog:
    """Registered on the console's terminal, which pauses it while more than
    its buffer size of keystrokes waits to be written to it."""

    full: bool = False

    def pauseProducing(self) -> None:
        self.full = True

    def resumeProducing(self) -> None:
        self.full = False

    def stopProducing(self) -> None:
        pass


@implementer(ISandbox)
@define
class RunningSandbox:
    """One launched sandbox: its spec, its process, and its cleanup."""

    spec: SandboxSpec
    events: IConsoleProcessEvents
    _starter: SandboxStarter
    _transport: IPTYProcessTransport | None = None
    _output: IOutputPipe | None = None
    _kill_call: IDelayedCall | None = None
    _terminating: bool = False
    _input: InputBacklog = field(factory=InputBacklog)
    _input_held: int = 0  # bytes written since the PTY's buffer filled
    _input_dropping: bool = False  # the user has been told
    ended: bool = False
    cleaned: Deferred[None] = field(factory=Deferred)

    @property
    def session(self) -> str:
        return self.spec.session

    @property
    def uid(self) -> int:
        return self.spec.uid

    @property
    def pid(self) -> int | None:
        return getattr(self._transport, "pid", None)

    @property
    def _pty(self) -> IPTYProcessTransport:
        assert self._transport is not None, "used only once the launcher is spawned"
        return self._transport

    @property
    def _pipe(self) -> IOutputPipe:
        assert self._output is not None, "given when the sandbox is made"
        return self._output

    def write(self, data: bytes) -> None:
        if self.ended:
            return
        if not self._input.full:
            self._input_held, self._input_dropping = 0, False
        elif self._input_held + len(data) > INPUT_BACKLOG_MAX:
            if not self._input_dropping:
                self._input_dropping = True
                self.events.notice(
                    "The console is not reading what you type: typed text is being "
                    "dropped until it does.")
            return
        else:
            self._input_held += len(data)
        self._pipe.write(data)

    def make_raw(self) -> None:
        """Put the launcher's PTY in raw mode: what the launcher writes on it
        (why a sandbox could not be built) is passed on as written.
        (Termios requests on a master act on its slave.)
        """
        try:
            tty.setraw(self._pty.fileno(), termios.TCSANOW)
        except (OSError, termios.error) as e:
            log.warn("raw mode for console {session} failed: {error}",
                     session=self.session, error=e)

    def resize(self, cols: int, rows: int) -> None:
        if self.ended:
            return
        # The console's terminal (once init has handed it over), and the
        # launcher's, whose size init gives the console's before it starts.
        self._pipe.resize(cols, rows)
        size = struct.pack("HHHH", rows, cols, 0, 0)
        try:
            fcntl.ioctl(self._pty.fileno(), termios.TIOCSWINSZ, size)
        except OSError as e:
            log.warn("resize of console {session} failed: {error}",
                     session=self.session, error=e)

    def pauseProducing(self) -> None:
        if not self.ended:
            self._pipe.pause()

    def resumeProducing(self) -> None:
        if not self.ended:
            self._pipe.resume()

    def stopProducing(self) -> None:
        self.terminate()

    def terminate(self, at_once: bool = False) -> None:
        """End the sandbox: its CPU weight drops now; TERM follows, spaced
        from other teardowns (see SandboxStarter.teardown_spacing) unless
        ``at_once``; KILL after ``kill_delay`` more."""
        if self.ended:
            return
        if not self._terminating:
            self._terminating = True
            self._starter.reaper.deprioritize(self.spec.cgroups)
            if not at_once:
                self._starter.space_teardown(self._send_term)
                return
        if at_once:
            self._send_term()

    def _send_term(self) -> None:
        if self.ended or self._kill_call is not None:
            return  # gone already, or TERM was sent (at once, before its turn)
        self._signal("TERM")
        self._kill_call = self._starter.clock.callLater(
            self._starter.kill_delay, self._kill
        )

    def _kill(self) -> None:
        self._kill_call = None
        self._signal("KILL")

    def _signal(self, name: str) -> None:
        try:
            self._pty.signalProcess(name)
        except (ProcessExitedAlready, OSError):
            pass

    def process_ended(self, reason: Failure) -> None:
        self.ended = True
        if self._kill_call is not None and self._kill_call.active():
            self._kill_call.cancel()
        self._kill_call = None
        value = reason.value
        if isinstance(value, ProcessDone):
            status, signal = 0, None
        else:
            terminated = cast(ProcessTerminated, value)  # processEnded's other reason
            status, signal = terminated.exitCode, terminated.signal
        log.info("console {session} (uid {uid}) ended: status {status}, signal {signal}",
                 session=self.session, uid=self.uid, status=status, signal=signal)
        # The launcher ended after init, whose exit closed the console's
        # terminal: all of the console's output is in the master now.
        try:
            self._pipe.finish()
        except Exception:
            log.failure("console {session}: the terminal's end failed",
                        session=self.session)
        # The console hears first; the cleanup may complete synchronously and
        # let a shutting-down reactor go on to close every connection.
        try:
            self.events.exited(status, signal)
        except Exception:
            log.failure("console {session} exit handling failed", session=self.session)
        self._starter.sandbox_ended(self)


@implementer(ISandboxStarter)
@define
class SandboxStarter:
    """Starts sandboxes and cleans up after them."""

    reactor: IProcessReactor
    limits: SandboxLimits
    runtime: str
    root: str
    cgroup_layout: CgroupLayout | None
    uids: UidPool
    outputs: IOutputPipes
    system_python: str = "/usr/bin/python3"
    launcher: str = LAUNCHER
    kill_delay: float = 5.0
    # Sandboxes ending together (tabs closed at once, the kill switch) are
    # torn down this far apart: each teardown is a burst of kernel work (a
    # console's memory unmapped, its mounts and namespaces) that live
    # consoles would otherwise feel all at once.
    teardown_spacing: float = 0.025
    _next_teardown: float = 0.0
    reaper: CgroupReaper = field(
        default=Factory(lambda self: CgroupReaper(self.reactor), takes_self=True))
    read_pty: Callable[[int, int], bytes] = os.read
    # sandbox.fork_server: launchers forked by the template (forked.py);
    # None, or a template not ready, spawns the classic launcher.
    fork_server: ForkServer | None = None
    running: dict[str, RunningSandbox] = field(factory=dict)
    _ready: bool = True
    _unavailable_reason: str = ""

    @property
    def clock(self) -> IProcessReactor:
        return self.reactor

    def set_unavailable(self, reason: str) -> None:
        self._ready, self._unavailable_reason = False, reason

    def set_available(self) -> None:
        self._ready, self._unavailable_reason = True, ""

    def start(self, events: IConsoleProcessEvents, cols: int, rows: int) -> RunningSandbox:
        if not self._ready:
            raise SandboxUnavailable(self._unavailable_reason)
        try:
            uid = self.uids.allocate()
        except UidsExhausted as e:
            raise SandboxUnavailable("all consoles are in use; try again soon") from e
        session = "s" + secrets.token_hex(8)
        sandbox: RunningSandbox | None = None

        def deliver(data: bytes) -> None:  # only once the launcher runs
            assert sandbox is not None
            sandbox.events.output(data)

        try:
            path, output = self.outputs.open(session, deliver)
        except OSError as e:
            self.uids.release(uid)
            log.error("could not make the terminal handoff for {session}: {error}",
                      session=session, error=e)
            raise SandboxUnavailable("the console could not be started") from e
        spec = build_spec(
            session=session,
            uid=uid,
            limits=self.limits,
            runtime=self.runtime,
            root=self.root,
            cgroup_layout=self.cgroup_layout,
            output=path,
        )
        sandbox = RunningSandbox(spec=spec, events=events, starter=self, output=output)
        argv = [self.system_python, "-I", "-S", self.launcher, spec.to_json()]
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
        try:
            transport = cast(IPTYProcessTransport, self._launch(
                SandboxProcessProtocol(sandbox), spec, argv, env))
        except Exception as e:
            if isinstance(e, ForkServerUnavailable) and e.sent:
                # The template may have forked a launcher for this spec after
                # all: its uid is never reused, its cgroups are killed.
                self.uids.quarantine(uid)
                self.reaper.reap(spec.cgroups)
            else:
                self.uids.release(uid)
            output.finish()
            log.failure("could not spawn the launcher for {session}", session=session)
            raise SandboxUnavailable("the console could not be started") from e
        sandbox._transport = transport
        self.running[session] = sandbox
        output.registerProducer(sandbox._input, True)
        sandbox.make_raw()
        sandbox.resize(cols, rows)
        log.info("console {session} started as uid {uid}", session=session, uid=uid)
        return sandbox

    def _launch(self, protocol: SandboxProcessProtocol, spec: SandboxSpec,
                argv: list[str], env: dict[str, str]) -> object:
        """The launcher's transport: forked by the template, or else spawned."""
        if self.fork_server is not None and self.fork_server.ready:
            try:
                return self.fork_server.spawn(protocol, spec.to_json())
            except ForkServerUnavailable as e:
                if e.sent:
                    raise
                log.warn("console {session}: fork server unavailable ({error}); "
                         "starting it the classic way", session=spec.session, error=str(e))
        return self.reactor.spawnProcess(protocol, self.system_python, argv,
                                         env=env, path="/", usePTY=True)

    def space_teardown(self, action: Callable[[], None]) -> None:
        """Run ``action`` now, or ``teardown_spacing`` after the last one."""
        now = self.clock.seconds()
        at = max(now, self._next_teardown)
        self._next_teardown = at + self.teardown_spacing
        if at <= now:
            action()
        else:
            self.clock.callLater(at - now, action)

    def sandbox_ended(self, sandbox: RunningSandbox) -> None:
        self.running.pop(sandbox.session, None)
        d = self.reaper.reap(sandbox.spec.cgroups)

        def release(removed: bool) -> None:
            if removed:
                self.uids.release(sandbox.uid)
            else:
                log.error("uid {uid} quarantined: cgroups of {session} remain",
                          uid=sandbox.uid, session=sandbox.session)
                self.uids.quarantine(sandbox.uid)
            log.info("console {session} cleaned up", session=sandbox.session)
            sandbox.cleaned.callback(None)

        d.addCallback(release)

    def stop_all(self) -> Deferred[list]:
        """Terminate every sandbox; fires when all are cleaned up."""
        from twisted.internet.defer import gatherResults

        waits = [s.cleaned for s in self.running.values()]
        for sandbox in list(self.running.values()):
            sandbox.terminate(at_once=True)  # the server is stopping: no spacing
        return gatherResults(waits)
