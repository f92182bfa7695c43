"""Operating a real server: Prometheus metrics scraped from its own listener."""

from __future__ import annotations

import re
import urllib.request

import pytest
from conftest import GENEROUS_ADMISSION, free_port, start_server, wait_until
from console_client import ConsoleClient, fetch_token

pytestmark = pytest.mark.integration

UIDS = 239000


@pytest.fixture(scope="module")
def operated(tmp_path_factory):
    """A server admitting one console at a time, with metrics on loopback."""
    metrics_port = free_port()
    server = start_server(
        tmp_path_factory.mktemp("operated"), uid_min=UIDS, uid_max=UIDS + 9,
        admission=GENEROUS_ADMISSION + "capacity = 1\n",
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
    wait_until(lambda: scrape(url).get(
        'shellserver_consoles_ended_total{reason="exit"}') == 1)

    # Tokens taken while there is room: a full node serves no console page.
    spare_token = fetch_token(operated)
    foreign_token = fetch_token(operated, source="127.0.0.2")
    second = ConsoleClient(operated)
    second.login()
    assert second.wait_for_prompt(1), second.display()
    wait_until(lambda: scrape(url)["shellserver_consoles_active"] == 1)
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
    wait_until(lambda: scrape(url).get(
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
    assert samples['shellserver_consoles_ended_total{reason="idle"}'] == 0
