"""Tests for shellserver.sandbox.spec: the pure sandbox spec and its JSON form."""

import ast
import json
import os
from unittest import mock

from twisted.trial.unittest import SynchronousTestCase

from shellserver.sandbox.cgroups import CgroupLayout
from shellserver.sandbox.service import LAUNCHER
from shellserver.sandbox.spec import CONSOLE_HOME, SandboxLimits, build_spec

MIB = 1024 * 1024
# Distinct values, so a limit landing in the wrong place shows.
LIMITS = SandboxLimits(
    memory_bytes=256 * MIB,
    pids_max=61,
    cpu_shares=300,
    cpu_quota=0.5,
    tmp_bytes=64 * MIB,
    home_bytes=32 * MIB,
    max_open_files=257,
    max_file_bytes=33 * MIB,
    max_processes=65,
    max_ptys=9,
)
RUNTIME = "/var/lib/shellserver/runtime"
ROOT = "/var/lib/shellserver/sandbox-root"
LAYOUT = CgroupLayout(
    memory=None,
    pids=None,
    cpu=None,
    unified="/sys/fs/cgroup/system.slice/shellserver.service/shellserver",
    v2_controllers=True,
)


def spec(uid=200042, session="s0123456789abcdef", layout=LAYOUT, **kwargs):
    return build_spec(
        session=session,
        uid=uid,
        limits=LIMITS,
        runtime=RUNTIME,
        root=ROOT,
        cgroup_layout=layout,
        **kwargs,
    )


def launcher_keys():
    """The keys launcher.py reads from the spec, a tmpfs entry, a cgroup and /dev.

    Collected from its source, so a key the launcher starts to read and
    to_json() does not write fails the test.
    """
    with open(LAUNCHER, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    keys = {"spec": set(), "tmpfs": set(), "group": set(), "devices": set()}
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Subscript)
            and isinstance(node.value, ast.Name)
            and isinstance(node.slice, ast.Constant)
            and isinstance(node.slice.value, str)
        ):
            name = {"g": "group"}.get(node.value.id, node.value.id)
            if name in keys:
                keys[name].add(node.slice.value)
    return keys


