"""The root launcher: turns a sandbox spec into a running, contained console.

The server runs this file with the system Python as
``/usr/bin/python3 -I -S launcher.py SPEC_JSON`` in a fresh PTY (Twisted has
already called setsid and made the PTY our controlling terminal). It imports
only the standard library: the server's own environment may be unreadable to
other users and must not leak into the sandbox.

Process layout::

    launcher (root, host namespaces, session leader of the PTY)
      └─ init (pid 1 of a new pid namespace, session uid)
           └─ console (IPython, session uid)

The launcher creates the session's cgroups, moves init into them, waits for
init, and on exit (or SIGTERM/SIGHUP) kills the cgroup and removes it. Init
builds the root filesystem in new mount/net/ipc/uts/cgroup namespaces,
chroots, drops privileges, loads the seccomp filter (seccomp.py, next to this
file), starts the console and reaps orphans; when init exits, the kernel
kills whatever is left in the pid namespace.

Exit status: the console's own status, or 111 when the sandbox could not be
built (the reason is printed on the terminal first).
"""

import ctypes
import fcntl
import importlib.util
import json
import os
import signal
import socket
import stat
import sys
import termios
import time
import types

SETUP_FAILED = 111
MAX_FD = 65536

# The relay (init's loop): how much console output it holds before it stops
# reading the console's terminal, and how long, and how much, it still passes
# on once the console has exited.
RELAY_HIGH = 65536
RELAY_BATCH = 32768
RELAY_FLOOD_READ = 4000  # a PTY read returns at most 4 KiB
RELAY_HOLD_MS = 1
# A stream of output (print in a loop, IPython's `!` passing on a pipeline
# line by line): while output keeps coming within RELAY_STREAM_GAP, init
# passes on what it read and then sleeps a rest, so that the console's writes
# gather in the PTY and cost one read, one pipe write and one wake-up of the
# server per rest instead of one each per write. A lone write (an echo) still
# goes at once. The PTY holds about 20 KB before the console blocks in its
# write, so the rest adapts: shorter when a read brings RELAY_REST_FULL or
# more (a fast writer, which a long rest would block), longer when it brings
# less than RELAY_REST_THIN; at 0 the flood hold above applies instead.
RELAY_STREAM_GAP = 0.002
RELAY_RESTS = (0.0, 0.0005, 0.001, 0.002)  # seconds
RELAY_REST_FULL = 12288
RELAY_REST_THIN = 3072
RELAY_FLUSH_BYTES = 1 << 20
RELAY_FLUSH_SECONDS = 2.0

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18

PR_SET_PDEATHSIG = 1
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38

# The signals a terminal sends to its foreground process group. The launcher
# and init share that group with the console and must survive them.
TERMINAL_SIGNALS = (signal.SIGINT, signal.SIGQUIT, signal.SIGTSTP,
                    signal.SIGTTIN, signal.SIGTTOU)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                        ctypes.c_ulong, ctypes.c_char_p)
_libc.unshare.argtypes = (ctypes.c_int,)
_libc.prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong, ctypes.c_ulong)


class SetupError(Exception):
    """The sandbox could not be built; the message says which step failed."""


def _load_sibling(name):
    """Import ``name``.py from this file's directory.

    ``-I`` keeps the script's directory off sys.path, which is what we want
    for everything else: load this one file by its path instead.
    """
    if name in _SIBLINGS:  # loaded before the fork (the fork server's template)
        return _SIBLINGS[name]
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), name + ".py")
    module_spec = importlib.util.spec_from_file_location("shellserver_" + name, path)
    assert module_spec is not None and module_spec.loader is not None  # a .py file's
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    _SIBLINGS[name] = module
    return module


_SIBLINGS: dict[str, types.ModuleType] = {}


def _check(result, what):
    if result != 0:
        err = ctypes.get_errno()
        raise SetupError(f"{what}: {os.strerror(err)}")


def _b(value):
    return None if value is None else os.fsencode(value)


def mount(source, target, fstype, flags=0, data=None):
    _check(_libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data)),
           f"mount {fstype or source} on {target}")


def unshare(flags):
    _check(_libc.unshare(flags), "unshare")


def prctl(option, value):
    _check(_libc.prctl(option, value, 0, 0, 0), f"prctl {option}")


# -- cgroups (launcher side) --------------------------------------------------

def write_file(path, text):
    with open(path, "w") as f:
        f.write(text)


