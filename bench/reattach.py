"""Reattach (issue 15): time from reconnect to output resumed, and memory while
consoles are detached, and print a table.

    .venv/bin/python bench/reattach.py [--rounds 20] [--consoles 100]

Starts `twistd shellserver` (bench/server.py: uids 240000-240499, TLS on
127.0.0.1) with `console.reattach_grace = 600`. Then:

- **Reconnect to output resumed**: one console floods its terminal
  (`print('x' * 70)` in a loop, bounded at 300 s in the program); the client
  (bench/wire.py's, acknowledging as the page does) drops its connection at
  once (no close frame), waits until the server's log says the console is
  detached, and reattaches on a new TLS connection with `A SECRET,COUNT`.
  Timed from the start of the new TCP connect to `sresumed` and to the first
  output; `--rounds` times; median and p95.
- **Memory**: `--consoles` consoles at their prompt (4 opened at a time,
  spread over loopback addresses); then each starts the same flood and its
  connection is dropped at once: detached, the server reads each console's
  output up to `output_high_water` and pauses the program; then all
  reattach. In each state, once the server's RSS has been steady for 2 s:
  twistd's RSS and the sum of the sessions' memory cgroups
  (`memory.usage_in_bytes`). Needs root (real sandboxes).
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import os
import re
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

import server as bench_server  # noqa: E402
import wire  # noqa: E402

FLOOD = ("e = __import__('time').time() + 300; "
         "any(print('x' * 70) for _ in iter(lambda: __import__('time').time() < e, False))")
DEADLINE = 600.0  # the whole bench, whatever happens
PER_ADDRESS = 20  # consoles per loopback source address (SockJS's per-address limit is 50)


class ReattachingConsole(wire.WireConsole):
    """A WireConsole that keeps the reattach secret (``t``), as the page does."""

    secret: str | None = None
    resumed_at = 0.0

    def _message(self, message: str) -> None:
        if message.startswith("t"):
            self.secret = message[1:].split(",", 1)[1]
        elif message == "sresumed":
            self.resumed_at = wire.now()
        super()._message(message)

    async def resume(self, secret: str, count: int) -> tuple[float, float]:
        """Connect and reattach; seconds from the connect to ``sresumed`` and
        to the first output."""
        self.written_units = self.acked_units = count
        start = wire.now()
        first_output = self.expect(None)
        await self.connect()
        self.send(f"A{secret},{count}")
        output_at = await first_output.wait(30)
        if "resumed" not in self.states:
            raise RuntimeError(f"reattach refused: {self.ends}")
        return self.resumed_at - start, output_at - start


def log_text(server) -> str:
    return "".join(Path(p).read_text(errors="replace")
                   for p in glob.glob(str(server.log_path) + "*"))


def detached_count(server) -> int:
    return log_text(server).count("detached: it waits")


async def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.05)


def cgroup_memory(server) -> int:
    """Bytes charged to the sessions' memory cgroups (cgroup v1's memory
    controller), found under the bench server's private cgroup."""
    sessions = set(re.findall(r"console (s[0-9a-f]+) started", log_text(server)))
    total = 0
    for top in server.cgroups:
        for directory, children, _ in os.walk(top):
            for child in sessions.intersection(children):
                usage = os.path.join(directory, child, "memory.usage_in_bytes")
                if os.path.exists(usage):
                    with open(usage) as f:
                        total += int(f.read())
    return total


async def steady_rss(server, seconds: float = 2.0, timeout: float = 30.0) -> int:
    """twistd's RSS once it changed by under 256 KB over ``seconds``."""
    deadline = time.monotonic() + timeout
    last = server.rss_bytes()
    while True:
        await asyncio.sleep(seconds)
        rss = server.rss_bytes()
        if abs(rss - last) < 256 * 1024 or time.monotonic() > deadline:
            return rss
        last = rss


def new_console(server, tls, index: int) -> ReattachingConsole:
    console = ReattachingConsole("127.0.0.1", server.tls_port, tls=tls,
                                 source=f"127.0.0.{2 + index // PER_ADDRESS}",
                                 name=f"console{index}")
    return console


async def reattach(server, tls, old: ReattachingConsole, index: int) -> tuple[
        ReattachingConsole, float, float]:
    fresh = new_console(server, tls, index)
    resumed, output = await fresh.resume(old.secret, old.written_units)
    return fresh, resumed, output


