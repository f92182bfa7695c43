"""The console runtime: a venv of the system Python with IPython installed.

The sandbox binds it read-only at the same path (venvs are not relocatable),
so it must be built from the system interpreter, never from the server's.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Generator, Sequence
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import Logger

from shellserver.sandbox.spec import waiter_path

log = Logger()

# Written last by a build: what the runtime was built with (its stamp).
READY_MARKER = ".shellserver-runtime"
PACKAGES = ("ipython",)
C_COMPILER = "/usr/bin/cc"
# Bumped when what a build puts into the runtime changes (the console
# promises below), so that server-built runtimes are rebuilt.
RUNTIME_FORMAT = 3
# Copied into the runtime's site-packages under this name (see
# shellserver/sandbox/console_promises.py).
PROMISES_MODULE = "shellserver_console"
IPYTHON_CONFIG = f"""\
# Written by shellserver when it built this runtime: every console's IPython
# reads it (sys.prefix/etc/ipython). See {PROMISES_MODULE}.py.
import {PROMISES_MODULE}

{PROMISES_MODULE}.configure(c)
"""
PIP_MODULE = f"""\
# Consoles have no network: this runtime's pip says so (shellserver).
import sys

from {PROMISES_MODULE} import pip_main

if __name__ == "__main__":
    sys.exit(pip_main())
"""


class RuntimeProblem(Exception):
    """The console runtime is missing or could not be built."""


# Characters overlayfs reads in its mount options (the launcher's
# OVERLAY_SPECIAL): the runtime is mounted in each sandbox as an overlay
# layer, under the sandbox root, so neither path may contain them.
OVERLAY_SPECIAL = ":,\\"


def check_overlay_path(what: str, path: str) -> None:
    """RuntimeProblem when ``path`` cannot be part of an overlay mount."""
    if any(c in OVERLAY_SPECIAL for c in path):
        raise RuntimeProblem(
            f"{what} {path!r} cannot be mounted in sandboxes: overlayfs does not take "
            f"paths with any of {OVERLAY_SPECIAL!r}")


def make_stamp(packages: Sequence[str]) -> dict:
    """What a runtime built now with ``packages`` records in its marker."""
    return {"format": RUNTIME_FORMAT, "packages": list(packages)}


def parse_stamp(text: str) -> dict:
    """A runtime marker's stamp. Runtimes built before stamps existed hold a
    line of text: format 1, no packages."""
    try:
        stamp = json.loads(text)
    except ValueError:
        stamp = None
    if not isinstance(stamp, dict):
        return {"format": 1, "packages": []}
    return stamp


def read_stamp(path: str) -> dict | None:
    """The stamp of the runtime at ``path``; None when it is not built."""
    try:
        with open(os.path.join(path, READY_MARKER)) as f:
            return parse_stamp(f.read())
    except OSError:
        return None


def runtime_is_ready(path: str, packages: Sequence[str] = ()) -> bool:
    """Built, by this version's build, with exactly ``packages``."""
    return (read_stamp(path) == make_stamp(packages)
            and os.access(os.path.join(path, "bin", "python"), os.X_OK)
            and has_waiter(path))


def has_waiter(path: str) -> bool:
    """The runtime has its waiter (without it, every running sandbox keeps
    two Python processes that only wait: a few MB more per console)."""
    return os.access(waiter_path(path), os.X_OK)


def waiter_build_command(path: str) -> tuple[str, list[str]]:
    """The C compiler's command line that builds the runtime's waiter.

    Static: init runs it inside the sandbox, with no loader or libc path
    promised there. Mode 0711 comes after (see waiter.c for why)."""
    source = os.path.join(os.path.dirname(os.path.abspath(__file__)), "waiter.c")
    return C_COMPILER, ["-O2", "-static", "-Wall", "-o", waiter_path(path), source]


def check_prebuilt(path: str, packages: Sequence[str] = ()) -> None:
    """A configured runtime must already exist: say clearly what is wrong."""
    python = os.path.join(path, "bin", "python")
    if not os.access(python, os.X_OK):
        raise RuntimeProblem(f"sandbox.runtime {path!r} is not a venv ({python} is missing)")
    if not any(
        os.path.isdir(os.path.join(path, "lib", d, "site-packages", "IPython"))
        for d in os.listdir(os.path.join(path, "lib"))
    ):
        raise RuntimeProblem(f"sandbox.runtime {path!r} has no IPython installed")
    stamp = read_stamp(path) or {"packages": []}
    if list(stamp.get("packages", [])) != list(packages):
        built = ", ".join(stamp.get("packages", [])) or "none"
        raise RuntimeProblem(
            f"sandbox.runtime {path!r} was built with packages [{built}], not with "
            f"sandbox.packages [{', '.join(packages) or 'none'}]: rebuild it with "
            f"python -m shellserver.sandbox.runtime --config FILE {path}")


