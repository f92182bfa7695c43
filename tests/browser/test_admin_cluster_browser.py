"""The admin page of a real cluster in Chromium: a real `redis-server`,
node A with --admin and node B without; A's page draws a section per node
(B's with its URL, its charts, and the line saying its consoles are ended
from its own page) and says so when Redis is down."""

from __future__ import annotations

import pytest
from cluster_helpers import leftover_processes, start_node, start_redis
from conftest import free_port
from playwright.sync_api import expect

pytestmark = pytest.mark.browser

UIDS = 253200  # this module's range: 253200-253299


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    base = tmp_path_factory.mktemp("admincluster-browser")
    redis = start_redis(base / "redis")
    admin_port = free_port()
    nodes = {}
    try:
        nodes["A"] = start_node(base / "A", "A", redis, base / "secret", uid_min=UIDS,
                                uid_max=UIDS + 19,
                                extra_args=("--admin", f"tcp:{admin_port}:interface=127.0.0.1"))
        nodes["B"] = start_node(base / "B", "B", redis, base / "secret", uid_min=UIDS + 50,
                                uid_max=UIDS + 69)
        token = (nodes["A"].server.state_dir / "admin-token").read_text().strip()
        yield redis, nodes, f"http://127.0.0.1:{admin_port}/", token
    finally:
        for node in nodes.values():
            node.stop()
        redis.stop()
    pids = [redis.process.pid] + [node.server.process.pid for node in nodes.values()]
    assert leftover_processes(pids) == []


def test_every_node_drawn_and_redis_down_said(browser, cluster):
    """A's page shows A and B (B's URL, charts, "its own admin page" line,
    no console table); with Redis killed it shows A alone and says Redis is
    down; with Redis back, B returns."""
    redis, nodes, admin_url, token = cluster
    context = browser.new_context(viewport={"width": 1300, "height": 1400})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        page.goto(admin_url)
        page.get_by_label("Admin token").fill(token)
        page.get_by_role("button", name="Open").click()
        b = page.locator('section.node[data-node="B"]')
        expect(b).to_be_visible(timeout=20000)
        expect(page.locator('section.node[data-node="A"]')).to_be_visible()
        expect(b.locator(".node-url")).to_have_text(nodes["B"].public_url)
        expect(b.locator(".elsewhere")).to_be_visible()
        expect(b.locator("table.consoles")).to_be_hidden()
        expect(b.locator('[data-chart="consoles"] canvas')).to_have_count(1)
        a = page.locator('section.node[data-node="A"]')
        expect(a.locator(".elsewhere")).to_be_hidden()
        expect(page.locator("#notice")).to_have_text("")
        redis.kill()
        try:
            expect(page.locator("#notice")).to_contain_text("Redis is down", timeout=20000)
            expect(b).to_have_count(0)
            expect(a).to_be_visible()
        finally:
            redis.start()
        expect(b).to_be_visible(timeout=30000)
        expect(page.locator("#notice")).to_have_text("", timeout=10000)
    finally:
        context.close()
    assert errors == []
