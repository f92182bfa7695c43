"""A flood of console pages: what 20,000 `GET /console/` cost the server.

Starts `twistd shellserver` (uids 235080-235089, default page limit unless
--limit), then sends ``--requests`` keep-alive requests for /console/ over TLS
from ``--addresses`` loopback addresses at once (bounded: 120 s), and prints
a table: answers by status, wall time, the server's CPU time, RSS growth and
log lines added. As root, after ./setup.sh:

    .venv/bin/python bench/page_flood.py
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent / "tests"),
                str(Path(__file__).resolve().parent.parent / "tests" / "security")]

from conftest import start_server  # noqa: E402
from hostile_helpers import headers_of, status_of, tls_connect  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
DEADLINE = 120.0


def server_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def server_rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def log_lines(server) -> int:
    """Lines in the server's log, rotated files (twistd rotates at 1 MB) included."""
    return sum(path.read_bytes().count(b"\n")
               for path in server.log_path.parent.glob(server.log_path.name + "*"))


def read_response(sock, deadline: float) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    head = data.index(b"\r\n\r\n") + 4
    length = int(headers_of(data)[b"content-length"])
    while len(data) < head + length:
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data[:head]


def flood(server, source: str, count: int, statuses: Counter, deadline: float) -> None:
    request = (f"GET /console/ HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
               "Connection: keep-alive\r\n\r\n").encode()
    with tls_connect(server, source=source, timeout=10) as sock:
        for _ in range(count):
            if time.monotonic() > deadline:
                statuses["unsent (deadline)"] += 1
                continue
            sock.sendall(request)
            statuses[status_of(read_response(sock, deadline))] += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--addresses", type=int, default=8)
    parser.add_argument("--limit", type=int, default=None,
                        help="admission.pages_per_address_per_minute (default: the default)")
    args = parser.parse_args()
    admission = "per_address = 100\nper_address_per_minute = 10000\n"
    if args.limit is not None:
        admission += f"pages_per_address_per_minute = {args.limit}\n"
    server = start_server(Path(tempfile.mkdtemp(prefix="page-flood-")), uid_min=235080,
                          uid_max=235089, admission=admission)
    try:
        pid = server.process.pid
        lines, cpu, rss = (log_lines(server), server_cpu_seconds(pid),
                           server_rss_kb(pid))
        statuses: Counter = Counter()
        per_address = args.requests // args.addresses
        started = time.monotonic()
        deadline = started + DEADLINE
        threads = [threading.Thread(target=flood, args=(server, f"127.0.3.{n + 1}",
                                                        per_address, statuses, deadline))
                   for n in range(args.addresses)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(DEADLINE + 10)
        wall = time.monotonic() - started
        cpu_used, rss_growth = server_cpu_seconds(pid) - cpu, server_rss_kb(pid) - rss
        # The log is written behind the requests: count once it stops growing.
        counted, settle = -1, time.monotonic() + 20
        while time.monotonic() < settle:
            now = log_lines(server)
            if now == counted:
                break
            counted = now
            time.sleep(0.5)
        print("| requests | addresses | answers | wall s | server CPU s | RSS growth KB "
              "| log lines added |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        answers = ", ".join(f"{status}: {n}" for status, n in sorted(statuses.items(),
                                                                     key=str))
        print(f"| {per_address * args.addresses} | {args.addresses} | {answers} | {wall:.1f} "
              f"| {cpu_used:.1f} | {rss_growth} | {counted - lines} |")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
