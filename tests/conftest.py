"""Shared fixtures: a real `twistd shellserver` on loopback TLS, and leak checks.

The server runs as a subprocess exactly as an operator runs it, with its own
state directory, certificate and uid range; tests talk to it over real
sockets. Unit tests (tests/unit) use none of this.
"""

from __future__ import annotations

import os
import re
import socket
import ssl
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import attrs
import pytest

REPO = Path(__file__).resolve().parent.parent
RUNTIME = os.environ.get("SHELLSERVER_RUNTIME", "/var/lib/shellserver/runtime")
TWISTD = str(Path(sys.executable).parent / "twistd")
# Tests open many consoles from 127.0.0.1 in a row.
# Which sandbox path real servers use unless a test's config says: the fork
# server (the default) or, with SHELLSERVER_TEST_FORK_SERVER=false, the
# classic launcher, so every real suite can run on either.
FORK_SERVER = os.environ.get("SHELLSERVER_TEST_FORK_SERVER", "true").lower()
if FORK_SERVER not in ("true", "false"):
    raise ValueError(f"SHELLSERVER_TEST_FORK_SERVER must be true or false, not {FORK_SERVER!r}")
GENEROUS_ADMISSION = ("per_address = 100\nper_address_per_minute = 10000\n"
                      "pages_per_address_per_minute = 0\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@attrs.define
class RunningServer:
    """A `twistd shellserver` subprocess and how to reach it."""

    process: subprocess.Popen
    port: int
    state_dir: Path
    cert: str
    uid_min: int
    uid_max: int
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def origin(self) -> str:
        return self.base_url

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.cert)

    def get(self, path: str, headers: dict | None = None):
        request = urllib.request.Request(self.base_url + path, headers=headers or {})
        return urllib.request.urlopen(request, context=self.ssl_context(), timeout=10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


def start_server(tmp: Path, *, uid_min: int, uid_max: int, config: str = "",
                 console: str = "", admission: str = "", embed: str = "",
                 server: str = "", runtime: str | None = RUNTIME,
                 preexec_fn=None, listen_prefix: str = "",
                 extra_args: tuple[str, ...] = (),
                 ready_path: str = "/", cluster: str = "",
                 port: int | None = None) -> RunningServer:
    """Start a server in ``tmp`` and wait until it answers (bounded).

    ``config``, ``console``, ``admission``, ``embed`` and ``server`` are TOML
    lines for the [sandbox], [console], [admission], [embed] and [server] sections (the tests'
    default admission allows many consoles from 127.0.0.1, and there is no
    warm pool unless ``config`` sets pool_size); ``runtime=None`` leaves the
    runtime to the server to build; ``preexec_fn`` runs in the server's
    process before it starts (to set its limits, say); ``listen_prefix``
    (such as ``"haproxy:"``) wraps the listener (readiness is then a TCP
    connect); ``extra_args`` go after the plugin's own (``--metrics
    ENDPOINT``, say); ``ready_path`` is the page that answers once it is up
    (the base path's, under server.base_path); ``cluster`` is TOML lines
    for a [cluster] section (none when empty); ``port`` is the port to
    listen on (a free one by default; a restarted cluster node keeps its
    public URL by passing its old one).
    """
    from shellserver.tls import endpoint_description, ensure_self_signed

    state = tmp / "state"
    state.mkdir(mode=0o700, exist_ok=True)  # a restart reuses it
    cert, key = ensure_self_signed(str(tmp / "tls"))
    port = port or free_port()
    config_path = tmp / "shellserver.toml"
    config_path.write_text("\n".join([
        f'[server]\nstate_dir = "{state}"\n{server}',
        f"[console]\n{console}",
        "" if "shutdown_grace" in console else "shutdown_grace = 0",
        # Consoles whose connection drops (a closed browser page) wait this
        # long for a reattach, not the default minute: tests count leftovers.
        "" if "reattach_grace" in console else "reattach_grace = 10",
        f"[admission]\n{admission or GENEROUS_ADMISSION}",
        f"[sandbox]\nuid_min = {uid_min}\nuid_max = {uid_max}",
        "" if "pool_size" in config else "pool_size = 0",
        "" if "fork_server" in config else f"fork_server = {FORK_SERVER}",
        f'runtime = "{runtime}"' if runtime else "",
        config,
        f"[embed]\n{embed}",
        f"[cluster]\n{cluster}" if cluster else "",
    ]) + "\n")
    log_path = tmp / "twistd.log"
    if log_path.exists():  # a restart: keep the previous run's log apart
        log_path.rename(tmp / f"twistd.{time.time_ns()}.log")
    listen = listen_prefix + endpoint_description(port, cert, key, interface="127.0.0.1")
    process = subprocess.Popen(
        [TWISTD, "--nodaemon", "--pidfile=", "--logfile", str(log_path),
         "shellserver", "--config", str(config_path), "--listen", listen, *extra_args],
        cwd=str(tmp), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT, preexec_fn=preexec_fn,
    )
    running = RunningServer(process, port, state, cert, uid_min, uid_max, log_path)
    deadline = time.monotonic() + 30
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n"
                               + (running.log() if log_path.exists() else ""))
        try:
            if listen_prefix:
                socket.create_connection(("127.0.0.1", port), timeout=2).close()
            else:
                running.get(ready_path).read()
            break
        except OSError:
            if time.monotonic() > deadline:
                running.stop()
                raise RuntimeError("server did not answer within 30 s") from None
            time.sleep(0.1)
    # On the fork server's path, consoles start forked only once its template
    # is ready (before, the classic way): wait, so tests run on the path asked.
    fork_server = re.search(r"^fork_server\s*=\s*(\w+)", config, re.M)
    if runtime and (fork_server.group(1) if fork_server else FORK_SERVER) == "true":
        level = re.search(r'^log_level\s*=\s*"(\w+)"', server, re.M)
        if level and level.group(1) not in ("debug", "info"):
            # Its "template ready" line is below the log level: the template
            # binds its socket once it has imported what consoles use.
            def template_ready() -> bool:
                return (state / "forkserver.sock").exists()
        else:
            def template_ready() -> bool:
                return "fork server template ready" in running.log()
        if not wait_until(template_ready, timeout=30):
            running.stop()
            raise RuntimeError("the fork server's template was not ready within 30 s:\n"
                               + running.log())
    return running


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """One real server for the whole run, with 200 uids from 210000 up."""
    if os.geteuid() != 0:
        pytest.fail("integration tests need root (they start real sandboxes)")
    # A range of its own per run, so concurrent runs on one machine never
    # share uids (the server would refuse nothing: both would use them).
    base = 210000 + (os.getpid() % 40) * 200
    srv = start_server(tmp_path_factory.mktemp("server"), uid_min=base,
                       uid_max=base + 199)
    yield srv
    srv.stop()
    leftovers = sandbox_leftovers(srv)
    assert leftovers == [], f"server left behind: {leftovers}"


