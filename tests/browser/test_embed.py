"""Embedding on another origin, in a real browser against real servers.

A host page is served from another port (another origin) with a strict CSP
that allows only the service's origin, two code samples and the one script
tag. Chromium must show the buttons, put a working console in a sample's place,
restore it on Close, and honour the kill switch, capacity, per-address limits
and frame-ancestors.
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import REPO, free_port, start_server, wait_until
from console_client import ConsoleClient
from playwright.sync_api import expect

pytestmark = pytest.mark.browser

LAUNCH = "Launch interactive shell"


def host_page(service: str) -> str:
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Docs</title>
<script src="{service}/embed.js" defer></script></head>
<body>
<h1>Tutorial</h1>
<p>First sample:</p>
<pre data-shellserver id="one">print(6*7)</pre>
<p>Second sample:</p>
<pre data-shellserver id="two">import this</pre>
<p id="after">The end.</p>
</body></html>"""


class HostSite:
    """A loopback HTTP server playing the embedding site (another origin)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.pages: dict[str, tuple[str, str]] = {}  # path: (html, csp)
        site = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path == "/down/embed.js":
                    # embed.js itself loads, but its service answers 502.
                    body = (REPO / "web" / "static" / "embed.js").read_bytes()
                    self._reply(200, body, "text/javascript")
                    return
                if self.path.startswith("/down/"):
                    self._reply(502, b"bad gateway", "text/plain")
                    return
                page = site.pages.get(self.path)
                if page is None:
                    self._reply(404, b"no", "text/plain")
                    return
                self._reply(200, page[0].encode(), "text/html; charset=utf-8", page[1])

            def _reply(self, code, body, content_type, csp=None):
                self.send_response(code)
                self.send_header("content-type", content_type)
                self.send_header("content-length", str(len(body)))
                if csp:
                    self.send_header("content-security-policy", csp)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add(self, path: str, html: str, service: str) -> str:
        csp = (f"default-src 'none'; script-src {service}; connect-src {service}; "
               f"frame-src {service}; style-src 'self'")
        self.pages[path] = (html, csp)
        return self.origin + path

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def host():
    site = HostSite(free_port())
    yield site
    site.close()


@pytest.fixture(scope="module")
def stranger():
    """A second host origin that is not allowed to embed."""
    site = HostSite(free_port())
    yield site
    site.close()


def embed_server(tmp: Path, host: HostSite, uids: int, admission: str = ""):
    return start_server(tmp, uid_min=uids, uid_max=uids + 19, admission=admission,
                        embed=f'host_origins = ["{host.origin}"]\nstatus_max_age = 0\n')


@pytest.fixture(scope="module")
def service(tmp_path_factory, host):
    srv = embed_server(tmp_path_factory.mktemp("embed"), host, 260000)
    yield srv
    srv.stop()


@pytest.fixture
def page(browser):
    context = browser.new_context(ignore_https_errors=True,
                                  viewport={"width": 1100, "height": 900})
    page = context.new_page()
    page.problems = []
    page.on("pageerror", lambda e: page.problems.append(f"pageerror: {e}"))
    page.on("console", lambda m: m.type == "error" and page.problems.append(m.text))
    yield page
    context.close()


def own_problems(page) -> list[str]:
    """Console errors other than the browser's own failed-load notices."""
    return [p for p in page.problems if "Failed to load resource" not in p]


def box(locator):
    b = locator.bounding_box()
    return round(b["x"]), round(b["y"]), round(b["width"]), round(b["height"])


def test_buttons_cover_and_restore(page, host, service):
    """Buttons appear above both samples; a click puts a working console in the
    sample's place; Close restores the sample."""
    url = host.add("/tutorial", host_page(service.base_url), service.base_url)
    bare = host.add("/bare", "<!doctype html><p>nothing</p>", service.base_url)
    page.goto(bare)
    globals_without = set(page.evaluate("Object.keys(window)"))
    page.goto(url)
    buttons = page.get_by_role("button", name=LAUNCH)
    expect(buttons).to_have_count(2, timeout=10_000)
    assert set(page.evaluate("Object.keys(window)")) == globals_without
    sample = page.locator("#one")
    sx, sy, swidth, sheight = box(sample)
    buttons.first.click()
    frame_element = page.locator("iframe")
    expect(frame_element).to_have_count(1)
    expect(sample).to_be_hidden()
    x, y, width, height = box(frame_element)
    assert (x, y, width) == (sx, sy, swidth)  # in the sample's place
    assert height >= 300 and height == max(sheight, 360)
    console = page.frame_locator("iframe")
    expect(console.locator("body")).to_have_attribute("data-state", "ready", timeout=20_000)
    rows = console.locator(".xterm-rows")
    expect(rows).to_contain_text("In [1]:", timeout=20_000)
    page.keyboard.type("print(6*7)")  # focus moved into the console
    page.keyboard.press("Enter")
    expect(rows).to_contain_text("In [2]:", timeout=20_000)
    assert "42" in [line.strip() for line in rows.inner_text().splitlines()]
    # The frame follows the page's layout (the sample's width) when it changes.
    page.set_viewport_size({"width": 800, "height": 900})
    wait_until(lambda: box(frame_element)[2] == swidth - 300, timeout=5)
    assert box(frame_element)[:3] == (sx, sy, swidth - 300)
    page.get_by_role("button", name="Close").click()
    expect(frame_element).to_have_count(0)
    expect(sample).to_be_visible()
    expect(buttons).to_have_count(2)
    assert own_problems(page) == []


