"""Tests for shellserver.scope: when the server moves into a delegated scope, and how."""

import io

from twisted.trial.unittest import SynchronousTestCase

import shellserver.scope
from shellserver.scope import MARKER, move_reason, reexec_in_scope, scope_command, unit_name

SESSION = "/sys/fs/cgroup/user.slice/user-0.slice/session-3.scope"
UNIT = "/sys/fs/cgroup/system.slice/shellserver.service"
WITHOUT_CPU = ("memory", "pids")
ALL = ("cpuset", "cpu", "io", "memory", "pids")


def reason(**facts):
    arguments = dict(v2_controllers=True, own_cgroup=SESSION, available=WITHOUT_CPU,
                     environ={}, systemd_running=True)
    arguments.update(facts)
    return move_reason(**arguments)


class MoveReasonTests(SynchronousTestCase):
    """move_reason: the decision, from layout facts, environment and systemd."""

    def test_login_scope_without_cpu_moves(self):
        """A login's scope without the cpu controller on a systemd host moves,
        naming the file and what it lacks."""
        self.assertEqual(reason(), f"{SESSION}/cgroup.controllers offers memory pids, "
                                   "without cpu")

    def test_no_controllers_at_all(self):
        """A cgroup offering nothing says so."""
        self.assertIn("offers no controllers, without memory, pids, cpu",
                      reason(available=()))

    def test_all_controllers_stay(self):
        """A cgroup offering memory, pids and cpu needs no move."""
        self.assertIsNone(reason(available=ALL))

    def test_hybrid_layout_stays(self):
        """The hybrid layout (v1 controllers) never moves."""
        self.assertIsNone(reason(v2_controllers=False))

    def test_without_systemd_stays(self):
        """Without systemd as PID 1 there is nobody to ask for a scope."""
        self.assertIsNone(reason(systemd_running=False))

    def test_marker_stays(self):
        """Once re-executed (the marker set) it never tries again."""
        self.assertIsNone(reason(environ={MARKER: "1"}))

    def test_own_service_unit_stays(self):
        """Run by a service unit lacking Delegate=yes, it stays (and refuses)."""
        self.assertIsNone(reason(own_cgroup=UNIT, environ={"INVOCATION_ID": "ab12"}))
        self.assertIsNone(reason(own_cgroup=UNIT + "/server",
                                 environ={"INVOCATION_ID": "ab12"}))

    def test_scope_with_invocation_id_moves(self):
        """A scope started by systemd-run (which sets INVOCATION_ID) still moves."""
        self.assertIsNotNone(reason(own_cgroup="/sys/fs/cgroup/system.slice/run-u7.scope",
                                    environ={"INVOCATION_ID": "ab12"}))

    def test_service_cgroup_without_invocation_id_moves(self):
        """A shell in sshd's service cgroup (no logind) is not a unit's start: it moves."""
        self.assertIsNotNone(reason(own_cgroup="/sys/fs/cgroup/system.slice/ssh.service"))

    def test_unknown_own_cgroup_stays(self):
        """Without a known own cgroup there is nothing to decide on."""
        self.assertIsNone(reason(own_cgroup=None))


class CommandTests(SynchronousTestCase):
    """The systemd-run command line and the one exec."""

    def test_scope_command(self):
        """The same argv runs after systemd-run's delegated, collected scope options."""
        self.assertEqual(
            scope_command("/usr/bin/systemd-run", unit_name("i0123456789ab", 42),
                          ["/venv/bin/python", "/venv/bin/twistd", "-n", "shellserver"]),
            ["/usr/bin/systemd-run", "--scope", "-p", "Delegate=yes", "--quiet", "--collect",
             "--unit=shellserver-i0123456789ab-42", "--",
             "/venv/bin/python", "/venv/bin/twistd", "-n", "shellserver"])

    def test_execs_with_marker_and_says_so(self):
        """The exec gets the command, the environment with the marker, and one line
        tells the operator about the move."""
        calls = []
        stream = io.StringIO()
        result = reexec_in_scope("why", "iabc", environ={"PATH": "/usr/bin:/bin", "A": "b"},
                                 pid=7, argv=["/p", "x"], stream=stream,
                                 execve=lambda *call: calls.append(call))
        self.assertIsNone(result)
        ((path, argv, environ),) = calls
        self.assertTrue(path.endswith("/systemd-run"), path)
        self.assertEqual(argv[-3:], ["--", "/p", "x"])
        self.assertIn("--unit=shellserver-iabc-7", argv)
        self.assertEqual(environ, {"PATH": "/usr/bin:/bin", "A": "b", MARKER: "1"})
        self.assertEqual(stream.getvalue(),
                         "shellserver: why: moving into a delegated scope, "
                         "shellserver-iabc-7.scope (systemd-run --scope -p Delegate=yes)\n")

    def test_exec_failure_is_returned(self):
        """A failing exec returns why, so that the caller refuses as before."""
        def execve(*call):
            raise PermissionError(13, "Permission denied")

        result = reexec_in_scope("why", "iabc", environ={"PATH": "/usr/bin:/bin"}, pid=7,
                                 argv=["/p"], stream=io.StringIO(), execve=execve)
        self.assertRegex(result, r"^cannot run .*systemd-run: Permission denied$")

    def test_missing_systemd_run_is_returned(self):
        """Without systemd-run nothing is exec'd and the reason comes back."""
        self.patch(shellserver.scope, "FALLBACK_PATH", "/nonexistent")
        calls = []
        result = reexec_in_scope("why", "iabc", environ={"PATH": "/nonexistent"}, pid=7,
                                 argv=["/p"], stream=io.StringIO(),
                                 execve=lambda *call: calls.append(call))
        self.assertEqual(calls, [])
        self.assertIn("systemd-run is not installed", result)
