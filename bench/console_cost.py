"""What one console costs: memory, time to prompt, and what many idle ones do.

Runs a real server (bench/server.py) once per sandbox path, classic launcher
and fork server (``sandbox.fork_server``) in the same run when the checkout
has the switch, and prints one table:

- PSS per idle console: the proportional set size (``/proc/PID/smaps_rollup``,
  as smem counts it) of every process below the server (launchers, the fork
  server's template, init, IPython) plus the server's own, at 0 consoles and
  at N; per console = (total at N - total at 0) / N, and all counted =
  total at N / N (the template and the server's fixed part included);
- consoles per GiB from the per-console PSS;
- time to prompt, cold (no pool) and pooled (``sandbox.pool_size`` 2, the
  pool refilled between consoles);
- the time for a burst of 100 consoles started at once to all show a prompt;
- another console's echo p99 with N idle consoles open;
- the server's RSS growth from 0 to N consoles.

As root, holding the shared real-tests lock::

    flock /tmp/ss-realtests.lock .venv/bin/python bench/console_cost.py -n 200

Every count and wait is bounded; at the end each server is stopped and the
bench checks that nothing of its consoles is left.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import scenarios  # noqa: E402
import server  # noqa: E402
import wire  # noqa: E402

MIB = 1024 * 1024
UID_MIN, UID_MAX = 256500, 257599  # this bench's own (1000 consoles need 1000 uids)
PER_ADDRESS = 40  # consoles per loopback source address (SockJS per-address limit)
OPEN_AT_ONCE = 8
PER_CONSOLE_MB = 40  # what the memory guard assumes a console may take
NO_GRACE = {"reattach_grace": 0}
# Opening the idle consoles stops after this long (the whole bench must hold
# the shared lock a bounded time).
OPENING_SECONDS = 240
RESERVE_MB = 3072  # never open consoles into the machine's last 3 GB


def memory_fits(count: int, per_console_mb: float) -> int:
    """How many more consoles fit in the available memory, RESERVE_MB kept spare."""
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) for line in f}
    spare_mb = info["MemAvailable"] / 1024 - RESERVE_MB
    return max(0, min(count, int(spare_mb / per_console_mb)))


def rollup(pid: int, field: str = "Pss") -> int:
    """One field of a process's smaps_rollup in bytes (0 if it has gone)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def pss_bytes(pid: int) -> int:
    """Proportional set size of one process (0 if it has gone)."""
    return rollup(pid, "Pss")


# Each process's role by its depth below the server, per path: what the
# private dirty row splits a console's pages by.
ROLES = {"classic": ("launcher", "init", "console"),
         "fork": ("template", "launcher", "init", "console")}


def private_dirty_by_role(root: int, roles: tuple[str, ...]) -> dict[str, int]:
    """Private dirty bytes of the processes below ``root``, summed per role."""
    children = children_map()
    found: dict[str, int] = {}
    level = [root]
    for role in roles:
        level = [child for parent in level for child in children.get(parent, ())]
        found[role] = sum(rollup(pid, "Private_Dirty") for pid in level)
    return found


def children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        children.setdefault(parent, []).append(int(name))
    return children


def descendants(root: int) -> list[int]:
    """Every process below ``root`` (from /proc/*/stat's parent field)."""
    children = children_map()
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), ()):
            found.append(child)
            todo.append(child)
    return found


def memory_of(bench: server.BenchServer, name: str) -> dict:
    """PSS of the server and of everything below it; the server's RSS; the
    private dirty pages of the processes below it by role."""
    below = descendants(bench.pid)
    return {"server_pss": pss_bytes(bench.pid),
            "below_pss": sum(pss_bytes(pid) for pid in below),
            "processes": len(below), "server_rss": bench.rss_bytes(),
            "dirty": private_dirty_by_role(bench.pid, ROLES[name])}


def loopback(index: int) -> str:
    return f"127.0.{2 + index // (PER_ADDRESS * 250)}.{2 + (index // PER_ADDRESS) % 250}"


async def open_consoles(target: scenarios.WireTarget, first: int, count: int,
                        at_once: int) -> tuple[list[wire.Terminal], list[BaseException]]:
    semaphore = asyncio.Semaphore(at_once)

    async def open_one(index: int) -> wire.Terminal:
        async with semaphore:
            return await asyncio.wait_for(target.console(source=loopback(index)), 120)

    done = await asyncio.gather(*(open_one(i) for i in range(first, first + count)),
                                return_exceptions=True)
    return ([d for d in done if not isinstance(d, BaseException)],
            [d for d in done if isinstance(d, BaseException)])


