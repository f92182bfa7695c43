"""The server under test: `twistd shellserver` as a subprocess on loopback.

Like tests/conftest.py's start_server (whose helpers it imports), but with a
plain `tcp:` and an `ssl:` listener side by side, a uid range of its own, the
limits raised for hundreds of consoles, and /proc readings of the twistd
process alone (its sandboxes are other processes).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import time
import tomllib
import urllib.request
from pathlib import Path

import attrs

REPO = Path(__file__).resolve().parent.parent
EXAMPLE_CONFIG = REPO / "etc" / "shellserver.toml"


def _load_conftest():
    spec = importlib.util.spec_from_file_location("shellserver_tests_conftest",
                                                  REPO / "tests" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


conftest = _load_conftest()
free_port = conftest.free_port
processes_of_uids = conftest.processes_of_uids
RUNTIME = conftest.RUNTIME
TWISTD = conftest.TWISTD

# Uids no test uses. (The PTY baseline runs as root: the runtime usually lives
# under the server's 0700 state directory, which only the sandboxes' binds open.)
UID_MIN, UID_MAX = 240000, 240499

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def example_keys() -> dict[str, dict]:
    """The sections and keys the checked-out server knows (its example config)."""
    with open(EXAMPLE_CONFIG, "rb") as f:
        return tomllib.load(f)


def pool_key(known: dict[str, dict]) -> tuple[str, str] | None:
    """(section, key) of the warm pool size, if this server has one."""
    for section, keys in known.items():
        for key in keys:
            if "pool" in key and isinstance(keys[key], int) and not isinstance(keys[key], bool):
                return section, key
    return None


def bench_config(state: Path, *, pool: int | None, cpu_quota: float,
                 console: dict[str, object] | None = None,
                 sandbox: dict[str, object] | None = None) -> tuple[str, list[str]]:
    """The TOML for a bench server, and notes on what was set (for the report)."""
    known = example_keys()
    sections: dict[str, dict[str, object]] = {
        "server": {"state_dir": str(state)},
        "console": {"idle_timeout": 0, "max_age": 0, **(console or {})},
        "sandbox": {"uid_min": UID_MIN, "uid_max": UID_MAX, "runtime": RUNTIME,
                    "cpu_quota": cpu_quota, **(sandbox or {})},
    }
    notes = [f"sandbox.cpu_quota = {cpu_quota} (the PTY baseline has no CPU cap)"]
    admission = known.get("admission")
    if admission is not None:
        raised = {}
        for key, value in admission.items():
            if isinstance(value, bool) or not isinstance(value, int):
                continue
            if key == "capacity":
                # start-up refuses a capacity the open-files limit cannot serve
                raised[key] = max(1000, UID_MAX - UID_MIN + 1)
            elif "per_address" in key or key.startswith("max"):
                raised[key] = 100_000
        sections["admission"] = raised
        notes.append("admission: " + ", ".join(f"{k} = {v}" for k, v in raised.items()))
    located = pool_key(known)
    if located is not None:
        section, key = located
        sections.setdefault(section, {})[key] = pool or 0
        notes.append(f"{section}.{key} = {pool or 0}")
    lines = []
    for section, keys in sections.items():
        if section not in known:
            continue
        lines.append(f"[{section}]")
        lines += [f"{key} = {_toml(value)}" for key, value in keys.items()
                  if key in known[section] or (section, key) == located]
    return "\n".join(lines) + "\n", notes


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def private_cgroups(name: str) -> list[str]:
    """A cgroup of the server's own beside ours, in each hierarchy the server uses.

    The server puts its sessions under a ``shellserver`` child of its own
    cgroup; servers of other checkouts on this host would share that parent
    with us (and one that stops removes it when it is empty for a moment).
    """
    from shellserver.sandbox.cgroups import read_layout

    return [os.path.join(os.path.dirname(parent), name) for parent in read_layout().parents()]


def _join_cgroups(directories: list[str]) -> None:
    """In the child, before exec: move this process into ``directories``."""
    for directory in directories:
        with open(os.path.join(directory, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))


def remove_cgroups(directories: list[str], timeout: float = 15.0) -> list[str]:
    """Remove the private cgroups (and the server's empty parents in them).

    Retried until ``timeout``: ending launchers remove their sessions' cgroups
    on spare CPU only, so just after the server exits they may still be there.
    """
    deadline = time.monotonic() + timeout
    while True:
        left = []
        for directory in directories:
            for path in (os.path.join(directory, "shellserver"), directory):
                try:
                    os.rmdir(path)
                except FileNotFoundError:
                    pass
                except OSError as e:
                    left.append(f"cgroup {path} ({e.strerror})")
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


@attrs.define
class BenchServer:
    process: subprocess.Popen
    tcp_port: int
    tls_port: int
    cert: str
    state_dir: Path
    log_path: Path
    notes: list[str]
    cgroups: list[str] = attrs.field(factory=list)
    problems: list[str] = attrs.field(factory=list)  # what stopping it left behind

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss_bytes(self) -> int:
        """Resident memory of the twistd process alone."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def cpu_seconds(self) -> float:
        """User + system CPU time of the twistd process (its own threads only)."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def running_sandboxes(self) -> int:
        return len(processes_of_uids(UID_MIN, UID_MAX))

    def stop(self) -> list[str]:
        """Stop the server; the private cgroups that could not be removed."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        return remove_cgroups(self.cgroups)


def start(tmp: Path, *, pool: int | None = None, cpu_quota: float = 2.0,
          console: dict[str, object] | None = None,
          sandbox: dict[str, object] | None = None,
          source: Path | None = None) -> BenchServer:
    """Start a server in ``tmp`` with TCP and TLS listeners; wait until it answers.

    ``source``: a checkout of another version of the server to run instead
    of this one (put first on its PYTHONPATH), for before/after rows.
    """
    from shellserver.tls import endpoint_description, ensure_self_signed

    state = tmp / "state"
    state.mkdir(mode=0o700, parents=True)
    cert, key = ensure_self_signed(str(tmp / "tls"))
    tcp_port, tls_port = free_port(), free_port()
    config, notes = bench_config(state, pool=pool, cpu_quota=cpu_quota, console=console,
                                 sandbox=sandbox)
    config_path = tmp / "shellserver.toml"
    config_path.write_text(config)
    log_path = tmp / "twistd.log"
    cgroups = private_cgroups(f"shellserver-bench-{os.getpid()}-{tmp.name}")
    for directory in cgroups:
        os.makedirs(directory, exist_ok=True)
    process = subprocess.Popen(
        [TWISTD, "--nodaemon", "--pidfile=", "--logfile", str(log_path),
         "shellserver", "--config", str(config_path),
         "--listen", f"tcp:{tcp_port}:interface=127.0.0.1",
         "--listen", endpoint_description(tls_port, cert, key, interface="127.0.0.1"),
         # another version's own web/ is not exported: serve this checkout's
         *(["--web-dir", str(Path(__file__).resolve().parent.parent / "web")]
           if source else [])],
        cwd=str(tmp), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT, preexec_fn=lambda: _join_cgroups(cgroups),
        env=dict(os.environ, PYTHONPATH=str(source)) if source else None,
    )
    server = BenchServer(process, tcp_port, tls_port, cert, state, log_path, notes, cgroups)
    deadline = time.monotonic() + 30
    while True:
        if process.poll() is not None:
            remove_cgroups(cgroups)
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.log()}"
                               f"\nconfig:\n{config}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{tcp_port}/", timeout=5).read()
            return server
        except OSError:
            if time.monotonic() > deadline:
                server.stop()
                raise RuntimeError("server did not answer within 30 s") from None
            time.sleep(0.1)


def session_cgroups(server_log: str) -> list[str]:
    """The cgroup directories left of the sessions a server's log names."""
    from shellserver.sandbox.cgroups import read_layout

    sessions = set(re.findall(r"console (s[0-9a-f]+) started", server_log))
    return [os.path.join(parent, session) for parent in read_layout().parents()
            for session in sessions if os.path.isdir(os.path.join(parent, session))]


def leftovers(server: BenchServer) -> list[str]:
    """Processes in the bench's uid range; cgroups and mounts of the server's sessions."""
    problems = [f"process {pid}" for pid in processes_of_uids(UID_MIN, UID_MAX)]
    problems += [f"cgroup {path}" for path in session_cgroups(server.log())]
    problems += [f"cgroup {path}" for path in server.cgroups if os.path.exists(path)]
    with open("/proc/self/mountinfo") as f:
        problems += [f"mount {line.split()[4]}" for line in f
                     if str(server.state_dir) in line]
    return problems


def kill_leftover_processes() -> list[int]:
    """SIGKILL whatever still runs as one of the bench's uids (after a crash)."""
    import signal

    pids = processes_of_uids(UID_MIN, UID_MAX)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids
