"""Where session cgroups go, and how the server removes them without blocking.

Session cgroups live under the server's own cgroup in each hierarchy (read
from /proc/self/cgroup), in a ``shellserver`` child, one directory per
session. Two layouts are understood:

* hybrid (cgroup v1 controllers plus a controller-less cgroup2 mount): one
  directory each in the memory, pids and cpu hierarchies, and one in the
  cgroup2 hierarchy for ``cgroup.kill`` and ``cgroup.events``;
* unified (cgroup v2 with the controllers enabled): a single directory.
  cgroup v2 lets only leaves hold processes once controllers are enabled
  below a cgroup, so at start-up the server moves the processes of its own
  cgroup into a ``server`` leaf next to the ``shellserver`` parent, then
  enables memory, pids and cpu below its own cgroup and the parents.

The launcher creates and joins them; the server's ``CgroupReaper`` kills and
removes what a launcher left behind (it was SIGKILLed, or crashed).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Mapping

from attrs import define, field, frozen
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import Interface, implementer

log = Logger()

PARENT_NAME = "shellserver"
SERVER_LEAF = "server"
CPU_PERIOD_US = 100_000
CONTROLLERS = ("memory", "pids", "cpu")
# What an operator changes when the host does not hand the server the
# controllers it needs (docs/sandbox.md, "cgroup layouts").
DELEGATE_ADVICE = (
    "run the server from etc/shellserver.service (it has Delegate=yes), or by hand with "
    "`systemd-run --scope -p Delegate=yes twistd ...`"
)
# Writing subtree_control races with processes forked into the cgroup that
# is being emptied; a few rounds of moving them are enough.
MOVE_ROUNDS = 5


class CgroupError(Exception):
    """The host lacks a cgroup hierarchy the sandbox needs."""


class ICgroupFiles(Interface):
    """The few file operations start-up does on a cgroup filesystem."""

    def read(path: str) -> str:
        """The text of a cgroup file."""

    def write(path: str, text: str) -> None:
        """Write ``text`` to a cgroup file (one write, as the kernel wants)."""

    def mkdir(path: str) -> bool:
        """Create a cgroup directory (an existing one is fine); True if made now."""

    def rmdir(path: str) -> None:
        """Remove an empty cgroup directory."""


@implementer(ICgroupFiles)
class HostCgroupFiles:
    """The host's cgroup filesystem."""

    def read(self, path: str) -> str:
        with open(path) as f:
            return f.read()

    def write(self, path: str, text: str) -> None:
        _write(path, text)

    def mkdir(self, path: str) -> bool:
        try:
            os.mkdir(path, 0o755)
        except FileExistsError:
            return False
        return True

    def rmdir(self, path: str) -> None:
        os.rmdir(path)


@frozen
class CgroupGroup:
    """One session directory in one hierarchy, with the limits to write."""

    path: str
    limits: Mapping[str, str] = field(factory=dict)


