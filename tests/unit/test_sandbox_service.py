"""Tests for shellserver.sandbox.service: spawning, stopping and reaping sandboxes."""

import errno
import json
import os
import struct
import termios
from unittest import mock

from attrs import define, field
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from shellserver.sandbox import service
from shellserver.sandbox.cgroups import CgroupLayout, CgroupReaper
from shellserver.sandbox.service import (
    LAUNCHER,
    IConsoleProcessEvents,
    SandboxStarter,
    SandboxUnavailable,
)
from shellserver.sandbox.spec import SandboxLimits
from shellserver.sandbox.uids import UidPool
from shellserver.testing import FakeOutputPipes

MIB = 1024 * 1024
LIMITS = SandboxLimits(
    memory_bytes=256 * MIB,
    pids_max=64,
    cpu_shares=256,
    cpu_quota=0.5,
    tmp_bytes=64 * MIB,
    home_bytes=32 * MIB,
    max_open_files=256,
    max_file_bytes=32 * MIB,
    max_processes=64,
)
LAYOUT = CgroupLayout(memory=None, pids=None, cpu=None,
                      unified="/cg/shellserver", v2_controllers=True)
SYSTEM_PYTHON = "/usr/bin/python3.11"


@define
class FakeProcessTransport:
    """What spawnProcess returns: records writes and signals."""

    pid: int
    fd: int
    written: list[bytes] = field(factory=list)
    signals: list[str] = field(factory=list)
    exited: bool = False
    reading: bool = True
    producer: object = None

    def write(self, data):
        self.written.append(data)

    def registerProducer(self, producer, streaming):
        assert streaming
        self.producer = producer

    def pauseProducing(self):
        self.reading = False

    def resumeProducing(self):
        self.reading = True

    def signalProcess(self, name):
        if self.exited:
            raise ProcessExitedAlready()
        self.signals.append(name)

    def fileno(self):
        return self.fd


@define
class Spawned:
    protocol: object
    executable: str
    args: list[str]
    env: dict[str, str]
    path: str
    usePTY: bool
    transport: FakeProcessTransport


class FakeProcessReactor(Clock):
    """A Clock whose spawnProcess records the call and connects a fake transport."""

    def __init__(self):
        super().__init__()
        self.spawned = []
        self.spawn_error = None

    def spawnProcess(self, processProtocol, executable, args=(), env=None, path=None,
                     uid=None, gid=None, usePTY=False, childFDs=None):
        if self.spawn_error is not None:
            raise self.spawn_error
        transport = FakeProcessTransport(pid=4000 + len(self.spawned),
                                         fd=90 + len(self.spawned))
        self.spawned.append(Spawned(processProtocol, executable, list(args), env,
                                    path, usePTY, transport))
        processProtocol.makeConnection(transport)
        return transport


class FakeTty:
    """Stands in for the tty module: records setraw calls."""

    def __init__(self):
        self.raw = []

    def setraw(self, fd, when):
        self.raw.append((fd, when))


class FakeFcntl:
    """Stands in for the fcntl module: records ioctl calls."""

    def __init__(self):
        self.calls = []

    def ioctl(self, fd, request, arg):
        self.calls.append((fd, request, arg))
        return arg


@implementer(IConsoleProcessEvents)
@define
class RecordingEvents:
    outputs: list[bytes] = field(factory=list)
    exits: list[tuple] = field(factory=list)
    exit_error: Exception | None = None
    outputs_at_exit: list[list[bytes]] = field(factory=list)
    notices: list[str] = field(factory=list)

    def notice(self, message):
        self.notices.append(message)

    def output(self, data):
        self.outputs.append(data)

    def exited(self, status, signal):
        self.exits.append((status, signal))
        self.outputs_at_exit.append(list(self.outputs))
        if self.exit_error is not None:
            raise self.exit_error


