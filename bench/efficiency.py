"""Issue 17: efficiency on what consoles really print, against peers, in one run.

    .venv/bin/python bench/efficiency.py [--quick] [--megabytes N] [--runs N]
        [--baseline REV] [--uid-min N]

Five targets, the same IPython behind each (the runtime's, with the argv
and environment of shellserver.sandbox.spec): a raw PTY read by this process
(no server), socat relaying the PTY to a TCP connection (a relay in C that
does nothing else: the floor under any server on this machine), terminado
(bench/terminado_peer.py: a fresh PTY per websocket, installed with the
`bench` extra), shellserver at ``--baseline`` (default
main: "today", exported with git archive and run from there) and this
checkout's shellserver (twistd on loopback, plain TCP, read by bench/wire.py
acknowledging as the page does; uids from ``--uid-min``, 250 per server).
Workloads, interleaved target by target, median of ``--runs``:

- pipeline: ``!head -c N /dev/zero | base64`` through IPython's ``!``
  (written as ``get_ipython().system(...)``, which is what ``!`` becomes);
- prints: ``for i in range(N): print(i)``;
- blocks: today's 64 KB blocks of 1023 ``x`` and a newline.

Every byte between ``BEGIN 42`` and ``DONE 42`` is counted and hashed
against the expected stream. CPU is per MB delivered, split by process:
the server (twistd / terminado), init (today's relay), the launcher, the console's
program (IPython and its children), the client (this process) and the whole
machine (/proc/stat). Then keystroke echo: through a raw-mode read/write
loop in IPython (``tty.setraw``, one byte in, the same byte out), one console
per target, in rounds taken target after target, and at IPython's prompt.
See bench/README.md for the rows.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import codecs
import hashlib
import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

import scenarios as s  # noqa: E402
import server as bench_server  # noqa: E402
import wire  # noqa: E402

from shellserver.sandbox.spec import console_argv, console_env  # noqa: E402

# This bench's own uids, apart from run.py's (240000-240499) and the tests'.
bench_server.UID_MIN, bench_server.UID_MAX = 250000, 250499

BEGIN, DONE = s.BEGIN, s.DONE
BASE64_LINE = 76  # base64(1) wraps its output at 76 columns
WORKLOADS = ("pipeline", "prints", "blocks")
NS = 1e-9
PRINTS_MAX_MB = 10


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- the workloads: the IPython line and the exact bytes expected -------------


def workload(name: str, megabytes: float) -> tuple[str, int, str]:
    """(IPython line, expected length, expected sha256) of ~``megabytes`` of output."""
    digest = hashlib.sha256()
    length = 0

    def add(text: str) -> None:
        nonlocal length
        data = text.encode()
        digest.update(data)
        length += len(data)

    if name == "pipeline":
        zeros = int(megabytes * 1e6 * 0.75 * BASE64_LINE / (BASE64_LINE + 2)) // 3 * 3
        chars = zeros // 3 * 4  # base64 of zeros is all "A"
        full, rest = divmod(chars, BASE64_LINE)
        line = "A" * BASE64_LINE + "\r\n"
        for _ in range(full // 1000):
            add(line * 1000)
        add(line * (full % 1000))
        if rest:
            add("A" * rest + "\r\n")
        body = f"get_ipython().system('head -c {zeros} /dev/zero | base64')"
    elif name == "prints":
        # IPython itself grows by about 75 MB per million prints (on a bare
        # PTY too): past ~12 MB of them the sandbox's 256 MB ends it.
        total, count = 0, 0
        while total < min(megabytes, PRINTS_MAX_MB) * 1e6:
            step = 10000
            total += sum(len(str(i)) + 2 for i in range(count, count + step))
            count += step
        for start in range(0, count, 10000):
            add("".join(f"{i}\r\n" for i in range(start, min(count, start + 10000))))
        body = f'exec("for i in range({count}): print(i)")'
    elif name == "blocks":
        blocks = max(1, round(megabytes * 1e6 / (s.BLOCK_LINES * len(s.LINE_ON_WIRE))))
        for _ in range(blocks):
            add(s.LINE_ON_WIRE * s.BLOCK_LINES)
        body = ("import sys; w=sys.stdout.write; b=('x'*1023+'\\n')*64; "
                f"any(w(b) and 0 for _ in range({blocks}))")
    else:
        raise ValueError(name)
    return f"print('BEGIN',6*7); {body}; print('DONE',6*7)", length, digest.hexdigest()


class HashVerifier(s.FloodVerifier):
    """Hashes exactly ``length`` bytes after BEGIN, then expects DONE (the
    flood's BEGIN/DONE framing; the body is any bytes, checked by sha256)."""

    def __init__(self, length: int, sha256: str) -> None:
        super().__init__(None)
        self.length, self.sha256 = length, sha256
        self.digest = hashlib.sha256()

    def _body(self, text: str) -> str:
        data = text.encode()
        take = min(len(data), self.length - self.body)
        self.digest.update(data[:take])
        self.body += take
        if self.body < self.length:
            return ""
        self.state = "after"
        return data[take:].decode(errors="replace")

    def _body_error(self) -> str | None:
        if self.digest.hexdigest() != self.sha256:
            return f"{self.body} bytes, but not the expected ones (sha256)"
        return None


# -- CPU per process -----------------------------------------------------------


def children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    return children


def descendants(root: int, children: dict[int, list[int]]) -> list[tuple[int, int]]:
    """(pid, depth below root) of every descendant."""
    found, todo = [], [(pid, 1) for pid in children.get(root, [])]
    while todo:
        pid, depth = todo.pop()
        found.append((pid, depth))
        todo += [(child, depth + 1) for child in children.get(pid, [])]
    return found


def cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def cpu_ns(pid: int) -> int:
    """On-CPU time of every thread of ``pid`` (schedstat: nanoseconds), 0 if gone."""
    total = 0
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
    except (OSError, ValueError):
        pass
    return total


def reaped_ns(pid: int) -> int:
    """CPU time of the children ``pid`` has waited for (``cutime`` + ``cstime``
    of /proc/PID/stat, in nanoseconds; 0 if gone): a pipeline's processes,
    which IPython's ``!`` starts after the roles are listed and has reaped by
    DONE."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[13]) + int(fields[14])) * 10**9 // bench_server.CLK_TCK
    except (OSError, IndexError, ValueError):
        return 0


def activity(pid: int) -> tuple[int, int, int]:
    """(wake-ups, read calls, write calls) of ``pid`` so far, (0, 0, 0) if gone.

    Wake-ups are the main thread's voluntary context switches: each is a
    sleep in poll or a blocking call, ended by an event.
    """
    try:
        with open(f"/proc/{pid}/status") as f:
            wakeups = next(int(line.split()[1]) for line in f
                           if line.startswith("voluntary_ctxt_switches"))
        with open(f"/proc/{pid}/io") as f:
            io = dict(line.split(": ") for line in f.read().splitlines())
        return wakeups, int(io["syscr"]), int(io["syscw"])
    except (OSError, StopIteration, KeyError, ValueError):
        return 0, 0, 0


class Roles:
    """The processes of one console, by role, read together."""

    def __init__(self, roles: dict[str, list[int]]) -> None:
        self.roles = roles

    def sample(self) -> dict[str, int]:
        """On-CPU ns by role; the console's includes the children it has reaped."""
        return {role: sum(cpu_ns(pid) + (reaped_ns(pid) if role == "console" else 0)
                          for pid in pids)
                for role, pids in self.roles.items()}

    def counts(self) -> dict[str, tuple[int, int, int]]:
        return {role: tuple(sum(c) for c in zip(*(activity(pid) for pid in pids),
                                                 (0, 0, 0), strict=False))
                for role, pids in self.roles.items()}


# -- targets ---------------------------------------------------------------------


class PtyTarget(s.PtyTarget):
    label = "raw PTY"

    def roles(self, console: wire.PtyConsole) -> Roles:
        pid = console.process.pid
        tree = [pid] + [p for p, _ in descendants(pid, children_map())]
        return Roles({"console": tree})


class ShellserverTarget(s.WireTarget):
    label = "shellserver"

    def __init__(self, server, tls: bool, label: str, uids: tuple[int, int]) -> None:
        super().__init__(server, tls)
        self.label, self.uids = label, uids
        self._seen: set[int] = set()

    def roles(self, console) -> Roles:
        """twistd; the console's launcher (twistd's child, or the fork server
        template's), init and the console below it, found by the session's uid."""
        children = children_map()
        parents = {child: parent for parent, kids in children.items() for child in kids}
        pids = set(bench_server.processes_of_uids(*self.uids))
        inits = [p for p in pids if parents.get(p) not in pids and p not in self._seen]
        if len(inits) != 1:
            raise RuntimeError(f"{self.label}: expected one new sandbox init, found {inits}")
        init = inits[0]
        self._seen.add(init)
        console_pids = [p for p, _ in descendants(init, children)]
        return Roles({"server": [self.server.pid], "launcher": [parents[init]],
                      "relay": [init], "console": console_pids})

    async def settle(self, timeout: float = 20.0) -> None:
        """Until no console of this server's runs (its own uid range)."""
        deadline = time.monotonic() + timeout
        while (bench_server.processes_of_uids(*self.uids)
               and time.monotonic() < deadline):
            await asyncio.sleep(0.05)


class TerminadoConsole(wire.Terminal):
    """One terminado terminal over its websocket: JSON ["stdout", text] messages."""

    def __init__(self, port: int) -> None:
        super().__init__()
        self.port = port
        self.name = "terminado console"
        self.protocol: wire._WebSocketProtocol | None = None

    async def open(self, cols: int = 100, rows: int = 30, timeout: float = 30.0) -> float:
        key = base64.b64encode(secrets.token_bytes(16)).decode()
        request = (
            f"GET /websocket HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Origin: http://127.0.0.1:{self.port}\r\n\r\n").encode()
        loop = asyncio.get_running_loop()
        expectation = self.expect(wire.PROMPT)
        start = wire.now()
        _, self.protocol = await asyncio.wait_for(loop.create_connection(
            lambda: wire._WebSocketProtocol(self, request, key), "127.0.0.1", self.port),
            timeout)
        await asyncio.wait_for(self.protocol.handshake, timeout)
        self.send(["set_size", rows, cols, rows, cols])
        return await self.wait_prompt(timeout, expectation) - start

    def send(self, message: list) -> None:
        self.protocol.send_frame(0x1, json.dumps(message).encode())

    def _message(self, message: str) -> None:
        kind, *rest = json.loads(message)
        if kind == "stdout":
            self._output(rest[0])

    def send_keys(self, text: str) -> None:
        self.send(["stdin", text])

    def pause_reading(self) -> None:
        self.protocol.transport.pause_reading()

    def resume_reading(self) -> None:
        self.protocol.transport.resume_reading()

    def close(self) -> None:
        if self.protocol and self.protocol.transport:
            self.protocol.transport.abort()


class TerminadoTarget(s.Target):
    name = "terminado"
    label = "terminado"

    def __init__(self, tmp: Path) -> None:
        self.home = tmp / "terminado-home"
        self.home.mkdir()
        self.port = bench_server.free_port()
        env = console_env(bench_server.RUNTIME, os.getuid())
        env.update(HOME=str(self.home), IPYTHONDIR=f"{self.home}/.ipython",
                   MPLCONFIGDIR=str(self.home))
        self.process = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "terminado_peer.py"), str(self.port),
             bench_server.RUNTIME, str(self.home)],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
        if self.process.stdout.readline().strip() != "ready":
            raise RuntimeError("terminado_peer.py did not start (is the `bench` extra "
                               "installed? pip install -e '.[bench]')")

    async def console(self, source: str | None = None) -> wire.Terminal:
        return await s.opened(TerminadoConsole(self.port))

    def roles(self, console: TerminadoConsole) -> Roles:
        children = children_map()
        tree = [p for p, _ in descendants(self.process.pid, children)]
        return Roles({"server": [self.process.pid], "console": tree})

    async def settle(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while children_map().get(self.process.pid) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    def cleanup(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


class RelayConsole(wire.Terminal):
    """The same IPython on a PTY behind socat: a relay in C between one TCP
    connection and the PTY, which does nothing else (no websocket, no framing,
    no acknowledgements, no sandbox). What it costs is the floor under any
    server that carries a PTY to a socket, on this machine."""

    def __init__(self, home: Path, log: Path) -> None:
        super().__init__()
        self.home, self.log = home, log
        self.name = "socat relay"
        self.process: subprocess.Popen | None = None
        self.transport: asyncio.Transport | None = None
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    async def open(self, cols: int = 100, rows: int = 30, timeout: float = 30.0) -> float:
        """socat on a free port; connect (it then spawns IPython on a fresh PTY,
        its controlling terminal): the seconds from connect to the first prompt."""
        script = self.home / f"console-{cols}x{rows}.sh"
        if not script.exists():
            # the terminal's size, as the other targets set it, then the console
            script.write_text(f"#!/bin/sh\n/bin/stty rows {rows} cols {cols}\n"
                              f"exec {shlex.join(console_argv(bench_server.RUNTIME))}\n")
            script.chmod(0o755)
        env = console_env(bench_server.RUNTIME, os.getuid())
        env.update(HOME=str(self.home), IPYTHONDIR=f"{self.home}/.ipython",
                   MPLCONFIGDIR=str(self.home))
        port = bench_server.free_port()
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                ["socat", f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,nodelay",
                 f"EXEC:{script},pty,setsid,ctty,stderr"],
                env=env, cwd=self.home, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + 10
        while self.transport is None:
            try:
                self.transport, _ = await loop.create_connection(
                    lambda: _RelayProtocol(self), "127.0.0.1", port)
            except ConnectionRefusedError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"socat did not listen on port {port} "
                                       f"(its log: {self.log})") from None
                await asyncio.sleep(0.01)
        expectation = self.expect(wire.PROMPT)
        start = wire.now()
        return await self.wait_prompt(timeout, expectation) - start

    def _received(self, data: bytes) -> None:
        text = self._decoder.decode(data)
        if text:
            self._output(text)

    def send_keys(self, text: str) -> None:
        self.transport.write(text.encode("utf-8"))

    def pause_reading(self) -> None:
        self.transport.pause_reading()

    def resume_reading(self) -> None:
        self.transport.resume_reading()

    def close(self) -> None:
        """Drop the connection: socat closes the PTY, and IPython gets SIGHUP."""
        if self.transport is not None:
            self.transport.abort()
        self._ended("closed by us")


class _RelayProtocol(asyncio.Protocol):
    def __init__(self, console: RelayConsole) -> None:
        self.console = console

    def data_received(self, data: bytes) -> None:
        self.console._received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.console._ended("relay closed")


class RelayTarget(s.Target):
    """Consoles behind socat (Debian's package), one socat per console."""

    name = "socat"
    label = "socat relay"

    def __init__(self, tmp: Path) -> None:
        if shutil.which("socat") is None:
            raise RuntimeError("socat is missing: apt-get install socat (./setup.sh install "
                               "installs it)")
        self.home = tmp / "relay-home"
        self.home.mkdir()
        self.log = tmp / "socat.log"
        self.live: list[RelayConsole] = []

    async def console(self, source: str | None = None) -> wire.Terminal:
        console = RelayConsole(self.home, self.log)
        self.live.append(console)
        return await s.opened(console)

    def roles(self, console: RelayConsole) -> Roles:
        pid = console.process.pid
        tree = [p for p, _ in descendants(pid, children_map())]
        return Roles({"server": [pid], "console": tree})

    async def settle(self, timeout: float = 20.0) -> None:
        """Until every closed console's socat and IPython have gone (killed at
        the deadline)."""
        deadline = time.monotonic() + timeout
        for console in [c for c in self.live if c.closed.done()]:
            tree = [console.process.pid] + [
                p for p, _ in descendants(console.process.pid, children_map())]
            while console.process.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            while any(os.path.exists(f"/proc/{p}") for p in tree[1:]) \
                    and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            self._kill(console, tree)
            self.live.remove(console)

    def _kill(self, console: RelayConsole, tree: list[int]) -> None:
        """Kill what of ``tree`` still runs (socat first), and reap socat."""
        for pid in tree:
            if os.path.exists(f"/proc/{pid}"):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        console.process.wait(5)

    def cleanup(self) -> None:
        for console in self.live:
            console.close()
            if console.process is not None:
                self._kill(console, [console.process.pid] + [
                    p for p, _ in descendants(console.process.pid, children_map())])
        self.live.clear()


# -- measurements ----------------------------------------------------------------


def machine_ns() -> int:
    """Busy time of every CPU so far, in nanoseconds (/proc/stat)."""
    all_ticks, idle = s.machine_cpu()
    return (all_ticks - idle) * 10**9 // bench_server.CLK_TCK


async def flood(target, name: str, line: str, length: int, sha256: str) -> dict:
    """One workload on a fresh console: MB/s from BEGIN to DONE, CPU per MB by process."""
    console = await target.console()
    try:
        await console.quiet(0.2)
        roles = target.roles(console)
        verifier = HashVerifier(length, sha256)
        console.sink = verifier.feed
        marks: list[tuple[dict[str, int], int, float]] = []

        counts: list[dict[str, tuple[int, int, int]]] = []

        def mark(_=None) -> None:
            marks.append((roles.sample(), machine_ns(), s.cpu_self()))
            counts.append(roles.counts())
        verifier.began.add_done_callback(mark)
        verifier.done.add_done_callback(mark)
        prompt = console.expect(wire.PROMPT)
        console.send_keys(line + "\r")
        try:
            await asyncio.wait_for(asyncio.shield(verifier.done), 60 + length / 1e6)
        except TimeoutError:
            raise RuntimeError(
                f"{target.label} {name}: no DONE in time; {verifier.state}, {verifier.body} of "
                f"{length} bytes; last output {wire.ANSI.sub('', console.recent)[-200:]!r}"
            ) from None
        await console.wait_prompt(30, prompt)
    finally:
        console.sink = None
        await target.finish([console])
    (before, machine0, client0), (after, machine1, client1) = marks
    mb = verifier.body / 1e6
    seconds = verifier.done_at - verifier.began_at
    cpu = {role: (after[role] - before[role]) * NS * 1000 / mb for role in before}
    cpu["client"] = (client1 - client0) * 1000 / mb
    cpu["machine"] = (machine1 - machine0) * NS * 1000 / mb
    cpu["outside"] = sum(cpu.get(role, 0.0)
                         for role in ("server", "launcher", "relay", "template"))
    # wake-ups, reads and writes per MB of each role
    calls = {role: tuple((a - b) / mb for a, b in zip(counts[1][role], counts[0][role],
                                                       strict=True))
             for role in counts[0]}
    return {"mb_per_s": mb / seconds, "bytes": verifier.body, "expected": length,
            "error": verifier.error, "cpu": cpu, "calls": calls,
            "messages": console.messages}


RAW_ECHO = ("import os,tty,termios,time; a=termios.tcgetattr(0); tty.setraw(0); "
            "os.write(1,b'RAW READY\\r\\n'); "
            'exec("n=0\\nt=time.time()+120\\nwhile n<{count} and time.time()<t:\\n'
            " b=os.read(0,1)\\n os.write(1,b)\\n n+=1\\n if b==b'q': break\"); "
            "termios.tcsetattr(0,termios.TCSADRAIN,a)")


ECHO_ROUNDS = 10  # the raw-mode echoes are taken in this many rounds, target after target


async def start_raw_echo(target, count: int):
    """A console of ``target`` running the raw-mode echo loop (``count`` bytes at most)."""
    console = await target.console()
    try:
        await console.quiet(0.2)
        ready = console.expect("RAW READY")
        console.send_keys(RAW_ECHO.format(count=count) + "\r")
        await ready.wait(10)
        await console.quiet(0.1)
    except BaseException:
        await target.finish([console])
        raise
    return console


async def raw_echo_samples(console, count: int, gap: float = 0.003) -> list[float]:
    """``count`` keystrokes through the raw-mode loop: seconds from send to echo."""
    samples = []
    for i in range(count):
        key = "abcdefghij"[i % 10]
        arrival = console.expect(key)
        sent = wire.now()
        console.send_keys(key)
        samples.append(await arrival.wait(5) - sent)
        await asyncio.sleep(gap)
    return samples


async def raw_echo(targets: list, count: int) -> dict[str, dict]:
    """Echo through a raw-mode loop in IPython (one byte in, the same byte out),
    one console per target, interleaved: ECHO_ROUNDS rounds of count/ECHO_ROUNDS
    keystrokes, target after target, so that the machine's other load falls
    on every target alike."""
    consoles: dict[str, object] = {}
    samples: dict[str, list[float]] = {t.label: [] for t in targets}
    per_round = max(1, count // ECHO_ROUNDS)
    try:
        for target in targets:
            consoles[target.label] = await start_raw_echo(target, count + 1)
        for _ in range(ECHO_ROUNDS):
            for target in targets:
                samples[target.label] += await raw_echo_samples(consoles[target.label],
                                                                per_round)
        for target in targets:
            console = consoles.pop(target.label)
            prompt = console.expect(wire.PROMPT)
            console.send_keys("q")
            try:
                await console.wait_prompt(10, prompt)
            finally:
                await target.finish([console])
    finally:
        for target in targets:
            if target.label in consoles:
                await target.finish([consoles.pop(target.label)])
    return {label: {"p50": s.percentile(values, 50), "p99": s.percentile(values, 99)}
            for label, values in samples.items()}


# -- the run and its table ---------------------------------------------------------


def median_run(runs: list[dict]) -> dict:
    return sorted(runs, key=lambda r: r["mb_per_s"])[len(runs) // 2]


def render(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for index, r in enumerate(rows):
        out.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
        if index == 0:
            out.append("-" * len(out[0]))
    return "\n".join(out)


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "—"


UIDS_PER_SERVER = 250


def export_revision(revision: str, into: Path) -> Path:
    """A copy of the server's code at ``revision`` (git archive), to run as the baseline."""
    root = os.path.dirname(HERE)
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", root, "archive", revision, "shellserver", "twisted"],
                             capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def start_server(tmp: Path, uid_min: int, source: Path | None):
    """A bench server with its own uid range (bench_server reads the range at start)."""
    bench_server.UID_MIN, bench_server.UID_MAX = uid_min, uid_min + UIDS_PER_SERVER - 1
    # A console the bench leaves ends with its connection (no reattach grace).
    return bench_server.start(tmp, pool=0, source=source, console={"reattach_grace": 0})


async def run(args, tmp: Path, servers: list) -> tuple[str, list[str]]:
    notes: list[str] = []
    pty = PtyTarget()
    relay = RelayTarget(tmp)
    log("starting terminado and shellserver (this checkout, and the baseline)")
    peer = TerminadoTarget(tmp)
    targets: list = [pty, relay, peer]
    today = None
    if args.baseline:
        source = export_revision(args.baseline, tmp / "baseline-source")
        srv = start_server(tmp / "baseline", args.uid_min + UIDS_PER_SERVER, source)
        servers.append(srv)
        today = f"today ({args.baseline})"
        targets.append(ShellserverTarget(srv, False, today,
                                         (args.uid_min + UIDS_PER_SERVER,
                                          args.uid_min + 2 * UIDS_PER_SERVER - 1)))
        targets[-1].framed = args.framed
    srv = start_server(tmp / "shellserver", args.uid_min, None)
    servers.append(srv)
    ours = ShellserverTarget(srv, False, "shellserver",
                             (args.uid_min, args.uid_min + UIDS_PER_SERVER - 1))
    ours.framed = args.framed
    targets.append(ours)
    labels = [t.label for t in targets]
    workloads = args.workloads
    expected = {name: workload(name, args.megabytes) for name in workloads}
    results: dict[str, dict[str, list[dict]]] = {t.label: {w: [] for w in workloads}
                                                 for t in targets}
    echoes: dict[str, dict] = {}
    try:
        for i in range(args.runs):
            for name in workloads:
                for target in targets:
                    log(f"{target.label}: {name}, run {i + 1}")
                    results[target.label][name].append(await flood(target, name,
                                                                   *expected[name]))
        if args.echo:
            log(f"echo through the raw loop, {ECHO_ROUNDS} rounds over "
                + ", ".join(labels))
            raw = await raw_echo(targets, args.echo)
        for target in targets if args.echo else ():
            log(f"{target.label}: echo at the prompt")
            echoes[target.label] = {"raw": raw[target.label],
                                    "prompt": await s.echo(target, args.echo // 2)}
    finally:
        pty.cleanup()
        relay.cleanup()
        peer.cleanup()
    log("stopping the servers")
    for srv in servers:
        srv.stop()

    # The last ratio column is the C relay's own, against the goal's reference:
    # the floor of what any server reaches on this machine.
    header = ["row", *labels, "shellserver / PTY", "shellserver / terminado",
              "shellserver / today", "socat relay, same ratio", "goal"]
    rows = [header]

    for name in workloads:
        med = {label: median_run(results[label][name]) for label in results}
        p, r, t, o = (med[label] for label in ("raw PTY", "socat relay", "terminado",
                                               "shellserver"))
        b = med[today] if today else None
        mb = p["expected"] / 1e6
        goal = ">= 0.9x PTY" if name != "blocks" else ">= today"
        rows.append([f"{name} ({mb:.0f} MB): MB/s",
                     *(f"{med[label]['mb_per_s']:.1f}" for label in labels),
                     ratio(o["mb_per_s"], p["mb_per_s"]), ratio(o["mb_per_s"], t["mb_per_s"]),
                     ratio(o["mb_per_s"], b["mb_per_s"]) if b else "—",
                     ratio(r["mb_per_s"], p["mb_per_s"]), goal])
        rows.append([f"{name}: CPU ms/MB outside the console's program",
                     *("—" if label == "raw PTY" else f"{med[label]['cpu']['outside']:.1f}"
                       for label in labels), "",
                     ratio(o["cpu"]["outside"], t["cpu"]["outside"]),
                     ratio(o["cpu"]["outside"], b["cpu"]["outside"]) if b else "—",
                     ratio(r["cpu"]["outside"], t["cpu"]["outside"]), "<= 0.5x terminado"])
        for role in ("server", "relay", "launcher", "console", "client", "machine"):
            shown = "init (relay today)" if role == "relay" else role
            rows.append([f"  {name}: CPU ms/MB, {shown}",
                         *(f"{med[label]['cpu'][role]:.1f}" if role in med[label]["cpu"]
                           else "—" for label in labels), "", "", "", "", ""])
        for role in ("console", "relay", "server"):
            rows.append([f"  {name}: {'init' if role == 'relay' else role} "
                         "wake-ups / reads / writes per MB",
                         *("/".join(f"{v:.0f}" for v in med[label]["calls"][role])
                           if role in med[label]["calls"] else "—" for label in labels),
                         "", "", "", "", ""])
        rows.append([f"  {name}: messages to the client per MB",
                     *(f"{med[label]['messages'] / mb:.0f}" for label in labels),
                     "", "", "", "", ""])
        verified = {label: all(r["error"] is None and r["bytes"] == r["expected"]
                               for r in results[label][name]) for label in results}
        rows.append([f"  {name}: bytes verified (count + sha256, every run)",
                     *("exact" if verified[label] else "WRONG" for label in labels),
                     "", "", "", "", "exact"])
        for label in results:
            errors = [r["error"] for r in results[label][name] if r["error"]]
            if errors:
                notes.append(f"{label} {name}: {errors[0]}")
            notes.append(f"{label} {name} MB/s per run: "
                         + ", ".join(f"{r['mb_per_s']:.1f}" for r in results[label][name]))
    kinds = (("raw", "raw-mode echo loop"), ("prompt", "echo at the prompt"))
    for kind, what in kinds if echoes else ():
        p, r, t, o = (echoes[label][kind] for label in ("raw PTY", "socat relay", "terminado",
                                                        "shellserver"))
        b = echoes[today][kind] if today else None
        for q, goal in (("p50", "<= 2x PTY"), ("p99", "<= 3x PTY")):
            rows.append([f"{what} {q} (ms)",
                         *(f"{echoes[label][kind][q] * 1000:.2f}" for label in labels),
                         ratio(o[q], p[q]), ratio(o[q], t[q]),
                         ratio(o[q], b[q]) if b else "—", ratio(r[q], p[q]),
                         goal if kind == "raw" else ""])
    return render(rows), notes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="10 MB, one run, 100 echoes")
    parser.add_argument("--megabytes", type=float, default=30.0, help="output per workload")
    parser.add_argument("--runs", type=int, default=3, help="interleaved repetitions")
    parser.add_argument("--echo", type=int, default=300, help="raw-mode echoes (0: none)")
    parser.add_argument("--workloads", default=",".join(WORKLOADS),
                        help="comma-separated subset of " + ",".join(WORKLOADS)
                        + " (empty: echo only)")
    parser.add_argument("--framed", action="store_true",
                        help="shellserver over SockJS frames on the session websocket, "
                        "as the page's sockjs-client, instead of the raw websocket")
    parser.add_argument("--baseline", default="main",
                        help="git revision run beside this checkout as 'today' ('' for none)")
    parser.add_argument("--uid-min", type=int, default=250000,
                        help="first uid of the bench's range (250 per server)")
    args = parser.parse_args()
    if args.quick:
        args.megabytes, args.runs, args.echo = 10.0, 1, 100
    args.workloads = [name for name in args.workloads.split(",") if name]
    unknown = set(args.workloads) - set(WORKLOADS)
    if unknown:
        parser.error(f"unknown workloads {sorted(unknown)}; known: {', '.join(WORKLOADS)}")
    if args.uid_min <= 0:
        parser.error(f"--uid-min: {args.uid_min} is not a positive uid")
    if os.geteuid() != 0:
        print("bench/efficiency.py needs root: the server builds real sandboxes",
              file=sys.stderr)
        return 2
    bench_server.UID_MIN, bench_server.UID_MAX = (args.uid_min,
                                                   args.uid_min + 2 * UIDS_PER_SERVER - 1)
    if bench_server.processes_of_uids(bench_server.UID_MIN, bench_server.UID_MAX):
        print("processes already run in the bench's uid range: another bench? stop it first",
              file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="shellserver-efficiency-"))
    servers: list = []
    started = time.monotonic()
    table = None
    load_before = os.getloadavg()[0]
    try:
        table, notes = asyncio.run(run(args, tmp, servers))
    except KeyboardInterrupt:
        log("interrupted")
    finally:
        bench_server.UID_MIN, bench_server.UID_MAX = (args.uid_min,
                                                       args.uid_min + 2 * UIDS_PER_SERVER - 1)
        problems = [p for srv in servers for p in srv.stop()]
        killed = bench_server.kill_leftover_processes()
        problems += [p for srv in servers for p in bench_server.leftovers(srv)]
        if table is not None and not problems:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            log(f"logs kept in {tmp}")
    if table is None:
        return 130
    print(f"shellserver efficiency bench ({args.megabytes:g} MB per workload, median of "
          f"{args.runs} interleaved runs, {os.cpu_count()} CPUs, load average "
          f"{load_before:.1f} before, {time.strftime('%Y-%m-%d %H:%M')}, "
          f"{time.monotonic() - started:.0f} s)")
    print()
    print(table)
    print()
    for note in notes:
        print(f"- {note}")
    if killed:
        print(f"- cleanup: killed leftover processes {killed}")
    if problems:
        print(f"- cleanup: left behind: {problems}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