@inlineCallbacks
def build_runtime(reactor, path: str, system_python: str,
                  packages: Sequence[str] = ()) -> Generator[Deferred[Any], Any, None]:
    """Build the runtime into ``path`` with IPython and ``packages``, without
    blocking the reactor."""
    # Built in place (venv scripts name their own path), made valid by the
    # marker written last: a half-built runtime is removed and rebuilt.
    if os.path.exists(path):
        shutil.rmtree(path)
    log.info("building the console runtime into {path}; this takes a minute",
             path=path)
    env = {"PATH": "/usr/bin:/bin", "HOME": "/root", "LANG": "C.UTF-8"}
    for proxy in ("http_proxy", "https_proxy", "no_proxy", "PIP_INDEX_URL",
                  "PIP_CONFIG_FILE", "PIP_CERT"):
        if proxy in os.environ:
            env[proxy] = os.environ[proxy]
    python = os.path.join(path, "bin", "python")
    compiler, compile_args = waiter_build_command(path)
    if not os.access(compiler, os.X_OK):
        raise RuntimeProblem(
            f"building the console runtime needs a C compiler at {compiler} for its "
            f"waiter (shellserver/sandbox/waiter.c): apt-get install gcc libc6-dev")
    steps = [
        (system_python, ["-m", "venv", path]),
        (compiler, compile_args),
        # "--" so that no requirement is ever read as a pip option.
        (python,
         ["-m", "pip", "install", "--quiet", "--disable-pip-version-check",
          "--", *PACKAGES, *packages]),
        # Consoles have no network: pip goes, and a pip that says so replaces it.
        (python, ["-m", "pip", "uninstall", "--yes", "--quiet", "pip"]),
    ]
    os.makedirs(os.path.dirname(waiter_path(path)), mode=0o755)
    for executable, args in steps:
        out, err, code = yield getProcessOutputAndValue(
            executable, args, env=env, reactor=reactor
        )
        if code != 0:
            raise RuntimeProblem(
                f"building the console runtime failed: {executable} {' '.join(args)}"
                f" exited with {code}: {err.decode(errors='replace')[-2000:]}"
            )
    install_promises(path)
    # Make it readable by every session uid; the waiter executable only.
    os.chmod(path, 0o755)
    os.chmod(os.path.dirname(waiter_path(path)), 0o755)
    os.chmod(waiter_path(path), 0o711)
    with open(os.path.join(path, READY_MARKER), "w") as f:
        json.dump(make_stamp(packages), f)
    log.info("console runtime ready in {path}", path=path)


def site_packages(path: str) -> str:
    """The runtime's site-packages directory (lib/pythonX.Y/site-packages)."""
    for name in sorted(os.listdir(os.path.join(path, "lib"))):
        candidate = os.path.join(path, "lib", name, "site-packages")
        if name.startswith("python") and os.path.isdir(candidate):
            return candidate
    raise RuntimeProblem(f"the console runtime {path!r} has no site-packages")


def install_promises(path: str) -> None:
    """Make what IPython offers true in the runtime: an editor for %edit and
    F2 (or no mention of one), and a pip that says there is no network."""
    from shellserver.sandbox import console_promises

    site = site_packages(path)
    shutil.copyfile(console_promises.__file__, os.path.join(site, PROMISES_MODULE + ".py"))
    config_dir = os.path.join(path, "etc", "ipython")
    os.makedirs(config_dir, mode=0o755, exist_ok=True)
    with open(os.path.join(config_dir, "ipython_config.py"), "w") as f:
        f.write(IPYTHON_CONFIG)
    pip_dir = os.path.join(site, "pip")
    os.makedirs(pip_dir, mode=0o755, exist_ok=True)
    with open(os.path.join(pip_dir, "__init__.py"), "w") as f:
        f.write('"""This console has no network: see __main__."""\n')
    with open(os.path.join(pip_dir, "__main__.py"), "w") as f:
        f.write(PIP_MODULE)
    version = os.path.basename(os.path.dirname(site))[len("python"):]  # "3.11"
    for name in ("pip", "pip3", f"pip{version}"):
        script = os.path.join(path, "bin", name)
        with open(script, "w") as f:
            f.write(f'#!/bin/sh\nexec {path}/bin/python -I -m pip "$@"\n')
        os.chmod(script, 0o755)


def main(argv: list[str]) -> int:
    """``python -m shellserver.sandbox.runtime [--check] [--config FILE] PATH``:
    build the runtime at PATH with the config's sandbox.packages, or check
    (exit 0 or 1) that it was built with them."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m shellserver.sandbox.runtime")
    parser.add_argument("--check", action="store_true",
                        help="exit 0 if PATH is built with these packages, else 1")
    parser.add_argument("--config", help="TOML configuration whose sandbox.packages to use")
    parser.add_argument("path", help="the runtime venv (absolute path)")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    if not os.path.isabs(args.path):
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: the runtime path must be absolute, got {args.path!r}",
              file=sys.stderr)
        return 2
    packages: tuple[str, ...] = ()
    if args.config:
        from shellserver.config import ConfigError, load_config_file

        try:
            packages = load_config_file(args.config).sandbox.packages
        except (ConfigError, OSError) as e:
            print(f"{parser.prog}: configuration: {e}", file=sys.stderr)
            return 2
    path = args.path
    if args.check:
        return 0 if runtime_is_ready(path, packages) else 1
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    from twisted.internet.task import react
    from twisted.logger import globalLogBeginner, textFileLogObserver

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)])
    try:
        react(lambda reactor: build_runtime(reactor, path, "/usr/bin/python3", packages))
    except SystemExit as e:
        return int(e.code or 0)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
