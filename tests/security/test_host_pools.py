"""Host-wide kernel pools: one console drains each, another console still works.

Each test runs a drainer in a fresh, real console of a server of its own
(uids 232000-232099, used by no other test): it takes as much of one
host-wide or shared kernel resource as it can, in bounded loops, and keeps
it. While it holds it, the test asserts that the drainer stopped at its
per-console bound, that the host still has the resource, and that a second,
fresh console starts and computes 6*7. docs/sandbox.md lists the resources
and their bounds. The syscall numbers are x86_64's.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import platform

import pytest
from conftest import GENEROUS_ADMISSION, start_server, wait_until
from escape_helpers import Sandbox, attack_console, pids_of_uid, server_leftovers

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(platform.machine() != "x86_64",
                       reason="the drainers use x86_64 syscall numbers"),
]

UID_MIN, UID_MAX = 232000, 232099
# The start-up tests' servers (one at a time).
STARTUP_UID_MIN, STARTUP_UID_MAX = 232100, 232119
RUNTIME = os.environ.get("SHELLSERVER_RUNTIME", "/var/lib/shellserver/runtime")
# The server's defaults (shellserver.config.SandboxConfig, sandbox.spec).
MAX_PTYS = 8
SHM_INODES = 1024
MAX_OPEN_FILES = 256
INOTIFY_INSTANCES = int(open("/proc/sys/fs/inotify/max_user_instances").read())

# x86_64 numbers of the kernel AIO syscalls.
IO_SETUP, IO_DESTROY, IO_GETEVENTS, IO_SUBMIT, IO_CANCEL, IO_PGETEVENTS = (
    206, 207, 208, 209, 210, 333)


@pytest.fixture(scope="module")
def pools_server(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.fail("these tests need root (they start real sandboxes)")
    srv = start_server(tmp_path_factory.mktemp("pools"), uid_min=UID_MIN, uid_max=UID_MAX)
    yield srv
    srv.stop()
    assert wait_until(lambda: server_leftovers(srv) == [], timeout=20), \
        server_leftovers(srv)


@pytest.fixture
def drainer(pools_server):
    """The console that drains a pool; closing it must leave nothing behind."""
    yield from attack_console(pools_server)


def second_console(server, code: str = "report(6*7)"):
    """A fresh console starts and runs ``code``; what it reported."""
    sandbox = Sandbox(server)
    try:
        return sandbox.run(code)
    finally:
        sandbox.close()


def host_ptys() -> int:
    with open("/proc/sys/kernel/pty/nr") as f:
        return int(f.read())


def test_ptys_stop_at_the_devpts_cap(pools_server, drainer):
    """A console opening PTYs gets ENOSPC once its devpts holds max_ptys (its
    terminal is one), holds no more of the host's pool, and another console
    still starts and gets a PTY of its own."""
    before = host_ptys()
    opened, error = drainer.run("""
        import builtins
        builtins._held_ptys = []
        error = None
        for _ in range(240):  # below RLIMIT_NOFILE; far past the cap
            try:
                builtins._held_ptys.append(os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY))
            except OSError as e:
                error = name_of(e.errno)
                break
        report((len(builtins._held_ptys), error))
    """)
    assert (opened, error) == (MAX_PTYS - 1, "ENOSPC")
    # Held while the second console starts: the drainer's share of the pool
    # is its devpts cap, whatever else runs on the host meanwhile.
    assert host_ptys() - before <= MAX_PTYS
    assert second_console(pools_server, """
        import pty
        master, slave = pty.openpty()
        report(os.ttyname(slave).startswith("/dev/pts/") and 6*7)
    """) == 42


def test_kernel_aio_is_not_available(pools_server, drainer):
    """io_setup and the other kernel AIO syscalls fail with ENOSYS in a console,
    so it takes nothing of fs.aio-max-nr; the host's io_setup still works and
    another console still starts."""
    result = drainer.run(f"""
        context = ctypes.c_ulong(0)
        report([syscall({IO_SETUP}, 65536, ctypes.byref(context)),
                syscall({IO_SETUP}, 1, ctypes.byref(context)),
                syscall({IO_DESTROY}, 0), syscall({IO_GETEVENTS}, 0, 0, 1, 0, 0),
                syscall({IO_SUBMIT}, 0, 1, 0), syscall({IO_CANCEL}, 0, 0, 0),
                syscall({IO_PGETEVENTS}, 0, 0, 1, 0, 0, 0)])
    """)
    assert result == ["ENOSYS"] * 7
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    context = ctypes.c_ulong(0)
    assert libc.syscall(ctypes.c_long(IO_SETUP), ctypes.c_long(1),
                        ctypes.byref(context)) == 0, os.strerror(ctypes.get_errno())
    libc.syscall(ctypes.c_long(IO_DESTROY), context)
    assert second_console(pools_server) == 42


def test_shm_inodes_are_capped(pools_server, drainer):
    """Empty files in /dev/shm stop at its inode cap with ENOSPC; another
    console still starts and can use its own /dev/shm."""
    made, error = drainer.run("""
        made, error = 0, None
        for n in range(5000):  # bounded, well past the cap
            try:
                os.close(os.open(f"/dev/shm/f{n}", os.O_CREAT | os.O_WRONLY, 0o600))
            except OSError as e:
                error = name_of(e.errno)
                break
            made += 1
        report((made, error))
    """)
    assert error == "ENOSPC"
    assert made < SHM_INODES
    assert second_console(pools_server, """
        with open("/dev/shm/mine", "w") as f:
            f.write("42")
        report(int(open("/dev/shm/mine").read()))
    """) == 42


LOCKED_FLOCK = f"{RUNTIME}/pyvenv.cfg"
LOCKED_POSIX = "/usr/lib/os-release"


def test_locks_on_shared_trees_stay_in_the_console(pools_server, drainer):
    """flock(LOCK_EX) on a runtime file and a POSIX read lock on a /usr file,
    held by one console, block neither another console nor the host; a POSIX
    write lock needs a writable descriptor, which the read-only trees refuse."""
    result = drainer.run(f"""
        import builtins, fcntl
        builtins._held_locks = [open({LOCKED_FLOCK!r}), open({LOCKED_POSIX!r})]
        fcntl.flock(builtins._held_locks[0], fcntl.LOCK_EX)
        fcntl.lockf(builtins._held_locks[1], fcntl.LOCK_SH)
        report((attempt(os.open, {LOCKED_POSIX!r}, os.O_RDWR),
                attempt(fcntl.lockf, builtins._held_locks[1],
                        fcntl.LOCK_EX | fcntl.LOCK_NB)))
    """)
    assert second_console(pools_server, f"""
        import fcntl
        files = [open({LOCKED_FLOCK!r}), open({LOCKED_POSIX!r})]
        report((attempt(fcntl.flock, files[0], fcntl.LOCK_EX | fcntl.LOCK_NB),
                attempt(fcntl.lockf, files[1], fcntl.LOCK_SH | fcntl.LOCK_NB)))
    """) == ("ok", "ok")
    # The host's own processes: an exclusive flock, and a POSIX write lock
    # (root opens the file for writing and writes nothing).
    with open(LOCKED_FLOCK) as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    descriptor = os.open(LOCKED_POSIX, os.O_RDWR)
    try:
        fcntl.lockf(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(descriptor)
    # No writable descriptor to take a write lock with: EROFS through the
    # overlay (EACCES, for a root-owned 0644 file, through a bind).
    assert result[0] in ("EROFS", "EACCES") and result[1] == "EBADF", result


def test_per_uid_and_per_namespace_counters(pools_server, drainer):
    """inotify instances (per uid) and POSIX message queues (bytes per uid,
    queues per IPC namespace) drained in one console stop at its own bound;
    another console still gets both."""
    instances, inotify_error, queues, mqueue_error = drainer.run("""
        import builtins
        builtins._held = []
        libc.inotify_init1.restype = ctypes.c_int
        libc.mq_open.restype = ctypes.c_int
        def drain(make, limit):
            for n in range(limit):
                fd = make(n)
                if fd < 0:
                    return n, name_of(ctypes.get_errno())
                builtins._held.append(fd)
            return limit, None
        instances, inotify_error = drain(lambda n: libc.inotify_init1(0), 200)
        queues, mqueue_error = drain(
            lambda n: libc.mq_open(f"/drain{n}".encode(), os.O_CREAT | os.O_RDWR, 0o600,
                                   None), 200)
        report((instances, inotify_error, queues, mqueue_error))
    """)
    assert inotify_error == "EMFILE" and 0 < instances <= INOTIFY_INSTANCES
    assert mqueue_error == "EMFILE" and 0 < queues < 200
    assert second_console(pools_server, """
        libc.inotify_init1.restype = ctypes.c_int
        libc.mq_open.restype = ctypes.c_int
        report((libc.inotify_init1(0) >= 0
                and libc.mq_open(b"/mine", os.O_CREAT | os.O_RDWR, 0o600, None) >= 0)
               and 6*7)
    """) == 42


def test_sysv_ipc_stops_at_the_namespace_limit(pools_server, drainer):
    """SysV shared memory segments made until refused stop at the console's
    own IPC namespace's shmmni; another console still makes one."""
    made, error = drainer.run("""
        libc.shmget.restype = ctypes.c_int
        made, error = 0, None
        for _ in range(5000):  # bounded, past shmmni (4096 in a new namespace)
            if libc.shmget(0, 4096, 0o1600) < 0:  # IPC_PRIVATE, IPC_CREAT | 0600
                error = name_of(ctypes.get_errno())
                break
            made += 1
        report((made, error))
    """)
    assert (made, error) == (4096, "ENOSPC")
    assert second_console(pools_server, """
        libc.shmget.restype = ctypes.c_int
        report(libc.shmget(0, 4096, 0o1600) >= 0 and 6*7)
    """) == 42