class FakeCgroups:
    """cgroup directories that stay busy for ``busy_attempts`` rmdir calls each."""

    def __init__(self, busy_attempts=0):
        self.busy_attempts = busy_attempts
        self.attempts = {}
        self.killed = []
        self.removed = []
        self.written = []

    def kill(self, path):
        self.killed.append(path)

    def write(self, path, text):
        self.written.append((path, text))

    def rmdir(self, path):
        count = self.attempts.get(path, 0)
        self.attempts[path] = count + 1
        if count < self.busy_attempts:
            raise OSError(errno.EBUSY, "Device or resource busy", path)
        self.removed.append(path)


def ended(transport, reason):
    """End the fake process as the reactor would."""
    transport.exited = True
    return Failure(reason)


class StarterTestCase(SynchronousTestCase):
    def setUp(self):
        self.reactor = FakeProcessReactor()
        self.fcntl = FakeFcntl()
        self.patch(service, "fcntl", self.fcntl)
        self.tty = FakeTty()
        self.patch(service, "tty", self.tty)
        self.uids = UidPool(200000, 200001)
        self.pty_backlog = []
        self.make_starter()

    def read_pty(self, fd, size):
        """What is waiting on the PTY beyond the first read, then EAGAIN."""
        if not self.pty_backlog:
            raise BlockingIOError(11, "Resource temporarily unavailable")
        chunk = self.pty_backlog.pop(0)
        if len(chunk) > size:
            self.pty_backlog.insert(0, chunk[size:])
            chunk = chunk[:size]
        return chunk

    def make_starter(self, busy_attempts=0, timeout=10.0, layout=LAYOUT):
        self.cgroups = FakeCgroups(busy_attempts)
        self.pipes = FakeOutputPipes()
        self.starter = SandboxStarter(
            reactor=self.reactor,
            limits=LIMITS,
            runtime="/srv/runtime",
            root="/srv/root",
            cgroup_layout=layout,
            uids=self.uids,
            outputs=self.pipes,
            system_python=SYSTEM_PYTHON,
            kill_delay=5.0,
            reaper=CgroupReaper(self.reactor, interval=1.0, timeout=timeout,
                                kill=self.cgroups.kill, rmdir=self.cgroups.rmdir,
                                write_file=self.cgroups.write),
            read_pty=self.read_pty,
        )

    def start(self, cols=80, rows=24):
        events = RecordingEvents()
        sandbox = self.starter.start(events, cols, rows)
        return sandbox, events, self.reactor.spawned[-1]

    def pipe(self, sandbox):
        return self.pipes.opened[sandbox.session]

    def end(self, spawned, reason=None):
        reason = reason if reason is not None else ProcessDone(0)
        spawned.protocol.processEnded(ended(spawned.transport, reason))


