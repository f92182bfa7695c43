"""Start-up: the checks and preparations made before the service tree is built.

``Options`` (shellserver.tap) runs them: the host is checked (root,
namespaces, cgroups, the system python), the open-files limit and the
kernel's pools are sized for the admission capacity, and the state directory
and the cgroup tree are made ready (``prepare_state``); ``makeService`` then
only wires what they return.

Start-up refusals: the host cannot give the server what it needs. Such a
refusal is not a crash: restarting cannot help until an operator changes the
host or the unit. The server exits with ``EXIT_HOST_REFUSED``,
which etc/shellserver.service lists in ``RestartPreventExitStatus=``, so
systemd does not restart it in a loop.
"""

from __future__ import annotations

import hashlib
import os
import resource
import sys
from typing import TYPE_CHECKING, TextIO

from attrs import frozen
from twisted.python import usage

from shellserver.config import Config, ConfigError, load_config_file
from shellserver.sandbox.cgroups import CgroupLayout

if TYPE_CHECKING:
    from shellserver.auth import UsedTokenFile

# EX_CONFIG from sysexits.h: a configuration error (of the host, here).
EXIT_HOST_REFUSED = 78
# --check-config's exit status for a file that cannot be used: EX_CONFIG, as
# for the host's refusals (systemd's ExecStartPre= fails with it, unrestarted).
EXIT_CONFIG_INVALID = EXIT_HOST_REFUSED
NAMESPACES = ("mnt", "pid", "net", "ipc", "uts", "cgroup")
# Open files the server holds for each console besides its connection (the
# launcher's PTY, the console's PTY master or, before it, its handoff socket,
# and, on the fork server's path, the launcher's pidfd and status
# connection; the classic path has one spare),
# and for everything else (listeners, the log, the state directory, the
# reactor's own).
FILES_PER_CONSOLE = 4
FILES_RESERVED = 256
FEWEST_CONNECTIONS = 16


class HostRefusal(usage.UsageError):
    """The host refuses something the sandbox needs; the message says what
    to change."""


def exit_refused(refusal: HostRefusal, stream=None) -> SystemExit:
    """Write the refusal (one line, no traceback, no usage text) and return
    the SystemExit to raise."""
    # sys.stderr looked up now, so that tests can replace it.
    (stream or sys.stderr).write(f"shellserver: cannot start: {refusal}\n")
    return SystemExit(EXIT_HOST_REFUSED)


def check_config(path: str, out: TextIO, err: TextIO) -> SystemExit:
    """``--check-config``: read and validate ``path`` only (no state
    directory, cgroup, listener or sandbox is touched); say "ok" on ``out``
    or the problem, naming the key, on ``err``; the SystemExit to raise."""
    try:
        load_config_file(path)
    except ConfigError as e:
        err.write(f"shellserver: {path}: {e}\n")
        return SystemExit(EXIT_CONFIG_INVALID)
    out.write(f"ok: {path}\n")
    return SystemExit(0)


def check_host(config: Config) -> None:
    """Refuse to start where consoles could not be sandboxed."""
    from shellserver.sandbox.cgroups import CgroupError, read_layout

    if os.geteuid() != 0:
        raise usage.UsageError(
            "shellserver must run as root: it builds a sandbox (namespaces, "
            "cgroups, a private uid) for every console and will not run "
            "consoles unsandboxed."
        )
    missing = [ns for ns in NAMESPACES if not os.path.exists(f"/proc/self/ns/{ns}")]
    if missing:
        raise usage.UsageError(
            "this kernel lacks the namespaces the sandbox needs: " + ", ".join(missing)
        )
    try:
        layout = read_layout()
    except (CgroupError, OSError) as e:
        raise HostRefusal(f"cgroups: {e}") from e
    move_to_delegated_scope(layout, config)
    python = config.sandbox.system_python
    if not os.access(python, os.X_OK):
        raise usage.UsageError(
            f"sandbox.system_python: {python} is missing (install python3 and python3-venv)"
        )


