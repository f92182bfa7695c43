"""The shared fakes in shellserver.testing keep to the interfaces of the real parts."""

import inspect

import attrs
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyClass, verifyObject

from shellserver.sandbox.cgroups import HostCgroupFiles, ICgroupFiles
from shellserver.sandbox.output import IOutputPipe, IOutputPipes
from shellserver.sandbox.service import (
    IConsoleProcessEvents,
    ISandbox,
    ISandboxStarter,
    RunningSandbox,
    SandboxStarter,
)
from shellserver.sandbox.spec import SandboxLimits, build_spec
from shellserver.sandbox.uids import UidPool
from shellserver.sockjs import SockJSConnection
from shellserver.testing import (
    FakeCgroupTree,
    FakeConnection,
    FakeOutputPipe,
    FakeOutputPipes,
    FakeSandbox,
    FakeSandboxStarter,
)

LIMITS = SandboxLimits(
    memory_bytes=1 << 28, pids_max=64, cpu_shares=256, cpu_quota=0.5,
    tmp_bytes=1 << 26, home_bytes=1 << 25, max_open_files=256,
    max_file_bytes=1 << 25, max_processes=64,
)
# What the console uses of a SockJS connection.
APPLICATION_NAMES = ("send", "close", "origin", "peer_host", "transport_name",
                     "session_id", "is_open")


@implementer(IConsoleProcessEvents)
@attrs.define
class Events:
    def output(self, data):
        pass

    def exited(self, status, signal):
        pass


def public_names(cls):
    """Public class members and attrs fields of ``cls``."""
    names = {name for name in dir(cls) if not name.startswith("_")}
    names |= {a.name for a in attrs.fields(cls) if not a.name.startswith("_")}
    return names


def parameters(function):
    """Parameter names, kinds and defaults, without annotations."""
    return [(p.name, p.kind, p.default)
            for p in inspect.signature(function).parameters.values()]


class SandboxFakesTests(SynchronousTestCase):
    def starter(self):
        return SandboxStarter(reactor=Clock(), limits=LIMITS, runtime="/srv/runtime",
                              root="/srv/root", cgroup_layout=None,
                              uids=UidPool(200000, 200009), outputs=FakeOutputPipes())

    def test_fake_sandbox(self):
        """FakeSandbox provides ISandbox."""
        self.assertTrue(verifyClass(ISandbox, FakeSandbox))
        sandbox = FakeSandboxStarter().start(Events(), 80, 24)
        self.assertIsInstance(sandbox, FakeSandbox)
        self.assertTrue(verifyObject(ISandbox, sandbox))

    def test_fake_starter(self):
        """FakeSandboxStarter provides ISandboxStarter."""
        self.assertTrue(verifyClass(ISandboxStarter, FakeSandboxStarter))
        self.assertTrue(verifyObject(ISandboxStarter, FakeSandboxStarter()))

    def test_fake_cgroup_tree(self):
        """FakeCgroupTree and the host's cgroup files provide ICgroupFiles."""
        self.assertTrue(verifyObject(ICgroupFiles, FakeCgroupTree("/cg", ("memory",))))
        self.assertTrue(verifyObject(ICgroupFiles, HostCgroupFiles()))

    def test_fake_output_pipes(self):
        """FakeOutputPipes and FakeOutputPipe provide the output pipe interfaces."""
        self.assertTrue(verifyObject(IOutputPipes, FakeOutputPipes()))
        self.assertTrue(verifyClass(IOutputPipe, FakeOutputPipe))
        self.assertTrue(verifyObject(IOutputPipe, FakeOutputPipes().open("s1", print)[1]))

    def test_real_console_terminal(self):
        """The real ConsoleTerminal provides IOutputPipe."""
        from shellserver.sandbox.output import ConsoleTerminal
        self.assertTrue(verifyClass(IOutputPipe, ConsoleTerminal))

    def test_running_sandbox(self):
        """The real RunningSandbox provides ISandbox."""
        spec = build_spec(session="s1", uid=200000, limits=LIMITS, runtime="/srv/rt",
                          root="/srv/root", cgroup_layout=None)
        sandbox = RunningSandbox(spec=spec, events=Events(), starter=self.starter(),
                                 output=FakeOutputPipes().open("s1", print)[1])
        self.assertTrue(verifyClass(ISandbox, RunningSandbox))
        self.assertTrue(verifyObject(ISandbox, sandbox))
        self.assertEqual((sandbox.session, sandbox.uid), ("s1", 200000))

    def test_sandbox_starter(self):
        """The real SandboxStarter provides ISandboxStarter."""
        self.assertTrue(verifyClass(ISandboxStarter, SandboxStarter))
        self.assertTrue(verifyObject(ISandboxStarter, self.starter()))

    def test_same_start_signature(self):
        """The fake and real starters take the same start() arguments."""
        self.assertEqual(parameters(FakeSandboxStarter.start),
                         parameters(SandboxStarter.start))


class FakeConnectionTests(SynchronousTestCase):
    def test_application_names(self):
        """FakeConnection has every SockJSConnection name the console uses."""
        real, fake = public_names(SockJSConnection), public_names(FakeConnection)
        for name in APPLICATION_NAMES:
            self.assertIn(name, real)
            self.assertIn(name, fake)

    def test_method_signatures(self):
        """send() and close() take the same arguments, with the same defaults."""
        for name in ("send", "close"):
            self.assertEqual(parameters(getattr(FakeConnection, name)),
                             parameters(getattr(SockJSConnection, name)), name)

    def test_is_open_is_a_property(self):
        """is_open is a property on both, not a method."""
        self.assertIsInstance(inspect.getattr_static(SockJSConnection, "is_open"),
                              property)
        self.assertIsInstance(inspect.getattr_static(FakeConnection, "is_open"),
                              property)

    def test_all_public_names(self):
        """FakeConnection has every public attribute and method of SockJSConnection."""
        missing = public_names(SockJSConnection) - public_names(FakeConnection)
        self.assertEqual(missing, set())
