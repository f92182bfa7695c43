"""The fork server's supervision and the starter's choice of path (no real I/O)."""

from __future__ import annotations

import json

from attrs import define, field
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from shellserver.sandbox.cgroups import CgroupReaper
from shellserver.sandbox.forked import (
    FIRST_RESTART,
    MAX_RESTART,
    ORPHAN_SWEEP,
    TEMPLATE,
    ForkServer,
    ForkServerUnavailable,
)
from shellserver.sandbox.service import LAUNCHER, SandboxStarter, SandboxUnavailable
from shellserver.sandbox.spec import console_argv, console_env
from shellserver.sandbox.uids import UidPool
from shellserver.testing import FakeOutputPipes
from tests.unit.test_sandbox_service import (
    LAYOUT,
    LIMITS,
    SYSTEM_PYTHON,
    FakeProcessReactor,
)

PYTHON = "/runtime/bin/python"
SOCKET = "/state/forkserver.sock"


@define
class FakeOrphanReaper:
    """Stands in for OrphanReaper: counts the calls, reaps what it is given."""

    subreaper_calls: int = 0
    sweeps: int = 0
    exited: list = field(factory=list)

    def become_subreaper(self) -> None:
        self.subreaper_calls += 1

    def reap(self) -> list[int]:
        self.sweeps += 1
        reaped, self.exited = self.exited, []
        return reaped


def fork_server(reactor, reaper=None) -> ForkServer:
    server = ForkServer(reactor, PYTHON, SOCKET, reaper=reaper or FakeOrphanReaper())
    server.start()
    return server


class ForkServerTests(SynchronousTestCase):
    def test_starts_template_with_runtime_python(self):
        """The template is the runtime's Python, isolated, on the socket, in a console's
        env, given the consoles' argv to prebuild."""
        reactor = FakeProcessReactor()
        fork_server(reactor)
        spawned = reactor.spawned[0]
        self.assertEqual(spawned.args,
                         [PYTHON, "-I", TEMPLATE, SOCKET, *console_argv("/runtime")])
        self.assertEqual(spawned.env, console_env("/runtime", 0))
        self.assertFalse(spawned.usePTY)

    def test_server_becomes_subreaper_once(self):
        """Starting (and restarting) the template makes the server its launchers'
        subreaper once, before the first template is spawned."""
        reactor = FakeProcessReactor()
        reaper = FakeOrphanReaper()
        server = fork_server(reactor, reaper)
        self.assertEqual(reaper.subreaper_calls, 1)
        reactor.spawned[0].protocol.processEnded(Failure(ProcessTerminated(None, 9, None)))
        reactor.advance(MAX_RESTART)
        self.assertEqual(len(reactor.spawned), 2)
        self.assertEqual(reaper.subreaper_calls, 1)
        server.stop()

    def test_template_death_reaps_its_orphans(self):
        """When the template dies, the launchers it left exited but unreaped are reaped
        at once, not at the next sweep."""
        reactor = FakeProcessReactor()
        reaper = FakeOrphanReaper()
        server = fork_server(reactor, reaper)
        reaper.exited = [5001, 5002]
        reactor.spawned[0].protocol.processEnded(Failure(ProcessTerminated(None, 9, None)))
        self.assertEqual(reaper.exited, [])
        server.stop()

    def test_orphans_swept_periodically_until_stopped(self):
        """Orphans (a classic init whose launcher was killed) are swept every
        ORPHAN_SWEEP seconds while the fork server runs, and no more once stopped."""
        reactor = FakeProcessReactor()
        reaper = FakeOrphanReaper()
        server = fork_server(reactor, reaper)
        reactor.advance(ORPHAN_SWEEP)
        reactor.advance(ORPHAN_SWEEP)
        self.assertEqual(reaper.sweeps, 2)
        server.stop()
        reactor.advance(ORPHAN_SWEEP * 3)
        self.assertEqual(reaper.sweeps, 2)
        self.assertEqual(reactor.getDelayedCalls(), [])

    def test_ready_only_after_template_says_so(self):
        """Not ready until the template prints its ready line (even split in two reads)."""
        reactor = FakeProcessReactor()
        server = fork_server(reactor)
        protocol = reactor.spawned[0].protocol
        protocol.outReceived(b"rea")
        self.assertFalse(server.ready)
        protocol.outReceived(b"dy\n")
        self.assertTrue(server.ready)

    def test_template_death_restarts_with_backoff(self):
        """A template that ends is restarted after 0.5 s, then 1 s if it ends again."""
        reactor = FakeProcessReactor()
        server = fork_server(reactor)
        reactor.spawned[0].protocol.outReceived(b"ready\n")
        reactor.spawned[0].protocol.processEnded(Failure(ProcessTerminated(None, 9, None)))
        self.assertFalse(server.ready)
        reactor.advance(FIRST_RESTART - 0.01)
        self.assertEqual(len(reactor.spawned), 1)
        reactor.advance(0.01)
        self.assertEqual(len(reactor.spawned), 2)
        reactor.spawned[1].protocol.processEnded(Failure(ProcessTerminated(1, None, None)))
        reactor.advance(FIRST_RESTART * 2 - 0.01)
        self.assertEqual(len(reactor.spawned), 2)
        reactor.advance(0.01)
        self.assertEqual(len(reactor.spawned), 3)
        self.assertEqual(server.restarts, 2)

    def test_ready_resets_backoff(self):
        """Once a restarted template is ready, the next death waits the first delay again."""
        reactor = FakeProcessReactor()
        server = fork_server(reactor)
        for index in range(3):
            reactor.spawned[index].protocol.processEnded(Failure(ProcessDone(0)))
            reactor.advance(30)
        reactor.spawned[3].protocol.outReceived(b"ready\n")
        reactor.spawned[3].protocol.processEnded(Failure(ProcessDone(0)))
        reactor.advance(FIRST_RESTART)
        self.assertEqual(len(reactor.spawned), 5)
        self.assertFalse(server.ready)

    def test_stop_terminates_without_restart(self):
        """Stopping sends TERM and the template's end starts nothing new."""
        reactor = FakeProcessReactor()
        server = fork_server(reactor)
        reactor.spawned[0].protocol.outReceived(b"ready\n")
        server.stop()
        self.assertEqual(reactor.spawned[0].transport.signals, ["TERM"])
        reactor.spawned[0].protocol.processEnded(Failure(ProcessDone(0)))
        reactor.advance(60)
        self.assertEqual(len(reactor.spawned), 1)
        self.assertFalse(server.ready)

    def test_spawn_refused_when_not_ready(self):
        """Asking a template that is not ready raises ForkServerUnavailable."""
        server = fork_server(FakeProcessReactor())
        self.assertRaises(ForkServerUnavailable, server.spawn, None, "{}")


