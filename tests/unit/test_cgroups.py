"""Tests for shellserver.sandbox.cgroups: layout parsing, session groups, the reaper."""

import errno
import os

import attrs
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from shellserver.sandbox.cgroups import (
    CPU_PERIOD_US,
    CgroupError,
    CgroupGroup,
    CgroupLayout,
    CgroupReaper,
    parse_layout,
    prepare_parents,
)
from shellserver.sandbox.spec import SandboxLimits
from shellserver.testing import FakeCgroupTree

# A hybrid host: cgroup v1 controllers plus a controller-less cgroup2 mount.
HYBRID_MOUNTINFO = """\
22 1 0:21 / / rw,relatime - overlay overlay rw,lowerdir=/a,upperdir=/b,workdir=/c
30 22 0:27 / /proc rw,nosuid,nodev,noexec,relatime - proc proc rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
36 31 0:33 / /sys/fs/cgroup/devices rw,relatime - cgroup cgroup rw,devices
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
38 31 0:35 / /sys/fs/cgroup/blkio rw,relatime - cgroup cgroup rw,blkio
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
HYBRID_SELF_CGROUP = """\
9:name=systemd:/
8:pids:/
7:blkio:/
6:freezer:/
5:devices:/
4:memory:/process_api/6a318ce842b0f3cb5407c9dc98ed2365
3:cpuset:/
2:cpuacct:/
1:cpu:/
0::/
"""

# A systemd host with only cgroup v2, the server in its own service's cgroup.
UNIFIED_MOUNTINFO = """\
24 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw,errors=remount-ro
27 22 0:23 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 \
cgroup2 rw,nsdelegate,memory_recursiveprot
"""
UNIFIED_SELF_CGROUP = "0::/system.slice/shellserver.service\n"

# A container that sees only its own cgroups, mounted read-write at the
# usual mount points (mount root /docker/ID), with cpu and cpuacct together.
CONTAINER_ID = "/docker/3f2a"
CONTAINER_MOUNTINFO = f"""\
41 40 0:40 {CONTAINER_ID} /sys/fs/cgroup/cpu,cpuacct rw,nosuid - cgroup cgroup \
rw,cpu,cpuacct
42 40 0:41 {CONTAINER_ID} /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory
43 40 0:42 {CONTAINER_ID} /sys/fs/cgroup/pids rw,nosuid - cgroup cgroup rw,pids
44 40 0:43 {CONTAINER_ID} /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw
"""
CONTAINER_SELF_CGROUP = f"""\
5:pids:{CONTAINER_ID}
4:memory:{CONTAINER_ID}
3:cpu,cpuacct:{CONTAINER_ID}
0::{CONTAINER_ID}
"""

MIB = 1024 * 1024
LIMITS = SandboxLimits(
    memory_bytes=256 * MIB,
    pids_max=61,
    cpu_shares=512,
    cpu_quota=0.5,
    tmp_bytes=64 * MIB,
    home_bytes=32 * MIB,
    max_open_files=256,
    max_file_bytes=32 * MIB,
    max_processes=64,
)


class ParseLayoutTests(SynchronousTestCase):
    def test_hybrid(self):
        """On a hybrid host each v1 controller and cgroup2 get a parent."""
        layout = parse_layout(HYBRID_MOUNTINFO, HYBRID_SELF_CGROUP)
        self.assertEqual(
            layout,
            CgroupLayout(
                memory="/sys/fs/cgroup/memory/process_api/"
                "6a318ce842b0f3cb5407c9dc98ed2365/shellserver",
                pids="/sys/fs/cgroup/pids/shellserver",
                cpu="/sys/fs/cgroup/cpu/shellserver",
                unified="/sys/fs/cgroup/unified/shellserver",
                v2_controllers=False,
                own="/sys/fs/cgroup/unified",
            ),
        )

    def test_unified(self):
        """On a cgroup v2 host there is one parent, under the server's own cgroup."""
        layout = parse_layout(UNIFIED_MOUNTINFO, UNIFIED_SELF_CGROUP)
        self.assertEqual(
            layout,
            CgroupLayout(
                memory=None,
                pids=None,
                cpu=None,
                unified="/sys/fs/cgroup/system.slice/shellserver.service/shellserver",
                v2_controllers=True,
                own="/sys/fs/cgroup/system.slice/shellserver.service",
            ),
        )
        self.assertEqual(layout.parents(), (layout.unified,))

    def test_container_mount_root(self):
        """A hierarchy mounted from the server's own cgroup is not joined twice."""
        layout = parse_layout(CONTAINER_MOUNTINFO, CONTAINER_SELF_CGROUP)
        self.assertEqual(layout.memory, "/sys/fs/cgroup/memory/shellserver")
        self.assertEqual(layout.pids, "/sys/fs/cgroup/pids/shellserver")
        self.assertEqual(layout.cpu, "/sys/fs/cgroup/cpu,cpuacct/shellserver")
        self.assertEqual(layout.unified, "/sys/fs/cgroup/unified/shellserver")

    def test_no_cgroup2(self):
        """Without a cgroup2 mount parsing fails, naming cgroup2."""
        mountinfo = "".join(
            line + "\n"
            for line in HYBRID_MOUNTINFO.splitlines()
            if "cgroup2" not in line
        )
        with self.assertRaises(CgroupError) as caught:
            parse_layout(mountinfo, HYBRID_SELF_CGROUP)
        self.assertIn("no cgroup2 hierarchy", str(caught.exception))

    def test_missing_controller(self):
        """A hybrid host without the pids controller fails, naming the controllers."""
        mountinfo = "".join(
            line + "\n"
            for line in HYBRID_MOUNTINFO.splitlines()
            if not line.endswith("rw,pids")
        )
        with self.assertRaises(CgroupError) as caught:
            parse_layout(mountinfo, HYBRID_SELF_CGROUP)
        self.assertIn("memory, pids and cpu", str(caught.exception))

    def test_missing_own_cgroup2_path(self):
        """A /proc/self/cgroup without the 0:: line fails, naming it."""
        self_cgroup = HYBRID_SELF_CGROUP.replace("0::/\n", "")
        with self.assertRaises(CgroupError) as caught:
            parse_layout(HYBRID_MOUNTINFO, self_cgroup)
        self.assertIn("cgroup2 path", str(caught.exception))