async def measure_path(tmp: Path, name: str, sandbox: dict, count: int, burst: int,
                       cold: int, pooled: int, progress, assume_mb: float) -> dict:
    result: dict = {"name": name}
    # A closed console ends at once (no reattach grace): the bench's "0
    # consoles" must have none left running.
    bench = server.start(tmp / f"{name}-cold", pool=0, sandbox=sandbox, console=NO_GRACE)
    consoles: list[wire.Terminal] = []
    try:
        result["notes"] = bench.notes
        deadline = time.monotonic() + 30
        while sandbox.get("fork_server") and "template ready" not in bench.log():
            if time.monotonic() > deadline:
                raise RuntimeError("the fork server's template was not ready within 30 s")
            await asyncio.sleep(0.1)
        target = scenarios.WireTarget(bench, tls=False)
        seconds = []
        for _ in range(cold):
            console = await target.console()
            seconds.append(console.open_seconds)
            await target.finish([console])
        result["cold"] = scenarios.summary(seconds)
        progress(f"{name}: cold p50 {result['cold']['p50'] * 1000:.0f} ms")
        await target.settle()
        await asyncio.sleep(2.0)
        result["at0"] = memory_of(bench, name)

        started = time.monotonic()
        opening_deadline = started + OPENING_SECONDS
        opened, failures = await open_consoles(target, 0, min(burst, count), burst)
        result["burst"] = {"n": len(opened), "seconds": time.monotonic() - started,
                           "failed": len(failures)}
        consoles += opened
        progress(f"{name}: burst of {burst}: {result['burst']['seconds']:.1f} s")
        while len(consoles) < count and not failures:
            # Never past what the machine's free memory holds (3 GB kept
            # spare): other work shares it, and a host out of memory
            # measures nothing.
            wanted = memory_fits(min(count - len(consoles), 100), assume_mb)
            if wanted < min(count - len(consoles), 100):
                result["limit"] = (f"memory: stopped at {len(consoles) + wanted} consoles, "
                                   f"the machine's available memory less 3 GB")
                if wanted < 1:
                    break
            if time.monotonic() > opening_deadline:
                result["limit"] = (f"time: stopped at {len(consoles)} consoles after "
                                   f"{OPENING_SECONDS} s of opening")
                break
            opened, failures = await open_consoles(target, len(consoles), wanted, OPEN_AT_ONCE)
            consoles += opened
            progress(f"{name}: {len(consoles)} idle consoles")
            if result.get("limit", "").startswith("memory"):
                break
        if failures:
            result["limit"] = f"{len(failures)} failed to open: {failures[0]!r}"
        await asyncio.sleep(3.0)
        result["atN"] = memory_of(bench, name)
        result["opened"] = len(consoles)
        samples = [s for _, s in await scenarios.echo_samples(consoles[len(consoles) // 2], 200)]
        result["echo"] = {"p50": scenarios.percentile(samples, 50),
                          "p99": scenarios.percentile(samples, 99)}
        progress(f"{name}: echo p99 {result['echo']['p99'] * 1000:.1f} ms")
    finally:
        await target.finish(consoles)
        result["left"] = server.leftovers(bench) if not bench.stop() else ["cgroups"]
    bench = server.start(tmp / f"{name}-pool", pool=2, sandbox=sandbox, console=NO_GRACE)
    try:
        while sandbox.get("fork_server") and "template ready" not in bench.log():
            await asyncio.sleep(0.1)
        warm = await scenarios.warm_auth_to_prompt(bench, False, 2, pooled)
        result["pooled"] = warm
    finally:
        bench.stop()
    return result


def table(results: list[dict], count: int) -> str:
    rows = [("row", *[r["name"] for r in results])]

    def row(label, value):
        rows.append((label, *[value(r) for r in results]))

    def per_console(r):
        n = max(1, r["opened"])
        at0 = r["at0"]["server_pss"] + r["at0"]["below_pss"]
        atn = r["atN"]["server_pss"] + r["atN"]["below_pss"]
        return (atn - at0) / n, atn / n

    row("consoles open (N)", lambda r: str(r["opened"]))
    row("PSS per idle console, (N - 0) / N", lambda r: f"{per_console(r)[0] / MIB:.1f} MB")
    row("PSS per console, all counted (total / N)",
        lambda r: f"{per_console(r)[1] / MIB:.1f} MB")
    row("PSS below the server at 0 (template etc.)",
        lambda r: f"{r['at0']['below_pss'] / MIB:.1f} MB")
    def dirty(r, role):
        n = max(1, r["opened"])
        return (r["atN"]["dirty"].get(role, 0) - r["at0"]["dirty"].get(role, 0)) / n / MIB

    row("private dirty per console: launcher / init / console",
        lambda r: " / ".join(f"{dirty(r, role):.1f}" for role in ("launcher", "init", "console"))
        + " MB")
    row("processes per console",
        lambda r: f"{(r['atN']['processes'] - r['at0']['processes']) / max(1, r['opened']):.1f}")
    row("consoles per GiB (per-console PSS)",
        lambda r: f"{1024 * MIB / max(1, per_console(r)[0]):.0f}")
    row("time to prompt, cold p50/p95",
        lambda r: f"{r['cold']['p50'] * 1000:.0f} / {r['cold']['p95'] * 1000:.0f} ms")
    row("time to prompt, pooled p50/p95",
        lambda r: f"{r['pooled']['p50'] * 1000:.0f} / {r['pooled']['p95'] * 1000:.0f} ms")
    row("burst: consoles at once -> all at prompt",
        lambda r: f"{r['burst']['n']} in {r['burst']['seconds']:.1f} s")
    row("echo p50/p99 of one console among N",
        lambda r: f"{r['echo']['p50'] * 1000:.1f} / {r['echo']['p99'] * 1000:.1f} ms")
    row("server RSS growth 0 -> N",
        lambda r: f"{(r['atN']['server_rss'] - r['at0']['server_rss']) / MIB:.1f} MB")
    row("left behind", lambda r: ", ".join(r["left"]) or "nothing")
    widths = [max(len(str(line[i])) for line in rows) for i in range(len(rows[0]))]
    lines = rows[:1] + [tuple("-" * w for w in widths)] + rows[1:]
    text = "\n".join("| " + " | ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True))
                     + " |" for line in lines)
    for r in results:
        if r.get("limit"):
            text += f"\n{r['name']}: {r['limit']}"
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--consoles", type=int, default=200,
                        help="idle consoles to open (default 200; 1000 for the full run)")
    parser.add_argument("--burst", type=int, default=100)
    parser.add_argument("--cold", type=int, default=10, help="cold starts timed")
    parser.add_argument("--pooled", type=int, default=6, help="pooled starts timed")
    parser.add_argument("--assume-mb", type=float, default=PER_CONSOLE_MB,
                        help="what the memory guard assumes each console takes (default "
                             f"{PER_CONSOLE_MB}; the fork path's measured cost with a margin "
                             "for the 1000-console run)")
    parser.add_argument("--paths", default="classic,fork",
                        help="sandbox paths to measure: classic, fork, or both")
    args = parser.parse_args()
    if not 1 <= args.consoles <= UID_MAX - UID_MIN + 1 - 4:
        parser.error(f"--consoles must be 1 to {UID_MAX - UID_MIN - 3}")
    server.UID_MIN, server.UID_MAX = UID_MIN, UID_MAX
    known = server.example_keys().get("sandbox", {})
    paths = []
    for name in args.paths.split(","):
        if name == "classic":
            paths.append((name, {"fork_server": False} if "fork_server" in known else {}))
        elif name == "fork":
            if "fork_server" not in known:
                print("this checkout has no sandbox.fork_server: fork path skipped")
                continue
            paths.append((name, {"fork_server": True}))
        else:
            parser.error(f"unknown path {name!r}: classic or fork")

    def progress(text: str) -> None:
        print(f"  [{time.strftime('%H:%M:%S')}] {text}", flush=True)

    results = []
    with tempfile.TemporaryDirectory(prefix="shellserver-cost-") as tmp:
        for name, sandbox in paths:
            results.append(asyncio.run(measure_path(
                Path(tmp), name, sandbox, args.consoles, min(args.burst, args.consoles),
                args.cold, args.pooled, progress, args.assume_mb)))
    print(f"\n$ {' '.join(sys.argv)}\n")
    print(table(results, args.consoles))
    return 0


if __name__ == "__main__":
    sys.exit(main())
