"""Benchmark shellserver against a raw PTY, and print a table.

    .venv/bin/python bench/run.py [--quick] [--only NAME,...] [--tcp|--tls|--both]

It starts `twistd shellserver` on loopback (plain TCP and TLS listeners),
drives it with a client speaking the console wire (bench/wire.py), and runs
the same measurements against IPython on a local PTY, read by the same client
code, as the baseline. Ratios are against that baseline, measured in the same
run. See bench/README.md for what each row means. Needs root (real sandboxes).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

import scenarios as s  # noqa: E402
import server as bench_server  # noqa: E402

SCENARIOS = ("auth", "warm", "throughput", "echo", "idle", "stalled", "neighbour",
             "ctrlc", "fiveclose")
TTYD_CPU_MS_PER_MB = 8.3  # DESIGN.md, "Peers to be better than"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Sizes:
    def __init__(self, quick: bool) -> None:
        self.auth = 5 if quick else 20
        self.megabytes = 20 if quick else 100
        self.throughput_runs = 1 if quick else 5
        self.echo = 50 if quick else 100  # keystroke pairs: x and backspace, both timed
        self.idle = [1, 10, 25] if quick else [1, 50, 200]
        self.stall = 5.0 if quick else 10.0
        self.ctrlc = 2 if quick else 5
        self.fiveclose_runs = 1 if quick else 3


# -- the table -------------------------------------------------------------------


def ms(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "—"
    return "never" if math.isinf(value) else f"{value * 1000:.1f} ms"


def mb(value: float | None) -> str:
    return "—" if value is None else f"{value / 2**20:.1f} MB"


class Table:
    def __init__(self) -> None:
        self.rows: list[tuple[str, ...] | None] = []

    def section(self, title: str) -> None:
        self.rows.append(None)
        self.rows.append((title,))

    def row(self, metric: str, value: str, baseline: str = "—", ratio: float | None = None,
            target: str = "", ok: bool | None = None) -> None:
        verdict = "" if ok is None else ("PASS" if ok else "FAIL")
        ratio_text = "—" if ratio is None or math.isnan(ratio) else f"{ratio:.2f}"
        self.rows.append((metric, value, baseline, ratio_text, target, verdict))

    def missing(self, metric: str, why: str, target: str = "") -> None:
        self.rows.append((metric, why, "—", "—", target, ""))

    def render(self) -> str:
        header = ("metric", "shellserver", "baseline (PTY)", "ratio", "target", "result")
        full = [r for r in self.rows if r and len(r) == 6]
        widths = [max(len(r[i]) for r in full + [header]) for i in range(6)]
        line = "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=False)).rstrip()
        out = [line, "-" * len(line)]
        for r in self.rows:
            if r is None:
                continue
            if len(r) == 1:
                out.append(r[0])
            else:
                out.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip())
        return "\n".join(out)

    def verdicts(self) -> tuple[int, int]:
        judged = [r for r in self.rows if r and len(r) == 6 and r[5]]
        return sum(r[5] == "PASS" for r in judged), len(judged)


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b or not math.isfinite(a) or not math.isfinite(b):
        return None
    return a / b


# -- running ---------------------------------------------------------------------


async def throughput_runs(targets: list[s.Target], sizes: Sizes, notes: list[str],
                          results: dict, guarded) -> None:
    """Runs alternate between the targets, so that drift in the machine's load
    falls on all of them alike; each target's median run is reported."""
    runs: dict[str, list[dict]] = {t.name: [] for t in targets}
    for i in range(sizes.throughput_runs):
        for target in targets:
            log(f"{target.name}: throughput run {i + 1} ({sizes.megabytes} MB)")

            async def one(target=target) -> None:
                runs[target.name].append(await s.throughput(target, sizes.megabytes))
            await guarded(target, "throughput", one)
    for target in targets:
        mine = runs[target.name]
        if not mine or "broken" in results[target.name]:
            continue
        median = sorted(mine, key=lambda r: r["mb_per_s"])[len(mine) // 2]
        notes.append(f"{target.name} throughput runs (MB/s): "
                     + ", ".join(f"{r['mb_per_s']:.1f}" for r in mine)
                     + f"; client CPU {median['client_cpu_ms_per_mb']:.1f} ms/MB"
                     + ("; server CPU per run (ms/MB): "
                        + ", ".join(f"{r['server_cpu_ms_per_mb']:.1f}" for r in mine)
                        if target.server else ""))
        median["all_ok"] = all(r["error"] is None and r["bytes"] == r["expected"]
                               for r in mine)
        median["errors"] = [r["error"] for r in mine if r["error"]]
        results[target.name]["throughput"] = median


async def fiveclose_runs(target: s.Target, sizes: Sizes) -> dict:
    runs = []
    for i in range(sizes.fiveclose_runs):
        log(f"{target.name}: five consoles close at once, run {i + 1}")
        runs.append(await s.five_close(target))
    worst = max(runs, key=lambda r: r["max"])
    worst["maxes"] = [r["max"] for r in runs]
    worst["before_max"] = max(r["before_max"] for r in runs)
    return worst


async def measure(targets: list[s.Target], wanted: set[str], sizes: Sizes,
                  notes: list[str]) -> dict[str, dict]:
    """Every scenario on the PTY baseline and on each transport, one after the other.

    A transport that fails is reported and left out from then on; the
    others go on (a failing baseline ends the run).
    """
    results: dict[str, dict] = {t.name: {} for t in targets}

    async def guarded(target: s.Target, scenario: str, make) -> None:
        if "broken" in results[target.name]:
            return
        try:
            value = await make()
        except Exception as e:
            if target.server is None:
                raise
            problem = f"{scenario}: {type(e).__name__}: {e}"
            log(f"{target.name} failed in {problem}")
            results[target.name]["broken"] = problem
            await target.settle()
            return
        if value is not None:
            results[target.name][scenario] = value

    wire_targets = [t for t in targets if t.server is not None]
    if "auth" in wanted:
        log("cold auth-to-prompt, the targets in turn")
        samples: dict[str, list[float]] = {t.name: [] for t in targets}
        for _ in range(sizes.auth):
            for target in targets:
                async def one(target=target) -> None:
                    samples[target.name].extend((await s.auth_to_prompt(target, 1))["seconds"])
                await guarded(target, "auth", one)
        for target in targets:
            if "broken" not in results[target.name]:
                results[target.name]["auth"] = s.summary(samples[target.name])
    if "throughput" in wanted:
        # The baseline once more with other work beside it (a row of context).
        loaded = s.LoadedPtyTarget()
        results[loaded.name] = {}
        try:
            await throughput_runs(targets[:1] + [loaded] + targets[1:], sizes, notes,
                                  results, guarded)
        finally:
            loaded.cleanup()
        base = results[targets[0].name]
        if "throughput" in results[loaded.name] and "throughput" in base:
            base["throughput_loaded"] = results[loaded.name]["throughput"]
            base["throughput_loaded"]["load"] = loaded.load
    if "echo" in wanted:
        for target in targets:
            log(f"{target.name}: echo")
            await guarded(target, "echo", lambda t=target: s.echo(t, sizes.echo))
    if "neighbour" in wanted:
        for target in targets:
            log(f"{target.name}: echo while another console floods")
            await guarded(target, "neighbour",
                          lambda t=target: s.neighbour_echo_during_flood(t, sizes.echo))
    if "ctrlc" in wanted:
        for target in targets:
            log(f"{target.name}: Ctrl-C during a flood")
            await guarded(target, "ctrlc", lambda t=target: s.ctrl_c_during_flood(t, sizes.ctrlc))
    if "fiveclose" in wanted:
        for target in targets:
            await guarded(target, "fiveclose", lambda t=target: fiveclose_runs(t, sizes))
    if "stalled" in wanted:
        for target in wire_targets:
            log(f"{target.name}: stalled reader ({sizes.stall:.0f} s)")
            await guarded(target, "stalled", lambda t=target: s.stalled_reader(t, sizes.stall))
    if "idle" in wanted:
        for target in wire_targets:
            log(f"{target.name}: idle consoles {sizes.idle}")
            await guarded(target, "idle", lambda t=target: s.idle_consoles(
                t, sizes.idle, sizes.echo, lambda m, n=t.name: log(f"{n}: {m}")))
    return results


def fill_table(table: Table, name: str, got: dict, base: dict, warm: dict | str | None,
               sizes: Sizes, wanted: set[str], notes: list[str]) -> None:
    table.section(f"{name} ({'TLS' if name == 'tls' else 'plain TCP'} on loopback)")
    if "broken" in got:
        table.row("the transport failed; rows after it are missing", got["broken"][:70],
                  "—", None, "works", False)
    if "auth" in got:
        a, b = got["auth"], base["auth"]
        table.row(f"auth-to-prompt cold p50 (n={a['n']})", ms(a["p50"]), ms(b["p50"]),
                  ratio(a["p50"], b["p50"]), "< 400 ms", a["p50"] < 0.4)
        table.row(f"auth-to-prompt cold p95 (n={a['n']})", ms(a["p95"]), ms(b["p95"]),
                  ratio(a["p95"], b["p95"]))
    if "warm" in wanted:
        if isinstance(warm, dict):
            table.row(f"auth-to-prompt warm p50 (n={warm['n']})", ms(warm["p50"]), "—", None,
                      "< 30 ms", warm["p50"] < 0.03)
            table.row(f"auth-to-prompt warm p95 (n={warm['n']})", ms(warm["p95"]))
        elif warm and warm.startswith("error"):
            table.row("auth-to-prompt warm p50", warm[:70], "—", None, "< 30 ms", False)
        else:
            table.missing("auth-to-prompt warm p50", warm or "n/a", "< 30 ms")
    if "throughput" in got:
        t, b = got["throughput"], base["throughput"]
        r = ratio(t["mb_per_s"], b["mb_per_s"])
        table.row(f"output throughput ({t['bytes'] / 1e6:.0f} MB, median of "
                  f"{sizes.throughput_runs})", f"{t['mb_per_s']:.1f} MB/s",
                  f"{b['mb_per_s']:.1f} MB/s", r, ">= 0.95 x baseline",
                  r is not None and r >= 0.95)
        table.row("output bytes verified (every run)",
                  "all exact" if t["all_ok"] else "; ".join(t["errors"])[:60],
                  "all exact" if b["all_ok"] else "; ".join(b["errors"])[:60], None,
                  "exact", t["all_ok"] and b["all_ok"])
        table.row("whole machine CPU per MB during the flood",
                  f"{t['machine_cpu_ms_per_mb']:.1f} ms/MB",
                  f"{b['machine_cpu_ms_per_mb']:.1f} ms/MB",
                  ratio(t["machine_cpu_ms_per_mb"], b["machine_cpu_ms_per_mb"]))
        table.row("CPUs busy during the flood", f"{t['machine_busy']:.2f} of {os.cpu_count()}",
                  f"{b['machine_busy']:.2f} of {os.cpu_count()}")
        if "throughput_loaded" in base:
            loaded = base["throughput_loaded"]
            table.row(f"baseline throughput, {loaded['load']:.2f} CPU busy beside it "
                      "(ratio to baseline)",
                      "—", f"{loaded['mb_per_s']:.1f} MB/s",
                      ratio(loaded["mb_per_s"], b["mb_per_s"]))
        cpu = t["server_cpu_ms_per_mb"]
        table.row("server CPU per MB of output", f"{cpu:.1f} ms/MB", "—",
                  cpu / TTYD_CPU_MS_PER_MB, f"<= ttyd ({TTYD_CPU_MS_PER_MB} ms/MB)",
                  cpu <= TTYD_CPU_MS_PER_MB)
    if "echo" in got:
        e, b = got["echo"], base["echo"]
        r = ratio(e["p50"], b["p50"])
        table.row(f"keystroke echo p50 (n={e['n']})", ms(e["p50"]), ms(b["p50"]), r,
                  "<= 2 x baseline", r is not None and r <= 2)
        table.row(f"keystroke echo p99 (n={e['n']})", ms(e["p99"]), ms(b["p99"]),
                  ratio(e["p99"], b["p99"]))
    if "idle" in got:
        idle = got["idle"]
        rss = idle["rss"]
        counts = sorted(rss)
        for count in counts:
            table.row(f"server RSS, {count} idle consoles", mb(rss[count]))
        most = counts[-1]
        per = (rss[most] - rss[0]) / most if most else math.nan
        table.row(f"server RSS per idle console (0 -> {most})", f"{per / 1024:.1f} KB", "—",
                  None, "< 100 KB", per < 100 * 1024)
        target_count = sizes.idle[-1]
        table.row(f"echo p99 with {most} idle consoles", ms(idle["echo_p99"]), "—", None,
                  "< 50 ms" + ("" if most >= target_count else f" (wanted {target_count})"),
                  idle["echo_p99"] < 0.05 and most >= target_count)
        table.row("server RSS after they all closed", mb(idle["rss_after"]))
        if idle["limit"]:
            notes.append(f"{name} idle consoles: limited by {idle['limit']}")
    if "stalled" in got:
        st = got["stalled"]
        table.row("stalled reader: server RSS before", mb(st["before"]))
        table.row(f"stalled reader: peak during {sizes.stall:.0f} s", mb(st["peak"]),
                  "—", None, "growth < 5 MB", st["growth"] < 5 * 2**20)
        table.row("stalled reader: 2 s after the console ended", mb(st["after"]), "—", None,
                  "back to before (< 1 MB over)", st["left"] < 2**20)
        notes.append(f"{name} stalled reader: RSS samples (MB) "
                     + " ".join(f"{v / 2**20:.1f}" for v in st["samples"])
                     + f"; the client had read {st['received_mb']:.1f} MB before it stopped")
    if "neighbour" in got:
        n, b = got["neighbour"], base["neighbour"]
        table.row("echo p99 while another console floods", ms(n["p99"]), ms(b["p99"]),
                  ratio(n["p99"], b["p99"]), "< 20 ms", n["p99"] < 0.02)
        notes.append(f"{name} neighbour flood ran at {n['flood_mb_per_s'] or 0:.1f} MB/s "
                     f"(baseline PTY {b['flood_mb_per_s'] or 0:.1f}); echo p50 "
                     f"{ms(n['p50'])}, max {ms(n['max'])}")
    if "ctrlc" in got:
        c, b = got["ctrlc"], base["ctrlc"]
        table.row(f"Ctrl-C to prompt during a flood (worst of {c['n']})", ms(c["max"]),
                  ms(b["max"]), ratio(c["max"], b["max"]), "< 500 ms", c["max"] < 0.5)
        notes.append(f"{name} Ctrl-C: presses repeated (a press lost to IPython switching "
                     f"terminal modes) {c['repeats']}, PTY baseline {b['repeats']}; "
                     "'never' is three presses without a prompt")
    if "fiveclose" in got:
        f, b = got["fiveclose"], base["fiveclose"]
        table.row(f"worst echo while 5 consoles close (worst of {sizes.fiveclose_runs})",
                  ms(f["max"]), ms(b["max"]), ratio(f["max"], b["max"]), "< 10 ms",
                  f["max"] < 0.01)
        notes.append(f"{name} five-close: worst echo per run "
                     + ", ".join(ms(m) for m in f["maxes"])
                     + f"; worst echo in the second before the closes {ms(f['before_max'])}"
                     + f" (PTY baseline {ms(b['before_max'])})")


async def run(args: argparse.Namespace, sizes: Sizes, tmp: Path, servers: list) -> Table:
    wanted = set(args.only.split(",")) if args.only else set(SCENARIOS)
    unknown = wanted - set(SCENARIOS)
    if unknown:
        raise SystemExit(f"unknown --only names: {', '.join(sorted(unknown))}; "
                         f"known: {', '.join(SCENARIOS)}")
    transports = {"tcp": ["tcp"], "tls": ["tls"], "both": ["tcp", "tls"]}[args.transport]
    notes: list[str] = []

    results: dict[str, dict] = {}
    if wanted - {"warm"}:
        log("starting the server (pool off)")
        srv = bench_server.start(tmp / "cold", pool=0)
        servers.append(srv)
        notes.append("bench config: " + "; ".join(srv.notes))
        baseline = s.PtyTarget()
        try:
            targets = [baseline] + [s.WireTarget(srv, name == "tls") for name in transports]
            results = await measure(targets, wanted, sizes, notes)
        finally:
            baseline.cleanup()
        stop_server(srv)

    warm: dict[str, dict | str] = {}
    if "warm" in wanted:
        located = bench_server.pool_key(bench_server.example_keys())
        if located is None:
            warm = {name: "n/a (no pool yet)" for name in transports}
        else:
            pool = 4
            log(f"starting a server with {located[0]}.{located[1]} = {pool}")
            srv = bench_server.start(tmp / "warm", pool=pool)
            servers.append(srv)
            for name in transports:
                log(f"{name}: warm auth-to-prompt")
                try:
                    warm[name] = await s.warm_auth_to_prompt(srv, name == "tls", pool,
                                                             sizes.auth)
                except Exception as e:
                    log(f"{name} failed in warm: {e}")
                    warm[name] = f"error: {type(e).__name__}: {e}"
            stop_server(srv)

    table = Table()
    for name in transports:
        fill_table(table, name, results.get(name, {}), results.get("pty", {}),
                   warm.get(name), sizes, wanted, notes)
    table.notes = notes
    return table


def stop_server(srv: bench_server.BenchServer) -> None:
    log("stopping the server")
    problems = srv.stop()
    problems += bench_server.leftovers(srv)
    if problems:
        log(f"the server left behind: {problems}")
        srv.problems = problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes (under 2 minutes)")
    parser.add_argument("--only", help="comma-separated: " + ",".join(SCENARIOS))
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--tcp", dest="transport", action="store_const", const="tcp")
    group.add_argument("--tls", dest="transport", action="store_const", const="tls")
    group.add_argument("--both", dest="transport", action="store_const", const="both")
    parser.set_defaults(transport="both")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/run.py needs root: the server builds real sandboxes", file=sys.stderr)
        return 2
    if bench_server.processes_of_uids(bench_server.UID_MIN, bench_server.UID_MAX):
        print(f"processes already run in the bench's uid range {bench_server.UID_MIN}-"
              f"{bench_server.UID_MAX}: another bench? stop it first", file=sys.stderr)
        return 2

    sizes = Sizes(args.quick)
    load_before = f"{os.getloadavg()[0]:.1f}"
    tmp = Path(tempfile.mkdtemp(prefix="shellserver-bench-"))
    servers: list = []
    started = time.monotonic()
    table = None
    try:
        table = asyncio.run(run(args, sizes, tmp, servers))
    except KeyboardInterrupt:
        log("interrupted")
    finally:
        problems = [p for srv in servers for p in srv.stop()]
        killed = bench_server.kill_leftover_processes()
        problems += [p for srv in servers for p in bench_server.leftovers(srv)]
        problems += [p for srv in servers for p in srv.problems]
        if table is not None and not problems:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            log(f"server logs kept in {tmp}")
    elapsed = time.monotonic() - started
    if table is not None:
        passed, judged = table.verdicts()
        print(f"shellserver bench ({'quick' if args.quick else 'full'} run, "
              f"{os.cpu_count()} CPUs, load average {load_before} before, "
              f"{os.getloadavg()[0]:.1f} after, Python {platform.python_version()}, "
              f"{time.strftime('%Y-%m-%d %H:%M')}); baseline: the same IPython on a local "
              "PTY, read by the same client")
        print()
        print(table.render())
        print()
        print(f"{passed} of {judged} targets met; run took {elapsed:.0f} s")
        for note in table.notes:
            print(f"- {note}")
    if killed:
        print(f"- cleanup: killed leftover processes {killed}")
    if problems:
        print(f"- cleanup: left behind: {problems}")
        return 1
    print("- cleanup: no process in the bench's uid range, no session cgroup or mount left")
    return 0 if table is not None else 130


if __name__ == "__main__":
    sys.exit(main())
