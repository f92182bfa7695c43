"""Flow control on real parts: a runaway program against slow and stalled clients."""

from __future__ import annotations

import re
import time

import pytest
from conftest import wait_until
from console_client import ConsoleClient

pytestmark = pytest.mark.integration

HIGH_WATER = 262144  # console.output_high_water's default
COALESCE_MAX = 65536


def units(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def received_units(client: ConsoleClient) -> int:
    return sum(units(chunk) for chunk in client.raw_output)


def server_rss_kb(server) -> int:
    with open(f"/proc/{server.process.pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def pump_for(client: ConsoleClient, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        client.pump(0.05)


def test_unacknowledged_output_pauses_the_program_without_loss(server):
    """Without acknowledgements the server stops reading the PTY near the high
    watermark; once acknowledged, the rest arrives complete and in order."""
    client = ConsoleClient(server)
    client.login()
    client.send("k0")
    assert client.wait_for_prompt(1, timeout=20)
    client.type("for i in range(200000): print(i)\r")
    pump_for(client, 2.0)
    plateau = received_units(client)
    pump_for(client, 1.0)
    assert received_units(client) == plateau, "output kept flowing without acks"
    assert HIGH_WATER < plateau <= HIGH_WATER + 2 * COALESCE_MAX
    # Acknowledge as we go: the program runs to the end.
    deadline = time.monotonic() + 60
    while "In [2]:" not in client.display() and time.monotonic() < deadline:
        client.send(f"k{received_units(client)}")
        client.pump(0.2)
    assert "In [2]:" in client.display()
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", "".join(client.raw_output))
    lines = text.split("\r\n")
    numbers = [int(line) for line in lines if line.isdigit()]
    assert numbers == list(range(200000))
    client.close()


def test_stalled_reader_does_not_grow_server_memory(server):
    """A client that stops reading during a flood costs the server little memory,
    and Ctrl-C still gets through."""
    client = ConsoleClient(server)
    client.login()
    assert client.wait_for_prompt(1, timeout=20)
    before = server_rss_kb(server)
    client.type("while True: print('x' * 100)\r")
    time.sleep(4)  # not reading: the socket, then SockJS's queue, fill up
    during = server_rss_kb(server)
    assert during - before < 16 * 1024, (before, during)
    client.type("\x03")
    assert client.wait_for_screen("KeyboardInterrupt", timeout=30), client.display()[-500:]
    assert client.wait_for_prompt(2, timeout=30)
    client.close()
    assert wait_until(lambda: server_rss_kb(server) - before < 16 * 1024, timeout=10)


def test_unread_input_is_bounded(server):
    """Typing into a console whose program does not read (its terminal raw,
    asleep) costs the server little memory: past a backlog the keystrokes are
    dropped and the user is told."""
    client = ConsoleClient(server)
    client.login()
    assert client.wait_for_prompt(1, timeout=20)
    client.type("import tty, time; tty.setraw(0); time.sleep(30)\r")
    pump_for(client, 1.0)
    before = server_rss_kb(server)
    for _ in range(100):  # 3 MB, bounded
        client.type("y" * 30000)
        client.pump(0.01)
    pump_for(client, 1.0)
    notices = [m for m in client.messages if m.startswith("n")]
    assert any("not reading what you type" in m for m in notices), notices
    assert server_rss_kb(server) - before < 5 * 1024, (before, server_rss_kb(server))
    client.close()
    assert wait_until(lambda: server_rss_kb(server) - before < 5 * 1024, timeout=10)
