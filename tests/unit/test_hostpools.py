"""Tests for shellserver.sandbox.hostpools: sizing host-wide kernel pools."""

import errno

from twisted.trial.unittest import SynchronousTestCase

from shellserver.sandbox.hostpools import (
    BYTES_PER_HELD_FILE,
    PTY_MAX_LIMIT,
    HostPool,
    fit_host_pools,
    host_pools,
    memory_kib,
)
from shellserver.sandbox.spec import SandboxLimits

MIB = 1024 * 1024
LIMITS = SandboxLimits(
    memory_bytes=256 * MIB, pids_max=64, cpu_shares=256, cpu_quota=0.5,
    tmp_bytes=64 * MIB, home_bytes=32 * MIB, max_open_files=256,
    max_file_bytes=32 * MIB, max_processes=64, max_ptys=8,
)
# This machine kind's values.
SYSCTLS = {"kernel.pty.max": 4096, "kernel.pty.reserve": 1024,
           "kernel.pid_max": 32768, "fs.file-max": 2466170}
MEMORY_KIB = 24 * 1024 * 1024


def pools(**changed):
    values = {**SYSCTLS, **changed}
    return {p.sysctl: p for p in host_pools(LIMITS, MEMORY_KIB, values.__getitem__)}


class Sysctls:
    """Records writes; refuses the names in ``refused`` with EACCES."""

    def __init__(self, refused=()):
        self.written = {}
        self.refused = set(refused)

    def write(self, name, value):
        if name in self.refused:
            raise OSError(errno.EACCES, "Permission denied")
        self.written[name] = value


class HostPoolsTests(SynchronousTestCase):
    def test_pty_share_is_devpts_cap_plus_launcher(self):
        """Each console needs its devpts cap plus its launcher's PTY, beside the
        kernel's reserve for the host's own devpts."""
        pty = pools()["kernel.pty.max"]
        self.assertEqual((pty.host, pty.per_console, pty.current), (1024, 9, 4096))
        self.assertEqual(pty.capacity_at(4096), (4096 - 1024) // 9)

    def test_pid_and_file_shares(self):
        """pids: pids.max per console beside 4096 for the host; files:
        the console's memory over the cheapest held file, beside the
        kernel's boot-time file-max (a file per 10 KiB)."""
        found = pools()
        self.assertEqual((found["kernel.pid_max"].host, found["kernel.pid_max"].per_console),
                         (4096, 64))
        files = found["fs.file-max"]
        self.assertEqual(files.per_console, 256 * MIB // BYTES_PER_HELD_FILE)
        self.assertEqual(files.host, MEMORY_KIB // 10)

    def test_host_share_does_not_follow_a_raised_value(self):
        """A restart sees the raised sysctls but needs no more than the first start."""
        self.assertEqual(pools()["fs.file-max"].needed(75),
                         pools(**{"fs.file-max": 10**9})["fs.file-max"].needed(75))

    def test_memory_kib(self):
        """MemTotal is read from /proc/meminfo's text; none is a clear error."""
        self.assertEqual(memory_kib("MemFree: 1 kB\nMemTotal:  2048 kB\n"), 2048)
        with self.assertRaises(ValueError) as caught:
            memory_kib("MemFree: 1 kB\n")
        self.assertIn("MemTotal", str(caught.exception))


class FitHostPoolsTests(SynchronousTestCase):
    def test_raises_what_is_too_small(self):
        """Each sysctl too small for the capacity is raised to fit it exactly,
        with a notice; the capacity stays."""
        sysctls = Sysctls()
        capacity, notices = fit_host_pools(500, list(pools().values()), sysctls.write)
        self.assertEqual(capacity, 500)
        self.assertEqual(sysctls.written["kernel.pty.max"], 1024 + 9 * 500)
        self.assertEqual(sysctls.written["kernel.pid_max"], 4096 + 64 * 500)
        self.assertEqual(len(notices), len(sysctls.written))
        self.assertIn("kernel.pty.max raised from 4096 to 5524", notices[0])

    def test_leaves_what_fits(self):
        """Nothing is written when every pool already fits the capacity."""
        sysctls = Sysctls()
        big = {"kernel.pid_max": 4194304, "fs.file-max": 1 << 40}
        self.assertEqual(fit_host_pools(75, list(pools(**big).values()), sysctls.write),
                         (75, []))
        self.assertEqual(sysctls.written, {})

    def test_lowers_the_capacity_when_it_cannot_raise(self):
        """A sysctl that cannot be raised lowers the capacity to what it holds,
        and the notice says why; later pools are sized for the lower capacity."""
        sysctls = Sysctls(refused={"kernel.pty.max"})
        capacity, notices = fit_host_pools(
            400, [pools()["kernel.pty.max"], pools()["kernel.pid_max"]], sysctls.write)
        self.assertEqual(capacity, (4096 - 1024) // 9)
        self.assertIn("admission capacity lowered from 400 to 341", notices[0])
        self.assertIn("could not be raised to 4624 (Permission denied)", notices[0])
        self.assertIn("set it to 4624 in /etc/sysctl.d", notices[0])
        self.assertEqual(sysctls.written, {})  # 341 consoles fit pid_max 32768

    def test_file_max_only_warns(self):
        """fs.file-max that cannot be raised keeps the capacity and warns, naming
        how many consoles could use it up and the value to set."""
        sysctls = Sysctls(refused={"fs.file-max"})
        capacity, notices = fit_host_pools(75, [pools()["fs.file-max"]], sysctls.write)
        self.assertEqual(capacity, 75)
        (notice,) = notices
        self.assertIn("fs.file-max is 2466170 and could not be raised", notice)
        self.assertIn("4 consoles could use it all up", notice)

    def test_kernel_ceiling_lowers_the_capacity(self):
        """Past the most the kernel accepts, the sysctl is set to that and the
        capacity lowered to fit it."""
        pool = HostPool("kernel.pty.max", 4096, 1024, 9, PTY_MAX_LIMIT, "why")
        sysctls = Sysctls()
        capacity, notices = fit_host_pools(200000, [pool], sysctls.write)
        self.assertEqual(sysctls.written, {"kernel.pty.max": PTY_MAX_LIMIT})
        self.assertEqual(capacity, (PTY_MAX_LIMIT - 1024) // 9)
        self.assertIn("cannot go higher", notices[-1])

    def test_not_even_one_console(self):
        """A pool too small for one console, that cannot be raised, is a clear error."""
        pool = HostPool("kernel.pty.max", 1030, 1024, 9, PTY_MAX_LIMIT, "why")
        with self.assertRaises(ValueError) as caught:
            fit_host_pools(10, [pool], Sysctls(refused={"kernel.pty.max"}).write)
        self.assertIn("kernel.pty.max is 1030: too small for even one console",
                      str(caught.exception))
