"""The fork server's prebuilt IPython: built once in the template, bound per console.

The template (forkserver.py) calls ``prebuild`` once, after its imports: it
builds the very ``TerminalIPythonApp`` a console's ``python -m IPython
ARGS`` builds (its configuration, the shell and its magics, completer,
prompt_toolkit session with key bindings, style and lexers, the history
manager), on a throwaway terminal and with a throwaway IPython directory.
Each console, a fresh fork of the template, then calls ``start``: it binds
what depends on its own terminal and session (prompt_toolkit's input and
output, IPython's directory in its home, a new history database and
session, the streams IPython restores at exit), prints the banner and runs
the prompt. A console starts in a few milliseconds instead of 60-90.

Nothing prebuilt holds a console's state: the template never runs a
visitor's code (only IPython's own start-up), and every console is a fork
of the template as it was before any console existed, so what one console
does to its copy is seen by no other. The template checks that the build
left no thread and no open file behind (a fork carries neither faithfully,
and a shared descriptor would be shared between consoles).

Runs under the console runtime's Python, standard library only at the top.
"""

import importlib
import logging
import os
import shutil
import sys
import tempfile
import threading

# IPython's crash handler, which the application installs as sys.excepthook:
# a console's, not the template's (whose errors go plainly to the server's
# log). ``start`` installs it again.
console_excepthook = None


class PrebuildError(Exception):
    """The shell could not be prebuilt; consoles start IPython from scratch."""


def runtime_module(name):
    """A module of the console runtime's (IPython, prompt_toolkit), by name:
    the server's own Python need not have them, so they carry no types."""
    return importlib.import_module(name)


def open_descriptors():
    return set(int(name) for name in os.listdir("/proc/self/fd"))


def prebuild(argv, console_env):
    """The console's IPython application for ``argv``, built here, not started.

    Returns ``(app, config_env)``: the application and what its
    configuration added to the environment (the runtime's configuration
    sets EDITOR and VISUAL), which each console's environment keeps.
    Called with a terminal on 0, 1 and 2 (the template's throwaway one).
    """
    TerminalIPythonApp = runtime_module("IPython.terminal.ipapp").TerminalIPythonApp

    scratch = tempfile.mkdtemp(prefix="shellserver-template-")
    saved_env = dict(os.environ)
    saved_argv, saved_hook = sys.argv, sys.excepthook
    before = open_descriptors()
    try:
        # The console's environment, but IPython's directory in scratch:
        # the console's (in its home) does not exist out here, and the
        # template must create nothing on the host.
        os.environ.clear()
        os.environ.update(console_env)
        os.environ["IPYTHONDIR"] = os.path.join(scratch, "ipython")
        sys.argv = [argv[0]] + list(argv[argv.index("IPython") + 1:])
        app = TerminalIPythonApp.instance()
        app.initialize(sys.argv[1:])
        rehearse(app.shell)
        config_env = {name: value for name, value in os.environ.items()
                      if name not in console_env and name != "IPYTHONDIR"}
    finally:
        global console_excepthook
        console_excepthook, sys.excepthook = sys.excepthook, saved_hook
        os.environ.clear()
        os.environ.update(saved_env)
        sys.argv = saved_argv
        shutil.rmtree(scratch, ignore_errors=True)
    if threading.active_count() != 1:
        raise PrebuildError(f"the build left threads: {threading.enumerate()!r}")
    left_open = open_descriptors() - before
    if left_open:
        raise PrebuildError(f"the build left descriptors open: {sorted(left_open)}")
    return app, config_env


def rehearse(shell):
    """One prompt shown and left at once, on the throwaway terminal.

    The first prompt fills caches that every prompt then reads (the key
    bindings' lookups, the style's parsed attributes, the lexer's): made
    here, they are shared with every console instead of built (and their
    pages written) in each. Nothing is typed, run or kept in the history.
    """
    prompt = shell.pt_app
    prompt.app.pre_run_callables.append(lambda: prompt.app.exit(result=""))
    shell.prompt_for_code()


def start(app):
    """In a console: bind the prebuilt application to this terminal and run it.

    The environment, the standard streams and the working directory are
    the console's already (forkserver.start_ipython set them).
    """
    get_app_session = runtime_module("prompt_toolkit.application.current").get_app_session
    create_input = runtime_module("prompt_toolkit.input").create_input
    create_output = runtime_module("prompt_toolkit.output").create_output

    shell = app.shell
    sys.excepthook = console_excepthook or sys.__excepthook__
    # prompt_toolkit's input and output on this console's terminal (the
    # template's were on its throwaway one, long closed).
    terminal_in, terminal_out = create_input(sys.stdin), create_output(sys.stdout)
    app_session = get_app_session()
    app_session._input, app_session._output = terminal_in, terminal_out
    prompt = shell.pt_app
    prompt._input, prompt._output = terminal_in, terminal_out
    prompt.app.input, prompt.app.output = terminal_in, terminal_out
    prompt.app.renderer.output = terminal_out
    # IPython's directory in the console's home, as a fresh start makes it.
    ipython_dir = os.environ["IPYTHONDIR"]
    app.ipython_dir = shell.ipython_dir = ipython_dir
    os.makedirs(ipython_dir, exist_ok=True)
    # The template's ProfileDir, moved here: setting its location makes the
    # directory and its subdirectories as a new one would (IPython allows
    # one setting; its flag is reset for this one), and saves the console
    # the pages a new traitlets object with its observers writes (0.3 MB).
    profile_dir = app.profile_dir
    profile_dir._location_isset = False
    profile_dir.location = os.path.join(ipython_dir, "profile_default")
    app.profile_dir = shell.profile_dir = profile_dir
    # A history session of this console's own, begun now, here (the
    # working directory is the first of %dhist). The database is the
    # template's in-memory one (``hist_file=:memory:``; a file would have
    # failed the build's open-descriptor check): this process's private
    # copy, without a file, a lock or a descriptor that a fork could share,
    # and empty (the template stores no input). Reusing it saves the 0.7 MB
    # a new SQLite connection writes in each console.
    shell.history_manager.reset(new_session=True)
    shell.starting_dir = os.getcwd()
    # What IPython restores at exit: this console's streams, not the
    # template's.
    shell._orig_sys_module_state.update(stdin=sys.stdin, stdout=sys.stdout, stderr=sys.stderr)
    if app.display_banner and app.interact:
        shell.show_banner()
    if app.log_level <= logging.INFO:
        print()
    app.start()
