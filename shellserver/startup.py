"""Start-up refusals: the host cannot give the server what it needs.

Such a refusal is not a crash: restarting cannot help until an operator
changes the host or the unit. The server exits with ``EXIT_HOST_REFUSED``,
which etc/shellserver.service lists in ``RestartPreventExitStatus=``, so
systemd does not restart it in a loop.
"""

from __future__ import annotations

import sys

from twisted.python import usage

# EX_CONFIG from sysexits.h: a configuration error (of the host, here).
EXIT_HOST_REFUSED = 78


class HostRefusal(usage.UsageError):
    """The host refuses something the sandbox needs; the message says what
    to change."""


def exit_refused(refusal: HostRefusal, stream=None) -> SystemExit:
    """Write the refusal (one line, no traceback, no usage text) and return
    the SystemExit to raise."""
    # sys.stderr looked up now, so that tests can replace it.
    (stream or sys.stderr).write(f"shellserver: cannot start: {refusal}\n")
    return SystemExit(EXIT_HOST_REFUSED)