def test_kill_switch(page, host, service):
    """With the kill switch on, a fresh page shows no button and /console/ refuses;
    off again, the buttons come back."""
    url = host.add("/switch", host_page(service.base_url), service.base_url)
    running = ConsoleClient(service)
    running.login()
    assert running.wait_for_prompt(1, timeout=20)
    switch = service.state_dir / "kill-switch"
    switch.write_text("")
    try:
        time.sleep(1.5)  # the switch is checked every second
        with page.expect_response(lambda r: r.url.endswith("/status")) as status:
            page.goto(url)
        assert status.value.json()["reason"] == "switched-off"
        page.wait_for_timeout(300)
        expect(page.get_by_role("button", name=LAUNCH)).to_have_count(0)
        response = page.goto(service.base_url + "/console/")
        assert response.status == 503
        expect(page.locator("body")).to_contain_text("paused by its operator")
        assert "started as uid" not in service.log().split("kill switch on")[-1]
        # The console that was already running goes on.
        assert running.run("print(6*7)", 2).count("42") >= 1
    finally:
        switch.unlink()
        running.close()
    time.sleep(1.5)
    page.goto(url)
    expect(page.get_by_role("button", name=LAUNCH)).to_have_count(2, timeout=10_000)


def test_terminate_ends_running_consoles(host, service):
    """A kill-switch file saying terminate ends running consoles with a message."""
    running = ConsoleClient(service)
    running.login()
    assert running.wait_for_prompt(1, timeout=20)
    switch = service.state_dir / "kill-switch"
    switch.write_text("terminate\n")
    try:
        assert running.wait_closed(timeout=10)
        assert running.last_message("x") == "The operator has ended all consoles."
    finally:
        switch.unlink()
    time.sleep(1.5)
    assert b'"accepting":true' in service.get("/status").read()


def test_other_origin_cannot_frame(page, stranger, service):
    """A page on an origin that is not allowed cannot frame the console."""
    before = service.log().count("started as uid")
    html = f'<!doctype html><iframe src="{service.base_url}/console/"></iframe>'
    url = stranger.add("/frame", html, service.base_url)
    blocked = []
    page.on("console", lambda m: "frame-ancestors" in m.text and blocked.append(m.text))
    page.goto(url)
    wait_until(lambda: blocked, timeout=10)
    assert blocked, "chromium did not report the frame-ancestors violation"
    assert page.frame_locator("iframe").locator(".xterm").count() == 0
    page.wait_for_timeout(500)
    assert service.log().count("started as uid") == before


def test_silent_when_service_is_down(page, host):
    """With the service unreachable or failing, no button and no script error."""
    closed = f"https://127.0.0.1:{free_port()}"
    page.goto(host.add("/closed", host_page(closed), closed))
    page.wait_for_timeout(1000)
    expect(page.get_by_role("button", name=LAUNCH)).to_have_count(0)
    # embed.js loads, but /status answers 502.
    failing = host.origin + "/down"
    page.goto(host.add("/failing", host_page(failing), host.origin))
    page.wait_for_timeout(1000)
    expect(page.get_by_role("button", name=LAUNCH)).to_have_count(0)
    assert own_problems(page) == []


def test_capacity_one_gives_full_page(page, host, tmp_path):
    """With capacity 1 and one console running, the next gets the full page."""
    server = embed_server(tmp_path, host, 260100, admission="capacity = 1\n")
    try:
        first = ConsoleClient(server)
        first.login()
        assert first.wait_for_prompt(1, timeout=20)
        page.goto(host.add("/full", host_page(server.base_url), server.base_url))
        page.wait_for_timeout(1000)
        expect(page.get_by_role("button", name=LAUNCH)).to_have_count(0)
        response = page.goto(server.base_url + "/console/")
        assert response.status == 503
        assert response.headers["retry-after"] == "15"
        expect(page.locator("body")).to_contain_text("All consoles are in use")
        first.close()
        assert wait_until(lambda: server.get("/status").read().find(b'"active":0') > 0,
                          timeout=15)
        response = page.goto(server.base_url + "/console/")
        assert response.status == 200
    finally:
        server.stop()


def test_per_address_rate_limit(page, host, tmp_path):
    """The third console per minute from one address is refused with 429."""
    server = embed_server(tmp_path, host, 260200,
                          admission="per_address = 5\nper_address_per_minute = 2\n")
    try:
        for _ in range(2):
            client = ConsoleClient(server)
            client.login()
            assert client.wait_for_prompt(1, timeout=20)
            client.close()
        response = page.goto(server.base_url + "/console/")
        assert response.status == 429
        assert int(response.headers["retry-after"]) > 0
        expect(page.locator("body")).to_contain_text("too many consoles")
    finally:
        server.stop()
