"""The fork server's template: IPython imported once, a fork per console.

The server runs this file as root with the console runtime's Python
(``RUNTIME/bin/python -I forkserver.py SOCKET CONSOLE_ARGV...``), outside every console's
cgroup. It imports IPython, prompt_toolkit, jedi and the rest of what a
console's start-up imports, freezes them for the collector, then listens on
SOCKET (a SOCK_SEQPACKET unix socket in the server's 0700 state directory).

Each request is one message: a sandbox spec (JSON) with the server's PTY
slave attached (SCM_RIGHTS). The template forks; the child becomes the
per-console launcher, running ``launcher.run`` (the very code the classic
path runs, and the escape suite covers) on that PTY, except that at the
end the console is not exec'd: the console process, already inside its
namespaces, root, uid, limits, cgroup and seccomp filter, starts IPython
from the modules it shares copy-on-write with the template. The template
has also built the console's IPython application once (template_shell.py,
for the consoles' argv, given after SOCKET): a console only binds it to its
terminal, home and history and shows the prompt. The template
answers with the child's pid and a pidfd for it (the server signals and
watches the launcher through it, so a reused pid can never be hit); the
launcher writes its exit status on the request's connection before it
exits, and the template reaps it.

Standard library only at the top: IPython is imported in ``preload``.
"""

import array
import atexit
import gc
import importlib.util
import io
import json
import os
import signal
import socket
import struct
import sys

SETUP_FAILED = 111
MAX_REQUEST = 1 << 20
MAX_FD = 65536
# What a console's start-up imports (the first prompt's and the first
# completion's); importing them here is what makes a console cheap.
PRELOAD = (
    "IPython",
    "IPython.terminal.ipapp",
    "IPython.terminal.interactiveshell",
    "IPython.terminal.prompts",
    "IPython.terminal.shortcuts",
    "IPython.terminal.debugger",
    "IPython.core.completer",
    "IPython.core.history",
    "IPython.core.profiledir",
    "IPython.extensions.storemagic",
    "IPython.core.completerlib",
    "IPython.core.logger",
    "IPython.core.magic_arguments",
    "IPython.core.magics",
    "IPython.core.oinspect",
    "IPython.utils.wildcard",
    "prompt_toolkit.input.vt100",
    "prompt_toolkit.key_binding.bindings.search",
    "resource",
    "tty",
    "prompt_toolkit",
    "prompt_toolkit.shortcuts",
    "pygments.lexers.python",
    "pygments.formatters.terminal256",
    "pygments.styles.default",
    "jedi",
    "sqlite3",
    # Imported lazily by a console's first prompt (the magics IPython
    # registers by name, the runtime's console promises and their ctypes).
    "IPython.core.magics.logging",
    "IPython.core.magics.script",
    "ctypes",
    "shellserver_console",
    "pygments.lexers",
)
# The lexers a console's first prompt builds (IPython highlights what is
# typed with Python3Lexer, ``!`` lines with BashLexer): a pygments lexer
# class compiles its token rules, some hundred regular expressions, when
# its first instance is made, about 25 ms of each console's start-up.
WARM_LEXERS = ("Python3Lexer", "BashLexer")


class RunConsole(BaseException):
    """Raised in the console process instead of exec: unwinds the launcher's
    frames (and the spec they hold) before IPython starts."""

    def __init__(self, argv, env):
        super().__init__()
        self.argv, self.env = argv, env


def load_launcher():
    return load_sibling("launcher")


def load_sibling(name):
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), name + ".py")
    module_spec = importlib.util.spec_from_file_location("shellserver_" + name, path)
    assert module_spec is not None and module_spec.loader is not None  # a .py file's
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def preload():
    for name in PRELOAD:
        try:
            __import__(name)
        except ImportError as e:
            # An older or smaller runtime: that module is imported per console.
            print(f"fork server: not preloaded: {name}: {e}", file=sys.stderr, flush=True)
    warm_lexers()


# The console's IPython application, built by ``prebuild`` for this argv
# (the server passes the consoles' argv after the socket's path).
PREBUILT: dict = {"argv": None, "app": None, "env": {}}


