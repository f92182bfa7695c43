"""Admission decisions, the kill switch and unregistered users, on a Clock."""

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from shellserver.admission import (
    FULL,
    RATE_LIMITED,
    SWITCHED_OFF,
    Admission,
    KillSwitch,
    Refused,
    capacity_for_cost,
    derived_capacity,
)
from shellserver.auth import new_unregistered_user
from shellserver.sandbox.forked import console_cost_mb
from shellserver.users import UnregisteredUsers

A, B, C = "192.0.2.1", "192.0.2.2", "192.0.2.3"


def admission(clock, capacity=3, per_address=2, per_minute=3):
    return Admission(clock, capacity=capacity, per_address=per_address,
                     per_address_per_minute=per_minute)


class CapacityTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.admission = admission(self.clock)

    def test_accepts_until_full(self):
        """Consoles are admitted up to capacity, then refused as full with a retry hint."""
        self.admission.admit(A)
        self.admission.admit(B)
        self.admission.admit(C)
        with self.assertRaises(Refused) as caught:
            self.admission.admit("192.0.2.4")
        status = caught.exception.status
        self.assertEqual((status.accepting, status.reason), (False, FULL))
        self.assertEqual(status.http_status, 503)
        self.assertEqual(status.retry_after, 15)
        self.assertIn("Try again in 15 seconds", status.message)

    def test_release_frees_capacity(self):
        """A released slot can be used again; releasing twice counts once."""
        slots = [self.admission.admit(x) for x in (A, B, C)]
        slots[0].release()
        slots[0].release()
        self.assertEqual(self.admission.active, 2)
        self.admission.admit("192.0.2.4")
        self.assertEqual(self.admission.active, 3)

    def test_room_left_for_a_pool(self):
        """The room for pre-started sandboxes is what running consoles leave."""
        self.assertEqual(self.admission.room(), 3)
        slot = self.admission.admit(A)
        self.admission.admit(B)
        self.assertEqual(self.admission.room(), 1)
        slot.release()
        self.assertEqual(self.admission.room(), 2)

    def test_status_changes_nothing(self):
        """Asking for status neither takes a slot nor counts a start."""
        for _ in range(10):
            self.assertTrue(self.admission.status(A).accepting)
        self.assertEqual(self.admission.active, 0)


class PerAddressTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.admission = admission(self.clock, capacity=100)

    def test_concurrent_per_address(self):
        """One address may hold only per_address consoles at once; others are unaffected."""
        self.admission.admit(A)
        slot = self.admission.admit(A)
        status = self.admission.status(A)
        self.assertEqual((status.reason, status.http_status), (RATE_LIMITED, 429))
        self.assertTrue(self.admission.status(B).accepting)
        slot.release()
        self.assertTrue(self.admission.status(A).accepting)

    def test_starts_per_minute(self):
        """An address may start per_minute consoles in any 60 s, with an exact retry time."""
        for _ in range(3):
            self.admission.admit(A).release()
            self.clock.advance(10)
        status = self.admission.status(A)
        self.assertEqual(status.reason, RATE_LIMITED)
        self.assertEqual(status.retry_after, 30)
        self.clock.advance(29)
        self.assertFalse(self.admission.status(A).accepting)
        self.clock.advance(1)
        self.assertTrue(self.admission.status(A).accepting)

    def test_forgets_old_addresses(self):
        """Addresses whose starts left the window are forgotten (memory stays bounded)."""
        for i in range(50):
            self.admission.admit(f"198.51.100.{i}").release()
        self.clock.advance(61)
        self.admission.admit(A).release()
        self.assertEqual(list(self.admission._starts), [A])


class DerivedCapacityTests(SynchronousTestCase):
    def test_from_meminfo(self):
        """Capacity is 80% of memory over the per-console limit."""
        meminfo = "MemTotal:       24576000 kB\nMemFree:  1000 kB\n"
        self.assertEqual(derived_capacity(256, meminfo), 75)

    def test_at_least_one(self):
        """A tiny machine still gets one console."""
        self.assertEqual(derived_capacity(4096, "MemTotal: 1024 kB\n"), 1)

    def test_no_memtotal(self):
        """Unparseable meminfo is an error, not a guess."""
        self.assertRaises(ValueError, derived_capacity, 256, "nothing\n")


class PageRateTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.admission = Admission(self.clock, capacity=3, per_address=2,
                                   per_address_per_minute=3, pages_per_address_per_minute=2)

    def test_pages_per_minute(self):
        """An address gets pages_per_address_per_minute pages in any 60 s, then a retry time."""
        self.assertIsNone(self.admission.take_page(A))
        self.clock.advance(20)
        self.assertIsNone(self.admission.take_page(A))
        self.assertEqual(self.admission.take_page(A), 40)
        self.assertIsNone(self.admission.take_page(B))
        self.clock.advance(40)
        self.assertIsNone(self.admission.take_page(A))

    def test_refusals_not_counted(self):
        """Refused pages do not push the retry time back."""
        self.admission.take_page(A)
        self.admission.take_page(A)
        for _ in range(100):
            self.admission.take_page(A)
        self.clock.advance(60)
        self.assertIsNone(self.admission.take_page(A))

    def test_refusals_logged_once_a_minute(self):
        """A flood of refused pages is logged once per address per minute."""
        from twisted.logger import globalLogPublisher

        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.admission.take_page(A)
        self.admission.take_page(A)
        for _ in range(1000):
            self.admission.take_page(A)
        self.assertEqual(len([e for e in events if e.get("address") == A]), 1)
        self.clock.advance(61)
        self.admission.take_page(A)
        self.admission.take_page(A)
        self.admission.take_page(A)
        self.assertEqual(len([e for e in events if e.get("address") == A]), 2)

    def test_no_limit(self):
        """0 means no page limit; peers without an address are not limited."""
        unlimited = admission(self.clock)
        for _ in range(100):
            self.assertIsNone(unlimited.take_page(A))
            self.assertIsNone(self.admission.take_page(""))

    def test_forgets_old_addresses(self):
        """Addresses whose pages left the window are forgotten (memory stays bounded)."""
        for i in range(50):
            self.admission.take_page(f"198.51.100.{i}")
            self.admission.take_page(f"198.51.100.{i}")
            self.admission.take_page(f"198.51.100.{i}")
        self.clock.advance(61)
        self.admission.take_page(A)
        self.assertEqual(list(self.admission._pages), [A])
        self.assertEqual(self.admission._pages_refused_logged, {})


class KillSwitchTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.admission = admission(self.clock)
        self.content = None
        self.ended = []
        self.switch = KillSwitch(self.clock, self.admission, "/run/switch", self.ended.append,
                                 read=lambda path: self.content)
        self.service = self.switch.service()
        self.service.startService()

    def test_file_switches_off_and_on(self):
        """The file's presence stops admission within a second; removing it resumes."""
        self.assertTrue(self.admission.status(A).accepting)
        self.content = ""
        self.clock.advance(1)
        self.assertEqual(self.admission.status(A).reason, SWITCHED_OFF)
        self.content = None
        self.clock.advance(1)
        self.assertTrue(self.admission.status(A).accepting)
        self.assertEqual(self.ended, [])

    def test_terminate_ends_running_consoles_once(self):
        """A file saying terminate ends the running consoles once, not every second."""
        self.content = "terminate\n"
        self.clock.advance(1)
        self.clock.advance(1)
        self.assertEqual(self.ended, ["The operator has ended all consoles."])
        self.content = None
        self.clock.advance(1)
        self.content = "terminate"
        self.clock.advance(1)
        self.assertEqual(len(self.ended), 2)

    def test_stop(self):
        """Stopping the watcher's service leaves nothing scheduled."""
        self.service.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])


class UnregisteredUsersTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.users = UnregisteredUsers(self.clock, 60.0)

    def test_unclaimed_user_expires(self):
        """A user whose page never opened a console is forgotten after the token TTL."""
        user = new_unregistered_user(self.clock, A)
        self.users.add(user)
        self.clock.advance(59)
        self.assertIs(self.users.get(user.user_id), user)
        self.clock.advance(1)
        self.assertIsNone(self.users.get(user.user_id))

    def test_claimed_user_lives_with_its_console(self):
        """A claimed user outlives the TTL and goes when forgotten."""
        user = new_unregistered_user(self.clock, A, "https://docs.example")
        self.users.add(user)
        self.assertIs(self.users.claim(user.user_id), user)
        self.clock.advance(3600)
        self.assertEqual(len(self.users), 1)
        self.users.forget(user.user_id)
        self.assertEqual(len(self.users), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class CapacityForCostTests(SynchronousTestCase):
    MEMINFO = "MemTotal:       24684000 kB\n"

    def test_fixed_part_and_cost_per_console(self):
        """80% of 24 GB less a 40 MB template, at 26 MB a console, holds 740 consoles."""
        self.assertEqual(capacity_for_cost(self.MEMINFO, console_mb=26, fixed_mb=40,
                                           memory_mb=256), 740)

    def test_memory_limit_bounds_the_cost(self):
        """A console is never counted above its memory limit."""
        self.assertEqual(capacity_for_cost(self.MEMINFO, console_mb=500, fixed_mb=0,
                                           memory_mb=256),
                         capacity_for_cost(self.MEMINFO, console_mb=256, fixed_mb=0,
                                           memory_mb=256))

    def test_at_least_one(self):
        """A machine too small for the fixed part still admits one console."""
        self.assertEqual(capacity_for_cost("MemTotal: 1024 kB\n", console_mb=26,
                                           fixed_mb=40, memory_mb=256), 1)

    def test_fork_server_admits_more_than_classic(self):
        """The derived capacity follows the path's measured cost: forked consoles are cheaper."""
        forked = capacity_for_cost(self.MEMINFO, **dict(zip(
            ("fixed_mb", "console_mb"), console_cost_mb(True), strict=True)), memory_mb=256)
        classic = capacity_for_cost(self.MEMINFO, **dict(zip(
            ("fixed_mb", "console_mb"), console_cost_mb(False), strict=True)), memory_mb=256)
        self.assertGreater(forked, classic)

    def test_no_memtotal(self):
        """meminfo without MemTotal is an error, not a guess."""
        self.assertRaises(ValueError, capacity_for_cost, "nothing\n", console_mb=1,
                          fixed_mb=0, memory_mb=1)
