"""The measurements, written once against `wire.Terminal`.

A `Target` opens consoles: over the server's wire (tcp or tls) or, for the
baseline, on local PTYs. Each scenario takes a target and returns plain
numbers; run.py turns them into the table.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import wire
from server import RUNTIME, BenchServer

LINE = "x" * 1023 + "\n"  # what the console writes; the PTY turns \n into \r\n
LINE_ON_WIRE = "x" * 1023 + "\r\n"
BLOCK_LINES = 64
BEGIN, DONE = "BEGIN 42\r\n", "DONE 42\r\n"


def flood_command(blocks: int, seconds: float | None = None) -> str:
    """One IPython line writing ``blocks`` blocks of 64 KB lines between markers.

    With ``seconds`` it stops early at that deadline (a bounded endless flood).
    """
    deadline = " or time.time()>t" if seconds else ""
    return ("import sys,time; w=sys.stdout.write; s=('x'*1023+'\\n')*64; "
            f"t=time.time()+{seconds or 0}; print('BEGIN',6*7); "
            f"any(not w(s){deadline} for _ in range({blocks})); print('DONE',6*7)")


PRINT_FLOOD = ("import time; t=time.time()+60; "
               "any(print(1) or time.time()>t for _ in range(10**9))")


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def machine_cpu() -> tuple[int, int]:
    """(all, idle) clock ticks of the whole machine so far (/proc/stat)."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:]]
    return sum(ticks), ticks[3] + ticks[4]  # idle and iowait


def cpu_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- targets -------------------------------------------------------------------


async def opened(console: wire.Terminal) -> wire.Terminal:
    """``console`` at its first prompt (``open_seconds`` set), or closed and
    the error raised."""
    try:
        console.open_seconds = await console.open()
    except BaseException:
        console.close()
        raise
    return console


class Target:
    name = "?"
    server: BenchServer | None = None

    async def console(self, source: str | None = None) -> wire.Terminal:
        """A console at its first prompt; ``console.open_seconds`` says how long it took."""
        raise NotImplementedError

    def flooder_args(self) -> list[str]:
        raise NotImplementedError

    async def finish(self, consoles: list[wire.Terminal]) -> None:
        """Close consoles (at once) and wait, bounded, until they are gone."""
        for console in consoles:
            console.close()
        await self.settle()

    async def settle(self, timeout: float = 20.0) -> None:
        """Wait until no console of ours is running any more."""


class WireTarget(Target):
    # SockJS frames over the session websocket, as the page's sockjs-client
    # sends them, instead of the raw websocket
    framed = False

    def __init__(self, server: BenchServer, tls: bool) -> None:
        self.server = server
        self.tls = wire.client_ssl_context(server.cert) if tls else None
        self.port = server.tls_port if tls else server.tcp_port
        self.name = "tls" if tls else "tcp"

    async def console(self, source: str | None = None) -> wire.Terminal:
        return await opened(wire.WireConsole("127.0.0.1", self.port, tls=self.tls,
                                             source=source, name=f"{self.name} console",
                                             framed=self.framed))

    def flooder_args(self) -> list[str]:
        return ["--port", str(self.port)] + (["--cert", self.server.cert] if self.tls else [])

    async def settle(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while self.server.running_sandboxes() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)


class PtyTarget(Target):
    name = "pty"

    def __init__(self) -> None:
        self.home = tempfile.mkdtemp(prefix="shellserver-bench-home-")
        self.live: list[wire.PtyConsole] = []

    async def console(self, source: str | None = None) -> wire.Terminal:
        console = wire.PtyConsole(RUNTIME, self.home)
        self.live.append(console)
        console.open_seconds = await console.open()
        return console

    def flooder_args(self) -> list[str]:
        return ["--pty"]

    async def settle(self, timeout: float = 20.0) -> None:
        loop = asyncio.get_running_loop()
        for console in [c for c in self.live if c.master < 0]:
            await loop.run_in_executor(None, console.reap, timeout)
            self.live.remove(console)

    def cleanup(self) -> None:
        for console in self.live:
            console.close()
            console.reap(5)
        self.live.clear()
        shutil.rmtree(self.home, ignore_errors=True)



