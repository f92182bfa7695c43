"""JSON logs: where twistd's JSON lines go, the lifecycle events' fields, the choice."""

import json
from io import StringIO

from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel, capturedLogs, eventAsJSON, jsonFileLogObserver
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

    def test_text_names_filtered_text_observer_and_explicit_logger_wins(self):
        """"text" names the level-filtered text observer; an explicit --logger
        or --syslog wins over either format."""
        self.addCleanup(setattr, logs, "_json_destination", "-")
        self.assertEqual(self.choose("text")["logger"],
                         "shellserver.logs.twistd_text_observer")
        self.assertEqual(self.choose("json", logger="my.observer")["logger"], "my.observer")
        self.assertNotIn("logger", self.choose("text", syslog=True))

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


class LogLevelTests(SynchronousTestCase):
    def setUp(self):
        self.addCleanup(logs.set_log_level, "info")
        self.addCleanup(setattr, logs, "_json_destination", "-")

    def write(self, factory, level_name):
        """Events at every level through the observer ``factory`` makes."""
        out = StringIO()
        self.patch(logs, "_destination", lambda: out)
        logs.set_log_level(level_name)
        observer = factory()
        log = Logger(namespace="shellserver.test", observer=observer)
        log.debug("a debug event {n}", n=1)
        log.info("an info event {n}", n=2)
        log.warn("a warning event {n}", n=3)
        log.error("an error event {n}", n=4)
        return out.getvalue()

    def test_text_observer_drops_events_below_the_level(self):
        """The text observer writes events at server.log_level and above only."""
        text = self.write(logs.twistd_text_observer, "warn")
        self.assertNotIn("debug event", text)
        self.assertNotIn("info event", text)
        self.assertIn("a warning event 3", text)
        self.assertIn("an error event 4", text)

    def test_json_observer_drops_events_below_the_level(self):
        """The JSON observer writes debug events only when the level is "debug"."""
        lines = self.write(logs.twistd_json_observer, "debug").splitlines()
        self.assertEqual([json.loads(line)["n"] for line in lines], [1, 2, 3, 4])
        lines = self.write(logs.twistd_json_observer, "error").splitlines()
        self.assertEqual([json.loads(line)["n"] for line in lines], [4])

    def test_level_changes_a_running_observer(self):
        """set_log_level (a reload) changes what an observer already made writes."""
        out = StringIO()
        self.patch(logs, "_destination", lambda: out)
        logs.set_log_level("info")
        log = Logger(namespace="shellserver.test", observer=logs.twistd_text_observer())
        log.info("before {n}", n=1)
        logs.set_log_level("error")
        log.info("after {n}", n=2)
        self.assertIn("before 1", out.getvalue())
        self.assertNotIn("after 2", out.getvalue())

    def test_options_apply_the_configured_level(self):
        """Options sets the configured server.log_level before twistd logs anything."""
        options = Options()
        options.parent = {}
        options._choose_log_format(load_config('[server]\nlog_level = "error"\n'))
        self.assertEqual(logs.level_filter.logLevelForNamespace("shellserver"),
                         LogLevel.error)

    def test_bad_level_names_the_key(self):
        """An unknown log_level is refused, naming server.log_level."""
        with self.assertRaises(ConfigError) as caught:
            load_config('[server]\nlog_level = "verbose"\n')
        self.assertIn("server.log_level", str(caught.exception))
