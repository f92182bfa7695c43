"""A client that floods its console with input, in a process of its own
(bench/input_flood.py drives it).

It opens a console over the raw websocket (``--transport websocket``) or over
the xhr transports (``--transport xhr_send``: xhr polling to receive,
xhr_send to send), has the console run a program that reads its terminal raw
and discards what it reads, prints "flooding", then sends ``ix`` messages as
fast as it can for ``--seconds`` (and at most ``--max-messages``), and prints
its numbers as one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import json
import os
import re
import secrets
import struct
import sys

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)),
                os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]

import wire  # noqa: E402

# Reads the terminal raw and throws it away, until a deadline (bounded), and
# writes how many bytes it has read as "N<count>N" every 0.2 s: that is the
# input the server has handed over.
READER = ('exec("import os,tty,time\\ntty.setraw(0)\\nt=time.time()+{seconds}\\nn=r=0'
          '\\nwhile time.time()<t:\\n n+=len(os.read(0,65536))'
          '\\n if time.time()>r: os.write(1,b\'N%dN\'%n); r=time.time()+0.2\\n")')
COUNT = re.compile(r"N(\d+)N")
WS_BATCH = 1000  # `ix` frames per write
XHR_MESSAGES = 100  # `ix` messages per xhr_send body
XHR_CONNECTIONS = 4  # parallel keep-alive connections sending
WRITE_BUFFER_HIGH = 1 << 20


def masked_text_frame(payload: bytes) -> bytes:
    mask = secrets.token_bytes(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return struct.pack("!BB", 0x81, 0x80 | len(payload)) + mask + masked


async def flood_websocket(args: argparse.Namespace) -> dict:
    console = wire.WireConsole("127.0.0.1", args.port, tls=None, name="flooder")
    await console.open()
    try:
        console.send_keys(READER.format(seconds=args.seconds + 30) + "\r")
        await console.quiet(0.5)
        read = [0]

        def count(text: str, at: float) -> None:
            found = COUNT.findall(text)
            if found:
                read[0] = int(found[-1])

        console.sink = count
        print("flooding", flush=True)
        transport = console.protocol.transport
        batch = masked_text_frame(b"ix") * WS_BATCH
        sent = 0
        started = wire.now()
        deadline = started + args.seconds
        while wire.now() < deadline and sent < args.max_messages:
            if console.closed.done():
                break
            if transport.get_write_buffer_size() > WRITE_BUFFER_HIGH:
                await asyncio.sleep(0.005)
                continue
            transport.write(batch)
            sent += WS_BATCH
            await asyncio.sleep(0)
        seconds = wire.now() - started
        # what the console read by the end (one byte per message), not what
        # the kernel's socket buffers took
        await asyncio.sleep(0.3)
        return {"transport": "websocket", "messages": read[0], "sent": sent,
                "seconds": seconds,
                "closed": console.closed.result() if console.closed.done() else None}
    finally:
        console.close()


class XhrSession:
    """A SockJS session over xhr polling (receiving) and xhr_send (sending)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.origin = f"http://127.0.0.1:{port}"
        self.base = f"/sockjs/000/{secrets.token_hex(8)}"
        self.text = ""
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.ended = False

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            writer.write(self.request(path, body, keep_alive=False))
            data = await reader.read()
        finally:
            writer.close()
        head, _, payload = data.partition(b"\r\n\r\n")
        if b"transfer-encoding: chunked" in head.lower():
            payload = wire._dechunk(payload)
        return int(head.split(b" ", 2)[1]), payload

    def request(self, path: str, body: bytes, *, keep_alive: bool) -> bytes:
        return (f"POST {self.base}/{path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
                f"Origin: {self.origin}\r\nContent-Type: text/plain\r\n"
                f"Content-Length: {len(body)}\r\n"
                f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n"
                ).encode() + body

    async def send(self, *messages: str) -> int:
        status, _ = await self.post("xhr_send", json.dumps(list(messages)).encode())
        return status

    async def poll_forever(self) -> None:
        while not self.ended:
            status, body = await self.post("xhr", b"")
            for line in body.split(b"\n"):
                if line.startswith(b"a"):
                    for message in json.loads(line[1:]):
                        if message.startswith("o"):
                            self.text = (self.text + message[1:])[-4000:]
                elif line.startswith(b"c"):
                    self.ended = True

    async def wait_for(self, pattern: str, timeout: float) -> None:
        deadline = wire.now() + timeout
        while not re.search(pattern, wire.ANSI.sub("", self.text)):
            if wire.now() > deadline or self.ended:
                raise TimeoutError(f"no {pattern!r} in {self.text[-300:]!r}")
            await asyncio.sleep(0.02)


async def read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    lower = head.lower()
    match = re.search(rb"content-length: *(\d+)", lower)
    if match:
        await reader.readexactly(int(match.group(1)))
    elif b"transfer-encoding: chunked" in lower:
        await reader.readuntil(b"0\r\n\r\n")
    return status


async def flood_xhr(args: argparse.Namespace) -> dict:
    session = XhrSession(args.port)
    token = await wire.WireConsole("127.0.0.1", args.port, tls=None).fetch_token()
    status, opened = await session.post("xhr", b"")
    if not opened.startswith(b"o"):
        raise ConnectionError(f"xhr answered {status} {opened!r}")
    poller = asyncio.ensure_future(session.poll_forever())
    try:
        await session.send("a" + token, "r100,30")
        await session.wait_for(r"In \[1\]: ", 30)
        await session.send("i" + READER.format(seconds=args.seconds + 30) + "\r")
        await asyncio.sleep(0.5)
        print("flooding", flush=True)
        body = json.dumps(["ix"] * XHR_MESSAGES).encode()
        request = session.request("xhr_send", body, keep_alive=True)
        counts = {"delivered": 0, "refused": 0}
        started = wire.now()
        deadline = started + args.seconds

        async def sender() -> None:
            reader, writer = await asyncio.open_connection("127.0.0.1", args.port)
            try:
                while (wire.now() < deadline and not session.ended
                       and counts["delivered"] < args.max_messages):
                    writer.write(request)
                    status = await asyncio.wait_for(read_response(reader), args.seconds + 30)
                    if status == 204:
                        counts["delivered"] += XHR_MESSAGES
                    elif status == 429:
                        counts["refused"] += XHR_MESSAGES
                    else:
                        session.ended = True
            finally:
                writer.close()

        await asyncio.gather(*(sender() for _ in range(XHR_CONNECTIONS)))
        return {"transport": "xhr_send", "messages": counts["delivered"],
                "refused": counts["refused"], "seconds": wire.now() - started,
                "closed": session.ended or None}
    finally:
        session.ended = True
        poller.cancel()


async def main(args: argparse.Namespace) -> dict:
    if args.transport == "websocket":
        return await flood_websocket(args)
    return await flood_xhr(args)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--transport", choices=("websocket", "xhr_send"), required=True)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--max-messages", type=int, default=5_000_000)
    result = asyncio.run(main(parser.parse_args()))
    print(json.dumps(result), flush=True)
