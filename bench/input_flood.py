"""Another console's echo while one client floods input (issue 11), and print a table.

    .venv/bin/python bench/input_flood.py [--seconds 10] [--only websocket,xhr_send]

It starts three `twistd shellserver`s in turn (bench/server.py): the server
as it was before the input budget (the parent of the commit that added
shellserver/sockjs/budget.py, exported from git; --before names another),
this one with the budget switched off (rates of 10^9 a second: what the
fair hand-over alone does), and this one with the defaults. On each, one
console sits at its IPython prompt (the neighbour) and a client in another
process (bench/input_flooder.py) floods its own console with `ix` messages
as fast as it can for --seconds, over the raw websocket and then over
xhr_send. The neighbour types `x` and
backspace all along and times each echo: before the flood (the baseline),
during it, and in the 2 s after it. Needs root (real sandboxes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
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

BUDGET_OFF = {"input_messages_per_second": 10**9, "input_bytes_per_second": 10**9,
              "input_burst_messages": 10**9, "input_burst_bytes": 10**9}
TARGET_P99 = 0.050
AFTER_SECONDS = 2.0
MAX_SAMPLES = 20_000  # keystrokes timed per phase, whatever the time


def export_before(revision: str, into: Path) -> Path | None:
    """A copy of the repository at ``revision`` (git archive), or None."""
    root = os.path.dirname(HERE)
    if revision == "auto":
        added = subprocess.run(
            ["git", "-C", root, "log", "--format=%H", "--diff-filter=A", "-n1", "--",
             "shellserver/sockjs/budget.py"], capture_output=True, text=True)
        if added.returncode or not added.stdout.strip():
            return None
        revision = added.stdout.strip() + "^"
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", root, "archive", revision, "shellserver", "twisted"],
                             capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


async def echo_for(console: wire.Terminal, seconds: float | None,
                   stop: asyncio.Future | None = None) -> list[float]:
    """Time keystroke echoes for ``seconds``, or until ``stop`` is done (bounded)."""
    samples: list[float] = []
    deadline = wire.now() + (seconds if seconds is not None else 120)
    while wire.now() < deadline and len(samples) < MAX_SAMPLES:
        if stop is not None and stop.done():
            break
        for key in ("x", "\x7f"):
            expectation = console.expect(None)
            sent = wire.now()
            console.send_keys(key)
            try:
                samples.append(await expectation.wait(10.0) - sent)
            except TimeoutError:
                samples.append(math.inf)
            await asyncio.sleep(0.003)
    return samples


def stats(samples: list[float]) -> dict:
    if not samples:
        return {"p50": math.nan, "p99": math.nan, "max": math.nan, "n": 0}
    return {"p50": s.percentile(samples, 50), "p99": s.percentile(samples, 99),
            "max": max(samples), "n": len(samples)}


async def flood_phase(server: bench_server.BenchServer, neighbour: wire.Terminal,
                      transport: str, seconds: float) -> dict:
    process = await asyncio.create_subprocess_exec(
        sys.executable, os.path.join(HERE, "input_flooder.py"), "--port",
        str(server.tcp_port), "--transport", transport, "--seconds", str(seconds),
        stdout=asyncio.subprocess.PIPE)
    try:
        line = await asyncio.wait_for(process.stdout.readline(), 60)
        if line.strip() != b"flooding":
            raise RuntimeError(f"flooder did not start: {line!r}")
        cpu_before = server.cpu_seconds()
        result_line = asyncio.ensure_future(process.stdout.readline())
        during = await echo_for(neighbour, None, stop=result_line)
        flood = json.loads(await asyncio.wait_for(result_line, seconds + 60))
        server_cpu = server.cpu_seconds() - cpu_before
        after = await echo_for(neighbour, AFTER_SECONDS)
        await asyncio.wait_for(process.wait(), 30)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    return {"during": stats(during), "after": stats(after), "flood": flood,
            "server_cpu_share": server_cpu / flood["seconds"]}


async def measure(server: bench_server.BenchServer, transports: list[str],
                  seconds: float) -> dict:
    target = s.WireTarget(server, tls=False)
    neighbour = await target.console()
    results: dict = {}
    try:
        await neighbour.quiet(0.3)
        results["none"] = {"during": stats(await echo_for(neighbour, seconds))}
        for transport in transports:
            log(f"flooding over {transport} for {seconds} s")
            results[transport] = await flood_phase(server, neighbour, transport, seconds)
            await neighbour.quiet(0.3)
    finally:
        await target.finish([neighbour])
    return results


def ms(value: float) -> str:
    if math.isnan(value):
        return "—"
    return "never" if math.isinf(value) else f"{value * 1000:.1f}"


def render(all_results: dict[str, dict], transports: list[str]) -> str:
    header = ("flood", "input budget", "echo p50 ms", "echo p99 ms", "echo max ms",
              "p99 2 s after", "flood msgs/s in", "server CPU", "target", "result")
    rows = []
    for budget, results in all_results.items():
        none = results["none"]["during"]
        rows.append(("none (baseline)", budget, ms(none["p50"]), ms(none["p99"]),
                     ms(none["max"]), "—", "—", "—", "", ""))
        for transport in transports:
            r = results[transport]
            flood = r["flood"]
            rate = flood["messages"] / flood["seconds"]
            judged = budget == "on (defaults)"
            ok = r["during"]["p99"] < TARGET_P99
            rows.append((transport, budget, ms(r["during"]["p50"]), ms(r["during"]["p99"]),
                         ms(r["during"]["max"]), ms(r["after"]["p99"]), f"{rate:,.0f}",
                         f"{r['server_cpu_share'] * 100:.0f}%",
                         "p99 < 50 ms" if judged else "",
                         ("PASS" if ok else "FAIL") if judged else ""))
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths, strict=True)).rstrip()]
    lines.append("-" * len(lines[0]))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
              for row in rows]
    return "\n".join(lines)


async def main(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        print("the bench needs root (real sandboxes)", file=sys.stderr)
        return 2
    transports = args.only.split(",")
    tmp = Path(tempfile.mkdtemp(prefix="shellserver-input-flood-"))
    all_results: dict[str, dict] = {}
    problems: list[str] = []
    try:
        servers: list[tuple[str, dict, Path | None]] = []
        before = export_before(args.before, tmp / "before-source") if args.before else None
        if before is not None:
            servers.append(("before (no budget)", {}, before))
        else:
            log("no before row: git could not export the code before the budget")
        servers += [("off", BUDGET_OFF, None), ("on (defaults)", {}, None)]
        for index, (budget, console, source) in enumerate(servers):
            log(f"server with the input budget {budget}")
            server = bench_server.start(tmp / f"server{index}", console=console, source=source)
            try:
                all_results[budget] = await measure(server, transports, args.seconds)
                throttled = server.log().count("is over its input budget")
                all_results[budget]["throttle_logs"] = throttled
            finally:
                problems += server.stop()
                problems += bench_server.leftovers(server)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(render(all_results, transports))
    print()
    for budget, results in all_results.items():
        for transport in transports:
            flood = results[transport]["flood"]
            print(f"budget {budget}, {transport}: flooder {json.dumps(flood)}")
        print(f"budget {budget}: 'over its input budget' logged "
              f"{results['throttle_logs']} times")
    if problems:
        print("left behind: " + ", ".join(problems))
        return 1
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--only", default="websocket,xhr_send")
    parser.add_argument("--before", default="auto",
                        help="git revision of the 'before' row ('' for none; "
                             "auto: the parent of the commit that added the budget)")
    sys.exit(asyncio.run(main(parser.parse_args())))