def processes_of_uids(first: int, last: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            uid = os.stat(f"/proc/{entry}").st_uid
        except FileNotFoundError:
            continue
        if first <= uid <= last:
            pids.append(int(entry))
    return pids


def parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None


def sandbox_inits(uid: int) -> list[int]:
    """Host pids of the sandbox inits of ``uid``: its processes whose parent
    (the root launcher) is not of that uid. By parentage, not by command
    line: a fork server's processes all show the template's."""
    pids = processes_of_uids(uid, uid)
    return [pid for pid in pids if parent_of(pid) not in pids]


def sandbox_ipythons(uid: int) -> list[int]:
    """Host pids of the IPython of ``uid``'s sandboxes: init's children that
    run IPython (exec'd, or started in a fork of the fork server's template)."""
    inits = sandbox_inits(uid)
    found = []
    for pid in processes_of_uids(uid, uid):
        if parent_of(pid) not in inits:
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
        except FileNotFoundError:
            continue
        if b"IPython" in cmdline or b"forkserver.py" in cmdline:
            found.append(pid)
    return found


def session_launcher(session: str) -> int:
    """Host pid of a session's root launcher: the root-owned parent of its
    init (the process in the session's cgroup whose parent is not in it)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cgroup") as f:
                if f"/{session}" not in f.read():
                    continue
            parent = parent_of(int(entry))
            if parent is not None and os.stat(f"/proc/{parent}").st_uid == 0:
                return parent
        except (FileNotFoundError, ProcessLookupError):
            continue
    raise AssertionError(f"no launcher for {session}")


def session_cgroups(server: RunningServer) -> list[str]:
    """The cgroup directories of the sessions this server started."""
    from shellserver.sandbox.cgroups import read_layout
    from shellserver.startup import instance_name

    sessions = set(re.findall(r"console (s[0-9a-f]+) started", server.log()))
    found = []
    for parent in read_layout().for_instance(instance_name(str(server.state_dir))).parents():
        found += [os.path.join(parent, s) for s in sessions
                  if os.path.isdir(os.path.join(parent, s))]
    return found


def sandbox_leftovers(server: RunningServer) -> list[str]:
    """Processes, cgroups and mounts a server's sandboxes left behind."""
    problems = [f"process {pid}" for pid in
                processes_of_uids(server.uid_min, server.uid_max)]
    problems += [f"cgroup {path}" for path in session_cgroups(server)]
    with open("/proc/self/mountinfo") as f:
        problems += [f"mount {line.split()[4]}" for line in f
                     if str(server.state_dir) in line]
    pipes = server.state_dir / "pipes"
    if pipes.exists():
        problems += [f"output pipe {path}" for path in pipes.iterdir()]
    problems += [f"server fd {fd} on {target}" for fd, target in server_pipe_fds(server)]
    return problems


def server_pipe_fds(server: RunningServer) -> list[tuple[int, str]]:
    """The server's open descriptors on consoles' terminals: PTY masters of a
    devpts other than the host's (a sandbox's), and anything in the handoff
    directory."""
    pipes = str(server.state_dir / "pipes") + "/"
    host_devices = {os.stat(path).st_dev for path in ("/dev/ptmx", "/dev/pts/ptmx")
                    if os.path.exists(path)}
    found = []
    directory = f"/proc/{server.process.pid}/fd"
    if server.process.poll() is not None:
        return []  # a stopped server holds nothing
    for name in os.listdir(directory):
        try:
            target = os.readlink(f"{directory}/{name}")
            st = os.stat(f"{directory}/{name}")
        except OSError:
            continue
        console_master = (stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) == 5
                          and os.minor(st.st_rdev) == 2 and st.st_dev not in host_devices)
        if target.startswith(pipes) or console_master:
            found.append((int(name), target))
    return found


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05):
    """Poll ``predicate`` until it is truthy or ``timeout`` passes (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


# Debian's chromium, as every browser test launches it (driven by Playwright).
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
    "--disable-quic",
]


@pytest.fixture(scope="module")
def browser():
    """One chromium per test module."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()
