"""Tests for shellserver.tap's options and host checks, and the twistd plugin."""

import os
import shutil
import tempfile

from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

import shellserver.sandbox.cgroups
from shellserver import tap
from shellserver.config import Config, load_config
from shellserver.sandbox.cgroups import CgroupError, CgroupLayout
from shellserver.tap import Options, check_host

LAYOUT = CgroupLayout(memory=None, pids=None, cpu=None, unified="/cg/shellserver",
                      v2_controllers=True)


class OptionsTestCase(SynchronousTestCase):
    def setUp(self):
        self.checked = []
        self.prepared = []
        self.patch(tap, "check_host", self.checked.append)
        self.patch(tap, "prepare_state",
                   lambda config, need_tls: self.prepared.append((config, need_tls)))
        self.patch(tap, "plan_connections",
                   lambda config: tap.ConnectionPlan(10, config.server.max_connections, ()))

    def parse(self, *argv):
        options = Options()
        options.parseOptions(list(argv))
        return options

    def config_file(self, text):
        directory = tempfile.mkdtemp(prefix="shellserver-tap-")
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, "shellserver.toml")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path


class OptionsTests(OptionsTestCase):
    def test_defaults(self):
        """Without options: no listeners, the default configuration, host checked."""
        options = self.parse()
        self.assertEqual(options["listen"], [])
        self.assertEqual(options["configuration"], Config.defaults())
        self.assertEqual(self.checked, [options["configuration"]])

    def test_listen_repeatable(self):
        """--listen and -l accumulate, in order."""
        options = self.parse("--listen", "tcp:8080", "-l", "tcp:8081:interface=127.0.0.1",
                             "--listen", "unix:/run/shellserver.sock")
        self.assertEqual(
            options["listen"],
            ["tcp:8080", "tcp:8081:interface=127.0.0.1", "unix:/run/shellserver.sock"],
        )

    def test_listen_lists_are_per_instance(self):
        """One Options' listeners do not leak into another's."""
        self.parse("--listen", "tcp:8080")
        self.assertEqual(self.parse()["listen"], [])

    def test_bad_endpoint(self):
        """An endpoint string Twisted cannot parse is a UsageError naming it."""
        with self.assertRaises(UsageError) as caught:
            self.parse("--listen", "tcp:8080", "--listen", "nosuchthing:8443")
        self.assertIn("--listen 'nosuchthing:8443'", str(caught.exception))
        self.assertEqual(self.checked, [])

    def test_ssl_listen_without_key_files(self):
        """ssl: without its PEM files is a UsageError naming the file and the fix."""
        missing = os.path.join(tempfile.gettempdir(), "shellserver-no-such-dir", "key.pem")
        for description, name in [(f"ssl:8443:privateKey={missing}", missing),
                                  ("ssl:8443", "server.pem")]:
            with self.assertRaises(UsageError) as caught:
                self.parse("--listen", description)
            message = str(caught.exception)
            self.assertIn(f"--listen {description!r}: cannot read ", message)
            self.assertIn(name, message)
            self.assertIn("privateKey=KEY.pem and certKey=CERT.pem", message)
        self.assertEqual(self.checked, [])

    def test_bad_config(self):
        """An invalid configuration file is a UsageError naming the key."""
        path = self.config_file("[console]\nidle_timeout = -3\n")
        with self.assertRaises(UsageError) as caught:
            self.parse("--config", path)
        message = str(caught.exception)
        self.assertTrue(message.startswith("configuration: "), message)
        self.assertIn("console.idle_timeout", message)

    def test_unreadable_config(self):
        """A configuration file that cannot be read is a UsageError naming it."""
        path = os.path.join(tempfile.gettempdir(), "shellserver-no-such-dir", "x.toml")
        with self.assertRaises(UsageError) as caught:
            self.parse("-c", path)
        self.assertTrue(str(caught.exception).startswith("configuration: "))
        self.assertIn(path, str(caught.exception))

    def test_config_file(self):
        """Values from the configuration file are used."""
        path = self.config_file('[server]\nstate_dir = "/srv/from-file"\n'
                                "[console]\nidle_timeout = 42\n")
        config = self.parse("--config", path)["configuration"]
        self.assertEqual(config.server.state_dir, "/srv/from-file")
        self.assertEqual(config.console.idle_timeout, 42)

    def test_state_dir_overrides_file(self):
        """--state-dir beats server.state_dir from the file, keeping the rest."""
        path = self.config_file('[server]\nstate_dir = "/srv/from-file"\n'
                                "[console]\nidle_timeout = 42\n")
        config = self.parse("--config", path, "--state-dir", "/srv/from-flag")[
            "configuration"]
        self.assertEqual(config.server.state_dir, "/srv/from-flag")
        self.assertEqual(config.console.idle_timeout, 42)

    def test_relative_state_dir(self):
        """A relative --state-dir is made absolute."""
        options = self.parse("--state-dir", "relative/state")
        expected = os.path.abspath("relative/state")
        self.assertEqual(options["state-dir"], expected)
        self.assertEqual(options["configuration"].server.state_dir, expected)


class PrepareTests(OptionsTestCase):
    def test_prepared_after_checks(self):
        """Options prepare the state directory, with TLS only when nothing is listed."""
        self.parse()
        self.parse("--listen", "tcp:8080")
        self.assertEqual([need for _, need in self.prepared], [True, False])
        self.assertEqual(len(self.checked), 2)


class ConnectionBudgetTests(SynchronousTestCase):
    def test_fits(self):
        """When the connections fit beside the consoles, the cap is kept."""
        self.assertEqual(tap.connection_budget(4096, 76, 65536), (4096, []))
        needed = 4096 + tap.FILES_RESERVED + tap.FILES_PER_CONSOLE * 76
        self.assertEqual(tap.connection_budget(4096, 76, needed), (4096, []))

    def test_lowered(self):
        """Too few files: the cap is what fits, with a notice saying why."""
        cap, notices = tap.connection_budget(4096, 10, 1000)
        self.assertEqual(cap, 1000 - tap.FILES_RESERVED - 10 * tap.FILES_PER_CONSOLE)
        self.assertEqual(len(notices), 1)
        self.assertIn(f"lowered from 4096 to {cap}", notices[0])
        self.assertIn("only 1000 files", notices[0])

    def test_too_few(self):
        """Not even a few connections fit: an error naming the limit."""
        with self.assertRaises(ValueError) as caught:
            tap.connection_budget(4096, 100, 500)
        self.assertIn("only 500 files", str(caught.exception))
        self.assertIn("LimitNOFILE", str(caught.exception))

    def test_plan_is_a_usage_error(self):
        """At start-up the error stops twistd as a usage error."""
        self.patch(tap, "raise_open_files_limit", lambda: 300)
        self.patch(tap, "admission_capacity", lambda config: 20)
        self.patch(tap, "fit_host_pools_to", lambda config, capacity: (capacity, []))
        with self.assertRaises(UsageError) as caught:
            tap.plan_connections(Config())
        self.assertIn("only 300 files", str(caught.exception))

    def test_plan_takes_the_host_pools_capacity(self):
        """A capacity lowered to fit the host's kernel pools is the plan's, with
        the pools' notice first."""
        self.patch(tap, "raise_open_files_limit", lambda: 100000)
        self.patch(tap, "admission_capacity", lambda config: 10)
        self.patch(tap, "fit_host_pools_to", lambda config, capacity: (4, ["pty notice"]))
        plan = tap.plan_connections(Config())
        self.assertEqual((plan.capacity, plan.notices), (4, ("pty notice",)))

    def test_plan_uses_the_capacity(self):
        self.patch(tap, "raise_open_files_limit", lambda: 1000)
        self.patch(tap, "admission_capacity", lambda config: 10)
        self.patch(tap, "fit_host_pools_to", lambda config, capacity: (capacity, []))
        plan = tap.plan_connections(Config())
        self.assertEqual(plan.capacity, 10)
        self.assertEqual(plan.max_connections,
                         1000 - tap.FILES_RESERVED - 10 * tap.FILES_PER_CONSOLE)
        self.assertEqual(len(plan.notices), 1)


class InstanceNameTests(SynchronousTestCase):
    def test_per_state_dir(self):
        """Each state directory gets its own stable cgroup directory name."""
        a = tap.instance_name("/var/lib/shellserver")
        self.assertEqual(a, tap.instance_name("/var/lib/shellserver"))
        self.assertNotEqual(a, tap.instance_name("/srv/other"))
        self.assertRegex(a, r"^i[0-9a-f]{12}$")


