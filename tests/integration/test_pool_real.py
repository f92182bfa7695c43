"""The warm pool on real sandboxes: handed out once, at the visitor's size."""

from __future__ import annotations

import re

import pytest
from conftest import sandbox_leftovers, start_server, wait_until
from console_client import ConsoleClient

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pooled(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("pool"), uid_min=221000, uid_max=221019,
                       config="pool_size = 2\n")
    yield srv
    srv.stop()
    assert sandbox_leftovers(srv) == []


def started(server) -> int:
    return server.log().count("started as uid")


def pool_full(server) -> bool:
    return started(server) - server.log().count("handed out from the warm pool") >= 2


def uid_of(client: ConsoleClient, prompt_after: int) -> int:
    client.run("print('UID', __import__('os').getuid())", prompt_after)
    return int(re.search(r"UID (\d+)", "".join(client.raw_output)).group(1))


def test_pooled_consoles_are_handed_out_once_and_replaced(pooled):
    """Two visitors get two different pre-started sandboxes; both are replaced."""
    assert wait_until(lambda: pool_full(pooled), timeout=30)
    # Let the second one reach its prompt too.
    assert wait_until(lambda: pooled.log().count("handed out") == 0 and started(pooled) == 2,
                      timeout=5)
    clients = [ConsoleClient(pooled, cols=111, rows=33) for _ in range(2)]
    for client in clients:
        client.login()
    for client in clients:
        assert client.wait_for_prompt(1, timeout=20), client.display()
    assert pooled.log().count("handed out from the warm pool") == 2
    uids = [uid_of(client, 2) for client in clients]
    assert len(set(uids)) == 2
    # The visitor's terminal size was applied on hand-over.
    size = clients[0].run("print('SIZE', tuple(__import__('os').get_terminal_size()))", 3)
    assert "SIZE (111, 33)" in size
    # Replacements were started for both.
    assert wait_until(lambda: started(pooled) == 4, timeout=30)
    for client in clients:
        client.close()


def test_refilled_pool_serves_the_next_visitor(pooled):
    """After the pool was emptied and refilled, the next visitor gets a pooled console."""
    assert wait_until(lambda: pool_full(pooled), timeout=30)
    before = pooled.log().count("handed out from the warm pool")
    client = ConsoleClient(pooled)
    client.login()
    assert client.wait_for_prompt(1, timeout=20)
    assert client.run("print(6*7)", 2).count("42") >= 1
    assert pooled.log().count("handed out from the warm pool") == before + 1
    client.close()
