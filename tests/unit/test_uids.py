"""Tests for shellserver.sandbox.uids: the pool of per-session uids."""

from twisted.trial.unittest import SynchronousTestCase

from shellserver.sandbox.uids import UidPool, UidsExhausted


class UidPoolTests(SynchronousTestCase):
    def test_allocates_in_order(self):
        """A fresh pool hands out its range from the first uid up."""
        pool = UidPool(200000, 200002)
        self.assertEqual([pool.allocate() for _ in range(3)], [200000, 200001, 200002])

    def test_counts(self):
        """in_use and available follow allocations and releases."""
        pool = UidPool(10, 14)
        uid = pool.allocate()
        pool.allocate()
        self.assertEqual((pool.in_use, pool.available), (2, 3))
        pool.release(uid)
        self.assertEqual((pool.in_use, pool.available), (1, 4))

    def test_least_recently_used_first(self):
        """A released uid comes back only after the never-used and older ones."""
        pool = UidPool(1000, 1002)
        first = pool.allocate()
        second = pool.allocate()
        pool.release(second)
        pool.release(first)
        self.assertEqual(
            [pool.allocate() for _ in range(3)], [1002, second, first]
        )

    def test_exhausted(self):
        """Allocating from an empty pool raises UidsExhausted with a clear message."""
        pool = UidPool(5000, 5001)
        pool.allocate()
        pool.allocate()
        with self.assertRaises(UidsExhausted) as caught:
            pool.allocate()
        self.assertIn("no free sandbox uid", str(caught.exception))

    def test_release_refills(self):
        """After exhaustion, a release makes that uid available again."""
        pool = UidPool(5000, 5000)
        uid = pool.allocate()
        self.assertRaises(UidsExhausted, pool.allocate)
        pool.release(uid)
        self.assertEqual(pool.allocate(), uid)

    def test_double_release(self):
        """Releasing a uid twice raises ValueError naming it."""
        pool = UidPool(7000, 7009)
        uid = pool.allocate()
        pool.release(uid)
        with self.assertRaises(ValueError) as caught:
            pool.release(uid)
        self.assertIn(str(uid), str(caught.exception))
        self.assertEqual(pool.available, 10)

    def test_release_never_allocated(self):
        """Releasing a uid the pool never handed out raises ValueError."""
        pool = UidPool(7000, 7009)
        self.assertRaises(ValueError, pool.release, 7003)
        self.assertRaises(ValueError, pool.release, 42)

    def test_quarantine(self):
        """A quarantined uid is never handed out again and cannot be released."""
        pool = UidPool(8000, 8001)
        bad = pool.allocate()
        pool.quarantine(bad)
        self.assertEqual((pool.in_use, pool.available), (0, 1))
        self.assertRaises(ValueError, pool.release, bad)
        self.assertEqual(pool.allocate(), 8001)
        self.assertRaises(UidsExhausted, pool.allocate)

    def test_empty_range(self):
        """A range whose first uid is above its last is refused."""
        with self.assertRaises(ValueError) as caught:
            UidPool(10, 9)
        self.assertIn("10-9", str(caught.exception))