def create_cgroups(cgroups):
    """Create each cgroup directory and write its limits."""
    for group in cgroups:
        try:
            os.mkdir(group["path"], 0o755)
        except FileExistsError:
            pass
        for name, value in group["limits"].items():
            write_file(os.path.join(group["path"], name), str(value))


def join_cgroups(cgroups, pid):
    for group in cgroups:
        write_file(os.path.join(group["path"], "cgroup.procs"), str(pid))


def kill_cgroups(cgroups):
    """Kill every process in the session's cgroups (cgroup2 cgroup.kill)."""
    for group in cgroups:
        kill = os.path.join(group["path"], "cgroup.kill")
        if os.path.exists(kill):
            try:
                write_file(kill, "1")
            except OSError:
                pass


def remove_cgroups(cgroups, deadline):
    """Remove the cgroup directories once they are empty, until deadline."""
    remaining = [g["path"] for g in cgroups]
    while remaining and time.monotonic() < deadline:
        for path in list(remaining):
            try:
                os.rmdir(path)
            except FileNotFoundError:
                remaining.remove(path)
            except OSError:
                continue
            else:
                remaining.remove(path)
        if remaining:
            time.sleep(0.005)
    return remaining


# -- the root filesystem (init side, in the new mount namespace) --------------

def build_root(spec):
    root = spec["root"]
    rw_flags = MS_NOSUID | MS_NODEV
    mount("none", "/", None, MS_REC | MS_PRIVATE)
    mount("shellserver", root, "tmpfs", rw_flags, "size=1m,nr_inodes=1024,mode=0755")

    def inside(path):
        return os.path.join(root, path.lstrip("/"))

    for link, target in spec["symlinks"].items():
        os.symlink(target, inside(link))

    for tmpfs in spec["tmpfs"]:
        target = inside(tmpfs["path"])
        os.makedirs(target, 0o755, exist_ok=True)
        options = f"size={tmpfs['bytes']},nr_inodes={tmpfs['inodes']},mode={tmpfs['mode']}"
        if tmpfs.get("owned"):
            options += f",uid={spec['uid']},gid={spec['gid']}"
        mount("tmpfs", target, "tmpfs", rw_flags | MS_NOEXEC * tmpfs.get("noexec", 0),
              options)

    # Shared trees after the tmpfs mounts, so one under /tmp (a runtime in a
    # temporary state directory) is not hidden by the console's /tmp.
    for path in spec["read_only_binds"]:
        target = inside(path)
        if os.path.isdir(path):
            os.makedirs(target, 0o755, exist_ok=True)
            mount_shared_tree(path, target)
            continue
        os.makedirs(os.path.dirname(target), 0o755, exist_ok=True)
        open(target, "w").close()
        mount(path, target, None, MS_BIND | MS_REC)
        mount(None, target, None,
              MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)

    build_dev(inside("/dev"), spec["dev"])

    os.makedirs(inside("/proc"), 0o555, exist_ok=True)
    mount("proc", inside("/proc"), "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC,
          "hidepid=2")

    os.makedirs(inside("/etc"), 0o755, exist_ok=True)
    for name, text in spec["etc"].items():
        write_file(inside("/etc/" + name), text)
        os.chmod(inside("/etc/" + name), 0o644)
    for path in spec["copies"]:
        if os.path.exists(path):
            with open(path, "rb") as src, open(inside(path), "wb") as dst:
                dst.write(src.read())

    # Nothing in the root itself is writable by the console.
    mount(None, root, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)


# Characters overlayfs's mount options give a meaning to (layer and option
# separators, escapes); a shared tree's path must not contain them.
OVERLAY_SPECIAL = ":,\\"


def mount_shared_tree(path, target):
    """``path`` read-only at ``target``, as an overlay of this sandbox's own.

    Not a bind mount: through a bind, a console's flock(LOCK_EX) or fcntl
    read lock is on the host's inode, so it blocks every other console and
    the host on that file (one console locking the runtime's pyvenv.cfg
    made every other console's lock attempt fail with EAGAIN). An overlay
    has its own inodes, so locks taken through it stay in this sandbox;
    reads and mmaps go to the host's files, so the page cache is shared.
    Without an upper layer overlayfs wants two lower layers: the second is
    ``target`` itself, an empty directory until this mount covers it.
    """
    if any(c in OVERLAY_SPECIAL for c in path + target):
        raise SetupError(f"cannot present {path!r} read-only: overlayfs does not "
                         f"take paths with any of {OVERLAY_SPECIAL!r}")
    mount("overlay", target, "overlay", MS_RDONLY | MS_NOSUID | MS_NODEV,
          f"lowerdir={path}:{target}")