def prebuild(argv):
    """IPython's start-up done once here (template_shell.py), if it can be."""
    if not argv:
        return
    try:
        template_shell = load_sibling("template_shell")
        app, config_env = template_shell.prebuild(argv, dict(os.environ))
    except Exception as e:  # noqa: BLE001 - any failure: consoles start from scratch
        print(f"fork server: IPython not prebuilt, consoles start it: {e!r}",
              file=sys.stderr, flush=True)
        return
    PREBUILT.update(argv=list(argv), app=app, env=config_env, module=template_shell)


def warm_lexers():
    """The lexers' compiled rules, made once here and shared with every console.

    Class-level caches of the runtime's own code: they hold nothing of any
    console (the template never runs a visitor's code).
    """
    try:
        lexers = importlib.import_module("pygments.lexers")
    except ImportError:
        return
    for name in WARM_LEXERS:
        lexer = getattr(lexers, name, None)
        if lexer is not None:
            # Lexing a line also fills the regular-expression caches the
            # first keystrokes use.
            for _ in lexer().get_tokens("x = [1, 'a'] # b\n"):
                pass


class Stopping(Exception):
    """SIGTERM (the server stopping, or gone): no more requests."""


def stop(signum, frame):
    raise Stopping()


def preload_on_a_terminal(argv=()):
    """``preload`` and ``prebuild`` with a terminal on 0, 1 and 2, as a console has.

    Some modules decide at import whether they run on a terminal (IPython's
    default ``simple_prompt``, for one: without a terminal at import, every
    console would get the plain prompt, without prompt_toolkit). The
    template's environment is the console's (the server starts it so) for
    the same reason.
    """
    saved = [os.dup(fd) for fd in (0, 1, 2)]
    master, slave = os.openpty()
    try:
        for fd in (0, 1, 2):
            os.dup2(slave, fd)
        preload()
        prebuild(argv)
    finally:
        for fd, copy in zip((0, 1, 2), saved, strict=True):
            os.dup2(copy, fd)
            os.close(copy)
        os.close(slave)
        os.close(master)
    # The long-lived objects of the imports and the prebuilt shell, out of
    # the collector's sight: a collection in a console would otherwise
    # write to (and so copy) the pages they share with the template.
    gc.freeze()


def reap_children(signum=None, frame=None):
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def console_entry(spec):
    """In the console process, where the classic path calls execve."""
    raise RunConsole(list(spec["argv"]), dict(spec["env"]))


def run_launcher(launcher, listener, connection, slave, request):
    """The forked child: the per-console root launcher on the server's PTY."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    listener.close()
    os.setsid()
    import fcntl
    import termios

    fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
    for fd in (0, 1, 2):
        os.dup2(slave, fd)
    status_fd = connection.detach()
    # Nothing of the template's but the terminal and the status connection.
    os.closerange(3, status_fd)
    os.closerange(status_fd + 1, MAX_FD)
    os.set_inheritable(status_fd, False)
    try:
        status = launcher.run(take_spec(request), console_entry=console_entry,
                              close_in_init=(status_fd,), status_fd=status_fd)
    except RunConsole as console:
        # Only what IPython needs: the launcher's frames, and the spec with
        # them, are gone once this block ends.
        entry = (console.argv, console.env)
        console.__traceback__ = None
    else:
        try:
            os.write(status_fd, b"%d" % status)
        except OSError:
            pass
        os._exit(status)
    start_ipython(*entry)  # does not return


def take_spec(request):
    """The spec, parsed; its bytes zeroed: it is the launcher's alone now."""
    spec = json.loads(bytes(request))
    request[:] = bytes(len(request))
    return spec