class BuildSpecTests(SynchronousTestCase):
    def test_deterministic(self):
        """The same inputs give equal specs and identical JSON."""
        self.assertEqual(spec(), spec())
        self.assertEqual(spec().to_json(), spec().to_json())

    def test_inputs_matter(self):
        """Another uid or session gives another spec."""
        self.assertNotEqual(spec(uid=200001), spec(uid=200002))
        self.assertNotEqual(spec(session="sa"), spec(session="sb"))

    def test_gid_is_uid(self):
        """The console's gid equals its uid."""
        built = spec(uid=200077)
        self.assertEqual((built.uid, built.gid), (200077, 200077))

    def test_read_only_binds(self):
        """/usr and the runtime are bound read-only, plus any extra binds."""
        built = spec(extra_binds=("/opt/data",))
        self.assertEqual(built.read_only_binds, ("/usr", RUNTIME, "/opt/data"))

    def test_tmpfs(self):
        """/tmp is 1777 and home is 0700 and owned, each with its configured size and
        an inode cap of one per 8 KiB."""
        tmpfs = {t["path"]: dict(t) for t in spec().tmpfs}
        self.assertEqual(
            tmpfs["/tmp"], {"path": "/tmp", "bytes": LIMITS.tmp_bytes, "mode": "1777",
                            "inodes": max(1024, LIMITS.tmp_bytes // 8192)}
        )
        self.assertEqual(
            tmpfs[CONSOLE_HOME],
            {"path": CONSOLE_HOME, "bytes": LIMITS.home_bytes, "mode": "0700",
             "inodes": max(1024, LIMITS.home_bytes // 8192), "owned": True},
        )
        self.assertEqual(spec().cwd, CONSOLE_HOME)

    def test_dev_bounds_host_pools(self):
        """/dev gets the configured PTY cap for its devpts, and a /dev/shm capped
        in bytes (8 MiB) and inodes (one per 8 KiB, at least 1024)."""
        self.assertEqual(spec().dev, {"pts_max": 9, "shm_bytes": 8 * MIB,
                                      "shm_inodes": 1024})

    def test_max_ptys_from_config(self):
        """sandbox.max_ptys reaches the limits; its default is 8."""
        from shellserver.config import SandboxConfig

        self.assertEqual(SandboxLimits.from_config(SandboxConfig(max_ptys=3)).max_ptys, 3)
        self.assertEqual(SandboxLimits.from_config(SandboxConfig()).max_ptys, 8)

    def test_rlimits(self):
        """NOFILE, FSIZE and NPROC come from the limits; no core files."""
        self.assertEqual(
            dict(spec().rlimits),
            {
                "NOFILE": (LIMITS.max_open_files, LIMITS.max_open_files),
                "FSIZE": (LIMITS.max_file_bytes, LIMITS.max_file_bytes),
                "NPROC": (LIMITS.max_processes, LIMITS.max_processes),
                "CORE": (0, 0),
            },
        )

    def test_passwd_names_console_user(self):
        """/etc/passwd names the console user with the session's uid and gid."""
        lines = spec(uid=200123).etc["passwd"].splitlines()
        console = [line.split(":") for line in lines if line.startswith("console:")]
        self.assertEqual(len(console), 1)
        self.assertEqual(console[0][2:4], ["200123", "200123"])
        self.assertEqual(console[0][5], CONSOLE_HOME)

    def test_passwd_has_no_host_users(self):
        """The synthetic /etc/passwd and /etc/group have no root or other host user."""
        etc = spec().etc
        users = {line.split(":")[0] for line in etc["passwd"].splitlines()}
        groups = {line.split(":")[0] for line in etc["group"].splitlines()}
        self.assertEqual(users, {"console", "nobody"})
        self.assertEqual(groups, {"console", "nogroup"})
        self.assertNotIn(":0:", etc["passwd"])

    def test_env_ignores_server_environment(self):
        """The console's env is the same whatever the server's environment holds."""
        with mock.patch.dict(os.environ, {}, clear=True):
            clean = spec()
        hostile = {"SHELLSERVER_LEAK": "secret-value", "HOME": "/root",
                   "PATH": "/leaked/bin", "PYTHONPATH": "/leaked/lib"}
        with mock.patch.dict(os.environ, hostile, clear=True):
            built = spec()
        self.assertEqual(built.env, clean.env)
        self.assertNotIn("SHELLSERVER_LEAK", built.env)
        self.assertNotIn("PYTHONPATH", built.env)
        self.assertNotIn("secret-value", built.to_json())
        self.assertNotIn("/leaked", built.to_json())

    def test_env_values(self):
        """HOME, TERM, LANG and PROMPT_TOOLKIT_NO_CPR are set for the console."""
        env = spec().env
        self.assertEqual(env["HOME"], CONSOLE_HOME)
        self.assertEqual(env["TERM"], "xterm-256color")
        self.assertEqual(env["LANG"], "C.UTF-8")
        self.assertEqual(env["PROMPT_TOOLKIT_NO_CPR"], "1")
        self.assertTrue(env["PATH"].startswith(f"{RUNTIME}/bin:"))

    def test_argv_runs_ipython_from_runtime(self):
        """argv runs IPython with the runtime's python in isolated mode."""
        argv = spec().argv
        self.assertEqual(argv[:4], (f"{RUNTIME}/bin/python", "-I", "-m", "IPython"))

    def test_waiter_is_the_runtimes(self):
        """The launcher and init exec the runtime's waiter, named in the JSON."""
        built = spec()
        self.assertEqual(built.waiter, f"{RUNTIME}/libexec/shellserver-waiter")
        self.assertEqual(json.loads(built.to_json())["waiter"], built.waiter)

    def test_cgroups_from_layout(self):
        """The session's cgroups are the layout's, named after the session."""
        built = spec(session="sfeed")
        self.assertEqual(built.cgroups, LAYOUT.session_groups("sfeed", LIMITS))
        self.assertEqual(built.cgroups[0].path, LAYOUT.unified + "/sfeed")

    def test_no_layout_no_cgroups(self):
        """Without a cgroup layout the spec has no cgroups."""
        self.assertEqual(spec(layout=None).cgroups, ())


class ToJsonTests(SynchronousTestCase):
    def test_round_trip(self):
        """to_json() parses back to the spec's values."""
        built = spec()
        document = json.loads(built.to_json())
        self.assertEqual(document["uid"], built.uid)
        self.assertEqual(document["gid"], built.gid)
        self.assertEqual(document["root"], ROOT)
        self.assertEqual(tuple(document["argv"]), built.argv)
        self.assertEqual(document["env"], dict(built.env))
        self.assertEqual(tuple(document["read_only_binds"]), built.read_only_binds)
        self.assertEqual(document["etc"], dict(built.etc))
        self.assertEqual(
            {k: tuple(v) for k, v in document["rlimits"].items()}, dict(built.rlimits)
        )
        self.assertEqual(
            document["cgroups"],
            [{"path": g.path, "limits": dict(g.limits)} for g in built.cgroups],
        )

    def test_has_every_key_the_launcher_reads(self):
        """Every key launcher.py reads from spec, tmpfs and group is in the JSON."""
        keys = launcher_keys()
        # The collector itself must have found the launcher's reads.
        self.assertIn("argv", keys["spec"])
        self.assertTrue(keys["tmpfs"])
        self.assertTrue(keys["group"])
        document = json.loads(spec().to_json())
        self.assertEqual(keys["spec"] - set(document), set())
        for entry in document["tmpfs"]:
            self.assertEqual(keys["tmpfs"] - set(entry), set())
        self.assertTrue(document["cgroups"])
        for group in document["cgroups"]:
            self.assertEqual(keys["group"] - set(group), set())
        self.assertTrue(keys["devices"])
        self.assertEqual(keys["devices"] - set(document["dev"]), set())

    def test_values_have_launcher_types(self):
        """rlimits are [soft, hard] pairs and cgroup limits are strings, as written."""
        document = json.loads(spec().to_json())
        for pair in document["rlimits"].values():
            self.assertEqual(len(pair), 2)
            self.assertTrue(all(isinstance(v, int) for v in pair))
        for group in document["cgroups"]:
            self.assertTrue(all(isinstance(v, str) for v in group["limits"].values()))


class SharedTreeTests(SynchronousTestCase):
    def test_overlay_refuses_special_paths_before_mounting(self):
        """A shared tree whose path overlayfs would misread (``:``, ``,``, ``\\``)
        is refused with a message naming it, before any mount is tried."""
        import importlib.util

        module_spec = importlib.util.spec_from_file_location("launcher_under_test", LAUNCHER)
        launcher = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(launcher)
        mounts = []
        self.patch(launcher, "mount", lambda *args: mounts.append(args))
        for path in ("/srv/run:time", "/srv/run,time", "/srv/run\\time"):
            with self.assertRaises(launcher.SetupError) as caught:
                launcher.mount_shared_tree(path, "/root" + path)
            self.assertIn(repr(path), str(caught.exception))
        self.assertEqual(mounts, [])
        launcher.mount_shared_tree("/usr", "/root/usr")
        self.assertEqual(mounts, [("overlay", "/root/usr", "overlay",
                                   launcher.MS_RDONLY | launcher.MS_NOSUID | launcher.MS_NODEV,
                                   "lowerdir=/usr:/root/usr")])

    def test_start_up_knows_the_same_characters(self):
        """The server's start-up check refuses the characters the launcher does,
        naming the setting and the path."""
        import importlib.util

        from shellserver.sandbox.runtime import (
            OVERLAY_SPECIAL,
            RuntimeProblem,
            check_overlay_path,
        )

        module_spec = importlib.util.spec_from_file_location("launcher_chars", LAUNCHER)
        launcher = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(launcher)
        self.assertEqual(OVERLAY_SPECIAL, launcher.OVERLAY_SPECIAL)
        with self.assertRaises(RuntimeProblem) as caught:
            check_overlay_path("sandbox.runtime", "/srv/a:b")
        self.assertIn("sandbox.runtime '/srv/a:b' cannot be mounted", str(caught.exception))
        check_overlay_path("sandbox.runtime", "/var/lib/shellserver/runtime")