DEVICES = {
    "null": (1, 3), "zero": (1, 5), "full": (1, 7),
    "random": (1, 8), "urandom": (1, 9), "tty": (5, 0),
}


def build_dev(dev, devices):
    """A read-only /dev: a few devices, a devpts and a /dev/shm of its own.

    devpts instances share the kernel's PTY pool (kernel.pty.max less
    kernel.pty.reserve for all of them): ``max=`` bounds this sandbox's
    share, or one console could take every PTY on the host. /dev/shm is
    capped in inodes as well as bytes: empty files cost kernel memory too.
    """
    os.makedirs(dev, 0o755, exist_ok=True)
    mount("tmpfs", dev, "tmpfs", MS_NOSUID | MS_NOEXEC, "size=64k,mode=0755")
    for name, (major, minor) in DEVICES.items():
        path = os.path.join(dev, name)
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(major, minor))
        os.chmod(path, 0o666)
    os.mkdir(os.path.join(dev, "pts"), 0o755)
    mount("devpts", os.path.join(dev, "pts"), "devpts", MS_NOSUID | MS_NOEXEC,
          f"newinstance,ptmxmode=0666,mode=0620,max={devices['pts_max']}")
    os.symlink("pts/ptmx", os.path.join(dev, "ptmx"))
    os.mkdir(os.path.join(dev, "shm"), 0o755)
    mount("tmpfs", os.path.join(dev, "shm"), "tmpfs",
          MS_NOSUID | MS_NODEV | MS_NOEXEC,
          f"size={devices['shm_bytes']},nr_inodes={devices['shm_inodes']},mode=1777")
    for name, target in (("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2"), ("fd", "/proc/self/fd")):
        os.symlink(target, os.path.join(dev, name))
    mount(None, dev, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NOEXEC)


# -- init ---------------------------------------------------------------------

def drop_privileges(spec):
    import resource

    for name, (soft, hard) in spec["rlimits"].items():
        resource.setrlimit(getattr(resource, "RLIMIT_" + name), (soft, hard))
    # An empty bounding set: even a file capability could grant nothing
    # (no_new_privs and nosuid mounts already stop that; this is the belt).
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last_cap = int(f.read())
    for cap in range(last_cap + 1):
        prctl(PR_CAPBSET_DROP, cap)
    os.setgroups([])
    os.setresgid(spec["gid"], spec["gid"], spec["gid"])
    os.setresuid(spec["uid"], spec["uid"], spec["uid"])
    if os.getuid() != spec["uid"] or os.geteuid() != spec["uid"]:
        raise SetupError("could not drop privileges")
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    # setuid cleared any parent-death signal: set it after the drop.
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def run_init(spec, go_fd, out_fd, console_entry=None):
    """Pid 1 of the sandbox: build it, start the console, reap, exit with it."""
    # Wait until the launcher has moved us into the session's cgroups, so the
    # cgroup namespace is rooted there.
    if os.read(go_fd, 1) != b"g":
        os._exit(SETUP_FAILED)
    os.close(go_fd)
    # Not the launcher's handlers: as pid 1, init then gets no TERM or HUP
    # from inside the sandbox at all (the launcher's kill ends it).
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    try:
        # Built while the host's files (this directory, libseccomp) are in
        # view; loaded once init is unprivileged. Init is then bound by it as
        # well as the console: nothing runs in the sandbox without it.
        syscall_filter = _load_sibling("seccomp").Filter()
        unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS
                | CLONE_NEWCGROUP)
        build_root(spec)
        socket.sethostname(spec["hostname"])
        os.chroot(spec["root"])
        os.chdir("/")
        drop_privileges(spec)
        syscall_filter.load()
        syscall_filter.release()
    except Exception as e:  # noqa: BLE001 - any failure must end setup cleanly
        os.write(2, f"\r\nshellserver: the sandbox could not be built: {e}\r\n".encode())
        os._exit(SETUP_FAILED)

    try:
        master, console, wake = start_console(spec, console_entry)
    except OSError as e:
        os.write(2, f"\r\nshellserver: could not start {spec['argv'][0]}: {e}\r\n".encode())
        os._exit(SETUP_FAILED)
    os._exit(relay(master, out_fd, console, wake))