class SpawnTests(StarterTestCase):
    def test_runs_launcher_with_system_python(self):
        """The launcher runs as `<system python> -I -S <launcher> <spec json>`."""
        sandbox, _, spawned = self.start()
        self.assertEqual(spawned.executable, SYSTEM_PYTHON)
        self.assertEqual(spawned.args[:4], [SYSTEM_PYTHON, "-I", "-S", LAUNCHER])
        self.assertEqual(len(spawned.args), 5)
        self.assertEqual(json.loads(spawned.args[4]),
                         json.loads(sandbox.spec.to_json()))

    def test_pty_and_root_directory(self):
        """The launcher gets a PTY and starts in /."""
        _, _, spawned = self.start()
        self.assertIs(spawned.usePTY, True)
        self.assertEqual(spawned.path, "/")

    def test_explicit_minimal_env(self):
        """The launcher's env is PATH and LANG only, whatever the server's env holds."""
        leak = {"SHELLSERVER_LEAK": "secret-value", "PYTHONPATH": "/leaked"}
        with mock.patch.dict(os.environ, leak):
            _, _, spawned = self.start()
        self.assertEqual(sorted(spawned.env), ["LANG", "PATH"])
        self.assertNotIn("/leaked", spawned.env["PATH"])
        self.assertNotIn("secret-value", "".join(spawned.args))

    def test_spec_uses_pool_uid(self):
        """Each sandbox runs as the next uid from the pool, named in its spec."""
        first, _, spawned = self.start()
        second, _, _ = self.start()
        self.assertEqual((first.uid, second.uid), (200000, 200001))
        document = json.loads(spawned.args[4])
        self.assertEqual((document["uid"], document["gid"]), (200000, 200000))
        self.assertEqual(self.uids.in_use, 2)

    def test_sessions_are_distinct(self):
        """Each sandbox gets its own session name and cgroup directory."""
        first, _, _ = self.start()
        second, _, _ = self.start()
        self.assertNotEqual(first.session, second.session)
        self.assertEqual(first.spec.cgroups[0].path, "/cg/shellserver/" + first.session)
        self.assertEqual(set(self.starter.running), {first.session, second.session})

    def test_initial_size(self):
        """The PTY is sized to the requested columns and rows once spawned."""
        _, _, spawned = self.start(cols=132, rows=43)
        self.assertEqual(
            self.fcntl.calls,
            [(spawned.transport.fd, termios.TIOCSWINSZ,
              struct.pack("HHHH", 43, 132, 0, 0))],
        )

    def test_pty_raw_before_any_keystroke(self):
        """The PTY is made raw (at once, nothing flushed) as soon as it exists."""
        sandbox, _, spawned = self.start()
        self.assertEqual(self.tty.raw, [(spawned.transport.fd, termios.TCSANOW)])

    def test_output_passed_on(self):
        """Bytes from the output pipe reach the console's events unchanged."""
        sandbox, events, _ = self.start()
        self.pipe(sandbox).send(b"In [1]: ")
        self.pipe(sandbox).send(b"\x1b[0m")
        self.assertEqual(events.outputs, [b"In [1]: ", b"\x1b[0m"])

    def test_launcher_messages_passed_on(self):
        """Bytes on the PTY (the launcher's own messages) reach the events too."""
        _, events, spawned = self.start()
        spawned.protocol.childDataReceived(1, b"the sandbox could not be built")
        self.assertEqual(events.outputs, [b"the sandbox could not be built"])

    def test_output_pipe_in_spec(self):
        """The spec names the session's output pipe, for the launcher to open."""
        sandbox, _, spawned = self.start()
        document = json.loads(spawned.args[4])
        self.assertEqual(document["output"], "/state/pipes/" + sandbox.session)
        self.assertEqual(self.pipe(sandbox).path, document["output"])

    def test_output_pipe_failure(self):
        """If the pipe cannot be made, nothing is spawned and the uid goes back."""
        self.pipes.error = OSError(errno.ENOSPC, "No space left on device")
        with self.assertRaises(SandboxUnavailable) as caught:
            self.start()
        self.assertEqual(str(caught.exception), "the console could not be started")
        self.assertEqual((self.reactor.spawned, self.uids.in_use), ([], 0))

    def test_write(self):
        """Keystrokes go to the console's terminal (not the launcher's PTY)
        until the process ends, then are dropped."""
        sandbox, _, spawned = self.start()
        sandbox.write(b"1+1\r")
        self.end(spawned)
        sandbox.write(b"more\r")
        self.assertEqual(self.pipes.opened[sandbox.session].written, [b"1+1\r"])
        self.assertEqual(spawned.transport.written, [])

    def test_resize_reaches_the_console_terminal(self):
        """A resize sets the console's terminal's size, as well as the launcher's."""
        sandbox, _, spawned = self.start()
        sandbox.resize(100, 30)
        self.assertEqual(self.pipes.opened[sandbox.session].sizes, [(80, 24), (100, 30)])

    def test_unavailable(self):
        """While unavailable, start raises SandboxUnavailable with the reason."""
        self.starter.set_unavailable("the runtime is being built")
        with self.assertRaises(SandboxUnavailable) as caught:
            self.start()
        self.assertEqual(str(caught.exception), "the runtime is being built")
        self.assertEqual((self.reactor.spawned, self.uids.in_use), ([], 0))
        self.starter.set_available()
        self.start()
        self.assertEqual(len(self.reactor.spawned), 1)

    def test_uids_exhausted(self):
        """With every uid in use, start raises SandboxUnavailable and spawns nothing."""
        self.start()
        self.start()
        with self.assertRaises(SandboxUnavailable) as caught:
            self.start()
        self.assertIn("all consoles are in use", str(caught.exception))
        self.assertEqual(len(self.reactor.spawned), 2)

    def test_spawn_failure_releases_uid(self):
        """If spawnProcess raises, the uid goes back and start raises Unavailable."""
        self.reactor.spawn_error = OSError(errno.EAGAIN, "Resource unavailable")
        self.assertRaises(SandboxUnavailable, self.start)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertEqual((self.uids.in_use, self.uids.available), (0, 2))
        self.assertEqual(self.starter.running, {})
        (pipe,) = self.pipes.opened.values()
        self.assertTrue(pipe.finished)


