"""The input budget on real parts: a flooding client is slowed, loses nothing,
and does not stall another console (issue 11)."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import threading
import time
import uuid

import pytest
from conftest import sandbox_leftovers, start_server
from console_client import ConsoleClient, fetch_token

pytestmark = pytest.mark.integration

UIDS = 233000
RATE = 200  # messages a second
BURST = 100
MESSAGES = 1000
FLOOD = [f"{i:05d}," for i in range(MESSAGES)]
FLOOD_BYTES = "".join(FLOOD).encode()
# Delivered at the budget's pace, the flood needs at least this long (less a
# margin for the clock); at full speed it takes a small fraction of a second.
SLOWEST_BUDGETED = 0.8 * (MESSAGES - BURST) / RATE

# Reads the terminal raw until it has every byte of the flood, then prints
# how many it read and their SHA-256: input lost or reordered shows there.
COUNTER = (
    "import os,tty,hashlib\n"
    "tty.setraw(0)\n"
    # split, so that the echo of this very line does not read READY
    "os.write(1, b'READ' + b'Y\\r\\n')\n"
    "h=hashlib.sha256()\n"
    "n=0\n"
    f"while n<{len(FLOOD_BYTES)}:\n"
    " d=os.read(0,65536)\n"
    " h.update(d)\n"
    " n+=len(d)\n"
    "os.write(1, ('GOT %d %s\\r\\n' % (n, h.hexdigest())).encode())\n"
)
COUNTER_LINE = f"exec({COUNTER!r})\r"
EXPECTED = f"GOT {len(FLOOD_BYTES)} {hashlib.sha256(FLOOD_BYTES).hexdigest()}"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A server with a small input budget, so a test flood is long enough to see."""
    if os.geteuid() != 0:
        pytest.fail("integration tests need root (they start real sandboxes)")
    srv = start_server(
        tmp_path_factory.mktemp("budget"), uid_min=UIDS, uid_max=UIDS + 19,
        console=f"input_messages_per_second = {RATE}\ninput_burst_messages = {BURST}\n",
    )
    yield srv
    srv.stop()
    assert sandbox_leftovers(srv) == []


def neighbour_answers(server) -> ConsoleClient:
    client = ConsoleClient(server)
    client.login()
    assert client.wait_for_prompt(1, timeout=30), client.display()
    return client


def test_websocket_flood_is_slowed_without_loss(server):
    """A websocket client sending 1000 messages at once over a budget of 200 a
    second gets them all to its program, in order, no faster than the budget,
    the server logs it, and another console answers meanwhile."""
    neighbour = neighbour_answers(server)
    flooder = ConsoleClient(server)
    flooder.login()
    assert flooder.wait_for_prompt(1, timeout=30), flooder.display()
    flooder.type(COUNTER_LINE)
    assert flooder.wait_for_screen("READY", timeout=15), flooder.display()
    started = time.monotonic()
    for message in FLOOD:
        flooder.type(message)
    neighbour.type("6*7\r")
    assert neighbour.wait_for_prompt(2, timeout=10), neighbour.display()
    assert "Out[1]: 42" in neighbour.display()
    assert flooder.wait_for_screen(EXPECTED, timeout=60), flooder.display()[-400:]
    took = time.monotonic() - started
    assert took >= SLOWEST_BUDGETED, took
    assert "is over its input budget" in server.log()
    flooder.close()
    neighbour.close()


class XhrSession:
    """A console over xhr polling and xhr_send, as sockjs-client speaks them."""

    def __init__(self, server) -> None:
        self.server = server
        self.path = f"/sockjs/000/{uuid.uuid4().hex}"
        self.output = ""
        self.ended = False
        self._poller = threading.Thread(target=self._poll, daemon=True)

    def post(self, transport: str, body: bytes) -> tuple[int, bytes]:
        connection = http.client.HTTPSConnection(
            "127.0.0.1", self.server.port, context=self.server.ssl_context(), timeout=60)
        try:
            connection.request("POST", f"{self.path}/{transport}", body=body,
                               headers={"Origin": self.server.origin,
                                        "Content-Type": "text/plain"})
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def open(self) -> None:
        status, body = self.post("xhr", b"")
        assert (status, body) == (200, b"o\n")
        self._poller.start()

    def _poll(self) -> None:
        deadline = time.monotonic() + 120  # bounded, whatever happens
        while not self.ended and time.monotonic() < deadline:
            try:
                _, body = self.post("xhr", b"")
            except (OSError, http.client.HTTPException) as e:
                # A poll still open when the test ends meets the server going
                # away; before that, the failure shows in the assertions' output.
                if not self.ended:
                    self.output += f"\n[the xhr poll failed: {e!r}]"
                    self.ended = True
                return
            for line in body.split(b"\n"):
                if line.startswith(b"a"):
                    self.output += "".join(m[1:] for m in json.loads(line[1:])
                                           if m.startswith("o"))
                elif line.startswith(b"c"):
                    self.ended = True

    def send(self, *messages: str) -> int:
        status, _ = self.post("xhr_send", json.dumps(list(messages)).encode())
        return status

    def wait_for(self, text: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while text not in self.output and time.monotonic() < deadline and not self.ended:
            time.sleep(0.05)
        return text in self.output


def test_xhr_send_flood_is_slowed_without_loss(server):
    """xhr_send requests carrying 1000 messages, over a budget of 200 a second,
    are answered only as the budget allows; the program gets every message,
    in order, and another console answers meanwhile."""
    neighbour = neighbour_answers(server)
    session = XhrSession(server)
    session.open()
    try:
        assert session.send("a" + fetch_token(server), "r100,30") == 204
        assert session.wait_for("In [", timeout=30), session.output[-300:]
        assert session.send("i" + COUNTER_LINE) == 204
        assert session.wait_for("READY", timeout=15), session.output[-300:]
        started = time.monotonic()
        statuses = [session.send(*["i" + m for m in FLOOD[i:i + 50]])
                    for i in range(0, 250, 50)]
        neighbour.type("6*7\r")
        assert neighbour.wait_for_prompt(2, timeout=10), neighbour.display()
        statuses += [session.send(*["i" + m for m in FLOOD[i:i + 50]])
                     for i in range(250, MESSAGES, 50)]
        assert statuses == [204] * (MESSAGES // 50)
        assert session.wait_for(EXPECTED, timeout=60), session.output[-400:]
        took = time.monotonic() - started
        assert took >= SLOWEST_BUDGETED, took
    finally:
        session.ended = True
    neighbour.close()