def move_to_delegated_scope(layout: CgroupLayout, config: Config) -> None:
    """Started by hand where the server's cgroup lacks controllers, on a
    systemd host: re-execute in a delegated scope (see shellserver.scope).
    Returns when it stays (then prepare_parents refuses if it must)."""
    from shellserver import scope

    available: list[str] = []
    if layout.v2_controllers and layout.own:
        try:
            with open(os.path.join(layout.own, "cgroup.controllers")) as f:
                available = f.read().split()
        except OSError:
            return  # prepare_parents names the file and the error
    reason = scope.move_reason(v2_controllers=layout.v2_controllers, own_cgroup=layout.own,
                               available=available, environ=os.environ,
                               systemd_running=os.path.isdir("/run/systemd/system"))
    if reason is None:
        return
    why_not = scope.reexec_in_scope(reason, instance_name(config.server.state_dir))
    if why_not:
        sys.stderr.write(f"shellserver: not moving into a delegated scope: {why_not}\n")


@frozen
class PreparedState:
    """What start-up made ready in the state directory and the cgroup tree."""

    secret: bytes
    layout: CgroupLayout
    sandbox_root: str
    pipes: str
    runtime: str
    build_runtime: bool
    tls: tuple[str, str] | None
    busy_uids: frozenset[int]
    notices: tuple[str, ...]
    used_tokens: UsedTokenFile | None = None  # single use across restarts


def instance_name(state_dir: str) -> str:
    """A cgroup directory name for the server that owns ``state_dir``."""
    return "i" + hashlib.sha256(os.fsencode(state_dir)).hexdigest()[:12]


def prepare_state(config: Config, *, need_tls: bool) -> PreparedState:
    """Make the state directory and the cgroup tree ready, or say clearly why not.

    Also sweeps what a previous run of this server left (it was SIGKILLed):
    session cgroups are killed and removed, and uids still owning processes
    are never handed out.
    """
    from shellserver.auth import (
        SecretFileError,
        UsedTokenFile,
        UsedTokenFileError,
        load_or_create_secret,
    )
    from shellserver.sandbox.cgroups import CgroupError, prepare_parents, read_layout, sweep
    from shellserver.sandbox.output import prepare_directory as prepare_pipes
    from shellserver.sandbox.runtime import (
        RuntimeProblem,
        check_overlay_path,
        check_prebuilt,
        has_waiter,
        runtime_is_ready,
    )
    from shellserver.sandbox.spec import WAITER
    from shellserver.sandbox.uids import uids_in_use
    from shellserver.tls import ensure_self_signed

    state_dir = config.server.state_dir
    notices = []
    # Checked first: a start that fails here leaves nothing behind.
    try:
        check_overlay_path("sandbox.runtime", config.sandbox.runtime or config.runtime_dir)
        check_overlay_path("server.state_dir", state_dir)  # holds the sandbox root
    except RuntimeProblem as e:
        raise usage.UsageError(str(e)) from e
    if config.sandbox.runtime:
        runtime, build = config.sandbox.runtime, False
        try:
            check_prebuilt(runtime, config.sandbox.packages)
        except (RuntimeProblem, OSError) as e:
            raise usage.UsageError(str(e)) from e
        if not has_waiter(runtime):
            notices.append(
                f"sandbox.runtime {runtime} has no {WAITER} (built before it): each "
                f"console keeps two waiting Python processes, a few MB more; rebuild it "
                f"with python -m shellserver.sandbox.runtime {runtime}")
    else:
        runtime = config.runtime_dir
        # Rebuilt when sandbox.packages (or what a build installs) changed.
        build = not runtime_is_ready(runtime, config.sandbox.packages)
    try:
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        os.chmod(state_dir, 0o700)
        secret = load_or_create_secret(config.secret_path)
        used_tokens = UsedTokenFile.open(os.path.join(state_dir, "used-tokens"))
        sandbox_root = os.path.join(state_dir, "sandbox-root")
        os.makedirs(sandbox_root, mode=0o755, exist_ok=True)
        pipes = os.path.join(state_dir, "pipes")
        stale_pipes = prepare_pipes(pipes)
        tls = None
        if need_tls:
            if config.tls.certificate:
                tls = (config.tls.certificate, config.tls.private_key)
            else:
                tls = ensure_self_signed(config.tls_dir)
        layout = read_layout().for_instance(instance_name(state_dir))
        notices += prepare_parents(layout)
    except (SecretFileError, UsedTokenFileError) as e:
        raise usage.UsageError(str(e)) from e
    except CgroupError as e:
        raise HostRefusal(f"cgroups: {e}") from e
    except OSError as e:
        where = e.filename or state_dir
        raise usage.UsageError(
            f"server.state_dir {state_dir}: cannot prepare {where}: {e.strerror or e}"
        ) from e

    if stale_pipes:
        notices.append(f"removed {stale_pipes} terminal handoff sockets a previous run left behind")
    removed, remaining = sweep(layout)
    if removed:
        notices.append(f"removed {len(removed)} cgroups a previous run left behind")
    if remaining:
        raise usage.UsageError(
            "cgroups of a previous run cannot be removed (processes in them do not "
            "die): " + ", ".join(remaining)
        )
    busy = frozenset(uids_in_use(config.sandbox.uid_min, config.sandbox.uid_max))
    if busy:
        notices.append(f"uids still in use by other processes, never handed out: "
                       f"{sorted(busy)}")

    return PreparedState(secret=secret, layout=layout, sandbox_root=sandbox_root, pipes=pipes,
                         runtime=runtime, build_runtime=build, tls=tls, busy_uids=busy,
                         notices=tuple(notices), used_tokens=used_tokens)