class CheckHostTests(SynchronousTestCase):
    """check_host with the system calls it makes replaced."""

    def setUp(self):
        self.patch(os, "geteuid", lambda: 0)
        self.patch(os, "access", lambda path, mode: True)
        self.patch(shellserver.sandbox.cgroups, "read_layout", lambda: LAYOUT)
        self.patch(tap, "NAMESPACES", ())

    def test_all_present(self):
        """As root with namespaces, cgroups and the system python, the check passes."""
        self.assertIsNone(check_host(Config.defaults()))

    def test_non_root(self):
        """Not being root is a UsageError that says root is needed."""
        self.patch(os, "geteuid", lambda: 1000)
        with self.assertRaises(UsageError) as caught:
            check_host(Config.defaults())
        self.assertIn("must run as root", str(caught.exception))

    def test_non_root_from_options(self):
        """parseOptions runs the host check: non-root fails there."""
        self.patch(os, "geteuid", lambda: 1000)
        with self.assertRaises(UsageError) as caught:
            Options().parseOptions([])
        self.assertIn("root", str(caught.exception))

    def test_missing_namespace(self):
        """A kernel without a needed namespace is a UsageError naming it."""
        self.patch(tap, "NAMESPACES", ("mnt", "cgroup"))
        self.patch(os.path, "exists", lambda path: not path.endswith("/cgroup"))
        with self.assertRaises(UsageError) as caught:
            check_host(Config.defaults())
        self.assertIn("namespaces the sandbox needs: cgroup", str(caught.exception))

    def test_cgroups(self):
        """A host without usable cgroups is a UsageError with the reason."""

        def read_layout():
            raise CgroupError("no cgroup2 hierarchy is mounted")

        self.patch(shellserver.sandbox.cgroups, "read_layout", read_layout)
        with self.assertRaises(UsageError) as caught:
            check_host(Config.defaults())
        self.assertEqual(str(caught.exception),
                         "cgroups: no cgroup2 hierarchy is mounted")

    def test_missing_system_python(self):
        """A missing system python is a UsageError naming sandbox.system_python."""
        checked = []

        def access(path, mode):
            checked.append((path, mode))
            return False

        self.patch(os, "access", access)
        config = load_config('[sandbox]\nsystem_python = "/opt/none/bin/python3"\n')
        with self.assertRaises(UsageError) as caught:
            check_host(config)
        message = str(caught.exception)
        self.assertTrue(message.startswith("sandbox.system_python: "), message)
        self.assertIn("/opt/none/bin/python3", message)
        self.assertEqual(checked, [("/opt/none/bin/python3", os.X_OK)])


class PluginTests(SynchronousTestCase):
    def test_discoverable(self):
        """twistd finds the shellserver plugin, and it uses shellserver.tap."""
        makers = [m for m in getPlugins(IServiceMaker) if m.tapname == "shellserver"]
        self.assertEqual(len(makers), 1)
        self.assertIs(makers[0].options, Options)
        self.assertIs(makers[0].makeService, tap.makeService)


class OverlayPathTests(SynchronousTestCase):
    def test_state_dir_overlayfs_cannot_take(self):
        """A state directory with a ':' (the sandbox root is in it) stops start-up
        with a usage error naming it, before anything is made."""
        config = Config().with_state_dir("/nonexistent/state:dir")
        with self.assertRaises(UsageError) as caught:
            tap.prepare_state(config, need_tls=False)
        self.assertIn("'/nonexistent/state:dir", str(caught.exception))
        self.assertIn("cannot be mounted in sandboxes", str(caught.exception))
        self.assertFalse(os.path.exists("/nonexistent"))


class HostRefusalTests(OptionsTestCase):
    def test_refusal_exits_with_its_own_status(self):
        """A host refusal at start-up exits with EXIT_HOST_REFUSED (which the unit does
        not restart on) and one line naming the cause, not a usage text."""
        from io import StringIO

        from shellserver.startup import EXIT_HOST_REFUSED, HostRefusal

        def refuse(config, need_tls):
            raise HostRefusal("cgroups: /cg/cgroup.controllers offers no controllers")

        self.patch(tap, "prepare_state", refuse)
        stderr = StringIO()
        self.patch(tap.sys, "stderr", stderr)
        with self.assertRaises(SystemExit) as caught:
            self.parse()
        self.assertEqual(caught.exception.code, EXIT_HOST_REFUSED)
        self.assertEqual(stderr.getvalue(), "shellserver: cannot start: cgroups: "
                         "/cg/cgroup.controllers offers no controllers\n")

    def test_unit_does_not_restart_on_refusal(self):
        """etc/shellserver.service lists EXIT_HOST_REFUSED in RestartPreventExitStatus=."""
        from shellserver.startup import EXIT_HOST_REFUSED

        unit = os.path.join(os.path.dirname(tap.DEFAULT_WEB_DIR), "etc", "shellserver.service")
        with open(unit) as f:
            lines = [line.strip() for line in f]
        self.assertIn(f"RestartPreventExitStatus={EXIT_HOST_REFUSED}", lines)


class ConsoleSettingsTests(SynchronousTestCase):
    def test_reattach_grace_cut_to_max_age(self):
        """A reattach grace longer than max_age is cut to it; 0 max_age leaves it."""
        from attrs import evolve

        config = Config()
        short = evolve(config, console=evolve(config.console, max_age=30.0))
        self.assertEqual(tap.console_settings_of(short).reattach_grace, 30.0)
        never = evolve(config, console=evolve(config.console, max_age=0.0))
        self.assertEqual(tap.console_settings_of(never).reattach_grace, 60.0)