def start_console(spec, console_entry=None):
    """The console on a terminal of the sandbox's own.

    Returns the terminal's master, the console's pid, and the pipe signals
    arrive on (a byte each, to wake relay's poll). ``console_entry`` (the
    fork server's) is called instead of execve, with everything else done.
    The launcher's terminal (the server's PTY) stays with init and carries
    keystrokes in; the console's output leaves through the output pipe.
    """
    wake_read, wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_write, warn_on_full_buffer=False)
    for sig in (signal.SIGCHLD, signal.SIGWINCH):
        signal.signal(sig, lambda signum, frame: None)
    master, slave = os.openpty()
    copy_size(master)
    console = os.fork()
    if console == 0:
        try:
            for sig in TERMINAL_SIGNALS + (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD,
                                           signal.SIGWINCH):
                signal.signal(sig, signal.SIG_DFL)
            signal.set_wakeup_fd(-1)
            os.setsid()
            fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
            for fd in (0, 1, 2):
                os.dup2(slave, fd)
            # Nothing of init's: not the server's terminal, not the output pipe.
            os.closerange(3, MAX_FD)
            os.chdir(spec["cwd"])
            if console_entry is not None:
                console_entry(spec)
            os.execve(spec["argv"][0], spec["argv"], spec["env"])
        except OSError as e:
            os.write(2, f"\r\nshellserver: could not start {spec['argv'][0]}: {e}\r\n"
                     .encode())
        os._exit(SETUP_FAILED)
    # Init keeps the slave open (it is never closed): the master does not hang
    # up while init runs, and what the console wrote before it exited can
    # still be read.
    return master, console, wake_read


def copy_size(master):
    """The server's terminal size onto the console's (which then gets SIGWINCH)."""
    try:
        size = fcntl.ioctl(0, termios.TIOCGWINSZ, bytes(8))
        fcntl.ioctl(master, termios.TIOCSWINSZ, size)
    except OSError:
        pass


def relay(master, out, console, wake):
    """Init's loop until the console exits; returns its exit status.

    Output: the console's terminal (the kernel hands a PTY's reader 4 KiB at a
    time, so this loop pays that cost, on the sandbox's CPU) into the output
    pipe, which the server reads in large pieces. When the pipe is full (the
    server stopped reading: its client is behind) this stops reading the
    terminal and the console blocks. A stream of small writes is gathered
    by rests between reads (RELAY_RESTS). Keystrokes: the server's terminal into
    the console's, whatever the output does. Signals: SIGWINCH copies the
    size, SIGCHLD reaps (init reaps orphans too).
    """
    import select

    for fd in (0, master, out):
        os.set_blocking(fd, False)
    pending = bytearray()  # output not yet in the pipe
    typed = bytearray()  # keystrokes not yet in the console's terminal
    poller = select.poll()
    poller.register(wake, select.POLLIN)
    keys_open = True
    holding = False  # gathering a flood's output into one write
    last_read = -RELAY_STREAM_GAP  # when output last came, or a rest ended
    rest = 0  # index into RELAY_RESTS, adapted to the console's pace
    status = None
    while status is None:
        poller.register(master, (select.POLLIN if len(pending) < RELAY_HIGH else 0)
                        | (select.POLLOUT if typed else 0))
        if out >= 0:
            poller.register(out, select.POLLOUT if pending and not holding else 0)
        if keys_open:
            poller.register(0, select.POLLIN if len(typed) < RELAY_HIGH else 0)
        events = dict(poller.poll(RELAY_HOLD_MS if holding else None))
        holding = False
        resting = False
        if wake in events:
            try:
                signals = os.read(wake, 256)
            except BlockingIOError:
                signals = b""
            if signal.SIGWINCH in signals:
                copy_size(master)
            status = reap(console)
        if events.get(master, 0) & select.POLLIN:
            got = read_output(master, pending)
            now = time.monotonic()
            if got and now - last_read < RELAY_STREAM_GAP:
                if got >= RELAY_REST_FULL:
                    rest = max(0, rest - 1)
                elif got < RELAY_REST_THIN:
                    rest = min(len(RELAY_RESTS) - 1, rest + 1)
                resting = rest > 0
            if got:
                last_read = now
            # Without a rest, a full read means a flood: write once
            # RELAY_BATCH is together (or nothing came for RELAY_HOLD_MS),
            # not at each 4 KiB; every write wakes the server.
            holding = not resting and got >= RELAY_FLOOD_READ and len(pending) < RELAY_BATCH
        if pending and out >= 0 and not holding:
            out = write_output(out, pending)
        if out < 0:
            pending.clear()  # the server has gone: nobody to show it to
        if 0 in events:
            try:
                keys = os.read(0, 65536)
            except BlockingIOError:
                keys = None
            except OSError:
                keys = b""
            if keys == b"":
                keys_open = False
                poller.unregister(0)
            elif keys:
                typed += keys
        if typed:
            try:
                del typed[:os.write(master, typed)]
            except BlockingIOError:
                pass
        if resting and status is None:
            # Keystrokes and signals wait too, at most the rest (2 ms).
            time.sleep(RELAY_RESTS[rest])
            last_read = time.monotonic()
    # The console has exited: what it wrote last, then its status.
    read_output(master, pending, limit=RELAY_FLUSH_BYTES, drain=True)
    deadline = time.monotonic() + RELAY_FLUSH_SECONDS
    while pending and out >= 0 and time.monotonic() < deadline:
        select.select([], [out], [], max(0.0, deadline - time.monotonic()))
        out = write_output(out, pending)
    return status


