"""What a cluster costs and how fast it notices a dead node.

In one run: a single node (no [cluster]) and a 3-node cluster on a real
`redis-server` (loopback, password), all started like tests/conftest.py's
`start_server` (uids 245100-245299). Then:

1. `GET /console/` (and `/status`) over one keep-alive TLS connection,
   ``--requests`` times per round (bounded by ``--seconds`` per round), single
   node and cluster node A alternating round by round so load drift hits both
   alike: p50/p95 latency, requests per second and the twistd's CPU ms per
   request; the cluster's ratio to the single node's (medians over rounds).
2. Node C SIGKILLed ``--kills`` times (restarted in between): the time from
   the SIGKILL to C's absence from A's /status, which lists exactly the nodes
   placement chooses from (polled every 20 ms); its median, and the time a
   restarted C needs to be listed again.

As root, after ./setup.sh:

    .venv/bin/python bench/cluster_placement.py
    .venv/bin/python bench/cluster_placement.py --requests 200 --rounds 2 --kills 3
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent / "tests")]

from cluster_helpers import leftover_processes, start_node, start_redis  # noqa: E402
from conftest import start_server, wait_until  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
UIDS = 245100
# The page limit is on (as in production: a cluster node counts each page in
# Redis) but never reached by one client's loop.
UNLIMITED = ("per_address = 100\nper_address_per_minute = 10000\n"
             "pages_per_address_per_minute = 1000000\n")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def measure(server, path: str, requests: int, seconds: float) -> dict:
    """``requests`` GETs of ``path`` on one keep-alive connection (bounded by
    ``seconds``): latencies, rate and the server's CPU per request."""
    connection = http.client.HTTPSConnection("127.0.0.1", server.port, timeout=10,
                                             context=server.ssl_context())
    latencies = []
    cpu_before = cpu_seconds(server.process.pid)
    started = time.monotonic()
    try:
        for _ in range(requests):
            if time.monotonic() - started > seconds:
                break
            sent = time.perf_counter()
            connection.request("GET", path)
            response = connection.getresponse()
            response.read()
            latencies.append(time.perf_counter() - sent)
            assert response.status == 200, response.status
    finally:
        connection.close()
    wall = time.monotonic() - started
    cpu = cpu_seconds(server.process.pid) - cpu_before
    latencies.sort()
    return {"p50": latencies[len(latencies) // 2] * 1000,
            "p95": latencies[int(len(latencies) * 0.95)] * 1000,
            "rate": len(latencies) / wall, "cpu": cpu * 1000 / len(latencies),
            "count": len(latencies)}


def live_nodes(node) -> set[str]:
    return {entry["name"] for entry in json.load(node.server.get("/status"))["cluster"]["nodes"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=500, help="per round and path")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=30.0, help="bound per round")
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--heartbeat", type=float, default=1.0)
    parser.add_argument("--ttl", type=float, default=5.0)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("run as root (the nodes start sandboxes)", file=sys.stderr)
        return 1
    base = Path(tempfile.mkdtemp(prefix="cluster-bench-"))
    redis = start_redis(base / "redis")
    started = []
    try:
        (base / "single").mkdir()
        single = start_server(base / "single", uid_min=UIDS, uid_max=UIDS + 49,
                              admission=UNLIMITED)
        started.append(single)
        nodes = {}
        for index, name in enumerate("ABC"):
            first = UIDS + 50 * (index + 1)
            nodes[name] = start_node(base / name, name, redis, base / "secret",
                                     uid_min=first, uid_max=first + 49, heartbeat=args.heartbeat,
                                     node_ttl=args.ttl,
                                     admission=UNLIMITED)
            started.append(nodes[name].server)
        assert wait_until(lambda: live_nodes(nodes["A"]) == {"A", "B", "C"}, timeout=20)

        results: dict[tuple[str, str], list[dict]] = {}
        for _ in range(args.rounds):
            for path in ("/console/", "/status"):
                for label, server in (("single", single), ("cluster", nodes["A"].server)):
                    results.setdefault((path, label), []).append(
                        measure(server, path, args.requests, args.seconds))

        print(f"\nPage cost, {args.rounds} rounds of up to {args.requests} requests "
              "(one keep-alive TLS connection; medians over rounds)\n")
        print("| path | setup | p50 ms | p95 ms | req/s | server CPU ms/req |")
        print("| --- | --- | --- | --- | --- | --- |")
        for path in ("/console/", "/status"):
            rows = {}
            for label in ("single", "cluster"):
                rows[label] = {key: statistics.median(r[key] for r in results[path, label])
                               for key in ("p50", "p95", "rate", "cpu")}
                row = rows[label]
                print(f"| {path} | {label} | {row['p50']:.2f} | {row['p95']:.2f} | "
                      f"{row['rate']:.0f} | {row['cpu']:.2f} |")
            ratio = {key: rows["cluster"][key] / rows["single"][key] for key in rows["single"]}
            print(f"| {path} | cluster / single | {ratio['p50']:.2f} x | {ratio['p95']:.2f} x | "
                  f"{ratio['rate']:.2f} x | {ratio['cpu']:.2f} x |")

        gone, back = [], []
        for _ in range(args.kills):
            nodes["C"].kill()
            killed = time.monotonic()
            assert wait_until(lambda: "C" not in live_nodes(nodes["A"]),
                              timeout=args.ttl * 3 + 5, interval=0.02)
            gone.append(time.monotonic() - killed)
            restarting = time.monotonic()
            nodes["C"].start()
            started.append(nodes["C"].server)
            assert wait_until(lambda: "C" in live_nodes(nodes["A"]), timeout=20, interval=0.02)
            back.append(time.monotonic() - restarting)
        print(f"\nMembership (heartbeat_interval {args.heartbeat} s, node_ttl {args.ttl} s), "
              f"{args.kills} SIGKILLs of C seen from A\n")
        print("| | median s | min s | max s |")
        print("| --- | --- | --- | --- |")
        print(f"| SIGKILL to absence from placement | {statistics.median(gone):.2f} | "
              f"{min(gone):.2f} | {max(gone):.2f} |")
        print(f"| restart to presence (includes start-up) | {statistics.median(back):.2f} | "
              f"{min(back):.2f} | {max(back):.2f} |")
    finally:
        for server in started:
            server.stop()
        redis.stop()
    pids = [redis.process.pid] + [server.process.pid for server in started]
    left = leftover_processes(pids)
    if left:
        print(f"left behind: {left}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
