"""Repro: a client that answers the server's websocket close but keeps its TCP
connection open keeps one server fd each, for as long as it likes.

Found by the soak (websocket-client's close() does nothing once the server has
closed, so its sockets stayed open). Refused tokens start no sandbox and need
no admission, so an unauthenticated client can pin server fds this way.

    .venv/bin/python tests/soak/linger.py [--commit REV] [--clients 30]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from conftest import start_server  # noqa: E402
from soak import SoakClient, use_commit  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--commit", metavar="REV")
    parser.add_argument("--clients", type=int, default=30)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="shellserver-linger-"))
    if args.commit:
        print("server from commit", use_commit(args.commit, tmp / "src"))
    server = start_server(tmp, uid_min=232000, uid_max=232199)
    fds = lambda: len(os.listdir(f"/proc/{server.process.pid}/fd"))  # noqa: E731
    held = []
    try:
        print("server fds at start:", fds())
        for i in range(min(args.clients, 200)):
            client = SoakClient(server, f"127.0.0.{10 + i % 40}")
            client.login("not-a-token")
            if not client.wait_closed(10):
                print("not closed by the server:", list(client.messages))
            held.append(client)  # close handshake answered; TCP left open
        start = time.monotonic()
        for wait in (1, 15, 60):
            time.sleep(max(0.0, start + wait - time.monotonic()))
            print(f"{wait:3d} s after {len(held)} refused clients kept TCP open: "
                  f"server fds {fds()}", flush=True)
        for client in held:
            client.ws.shutdown()
        time.sleep(2)
        print("2 s after the clients closed their sockets: server fds", fds())
    finally:
        for client in held:
            client.ws.shutdown()
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
