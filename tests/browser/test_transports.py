"""The console under every SockJS transport, in a real browser.

sockjs-client is forced (the console page's ``?transports=`` query) to one
transport at a time; a sandboxed IPython must work under each: output,
Ctrl-C and resizing.  The requests the page makes (from every frame) show
which transport really carried the session, and the page must run without
Content-Security-Policy violations, whatever frames and forms the transport
needs.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import expect

pytestmark = pytest.mark.browser

# sockjs-client's transport name -> the receiver requests it makes (the last
# segment of .../sockjs/<server>/<session>/<name>) and the pages it loads
TRANSPORTS = {
    "websocket": {"websocket"},
    "xhr-streaming": {"xhr_streaming"},
    "xhr-polling": {"xhr"},
    "eventsource": {"eventsource"},
    "iframe-htmlfile": {"htmlfile", "iframe.html"},
    "jsonp-polling": {"jsonp"},
}
SENDERS = {"xhr_send", "jsonp_send"}

SESSION_PATH = re.compile(r"/sockjs/[^/]+/[^/]+/([a-z_]+)$")
TERMINAL_SIZE = re.compile(r"os\.terminal_size\(columns=(\d+), lines=(\d+)\)")

# Reports violations of the policy of every frame (init scripts run in all
# of them, whatever their policy) where the test can read them.
REPORT_CSP_VIOLATIONS = """
document.addEventListener("securitypolicyviolation", function (event) {
  console.error("CSP violation: " + event.violatedDirective + " " + event.blockedURI);
});
"""


def transport_names(url: str) -> set[str]:
    """What a request URL says about the transport: a receiver or page name."""
    path = urlsplit(url).path
    if path.endswith("/iframe.html"):
        return {"iframe.html"}
    match = SESSION_PATH.search(path)
    return {match.group(1)} if match else set()


def run(page, rows, code: str, prompt: int) -> None:
    """Type one line of Python and wait for the prompt that follows it."""
    page.keyboard.type(code)
    page.keyboard.press("Enter")
    expect(rows).to_contain_text(f"In [{prompt}]:", timeout=20_000)


def terminal_size(rows) -> tuple[int, int]:
    """The last os.terminal_size(...) the terminal shows."""
    found = TERMINAL_SIZE.findall(rows.inner_text().replace("\n", ""))
    assert found, rows.inner_text()
    columns, lines = found[-1]
    return int(columns), int(lines)


@pytest.mark.parametrize("transport", list(TRANSPORTS))
def test_console_over_transport(browser, server, transport: str) -> None:
    """Under each transport: print(6*7) shows 42, Ctrl-C interrupts, resizing reaches the PTY."""
    context = browser.new_context(
        ignore_https_errors=True, viewport={"width": 1200, "height": 900}
    )
    context.add_init_script(REPORT_CSP_VIOLATIONS)
    page = context.new_page()
    errors: list[str] = []
    used: set[str] = set()
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on(
        "console",
        lambda message: errors.append(message.text)
        if "Content Security Policy" in message.text or "CSP violation" in message.text
        else None,
    )
    page.on("request", lambda request: used.update(transport_names(request.url)))
    page.on("websocket", lambda websocket: used.update(transport_names(websocket.url)))
    try:
        page.goto(f"{server.base_url}/console/?transports={transport}")
        try:
            expect(page.locator("body")).to_have_attribute("data-state", "ready", timeout=20_000)
        except AssertionError as failure:
            # a transport blocked by a policy fails as "all transports failed"
            raise AssertionError(f"{failure}\npage errors: {errors}") from None
        rows = page.locator(".xterm-rows")
        expect(rows).to_contain_text("In [1]:", timeout=20_000)

        # "%" sequences must arrive as printed (eventsource data goes through
        # decodeURI in sockjs-client).
        run(page, rows, "print(6*7, '100%zz%41')", 2)
        lines = [line.strip() for line in rows.inner_text().splitlines()]
        assert "42 100%zz%41" in lines, lines

        page.keyboard.type("while True: pass")
        page.keyboard.press("Enter")
        page.wait_for_timeout(300)
        page.keyboard.press("Control+c")
        expect(rows).to_contain_text("KeyboardInterrupt", timeout=10_000)
        expect(rows).to_contain_text("In [3]:", timeout=10_000)

        run(page, rows, "import os; os.get_terminal_size()", 4)
        before = terminal_size(rows)
        page.set_viewport_size({"width": 700, "height": 500})
        page.wait_for_timeout(300)
        run(page, rows, "os.get_terminal_size()", 5)
        after = terminal_size(rows)
        assert after[0] < before[0] and after[1] < before[1], (before, after)

        expect(page.locator("body")).to_have_attribute("data-state", "ready")
    finally:
        context.close()
    assert errors == []
    assert used - SENDERS == TRANSPORTS[transport], used
