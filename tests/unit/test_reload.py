"""Live reload (shellserver.reload) and the reload hooks of the parts it feeds."""

from __future__ import annotations

import attrs
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from shellserver.config import ConfigError, load_config
from shellserver.reload import ConfigReloader, changed_keys, needing_restart
from shellserver.sandbox.pool import SandboxPool
from shellserver.testing import FakeSandboxStarter


def config(text: str = ""):
    return load_config('[server]\nstate_dir = "/srv/state"\n' + text)


class FileOfConfigs:
    """Stands for the config file: load() returns or raises what it was given."""

    def __init__(self, result):
        self.result = result
        self.paths = []

    def load(self, path):
        self.paths.append(path)
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


class ChangedKeysTests(SynchronousTestCase):
    def test_names_changed_keys(self):
        """changed_keys names each section.key whose value differs."""
        old = config()
        new = config("[admission]\nper_address = 2\n[sandbox]\nuid_min = 300000\n"
                     "uid_max = 300099\n")
        self.assertEqual(changed_keys(old, new),
                         ["sandbox.uid_min", "sandbox.uid_max", "admission.per_address"])

    def test_restart_keys_only(self):
        """needing_restart leaves out what a reload applies."""
        old = config()
        new = config("[admission]\nper_address = 2\n[sandbox]\nmemory_mb = 512\n")
        self.assertEqual(needing_restart(old, new), ["sandbox.memory_mb"])


class ConfigReloaderTests(SynchronousTestCase):
    def setUp(self):
        self.applied = []

    def reloader(self, result):
        source = FileOfConfigs(result)
        reloader = ConfigReloader("/etc/shellserver.toml", config(), load=source.load)
        reloader.subscribe(self.applied.append)
        return reloader, source

    def test_accepted_file_reaches_subscribers(self):
        """A good file is handed to every subscriber and becomes current."""
        new = config("[admission]\nper_address = 2\n")
        reloader, source = self.reloader(new)
        self.assertTrue(reloader.reload())
        self.assertEqual(source.paths, ["/etc/shellserver.toml"])
        self.assertEqual([c.admission.per_address for c in self.applied], [2])
        self.assertEqual(reloader.current.admission.per_address, 2)

    def test_refused_file_changes_nothing(self):
        """A file with a bad key reaches no subscriber and the old config stays."""
        error = ConfigError(key="admission.per_address", message="must be an integer")
        reloader, _ = self.reloader(error)
        before = reloader.current
        with _captured_logs() as events:
            self.assertFalse(reloader.reload())
        self.assertEqual(self.applied, [])
        self.assertIs(reloader.current, before)
        self.assertIn("admission.per_address", [e.get("key") for e in events])

    def test_state_dir_stays(self):
        """The state directory given at start (--state-dir) stays across reloads."""
        new = attrs.evolve(config(), server=attrs.evolve(config().server,
                                                         state_dir="/elsewhere"))
        reloader, _ = self.reloader(new)
        reloader.reload()
        self.assertEqual(reloader.current.server.state_dir, "/srv/state")


class _captured_logs:
    """Collect the events logged to the global log publisher."""

    def __enter__(self):
        from twisted.logger import globalLogPublisher

        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        return self.events

    def __exit__(self, *exc):
        from twisted.logger import globalLogPublisher

        globalLogPublisher.removeObserver(self.events.append)


class PoolResizeTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.starter = FakeSandboxStarter()
        self.pool = SandboxPool(self.starter, self.clock, 2, room=lambda: 10)
        self.pool.start_filling()
        for index in range(2):
            self.clock.advance(0)
            self.starter.started[index].events.output(b"In [1]: ")
        self.clock.advance(0)

    def test_shrinking_ends_extra_sandboxes(self):
        """Resizing down ends the sandboxes beyond the new size and starts none."""
        self.pool.resize(1)
        self.clock.advance(1)
        self.assertEqual(len(self.pool.waiting), 1)
        self.assertEqual([s.terminated for s in self.starter.started], [0, 1])
        self.assertEqual(len(self.starter.started), 2)

    def test_growing_starts_more(self):
        """Resizing up starts the missing sandboxes."""
        self.pool.resize(3)
        self.clock.advance(0)
        self.assertEqual(len(self.starter.started), 3)


class NoFileTests(SynchronousTestCase):
    def test_without_config_file_nothing_changes(self):
        """A server started without --config refuses a reload and keeps its config."""
        applied = []
        before = config()
        reloader = ConfigReloader(None, before)
        reloader.subscribe(applied.append)
        self.assertFalse(reloader.reload())
        self.assertEqual(applied, [])
        self.assertIs(reloader.current, before)


class OriginsTests(SynchronousTestCase):
    def test_status_cors_follows_new_origins(self):
        """After set_host_origins, /status answers CORS for the new origin only."""
        from twisted.web.test.requesthelper import DummyRequest

        from shellserver.admission import Admission
        from shellserver.web import Root, StatusPage, set_host_origins

        root = Root(Resource())
        root.putChild(b"status", StatusPage(Admission(Clock(), capacity=1, per_address=1,
                                                      per_address_per_minute=1),
                                            host_origins=["https://old.example"],
                                            selector="pre", max_age=0))
        set_host_origins(root, ["https://new.example"])

        def allowed(origin: bytes):
            request = DummyRequest([])
            request.requestHeaders.setRawHeaders(b"origin", [origin])
            root.children[b"status"].render_OPTIONS(request)
            return request.responseHeaders.getRawHeaders(b"access-control-allow-origin")

        self.assertEqual(allowed(b"https://new.example"), [b"https://new.example"])
        self.assertIsNone(allowed(b"https://old.example"))


class InputBudgetTests(SynchronousTestCase):
    def test_new_sessions_take_the_new_input_budget(self):
        """use_input_budget gives sessions opened after it the new budget; an
        open session keeps its own."""
        from shellserver.sockjs.options import SockJSOptions
        from shellserver.sockjs.session import SessionRegistry

        registry = SessionRegistry(lambda connection: None, Clock(),
                                   SockJSOptions(input_messages_per_second=100.0))
        before = registry.open(session_id="s1", peer_host="192.0.2.1", origin=None,
                               transport_name="websocket", encode=str.encode, bound=True)
        registry.use_input_budget({"input_messages_per_second": 7, "input_bytes_per_second": 2048,
                                   "input_burst_messages": 10, "input_burst_bytes": 4096})
        after = registry.open(session_id="s2", peer_host="192.0.2.1", origin=None,
                              transport_name="websocket", encode=str.encode, bound=True)
        self.assertEqual(before._options.input_messages_per_second, 100.0)
        self.assertEqual(after._options.input_messages_per_second, 7.0)
        self.assertEqual(after._options.input_burst_bytes, 4096.0)

    def test_input_keys_and_log_level_are_reloadable(self):
        """The input budget and server.log_level change without naming a restart."""
        old = config()
        new = load_config('[server]\nstate_dir = "/srv/state"\nlog_level = "debug"\n'
                          "[console]\ninput_messages_per_second = 10\n")
        self.assertEqual(changed_keys(old, new),
                         ["server.log_level", "console.input_messages_per_second"])
        self.assertEqual(needing_restart(old, new), [])
