"""Soak: open, use and close thousands of consoles on a real server; report leaks.

Starts a real `twistd shellserver` (tests/conftest.py's start_server) with a
warm pool and uids of its own, runs a few client threads that open consoles
over the real wire and do a little random work with each (print, a loop,
Ctrl-C, `exit`, an abrupt close mid-output, no or bad tokens), samples the
server's RSS, fds, sandbox processes, session cgroups and mounts every few
seconds, and at the end prints a table of what leaked. Exits non-zero if
anything leaked, a console failed, or RSS grew past the threshold.

    .venv/bin/python tests/soak/soak.py [--consoles 2000] [--minutes 10] [--concurrency 8]

Not collected by pytest (not named test_*.py): it takes minutes. Needs root.
"""

from __future__ import annotations

import argparse
import collections
import glob
import http.client
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TESTS))

from conftest import RunningServer, processes_of_uids, start_server  # noqa: E402
from console_client import TOKEN, ConsoleClient, WebSocketWire  # noqa: E402

# What the server's log says about its sandboxes (twistd rotates the log at
# 1 MB, so every twistd.log* file is read).
STARTED = re.compile(r"console (s[0-9a-f]+) started as uid (\d+)")
CLEANED = re.compile(r"console (s[0-9a-f]+) cleaned up")
QUARANTINED = "quarantined"
HANDED_OUT = "handed out from the warm pool"
TRACEBACK = "Traceback (most recent call last)"

PROMPT = re.compile(r"In \[(\d+)\]: (?=[^\n]*$)")  # the last, still open, prompt
ANSI = re.compile(r"\x1b(?:\[[0-9;?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])")
POOL_SIZE = 2
TEXT_KEEP = 64 * 1024
ACK_EVERY = 32768  # UTF-16 units, as the terminal page acknowledges
AUTH_TIMEOUT = 2.0
REATTACH_GRACE = 3.0
# The console page's text when the node is full (shellserver.admission).
FULL_TEXT = "All consoles are in use right now."
# How long a client waits for a slot before the node counts as stuck full:
# far above the seconds an ending console's teardown takes on a saturated
# node, far below the run.
FULL_WAIT = 30.0
FULL_WAITS: list[tuple[int, float]] = []  # (refusals, seconds) per console that waited

# Scenario name -> relative weight.
WEIGHTS = {
    "print": 24,
    "loop": 20,
    "ctrl-c": 14,
    "exit": 12,
    "abrupt-mid-output": 12,
    "close-while-starting": 6,
    "no-token": 4,
    "bad-token": 4,
    "replayed-token": 4,
}


