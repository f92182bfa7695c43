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


def run_init(spec, go_fd, handoff_fd, console_entry=None):
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
        console = start_console(spec, handoff_fd, console_entry)
    except OSError as e:
        os.write(2, f"\r\nshellserver: could not start {spec['argv'][0]}: {e}\r\n".encode())
        os._exit(SETUP_FAILED)
    # From here init only reaps: the waiter does that without this
    # interpreter's pages (the runtime is bound at the same path in here).
    exec_waiter(spec, "init", str(console))
    os._exit(reap_until(console))


def exec_waiter(spec, *args):
    """Become the runtime's shellserver-waiter (waiter.c) with ``args``; if it
    is not there (a runtime built before it), return and wait in Python."""
    waiter = spec.get("waiter")
    if waiter:
        try:
            os.execv(waiter, [waiter, *args])
        except OSError:
            pass


def start_console(spec, handoff_fd, console_entry=None):
    """The console on a terminal of the sandbox's own; returns its pid.

    The terminal's master goes to the server (SCM_RIGHTS on the handoff
    socket), which reads the console's output from it and writes keystrokes
    and the size to it; init keeps no copy, so the console's terminal hangs
    up when the server closes it (or dies). ``console_entry`` (the fork
    server's) is called instead of execve, with everything else done.
    """
    master, slave = os.openpty()
    copy_size(master)
    handoff = socket.socket(fileno=handoff_fd)
    try:
        socket.send_fds(handoff, [b"pty"], [master])
    finally:
        handoff.close()
    console = os.fork()
    if console == 0:
        try:
            for sig in TERMINAL_SIGNALS + (signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)
            os.setsid()
            fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
            for fd in (0, 1, 2):
                os.dup2(slave, fd)
            # Nothing of init's: not the server's terminal, not the master.
            os.closerange(3, MAX_FD)
            os.chdir(spec["cwd"])
            if console_entry is not None:
                console_entry(spec)
            os.execve(spec["argv"][0], spec["argv"], spec["env"])
        except OSError as e:
            os.write(2, f"\r\nshellserver: could not start {spec['argv'][0]}: {e}\r\n"
                     .encode())
        os._exit(SETUP_FAILED)
    os.close(master)
    # Init keeps the slave open (it is never closed, and its waiter inherits
    # it): the master does not hang up while init runs, and what the console
    # wrote before it exited can still be read by the server.
    os.set_inheritable(slave, True)
    return console


def copy_size(master):
    """The launcher's terminal size (the server set it) onto the console's,
    before the console starts; later sizes the server sets on the master."""
    try:
        size = fcntl.ioctl(0, termios.TIOCGWINSZ, bytes(8))
        fcntl.ioctl(master, termios.TIOCSWINSZ, size)
    except OSError:
        pass


def reap_until(console):
    """Init's life after the start: reap every child (orphans too) until the
    console has exited; its exit status. No byte of the console passes here."""
    while True:
        try:
            pid, wait_status = os.waitpid(-1, 0)
        except ChildProcessError:
            return SETUP_FAILED
        if pid == console:
            return os.waitstatus_to_exitcode(wait_status) & 0xFF


# -- launcher -----------------------------------------------------------------

def main(argv):
    return run(json.loads(argv[1]))


def run(spec, console_entry=None, close_in_init=(), status_fd=None):
    """Build and run the sandbox; its exit status.

    The fork server calls this in its forked child with its ``console_entry``,
    the descriptors init must not keep (``close_in_init``) and the
    connection the exit status is written on (``status_fd``). Once init runs,
    this process becomes the waiter and does not return; it returns only
    when the sandbox could not be built, or the runtime has no waiter.
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
        # The server bound this socket and waits on it for the console's
        # terminal, which init sends. Nobody else may ever reach it.
        handoff = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            handoff.connect(spec["output"])
            os.unlink(spec["output"])
        except OSError:
            handoff.close()
            raise
        out = handoff.detach()
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

    # What is left is waiting for init and the teardown: the waiter does it
    # (waiter.c, the same steps as below). A stop signal sent meanwhile stays
    # pending across the exec and reaches the waiter's handler.
    stop_signals = {signal.SIGTERM, signal.SIGHUP}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    if status_fd is not None:
        os.set_inheritable(status_fd, True)
    exec_waiter(spec, "launcher", str(pid), str(-1 if status_fd is None else status_fd),
                *(group["path"] for group in cgroups))
    if status_fd is not None:
        os.set_inheritable(status_fd, False)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, stop_signals)

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