@define
class RefusingForkServer:
    """A ready fork server whose every request fails."""

    ready: bool = True
    sent: bool = False
    asked: list = field(factory=list)

    def spawn(self, protocol, spec_json):
        self.asked.append(spec_json)
        raise ForkServerUnavailable("the template did not answer", sent=self.sent)


def starter(reactor, fork_server_, killed=None) -> SandboxStarter:
    killed = [] if killed is None else killed
    return SandboxStarter(
        reactor=reactor, limits=LIMITS,
        runtime="/runtime", root="/root", cgroup_layout=LAYOUT,
        uids=UidPool(300000, 300009), outputs=FakeOutputPipes(),
        system_python=SYSTEM_PYTHON, fork_server=fork_server_,
        reaper=CgroupReaper(reactor, kill=killed.append, rmdir=lambda path: None),
    )


class StarterPathTests(SynchronousTestCase):
    def test_template_not_ready_starts_classic_launcher(self):
        """With the template not ready, a console starts the classic launcher."""
        reactor = FakeProcessReactor()
        server = fork_server(reactor)
        sandbox = starter(reactor, server).start(_Events(), 80, 24)
        launched = reactor.spawned[-1]
        self.assertEqual(launched.args[:4], [SYSTEM_PYTHON, "-I", "-S", LAUNCHER])
        self.assertTrue(launched.usePTY)
        self.assertEqual(sandbox.pid, launched.transport.pid)

    def test_failed_request_falls_back_to_classic(self):
        """A ready template that fails the request still gives a console, the classic way."""
        reactor = FakeProcessReactor()
        refusing = RefusingForkServer()
        starter(reactor, refusing).start(_Events(), 80, 24)
        self.assertEqual(len(refusing.asked), 1)
        self.assertEqual(reactor.spawned[-1].args[3], LAUNCHER)


    def test_request_lost_after_sending_quarantines_uid(self):
        """A request the template got but did not answer starts nothing else and
        its uid is never handed out again (a launcher may run with it)."""
        reactor = FakeProcessReactor()
        refusing = RefusingForkServer(sent=True)
        killed: list[str] = []
        subject = starter(reactor, refusing, killed)
        self.assertRaises(SandboxUnavailable, subject.start, _Events(), 80, 24)
        self.assertEqual(reactor.spawned, [])
        # whatever the template may have started in its cgroups is killed
        self.assertTrue(killed)
        self.assertEqual(len(self.flushLoggedErrors(ForkServerUnavailable)), 1)
        uid = json.loads(refusing.asked[0])["uid"]
        refusing.ready = False  # the rest start the classic way
        handed_out = []
        for _ in range(9):
            handed_out.append(subject.start(_Events(), 80, 24).uid)
        self.assertNotIn(uid, handed_out)


class _Events:
    def output(self, data):
        pass

    def exited(self, status, signal):
        pass

    def notice(self, message):
        pass

    def ending(self, message):
        pass
