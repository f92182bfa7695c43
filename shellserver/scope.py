"""Started by hand on a systemd host, move into a delegated scope first.

A root shell's login sits in a session scope whose cgroup is usually not
offered the cpu controller (systemd enables controllers below a unit only
when the unit asks for them), so the server could not limit its consoles
there. Rather than refuse, the server re-executes itself, same argv,
through ``systemd-run --scope -p Delegate=yes``: systemd-run creates a
transient scope with the controllers delegated, moves its own process (the
same pid) into it, and execs the command. This happens during option
parsing, before the reactor runs and before anything is created, so the
login's scope is left as it was.

The decision is the pure ``move_reason``; the exec is ``reexec_in_scope``.
It is not attempted when the server already runs in its own unit (that
unit lacks ``Delegate=yes``: moving out of it would hide the server from
its service manager), when systemd is not PID 1, or when the server has
been re-executed once already (``SHELLSERVER_DELEGATED_SCOPE`` is set):
then ``prepare_parents`` refuses with the message that says what to
change.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence

# Set in the environment of the re-executed server, so that it never tries
# again (a scope that still lacks the controllers would loop otherwise).
MARKER = "SHELLSERVER_DELEGATED_SCOPE"
# Where systemd-run is looked for besides $PATH (a root shell's PATH may be
# minimal, as sudo's secure_path).
FALLBACK_PATH = "/usr/bin:/bin"
NEEDED_CONTROLLERS = ("memory", "pids", "cpu")


def move_reason(*, v2_controllers: bool, own_cgroup: str | None, available: Sequence[str],
                environ: Mapping[str, str], systemd_running: bool) -> str | None:
    """Why the server should move into a delegated scope, or None to stay (pure).

    ``own_cgroup`` is the server's cgroup2 directory, ``available`` the
    controllers its ``cgroup.controllers`` offers.
    """
    if not v2_controllers or own_cgroup is None:
        return None  # hybrid layout: the v1 controllers are used, nothing to delegate
    missing = [c for c in NEEDED_CONTROLLERS if c not in available]
    if not missing:
        return None
    if not systemd_running or environ.get(MARKER):
        return None
    if environ.get("INVOCATION_ID") and any(
            part.endswith(".service") for part in own_cgroup.split("/")):
        # Started by a service unit (its own, or one an operator wrote):
        # the unit must grant Delegate=yes; leaving it is not ours to do.
        return None
    return (f"{os.path.join(own_cgroup, 'cgroup.controllers')} offers "
            f"{' '.join(available) or 'no controllers'}, without {', '.join(missing)}")


def unit_name(instance: str, pid: int) -> str:
    """The transient scope's name: the server's instance and its pid."""
    return f"shellserver-{instance}-{pid}"


def scope_command(systemd_run: str, unit: str, argv: Sequence[str]) -> list[str]:
    """The command line that runs ``argv`` in a new delegated scope (pure)."""
    # --collect: the unit goes away when the server exits, even after a
    # failure; --quiet: no "Running scope as unit" line (ours says it).
    return [systemd_run, "--scope", "-p", "Delegate=yes", "--quiet", "--collect",
            f"--unit={unit}", "--", *argv]


def own_argv() -> list[str]:
    """This process's command line, runnable again: the interpreter (absolute)
    and its arguments as it was started."""
    return [sys.executable, *sys.orig_argv[1:]]


def find_systemd_run(environ: Mapping[str, str]) -> str | None:
    path = ":".join(p for p in (environ.get("PATH", ""), FALLBACK_PATH) if p)
    return shutil.which("systemd-run", path=path)


def reexec_in_scope(reason: str, instance: str, *, environ: Mapping[str, str] | None = None,
                    pid: int | None = None, argv: Sequence[str] | None = None,
                    stream=None, execve: Callable[..., None] = os.execve) -> str | None:
    """Replace this process by itself in a delegated scope (the one place that
    execs). Returns only when that is impossible: the reason it is, for the
    caller to refuse as before."""
    environ = dict(os.environ if environ is None else environ)
    stream = stream or sys.stderr
    systemd_run = find_systemd_run(environ)
    if systemd_run is None:
        return "systemd-run is not installed (looked in $PATH and /usr/bin)"
    unit = unit_name(instance, os.getpid() if pid is None else pid)
    command = scope_command(systemd_run, unit, own_argv() if argv is None else argv)
    environ[MARKER] = "1"
    stream.write(f"shellserver: {reason}: moving into a delegated scope, {unit}.scope "
                 f"(systemd-run --scope -p Delegate=yes)\n")
    stream.flush()
    try:
        execve(command[0], command, environ)
    except OSError as e:
        return f"cannot run {systemd_run}: {e.strerror or e}"
    return None  # only reached with a replaced execve (tests)