# A busy loop of ``duty`` of every ``period`` seconds, ending by itself.
_CPU_LOAD = """
import sys, time
duty, period = float(sys.argv[1]), float(sys.argv[2])
deadline = time.monotonic() + float(sys.argv[3])
while time.monotonic() < deadline:
    start = time.perf_counter()
    while time.perf_counter() - start < duty * period:
        pass
    time.sleep((1 - duty) * period)
"""


class LoadedPtyTarget(PtyTarget):
    """The PTY baseline with other work beside it: a process keeping ``load``
    of one CPU busy in bursts (as a server's event loop is), from the console
    opening until it is finished. It shows how much the PTY's own hand-off
    loses to any other work on the machine."""

    name = "pty+load"

    def __init__(self, load: float = 0.25, period: float = 0.006, seconds: float = 120) -> None:
        super().__init__()
        self.load, self.period, self.seconds = load, period, seconds
        self.burner: subprocess.Popen | None = None

    async def console(self, source: str | None = None) -> wire.Terminal:
        console = await super().console(source)
        self.burner = subprocess.Popen(
            [sys.executable, "-c", _CPU_LOAD, str(self.load), str(self.period),
             str(self.seconds)], stdin=subprocess.DEVNULL)
        return console

    async def finish(self, consoles: list[wire.Terminal]) -> None:
        self.stop_load()
        await super().finish(consoles)

    def stop_load(self) -> None:
        if self.burner is not None:
            self.burner.kill()
            self.burner.wait()
            self.burner = None

    def cleanup(self) -> None:
        self.stop_load()
        super().cleanup()

# -- the flood, verified byte for byte ----------------------------------------


class FloodVerifier:
    """Checks that the output is BEGIN, exactly the expected lines, then DONE."""

    def __init__(self, lines: int | None) -> None:
        self.expected = None if lines is None else lines * len(LINE_ON_WIRE)
        self.pattern = LINE_ON_WIRE * 128
        self.state = "before"
        self.head = ""
        self.body = 0
        self.tail = ""
        self.error: str | None = None
        self.began_at = self.done_at = 0.0
        self.done: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self.began: asyncio.Future[float] = asyncio.get_running_loop().create_future()

    def feed(self, text: str, at: float) -> None:
        if self.state == "before":
            # Search all of the new text (one message may hold BEGIN and
            # megabytes after it), keeping only enough for a straddling BEGIN.
            joined = self.head + text
            index = joined.find(BEGIN)
            if index < 0:
                self.head = joined[-len(BEGIN):]
                return
            self.state, self.began_at = "body", at
            self.began.set_result(at)
            text = joined[index + len(BEGIN):]
        if self.state == "body":
            text = self._body(text)
        if self.state == "after" and text:
            self.tail += text
            if len(self.tail) >= len(DONE) or not DONE.startswith(self.tail):
                if self.error is None:
                    self.error = self._body_error()
                if not self.tail.startswith(DONE) and self.error is None:
                    self.error = f"after {self.body} bytes: expected DONE, got {self.tail[:80]!r}"
                self.state, self.done_at = "finished", at
                self.done.set_result(at)

    def _body_error(self) -> str | None:
        """What is wrong with the body as a whole, once DONE has come (a subclass's)."""
        return None

    def _body(self, text: str) -> str:
        size = len(LINE_ON_WIRE)
        while text and self.state == "body":
            offset = self.body % size
            take = len(text) if self.expected is None else min(len(text),
                                                                self.expected - self.body)
            take = min(take, len(self.pattern) - size)
            piece = text[:take]
            if piece != self.pattern[offset:offset + take]:
                # the slow path, once: where does it differ, and is it the end?
                good = len(os.path.commonprefix([piece, self.pattern[offset:offset + take]]))
                self.body += good
                text = text[good:]
                self.state = "after"
                if self.expected is None and self.body % size == 0:
                    return text  # an open-ended flood ends with DONE
                if self.error is None:
                    self.error = f"byte {self.body}: got {text[:40]!r}"
                return text
            self.body += take
            text = text[take:]
            if self.expected is not None and self.body == self.expected:
                self.state = "after"
        return text


