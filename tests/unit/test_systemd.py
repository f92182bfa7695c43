"""Tests for shellserver.systemd: the sd_notify messages and when they are sent."""

import errno

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from shellserver.systemd import (
    ReadinessService,
    SystemdNotifier,
    notifier_from_environment,
    socket_address,
    watchdog_interval,
    watchdog_service,
)


class FakeSender:
    """Records the datagrams a notifier sends."""

    def __init__(self, error=None):
        self.sent = []
        self.error = error

    def __call__(self, address, payload):
        if self.error is not None:
            raise self.error
        self.sent.append((address, payload.decode()))


class EnvironmentTests(SynchronousTestCase):
    def test_path_and_abstract_addresses(self):
        """A path is used as is; a leading @ means the abstract namespace."""
        self.assertEqual(socket_address("/run/systemd/notify"), "/run/systemd/notify")
        self.assertEqual(socket_address("@/org/systemd/x"), b"\0/org/systemd/x")
        self.assertIsNone(socket_address("vsock:2:1234"))

    def test_notify_socket_is_removed(self):
        """The notifier takes $NOTIFY_SOCKET out of the environment children inherit."""
        environ = {"NOTIFY_SOCKET": "/run/systemd/notify", "PATH": "/usr/bin"}
        self.assertTrue(notifier_from_environment(environ).active)
        self.assertEqual(environ, {"PATH": "/usr/bin"})

    def test_not_under_systemd(self):
        """Without $NOTIFY_SOCKET nothing is sent."""
        sender = FakeSender()
        notifier = notifier_from_environment({})
        self.assertFalse(notifier.active)
        SystemdNotifier(None, sender).notify("READY=1")
        self.assertEqual(sender.sent, [])

    def test_watchdog_interval_is_half(self):
        """The watchdog pings at half of $WATCHDOG_USEC, and the variables are removed."""
        environ = {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "42"}
        self.assertEqual(watchdog_interval(environ, 42), 15.0)
        self.assertEqual(environ, {})

    def test_watchdog_for_another_process(self):
        """A watchdog meant for another pid, or none, or a bad value, gives no pings."""
        self.assertIsNone(watchdog_interval({"WATCHDOG_USEC": "30000000",
                                             "WATCHDOG_PID": "7"}, 42))
        self.assertIsNone(watchdog_interval({}, 42))
        self.assertIsNone(watchdog_interval({"WATCHDOG_USEC": "soon"}, 42))
        self.assertIsNone(watchdog_interval({"WATCHDOG_USEC": "0"}, 42))

    def test_send_failure_is_logged(self):
        """A refused datagram is logged, never raised into the reactor."""
        notifier = SystemdNotifier("/run/x", FakeSender(OSError(errno.ECONNREFUSED, "refused")))
        notifier.notify("READY=1")
        self.assertEqual(len(self.flushLoggedErrors()), 0)


class ReadinessTests(SynchronousTestCase):
    def setUp(self):
        self.sender = FakeSender()
        self.notifier = SystemdNotifier("/run/systemd/notify", self.sender)

    def messages(self):
        return [payload for _, payload in self.sender.sent]

    def test_ready_waits_for_the_runtime(self):
        """READY=1 is sent once the runtime is ready, not before."""
        runtime = Deferred()
        service = ReadinessService(self.notifier, lambda: runtime)
        service.startService()
        self.assertEqual(self.messages(), [])
        runtime.callback(None)
        self.assertEqual(self.messages(), ["READY=1\nSTATUS=serving consoles"])

    def test_stopping_on_drain(self):
        """Stopping sends STOPPING=1, before the services started earlier stop."""
        top = MultiService()
        order = []

        class Sandboxes(MultiService):
            def stopService(self):
                order.append(("sandboxes stop", list(self_messages())))
                return super().stopService()

        def self_messages():
            return self.messages()

        Sandboxes().setServiceParent(top)
        ReadinessService(self.notifier, lambda: succeed(None)).setServiceParent(top)
        top.startService()
        top.stopService()
        self.assertEqual(order, [("sandboxes stop", ["READY=1\nSTATUS=serving consoles",
                                                     "STOPPING=1\nSTATUS=draining consoles"])])

    def test_no_ready_after_stop(self):
        """A runtime that becomes ready after the stop began sends no READY=1."""
        runtime = Deferred()
        service = ReadinessService(self.notifier, lambda: runtime)
        service.startService()
        service.stopService()
        runtime.callback(None)
        self.assertEqual(self.messages(), ["STOPPING=1\nSTATUS=draining consoles"])

    def test_watchdog_pings_while_running(self):
        """WATCHDOG=1 goes out at once and then every interval, until stopped."""
        clock = Clock()
        service = watchdog_service(self.notifier, 15.0, clock)
        service.startService()
        clock.advance(15.0)
        clock.advance(15.0)
        self.assertEqual(self.messages(), ["WATCHDOG=1"] * 3)
        service.stopService()
        clock.advance(60.0)
        self.assertEqual(len(self.messages()), 3)
