"""Host-wide kernel pools every console draws on, sized at start-up.

Some kernel resources are counted for the whole host, not per cgroup or per
uid: PTYs (all devpts instances share kernel.pty.max), pid numbers
(kernel.pid_max) and open file objects (fs.file-max). Each console's share
is bounded (devpts ``max=``, pids.max, its memory cgroup), so ``capacity``
consoles take at most ``capacity`` times that share. At start-up the server
raises each sysctl that is too small for that; where it cannot (no
permission, a read-only /proc/sys), it lowers the capacity to what the pool
holds and says so. docs/sandbox.md lists every host-wide resource and its
bound.
"""

from __future__ import annotations

from collections.abc import Callable

from attrs import frozen

from shellserver.sandbox.spec import SandboxLimits

# The cheapest way to keep an open file object without a descriptor is a
# mapping of it (the descriptor closed): a file (192 bytes of slab here) and
# a VMA (192 bytes), both charged to the console's memory cgroup. A console
# holds at most its memory over this many file objects (measured: 65474
# mappings of a /tmp file cost 37 MB, 570 bytes each).
BYTES_PER_HELD_FILE = 384
# What the host keeps for itself beside the consoles (constants, so a restart
# does not raise the sysctls again): pids for its own processes, and the
# file-max the kernel sizes from memory at boot (a file per 10 KiB).
HOST_PIDS = 4096
HOST_FILES_PER_KIB = 1 / 10
# The largest values the kernel accepts (PID_MAX_LIMIT on 64-bit,
# NR_UNIX98_PTY_MAX); file-max takes any long, capped here for sanity.
PID_MAX_LIMIT = 4 * 1024 * 1024
PTY_MAX_LIMIT = 1 << 20
FILE_MAX_LIMIT = 1 << 40


@frozen
class HostPool:
    """One host-wide pool: the sysctl that sizes it and what consoles need of it."""

    sysctl: str  # as under /proc/sys, with dots: "kernel.pty.max"
    current: int
    # The value that leaves ``host`` to the host and ``per_console`` to each
    # of ``capacity`` consoles.
    host: int
    per_console: int
    limit: int  # the most the kernel accepts
    why: str
    # Whether a sysctl that cannot be raised lowers the capacity. Not for
    # fs.file-max: the kernel's default (a file per 10 KiB of memory) holds
    # only a few consoles' worst case, and one console alone cannot reach
    # it; a warning says how to raise it instead.
    lowers_capacity: bool = True

    def needed(self, capacity: int) -> int:
        return self.host + self.per_console * capacity

    def capacity_at(self, value: int) -> int:
        """How many consoles fit when the sysctl is ``value``."""
        return max(0, (value - self.host) // self.per_console)


def host_pools(limits: SandboxLimits, memory_kib: int,
               read_sysctl: Callable[[str], int]) -> list[HostPool]:
    """The pools a console can reach, with their current sizes (pure but for
    ``read_sysctl``, which returns a sysctl's integer value); ``memory_kib``
    is the host's memory (MemTotal)."""
    reserve = read_sysctl("kernel.pty.reserve")
    return [
        # devpts instances other than the host's may use kernel.pty.max less
        # kernel.pty.reserve in all; each console also holds one of the
        # host's own PTYs (its launcher's), hence the +1.
        HostPool("kernel.pty.max", read_sysctl("kernel.pty.max"), reserve,
                 limits.max_ptys + 1, PTY_MAX_LIMIT,
                 f"each console has {limits.max_ptys} PTYs of its devpts and its "
                 "launcher's"),
        HostPool("kernel.pid_max", read_sysctl("kernel.pid_max"), HOST_PIDS,
                 limits.pids_max, PID_MAX_LIMIT,
                 f"each console has up to {limits.pids_max} processes and threads"),
        HostPool("fs.file-max", read_sysctl("fs.file-max"),
                 int(memory_kib * HOST_FILES_PER_KIB),
                 max(1, limits.memory_bytes // BYTES_PER_HELD_FILE), FILE_MAX_LIMIT,
                 "each console can keep open as many files as its memory holds "
                 f"(about {BYTES_PER_HELD_FILE} bytes each, mapped and closed)",
                 lowers_capacity=False),
    ]


def fit_host_pools(capacity: int, pools: list[HostPool],
                   write_sysctl: Callable[[str, int], None]) -> tuple[int, list[str]]:
    """Raise each pool's sysctl to fit ``capacity`` consoles, or else lower the
    capacity to what it holds; the capacity and notices saying what changed.

    ``write_sysctl`` raises OSError when the value cannot be set. ValueError
    when not even one console fits.
    """
    notices = []
    for pool in pools:
        wanted = pool.needed(capacity)
        if pool.current >= wanted:
            continue
        target = min(wanted, pool.limit)
        try:
            write_sysctl(pool.sysctl, target)
        except OSError as e:
            value, failure = pool.current, f" could not be raised to {target} ({e.strerror or e})"
        else:
            value, failure = target, ""
            notices.append(f"{pool.sysctl} raised from {pool.current} to {target} for "
                           f"{capacity} consoles: {pool.why}")
        fits = pool.capacity_at(value)
        if failure and not pool.lowers_capacity:
            notices.append(f"{pool.sysctl} is {value} and{failure}: "
                           f"{value // pool.per_console + 1} consoles could "
                           f"use it all up for the host's unprivileged processes; "
                           f"{pool.why}; set it to {target} in /etc/sysctl.d")
            continue
        if fits < 1:
            raise ValueError(f"{pool.sysctl} is {value}: too small for even one console "
                             f"({pool.why}), and it{failure or ' cannot go higher'}; "
                             f"set it to {target} in /etc/sysctl.d")
        if fits < capacity:
            notices.append(f"admission capacity lowered from {capacity} to {fits}: "
                           f"{pool.sysctl} is {value} and{failure or ' cannot go higher'}; "
                           f"{pool.why}" + (f"; set it to {target} in /etc/sysctl.d"
                                            if failure else ""))
            capacity = fits
    return capacity, notices


def memory_kib(meminfo: str) -> int:
    """The host's memory in KiB, from /proc/meminfo's text."""
    for line in meminfo.splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1])
    raise ValueError("/proc/meminfo has no MemTotal line")


def read_proc_sysctl(name: str) -> int:
    """A sysctl's value from /proc/sys."""
    with open("/proc/sys/" + name.replace(".", "/")) as f:
        return int(f.read().split()[0])


def write_proc_sysctl(name: str, value: int) -> None:
    """Set a sysctl through /proc/sys (root, with /proc/sys writable)."""
    with open("/proc/sys/" + name.replace(".", "/"), "w") as f:
        f.write(str(value))
