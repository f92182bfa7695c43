"""JSON logs: where twistd's JSON lines go, the lifecycle events' fields, the choice."""

import json
from io import StringIO

from twisted.internet.task import Clock
from twisted.logger import capturedLogs, eventAsJSON, jsonFileLogObserver
from twisted.trial.unittest import SynchronousTestCase

from shellserver import logs
from shellserver.auth import TokenAuthority
from shellserver.config import ConfigError, load_config
from shellserver.console import ConsoleFactory, ConsoleSettings
from shellserver.tap import Options
from shellserver.testing import FakeConnection, FakeSandboxStarter

ORIGIN = "https://console.example"
CLIENT = "192.0.2.7"  # FakeConnection's peer_host


class DestinationTests(SynchronousTestCase):
    def tearDown(self):
        logs._json_destination = "-"

    def test_foreground_without_logfile_is_stdout(self):
        """In the foreground without --logfile the JSON lines go to standard output."""
        name = logs.json_log_to(None, nodaemon=True)
        self.assertEqual(name, "shellserver.logs.twistd_json_observer")
        self.assertEqual(logs._json_destination, "-")

    def test_logfile_is_kept(self):
        """With --logfile the JSON lines go to that file; a daemon's default is twistd.log."""
        logs.json_log_to("/var/log/shellserver.log", nodaemon=True)
        self.assertEqual(logs._json_destination, "/var/log/shellserver.log")
        logs.json_log_to(None, nodaemon=False)
        self.assertEqual(logs._json_destination, "twistd.log")


class ChoiceTests(SynchronousTestCase):
    def choose(self, log_format, **twistd):
        options = Options()
        options.parent = dict(twistd)
        options._choose_log_format(load_config(f'[server]\nlog_format = "{log_format}"\n'))
        return options.parent

    def test_json_sets_twistd_logger(self):
        """log_format = "json" names the JSON observer as twistd's logger."""
        self.addCleanup(setattr, logs, "_json_destination", "-")
        twistd = self.choose("json", logfile="/tmp/x.log", nodaemon=True)
        self.assertEqual(twistd["logger"], "shellserver.logs.twistd_json_observer")

    def test_text_and_explicit_logger_untouched(self):
        """"text" leaves twistd alone, and an explicit --logger wins over "json"."""
        self.assertNotIn("logger", self.choose("text"))
        self.assertEqual(self.choose("json", logger="my.observer")["logger"], "my.observer")

    def test_bad_format_names_the_key(self):
        """Any other log_format is refused, naming server.log_format."""
        with self.assertRaises(ConfigError) as caught:
            load_config('[server]\nlog_format = "xml"\n')
        self.assertIn("server.log_format", str(caught.exception))


class LifecycleEventTests(SynchronousTestCase):
    def test_lifecycle_events_carry_their_fields_and_no_token(self):
        """A console's start and end log its id, user, client, transport, node
        and reason as named fields, as JSON lines without the token."""
        clock = Clock()
        tokens = TokenAuthority(b"k" * 32, node="node-1", clock=clock, ttl=60.0)
        starter = FakeSandboxStarter()
        factory = ConsoleFactory(clock, tokens, starter, ConsoleSettings(
            auth_timeout=5.0, idle_timeout=600.0, max_age=1800.0, node="node-1"))
        connection = FakeConnection(origin=ORIGIN)
        session = factory(connection).console
        token = tokens.mint(user_id="u1", origin=ORIGIN, client_address=CLIENT)
        with capturedLogs() as events:
            session.message_received("a" + token)
            session.output(b"In [1]: ")
            starter.started[-1].exit(0)
        lifecycle = [e for e in events if "console_event" in e]
        self.assertEqual([e["console_event"] for e in lifecycle],
                         ["console_started", "console_ended"])
        for event in lifecycle:
            self.assertEqual((event["user"], event["client"], event["transport"],
                              event["node"]), ("u1", CLIENT, "websocket", "node-1"))
            self.assertEqual(event["console"], starter.started[-1].session)
        self.assertEqual(lifecycle[1]["reason"], "exit")
        out = StringIO()
        observer = jsonFileLogObserver(out, recordSeparator="")
        for event in events:
            observer(event)
        lines = out.getvalue().splitlines()
        self.assertEqual(len(lines), len(events))
        self.assertEqual(json.loads(lines[-1])["reason"], "exit")
        self.assertNotIn(token.split(".")[-1], out.getvalue())
        self.assertNotIn(token.split(".")[-1], "".join(eventAsJSON(e) for e in events))