async def throughput(target: Target, megabytes: float) -> dict:
    """~``megabytes`` of output through one console: MB/s, server and client CPU per MB."""
    blocks = max(1, round(megabytes * 1e6 / (BLOCK_LINES * len(LINE_ON_WIRE))))
    console = await target.console()
    try:
        await console.quiet(0.2)
        verifier = FloodVerifier(blocks * BLOCK_LINES)
        console.sink = verifier.feed
        machine = []  # at BEGIN and at DONE
        for event in (verifier.began, verifier.done):
            event.add_done_callback(lambda _: machine.append(machine_cpu()))
        prompt = console.expect(wire.PROMPT)
        server_cpu = target.server.cpu_seconds() if target.server else 0.0
        client_cpu = cpu_self()
        console.send_keys(flood_command(blocks) + "\r")
        timeout = 30 + megabytes / 2  # bounded even at 2 MB/s
        await asyncio.wait_for(asyncio.shield(verifier.done), timeout)
        server_cpu = (target.server.cpu_seconds() - server_cpu) if target.server else None
        client_cpu = cpu_self() - client_cpu
        await console.wait_prompt(10, prompt)
    finally:
        console.sink = None
        await target.finish([console])
    mb = verifier.body / 1e6
    seconds = verifier.done_at - verifier.began_at
    (all_before, idle_before), (all_after, idle_after) = machine
    busy = 1 - (idle_after - idle_before) / max(1, all_after - all_before)
    return {
        # CPUs busy (of os.cpu_count()) during the flood, everything included:
        # the console, the server, the client, the kernel's tty work.
        "machine_busy": busy * os.cpu_count(),
        "machine_cpu_ms_per_mb": busy * os.cpu_count() * seconds * 1000 / mb,
        "bytes": verifier.body, "expected": verifier.expected, "error": verifier.error,
        "mb_per_s": mb / seconds, "seconds": seconds,
        "server_cpu_ms_per_mb": None if server_cpu is None else server_cpu * 1000 / mb,
        "client_cpu_ms_per_mb": client_cpu * 1000 / mb,
    }


# -- keystroke echo --------------------------------------------------------------


async def echo_samples(console: wire.Terminal, count: int, *, gap: float = 0.003,
                       stop: asyncio.Event | None = None,
                       timeout: float = 5.0) -> list[tuple[float, float]]:
    """Type a character and time its echo, delete it (also timed); ``count`` pairs.

    Returns (sent_at, seconds) for every keystroke.
    """
    samples = []
    for _ in range(count):
        for key in ("x", "\x7f"):
            expectation = console.expect(None)
            sent = wire.now()
            console.send_keys(key)
            arrived = await expectation.wait(timeout)
            samples.append((sent, arrived - sent))
            await asyncio.sleep(gap)
        if stop is not None and stop.is_set():
            break
    return samples


async def echo(target: Target, count: int) -> dict:
    console = await target.console()
    try:
        await console.quiet(0.2)
        samples = [s for _, s in await echo_samples(console, count)]
    finally:
        await target.finish([console])
    return {"p50": percentile(samples, 50), "p99": percentile(samples, 99),
            "max": max(samples), "n": len(samples)}


def summary(seconds: list[float]) -> dict:
    return {"p50": percentile(seconds, 50), "p95": percentile(seconds, 95),
            "n": len(seconds), "seconds": seconds}


async def auth_to_prompt(target: Target, count: int) -> dict:
    """Sequential consoles: token -> `a` -> first prompt (PTY: spawn -> prompt)."""
    seconds = []
    for _ in range(count):
        console = await target.console()
        seconds.append(console.open_seconds)
        await target.finish([console])
    return summary(seconds)


