"""A real console that burns its CPU budget is slowed, told, then ended."""

from __future__ import annotations

import time

import pytest
from conftest import sandbox_leftovers, session_cgroups, start_server
from console_client import ConsoleClient

from shellserver.sandbox.budget import read_usage_seconds
from shellserver.sandbox.cgroups import CgroupGroup

pytestmark = pytest.mark.integration


def test_miner_is_tarpitted_then_ended(tmp_path):
    """`while True: pass` exceeds a 1 s budget: its CPU rate drops to the tarpit's,
    the user is told, and the console ends with a message."""
    server = start_server(tmp_path, uid_min=223000, uid_max=223009,
                          config="cpu_budget = 1.0\ntarpit_quota = 0.05\ntarpit_seconds = 4.0\n")
    try:
        client = ConsoleClient(server)
        client.login()
        assert client.wait_for_prompt(1, timeout=20)
        unified = [p for p in session_cgroups(server) if "/unified/" in p]
        client.type("while True: pass\r")
        assert client.wait_for(lambda c: c.last_message("n") is not None, timeout=15)
        assert "CPU time allowance" in client.last_message("n")
        # Tarpitted: about 5% of a CPU now, against 50% before.
        before = read_usage_seconds((CgroupGroup(unified[0]),))
        time.sleep(2)
        rate = (read_usage_seconds((CgroupGroup(unified[0]),)) - before) / 2
        assert rate < 0.15, rate
        assert client.wait_closed(timeout=15)
        assert client.last_message("x") == "Console ended: it used up its CPU time allowance."
    finally:
        server.stop()
    assert sandbox_leftovers(server) == []
