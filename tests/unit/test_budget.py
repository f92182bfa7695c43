"""CPU budgets: tarpit, then end; with fake sandboxes, fake cgroup files, a Clock."""

from attrs import define, field
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from shellserver.sandbox.budget import (
    CpuBudgetWatcher,
    oom_kill_count,
    read_oom_kills,
    read_usage_seconds,
    tarpit_writes,
)
from shellserver.sandbox.cgroups import CgroupGroup

V1_GROUPS = (
    CgroupGroup("/cg/memory/s1", {"memory.limit_in_bytes": "1"}),
    CgroupGroup("/cg/cpu/s1", {"cpu.shares": "256", "cpu.cfs_period_us": "100000",
                               "cpu.cfs_quota_us": "50000"}),
    CgroupGroup("/cg/unified/s1"),
)
V2_GROUPS = (CgroupGroup("/cg/unified/s1", {"cpu.max": "50000 100000"}),)


@define
class Spec:
    cgroups: tuple


@define
class Events:
    notices: list = field(factory=list)
    endings: list = field(factory=list)

    def notice(self, message):
        self.notices.append(message)

    def ending(self, message):
        self.endings.append(message)


@define(eq=False)
class Sandbox:
    session: str
    spec: Spec
    events: Events = field(factory=Events)


class WatcherTestCase(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.usage = {}
        self.oom_kills = {}
        self.writes = []
        self.sandboxes = [Sandbox("s1", Spec(V1_GROUPS)), Sandbox("s2", Spec(V2_GROUPS))]
        self.watcher = CpuBudgetWatcher(
            self.clock, lambda: self.sandboxes, budget=10.0, tarpit_quota=0.05, grace=30.0,
            interval=2.0, read=lambda groups: self.usage.get(groups[0].path),
            write=lambda path, value: self.writes.append((path, value)),
            read_oom=lambda groups: self.oom_kills.get(groups[0].path, 0),
        )
        self.service = self.watcher.service()
        self.service.startService()


class WatcherTests(WatcherTestCase):
    def test_under_budget_untouched(self):
        """Consoles within their budget are neither slowed nor told anything."""
        self.usage = {"/cg/memory/s1": 9.9, "/cg/unified/s1": 3.0}
        self.clock.advance(10)
        self.assertEqual(self.writes, [])
        self.assertEqual(self.sandboxes[0].events.notices, [])

    def test_over_budget_tarpitted_then_ended(self):
        """Past its budget a console is slowed and told; after the grace it ends."""
        self.usage = {"/cg/memory/s1": 10.5}
        self.clock.advance(2)
        self.assertEqual(self.writes, [("/cg/cpu/s1/cpu.cfs_quota_us", "5000")])
        events = self.sandboxes[0].events
        self.assertEqual(len(events.notices), 1)
        self.assertIn("slowed down", events.notices[0])
        self.clock.advance(28)
        self.assertEqual(events.endings, [])
        self.clock.advance(2)
        self.assertEqual(events.endings,
                         ["Console ended: it used up its CPU time allowance."])
        self.assertEqual(len(self.writes), 1)  # tarpitted once
        self.assertEqual(self.sandboxes[1].events.notices, [])

    def test_forgets_ended_sandboxes(self):
        """A tarpitted console that ended is forgotten (bounded memory)."""
        self.usage = {"/cg/memory/s1": 11}
        self.clock.advance(2)
        self.sandboxes = self.sandboxes[1:]
        self.clock.advance(2)
        self.assertEqual(self.watcher._tarpitted, {})

    def test_zero_budget_disables(self):
        """A budget of 0 means no watching at all: no service to run."""
        watcher = CpuBudgetWatcher(self.clock, lambda: self.sandboxes, budget=0,
                                   tarpit_quota=0.05, grace=1)
        self.assertIsNone(watcher.service())

    def test_stop(self):
        """Stopping the watcher's service leaves nothing scheduled."""
        self.service.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])


class CgroupFilesTests(SynchronousTestCase):
    def test_tarpit_writes_v1_and_v2(self):
        """The tarpit cuts the v1 CFS quota, or the v2 cpu.max."""
        self.assertEqual(tarpit_writes(V1_GROUPS, 0.05),
                         [("/cg/cpu/s1/cpu.cfs_quota_us", "5000")])
        self.assertEqual(tarpit_writes(V2_GROUPS, 0.1),
                         [("/cg/unified/s1/cpu.max", "10000 100000")])

    def test_usage_of_missing_cgroup(self):
        """A cgroup that is gone has no usage (None), not an error."""
        self.assertIsNone(read_usage_seconds((CgroupGroup("/nonexistent/s1"),)))


class OomKillTests(WatcherTestCase):
    def test_oom_kill_told_once(self):
        """A process killed for memory is told to its console once, and again only
        when the kernel kills another."""
        self.oom_kills["/cg/unified/s1"] = 1
        self.clock.advance(2.0)
        self.clock.advance(2.0)
        self.assertEqual(len(self.sandboxes[1].events.notices), 1)
        self.assertIn("ran out of memory", self.sandboxes[1].events.notices[0])
        self.assertEqual(self.sandboxes[0].events.notices, [])
        self.oom_kills["/cg/unified/s1"] = 3
        self.clock.advance(2.0)
        self.assertEqual(len(self.sandboxes[1].events.notices), 2)
        self.assertEqual(self.sandboxes[1].events.endings, [])

    def test_oom_kill_count_parsed(self):
        """oom_kill is read from v2 memory.events and v1 memory.oom_control texts."""
        self.assertEqual(oom_kill_count("low 0\nhigh 0\nmax 12\noom 2\noom_kill 2\n"
                                        "oom_group_kill 0\n"), 2)
        self.assertEqual(oom_kill_count("oom_kill_disable 0\nunder_oom 0\noom_kill 5\n"), 5)
        self.assertEqual(oom_kill_count("oom_kill_disable 0\n"), 0)

    def test_oom_of_missing_cgroup(self):
        """A cgroup that is gone has no OOM count (None)."""
        self.assertIsNone(read_oom_kills((CgroupGroup("/nonexistent/s1",
                                                      {"memory.max": "1"}),)))