# -- flooding neighbours ---------------------------------------------------------


class Flooder:
    """flooder.py in its own process: its console floods, it reads everything."""

    def __init__(self, target: Target, seconds: float) -> None:
        self.target, self.seconds = target, seconds
        self.process: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> Flooder:
        here = os.path.dirname(os.path.abspath(__file__))
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, os.path.join(here, "flooder.py"), *self.target.flooder_args(),
            "--seconds", str(self.seconds),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        line = await asyncio.wait_for(self.process.stdout.readline(), 60)
        if line.strip() != b"flooding":
            raise RuntimeError(f"flooder did not start: {line!r}")
        return self

    async def stop(self) -> dict:
        if self.process.returncode is None:
            self.process.stdin.write(b"stop\n")
            await self.process.stdin.drain()
        line = await asyncio.wait_for(self.process.stdout.readline(), 30)
        await asyncio.wait_for(self.process.wait(), 30)
        return json.loads(line) if line else {}

    async def __aexit__(self, *exc) -> None:
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()


async def neighbour_echo_during_flood(target: Target, count: int) -> dict:
    """Echo of one console while another console floods (read by another process)."""
    console = await target.console()
    try:
        await console.quiet(0.2)
        async with Flooder(target, seconds=60) as flooder:
            await asyncio.sleep(0.5)
            samples = [s for _, s in await echo_samples(console, count)]
            flood = await flooder.stop()
    finally:
        await target.finish([console])
    return {"p50": percentile(samples, 50), "p99": percentile(samples, 99),
            "max": max(samples), "n": len(samples), "flood_mb_per_s": flood.get("mb_per_s")}


async def ctrl_c_during_flood(target: Target, count: int) -> dict:
    """`print(1)` flood; after 1 s Ctrl-C; time until the next prompt (reading on)."""
    seconds = []
    repeats = 0
    console = await target.console()
    try:
        for _ in range(count):
            await console.quiet(0.2)
            flowing = console.expect("1\r\n1\r\n1\r\n")
            console.send_keys(PRINT_FLOOD + "\r")
            await flowing.wait(10)
            await asyncio.sleep(1.0)
            prompt = console.expect(wire.PROMPT)
            sent = wire.now()
            console.send_keys("\x03")
            for attempt in range(3):
                try:
                    seconds.append(await console.wait_prompt(10, prompt) - sent)
                    break
                except TimeoutError:
                    # A Ctrl-C can be lost to a terminal switching modes (on the
                    # PTY baseline too): press it again; the time still counts
                    # from the first press. Three lost presses count as never.
                    if attempt == 2:
                        seconds.append(float("inf"))
                        break
                    repeats += 1
                    console.send_keys("\x03")
            if seconds[-1] == float("inf"):
                break  # the flood is still running: this console is done
    finally:
        await target.finish([console])
    return {"p50": percentile(seconds, 50), "max": max(seconds), "n": len(seconds),
            "repeats": repeats}


async def five_close(target: Target) -> dict:
    """Worst echo of a console while five others close at the same moment."""
    others = [await target.console() for _ in range(5)]
    console = await target.console()
    try:
        await console.quiet(0.3)
        stop = asyncio.Event()
        sampler = asyncio.create_task(echo_samples(console, 100_000, gap=0.001, stop=stop))
        await asyncio.sleep(1.0)
        closed_at = wire.now()
        for other in others:
            other.close()
        await asyncio.sleep(3.0)
        stop.set()
        samples = await asyncio.wait_for(sampler, 10)
        window = [s for sent, s in samples if sent >= closed_at - 0.05]
        before = [s for sent, s in samples if sent < closed_at - 0.05]
    finally:
        await target.finish([console] + others)
    return {"max": max(window), "p50": percentile(window, 50), "n": len(window),
            "before_max": max(before) if before else math.nan}


# -- server memory ---------------------------------------------------------------


