"""The admin page (shellserver.admin): samples, the token, its API and the
local node's controls, with a Clock and fakes."""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from io import BytesIO

from twisted.application.internet import TimerService
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest
from zope.interface.verify import verifyObject

from shellserver.admin import (
    SAMPLE_INTERVAL,
    AdminAPI,
    AdminAuth,
    AdminTokenError,
    IAdminControls,
    IAdminNodes,
    LocalNode,
    Readings,
    SampleRing,
    cpu_from_stat,
    load_or_create_token,
    local_readings,
    memory_from_meminfo,
    sample_between,
)
from shellserver.admission import Admission, KillSwitch
from shellserver.auth import TokenAuthority
from shellserver.console import ConsoleFactory, ConsoleSettings
from shellserver.metrics import Metrics
from shellserver.testing import FakeConnection, FakeSandboxStarter

MEMINFO = "MemTotal:       8000000 kB\nMemFree:  100 kB\nMemAvailable:   6000000 kB\n"
STAT = ("cpu  100 0 100 700 100 0 0 0 0 0\ncpu0 50 0 50 350 50 0 0 0 0 0\n"
        "cpu1 50 0 50 350 50 0 0 0 0 0\nintr 1 2 3\n")
TOKEN = "the-admin-token"
ORIGIN = "https://console.example"


def readings(time: float, *, started=0.0, start_seconds=0.0, refused=0.0, busy=200,
             total=1000, active=0) -> Readings:
    return Readings(time=time, active=active, capacity=10, started=started,
                    start_seconds=start_seconds, refused={"full": refused, "token": 0.0},
                    memory_used=2 * 2**30, memory_total=8 * 2**30, cpu_busy=busy,
                    cpu_total=total, cpu_cores=2)


class ProcTests(SynchronousTestCase):
    def test_memory_used_is_total_minus_available(self):
        """Memory in use is MemTotal - MemAvailable, in bytes."""
        self.assertEqual(memory_from_meminfo(MEMINFO), (2000000 * 1024, 8000000 * 1024))

    def test_cpu_busy_leaves_out_idle_and_iowait(self):
        """CPU busy jiffies are all but idle and iowait; cores are the cpuN lines."""
        self.assertEqual(cpu_from_stat(STAT), (200, 1000, 2))


class SampleTests(SynchronousTestCase):
    def test_first_sample_has_no_rates(self):
        """Without earlier readings, rates, latency and CPU are unknown (None)."""
        sample = sample_between(None, readings(100.0, started=3))
        self.assertIsNone(sample.starts_per_minute)
        self.assertIsNone(sample.start_latency)
        self.assertIsNone(sample.cpu_used)
        self.assertEqual(sample.refused_per_minute, {"full": None, "token": None})
        self.assertEqual(sample.memory_total_mb, 8192)

    def test_rates_latency_and_cpu_between_readings(self):
        """Starts and refusals become per-minute rates, latency the mean of
        the new starts, CPU the cores busy on average."""
        before = readings(100.0, started=2, start_seconds=1.0, refused=1, busy=200, total=1000)
        after = readings(105.0, started=4, start_seconds=2.0, refused=2, busy=450,
                         total=1500)
        sample = sample_between(before, after)
        self.assertEqual(sample.starts_per_minute, 24.0)
        self.assertEqual(sample.refused_per_minute, {"full": 12.0, "token": 0.0})
        self.assertEqual(sample.start_latency, 0.5)
        self.assertEqual(sample.cpu_used, 1.0)

    def test_no_starts_no_latency(self):
        """An interval without starts has no latency point (a gap, not 0)."""
        sample = sample_between(readings(100.0, started=2), readings(105.0, started=2))
        self.assertIsNone(sample.start_latency)
        self.assertEqual(sample.starts_per_minute, 0.0)


