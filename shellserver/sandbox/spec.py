"""The sandbox spec: a pure value describing one console's sandbox.

``build_spec`` turns the configuration, a session name, a uid and the cgroup
layout into a ``SandboxSpec``; the launcher (run as root in the child)
receives it as JSON and applies it. Nothing here touches the system.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from attrs import field, frozen

from shellserver.sandbox.cgroups import CgroupGroup, CgroupLayout

CONSOLE_USER = "console"
CONSOLE_HOME = "/home/console"
CONSOLE_HOSTNAME = "console"

# Debian 12 merges /bin, /sbin and /lib* into /usr: symlinks suffice.
MERGED_USR_LINKS = {
    "/bin": "usr/bin",
    "/sbin": "usr/sbin",
    "/lib": "usr/lib",
    "/lib64": "usr/lib64",
}

# Host files copied (not bound) into the sandbox's /etc.
HOST_ETC_COPIES = ("/etc/ld.so.cache", "/etc/localtime")

# PTYs one console's devpts may hand out (devpts ``max=``): its own terminal
# and a few for programs that run others on a terminal (pty.spawn, pexpect,
# script). Every devpts draws on one host-wide pool (kernel.pty.max less
# kernel.pty.reserve); see shellserver.sandbox.hostpools.
DEFAULT_MAX_PTYS = 8
# The console's /dev/shm (a tmpfs): bytes, and inodes as for /tmp and home.
SHM_BYTES = 8 * 1024 * 1024


@frozen
class SandboxLimits:
    """Resource limits for one console."""

    memory_bytes: int
    pids_max: int
    cpu_shares: int
    cpu_quota: float
    tmp_bytes: int
    home_bytes: int
    max_open_files: int
    max_file_bytes: int
    max_processes: int
    max_ptys: int = DEFAULT_MAX_PTYS

    @classmethod
    def from_config(cls, sandbox) -> SandboxLimits:
        mib = 1024 * 1024
        return cls(
            memory_bytes=sandbox.memory_mb * mib,
            pids_max=sandbox.pids_max,
            cpu_shares=sandbox.cpu_shares,
            cpu_quota=sandbox.cpu_quota,
            tmp_bytes=sandbox.tmp_mb * mib,
            home_bytes=sandbox.home_mb * mib,
            max_open_files=sandbox.max_open_files,
            max_file_bytes=sandbox.max_file_mb * mib,
            max_processes=sandbox.max_processes,
            max_ptys=sandbox.max_ptys,
        )


@frozen
class SandboxSpec:
    """Everything the launcher needs to build and run one sandbox."""

    session: str
    uid: int
    gid: int
    root: str
    runtime: str
    argv: tuple[str, ...]
    env: Mapping[str, str]
    cwd: str
    hostname: str
    read_only_binds: tuple[str, ...]
    symlinks: Mapping[str, str]
    tmpfs: tuple[Mapping[str, object], ...]
    etc: Mapping[str, str]
    copies: tuple[str, ...]
    rlimits: Mapping[str, tuple[int, int]]
    cgroups: tuple[CgroupGroup, ...] = field(default=())
    # The unix socket init hands the console's terminal to the server on
    # (see output.py); the server bound it and waits on it.
    output: str = ""
    # The sandbox's /dev: PTYs of its devpts, bytes and inodes of /dev/shm.
    dev: Mapping[str, int] = field(factory=dict)

    @property
    def waiter(self) -> str:
        """What the launcher and init exec once the sandbox runs (waiter.c)."""
        return waiter_path(self.runtime)

    def to_json(self) -> str:
        return json.dumps(
            {
                "session": self.session,
                "uid": self.uid,
                "gid": self.gid,
                "root": self.root,
                "argv": list(self.argv),
                "env": dict(self.env),
                "cwd": self.cwd,
                "hostname": self.hostname,
                "read_only_binds": list(self.read_only_binds),
                "symlinks": dict(self.symlinks),
                "tmpfs": [dict(t) for t in self.tmpfs],
                "etc": dict(self.etc),
                "copies": list(self.copies),
                "rlimits": {k: list(v) for k, v in self.rlimits.items()},
                "cgroups": [
                    {"path": g.path, "limits": dict(g.limits)} for g in self.cgroups
                ],
                "output": self.output,
                "dev": dict(self.dev),
                "waiter": self.waiter,
            },
            separators=(",", ":"),
        )


FREEZE_START_UP = "__import__('gc').freeze()"


# Built into each runtime by shellserver.sandbox.runtime from waiter.c.
WAITER = "libexec/shellserver-waiter"


def waiter_path(runtime: str) -> str:
    """The runtime's waiter: the launcher and init exec it once the sandbox
    runs (the same path inside the sandbox, where the runtime is bound)."""
    return f"{runtime}/{WAITER}"


def console_argv(runtime: str) -> tuple[str, ...]:
    """IPython from the runtime venv, isolated from the user site and env."""
    return (
        f"{runtime}/bin/python",
        "-I",
        "-m",
        "IPython",
        "--no-confirm-exit",
        "--HistoryManager.hist_file=:memory:",
        "--TerminalInteractiveShell.term_title=False",
        # IPython's start-up leaves some hundred thousand long-lived objects;
        # every full collection walked them all, a 20-30 ms hitch in the
        # echo now and then. Frozen, the collector leaves them alone.
        f"--InteractiveShellApp.exec_lines={FREEZE_START_UP}",
    )


def console_env(runtime: str, uid: int) -> dict[str, str]:
    return {
        "PATH": f"{runtime}/bin:/usr/local/bin:/usr/bin:/bin",
        "HOME": CONSOLE_HOME,
        "USER": CONSOLE_USER,
        "LOGNAME": CONSOLE_USER,
        "SHELL": "/bin/sh",
        "TERM": "xterm-256color",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
        # Nothing may answer prompt_toolkit's cursor-position request in
        # time (pre-started consoles, plain clients): don't ask.
        "PROMPT_TOOLKIT_NO_CPR": "1",
        "IPYTHONDIR": f"{CONSOLE_HOME}/.ipython",
        "MPLCONFIGDIR": "/tmp",
    }


def etc_files(uid: int, gid: int) -> dict[str, str]:
    """A synthetic /etc naming only the console user."""
    return {
        "passwd": (
            f"{CONSOLE_USER}:x:{uid}:{gid}:Console user:{CONSOLE_HOME}:/bin/sh\n"
            "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
        ),
        "group": f"{CONSOLE_USER}:x:{gid}:\nnogroup:x:65534:\n",
        "hostname": f"{CONSOLE_HOSTNAME}\n",
        "hosts": f"127.0.0.1\tlocalhost {CONSOLE_HOSTNAME}\n::1\tlocalhost\n",
        "nsswitch.conf": "passwd: files\ngroup: files\nhosts: files\n",
    }


def inodes_for(size: int) -> int:
    """An inode cap for a tmpfs of ``size`` bytes (one per 8 KiB, at least 1024):
    empty files cost memory too, so their number is capped like the bytes."""
    return max(1024, size // 8192)


def build_spec(
    *,
    session: str,
    uid: int,
    limits: SandboxLimits,
    runtime: str,
    root: str,
    cgroup_layout: CgroupLayout | None,
    output: str = "",
    extra_binds: Sequence[str] = (),
) -> SandboxSpec:
    """The sandbox for one console session, as a pure value."""
    gid = uid
    cgroups = (
        cgroup_layout.session_groups(session, limits) if cgroup_layout else ()
    )
    return SandboxSpec(
        session=session,
        uid=uid,
        gid=gid,
        root=root,
        runtime=runtime,
        argv=console_argv(runtime),
        env=console_env(runtime, uid),
        cwd=CONSOLE_HOME,
        hostname=CONSOLE_HOSTNAME,
        read_only_binds=("/usr", runtime, *extra_binds),
        symlinks=MERGED_USR_LINKS,
        tmpfs=(
            {"path": "/tmp", "bytes": limits.tmp_bytes, "mode": "1777",
             "inodes": inodes_for(limits.tmp_bytes)},
            {"path": CONSOLE_HOME, "bytes": limits.home_bytes, "mode": "0700",
             "inodes": inodes_for(limits.home_bytes), "owned": True},
        ),
        etc=etc_files(uid, gid),
        copies=HOST_ETC_COPIES,
        rlimits={
            "NOFILE": (limits.max_open_files, limits.max_open_files),
            "FSIZE": (limits.max_file_bytes, limits.max_file_bytes),
            "NPROC": (limits.max_processes, limits.max_processes),
            "CORE": (0, 0),
        },
        cgroups=tuple(cgroups),
        output=output,
        dev={"pts_max": limits.max_ptys, "shm_bytes": SHM_BYTES,
             "shm_inodes": inodes_for(SHM_BYTES)},
    )
