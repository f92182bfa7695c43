"""The whole flow in a real browser against the real server.

Debian's chromium, driven by Playwright, loads the demo page from a real
`twistd shellserver` over TLS, clicks "Launch interactive shell", types into
the sandboxed IPython and reads the terminal as the user sees it.
"""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

pytestmark = pytest.mark.browser

@pytest.fixture
def page(browser):
    # The server's certificate is self-signed for this run.
    context = browser.new_context(ignore_https_errors=True,
                                  viewport={"width": 1200, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    yield page
    context.close()
    assert errors == []


def test_launch_and_print(page, server):
    """Click the launch button, type print(6*7), and see 42 in the terminal."""
    page.goto(server.base_url + "/")
    page.get_by_role("button", name="Launch interactive shell").click()
    console = page.frame_locator("iframe")
    expect(console.locator("body")).to_have_attribute("data-state", "ready",
                                                      timeout=20_000)
    rows = console.locator(".xterm-rows")
    expect(rows).to_contain_text("In [1]:", timeout=20_000)
    page.keyboard.type("print(6*7)")
    page.keyboard.press("Enter")
    expect(rows).to_contain_text("In [2]:", timeout=20_000)
    lines = [line.strip() for line in rows.inner_text().splitlines()]
    assert "42" in lines, lines


def test_exit_shows_ended_and_new_console(page, server):
    """`exit` shows the ended state with a New console button that works."""
    page.goto(server.base_url + "/console/")
    expect(page.locator("body")).to_have_attribute("data-state", "ready",
                                                   timeout=20_000)
    expect(page.locator(".xterm-rows")).to_contain_text("In [1]:", timeout=20_000)
    page.keyboard.type("exit")
    page.keyboard.press("Enter")
    expect(page.locator("body")).to_have_attribute("data-state", "ended",
                                                   timeout=20_000)
    expect(page.get_by_text("The console has exited.")).to_be_visible()
    page.get_by_role("button", name="New console").click()
    expect(page.locator("body")).to_have_attribute("data-state", "ready",
                                                   timeout=20_000)
    expect(page.locator(".xterm-rows")).to_contain_text("In [1]:", timeout=20_000)


def test_ctrl_c_in_the_browser(page, server):
    """Ctrl-C typed in the browser interrupts a running loop."""
    page.goto(server.base_url + "/console/")
    rows = page.locator(".xterm-rows")
    expect(rows).to_contain_text("In [1]:", timeout=20_000)
    page.keyboard.type("while True: pass")
    page.keyboard.press("Enter")
    page.wait_for_timeout(500)
    page.keyboard.press("Control+c")
    expect(rows).to_contain_text("KeyboardInterrupt", timeout=10_000)
    expect(rows).to_contain_text("In [2]:", timeout=10_000)
