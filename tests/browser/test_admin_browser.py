"""The admin page in Chromium, on a real server started with --admin: the
token gate, charts drawn from real consoles, pause and resume, ending one
console."""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request
from urllib.parse import urlsplit

import pytest
from conftest import free_port, start_server, wait_until
from console_client import ConsoleClient, fetch_token
from playwright.sync_api import expect

pytestmark = pytest.mark.browser

UIDS = 249000
# The "active" series' stroke in web/static/admin.js (COLORS[0]).
ACTIVE_RGB = (0x1F, 0x77, 0xB4)

# Where the consoles chart has pixels of the "active" line: the highest one,
# as a fraction of the canvas's height from its top (1.0: none at all).
HIGHEST_ACTIVE_PIXEL = """(rgb) => {
  const canvas = document.querySelector('[data-chart="consoles"] canvas');
  const context = canvas.getContext('2d');
  const {width, height} = canvas;
  const pixels = context.getImageData(0, 0, width, height).data;
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const i = (y * width + x) * 4;
      if (pixels[i + 3] > 200 && Math.abs(pixels[i] - rgb[0]) < 30 &&
          Math.abs(pixels[i + 1] - rgb[1]) < 30 && Math.abs(pixels[i + 2] - rgb[2]) < 30) {
        return y / height;
      }
    }
  }
  return 1.0;
}"""


@pytest.fixture(scope="module")
def operated(tmp_path_factory):
    admin_port = free_port()
    srv = start_server(tmp_path_factory.mktemp("admin"), uid_min=UIDS, uid_max=UIDS + 19,
                       admission="capacity = 4\nper_address = 4\n"
                                 "per_address_per_minute = 100\n"
                                 "pages_per_address_per_minute = 0\n",
                       embed="status_max_age = 0\n",
                       extra_args=("--admin", f"tcp:{admin_port}:interface=127.0.0.1"))
    yield srv, f"http://127.0.0.1:{admin_port}/"
    srv.stop()


def admin_token(server) -> str:
    return (server.state_dir / "admin-token").read_text().strip()


def status(server) -> dict:
    with server.get("/status") as response:
        return json.loads(response.read())


def open_admin(browser, admin_url: str, token: str):
    context = browser.new_context(viewport={"width": 1300, "height": 1400})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(admin_url)
    page.get_by_label("Admin token").fill(token)
    page.get_by_role("button", name="Open").click()
    return context, page, errors


def overview_from(source: str, admin_url: str, token: str) -> int:
    """The status of GET api/overview with ``token``, sent from ``source``."""
    port = int(urlsplit(admin_url).port)
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10,
                                            source_address=(source, 0))
    try:
        connection.request("GET", "/api/overview",
                           headers={"Authorization": f"Bearer {token}"})
        return connection.getresponse().status
    finally:
        connection.close()


def test_login_refused_without_the_token(browser, operated):
    """A wrong token keeps the dashboard hidden and says it was refused; the
    API answers 401 without the token, 429 to an address after five wrong
    ones (others go on), and the token file is 0600."""
    operated, admin_url = operated
    assert (operated.state_dir / "admin-token").stat().st_mode & 0o777 == 0o600
    context, page, errors = open_admin(browser, admin_url, "not-the-token")
    try:
        expect(page.locator("#login-error")).to_have_text("The token was refused.")
        expect(page.locator("#dashboard")).to_be_hidden()
    finally:
        context.close()
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(admin_url + "api/overview", timeout=10)
    assert refused.value.code == 401
    # Wrong tokens from one address: after five, even the right one waits.
    answers = [overview_from("127.0.0.2", admin_url, "wrong") for _ in range(5)]
    assert answers == [401] * 5
    assert overview_from("127.0.0.2", admin_url, admin_token(operated)) == 429
    assert overview_from("127.0.0.1", admin_url, admin_token(operated)) == 200
    # The browser's console reports the refused fetch; nothing else went wrong.
    assert [e for e in errors if "401" not in e] == []


def test_charts_pause_resume_and_end(browser, operated):
    """With the token: after two real consoles start, the consoles chart
    draws the rising line; Pause makes /status switched-off and a new
    console refused, Resume restores; ending one console ends it for its
    client while the other works on."""
    operated, admin_url = operated
    context, page, errors = open_admin(browser, admin_url, admin_token(operated))
    clients = []
    try:
        expect(page.locator("#dashboard")).to_be_visible()
        expect(page.locator('[data-chart="consoles"] canvas')).to_be_visible()
        # No console yet: the active line (if drawn) lies on the zero line.
        assert page.evaluate(HIGHEST_ACTIVE_PIXEL, list(ACTIVE_RGB)) > 0.6

        for _ in range(2):
            client = ConsoleClient(operated)
            clients.append(client)
            client.login()
            assert client.wait_for_prompt(1), client.display()
        rows = page.locator("table.consoles tbody tr")
        expect(rows).to_have_count(2, timeout=20_000)
        # Two of four: the line climbs to about half of the plot's height.
        assert wait_until(lambda: page.evaluate(HIGHEST_ACTIVE_PIXEL, list(ACTIVE_RGB)) < 0.6,
                          timeout=30), page.screenshot(path=str(operated.state_dir.parent
                                                                / "admin.png"))

        spare_token = fetch_token(operated)
        page.get_by_role("button", name="Pause the service").click()
        expect(page.locator("#service")).to_contain_text("paused", timeout=10_000)
        assert status(operated)["reason"] == "switched-off"
        refused = ConsoleClient(operated)
        refused.login(spare_token)
        assert refused.wait_closed()
        assert refused.last_message("e"), refused.messages
        assert "42" in clients[0].run("print(6*7)", 2)

        page.get_by_role("button", name="Resume the service").click()
        expect(page.locator("#service")).to_contain_text("accepting", timeout=10_000)
        assert status(operated)["accepting"] is True

        target = page.locator("table.consoles tbody tr").nth(0)
        console_id = target.get_attribute("data-console")
        target.get_by_role("button", name="End").click()
        expect(page.locator("table.consoles tbody tr")).to_have_count(1, timeout=10_000)
        # Which client held that console: the one that is now closed.
        assert wait_until(lambda: any(c.wait_closed(0.2) for c in clients), timeout=15)
        ended = next(c for c in clients if c.closed)
        assert "operator ended" in (ended.last_message("x") or ""), ended.messages[-3:]
        survivor = next(c for c in clients if not c.closed)
        assert "42" in survivor.run("print(6*7)", survivor.display().count("In [") + 1)
        assert console_id not in page.locator("table.consoles").inner_text()
    finally:
        for client in clients:
            client.close()
        context.close()
    assert [e for e in errors if "401" not in e] == []