# Many memfds of 30 MB (one file may not pass RLIMIT_FSIZE, 32 MB), 420 MB
# in all: past the console's 256 MB memory limit.
MEMFD_FILLER = """
import os
chunk = b"x" * (1 << 20)
held = []
for n in range(14):
    held.append(os.memfd_create(f"drain{n}"))
    for _ in range(30):
        os.write(held[-1], chunk)
print("wrote all")
"""


def test_memfd_is_charged_to_the_console(pools_server, drainer):
    """A child filling memfds past the console's memory limit never gets there:
    the memory cgroup's OOM killer ends the console (memfd pages count in no
    process's RSS, so IPython is the biggest), nothing outside it; another
    console still starts."""
    drainer.send(f"""
        done = subprocess.run([sys.executable, "-c", {MEMFD_FILLER!r}],
                              capture_output=True, text=True, timeout=60)
        report((done.returncode, done.stdout.strip(), done.stderr[-200:]))
    """)
    assert drainer.client.wait_closed(timeout=60), drainer.client.display()
    assert "wrote all" not in drainer.output()
    assert wait_until(lambda: not pids_of_uid(drainer.uid), timeout=15)
    assert second_console(pools_server) == 42

# -- start-up: the host's sysctls sized for the capacity ------------------------

SIZED_SYSCTLS = ("kernel.pty.max", "kernel.pid_max", "fs.file-max")
KERNEL_DEFAULTS = {"kernel.pty.max": 4096, "kernel.pid_max": 32768}
# 500 * (8 + 1) PTYs do not fit in 4096 - 1024, nor 4096 + 500 * 64 pids in 32768.
BIG_CAPACITY = 500


