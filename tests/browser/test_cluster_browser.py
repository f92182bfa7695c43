"""A cluster in a real browser: Debian's chromium, driven by Playwright, loads
the demo page from node A, launches, and types into a console that runs on
node B, because A is paused by its own kill-switch file. The browser's own
requests show that the SockJS connection went to B's port, and B's /status
counts the console.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest
from cluster_helpers import leftover_processes, start_node, start_redis
from conftest import sandbox_leftovers, wait_until
from playwright.sync_api import expect

pytestmark = pytest.mark.browser

UIDS = 245000  # this module's range: 245000-245099


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Redis and nodes A and B; A paused by its kill-switch file."""
    base = tmp_path_factory.mktemp("cluster-browser")
    redis = start_redis(base / "redis")
    nodes = {}
    try:
        for index, name in enumerate("AB"):
            nodes[name] = start_node(base / name, name, redis, base / "secret",
                                     uid_min=UIDS + 50 * index, uid_max=UIDS + 50 * index + 49)
        assert wait_until(lambda: nodes["A"].live_nodes() == ["A", "B"], timeout=15)
        nodes["A"].kill_switch.write_text("")
        assert wait_until(lambda: not own_entry(nodes["B"], "A")["accepting"], timeout=10)
        yield nodes
    finally:
        for node in nodes.values():
            node.stop()
        redis.stop()
    pids = [redis.process.pid] + [node.server.process.pid for node in nodes.values()]
    assert leftover_processes(pids) == []
    for node in nodes.values():
        assert sandbox_leftovers(node.server) == [], node.name


def own_entry(node, name: str) -> dict:
    """Node ``name`` as ``node``'s /status lists it."""
    (entry,) = [e for e in node.status()["cluster"]["nodes"] if e["name"] == name]
    return entry


@pytest.fixture
def page(browser):
    context = browser.new_context(ignore_https_errors=True,
                                  viewport={"width": 1200, "height": 900})
    page = context.new_page()
    page.problems = []
    page.on("pageerror", lambda e: page.problems.append(f"pageerror: {e}"))
    page.on("console", lambda m: m.type == "error" and page.problems.append(m.text))
    page.requested = []
    # Requests of every frame (the console is an iframe of the demo page).
    context.on("request", lambda request: page.requested.append(request.url))
    # Websockets are no requests to Playwright: the page reports them apart.
    page.on("websocket", lambda socket: page.requested.append(socket.url))
    yield page
    context.close()


def sockjs_ports(urls: list[str]) -> set[int]:
    """The ports the browser sent SockJS requests to."""
    return {urlsplit(url).port for url in urls if "/sockjs/" in urlsplit(url).path}


def type_and_read_42(page, rows) -> None:
    page.keyboard.type("6*7")
    page.keyboard.press("Enter")
    expect(rows).to_contain_text("In [2]:", timeout=20_000)
    assert "42" in rows.inner_text(), rows.inner_text()


def test_demo_page_on_a_runs_the_console_on_b(page, cluster):
    """Demo page from paused A, Launch: the console works and its SockJS
    traffic goes to B, which counts it as active."""
    a, b = cluster["A"], cluster["B"]
    page.goto(a.public_url + "/")
    page.get_by_role("button", name="Launch interactive shell").click()
    console = page.frame_locator("iframe")
    expect(console.locator("body")).to_have_attribute("data-state", "ready", timeout=20_000)
    rows = console.locator(".xterm-rows")
    expect(rows).to_contain_text("In [1]:", timeout=20_000)
    type_and_read_42(page, rows)
    assert sockjs_ports(page.requested) == {b.port}, page.requested
    # The websocket itself, not a fallback after the page's CSP blocked it.
    assert any(url.startswith(f"wss://127.0.0.1:{b.port}/") and url.endswith("/websocket")
               for url in page.requested), page.requested
    assert wait_until(lambda: own_entry(b, "B")["active"] == 1, timeout=10)
    assert own_entry(b, "A")["active"] == 0
    assert [p for p in page.problems if "Failed to load resource" not in p] == []


@pytest.mark.parametrize("transport", ["xhr-streaming", "xhr-polling"])
def test_cross_node_http_transports(page, cluster, transport):
    """A's console page forced onto an HTTP transport works against B
    (CORS for A's origin on B's /sockjs)."""
    a, b = cluster["A"], cluster["B"]
    page.goto(f"{a.public_url}/console/?transports={transport}")
    rows = page.locator(".xterm-rows")
    expect(rows).to_contain_text("In [1]:", timeout=20_000)
    type_and_read_42(page, rows)
    assert sockjs_ports(page.requested) == {b.port}, page.requested
    suffix = "xhr_streaming" if transport == "xhr-streaming" else "/xhr"
    assert any(urlsplit(url).path.endswith(suffix) for url in page.requested), page.requested
    assert [p for p in page.problems if "Failed to load resource" not in p] == []