async def latency(server, tls, rounds: int) -> tuple[list[float], list[float]]:
    console = new_console(server, tls, 0)
    await console.open()
    console.send_keys(FLOOD + "\r")
    await console.expect("x" * 70).wait(30)
    to_resumed, to_output = [], []
    for _ in range(rounds):
        await console.expect(None).wait(10)  # output flows, and the secret is in
        assert console.secret is not None
        before = detached_count(server)
        console.close()
        await wait_for(lambda before=before: detached_count(server) > before, 30,
                       "no detach in the log")
        console, resumed, output = await reattach(server, tls, console, 0)
        to_resumed.append(resumed)
        to_output.append(output)
    console.send_keys("\x03")
    await console.wait_prompt(30)
    console.send("q")
    await asyncio.wait_for(console.closed, 30)
    return to_resumed, to_output


async def memory(server, tls, count: int) -> list[tuple[str, int, int]]:
    rows = []
    base_rss = await steady_rss(server)
    rows.append(("no console", base_rss, cgroup_memory(server)))
    consoles: list[ReattachingConsole] = [None] * count  # type: ignore[list-item]
    gate = asyncio.Semaphore(4)

    async def open_one(index: int) -> None:
        async with gate:
            consoles[index] = new_console(server, tls, index)
            await consoles[index].open(timeout=120)

    await asyncio.gather(*(open_one(i) for i in range(count)))
    rows.append((f"{count} attached, at the prompt", await steady_rss(server),
                 cgroup_memory(server)))
    before = detached_count(server)
    for console in consoles:
        flooding = console.expect("x" * 70)
        console.send_keys(FLOOD + "\r")
        await flooding.wait(30)  # the keystrokes have arrived: drop the connection
        console.close()
    await wait_for(lambda: detached_count(server) >= before + count, 120,
                   "not every console detached")
    rows.append((f"{count} detached, flooding (paused at high water)",
                 await steady_rss(server), cgroup_memory(server)))

    async def reattach_one(index: int) -> None:
        async with gate:
            consoles[index], _, _ = await reattach(server, tls, consoles[index], index)

    await asyncio.gather(*(reattach_one(i) for i in range(count)))
    for console in consoles:
        console.send_keys("\x03")
    rows.append((f"{count} reattached (after Ctrl-C)", await steady_rss(server),
                 cgroup_memory(server)))
    for console in consoles:
        console.send("q")
    await asyncio.gather(*(asyncio.wait_for(c.closed, 60) for c in consoles),
                         return_exceptions=True)
    return rows


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


async def main(args) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-reattach-"))
    server = bench_server.start(tmp, console={"reattach_grace": 600})
    tls = ssl.create_default_context(cafile=server.cert)
    try:
        to_resumed, to_output = await asyncio.wait_for(latency(server, tls, args.rounds),
                                                       DEADLINE / 2)
        rows = await asyncio.wait_for(memory(server, tls, args.consoles), DEADLINE / 2)
    finally:
        problems = server.stop() + bench_server.leftovers(server)
    ms = 1000
    print(f"reconnect (TLS) to sresumed, {args.rounds} rounds: "
          f"p50 {statistics.median(to_resumed) * ms:.1f} ms, "
          f"p95 {percentile(to_resumed, 0.95) * ms:.1f} ms")
    print(f"reconnect (TLS) to first output:        "
          f"p50 {statistics.median(to_output) * ms:.1f} ms, "
          f"p95 {percentile(to_output, 0.95) * ms:.1f} ms")
    print()
    print(f"{'state':<48} {'twistd RSS MB':>14} {'sandbox cgroups MB':>19}")
    for name, rss, cgroups in rows:
        print(f"{name:<48} {rss / 2**20:>14.1f} {cgroups / 2**20:>19.1f}")
    base = rows[1]
    detached = rows[2]
    print(f"\ndetached vs attached, per console: twistd "
          f"{(detached[1] - base[1]) / args.consoles / 1024:+.0f} KB, sandboxes "
          f"{(detached[2] - base[2]) / args.consoles / 1024:+.0f} KB")
    if problems:
        print("left behind:", problems)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--consoles", type=int, default=100)
    asyncio.run(main(parser.parse_args()))