class SessionGroupsTests(SynchronousTestCase):
    def test_v1_groups(self):
        """Hybrid: memory, pids and cpu groups with v1 limits, cgroup2 last."""
        layout = parse_layout(HYBRID_MOUNTINFO, HYBRID_SELF_CGROUP)
        groups = layout.session_groups("sabc", LIMITS)
        self.assertEqual(
            groups,
            (
                CgroupGroup(layout.memory + "/sabc",
                            {"memory.limit_in_bytes": str(256 * MIB)}),
                CgroupGroup(layout.pids + "/sabc", {"pids.max": "61"}),
                CgroupGroup(
                    layout.cpu + "/sabc",
                    {"cpu.shares": "512", "cpu.cfs_period_us": "100000",
                     "cpu.cfs_quota_us": "50000"},
                ),
                CgroupGroup(layout.unified + "/sabc", {}),
            ),
        )

    def test_v2_group(self):
        """Unified: one group with memory, pids and cpu limits in v2 files."""
        layout = parse_layout(UNIFIED_MOUNTINFO, UNIFIED_SELF_CGROUP)
        (group,) = layout.session_groups("sabc", LIMITS)
        self.assertEqual(group.path, layout.unified + "/sabc")
        self.assertEqual(
            dict(group.limits),
            {
                "memory.max": str(256 * MIB),
                "memory.swap.max": "0",
                "pids.max": "61",
                "cpu.weight": "50",
                "cpu.max": "50000 100000",
            },
        )

    def test_cpu_quota_scales_with_period(self):
        """A quota of 1.5 CPUs is 150000us per period."""
        layout = parse_layout(UNIFIED_MOUNTINFO, UNIFIED_SELF_CGROUP)
        limits = attrs.evolve(LIMITS, cpu_quota=1.5)
        (group,) = layout.session_groups("s", limits)
        self.assertEqual(group.limits["cpu.max"], f"150000 {CPU_PERIOD_US}")


