"""The service tree makeService builds, built (never started) from parsed Options.

The start-up checks and preparations that touch the host (shellserver.startup)
are replaced by prepared inputs; the reactor is a MemoryReactorClock, so
building the tree listens on nothing and schedules nothing.
"""

import os
import shutil
import tempfile

from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from shellserver import startup
from shellserver.sandbox.cgroups import CgroupLayout
from shellserver.sandbox.lifecycle import SandboxService
from shellserver.sandbox.pool import SandboxPool
from shellserver.startup import ConnectionPlan, PreparedState
from shellserver.systemd import ReadinessService
from shellserver.tap import DEFAULT_PORT, Options, makeService

LAYOUT = CgroupLayout(memory=None, pids=None, cpu=None, unified="/cg/shellserver",
                      v2_controllers=True)
LISTEN = ("tcp:0:interface=127.0.0.1", r"tcp6:0:interface=\:\:1")


class ServiceTreeTestCase(SynchronousTestCase):
    def setUp(self):
        self.directory = tempfile.mkdtemp(prefix="shellserver-tree-")
        self.addCleanup(shutil.rmtree, self.directory)
        self.tls = None
        self.patch(startup, "check_host", lambda config: None)
        self.patch(startup, "plan_connections",
                   lambda config: ConnectionPlan(10, config.server.max_connections, ()))
        self.patch(startup, "prepare_state", self.prepared)
        self.reactor = MemoryReactorClock()

    def prepared(self, config, need_tls):
        return PreparedState(
            secret=b"s" * 32, layout=LAYOUT,
            sandbox_root=os.path.join(self.directory, "sandbox-root"),
            pipes=os.path.join(self.directory, "pipes"),
            runtime=os.path.join(self.directory, "runtime"), build_runtime=False,
            tls=self.tls if need_tls else None, busy_uids=frozenset(), notices=())

    def build(self, *argv, config="", environ=None):
        path = os.path.join(self.directory, "shellserver.toml")
        with open(path, "w", encoding="utf-8") as f:
            f.write(f'[server]\nstate_dir = "{self.directory}/state"\n' + config)
        options = Options()
        options.parseOptions(["--config", path, *argv])
        return makeService(options, reactor=self.reactor,
                           environ={} if environ is None else environ, pid=4242)

    def names(self, top):
        return [service.name for service in top]


class ServiceTreeTests(ServiceTreeTestCase):
    def test_children_in_start_order(self):
        """The tree's children, in the order they start (and stop in reverse):
        the sandboxes first, so listeners stop before the consoles drain and the
        CPU-budget checks stop before that; SIGHUP's handler last."""
        top = self.build("--listen", LISTEN[0], "--listen", LISTEN[1])
        self.assertEqual(self.names(top), ["fork-server", "sandboxes", "cpu-budget", "kill-switch",
                                           "listen-0", "listen-1", "reload"])

    def test_nothing_started_or_scheduled(self):
        """Building the tree starts no service, listens nowhere and schedules nothing."""
        top = self.build("--listen", LISTEN[0])
        self.assertFalse(top.running)
        self.assertFalse(any(service.running for service in top))
        self.assertEqual(self.reactor.tcpServers, [])
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_listeners_in_order(self):
        """Each --listen becomes its own named listener, in the order given."""
        top = self.build("--listen", LISTEN[0], "--listen", LISTEN[1])
        for index in range(len(LISTEN)):
            listener = top.getServiceNamed(f"listen-{index}")
            self.assertIsInstance(listener, StreamServerEndpointService)
            self.assertEqual(listener.endpoint._interface, ("127.0.0.1", "::1")[index])

    def test_default_listener_is_tls(self):
        """Without --listen, one TLS listener on the default port with the
        prepared certificate."""
        from shellserver.tls import ensure_self_signed

        self.tls = ensure_self_signed(os.path.join(self.directory, "tls"))
        top = self.build()
        self.assertEqual(self.names(top), ["fork-server", "sandboxes", "cpu-budget", "kill-switch",
                                           "listen-0", "reload"])
        endpoint = top.getServiceNamed("listen-0").endpoint
        self.assertEqual(endpoint._port, DEFAULT_PORT)
        self.assertIsNotNone(endpoint._sslContextFactory)

    def test_periodic_checks_on_the_injected_clock(self):
        """The kill switch and CPU budget loops are TimerServices on the given
        reactor, every second and every budget/4 seconds (at most 2)."""
        top = self.build("--listen", LISTEN[0], config="[sandbox]\ncpu_budget = 4\n")
        switch = top.getServiceNamed("kill-switch")
        budget = top.getServiceNamed("cpu-budget")
        for timer in (switch, budget):
            self.assertIsInstance(timer, TimerService)
            self.assertIs(timer.clock, self.reactor)
        self.assertEqual((switch.step, budget.step), (1.0, 1.0))


