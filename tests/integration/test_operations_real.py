"""Operating a real server: Prometheus metrics scraped from its own listener,
the log as JSON lines, and --check-config."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import urllib.request

import pytest
from conftest import GENEROUS_ADMISSION, TWISTD, free_port, start_server, wait_until
from console_client import ConsoleClient, fetch_token

pytestmark = pytest.mark.integration

UIDS = 239000


@pytest.fixture(scope="module")
def operated(tmp_path_factory):
    """A server admitting one console at a time, with metrics on loopback and
    a JSON log."""
    metrics_port = free_port()
    server = start_server(
        tmp_path_factory.mktemp("operated"), uid_min=UIDS, uid_max=UIDS + 9,
        admission=GENEROUS_ADMISSION + "capacity = 1\n",
        server='log_format = "json"\nnode = "node-ops"',
        extra_args=("--metrics", f"tcp:{metrics_port}:interface=127.0.0.1"))
    yield server, f"http://127.0.0.1:{metrics_port}/metrics"
    server.stop()


def scrape(url: str) -> dict[str, float]:
    """The server's /metrics as {'name{labels}': value}."""
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        match = re.match(r"^([a-z_]+(?:\{[^}]*\})?) (\S+)$", line)
        if match:
            samples[match.group(1)] = float(match.group(2))
    return samples


def test_metrics_count_real_consoles(operated):
    """After real consoles start, exit, are refused and are left, /metrics
    shows each count, the capacity and the start latency."""
    operated, url = operated
    first = ConsoleClient(operated)
    first.login()
    assert first.wait_for_prompt(1), first.display()
    first.type("exit\r")
    assert first.wait_closed()
    assert wait_until(lambda: scrape(url).get(
        'shellserver_consoles_ended_total{reason="exit"}') == 1)

    # Tokens taken while there is room: a full node serves no console page.
    spare_token = fetch_token(operated)
    foreign_token = fetch_token(operated, source="127.0.0.2")
    second = ConsoleClient(operated)
    second.login()
    assert second.wait_for_prompt(1), second.display()
    assert wait_until(lambda: scrape(url)["shellserver_consoles_active"] == 1)
    # The node is full (capacity 1): the next console is refused.
    third = ConsoleClient(operated)
    third.login(spare_token)
    assert third.wait_closed()
    assert "No console now" in (third.last_message("e") or "")
    # A token fetched for another address is refused as the wrong client.
    wrong = ConsoleClient(operated)
    wrong.login(foreign_token)
    assert wrong.wait_closed()
    second.close()
    assert wait_until(lambda: scrape(url).get(
        'shellserver_consoles_ended_total{reason="client_left"}') == 1)

    samples = scrape(url)
    assert samples["shellserver_capacity"] == 1
    assert samples["shellserver_consoles_active"] == 0
    assert samples['shellserver_consoles_started_total{source="cold"}'] == 2
    assert samples['shellserver_consoles_started_total{source="pool"}'] == 0
    assert samples['shellserver_console_start_seconds_count{source="cold"}'] == 2
    assert 0 < samples['shellserver_console_start_seconds_sum{source="cold"}'] < 60
    assert samples['shellserver_consoles_refused_total{reason="full"}'] == 1
    assert samples['shellserver_consoles_refused_total{reason="token"}'] == 1
    assert samples['shellserver_token_failures_total{reason="wrong_client"}'] == 1
    assert samples['shellserver_connections_total{transport="websocket_raw"}'] == 4
    assert samples["shellserver_output_bytes_total"] > 0
    assert samples['shellserver_consoles_ended_total{reason="exit"}'] == 1
    assert samples['shellserver_consoles_ended_total{reason="client_left"}'] == 1
    assert samples['shellserver_consoles_ended_total{reason="idle"}'] == 0


def token_user(token: str) -> str:
    """The unregistered user a console token was minted for (its claims are
    signed, not secret)."""
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["user_id"]


def json_events(server) -> list[dict]:
    """Every line of the server's log, parsed as JSON (each must parse)."""
    return [json.loads(line) for line in server.log().splitlines() if line.strip()]


def test_json_log_follows_one_console(operated):
    """The log is one JSON event per line; one console's start and end carry
    its id, user, client address, transport, node and reason, and its token
    appears nowhere."""
    server, _ = operated
    token = fetch_token(server)
    client = ConsoleClient(server)
    client.login(token)
    assert client.wait_for_prompt(1), client.display()
    client.type("exit\r")
    assert client.wait_closed()

    def lifecycle():
        return [e for e in json_events(server)
                if e.get("console_event") in ("console_started", "console_ended")
                and e.get("user") == user]

    user = token_user(token)
    assert wait_until(lambda: len(lifecycle()) == 2)
    started, ended = lifecycle()
    assert started["console_event"] == "console_started"
    assert ended["console_event"] == "console_ended"
    assert started["console"] == ended["console"]
    assert started["console"].startswith("s")
    for event in (started, ended):
        assert event["client"] == "127.0.0.1"
        assert event["transport"] == "websocket-raw"
        assert event["node"] == "node-ops"
        assert event["log_level"]["name"] == "info"
    assert ended["reason"] == "exit"
    assert token not in server.log()
    assert token.split(".")[-1] not in server.log()


def test_check_config_real_run(tmp_path):
    """`twistd shellserver --check-config` says ok for a good file, names the
    key of a bad one, and starts nothing either way."""
    state = tmp_path / "state"
    good = tmp_path / "good.toml"
    good.write_text(f'[server]\nstate_dir = "{state}"\nlog_format = "json"\n')
    bad = tmp_path / "bad.toml"
    bad.write_text(f'[server]\nstate_dir = "{state}"\nmax_connections = 0\n')
    ran = subprocess.run([TWISTD, "shellserver", "--check-config", str(good)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert (ran.returncode, ran.stdout) == (0, f"ok: {good}\n"), ran.stderr
    ran = subprocess.run([TWISTD, "shellserver", "--check-config", str(bad)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert ran.returncode == 78
    assert "server.max_connections" in ran.stderr
    assert ran.stdout == ""
    # Nothing started: no state directory, no pid file, no log.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.toml", "good.toml"]


def test_metrics_count_pool_starts(tmp_path):
    """A console handed over from the warm pool counts as a pool start, and
    the pool's size and refills show on /metrics."""
    metrics_port = free_port()
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    server = start_server(tmp_path, uid_min=UIDS + 10, uid_max=UIDS + 19,
                          config="pool_size = 1",
                          extra_args=("--metrics", f"tcp:{metrics_port}:interface=127.0.0.1"))
    try:
        assert wait_until(lambda: scrape(url)["shellserver_pool_waiting"] == 1, timeout=30)
        client = ConsoleClient(server)
        client.login()
        assert client.wait_for_prompt(1), client.display()
        # The pool refills behind the console it handed over.
        assert wait_until(lambda: scrape(url)["shellserver_pool_refills_total"] == 2,
                          timeout=30)
        samples = scrape(url)
        assert samples['shellserver_consoles_started_total{source="pool"}'] == 1
        assert samples['shellserver_consoles_started_total{source="cold"}'] == 0
        assert samples['shellserver_console_start_seconds_count{source="pool"}'] == 1
        client.close()
    finally:
        server.stop()