class ExitTests(StarterTestCase):
    def test_process_done(self):
        """A clean exit is reported as status 0 and no signal."""
        _, events, spawned = self.start()
        self.end(spawned, ProcessDone(0))
        self.assertEqual(events.exits, [(0, None)])

    def test_exit_status(self):
        """A non-zero exit is reported with its status."""
        _, events, spawned = self.start()
        self.end(spawned, ProcessTerminated(exitCode=service.SETUP_FAILED))
        self.assertEqual(events.exits, [(111, None)])

    def test_killed_by_signal(self):
        """Death by a signal is reported with the signal and no status."""
        _, events, spawned = self.start()
        self.end(spawned, ProcessTerminated(signal=9))
        self.assertEqual(events.exits, [(None, 9)])

    def test_no_longer_running(self):
        """An ended sandbox leaves the starter's running table."""
        sandbox, _, spawned = self.start()
        self.end(spawned)
        self.assertNotIn(sandbox.session, self.starter.running)
        self.assertTrue(sandbox.ended)

    def test_events_failure_logged(self):
        """An exception from the console's exited() is logged, not raised."""
        _, events, spawned = self.start()
        events.exit_error = RuntimeError("console broke")
        self.end(spawned)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(self.uids.in_use, 0)


class CleanupTests(StarterTestCase):
    def test_uid_returns_after_reaper(self):
        """The uid goes back to the pool only once the cgroups are removed."""
        self.make_starter(busy_attempts=2)
        sandbox, _, spawned = self.start()
        self.end(spawned)
        self.assertEqual(self.cgroups.killed, [sandbox.spec.cgroups[0].path])
        self.assertEqual(self.uids.in_use, 1)
        self.assertNoResult(sandbox.cleaned)
        self.reactor.advance(1.0)
        self.assertEqual(self.uids.in_use, 1)
        self.reactor.advance(1.0)
        self.assertEqual((self.uids.in_use, self.uids.available), (0, 2))
        self.assertIsNone(self.successResultOf(sandbox.cleaned))
        self.assertEqual(self.cgroups.removed, [sandbox.spec.cgroups[0].path])
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_uid_quarantined_when_cgroups_stay(self):
        """When the cgroups outlive the reaper's timeout, the uid never returns."""
        self.make_starter(busy_attempts=10**6, timeout=3.0)
        sandbox, _, spawned = self.start()
        self.end(spawned)
        self.reactor.pump([1.0] * 3)
        self.assertIsNone(self.successResultOf(sandbox.cleaned))
        self.assertEqual((self.uids.in_use, self.uids.available), (0, 1))
        other, _, _ = self.start()
        self.assertNotEqual(other.uid, sandbox.uid)

    def test_no_cgroups(self):
        """Without a cgroup layout the uid returns as soon as the process ends."""
        self.make_starter(layout=None)
        sandbox, _, spawned = self.start()
        self.assertEqual(sandbox.spec.cgroups, ())
        self.end(spawned)
        self.assertEqual(self.uids.in_use, 0)
        self.assertIsNone(self.successResultOf(sandbox.cleaned))