class OptionalPartsTests(ServiceTreeTestCase):
    def test_metrics_only_when_asked(self):
        """--metrics adds its own listener after the site's; without it there is none."""
        self.assertNotIn("metrics", self.names(self.build("--listen", LISTEN[0])))
        top = self.build("--listen", LISTEN[0], "--metrics", "tcp:0:interface=127.0.0.1")
        self.assertEqual(self.names(top)[4:], ["listen-0", "metrics", "reload"])
        self.assertIsInstance(top.getServiceNamed("metrics"), StreamServerEndpointService)

    def test_pool_only_when_sized(self):
        """sandbox.pool_size > 0 gives the sandboxes a warm pool of that size; 0 none."""
        top = self.build("--listen", LISTEN[0], config="[sandbox]\npool_size = 0\n")
        sandboxes = top.getServiceNamed("sandboxes")
        self.assertIsInstance(sandboxes, SandboxService)
        self.assertIsNone(sandboxes.pool)
        top = self.build("--listen", LISTEN[0], config="[sandbox]\npool_size = 3\n")
        pool = top.getServiceNamed("sandboxes").pool
        self.assertIsInstance(pool, SandboxPool)
        self.assertEqual(pool.size, 3)

    def test_no_cpu_budget_no_checks(self):
        """sandbox.cpu_budget = 0 leaves the CPU-budget loop out."""
        top = self.build("--listen", LISTEN[0], config="[sandbox]\ncpu_budget = 0\n")
        self.assertEqual(self.names(top),
                         ["fork-server", "sandboxes", "kill-switch", "listen-0", "reload"])

    def test_no_systemd_services_outside_systemd(self):
        """Without NOTIFY_SOCKET there is no readiness or watchdog service, even
        with a watchdog set."""
        top = self.build("--listen", LISTEN[0],
                         environ={"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "4242"})
        self.assertFalse({"systemd-readiness", "systemd-watchdog"} & set(self.names(top)))

    def test_systemd_services_after_the_listeners(self):
        """Under systemd, readiness then the watchdog (half WATCHDOG_USEC) follow the
        listeners, so READY=1 comes after listening and STOPPING=1 first at stop."""
        environ = {"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "2000000",
                   "WATCHDOG_PID": "4242"}
        top = self.build("--listen", LISTEN[0], "--metrics", "tcp:0:interface=127.0.0.1",
                         environ=environ)
        self.assertEqual(self.names(top)[4:], ["listen-0", "metrics", "systemd-readiness",
                                               "systemd-watchdog", "reload"])
        self.assertIsInstance(top.getServiceNamed("systemd-readiness"), ReadinessService)
        watchdog = top.getServiceNamed("systemd-watchdog")
        self.assertEqual(watchdog.step, 1.0)
        self.assertIs(watchdog.clock, self.reactor)
        self.assertEqual(environ, {})  # not inherited by the sandboxes' processes

    def test_watchdog_for_another_pid(self):
        """A watchdog set for another process adds readiness only."""
        top = self.build("--listen", LISTEN[0],
                         environ={"NOTIFY_SOCKET": "/run/systemd/notify",
                                  "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"})
        self.assertIn("systemd-readiness", self.names(top))
        self.assertNotIn("systemd-watchdog", self.names(top))

    def test_fork_server_only_when_on(self):
        """sandbox.fork_server (on by default) adds the template's service before
        the sandboxes, so it stops after they drain; off, there is none."""
        self.assertEqual(self.names(self.build("--listen", LISTEN[0]))[:2],
                         ["fork-server", "sandboxes"])
        top = self.build("--listen", LISTEN[0], config="[sandbox]\nfork_server = false\n")
        self.assertNotIn("fork-server", self.names(top))