class FakeCgroups:
    """Directories that stay busy for a number of rmdir attempts."""

    def __init__(self, busy):
        self.busy = dict(busy)
        self.killed = []
        self.rmdirs = []

    def kill(self, path):
        self.killed.append(path)

    def rmdir(self, path):
        self.rmdirs.append(path)
        if path not in self.busy:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
        if self.busy[path] > 0:
            self.busy[path] -= 1
            raise OSError(errno.EBUSY, "Device or resource busy", path)
        del self.busy[path]


GROUPS = (CgroupGroup("/cg/memory/s1"), CgroupGroup("/cg/unified/s1"))


class CgroupReaperTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()

    def reaper(self, cgroups, **kwargs):
        return CgroupReaper(self.clock, kill=cgroups.kill, rmdir=cgroups.rmdir,
                            **kwargs)

    def test_removed_after_busy(self):
        """The reaper fires True once the last busy directory is removed."""
        cgroups = FakeCgroups({"/cg/memory/s1": 0, "/cg/unified/s1": 3})
        d = self.reaper(cgroups, interval=0.01).reap(GROUPS)
        self.assertEqual(cgroups.killed, ["/cg/memory/s1", "/cg/unified/s1"])
        self.assertNoResult(d)
        self.clock.advance(0.01)
        self.clock.advance(0.01)
        self.assertNoResult(d)
        self.clock.advance(0.01)
        self.assertIs(self.successResultOf(d), True)
        self.assertEqual(cgroups.busy, {})
        # The removed directory is not tried again.
        self.assertEqual(cgroups.rmdirs.count("/cg/memory/s1"), 1)
        self.assertEqual(cgroups.rmdirs.count("/cg/unified/s1"), 4)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_timeout(self):
        """A directory still busy at the timeout makes the reaper fire False."""
        cgroups = FakeCgroups({"/cg/unified/s1": 10**6})
        d = self.reaper(cgroups, interval=1.0, timeout=5.0).reap(
            (CgroupGroup("/cg/unified/s1"),))
        self.clock.pump([1.0] * 4)
        self.assertNoResult(d)
        self.clock.advance(1.0)
        self.assertIs(self.successResultOf(d), False)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(len(cgroups.rmdirs), 6)

    def test_already_gone(self):
        """Directories that do not exist count as removed, at once."""
        cgroups = FakeCgroups({})
        d = self.reaper(cgroups).reap(GROUPS)
        self.assertIs(self.successResultOf(d), True)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_no_groups(self):
        """Reaping no groups fires True without scheduling anything."""
        cgroups = FakeCgroups({})
        d = self.reaper(cgroups).reap(())
        self.assertIs(self.successResultOf(d), True)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_kill_errors_ignored(self):
        """A hierarchy without cgroup.kill does not stop the removal."""
        cgroups = FakeCgroups({"/cg/memory/s1": 0, "/cg/unified/s1": 0})

        def kill(path):
            cgroups.killed.append(path)
            if "memory" in path:
                raise PermissionError(errno.EACCES, "Permission denied", path)

        reaper = CgroupReaper(self.clock, kill=kill, rmdir=cgroups.rmdir)
        self.assertIs(self.successResultOf(reaper.reap(GROUPS)), True)
        self.assertEqual(cgroups.killed, ["/cg/memory/s1", "/cg/unified/s1"])

    def test_parents_removed_once_sessions_are_gone(self):
        """At shutdown the server's own parents are retried until the sessions'
        cgroups below them are gone (their launchers remove them on spare CPU),
        then the shared parents are tried once; a shared parent that is busy
        stays."""
        layout = CgroupLayout(memory=None, pids="/cg/pids/shellserver/i1", cpu=None,
                              unified="/cg/unified/shellserver/i1", v2_controllers=False)
        cgroups = FakeCgroups({"/cg/pids/shellserver/i1": 2, "/cg/unified/shellserver/i1": 0,
                               "/cg/pids/shellserver": 10**6, "/cg/unified/shellserver": 0})
        d = self.reaper(cgroups, interval=0.05).remove_parents(layout)
        self.assertNoResult(d)
        self.assertNotIn("/cg/unified/shellserver", cgroups.rmdirs)
        self.clock.advance(0.05)
        self.clock.advance(0.05)
        self.assertIs(self.successResultOf(d), True)
        self.assertEqual(cgroups.busy, {"/cg/pids/shellserver": 10**6 - 1})
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_parents_still_busy_at_the_timeout(self):
        """Parents busy past the timeout are left (False); the shared ones are
        still tried."""
        layout = CgroupLayout(memory=None, pids=None, cpu=None,
                              unified="/cg/unified/shellserver/i1", v2_controllers=True)
        cgroups = FakeCgroups({"/cg/unified/shellserver/i1": 10**6,
                               "/cg/unified/shellserver": 10**6})
        d = self.reaper(cgroups, interval=1.0, timeout=3.0).remove_parents(layout)
        self.clock.pump([1.0] * 3)
        self.assertIs(self.successResultOf(d), False)
        self.assertIn("/cg/unified/shellserver", cgroups.rmdirs)

    def test_deprioritize_writes_the_lowest_weight(self):
        """An ending session's CPU weight drops to the minimum, in v1 or v2 terms;
        groups without a CPU weight, and writes that fail, are passed over."""
        writes = []

        def write(path, text):
            writes.append((path, text))
            if path.startswith("/cg/gone"):
                raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)

        reaper = CgroupReaper(self.clock, write_file=write)
        reaper.deprioritize((
            CgroupGroup("/cg/memory/s1", {"memory.limit_in_bytes": "1"}),
            CgroupGroup("/cg/cpu/s1", {"cpu.shares": "256", "cpu.cfs_quota_us": "1"}),
            CgroupGroup("/cg/gone/s1", {"cpu.weight": "25"}),
            CgroupGroup("/cg/unified/s1", {"cpu.weight": "25", "cpu.max": "1 1"}),
        ))
        self.assertEqual(writes, [("/cg/cpu/s1/cpu.shares", "2"),
                                  ("/cg/gone/s1/cpu.weight", "1"),
                                  ("/cg/unified/s1/cpu.weight", "1")])


