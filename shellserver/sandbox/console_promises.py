"""Copied into the console runtime as ``shellserver_console``: makes what
IPython offers inside a console true.

It runs inside the sandbox, under the runtime's own Python, so it imports
nothing from shellserver. The runtime's ``etc/ipython/ipython_config.py``
calls ``configure(c)``; the runtime's ``pip`` (a module and its scripts)
runs ``pip_main``.
"""

import os
import sys

# Editors that IPython's %edit and F2 may open, by their real paths: the
# sandbox's /etc is synthetic, so /usr/bin/vi and /usr/bin/editor (links
# through /etc/alternatives) dangle in there.
EDITORS = (
    "/usr/bin/nano",
    "/usr/bin/vim.basic",
    "/usr/bin/vim.tiny",
    "/usr/bin/mg",
    "/usr/bin/vi",
)

NO_NETWORK = (
    "pip install cannot reach the internet from this console: it has no network."
)


def find_editor(candidates=EDITORS):
    """The first editor that really runs in here, or None."""
    for path in candidates:
        if os.access(path, os.X_OK):
            return path
    return None


def configure(c, editor=None):
    """IPython configuration: an editor that exists, or no mention of one."""
    editor = editor or find_editor()
    if editor is None:
        # %edit and F2 cannot work: do not advertise them, and say why.
        c.InteractiveShell.enable_tip = False
        c.InteractiveShellApp.extensions = ["shellserver_console"]
        return
    # F2 (prompt_toolkit) reads VISUAL/EDITOR when pressed; %edit reads
    # TerminalInteractiveShell.editor.
    os.environ["EDITOR"] = os.environ["VISUAL"] = editor
    c.TerminalInteractiveShell.editor = editor


def load_ipython_extension(shell):
    """Loaded only when there is no editor: %edit says so instead of failing."""

    def edit(line=""):
        print("%edit is not available: this console has no text editor installed.")

    shell.register_magic_function(edit, "line", "edit")
    shell.register_magic_function(edit, "line", "ed")


def installed_packages():
    """Names and versions of the distributions in this runtime."""
    from importlib.metadata import distributions

    found = {}
    for dist in distributions():
        name = dist.metadata["Name"]
        if name:
            found[name.lower()] = f"{name} {dist.version}"
    return [found[key] for key in sorted(found)]


def pip_main(argv=None):
    """``pip`` in a console: list what is installed; for anything else, say
    plainly that there is no network instead of failing on certificates."""
    args = sys.argv[1:] if argv is None else argv
    packages = installed_packages()
    if args[:1] in (["list"], ["freeze"]):
        print("\n".join(packages))
        return 0
    print(NO_NETWORK, file=sys.stderr)
    print("Packages available: " + ", ".join(packages), file=sys.stderr)
    return 1
