"""The browser pages on their own: console page and demo page in real Chromium.

The pages are served from web/ by a small loopback HTTP server (standard
library only) that also plays a fake console over SockJS's xhr-streaming
transport, so the page's side of docs/protocol.md is checked without the
real shellserver. The end-to-end test against the real server lives
elsewhere.
"""

from __future__ import annotations

import html
import json
import queue
import re
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Browser, ConsoleMessage, Frame, Page

import playwright.sync_api as playwright_sync  # noqa: E402 - after the TYPE_CHECKING block

pytestmark = pytest.mark.browser

WEB = Path(__file__).resolve().parents[2] / "web"
NODE_MODULES = WEB / "node_modules"

# The mapping the real server makes from /static/vendor/ into node_modules.
VENDOR_FILES = {
    "xterm.js": NODE_MODULES / "@xterm/xterm/lib/xterm.js",
    "xterm.css": NODE_MODULES / "@xterm/xterm/css/xterm.css",
    "addon-fit.js": NODE_MODULES / "@xterm/addon-fit/lib/addon-fit.js",
    "addon-web-links.js": NODE_MODULES / "@xterm/addon-web-links/lib/addon-web-links.js",
    "addon-serialize.js": NODE_MODULES / "@xterm/addon-serialize/lib/addon-serialize.js",
    "sockjs.min.js": NODE_MODULES / "sockjs-client/dist/sockjs.min.js",
}

# The policy the real server sets on both pages; a violation fails a test.
# xterm.js writes its theme and cell sizes into <style> elements it creates at
# run time (no nonce support), hence 'unsafe-inline' for styles, not scripts.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "connect-src 'self'; img-src 'self'; frame-src 'self'; "
    "base-uri 'none'; form-action 'none'"
)

GOOD_TOKEN = 'test-token-<&">'  # also checks the attribute escaping round trip
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}
CONSOLE_PAGES = {
    # path: (token rendered into the page, SockJS URL path)
    "/console/": (GOOD_TOKEN, "/sockjs"),
    "/console-bad-token/": ("stale-token", "/sockjs"),
    "/console-no-server/": (GOOD_TOKEN, "/missing-sockjs"),
}
SESSION_PATH = re.compile(r"^/sockjs/[^/.]+/([^/.]+)/(xhr_streaming|xhr_send)$")


class FakeConsole:
    """One fake console session: a line-echoing "Python" behind the protocol."""

    def __init__(self) -> None:
        self.received: list[str] = []
        self.outgoing: queue.Queue[tuple[str, object]] = queue.Queue()
        self._line = ""

    def _send(self, message: str) -> None:
        self.outgoing.put(("message", message))

    def _close(self, code: int, reason: str) -> None:
        self.outgoing.put(("close", [code, reason]))

    def message_received(self, message: str) -> None:
        self.received.append(message)
        if len(self.received) == 1:
            if message != "a" + GOOD_TOKEN:
                self._send("eThis console link has expired. Start a new one.")
                self._close(4001, "This console link has expired. Start a new one.")
                return
            self._send("sstarting")
            self._send("sready")
            self._send("oFake Python 3\r\n>>> ")
            return
        kind, payload = message[0], message[1:]
        if kind != "i":
            return
        for char in payload:
            if char == "\r":
                self._line_entered()
            else:
                self._line += char
                self._send("o" + char)

    def _line_entered(self) -> None:
        line, self._line = self._line, ""
        if line == "exit()":
            self._send("xPython exited. Goodbye!")
            self._close(3000, "Python exited. Goodbye!")
        else:
            self._send(f"o\r\nyou typed: {line}\r\n>>> ")


class PageServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), PageRequestHandler)
        self.sessions: dict[str, FakeConsole] = {}
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def session(self, session_id: str) -> FakeConsole:
        with self.lock:
            return self.sessions.setdefault(session_id, FakeConsole())

    def all_sessions(self) -> list[FakeConsole]:
        with self.lock:
            return list(self.sessions.values())