class RingTests(SynchronousTestCase):
    def test_ring_is_bounded(self):
        """The ring keeps only its last ``size`` samples, oldest dropped."""
        clock = Clock()
        ring = SampleRing(lambda: readings(clock.seconds(), active=int(clock.seconds())),
                          size=3)
        for _ in range(5):
            ring.take()
            clock.advance(1)
        self.assertEqual(len(ring), 3)
        self.assertEqual(ring.columns()["active"], [2, 3, 4])

    def test_timer_samples_on_the_injected_clock(self):
        """A TimerService on the Clock takes one sample at start and one per interval."""
        clock = Clock()
        ring = SampleRing(lambda: readings(clock.seconds()))
        sampler = TimerService(SAMPLE_INTERVAL, ring.take)
        sampler.clock = clock
        sampler.startService()
        self.addCleanup(sampler.stopService)
        self.assertEqual(len(ring), 1)
        clock.pump([SAMPLE_INTERVAL] * 3)
        self.assertEqual(len(ring), 4)
        self.assertEqual(ring.columns()["time"], [0.0, 5.0, 10.0, 15.0])

    def test_unreadable_proc_skips_a_sample(self):
        """A reading that fails (an unreadable /proc file) skips that sample only."""
        results = [OSError("no /proc"), readings(5.0)]

        def read():
            result = results.pop(0)
            if isinstance(result, Exception):
                raise result
            return result

        ring = SampleRing(read)
        ring.take()
        ring.take()
        self.assertEqual(ring.columns()["time"], [5.0])

    def test_columns_per_refusal_reason(self):
        """columns() has one list per series and per refusal reason, with None gaps."""
        ring = SampleRing(iter([readings(0.0), readings(5.0, refused=1)]).__next__)
        ring.take()
        ring.take()
        columns = ring.columns()
        self.assertEqual(columns["refused_per_minute"], {"full": [None, 12.0],
                                                        "token": [None, 0.0]})
        self.assertEqual(columns["starts_per_minute"], [None, 0.0])
        json.dumps(columns)  # what the page polls

    def test_local_readings_from_metrics_and_proc(self):
        """local_readings reads the metrics' counters and the host's /proc."""
        clock = Clock()
        clock.advance(42)
        metrics = Metrics()
        metrics.console_started("cold", 0.5)
        metrics.console_started("pool", 0.25)
        metrics.console_refused("full")
        admission = Admission(clock, capacity=7, per_address=1, per_address_per_minute=9)
        admission.admit("192.0.2.1")
        now = local_readings(clock, metrics, admission,
                             read={"meminfo": MEMINFO, "stat": STAT}.__getitem__,
                             memory_per_console=256 * 2**20)
        self.assertEqual((now.time, now.active, now.capacity), (42.0, 1, 7))
        self.assertEqual((now.started, now.start_seconds), (2.0, 0.75))
        self.assertEqual(now.refused["full"], 1.0)
        self.assertEqual((now.cpu_busy, now.cpu_cores), (200, 2))
        self.assertEqual(now.memory_for_capacity, 7 * 256 * 2**20)
        self.assertEqual(sample_between(None, now).memory_for_capacity_mb, 7 * 256)


class TokenFileTests(SynchronousTestCase):
    def setUp(self):
        self.directory = tempfile.mkdtemp(prefix="shellserver-test-")
        self.addCleanup(shutil.rmtree, self.directory)
        self.path = os.path.join(self.directory, "admin-token")

    def test_created_0600_and_kept(self):
        """The token is made once, readable by its owner only, and read back after."""
        token = load_or_create_token(self.path)
        self.assertGreaterEqual(len(token), 40)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        self.assertEqual(load_or_create_token(self.path), token)

    def test_readable_by_others_refused(self):
        """A token file that others can read is refused, naming the mode."""
        with open(self.path, "w") as f:
            f.write("abc\n")
        os.chmod(self.path, 0o644)
        with self.assertRaises(AdminTokenError) as caught:
            load_or_create_token(self.path)
        self.assertIn("0644", str(caught.exception))

    def test_empty_file_refused(self):
        """An empty token file is refused with what to do."""
        os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        with self.assertRaises(AdminTokenError) as caught:
            load_or_create_token(self.path)
        self.assertIn("empty", str(caught.exception))