class TerminateTests(StarterTestCase):
    def test_term_then_kill(self):
        """terminate() lowers the session's CPU weight and sends TERM, and KILL
        after kill_delay if still running."""
        sandbox, _, spawned = self.start()
        sandbox.terminate()
        self.assertEqual(spawned.transport.signals, ["TERM"])
        self.assertEqual(self.cgroups.written,
                         [(sandbox.spec.cgroups[0].path + "/cpu.weight", "1")])
        self.reactor.advance(4.9)
        self.assertEqual(spawned.transport.signals, ["TERM"])
        self.reactor.advance(0.1)
        self.assertEqual(spawned.transport.signals, ["TERM", "KILL"])

    def test_no_kill_after_exit(self):
        """A process that ends after TERM gets no KILL, and no timer is left."""
        self.make_starter(layout=None)
        sandbox, _, spawned = self.start()
        sandbox.terminate()
        self.end(spawned, ProcessTerminated(signal=15))
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.reactor.advance(10)
        self.assertEqual(spawned.transport.signals, ["TERM"])

    def test_idempotent(self):
        """A second terminate() while waiting for the exit sends nothing more."""
        sandbox, _, spawned = self.start()
        sandbox.terminate()
        sandbox.terminate()
        self.reactor.advance(5.0)
        self.assertEqual(spawned.transport.signals, ["TERM", "KILL"])

    def test_after_end(self):
        """terminate() on an ended sandbox sends nothing and schedules nothing."""
        self.make_starter(layout=None)
        sandbox, _, spawned = self.start()
        self.end(spawned)
        sandbox.terminate()
        self.assertEqual(spawned.transport.signals, [])
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_exited_already_ignored(self):
        """ProcessExitedAlready from signalProcess is ignored, for TERM and KILL."""
        sandbox, _, spawned = self.start()
        spawned.transport.exited = True
        sandbox.terminate()
        self.reactor.advance(5.0)
        self.assertEqual(spawned.transport.signals, [])
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_stop_all(self):
        """stop_all terminates every sandbox and fires once all are cleaned up."""
        first, _, first_spawned = self.start()
        second, _, second_spawned = self.start()
        d = self.starter.stop_all()
        self.assertEqual(first_spawned.transport.signals, ["TERM"])
        self.assertEqual(second_spawned.transport.signals, ["TERM"])
        self.end(first_spawned, ProcessTerminated(signal=15))
        self.assertNoResult(d)
        self.end(second_spawned, ProcessTerminated(signal=15))
        self.assertEqual(self.successResultOf(d), [None, None])
        self.assertEqual((self.starter.running, self.uids.in_use), ({}, 0))

    def test_stop_all_nothing_running(self):
        """stop_all with no sandboxes fires at once."""
        self.assertEqual(self.successResultOf(self.starter.stop_all()), [])


class OutputProducerTests(StarterTestCase):
    def setUp(self):
        super().setUp()
        self.sandbox, self.events, self.spawned = self.start()
        self.transport = self.spawned.transport

    def test_pause_and_resume_reading(self):
        """Pausing the sandbox stops reading its output pipe; resuming reads again.

        The PTY, which carries only keystrokes in and the launcher's messages,
        is read throughout.
        """
        pipe = self.pipe(self.sandbox)
        self.sandbox.pauseProducing()
        pipe.send(b"held back")
        self.assertEqual((pipe.reading, self.events.outputs), (False, []))
        self.assertTrue(self.transport.reading)
        self.sandbox.resumeProducing()
        self.assertEqual(self.events.outputs, [b"held back"])

    def test_last_output_before_exit(self):
        """At the end, what the pipe holds is delivered (paused or not), then the exit."""
        pipe = self.pipe(self.sandbox)
        self.sandbox.pauseProducing()
        pipe.send(b"Bye")
        self.end(self.spawned)
        self.assertEqual(self.events.outputs_at_exit, [[b"Bye"]])
        self.assertTrue(pipe.finished)

    def test_paused_after_end_is_harmless(self):
        """Pausing or resuming an ended sandbox touches nothing."""
        self.end(self.spawned)
        self.sandbox.pauseProducing()
        self.sandbox.resumeProducing()
        self.assertTrue(self.pipe(self.sandbox).finished)