class PageRequestHandler(BaseHTTPRequestHandler):
    server: PageServer

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _respond(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        if content_type.startswith("text/html"):
            self.send_header("Content-Security-Policy", CSP)
        self.end_headers()
        self.wfile.write(body)

    def _not_found(self) -> None:
        self._respond(404, b"not found", "text/plain")

    def _file(self, path: Path) -> None:
        content_type = CONTENT_TYPES.get(path.suffix, "application/octet-stream")
        self._respond(200, path.read_bytes(), content_type)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/":
            self._file(WEB / "index.html")
        elif path in CONSOLE_PAGES:
            token, sockjs_path = CONSOLE_PAGES[path]
            page = (WEB / "console.html").read_text("utf-8")
            page = page.replace("{{token}}", html.escape(token, quote=True))
            page = page.replace(
                "{{sockjs_url}}", html.escape(self.server.url + sockjs_path, quote=True)
            )
            self._respond(200, page.encode("utf-8"), CONTENT_TYPES[".html"])
        elif path.startswith("/static/vendor/"):
            vendor = VENDOR_FILES.get(path.removeprefix("/static/vendor/"))
            if vendor:
                self._file(vendor)
            else:
                self._not_found()
        elif path.startswith("/static/"):
            static = (WEB / "static").resolve()
            target = (static / path.removeprefix("/static/")).resolve()
            if target.is_relative_to(static) and target.is_file():
                self._file(target)
            else:
                self._not_found()
        elif path == "/sockjs/info":
            info = {
                "websocket": False,
                "cookie_needed": False,
                "origins": ["*:*"],
                "entropy": 42,
            }
            self._respond(200, json.dumps(info).encode(), "application/json")
        elif path.startswith("/missing-sockjs/"):
            time.sleep(0.5)  # long enough for a test to see "connecting"
            self._not_found()
        else:
            self._not_found()

    def do_POST(self) -> None:
        match = SESSION_PATH.match(self.path.split("?", 1)[0])
        if not match:
            self._not_found()
            return
        session = self.server.session(match.group(1))
        if match.group(2) == "xhr_send":
            length = int(self.headers.get("Content-Length", "0"))
            for message in json.loads(self.rfile.read(length)):
                session.message_received(message)
            self.send_response(204)
            self.end_headers()
        else:
            self._stream(session)

    def _stream(self, session: FakeConsole) -> None:
        """SockJS xhr-streaming: a prelude, then one frame per line until close."""
        self.send_response(200)
        self.send_header("Content-Type", "application/javascript; charset=UTF-8")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()  # HTTP/1.0: the body ends when the connection does
        self.wfile.write(b"h" * 2048 + b"\n" + b"o\n")
        self.wfile.flush()
        while True:
            try:
                kind, value = session.outgoing.get(timeout=20)
            except queue.Empty:
                kind, value = "heartbeat", None
            if kind == "message":
                frame = "a" + json.dumps([value])
            elif kind == "close":
                frame = "c" + json.dumps(value)
            else:
                frame = "h"
            self.wfile.write(frame.encode("utf-8") + b"\n")
            self.wfile.flush()
            if kind == "close":
                return


@pytest.fixture(scope="module")
def page_server() -> Iterator[PageServer]:
    missing = [str(path) for path in VENDOR_FILES.values() if not path.is_file()]
    if missing:
        pytest.skip(f"run `npm ci` in web/ first; missing {', '.join(missing)}")
    server = PageServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


class PageProblems:
    """Collects uncaught errors and CSP violations reported by a page."""

    def __init__(self, page: Page) -> None:
        self.errors: list[str] = []
        page.on("pageerror", lambda error: self.errors.append(str(error)))
        page.on("console", self._console)

    def _console(self, message: ConsoleMessage) -> None:
        if "Content Security Policy" in message.text:
            self.errors.append(message.text)


@pytest.fixture
def browser_page(browser: Browser) -> Iterator[tuple[Page, PageProblems]]:
    context = browser.new_context(viewport={"width": 1100, "height": 800})
    page = context.new_page()
    page.set_default_timeout(10_000)
    problems = PageProblems(page)
    yield page, problems
    context.close()


def wait_for_state(page_or_frame: Page | Frame, state: str) -> None:
    page_or_frame.wait_for_selector(f'body[data-state="{state}"]', state="attached")


def screen_text(page_or_frame: Page | Frame) -> str:
    return page_or_frame.inner_text(".xterm-rows")


def test_console_speaks_the_protocol_and_ends(browser_page, page_server):
    """The console page authenticates, sizes, echoes typing and ends on `x`."""
    page, problems = browser_page
    page.goto(page_server.url + "/console/?transports=xhr-streaming")
    wait_for_state(page, "ready")

    [session] = page_server.all_sessions()
    assert session.received[0] == "a" + GOOD_TOKEN
    assert re.fullmatch(r"r\d+,\d+", session.received[1])
    assert page.evaluate(
        "document.activeElement.classList.contains('xterm-helper-textarea')"
    )
    assert page.inner_text("#status-text").startswith("Ready")
    assert page.is_hidden("#new-console")

    page.keyboard.type("6*7")
    page.keyboard.press("Enter")
    playwright_sync.expect(page.locator(".xterm-rows")).to_contain_text(
        "you typed: 6*7"
    )
    assert "Fake Python 3" in screen_text(page)
    assert "i6" in session.received

    page.keyboard.type("exit()")
    page.keyboard.press("Enter")
    wait_for_state(page, "ended")
    assert page.inner_text("#status-text") == "Python exited. Goodbye!"
    assert page.is_visible("#new-console")

    page.click("#new-console")  # a reload: a new page, a new session
    wait_for_state(page, "ready")
    assert len(page_server.all_sessions()) == 2
    assert problems.errors == []


def test_console_reports_resize(browser_page, page_server):
    """A bigger window refits the terminal and sends the new size as `r`."""
    page, problems = browser_page
    page.set_viewport_size({"width": 600, "height": 400})
    page.goto(page_server.url + "/console/?transports=xhr-streaming")
    wait_for_state(page, "ready")
    session = page_server.all_sessions()[-1]
    first = session.received[1]

    page.set_viewport_size({"width": 1200, "height": 800})
    page.wait_for_function(
        "() => document.querySelector('.xterm-screen').offsetWidth > 1000"
    )
    deadline = time.monotonic() + 5
    while len([m for m in session.received if m.startswith("r")]) < 2:
        assert time.monotonic() < deadline, session.received
        time.sleep(0.05)
    sizes = [m for m in session.received if m.startswith("r")]
    old_cols, old_rows = map(int, first[1:].split(","))
    new_cols, new_rows = map(int, sizes[-1][1:].split(","))
    assert new_cols > old_cols and new_rows > old_rows
    assert problems.errors == []


def test_console_shows_server_error(browser_page, page_server):
    """An `e` message puts the page in "error" with the server's message."""
    page, problems = browser_page
    page.goto(page_server.url + "/console-bad-token/?transports=xhr-streaming")
    wait_for_state(page, "error")
    assert (
        page.inner_text("#status-text")
        == "This console link has expired. Start a new one."
    )
    assert page.is_visible("#new-console")
    assert problems.errors == []


def test_console_without_server_goes_from_connecting_to_error(
    browser_page, page_server
):
    """With no SockJS endpoint the page shows "connecting", then "error"."""
    page, problems = browser_page
    page.goto(page_server.url + "/console-no-server/", wait_until="domcontentloaded")
    wait_for_state(page, "connecting")
    assert page.inner_text("#status-text") == "Connecting…"
    assert page.is_hidden("#new-console")
    wait_for_state(page, "error")
    assert page.inner_text("#status-text").startswith(
        "Could not reach the console server"
    )
    assert page.is_visible("#new-console")
    assert page.locator(".xterm-screen").is_visible()
    assert problems.errors == []


def test_demo_launch_covers_sample_and_close_restores_it(browser_page, page_server):
    """Launch puts a focused console iframe over the sample; Close restores it."""
    page, problems = browser_page
    page.goto(page_server.url + "/")
    sample = page.locator("[data-console-sample] pre")
    sample_box = sample.bounding_box()
    assert page.locator("iframe").count() == 0

    page.click("text=Launch interactive shell")
    frame_element = page.wait_for_selector("iframe.console-frame")
    assert frame_element.get_attribute("src") == "console/"
    frame = frame_element.content_frame()
    wait_for_state(frame, "ready")

    frame_box = frame_element.bounding_box()
    assert frame_box["x"] == pytest.approx(sample_box["x"], abs=1)
    assert frame_box["y"] == pytest.approx(sample_box["y"], abs=1)
    assert frame_box["width"] == pytest.approx(sample_box["width"], abs=1)
    assert frame_box["height"] >= max(sample_box["height"], 20 * 16)
    assert not sample.is_visible()
    size = page_server.all_sessions()[-1].received[1]
    assert int(size.split(",")[1]) >= 20, size
    assert page.evaluate("document.activeElement.tagName") == "IFRAME"
    assert frame.evaluate(
        "document.activeElement.classList.contains('xterm-helper-textarea')"
    )

    page.click("text=Close")
    assert page.locator("iframe").count() == 0
    assert sample.is_visible()
    assert sample.bounding_box() == sample_box
    assert page.evaluate("document.activeElement.hasAttribute('data-console-launch')")
    assert problems.errors == []