class AuthTests(SynchronousTestCase):
    def test_bearer_token_accepted_others_counted(self):
        """Only "Bearer TOKEN" passes; wrong ones count until the address must wait."""
        clock = Clock()
        auth = AdminAuth(TOKEN, clock, per_minute=3)
        self.assertTrue(auth.check("192.0.2.1", b"Bearer " + TOKEN.encode()))
        for wrong in (None, b"Bearer nope", b"Basic " + TOKEN.encode()):
            self.assertIsNone(auth.retry_after("192.0.2.1"))
            self.assertFalse(auth.check("192.0.2.1", wrong))
        self.assertEqual(auth.retry_after("192.0.2.1"), 60)
        self.assertIsNone(auth.retry_after("192.0.2.2"))
        clock.advance(60)
        self.assertIsNone(auth.retry_after("192.0.2.1"))

    def test_tracked_addresses_are_bounded(self):
        """Past max_tracked addresses, the others share one count."""
        auth = AdminAuth(TOKEN, Clock(), per_minute=2, max_tracked=2)
        for address in ("a", "b", "c", "d"):
            auth.check(address, b"Bearer wrong")
        self.assertEqual(auth.retry_after("other addresses"), 60)
        self.assertIsNone(auth.retry_after("c"))


class FakeNodes:
    """Records what the API asked the controls to do."""

    notice = None

    def __init__(self):
        self.calls = []

    def nodes(self):
        return []

    def set_paused(self, paused):
        self.calls.append(("paused", paused))

    def set_draining(self, node, draining):
        self.calls.append(("draining", node, draining))
        return node == "n1"

    def end_console(self, node, console):
        self.calls.append(("end", node, console))
        return console == "s1"


class PlainRequest(DummyRequest):
    """A DummyRequest over plain HTTP (the admin listener's usual tcp:)."""

    def isSecure(self):
        return False