@frozen
class CgroupLayout:
    """The parent directories for session cgroups, per hierarchy."""

    memory: str | None
    pids: str | None
    cpu: str | None
    unified: str
    v2_controllers: bool
    # The server's own cgroup2 directory (where its processes start).
    own: str | None = None

    def for_instance(self, name: str) -> CgroupLayout:
        """The layout one server uses: its own directory under each parent, so
        servers sharing a host (and their start-up sweeps) never meet."""
        def sub(path: str | None) -> str | None:
            return None if path is None else os.path.join(path, name)

        return CgroupLayout(memory=sub(self.memory), pids=sub(self.pids), cpu=sub(self.cpu),
                            unified=os.path.join(self.unified, name),
                            v2_controllers=self.v2_controllers,
                            own=self.own)

    def parents(self) -> tuple[str, ...]:
        return tuple(
            p for p in (self.memory, self.pids, self.cpu, self.unified) if p
        )

    def session_groups(self, session: str, limits) -> tuple[CgroupGroup, ...]:
        quota_us = int(limits.cpu_quota * CPU_PERIOD_US)
        if self.v2_controllers:
            return (
                CgroupGroup(
                    os.path.join(self.unified, session),
                    {
                        "memory.max": str(limits.memory_bytes),
                        "memory.swap.max": "0",
                        "pids.max": str(limits.pids_max),
                        "cpu.weight": str(max(1, limits.cpu_shares * 100 // 1024)),
                        "cpu.max": f"{quota_us} {CPU_PERIOD_US}",
                    },
                ),
            )
        groups = []
        if self.memory:
            groups.append(CgroupGroup(
                os.path.join(self.memory, session),
                {"memory.limit_in_bytes": str(limits.memory_bytes)},
            ))
        if self.pids:
            groups.append(CgroupGroup(
                os.path.join(self.pids, session),
                {"pids.max": str(limits.pids_max)},
            ))
        if self.cpu:
            groups.append(CgroupGroup(
                os.path.join(self.cpu, session),
                {
                    "cpu.shares": str(limits.cpu_shares),
                    "cpu.cfs_period_us": str(CPU_PERIOD_US),
                    "cpu.cfs_quota_us": str(quota_us),
                },
            ))
        # The cgroup2 directory comes last: the launcher joins in this order,
        # and cgroup.kill there reaches every process.
        groups.append(CgroupGroup(os.path.join(self.unified, session)))
        return tuple(groups)


def parse_layout(mountinfo: str, self_cgroup: str) -> CgroupLayout:
    """Find the hierarchies and the server's own cgroup in each (pure)."""
    # Each mount as (mount point, the cgroup directory mounted there).
    v1_mounts: dict[str, tuple[str, str]] = {}
    v2_mount = None
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        fields = left.split()
        rest = right.split()
        if len(fields) < 5 or len(rest) < 3:
            continue
        mount = (fields[4], fields[3])
        fstype, options = rest[0], rest[2]
        if fstype == "cgroup2" and v2_mount is None:
            v2_mount = mount
        elif fstype == "cgroup":
            for option in options.split(","):
                if option in ("memory", "pids", "cpu"):
                    v1_mounts.setdefault(option, mount)
    if v2_mount is None:
        raise CgroupError("no cgroup2 hierarchy is mounted (needed for cgroup.kill)")

    own: dict[str, str] = {}
    for line in self_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy_id, controllers, path = parts
        if hierarchy_id == "0" and controllers == "":
            own["unified"] = path
        for controller in controllers.split(","):
            if controller in ("memory", "pids", "cpu"):
                own[controller] = path

    # A server started by hand again from a shell that an earlier start moved
    # into its ``server`` leaf keeps using the same cgroup, not one below.
    if v1_mounts == {} and own.get("unified", "").endswith("/" + SERVER_LEAF):
        own["unified"] = os.path.dirname(own["unified"])

    def parent(mount: tuple[str, str] | None, key: str) -> str | None:
        if mount is None or key not in own:
            return None
        mount_point, mount_root = mount
        path = own[key]
        # A container may see its own cgroup mounted at the hierarchy's mount
        # point (mount root /docker/ID): the path is relative to that root.
        if mount_root != "/" and (path == mount_root
                                  or path.startswith(mount_root + "/")):
            path = path[len(mount_root):]
        return os.path.join(mount_point, path.lstrip("/"), PARENT_NAME)

    unified = parent(v2_mount, "unified")
    if unified is None:
        raise CgroupError("the server's cgroup2 path is missing from /proc/self/cgroup")
    v2_controllers = not v1_mounts
    layout = CgroupLayout(
        memory=parent(v1_mounts.get("memory"), "memory"),
        pids=parent(v1_mounts.get("pids"), "pids"),
        cpu=parent(v1_mounts.get("cpu"), "cpu"),
        unified=unified,
        v2_controllers=v2_controllers,
        own=os.path.dirname(unified),
    )
    if not v2_controllers and not (layout.memory and layout.pids and layout.cpu):
        raise CgroupError(
            "the memory, pids and cpu cgroup controllers must all be mounted"
        )
    return layout


def read_layout() -> CgroupLayout:
    """The layout of this host, read from /proc (start-up only)."""
    with open("/proc/self/mountinfo") as f:
        mountinfo = f.read()
    with open("/proc/self/cgroup") as f:
        self_cgroup = f.read()
    return parse_layout(mountinfo, self_cgroup)


def prepare_parents(layout: CgroupLayout, files: ICgroupFiles | None = None) -> list[str]:
    """Create the parents (start-up only); on cgroup v2, make the server's
    cgroup tree able to hold limited session cgroups.

    Raises CgroupError naming the file that refused and what to change.
    Returns notices for the log (processes moved into the server's leaf).
    """
    files = files or HostCgroupFiles()
    made: list[str] = []

    def mkdir(path: str) -> None:
        if _attempt(files.mkdir, path):
            made.append(path)

    try:
        if not layout.v2_controllers:
            for path in layout.parents():
                for directory in (os.path.dirname(path), path):
                    mkdir(directory)
            return []
        return _prepare_unified(layout, files, mkdir)
    except CgroupError:
        # A refused start leaves no directory behind (the server's leaf may
        # hold processes by now: rmdir leaves it).
        for path in reversed(made):
            try:
                files.rmdir(path)
            except OSError:
                pass
        raise


def _prepare_unified(layout: CgroupLayout, files: ICgroupFiles,
                     mkdir: Callable[[str], None]) -> list[str]:
    own = layout.own or os.path.dirname(os.path.dirname(layout.unified))
    available = _attempt(files.read, os.path.join(own, "cgroup.controllers")).split()
    missing = [c for c in CONTROLLERS if c not in available]
    if missing:
        raise CgroupError(
            f"{os.path.join(own, 'cgroup.controllers')} offers "
            f"{' '.join(available) or 'no controllers'}, without {', '.join(missing)}: "
            f"the server's cgroup was not delegated the controllers consoles are limited "
            f"with; {DELEGATE_ADVICE}"
        )
    notices = []
    enable = " ".join("+" + c for c in CONTROLLERS)
    leaf = os.path.join(own, SERVER_LEAF)
    for attempt in range(MOVE_ROUNDS + 1):
        try:
            files.write(os.path.join(own, "cgroup.subtree_control"), enable)
            break
        except OSError as e:
            if e.errno != errno.EBUSY or attempt == MOVE_ROUNDS:
                raise _refusal(os.path.join(own, "cgroup.subtree_control"), e) from e
        # cgroup v2 allows no processes in a cgroup that enables controllers
        # below it (the root cgroup excepted): move them all into a leaf, as
        # systemd asks of delegated subtrees. By hand from a root shell this
        # moves the shell too, within its own session scope.
        mkdir(leaf)
        pids = _attempt(files.read, os.path.join(own, "cgroup.procs")).split()
        for pid in pids:
            try:
                files.write(os.path.join(leaf, "cgroup.procs"), pid)
            except ProcessLookupError:
                continue  # exited meanwhile
            except OSError as e:
                raise _refusal(os.path.join(leaf, "cgroup.procs"), e) from e
        if pids:
            notices.append(f"moved processes {', '.join(pids)} from {own} into {leaf}: "
                           f"cgroup v2 lets only leaf cgroups hold processes")
    parent = os.path.dirname(layout.unified)
    for path in (parent, layout.unified):
        mkdir(path)
        _attempt(files.write, os.path.join(path, "cgroup.subtree_control"), enable)
    return notices


def _attempt(operation, path: str, *args):
    """Run one file operation, turning its failure into a CgroupError."""
    try:
        return operation(path, *args)
    except OSError as e:
        raise _refusal(path, e) from e


def _refusal(path: str, error: OSError) -> CgroupError:
    """A CgroupError naming ``path`` and what an operator can do about it."""
    reason = error.strerror or str(error)
    if error.errno == errno.EROFS:
        advice = ("the cgroup filesystem is mounted read-only (a container without a "
                  "writable cgroup2 mount?); the server needs it read-write")
    elif error.errno in (errno.EACCES, errno.EPERM):
        advice = f"the server may not change it; it must run as root, and {DELEGATE_ADVICE}"
    elif error.errno in (errno.ENOENT, errno.EINVAL, errno.ENOTSUP):
        advice = f"a controller is not available there; {DELEGATE_ADVICE}"
    elif error.errno == errno.EBUSY:
        advice = ("processes keep arriving in the server's cgroup; start the server in "
                  f"a cgroup of its own: {DELEGATE_ADVICE}")
    else:
        advice = DELEGATE_ADVICE
    return CgroupError(f"{path}: {reason}: {advice}")


def remove_empty(paths: list[str], rmdir: Callable[[str], None]) -> list[str]:
    """Remove from ``paths`` (and the tree) each cgroup that is gone or can be
    removed now; what is still busy stays. Returns ``paths``."""
    for path in list(paths):
        try:
            rmdir(path)
        except FileNotFoundError:
            paths.remove(path)
        except OSError:
            continue
        else:
            paths.remove(path)
    return paths


def sweep(layout: CgroupLayout, timeout: float = 10.0) -> tuple[list[str], list[str]]:
    """Kill and remove session cgroups a previous run left (start-up only).

    After a SIGKILLed server its launchers normally clean up by themselves
    (the PTY hangs up); whatever is left is killed here, before anything
    else starts. Returns (removed, still present).
    """
    import time

    leftovers = []
    for parent in layout.parents():
        if os.path.isdir(parent):
            leftovers += [os.path.join(parent, d) for d in os.listdir(parent)
                          if os.path.isdir(os.path.join(parent, d))]
    for path in leftovers:
        kill = os.path.join(path, "cgroup.kill")
        if os.path.exists(kill):
            try:
                _write(kill, "1")
            except OSError as e:
                log.warn("cgroup.kill on {path} failed: {error}", path=path, error=e)
    remaining = list(leftovers)
    deadline = time.monotonic() + timeout
    while remove_empty(remaining, os.rmdir) and time.monotonic() < deadline:
        time.sleep(0.01)
    removed = [p for p in leftovers if p not in remaining]
    return removed, remaining


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


@define
class CgroupReaper:
    """Kill a session's cgroups and remove them, polling on the clock.

    cgroup.kill returns at once, but the directories can only be removed once
    the kernel has finished killing; polling keeps the reactor free.
    """

    _clock: IReactorTime
    _interval: float = 0.01
    _timeout: float = 10.0
    _rmdir: Callable[[str], None] = os.rmdir
    _kill: Callable[[str], None] = field(default=None)
    _write_file: Callable[[str, str], None] = _write

    def __attrs_post_init__(self) -> None:
        if self._kill is None:
            self._kill = lambda path: _write(os.path.join(path, "cgroup.kill"), "1")

    def deprioritize(self, groups: tuple[CgroupGroup, ...]) -> None:
        """Give an ending session the lowest CPU weight.

        Its teardown (the kernel unmapping a console's memory, its mounts)
        then waits for the live consoles instead of taking turns with them.
        """
        for group in groups:
            for key, lowest in (("cpu.weight", "1"), ("cpu.shares", "2")):
                if key in group.limits:
                    try:
                        self._write_file(os.path.join(group.path, key), lowest)
                    except OSError:
                        pass  # already gone, or never made: nothing to slow

    def reap(self, groups: tuple[CgroupGroup, ...]) -> Deferred[bool]:
        """Fire with True once every directory is gone, False on timeout."""
        for group in groups:
            try:
                self._kill(group.path)
            except FileNotFoundError:
                pass
            except OSError as e:
                # v1 hierarchies have no cgroup.kill: the cgroup2 one covers them.
                if e.errno not in (errno.ENOENT, errno.EACCES, errno.EPERM):
                    log.warn("cgroup.kill on {path} failed: {error}",
                             path=group.path, error=e)
        return self._remove([g.path for g in groups])

    def remove_parents(self, layout: CgroupLayout) -> Deferred[bool]:
        """At shutdown: remove this server's own parents, waiting (on the
        clock) for the sessions' cgroups below them to go, then the shared
        ``shellserver`` parents if empty.

        Ending launchers remove their session's cgroups on spare CPU only
        (SCHED_IDLE), so on a busy host they may still be there when the
        server is done; a single attempt left the parents behind for good.
        """
        d = self._remove(list(layout.parents()))
        d.addCallback(self._remove_shared_parents, layout)
        return d

    def _remove_shared_parents(self, removed: bool, layout: CgroupLayout) -> bool:
        # One try each: a shared parent that still has children belongs to
        # another server on this host, and stays.
        for path in layout.parents():
            directory = os.path.dirname(path)
            try:
                self._rmdir(directory)
            except OSError as e:
                if e.errno not in (errno.ENOENT, errno.EBUSY, errno.ENOTEMPTY):
                    log.warn("could not remove {path}: {error}", path=directory, error=e)
        return removed

    def _remove(self, remaining: list[str]) -> Deferred[bool]:
        """Fire with True once every directory is gone, False on timeout."""
        done: Deferred[bool] = Deferred()
        deadline = self._clock.seconds() + self._timeout

        def attempt() -> None:
            if not remove_empty(remaining, self._rmdir):
                done.callback(True)
            elif self._clock.seconds() >= deadline:
                log.error("cgroups still busy after {timeout}s: {paths}",
                          timeout=self._timeout, paths=remaining)
                done.callback(False)
            else:
                self._clock.callLater(self._interval, attempt)

        attempt()
        return done