def start_ipython(argv, env):
    """IPython in this (console) process, as ``python -I -m IPython ARGS`` would."""
    code = 0
    try:
        os.environ.clear()
        os.environ.update(env)
        sys.argv = [argv[0]] + list(argv[argv.index("IPython") + 1:])
        sys.dont_write_bytecode = True
        # The template's standard streams were not a terminal: new ones on
        # the console's, as ``python -I`` makes them there (-I ignores
        # PYTHONUNBUFFERED, which is for the console's own child programs):
        # buffered and line-buffered, so a ``print`` is one write, not one
        # for its text and one for its newline.
        sys.stdin = io.TextIOWrapper(open(0, "rb", closefd=False), encoding="utf-8",
                                     errors="surrogateescape", line_buffering=True)
        sys.stdout = io.TextIOWrapper(open(1, "wb", closefd=False), encoding="utf-8",
                                      errors="surrogateescape", line_buffering=True)
        sys.stderr = io.TextIOWrapper(open(2, "wb", closefd=False), encoding="utf-8",
                                      errors="backslashreplace", line_buffering=True)
        # typeshed declares these Final; the interpreter sets them at start-up
        # and so does a console's here.
        vars(sys).update(__stdin__=sys.stdin, __stdout__=sys.stdout, __stderr__=sys.stderr)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if PREBUILT["app"] is not None and list(argv) == PREBUILT["argv"]:
            # What the runtime's configuration set when the template built
            # the shell (EDITOR, VISUAL), unless the console's own says.
            for name, value in PREBUILT["env"].items():
                os.environ.setdefault(name, value)
            PREBUILT["module"].start(PREBUILT["app"])
            raise SystemExit(0)
        # By name: IPython is the runtime's (imported in ``preload``), not
        # the server's, so it has no type information here.
        importlib.import_module("IPython").start_ipython()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - as the interpreter would: print it, status 1
        import traceback

        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # noqa: BLE001 - exiting regardless
        pass
    os._exit(code & 0xFF)


def serve(launcher, listener):
    request = bytearray(MAX_REQUEST)
    fds = array.array("i")
    while True:
        connection, _ = listener.accept()
        slave = None
        # A request is answered whole: SIGTERM waits until it is (a launcher
        # forked but not reported would run unwatched).
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        try:
            # The socket is root's alone (0600 in a 0700 directory); the
            # peer's uid is checked as well, as the belt.
            _, peer_uid, _ = struct.unpack("3i", connection.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
            if peer_uid != os.geteuid():
                connection.sendall(b"error: not the server")
                continue
            size, ancillary, flags, _ = connection.recvmsg_into(
                [request], socket.CMSG_SPACE(fds.itemsize))
            for level, kind, data in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    received = array.array("i")
                    received.frombytes(data[:len(data) - len(data) % fds.itemsize])
                    for fd in received:
                        if slave is None:
                            slave = fd
                        else:
                            os.close(fd)
            if slave is None or flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or not size:
                connection.sendall(b"error: a spec and one terminal are needed")
                continue
            pid = os.fork()
            if pid == 0:
                try:
                    run_launcher(launcher, listener, connection, slave,
                                 memoryview(request)[:size])
                finally:
                    os._exit(SETUP_FAILED)
            # The spec is gone from the template before the next request.
            request[:size] = bytes(size)
            pidfd = os.pidfd_open(pid)
            try:
                connection.sendmsg([b"pid %d" % pid], [
                    (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [pidfd]))])
            finally:
                os.close(pidfd)
        except OSError as e:
            print(f"fork server: request failed: {e}", file=sys.stderr, flush=True)
        finally:
            if slave is not None:
                os.close(slave)
            connection.close()
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


def main(argv):
    path = argv[1]
    launcher = load_launcher()
    # Init builds the seccomp filter: the module and libseccomp loaded here
    # once are shared with every sandbox instead of loaded by each.
    launcher._load_sibling("seccomp").Filter().release()
    preload_on_a_terminal(argv[2:])
    # Reap the launchers: they are our children (the server watches them
    # through their pidfds).
    signal.signal(signal.SIGCHLD, reap_children)
    # The server ending without stopping us (a crash) ends the template too;
    # running consoles are not its children's business, they go on.
    launcher.prctl(launcher.PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() == 1:
        return 1
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    old_umask = os.umask(0o177)
    try:
        listener.bind(path)
    finally:
        os.umask(old_umask)
    listener.listen(64)
    signal.signal(signal.SIGTERM, stop)
    print("ready", flush=True)
    try:
        serve(launcher, listener)
    except Stopping:
        pass
    # Stay the launchers' parent until they have all ended (the server ends
    # their consoles as it stops): orphans would be left to the host's init.
    listener.close()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
