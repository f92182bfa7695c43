"""Live reload on a real server: SIGHUP re-reads the configuration file while
a console keeps running; a broken file is refused and the old limits stay."""

from __future__ import annotations

import json
import re
import signal

import pytest
from conftest import start_server, wait_until
from console_client import ConsoleClient

pytestmark = pytest.mark.integration

UIDS = 242000
STARTED = re.compile(r"console \S+ started for")


def status(server) -> dict:
    with server.get("/status") as response:
        return json.loads(response.read())


def reload_with(server, config_path, old: str, new: str) -> None:
    text = config_path.read_text()
    assert old in text
    config_path.write_text(text.replace(old, new))
    server.process.send_signal(signal.SIGHUP)


def test_sighup_applies_new_limit_and_refuses_broken_file(tmp_path):
    """A raised per-address limit applies on SIGHUP while a console keeps
    working; a file with a bad value is refused, naming the key, and the
    limit stays as it was."""
    server = start_server(tmp_path, uid_min=UIDS, uid_max=UIDS + 9,
                          admission="per_address = 1\nper_address_per_minute = 100\n"
                                    "pages_per_address_per_minute = 0\n")
    config_path = tmp_path / "shellserver.toml"
    clients = []
    try:
        first = ConsoleClient(server)
        clients.append(first)
        first.login()
        assert first.wait_for_prompt(1), first.display()
        assert status(server)["reason"] == "rate-limited"

        reload_with(server, config_path, "per_address = 1\n", "per_address = 2\n")
        assert wait_until(lambda: "configuration reloaded" in server.log(), timeout=15)
        assert status(server)["accepting"] is True
        second = ConsoleClient(server)
        clients.append(second)
        second.login()
        assert second.wait_for_prompt(1), second.display()
        assert "42" in first.run("print(6*7)", 2)

        reload_with(server, config_path, "per_address = 2\n", "per_address = -5\n")
        assert wait_until(lambda: "configuration not reloaded" in server.log(), timeout=15)
        refusal = re.search(r"configuration not reloaded: (\S+):", server.log())
        assert refusal and refusal.group(1) == "admission.per_address", server.log()
        # Two consoles are open and the limit is still 2: a third is refused.
        assert status(server)["reason"] == "rate-limited"
        assert "42" in second.run("print(6*7)", 2)
        assert server.log().count("configuration reloaded") == 1
    finally:
        for client in clients:
            client.close()
        server.stop()


def test_sighup_changes_log_level(tmp_path):
    """server.log_level = "warn" keeps a console's start out of the log; after
    a SIGHUP to "info" the next console's start is logged, and the first
    console still works."""
    server = start_server(tmp_path, uid_min=UIDS + 10, uid_max=UIDS + 19,
                          server='log_level = "warn"\n')
    config_path = tmp_path / "shellserver.toml"
    clients = []
    try:
        first = ConsoleClient(server)
        clients.append(first)
        first.login()
        assert first.wait_for_prompt(1), first.display()
        assert "42" in first.run("print(6*7)", 2)
        # Info events are dropped; warnings still go through.
        assert not STARTED.search(server.log()), server.log()

        reload_with(server, config_path, 'log_level = "warn"', 'log_level = "info"')
        assert wait_until(lambda: "configuration reloaded" in server.log(), timeout=15)
        assert "server.log_level" in server.log()
        second = ConsoleClient(server)
        clients.append(second)
        second.login()
        assert second.wait_for_prompt(1), second.display()
        assert wait_until(lambda: len(STARTED.findall(server.log())) == 1, timeout=10), \
            server.log()
        assert "42" in first.run("print(6*7)", 2)
    finally:
        for client in clients:
            client.close()
        server.stop()