def read_output(master, pending, limit=RELAY_HIGH, drain=False):
    """Read what the console's terminal has (up to ``limit`` held); how much.

    A read shorter than a PTY's 4 KiB took all there was: stop there unless
    ``drain``. A console writing small pieces as fast as it can would
    otherwise keep this loop reading them one by one, a read per write.
    """
    got = 0
    while len(pending) < limit:
        try:
            data = os.read(master, 65536)
        except (BlockingIOError, OSError):
            return got
        if not data:
            return got
        pending += data
        got += len(data)
        if len(data) < RELAY_FLOOD_READ and not drain:
            return got
    return got


def write_output(out, pending):
    """Write what the pipe takes; -1 when the server closed it."""
    try:
        del pending[:os.write(out, pending)]
    except BlockingIOError:
        pass
    except OSError:
        os.close(out)
        return -1
    return out


def reap(console):
    """Reap every exited child; the console's exit status once it has gone."""
    status = None
    while True:
        try:
            pid, wait_status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return SETUP_FAILED if status is None else status
        if pid == 0:
            return status
        if pid == console:
            status = os.waitstatus_to_exitcode(wait_status) & 0xFF


# -- launcher -----------------------------------------------------------------

def main(argv):
    return run(json.loads(argv[1]))


def run(spec, console_entry=None, close_in_init=()):
    """Build and run the sandbox; its exit status.

    The fork server calls this in its forked child with its ``console_entry``
    and the descriptors init must not keep (``close_in_init``).
    """
    for sig in TERMINAL_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    cgroups = spec["cgroups"]

    stopping = []

    def stop(signum, frame):
        # Before init is in the cgroups, killing them misses it: noted, and
        # init is not let go (below).
        stopping.append(signum)
        kill_cgroups(cgroups)
        yield_cpu()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, stop)

    try:
        # The server made this FIFO and has it open for reading; init writes
        # the console's output to it. Nobody else may ever open it.
        out = os.open(spec["output"], os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        os.unlink(spec["output"])
        create_cgroups(cgroups)
        unshare(CLONE_NEWPID)
    except (OSError, SetupError) as e:
        os.write(2, f"\r\nshellserver: the sandbox could not be built: {e}\r\n".encode())
        remove_cgroups(cgroups, time.monotonic() + 1)
        return SETUP_FAILED

    go_read, go_write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(go_write)
        for fd in close_in_init:
            os.close(fd)
        run_init(spec, go_read, out, console_entry)
        os._exit(SETUP_FAILED)  # not reached
    os.close(go_read)
    os.close(out)
    try:
        join_cgroups(cgroups, pid)
        if stopping:
            os.kill(pid, signal.SIGKILL)
        else:
            os.write(go_write, b"g")
    except OSError as e:
        os.write(2, f"\r\nshellserver: the sandbox could not be built: {e}\r\n".encode())
        os.kill(pid, signal.SIGKILL)
    os.close(go_write)

    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except ChildProcessError:
            status = SETUP_FAILED << 8
            break
    kill_cgroups(cgroups)
    yield_cpu()
    remove_cgroups(cgroups, time.monotonic() + 2)
    return os.waitstatus_to_exitcode(status) & 0xFF if os.WIFEXITED(status) else 128 + (
        os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0)


def yield_cpu():
    """The sandbox is ending: what is left of it runs only on spare CPU.

    Called once the cgroups are killed (that must not wait): removing them
    and this process's exit must not take CPU from consoles still in use.
    When the CPUs are saturated this can take a while; the server's KILL
    after its kill_delay, and its CgroupReaper, bound it.
    """
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except OSError:
        pass


if __name__ == "__main__":
    # No interpreter finalization: nothing is left to flush, and it would
    # cost each ending sandbox milliseconds of the server's CPU.
    os._exit(main(sys.argv))