class DrainTests(StarterTestCase):
    def test_waiting_output_is_one_batch(self):
        """Output already waiting on the PTY is read in the same wake-up, as one batch."""
        sandbox, events, spawned = self.start()
        self.pty_backlog = [b"b" * 4095, b"c" * 10]
        spawned.protocol.childDataReceived(1, b"a")
        self.assertEqual(events.outputs, [b"a" + b"b" * 4095 + b"c" * 10])

    def test_batch_is_bounded(self):
        """A wake-up reads at most READ_BATCH bytes; the rest waits for the next."""
        sandbox, events, spawned = self.start()
        self.pty_backlog = [b"x" * 4095] * 40
        spawned.protocol.childDataReceived(1, b"a")
        self.assertEqual(len(events.outputs[0]), service.READ_BATCH)
        self.assertTrue(self.pty_backlog)

    def test_pty_end_stops_the_drain(self):
        """EIO (the console is gone) ends the drain; what was read is delivered."""
        sandbox, events, spawned = self.start()

        def eio(fd, size):
            raise OSError(5, "Input/output error")

        self.starter.read_pty = eio
        spawned.protocol.childDataReceived(1, b"last")
        self.assertEqual(events.outputs, [b"last"])


class TeardownSpacingTests(StarterTestCase):
    def test_spaced_terms(self):
        """Sandboxes ended together get TERM teardown_spacing apart, the first at once;
        all get the lowest CPU weight at once."""
        started = [self.start() for _ in range(2)]
        for sandbox, _, _ in started:
            sandbox.terminate()
        signals = [spawned.transport.signals for _, _, spawned in started]
        self.assertEqual(signals, [["TERM"], []])
        self.assertEqual(len(self.cgroups.written), 2)
        self.reactor.advance(self.starter.teardown_spacing)
        self.assertEqual(signals, [["TERM"], ["TERM"]])

    def test_later_teardown_not_delayed(self):
        """A teardown long after the last one is not held back."""
        first, _, _ = self.start()
        first.terminate()
        self.reactor.advance(1.0)
        second, _, spawned = self.start()
        second.terminate()
        self.assertEqual(spawned.transport.signals, ["TERM"])

    def test_ended_before_its_turn(self):
        """A sandbox that ends while waiting for its turn gets no signal and no timer."""
        self.make_starter(layout=None)
        first, _, _ = self.start()
        second, _, spawned = self.start()
        first.terminate()
        second.terminate()
        self.end(spawned, ProcessDone(0))
        self.reactor.advance(1.0)
        self.assertEqual(spawned.transport.signals, [])

    def test_stop_all_does_not_wait_its_turn(self):
        """stop_all (the server is stopping) sends TERM to all at once, including
        sandboxes already waiting for their turn."""
        first, _, first_spawned = self.start()
        second, _, second_spawned = self.start()
        first.terminate()
        second.terminate()
        self.assertEqual(second_spawned.transport.signals, [])
        self.starter.stop_all()
        self.assertEqual(second_spawned.transport.signals, ["TERM"])
        self.reactor.advance(self.starter.teardown_spacing)
        self.assertEqual(second_spawned.transport.signals, ["TERM"])
        self.assertEqual(first_spawned.transport.signals, ["TERM"])


class InputBacklogTests(StarterTestCase):
    def test_input_dropped_past_the_backlog(self):
        """While the PTY's write buffer is full, up to INPUT_BACKLOG_MAX more bytes
        are written; past that, keystrokes are dropped and the user told once;
        once the buffer drains, keystrokes flow again."""
        sandbox, events, spawned = self.start()
        terminal = self.pipes.opened[sandbox.session]
        producer = terminal.producer
        chunk = b"x" * 65536
        producer.pauseProducing()  # Twisted: more than bufferSize waits
        for _ in range(service.INPUT_BACKLOG_MAX // len(chunk)):
            sandbox.write(chunk)
        self.assertEqual(len(terminal.written), 16)
        sandbox.write(b"a")
        sandbox.write(b"\x03")
        self.assertEqual(len(terminal.written), 16)
        self.assertEqual(len(events.notices), 1)
        self.assertIn("not reading what you type", events.notices[0])
        producer.resumeProducing()  # drained
        sandbox.write(b"b")
        self.assertEqual(terminal.written[-1], b"b")
        producer.pauseProducing()
        sandbox.write(chunk * 17)
        self.assertEqual(terminal.written[-1], b"b")
        self.assertEqual(len(events.notices), 2)