SERVICE = "/sys/fs/cgroup/system.slice/shellserver.service"
SCOPE = "/sys/fs/cgroup/user.slice/user-0.slice/session-3.scope"
ALL_CONTROLLERS = ("cpuset", "cpu", "io", "memory", "hugetlb", "pids", "rdma", "misc")


def unified_layout(own: str) -> CgroupLayout:
    """The layout of a server whose own cgroup2 directory is ``own``."""
    relative = own[len("/sys/fs/cgroup"):] or "/"
    return parse_layout(UNIFIED_MOUNTINFO, f"0::{relative}\n").for_instance("i1")


def delegated_tree(own: str, pids: list[str], **kwargs) -> FakeCgroupTree:
    """A cgroup2 tree where every ancestor of ``own`` enables every controller."""
    tree = FakeCgroupTree("/sys/fs/cgroup", ALL_CONTROLLERS, processes={own: pids}, **kwargs)
    path = own
    while path != "/sys/fs/cgroup":
        path = os.path.dirname(path)
        tree.subtree[path] = set(ALL_CONTROLLERS)
    return tree


class PrepareUnifiedTests(SynchronousTestCase):
    def assert_ready(self, tree: FakeCgroupTree, layout: CgroupLayout) -> None:
        """Session cgroups made under the layout's parent get memory, pids and cpu."""
        self.assertTrue({"memory", "pids", "cpu"} <= tree.controllers(layout.unified + "/s1"))

    def test_delegated_service(self):
        """Under Delegate=yes the server moves into a leaf and enables the controllers
        below its cgroup and the parents."""
        tree = delegated_tree(SERVICE, ["100"])
        layout = unified_layout(SERVICE)
        notices = prepare_parents(layout, tree)
        self.assertEqual(tree.processes[SERVICE], [])
        self.assertEqual(tree.processes[SERVICE + "/server"], ["100"])
        self.assertEqual(tree.subtree[SERVICE], {"memory", "pids", "cpu"})
        self.assertEqual(tree.subtree[SERVICE + "/shellserver"], {"memory", "pids", "cpu"})
        self.assertEqual(tree.subtree[layout.unified], {"memory", "pids", "cpu"})
        self.assert_ready(tree, layout)
        self.assertEqual(len(notices), 1)
        self.assertIn(SERVICE + "/server", notices[0])

    def test_session_scope(self):
        """Started by hand, the login shell and the server both move into the leaf."""
        tree = delegated_tree(SCOPE, ["7", "100"])
        layout = unified_layout(SCOPE)
        notices = prepare_parents(layout, tree)
        self.assertEqual(tree.processes[SCOPE + "/server"], ["7", "100"])
        self.assert_ready(tree, layout)
        self.assertIn("7, 100", notices[0])

    def test_restart_from_the_leaf(self):
        """A server started from a shell an earlier start moved keeps the same parents."""
        layout = parse_layout(UNIFIED_MOUNTINFO,
                              f"0::{SCOPE[len('/sys/fs/cgroup'):]}/server\n")
        self.assertEqual(layout.own, SCOPE)
        self.assertEqual(layout.unified, SCOPE + "/shellserver")

    def test_root_cgroup(self):
        """In the root cgroup nothing moves: the root may hold processes."""
        tree = FakeCgroupTree("/sys/fs/cgroup", ALL_CONTROLLERS,
                              processes={"/sys/fs/cgroup": ["1", "100"]})
        layout = unified_layout("/sys/fs/cgroup")
        self.assertEqual(prepare_parents(layout, tree), [])
        self.assertEqual(tree.processes["/sys/fs/cgroup"], ["1", "100"])
        self.assert_ready(tree, layout)

    def test_already_prepared(self):
        """A second start in the same delegated cgroup succeeds and moves nothing."""
        tree = delegated_tree(SERVICE, ["100"])
        layout = unified_layout(SERVICE)
        prepare_parents(layout, tree)
        self.assertEqual(prepare_parents(layout, tree), [])
        self.assert_ready(tree, layout)

    def test_not_delegated(self):
        """Without the controllers the refusal names cgroup.controllers and Delegate=yes,
        and changes nothing."""
        tree = delegated_tree(SERVICE, ["100"])
        tree.subtree[os.path.dirname(SERVICE)] = {"memory", "pids"}
        with self.assertRaises(CgroupError) as caught:
            prepare_parents(unified_layout(SERVICE), tree)
        message = str(caught.exception)
        self.assertIn(SERVICE + "/cgroup.controllers", message)
        self.assertIn("without cpu", message)
        self.assertIn("Delegate=yes", message)
        self.assertEqual(tree.writes, [])

    def test_read_only(self):
        """A read-only cgroupfs is refused naming the file and saying read-only."""
        tree = delegated_tree(SERVICE, ["100"], read_only=True)
        with self.assertRaises(CgroupError) as caught:
            prepare_parents(unified_layout(SERVICE), tree)
        message = str(caught.exception)
        self.assertIn(SERVICE + "/cgroup.subtree_control", message)
        self.assertIn("read-only", message)

    def test_processes_keep_arriving(self):
        """A cgroup that never empties is refused with EBUSY named, not looped on."""
        tree = delegated_tree(SERVICE, ["100"])
        tree.forking.add(SERVICE)
        with self.assertRaises(CgroupError) as caught:
            prepare_parents(unified_layout(SERVICE), tree)
        message = str(caught.exception)
        self.assertIn(SERVICE + "/cgroup.subtree_control", message)
        self.assertIn("Device or resource busy", message)

    def test_hybrid_only_creates_directories(self):
        """On a hybrid host the parents are created and no controller is enabled."""
        layout = parse_layout(HYBRID_MOUNTINFO, HYBRID_SELF_CGROUP).for_instance("i1")
        made = []

        class Directories:
            def mkdir(self, path):
                made.append(path)
                return True

        self.assertEqual(prepare_parents(layout, Directories()), [])
        self.assertEqual(made[1::2], list(layout.parents()))
        self.assertEqual(made[0::2], [os.path.dirname(p) for p in layout.parents()])

    def test_refusal_removes_what_it_made(self):
        """A refusal halfway (controllers not available in the parent) leaves no
        directory it made, but the leaf holding the server stays."""
        tree = delegated_tree(SERVICE, ["100"])
        layout = unified_layout(SERVICE)
        before = set(tree.subtree)
        tree.failing[layout.unified + "/cgroup.subtree_control"] = errno.EINVAL
        with self.assertRaises(CgroupError) as caught:
            prepare_parents(layout, tree)
        self.assertIn(layout.unified + "/cgroup.subtree_control: Invalid argument",
                      str(caught.exception))
        self.assertEqual(set(tree.subtree) - before, {SERVICE + "/server"})