@frozen
class ConnectionPlan:
    """How many consoles and connections this server takes, once the
    open-files limit is known; ``notices`` say what was lowered."""

    capacity: int
    max_connections: int
    notices: tuple[str, ...]


def plan_connections(config: Config) -> ConnectionPlan:
    """The admission capacity, and ``server.max_connections`` within what the
    process may open.

    Raises the open-files limit to its hard limit first (a root shell
    starts with 1024).
    """
    open_files = raise_open_files_limit()
    try:
        capacity, pool_notices = fit_host_pools_to(config, admission_capacity(config))
        cap, notices = connection_budget(config.server.max_connections, capacity, open_files)
    except ValueError as e:
        raise usage.UsageError(str(e)) from e
    return ConnectionPlan(capacity=capacity, max_connections=cap,
                          notices=(*pool_notices, *notices))


def fit_host_pools_to(config: Config, capacity: int) -> tuple[int, list[str]]:
    """Size the host-wide kernel pools (PTYs, pids, files) for ``capacity``
    consoles, or lower it (shellserver.sandbox.hostpools)."""
    from shellserver.sandbox import hostpools
    from shellserver.sandbox.spec import SandboxLimits

    with open("/proc/meminfo") as f:
        memory_kib = hostpools.memory_kib(f.read())
    pools = hostpools.host_pools(SandboxLimits.from_config(config.sandbox), memory_kib,
                                 hostpools.read_proc_sysctl)
    return hostpools.fit_host_pools(capacity, pools, hostpools.write_proc_sysctl)


def raise_open_files_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard one; the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def connection_budget(max_connections: int, capacity: int,
                      open_files: int) -> tuple[int, list[str]]:
    """How many connections fit in ``open_files`` beside ``capacity`` consoles
    (pure): ``max_connections`` when they fit, else fewer with a notice.
    ValueError when not even FEWEST_CONNECTIONS fit."""
    room = open_files - FILES_RESERVED - FILES_PER_CONSOLE * capacity
    if room >= max_connections:
        return max_connections, []
    advice = ("raise the limit (LimitNOFILE= in the systemd unit, ulimit -n in a shell) "
              "or lower admission.capacity")
    if room < FEWEST_CONNECTIONS:
        raise ValueError(
            f"the process may open only {open_files} files: too few for {capacity} "
            f"consoles ({FILES_PER_CONSOLE} files each) and {FEWEST_CONNECTIONS} "
            f"connections; {advice}")
    return room, [
        f"server.max_connections lowered from {max_connections} to {room}: the process "
        f"may open only {open_files} files, and {capacity} consoles need "
        f"{FILES_PER_CONSOLE} each; {advice}"]


def admission_capacity(config: Config) -> int:
    """``admission.capacity``, or else derived from the machine's memory."""
    from shellserver.admission import capacity_for_cost
    from shellserver.sandbox.forked import console_cost_mb

    if config.admission.capacity:
        return config.admission.capacity
    with open("/proc/meminfo") as f:
        fixed_mb, console_mb = console_cost_mb(config.sandbox.fork_server)
        return capacity_for_cost(f.read(), console_mb=console_mb, fixed_mb=fixed_mb,
                                 memory_mb=config.sandbox.memory_mb)


def admin_token(config: Config) -> str:
    """The admin page's token from the state directory, made if absent."""
    from shellserver.admin import TOKEN_FILE, AdminTokenError, load_or_create_token

    try:
        return load_or_create_token(os.path.join(config.server.state_dir, TOKEN_FILE))
    except AdminTokenError as e:
        raise usage.UsageError(f"--admin: {e}") from e