class Failed(Exception):
    """A console did not behave; ``reason`` is the short text that is counted."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SoakClient(ConsoleClient):
    """The tests' console client, matching on the output with escapes removed
    instead of a pyte screen: the client shares 2 cores with the server and
    its sandboxes, and a screen per console would cost most of the client's
    CPU."""

    def __init__(self, server: RunningServer, source: str = "127.0.0.1") -> None:
        # ConsoleClient.__init__, but from a loopback address of the worker's
        # own, so that per-address limits (connections, sessions, wrong
        # tokens) see each worker as one visitor, not all of them as one.
        self.server, self.source = server, source
        # Bounded: a flood must not make the client slower and slower.
        self.messages = collections.deque(maxlen=64)
        self.raw_output = collections.deque(maxlen=64)
        self.closed = False
        self.size = (100, 30)
        self.stream = self  # ConsoleClient.pump feeds output to self.stream
        self.text = ""      # the output's last TEXT_KEEP..2*TEXT_KEEP chars, escapes removed
        self.dropped = 0    # chars dropped from the front of self.text
        self._held = ""     # an escape sequence split across messages
        self.second_ctrl_c = False
        self.started = False  # the server said the console started (s ready/resumed)
        self.received = 0   # output so far in UTF-16 units, and what was acknowledged
        self.acked = 0
        # What ConsoleClient's pump and close read (its own acknowledging off:
        # this client acknowledges in ``pump``).
        self.origin, self.transport, self.port = server.origin, "websocket", server.port
        self.acknowledge, self.written, self._acked = False, 0, 0
        self.secret = self.grace = self.close_code = self.close_reason = None
        raw = socket.create_connection(("127.0.0.1", server.port), timeout=10,
                                       source_address=(source, 0))
        try:
            tls = server.ssl_context().wrap_socket(raw, server_hostname="127.0.0.1")
            self.wire = WebSocketWire(server, origin=server.origin, port=server.port, sock=tls)
        except BaseException:
            raw.close()
            raise
        self.ws = self.wire.ws

    def login(self, token: str | None = None) -> None:
        # A token fetched from this client's own address: tokens are bound
        # to the address that loaded the page.
        super().login(token if token is not None else _fetch_token(self.server))
        self.send("k0")  # flow control on, as the page does

    def pump(self, timeout: float) -> bool:
        """ConsoleClient.pump, acknowledging output like the terminal page:
        every ACK_EVERY units, and once caught up (nothing more to read)."""
        got = super().pump(timeout)
        if got and self.messages[-1] in ("sready", "sresumed"):
            # Kept apart: the bounded message list forgets it in a flood.
            self.started = True
        behind = self.received - self.acked
        if behind and not self.closed and (behind >= ACK_EVERY or not got):
            self.acked = self.received
            try:
                self.send(f"k{self.acked}")
            except Exception:
                pass  # the connection is going; pump sees it next
        return got

    def feed(self, data: str) -> None:
        self.received += len(data.encode("utf-16-le")) // 2
        data = self._held + data
        cut = data.rfind("\x1b")
        if cut != -1 and len(data) - cut < 64 and not ANSI.match(data, cut):
            self._held, data = data[cut:], data[:cut]
        else:
            self._held = ""
        self.text += ANSI.sub("", data)
        if len(self.text) > 2 * TEXT_KEEP:
            self.dropped += len(self.text) - TEXT_KEEP
            self.text = self.text[-TEXT_KEEP:]

    @property
    def mark(self) -> int:
        """The position of the next output, for ``since`` and ``output_since``."""
        return self.dropped + len(self.text)

    def output_since(self, mark: int) -> str:
        return self.text[max(0, mark - self.dropped):]

    def display(self) -> str:
        return self.text[-2000:]

    def wait_for_text(self, pattern: str, since: int = 0, timeout: float = 15.0) -> bool:
        return self.wait_for(
            lambda c: c.text.find(pattern, max(0, since - c.dropped)) != -1, timeout)

    def wait_for_prompt(self, number: int, timeout: float = 15.0) -> bool:
        return self.wait_for_text(f"In [{number}]: ", timeout=timeout)

    def pump_for(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.closed and time.monotonic() < deadline:
            self.pump(min(0.2, max(0.01, deadline - time.monotonic())))

    def has_started(self) -> bool:
        # Remembered apart from the message list, which is bounded here.
        return self.started

    def close(self) -> None:
        """Close like a browser: the close handshake, then the TCP connection.

        websocket-client's close() does nothing once a close frame has been
        received (the server ended the console), leaving the socket open.
        """
        super().close()  # ``q`` first: it ends the console, which frees its slot
        self.ws.shutdown()

    def abort(self) -> None:
        """Drop the TCP connection without a WebSocket close frame."""
        try:
            self.ws.sock.shutdown(socket.SHUT_RDWR)
        except (OSError, AttributeError):
            pass
        self.ws.shutdown()
        self.closed = True


# ---- scenarios: each opens one console, raises Failed when it misbehaves ----

_worker = threading.local()  # .source: the loopback address this worker connects from


def _connect(server: RunningServer) -> SoakClient:
    return SoakClient(server, getattr(_worker, "source", "127.0.0.1"))


def _console_page(server: RunningServer, source: str) -> tuple[int, str]:
    """``GET /console/`` from ``source``: the status and the page."""
    connection = http.client.HTTPSConnection(
        "127.0.0.1", server.port, timeout=10, context=server.ssl_context(),
        source_address=(source, 0))
    try:
        connection.request("GET", "/console/")
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def _fetch_token(server: RunningServer) -> str:
    """A token for this worker's address (tokens are bound to the address
    that fetched them), waiting for a slot while the node is full.

    "Full" is the server's correct answer while the capacity is held, and
    an ending console holds its slot until its sandbox is gone: its
    teardown runs only on spare CPU (launcher.yield_cpu, cgroup weight 1),
    so with the CPUs saturated by the soak itself, a burst of ended
    consoles holds more slots than ``4 * concurrency`` for a second or
    two. The client does what a page does ("full, try again"): it waits
    and asks again, and the wait is counted. A slot that is never given
    back keeps the node full past FULL_WAIT: that fails.
    """
    source = getattr(_worker, "source", "127.0.0.1")
    started = time.monotonic()
    pause, refusals = 0.25, 0
    while True:
        status, page = _console_page(server, source)
        if not (status == 503 and FULL_TEXT in page):
            break
        refusals += 1
        if time.monotonic() - started > FULL_WAIT:
            raise Failed(f"the node stayed full for {FULL_WAIT:.0f} s")
        time.sleep(pause)
        pause = min(2.0, pause * 2)
    if refusals:
        FULL_WAITS.append((refusals, time.monotonic() - started))
    match = TOKEN.search(page)
    if status != 200 or not match:
        raise Failed(f"console page: HTTP {status} without a token")
    return match.group(1)


def _open(server: RunningServer, registry: set, token: str | None = None) -> SoakClient:
    try:
        client = _connect(server)
    except Exception as e:
        raise Failed(f"connect: {type(e).__name__}") from e
    registry.add(client)
    client.login(token)
    return client


def _ready(client: SoakClient, timing: list) -> None:
    started = time.monotonic()
    if not client.wait_for_prompt(1, timeout=30):
        error = client.last_message("e")
        raise Failed(f"refused: {error}" if error else
                     "connection closed before the prompt" if client.closed else
                     "no prompt within 30 s")
    timing.append(time.monotonic() - started)


def _run(client: SoakClient, line: str, prompt_after: int, timeout: float = 20.0) -> str:
    mark = client.mark
    client.type(line + "\r")
    if not client.wait_for_text(f"In [{prompt_after}]: ", since=mark, timeout=timeout):
        raise Failed(f"no prompt {prompt_after} after {line.split('(')[0]!r}"
                     + (" (closed)" if client.closed else ""))
    return client.output_since(mark)


def _forty_two(client: SoakClient, prompt_after: int) -> None:
    out = _run(client, "print(6*7)", prompt_after)
    if not re.search(r"(^|\n)42\r?\n", out):
        raise Failed("print(6*7) did not show 42")


def scenario_print(server, rng, registry, timing, tokens):
    token = _fetch_token(server)
    tokens[:] = [token]  # redeemed below: the replayed-token scenario reuses it
    client = _open(server, registry, token)
    _ready(client, timing)
    _forty_two(client, 2)
    client.close()


def scenario_loop(server, rng, registry, timing, tokens):
    client = _open(server, registry)
    _ready(client, timing)
    n = rng.randint(100, 500)
    out = _run(client, f"for i in range({n}): print('soak line', i)", 2, timeout=30)
    seen = re.findall(r"soak line (\d+)\r?\n", out)
    if seen != [str(i) for i in range(n)]:
        raise Failed("loop output lost or out of order")
    if rng.random() < 0.5:
        _forty_two(client, 3)
    client.close()


def scenario_ctrl_c(server, rng, registry, timing, tokens):
    client = _open(server, registry)
    _ready(client, timing)
    mark = client.mark
    line = rng.choice(["while True: pass", "while True: print('spin', end=' ')",
                       "while True: __import__('time').sleep(0.01)"])
    client.type(line + "\r")
    # Ctrl-C typed before IPython has put the terminal back in cooked mode is
    # read as a plain character, as on any terminal: wait until the line is
    # accepted (echoed with its newline) and a little more.
    if not client.wait_for_text(line + "\r\r\n", since=mark, timeout=15):
        raise Failed("Ctrl-C: the loop did not start")
    client.pump_for(rng.uniform(0.3, 1.0))
    client.type("\x03")
    if not client.wait_for_text("KeyboardInterrupt", since=mark, timeout=10):
        client.second_ctrl_c = True
        client.type("\x03")
        if not client.wait_for_text("KeyboardInterrupt", since=mark, timeout=10):
            raise Failed("Ctrl-C: no KeyboardInterrupt after two Ctrl-C")
    # Usually "In [2]:"; when the interrupt lands outside the cell, IPython
    # says "KeyboardInterrupt escaped interact()" and asks "In [1]:" again.
    if not client.wait_for(lambda c: PROMPT.search(c.output_since(mark)), timeout=15):
        raise Failed("Ctrl-C: no prompt after the interrupt")
    number = int(PROMPT.findall(client.output_since(mark))[-1])
    _forty_two(client, number + 1)
    client.close()


def scenario_exit(server, rng, registry, timing, tokens):
    client = _open(server, registry)
    _ready(client, timing)
    if rng.random() < 0.5:
        _forty_two(client, 2)
    client.type(rng.choice(["exit", "exit()", "quit"]) + "\r")
    if not client.wait_closed(timeout=15):
        raise Failed("exit: connection not closed")
    if client.last_message("x") != "The console has exited.":
        raise Failed(f"exit: ended with {client.messages[-1][:40]!r}")
    client.close()


def scenario_abrupt(server, rng, registry, timing, tokens):
    client = _open(server, registry)
    _ready(client, timing)
    mark = client.mark
    client.type("for i in range(10**7): print('flood', i)\r")
    if not client.wait_for_text("flood 1", since=mark, timeout=15):
        raise Failed("flood did not start")
    client.pump_for(rng.uniform(0.0, 1.0))
    client.abort() if rng.random() < 0.5 else client.close()


def scenario_close_starting(server, rng, registry, timing, tokens):
    client = _open(server, registry)
    client.pump_for(rng.uniform(0.0, 0.5))
    client.abort() if rng.random() < 0.5 else client.close()


def scenario_no_token(server, rng, registry, timing, tokens):
    try:
        client = _connect(server)
    except Exception as e:
        raise Failed(f"connect: {type(e).__name__}") from e
    registry.add(client)
    if not client.wait_closed(timeout=AUTH_TIMEOUT + 10):
        raise Failed("no token: not closed after the auth timeout")
    if "in time" not in (client.last_message("e") or ""):
        raise Failed(f"no token: {list(client.messages)[-1:]!r}")
    client.close()


def scenario_bad_token(server, rng, registry, timing, tokens):
    good = _fetch_token(server)
    token, reason = rng.choice([
        (good[:-4] + ("AAAA" if not good.endswith("AAAA") else "BBBB"), "invalid signature"),
        ("not-a-token", "malformed"),
    ])
    _expect_refused(server, registry, token, reason)


def scenario_replayed_token(server, rng, registry, timing, tokens):
    if not tokens:
        return scenario_print(server, rng, registry, timing, tokens)
    _expect_refused(server, registry, tokens[-1], "already used",
                    "console token expired")  # if older than console.token_ttl


def _expect_refused(server, registry, token, reason, other_reason="-"):
    client = _open(server, registry, token)
    if not client.wait_closed(timeout=10):
        raise Failed(f"{reason}: not closed")
    error = client.last_message("e") or ""
    if reason not in error and other_reason not in error:
        raise Failed(f"{reason}: got {list(client.messages)[-1:]!r}")
    client.close()


SCENARIOS = {
    "print": scenario_print,
    "loop": scenario_loop,
    "ctrl-c": scenario_ctrl_c,
    "exit": scenario_exit,
    "abrupt-mid-output": scenario_abrupt,
    "close-while-starting": scenario_close_starting,
    "no-token": scenario_no_token,
    "bad-token": scenario_bad_token,
    "replayed-token": scenario_replayed_token,
}


# ---- what the server holds ----

class Probe:
    """Readings of one server: its process, sandboxes, cgroups, mounts, log."""

    def __init__(self, server: RunningServer) -> None:
        from shellserver.sandbox.cgroups import parse_layout
        from shellserver.startup import instance_name

        self.server = server
        self.pid = server.process.pid
        with open("/proc/self/mountinfo") as f:
            mountinfo = f.read()
        with open(f"/proc/{self.pid}/cgroup") as f:
            own = f.read()
        layout = parse_layout(mountinfo, own).for_instance(instance_name(str(server.state_dir)))
        self.cgroup_parents = layout.parents()

    def status(self, key: str) -> int | None:
        try:
            return int(self._proc_status()[key].split()[0])
        except (OSError, KeyError, ValueError):
            return None

    def _proc_status(self) -> dict[str, str]:
        with open(f"/proc/{self.pid}/status") as f:
            return dict(line.split(":", 1) for line in f if ":" in line)

    def fds(self) -> int | None:
        try:
            return len(os.listdir(f"/proc/{self.pid}/fd"))
        except OSError:
            return None

    def processes(self) -> list[int]:
        return processes_of_uids(self.server.uid_min, self.server.uid_max)

    def uids(self) -> set[int]:
        found = set()
        for pid in self.processes():
            try:
                found.add(os.stat(f"/proc/{pid}").st_uid)
            except FileNotFoundError:
                pass
        return found

    def cgroups(self) -> list[str]:
        found = []
        for parent in self.cgroup_parents:
            try:
                found += [os.path.join(parent, d) for d in os.listdir(parent)
                          if os.path.isdir(os.path.join(parent, d))]
            except FileNotFoundError:
                pass
        return found

    def mounts(self) -> list[str]:
        with open("/proc/self/mountinfo") as f:
            return [line.split()[4] for line in f if str(self.server.state_dir) in line]

    def admitted(self) -> int | None:
        """Consoles holding an admission slot (GET /status), None if it fails."""
        try:
            return json.loads(self.server.get("/status").read())["active"]
        except Exception:
            return None

    def log_text(self) -> str:
        texts = []
        for path in sorted(glob.glob(str(self.server.log_path) + "*"),
                           key=lambda p: os.stat(p).st_mtime):
            try:
                with open(path, errors="replace") as f:
                    texts.append(f.read())
            except FileNotFoundError:
                pass
        return "".join(texts)

    def log_counts(self) -> dict:
        text = self.log_text()
        started = {m.group(1) for m in STARTED.finditer(text)}
        cleaned = {m.group(1) for m in CLEANED.finditer(text)}
        return {
            "started": len(started),
            "cleaned": len(cleaned),
            "sandboxes": len(started - cleaned),
            "uids_used": len({m.group(2) for m in STARTED.finditer(text)}),
            "handed_out": text.count(HANDED_OUT),
            "quarantined": text.count(QUARANTINED),
            "tracebacks": text.count(TRACEBACK),
        }

    def sample(self) -> dict:
        log = self.log_counts()
        return {
            "rss_kb": self.status("VmRSS"),
            "threads": self.status("Threads"),
            "fds": self.fds(),
            "processes": len(self.processes()),
            "cgroups": len(self.cgroups()),
            "mounts": len(self.mounts()),
            "admitted": self.admitted(),
            "sandboxes": log["sandboxes"],
            "started": log["started"],
        }


# ---- the run ----

class Soak:
    def __init__(self, server: RunningServer, probe: Probe, args) -> None:
        self.server = server
        self.args = args
        self.probe = probe
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.gate = threading.Event()  # cleared while the warm-up baseline is taken
        self.gate.set()
        self.issued = 0
        self.in_flight = 0
        self.results: collections.Counter = collections.Counter()  # (scenario, outcome)
        self.failures: collections.Counter = collections.Counter()  # reason
        self.notes: collections.Counter = collections.Counter()  # not failures
        self.examples: dict[str, str] = {}  # reason -> what the first such console saw
        self.timing: list[float] = []  # auth to first prompt, seconds
        self.registries: dict[int, set] = {}  # worker -> its console's clients
        self.samples: list[tuple[float, int, int, dict]] = []
        self.started_at = time.monotonic()

    @property
    def done(self) -> int:
        return sum(self.results.values())

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    def take(self) -> bool:
        while not self.stop.is_set():
            if not self.gate.wait(0.5):
                continue
            with self.lock:
                if self.issued >= self.args.consoles:
                    return False
                self.issued += 1
                self.in_flight += 1
                return True
        return False

    def worker(self, seed: int, source: str) -> None:
        _worker.source = source
        rng = random.Random(seed)
        names, weights = list(WEIGHTS), list(WEIGHTS.values())
        tokens: list[str] = []
        while self.take():
            scenario = rng.choices(names, weights)[0]
            registry: set = set()
            with self.lock:
                self.registries[seed] = registry
            outcome = "ok"
            try:
                SCENARIOS[scenario](self.server, rng, registry, self.timing, tokens)
            except Failed as e:
                outcome = e.reason
            except Exception as e:  # a client-side surprise is a failure too
                outcome = f"{type(e).__name__}: {str(e)[:60]}"
            if outcome != "ok":
                with self.lock:
                    if f"{scenario}: {outcome}" not in self.examples:
                        self.examples[f"{scenario}: {outcome}"] = " | ".join(
                            f"{list(c.messages)[-3:]!r} text[-400:]={c.text[-400:]!r}"
                            for c in registry)
            for client in list(registry):
                client.close()
                if client.second_ctrl_c:
                    with self.lock:
                        self.notes["Ctrl-C needed twice (first one not seen)"] += 1
            with self.lock:
                del self.registries[seed]
                self.in_flight -= 1
                self.results[(scenario, "ok" if outcome == "ok" else "failed")] += 1
                if outcome != "ok":
                    self.failures[f"{scenario}: {outcome}"] += 1

    def record(self, note: str = "") -> dict:
        s = self.probe.sample()
        elapsed = time.monotonic() - self.started_at
        self.samples.append((elapsed, self.done, self.failed, s))
        print(f"{elapsed:7.0f}s  done {self.done:5d}  failed {self.failed:3d}  "
              f"rss {s['rss_kb'] / 1024 if s['rss_kb'] else 0:7.1f} MB  fds {s['fds']}  "
              f"threads {s['threads']}  procs {s['processes']:3d}  cgroups {s['cgroups']:3d}  "
              f"mounts {s['mounts']}  admitted {s['admitted']}  sandboxes {s['sandboxes']}  "
              f"started {s['started']}  {note}", flush=True)
        return s

    def quiet(self, timeout: float = 90.0) -> tuple[dict, bool]:
        """Wait (bounded) until no console is admitted and only the warm pool's
        sandboxes exist, stable over two readings; return the reading."""
        deadline = time.monotonic() + timeout
        previous = None
        while True:
            s = self.probe.sample()
            settled = (s["admitted"] == 0 and s["sandboxes"] == POOL_SIZE
                       and s["cgroups"] == POOL_SIZE * len(self.probe.cgroup_parents))
            key = (s["processes"], s["cgroups"], s["fds"], s["sandboxes"])
            if settled and key == previous:
                return s, True
            if time.monotonic() > deadline:
                return s, False
            previous = key if settled else None
            time.sleep(1.0)

    def run(self) -> dict:
        args = self.args
        report: dict = {}
        report["initial"], _ = self.quiet(timeout=60)
        threads = [threading.Thread(target=self.worker, daemon=True,
                                    args=(args.seed + i, f"127.0.0.{10 + i}"))
                   for i in range(args.concurrency)]
        for t in threads:
            t.start()
        deadline = self.started_at + args.minutes * 60
        next_sample = time.monotonic()
        warmed = False
        while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
            if not warmed and self.done >= min(args.warmup, args.consoles):
                # Baseline: pause new consoles, let the running ones finish.
                self.gate.clear()
                self.record("warm-up done: pausing for the baseline")
                wait_until = time.monotonic() + 60
                while self.in_flight and time.monotonic() < wait_until:
                    time.sleep(0.2)
                report["warm"], settled = self.quiet()
                report["warm_settled"] = settled
                report["warm_done"] = self.done
                self.record("baseline taken" + ("" if settled else " (NOT settled)"))
                self.gate.set()
                warmed = True
            if time.monotonic() >= next_sample:
                self.record()
                next_sample += args.sample_every
            time.sleep(0.2)
        self.stop.set()
        report["hit_time_limit"] = time.monotonic() >= deadline
        # Hard stop: running consoles get a bounded time to finish, then are dropped.
        end = time.monotonic() + 45
        for t in threads:
            t.join(max(0.0, end - time.monotonic()))
        with self.lock:
            stragglers = [c for registry in self.registries.values() for c in list(registry)]
        for client in stragglers:
            client.abort()
        for t in threads:
            t.join(5)
        report["stuck_workers"] = sum(t.is_alive() for t in threads)
        report["elapsed"] = time.monotonic() - self.started_at
        self.record("all clients closed")
        report["end"], report["end_settled"] = self.quiet()
        self.record("end reading")
        report["log_running"] = self.probe.log_counts()
        return report


def leftovers_after_stop(probe: Probe, timeout: float = 30.0) -> dict:
    """Processes, uids, cgroups and mounts left once the server has stopped (bounded wait)."""
    deadline = time.monotonic() + timeout
    while True:
        left = {"processes": probe.processes(), "uids": sorted(probe.uids()),
                "cgroups": probe.cgroups(), "mounts": probe.mounts()}
        if not any(left.values()) or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def slope_kb_per_100(samples) -> float | None:
    """Least-squares RSS trend over consoles done, in KB per 100 consoles."""
    points = [(done, s["rss_kb"]) for _, done, _, s in samples if s["rss_kb"]]
    if len(points) < 3 or len({d for d, _ in points}) < 2:
        return None
    mean_x = statistics.fmean(d for d, _ in points)
    mean_y = statistics.fmean(r for _, r in points)
    sxx = sum((d - mean_x) ** 2 for d, _ in points)
    sxy = sum((d - mean_x) * (r - mean_y) for d, r in points)
    return 100 * sxy / sxx if sxx else None


def print_report(soak: Soak, report: dict, after: dict, final_log: dict, args) -> bool:
    mb = lambda kb: f"{kb / 1024:.1f} MB" if kb else "?"  # noqa: E731
    warm, end = report.get("warm"), report["end"]
    base = warm or report["initial"]
    samples_after_warm = [s for _, done, _, s in soak.samples
                          if done >= report.get("warm_done", 0) and s["rss_kb"]]
    rss_max = max((s["rss_kb"] for _, _, _, s in soak.samples if s["rss_kb"]), default=0)
    rss_growth = (end["rss_kb"] - base["rss_kb"]) if end["rss_kb"] and base["rss_kb"] else None
    scenario_rows = sorted({s for s, _ in soak.results})
    problems = []

    def row(name, value, ok=True, note=""):
        mark = "" if ok else "  <-- PROBLEM"
        print(f"| {name:<44} | {value!s:<28} |{(' ' + note) if note else ''}{mark}")
        if not ok:
            problems.append(name)

    print()
    print(f"Soak report: {args.consoles} consoles asked, {args.minutes} min budget, "
          f"concurrency {args.concurrency}, pool_size {POOL_SIZE}, "
          f"uids {soak.server.uid_min}-{soak.server.uid_max}, seed {args.seed}")
    print(f"| {'what':<44} | {'value':<28} |")
    print(f"|{'-' * 46}|{'-' * 30}|")
    row("elapsed", f"{report['elapsed']:.0f} s"
        + (" (time limit hit)" if report["hit_time_limit"] else ""))
    row("consoles opened", soak.done)
    row("consoles completed", soak.done - soak.failed)
    row("consoles failed", soak.failed, soak.failed <= args.max_failures)
    for scenario in scenario_rows:
        row(f"  {scenario} ok/failed",
            f"{soak.results[(scenario, 'ok')]}/{soak.results[(scenario, 'failed')]}")
    for note, count in soak.notes.items():
        row(f"  note: {note}", count)
    if FULL_WAITS:
        waits = sorted(seconds for _, seconds in FULL_WAITS)
        row("  note: consoles that waited for a slot (full)",
            f"{len(waits)}, {sum(n for n, _ in FULL_WAITS)} refusals",
            note=f"wait p50 {percentile(waits, 0.5):.1f} s, max {waits[-1]:.1f} s")
    row("sandboxes started (server log)", final_log["started"])
    row("  handed out from the warm pool", final_log["handed_out"])
    row("  distinct uids used", final_log["uids_used"])
    row("auth to prompt p50 / p95 / max",
        f"{percentile(soak.timing, 0.5) * 1000:.0f} / {percentile(soak.timing, 0.95) * 1000:.0f}"
        f" / {max(soak.timing, default=float('nan')) * 1000:.0f} ms")
    row("stuck client threads", report["stuck_workers"], report["stuck_workers"] == 0)
    row("settled at the end (pool only, none admitted)", report["end_settled"],
        report["end_settled"])
    row("admitted consoles at the end", end["admitted"], end["admitted"] == 0)
    row("sandboxes at the end (expect pool)", end["sandboxes"], end["sandboxes"] == POOL_SIZE)
    row("sandbox processes: warm / end", f"{base['processes']} / {end['processes']}",
        end["processes"] <= base["processes"])
    row("session cgroup dirs: warm / end", f"{base['cgroups']} / {end['cgroups']}",
        end["cgroups"] <= base["cgroups"])
    row("server fds: initial / warm / end",
        f"{report['initial']['fds']} / {base['fds']} / {end['fds']}",
        end["fds"] is not None and base["fds"] is not None and end["fds"] <= base["fds"])
    row("server threads: warm / end", f"{base['threads']} / {end['threads']}",
        end["threads"] is not None and end["threads"] <= base["threads"])
    row("server RSS initial", mb(report["initial"]["rss_kb"]))
    row(f"server RSS after warm-up ({report.get('warm_done', 0)} consoles)", mb(base["rss_kb"]))
    row("server RSS at the end", mb(end["rss_kb"]))
    row("server RSS max (samples)", mb(rss_max))
    if samples_after_warm:
        row("server RSS min-max after warm-up",
            f"{mb(min(s['rss_kb'] for s in samples_after_warm))} - "
            f"{mb(max(s['rss_kb'] for s in samples_after_warm))}")
    trend = slope_kb_per_100([x for x in soak.samples if x[1] >= report.get("warm_done", 0)])
    row("server RSS trend after warm-up",
        "n/a" if trend is None else f"{trend:+.0f} KB / 100 consoles")
    row(f"server RSS growth (end - warm, limit {args.rss_growth_mb} MB)",
        "?" if rss_growth is None else f"{rss_growth / 1024:+.1f} MB",
        rss_growth is not None and rss_growth <= args.rss_growth_mb * 1024)
    row("uids quarantined (server log)", final_log["quarantined"], final_log["quarantined"] == 0)
    row("sandboxes never cleaned up (server log)", final_log["sandboxes"],
        final_log["sandboxes"] == 0)
    row("tracebacks in the server log", final_log["tracebacks"], final_log["tracebacks"] == 0)
    # twistd re-raises the signal that stopped it: -SIGTERM is a clean stop.
    row("server exit status", after["exit"], after["exit"] in (0, -signal.SIGTERM))
    row("leaked processes (after stop)", len(after["processes"]), not after["processes"])
    row("leaked uids (after stop)", len(after["uids"]), not after["uids"])
    row("leaked cgroups (after stop)", len(after["cgroups"]), not after["cgroups"])
    row("leaked mounts (after stop)", len(after["mounts"]), not after["mounts"])
    if soak.failures:
        print("\nFailure reasons:")
        for reason, count in soak.failures.most_common():
            print(f"  {count:5d}  {reason}")
            print(f"         first seen: {soak.examples.get(reason, '')[:900]}")
    for key in ("processes", "uids", "cgroups", "mounts"):
        if after[key]:
            print(f"\nleft {key}: {after[key][:20]}")
    print("\nRESULT:", "PASS" if not problems else "FAIL (" + ", ".join(problems) + ")")
    return not problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--consoles", type=int, default=2000)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=50,
                        help="consoles before the RSS/fd baseline (default 50)")
    parser.add_argument("--sample-every", type=float, default=10.0)
    parser.add_argument("--rss-growth-mb", type=float, default=10.0)
    parser.add_argument("--max-failures", type=int, default=0)
    parser.add_argument("--uid-min", type=int, default=232000)
    parser.add_argument("--uid-max", type=int, default=232199)
    parser.add_argument("--seed", type=int, default=int(time.time()) % 100000)
    parser.add_argument("--keep", action="store_true", help="keep the temp dir and log")
    parser.add_argument("--commit", metavar="REV",
                        help="run the server of this commit (git archive into the temp "
                             "dir) instead of the working tree, which others may be editing")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("the soak starts real sandboxes: run it as root")
    if not (1 <= args.concurrency <= 40 and 1 <= args.consoles <= 100000
            and 0 < args.minutes <= 120):
        parser.error("--concurrency 1..40, --consoles 1..100000, --minutes up to 120")

    signal.signal(signal.SIGTERM, _interrupt)
    tmp = Path(tempfile.mkdtemp(prefix="shellserver-soak-"))
    print(f"soak: temp dir {tmp}, seed {args.seed}", flush=True)
    server = probe = None
    ok = False
    try:
        if args.commit:
            print(f"soak: server from commit {use_commit(args.commit, tmp / 'src')}", flush=True)
        server = start_server(
            tmp, uid_min=args.uid_min, uid_max=args.uid_max,
            config=f"pool_size = {POOL_SIZE}\n",
            # A dropped connection's console waits reattach_grace for its
            # page to come back, holding its slot: a short grace keeps that
            # path in the churn without the abrupt scenarios filling the
            # capacity for a minute each.
            console=f"auth_timeout = {AUTH_TIMEOUT}\nreattach_grace = {REATTACH_GRACE}\n",
            admission=(f"capacity = {4 * args.concurrency + POOL_SIZE + 8}\n"
                       "per_address = 1000\nper_address_per_minute = 1000000\n"
                       "pages_per_address_per_minute = 0\n"),
        )
        print(f"soak: server pid {server.process.pid} on port {server.port}", flush=True)
        probe = Probe(server)
        soak = Soak(server, probe, args)
        report = soak.run()
        server.stop()
        after = leftovers_after_stop(probe)
        after["exit"] = server.process.returncode
        final_log = probe.log_counts()
        ok = print_report(soak, report, after, final_log, args)
    except KeyboardInterrupt:
        print("\nsoak: interrupted", flush=True)
    finally:
        if server is not None:
            server.stop()
            left = leftovers_after_stop(probe, 20) if probe is not None else {}
            if any(left.values()):
                print(f"soak: left behind after stop: {left}", flush=True)
        if ok and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"soak: kept {tmp} (server log: {tmp / 'twistd.log'}*)", flush=True)
    return 0 if ok else 1


def use_commit(rev: str, dest: Path) -> str:
    """Export ``rev`` of this repository to ``dest`` and run the server from it.

    Both twistd (PYTHONPATH) and the probe in this process (sys.path) then
    import that ``shellserver``, not the working tree's. Returns the commit.
    """
    repo = str(TESTS.parent)
    sha = subprocess.run(["git", "-C", repo, "rev-parse", "--verify", rev + "^{commit}"],
                         check=True, capture_output=True, text=True).stdout.strip()
    archive = subprocess.run(["git", "-C", repo, "archive", "--format=tar", sha],
                             check=True, capture_output=True).stdout
    dest.mkdir()
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    # The browser files are installed by npm, not committed.
    modules = TESTS.parent / "web" / "node_modules"
    if modules.is_dir():
        (dest / "web" / "node_modules").symlink_to(modules)
    sys.path.insert(0, str(dest))
    os.environ["PYTHONPATH"] = str(dest)
    return sha


def _interrupt(signum, frame) -> None:
    """SIGTERM behaves like Ctrl-C: main's finally stops the server."""
    raise KeyboardInterrupt()


if __name__ == "__main__":
    sys.exit(main())