def sysctl_path(name: str) -> str:
    return "/proc/sys/" + name.replace(".", "/")


def read_sysctl(name: str) -> int:
    with open(sysctl_path(name)) as f:
        return int(f.read())


def write_sysctl(name: str, value: int) -> None:
    with open(sysctl_path(name), "w") as f:
        f.write(str(value))


@pytest.fixture
def kernel_defaults():
    """The PTY and pid sysctls at the kernel's defaults for the test, and every
    sized sysctl as it was afterwards (the server raises them for the host)."""
    saved = {name: read_sysctl(name) for name in SIZED_SYSCTLS}
    for name, value in KERNEL_DEFAULTS.items():
        write_sysctl(name, value)
    yield
    for name, value in saved.items():
        write_sysctl(name, value)


def status_capacity(server) -> int:
    return json.loads(server.get("/status").read())["capacity"]


def test_start_up_raises_the_pty_and_pid_sysctls(tmp_path, kernel_defaults):
    """A server whose capacity needs more PTYs and pids than the host's sysctls
    allow raises them at start-up, logs it, keeps its capacity, and its
    consoles work."""
    server = start_server(tmp_path, uid_min=STARTUP_UID_MIN, uid_max=STARTUP_UID_MAX,
                          admission=f"{GENEROUS_ADMISSION}capacity = {BIG_CAPACITY}\n")
    try:
        reserve = read_sysctl("kernel.pty.reserve")
        assert read_sysctl("kernel.pty.max") - reserve >= BIG_CAPACITY * (MAX_PTYS + 1)
        assert read_sysctl("kernel.pid_max") >= 4096 + BIG_CAPACITY * 64
        assert "kernel.pty.max raised from 4096" in server.log()
        assert "kernel.pid_max raised from 32768" in server.log()
        assert status_capacity(server) == BIG_CAPACITY
        assert second_console(server) == 42
    finally:
        server.stop()


def read_only_proc_sys():
    """In the server's process before exec: a mount namespace of its own in
    which /proc/sys is read-only, as under systemd's ProtectKernelTunables."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                           ctypes.c_ulong, ctypes.c_char_p)
    ms_rdonly, ms_remount, ms_bind, ms_rec, ms_private = 1, 32, 4096, 16384, 1 << 18
    for result in (libc.unshare(0x00020000),
                   libc.mount(b"none", b"/", None, ms_rec | ms_private, None),
                   libc.mount(b"/proc/sys", b"/proc/sys", None, ms_bind, None),
                   libc.mount(None, b"/proc/sys", None,
                              ms_remount | ms_bind | ms_rdonly, None)):
        if result != 0:
            raise OSError(ctypes.get_errno(), "making /proc/sys read-only")


def test_start_up_lowers_the_capacity_it_cannot_back(tmp_path, kernel_defaults):
    """Where the sysctls cannot be raised, the server lowers its capacity to
    what the host's PTY pool holds, says so in its log, and serves consoles."""
    server = start_server(tmp_path, uid_min=STARTUP_UID_MIN, uid_max=STARTUP_UID_MAX,
                          admission=f"{GENEROUS_ADMISSION}capacity = {BIG_CAPACITY}\n",
                          preexec_fn=read_only_proc_sys)
    try:
        fits = (4096 - read_sysctl("kernel.pty.reserve")) // (MAX_PTYS + 1)
        assert read_sysctl("kernel.pty.max") == 4096
        assert f"admission capacity lowered from {BIG_CAPACITY} to {fits}" in server.log()
        assert status_capacity(server) <= fits
        assert second_console(server) == 42
    finally:
        server.stop()
