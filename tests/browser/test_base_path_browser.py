"""The site under a base path in Chromium: a server with
server.base_path = "/console-svc", as behind a reverse proxy that passes
/console-svc/... through, embedded in a host page on another origin."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest
from conftest import free_port, start_server
from playwright.sync_api import expect
from test_embed import LAUNCH, HostSite, host_page

pytestmark = pytest.mark.browser

PREFIX = "/console-svc"


@pytest.fixture(scope="module")
def host():
    site = HostSite(free_port())
    yield site
    site.close()


@pytest.fixture(scope="module")
def prefixed(tmp_path_factory, host):
    srv = start_server(tmp_path_factory.mktemp("base-path"), uid_min=242050,
                       uid_max=242069, server=f'base_path = "{PREFIX}"',
                       embed=f'host_origins = ["{host.origin}"]\nstatus_max_age = 0\n',
                       ready_path=PREFIX + "/")
    yield srv
    srv.stop()


def test_console_through_prefix(browser, host, prefixed):
    """A host page's embed.js from /console-svc launches a console that prints
    42, and every request the browser sends to the service stays under the
    prefix."""
    service = prefixed.base_url + PREFIX
    url = host.add("/prefixed", host_page(service), prefixed.base_url)
    context = browser.new_context(ignore_https_errors=True,
                                  viewport={"width": 1100, "height": 900})
    page = context.new_page()
    service_paths: list[str] = []
    errors: list[str] = []

    def record(request):
        parts = urlsplit(request.url)
        if f"{parts.scheme}://{parts.netloc}" == prefixed.base_url:
            service_paths.append(parts.path)

    page.on("request", record)
    page.on("websocket", lambda socket: service_paths.append(urlsplit(socket.url).path))
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        page.goto(url)
        page.get_by_role("button", name=LAUNCH).first.click()
        console = page.frame_locator("iframe")
        expect(console.locator("body")).to_have_attribute("data-state", "ready",
                                                          timeout=20_000)
        rows = console.locator(".xterm-rows")
        expect(rows).to_contain_text("In [1]:", timeout=20_000)
        page.keyboard.type("print(6*7)")
        page.keyboard.press("Enter")
        expect(rows).to_contain_text("In [2]:", timeout=20_000)
        assert "42" in [line.strip() for line in rows.inner_text().splitlines()]
    finally:
        context.close()
    assert errors == []
    assert f"{PREFIX}/console/" in service_paths
    assert any(path.startswith(f"{PREFIX}/static/vendor/") for path in service_paths)
    assert any(path.startswith(f"{PREFIX}/sockjs/") for path in service_paths)
    outside = [path for path in service_paths if not path.startswith(PREFIX + "/")]
    assert outside == [], outside
