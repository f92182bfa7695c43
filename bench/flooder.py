"""A flooding console in a process of its own (scenarios.Flooder drives it).

It opens a console (over the wire, or on a local PTY for the baseline),
starts a bounded flood, prints "flooding" once output flows, reads and
verifies everything until a line "stop" arrives on stdin (or the flood ends),
then closes the console and prints its numbers as one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)),
                os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]

import scenarios  # noqa: E402
import wire  # noqa: E402


async def main(args: argparse.Namespace) -> dict:
    if args.pty:
        target = scenarios.PtyTarget()
        console = await target.console()
    else:
        tls = wire.client_ssl_context(args.cert) if args.cert else None
        console = wire.WireConsole("127.0.0.1", args.port, tls=tls, name="flooder")
        await console.open()
    try:
        await console.quiet(0.2)
        verifier = scenarios.FloodVerifier(None)
        console.sink = verifier.feed
        console.send_keys(scenarios.flood_command(10**6, seconds=args.seconds) + "\r")
        await asyncio.wait_for(asyncio.shield(verifier.began), 30)
        print("flooding", flush=True)
        loop = asyncio.get_running_loop()
        stdin = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
        stop = asyncio.ensure_future(stdin.readline())
        await asyncio.wait([stop, verifier.done], timeout=args.seconds + 30,
                           return_when=asyncio.FIRST_COMPLETED)
        stopped_at = wire.now()
        seconds = stopped_at - verifier.began_at
        return {"bytes": verifier.body, "seconds": seconds,
                "mb_per_s": verifier.body / 1e6 / seconds, "error": verifier.error}
    finally:
        console.close()
        if args.pty:
            target.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int)
    parser.add_argument("--cert")
    parser.add_argument("--pty", action="store_true")
    parser.add_argument("--seconds", type=float, default=60)
    result = asyncio.run(main(parser.parse_args()))
    print(json.dumps(result), flush=True)