def mib(value: float) -> float:
    return value / (1024 * 1024)


async def stalled_reader(target: WireTarget, stall: float) -> dict:
    """Server RSS before, during (every 0.5 s) and after a flood nobody reads."""
    server = target.server
    console = await target.console()
    try:
        await console.quiet(0.3)
        await asyncio.sleep(0.5)
        before = server.rss_bytes()
        began = console.expect(BEGIN)
        console.send_keys(flood_command(10**6, seconds=stall + 30) + "\r")
        await began.wait(10)
        await asyncio.sleep(0.2)
        console.pause_reading()
        during = []
        deadline = wire.now() + stall
        while wire.now() < deadline:
            await asyncio.sleep(0.5)
            during.append(server.rss_bytes())
        received_mb = console.chars / 1e6
    finally:
        await target.finish([console])
    await asyncio.sleep(2.0)
    after = server.rss_bytes()
    return {"before": before, "peak": max(during), "after": after,
            "growth": max(during) - before, "left": after - before,
            "samples": during, "received_mb": received_mb}


def memory_fits(count: int, per_sandbox_mb: float = 60) -> int:
    """How many idle sandboxes fit in the available memory (keeping 2 GB spare)."""
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) for line in f}
    available_mb = info["MemAvailable"] / 1024 - 2048
    return max(1, min(count, int(available_mb / per_sandbox_mb)))


async def idle_consoles(target: WireTarget, counts: list[int], echo_count: int,
                        progress: Callable[[str], None] = lambda s: None) -> dict:
    """Server RSS with 0 and then more idle consoles; echo on one among the most."""
    server = target.server
    await target.settle()
    await asyncio.sleep(1.0)
    result: dict = {"rss": {0: server.rss_bytes()}, "limit": None}
    consoles: list[wire.Terminal] = []
    # The SockJS layer limits sessions per client address: spread the
    # consoles over loopback addresses, 40 each, as many visitors would be.
    semaphore = asyncio.Semaphore(4)

    async def open_one(index: int) -> wire.Terminal:
        async with semaphore:
            return await target.console(source=f"127.0.0.{2 + index // 40}")

    try:
        for count in counts:
            wanted = memory_fits(count)
            if wanted < count:
                result["limit"] = f"memory: {wanted} of {count} consoles fit"
            started = time.monotonic()
            tasks = [asyncio.create_task(open_one(i)) for i in range(len(consoles), wanted)]
            done = await asyncio.gather(*tasks, return_exceptions=True)
            failures = [d for d in done if isinstance(d, BaseException)]
            consoles += [d for d in done if not isinstance(d, BaseException)]
            if failures:
                result["limit"] = f"{len(failures)} of {wanted} failed to open: {failures[0]!r}"
            progress(f"{len(consoles)} idle consoles open ({time.monotonic() - started:.0f} s)")
            await asyncio.sleep(2.0)
            result["rss"][len(consoles)] = server.rss_bytes()
            if failures:
                break
        result["opened"] = len(consoles)
        samples = [s for _, s in await echo_samples(consoles[len(consoles) // 2], echo_count)]
        result["echo_p99"] = percentile(samples, 99)
        result["echo_p50"] = percentile(samples, 50)
    finally:
        await target.finish(consoles)
    await asyncio.sleep(2.0)
    result["rss_after"] = server.rss_bytes()
    return result


async def warm_auth_to_prompt(server: BenchServer, tls: bool, pool: int, count: int) -> dict:
    """auth-to-prompt with a pool of pre-started sandboxes (waiting for refills)."""
    target = WireTarget(server, tls=tls)
    deadline = time.monotonic() + 60
    while server.running_sandboxes() < pool and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    seconds = []
    for _ in range(count):
        await asyncio.sleep(1.5)  # refill
        console = await target.console()
        seconds.append(console.open_seconds)
        console.close()
    await asyncio.sleep(0.5)
    return {"p50": percentile(seconds, 50), "p95": percentile(seconds, 95), "n": count}