class APITests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.nodes = FakeNodes()
        self.api = AdminAPI(AdminAuth(TOKEN, self.clock), self.nodes, self.nodes)

    def request(self, method, path, *, token=TOKEN, body=None, origin=None,
                content_type=b"application/json"):
        request = PlainRequest(path.encode().split(b"/"))
        request.method = method
        request.requestHeaders.setRawHeaders(b"host", [b"127.0.0.1:9200"])
        if token is not None:
            request.requestHeaders.setRawHeaders(b"authorization",
                                                 [b"Bearer " + token.encode()])
        if origin is not None:
            request.requestHeaders.setRawHeaders(b"origin", [origin])
        if content_type is not None:
            request.requestHeaders.setRawHeaders(b"content-type", [content_type])
        request.content = BytesIO(json.dumps(body or {}).encode())
        result = self.api.render(request)
        return request.responseCode or 200, json.loads(result), request

    def test_overview_needs_the_token(self):
        """Without the token the overview is 401 with a Bearer challenge; with it, 200."""
        code, body, request = self.request(b"GET", "overview", token=None)
        self.assertEqual(code, 401)
        self.assertIn(b"Bearer", request.responseHeaders.getRawHeaders(b"www-authenticate")[0])
        self.assertEqual(self.request(b"GET", "overview")[:2],
                         (200, {"nodes": [], "notice": None}))

    def test_wrong_tokens_rate_limited(self):
        """After five wrong tokens the address gets 429 even with the right one."""
        for _ in range(5):
            self.assertEqual(self.request(b"GET", "overview", token="wrong")[0], 401)
        code, body, request = self.request(b"GET", "overview")
        self.assertEqual(code, 429)
        self.assertEqual(request.responseHeaders.getRawHeaders(b"retry-after"), [b"60"])
        self.clock.advance(60)
        self.assertEqual(self.request(b"GET", "overview")[0], 200)

    def test_actions_reach_the_controls(self):
        """pause, resume, drain, undrain and end call the controls with their arguments."""
        self.request(b"POST", "pause", origin=b"http://127.0.0.1:9200")
        self.request(b"POST", "resume")
        self.assertEqual(self.request(b"POST", "drain", body={"node": "n1"})[0], 200)
        self.request(b"POST", "undrain", body={"node": "n1"})
        self.assertEqual(self.request(b"POST", "end", body={"node": "n1", "console": "s1"})[0],
                         200)
        self.assertEqual(self.nodes.calls, [
            ("paused", True), ("paused", False), ("draining", "n1", True),
            ("draining", "n1", False), ("end", "n1", "s1")])

    def test_unknown_node_or_console_is_404(self):
        """Draining an unknown node or ending an unknown console says so (404)."""
        code, body, _ = self.request(b"POST", "drain", body={"node": "n9"})
        self.assertEqual((code, body["error"]), (404, "no node 'n9'"))
        code, body, _ = self.request(b"POST", "end", body={"node": "n1", "console": "s9"})
        self.assertEqual(code, 404)
        self.assertIn("s9", body["error"])

    def test_foreign_origin_wrong_type_and_bad_body_refused(self):
        """An action from another origin (403), not JSON (415), a bad body
        (400) or an unknown action (404) does nothing."""
        self.assertEqual(self.request(b"POST", "pause", origin=b"https://evil.example")[0],
                         403)
        self.assertEqual(self.request(b"POST", "pause", content_type=b"text/plain")[0], 415)
        self.assertEqual(self.request(b"POST", "end", body={"node": "n1"})[0], 400)
        self.assertEqual(self.request(b"POST", "explode")[0], 404)
        self.assertEqual(self.request(b"POST", "pause", token="wrong")[0], 401)
        self.assertEqual(self.nodes.calls, [])

    def test_unwritable_switch_file_is_a_clear_500(self):
        """A kill-switch file that cannot be written answers 500 naming the problem."""
        def refuse(paused):
            raise PermissionError(13, "Permission denied", "/state/kill-switch")

        self.nodes.set_paused = refuse
        code, body, _ = self.request(b"POST", "pause")
        self.assertEqual(code, 500)
        self.assertEqual(body["error"], "cannot pause: /state/kill-switch: Permission denied")
        self.flushLoggedErrors()

    def test_get_cannot_act(self):
        """A GET of an action's URL does nothing (404)."""
        self.assertEqual(self.request(b"GET", "pause")[0], 404)
        self.assertEqual(self.nodes.calls, [])


class LocalNodeTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.files: dict[str, str] = {}
        self.admission = Admission(self.clock, capacity=4, per_address=4,
                                   per_address_per_minute=100)
        self.switch = KillSwitch(self.clock, self.admission, "/state/kill-switch",
                                 lambda message: None, read=self.files.get)
        self.tokens = TokenAuthority(b"k" * 32, node="n1", clock=self.clock, ttl=60.0)
        self.starter = FakeSandboxStarter()
        self.metrics = Metrics()
        self.consoles = ConsoleFactory(
            self.clock, self.tokens, self.starter,
            ConsoleSettings(auth_timeout=5.0, idle_timeout=600.0, max_age=1800.0, node="n1"),
            self.admission, metrics=self.metrics)
        self.node = LocalNode("n1", self.clock, self.admission, self.switch, self.consoles,
                              SampleRing(lambda: readings(self.clock.seconds())),
                              write_switch=self.write_switch)

    def write_switch(self, path, paused):
        if paused:
            self.files[path] = "paused from the admin page\n"
        else:
            self.files.pop(path, None)

    def start_console(self):
        connection = FakeConnection(origin=ORIGIN)
        attachment = self.consoles(connection)
        token = self.tokens.mint(user_id="u1", origin=ORIGIN, client_address="192.0.2.7")
        attachment.message_received("a" + token)
        attachment.console.output(b"In [1]: ")
        return connection, self.starter.started[-1]

    def test_provides_both_interfaces(self):
        """LocalNode is both the nodes to show and the controls."""
        verifyObject(IAdminNodes, self.node)
        verifyObject(IAdminControls, self.node)

    def test_pause_is_the_kill_switch(self):
        """Pause writes the kill-switch file and refuses at once; resume removes it."""
        self.node.set_paused(True)
        self.assertIn("/state/kill-switch", self.files)
        self.assertEqual(self.admission.status("192.0.2.1").reason, "switched-off")
        self.assertEqual(self.node.nodes()[0].state, "paused")
        self.node.set_paused(False)
        self.assertEqual(self.files, {})
        self.assertTrue(self.admission.status("192.0.2.1").accepting)

    def test_drain_refuses_new_consoles_running_go_on(self):
        """Draining refuses new consoles while a running one keeps its sandbox."""
        _, sandbox = self.start_console()
        self.assertTrue(self.node.set_draining("n1", True))
        self.assertEqual(self.node.nodes()[0].state, "draining")
        self.assertFalse(self.admission.status("192.0.2.1").accepting)
        self.assertEqual(sandbox.terminated, 0)
        self.assertFalse(self.node.set_draining("n2", True))
        self.assertTrue(self.node.set_draining("n1", False))
        self.assertTrue(self.admission.status("192.0.2.1").accepting)

    def test_lists_running_consoles_without_tokens(self):
        """The node lists each running console's id, age, client and transport."""
        self.start_console()
        self.clock.advance(30)
        [view] = self.node.nodes()
        [console] = view.consoles
        self.assertEqual((console.console, console.age, console.client, console.transport),
                         (self.starter.started[-1].session, 30.0, "192.0.2.7", "websocket"))
        self.assertEqual((view.active, view.capacity), (1, 4))
        self.assertEqual(sorted(json.loads(json.dumps(view.to_json()))["consoles"][0]),
                         ["age", "client", "console", "transport"])

    def test_end_one_console(self):
        """Ending a console stops its sandbox, tells its client, counts it as operator."""
        first, first_sandbox = self.start_console()
        second, second_sandbox = self.start_console()
        self.assertFalse(self.node.end_console("n1", "no-such-console"))
        self.assertTrue(self.node.end_console("n1", first_sandbox.session))
        self.assertEqual((first_sandbox.terminated, second_sandbox.terminated), (1, 0))
        first_sandbox.exit(None, 15)
        self.assertIn("The operator ended this console.", first.sent[-1])
        self.assertEqual(self.metrics.value("shellserver_consoles_ended_total",
                                            reason="operator"), 1)
        self.assertEqual([c.console for c in self.node.nodes()[0].consoles],
                         [second_sandbox.session])


class OptionsTests(SynchronousTestCase):
    def test_bad_admin_endpoint_is_a_usage_error(self):
        """--admin with a description no endpoint parses is a usage error naming it."""
        from twisted.python.usage import UsageError

        from shellserver.tap import Options

        options = Options()
        options["admin"] = "nonsense:9200"
        with self.assertRaises(UsageError) as caught:
            options._check_endpoint("admin")
        self.assertIn("--admin 'nonsense:9200'", str(caught.exception))

    def test_unusable_token_file_is_a_usage_error(self):
        """A token file others can read stops the start with --admin and the reason."""
        from twisted.python.usage import UsageError

        from shellserver.config import load_config
        from shellserver.startup import admin_token

        directory = tempfile.mkdtemp(prefix="shellserver-test-")
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, "admin-token")
        with open(path, "w") as f:
            f.write("abc\n")
        os.chmod(path, 0o640)
        config = load_config(f'[server]\nstate_dir = "{directory}"\n')
        with self.assertRaises(UsageError) as caught:
            admin_token(config)
        self.assertIn("--admin", str(caught.exception))
        self.assertIn("0640", str(caught.exception))
