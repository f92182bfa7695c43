"""The console runtime: a venv of the system Python with IPython installed.

The sandbox binds it read-only at the same path (venvs are not relocatable),
so it must be built from the system interpreter, never from the server's.
"""

from __future__ import annotations

import os
import shutil
import sys

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import Logger

log = Logger()

READY_MARKER = ".shellserver-runtime"
PACKAGES = ("ipython",)


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


def runtime_is_ready(path: str) -> bool:
    return os.path.exists(os.path.join(path, READY_MARKER)) and os.access(
        os.path.join(path, "bin", "python"), os.X_OK
    )


def check_prebuilt(path: str) -> None:
    """A configured runtime must already exist: say clearly what is wrong."""
    python = os.path.join(path, "bin", "python")
    if not os.access(python, os.X_OK):
        raise RuntimeProblem(f"sandbox.runtime {path!r} is not a venv ({python} is missing)")
    if not any(
        os.path.isdir(os.path.join(path, "lib", d, "site-packages", "IPython"))
        for d in os.listdir(os.path.join(path, "lib"))
    ):
        raise RuntimeProblem(f"sandbox.runtime {path!r} has no IPython installed")


@inlineCallbacks
def build_runtime(reactor, path: str, system_python: str) -> Deferred[None]:
    """Build the runtime into ``path`` without blocking the reactor."""
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
    steps = [
        (system_python, ["-m", "venv", path]),
        (os.path.join(path, "bin", "python"),
         ["-m", "pip", "install", "--quiet", "--disable-pip-version-check",
          *PACKAGES]),
    ]
    for executable, args in steps:
        out, err, code = yield getProcessOutputAndValue(
            executable, args, env=env, reactor=reactor
        )
        if code != 0:
            raise RuntimeProblem(
                f"building the console runtime failed: {executable} {' '.join(args)}"
                f" exited with {code}: {err.decode(errors='replace')[-2000:]}"
            )
    # Make it readable by every session uid.
    os.chmod(path, 0o755)
    with open(os.path.join(path, READY_MARKER), "w") as f:
        f.write("built by shellserver\n")
    log.info("console runtime ready in {path}", path=path)


def main(argv: list[str]) -> int:
    """``python -m shellserver.sandbox.runtime [--check] PATH``: build or check."""
    check = argv[:1] == ["--check"]
    paths = argv[1:] if check else argv
    if len(paths) != 1 or not os.path.isabs(paths[0]):
        print("usage: python -m shellserver.sandbox.runtime [--check] /absolute/path",
              file=sys.stderr)
        return 2
    path = paths[0]
    if check:
        return 0 if runtime_is_ready(path) else 1
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    from twisted.internet.task import react
    from twisted.logger import globalLogBeginner, textFileLogObserver

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)])
    try:
        react(lambda reactor: build_runtime(reactor, path, "/usr/bin/python3"))
    except SystemExit as e:
        return int(e.code or 0)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
