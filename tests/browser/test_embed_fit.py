"""The embedded console on real host pages, in chromium against a real server.

Host pages (another origin) with a sticky header, a modal, a scrolling box,
200% zoom and right-to-left text: the console must take the sample's place in
the page's own flow and stacking, and give it back on Close. Keyboard-only use
from launch to Close, and what a site owner or visitor sees while the service
is paused, down or refuses the page's origin.
Screenshots are kept under the test's tmp directory (printed on failure).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO, free_port, start_server, wait_until
from playwright.sync_api import expect
from test_embed import LAUNCH, HostSite, box, own_problems

pytestmark = pytest.mark.browser

UIDS = 238000  # this module's range: 238000-238099


def styled(host: HostSite, path: str, service: str, head: str, body: str,
           html_attributes: str = "") -> str:
    """A host page with its own inline stylesheet and the embed script."""
    html = f"""<!doctype html>
<html lang="en" {html_attributes}><head><meta charset="utf-8"><title>Docs</title>
<style>body {{ margin: 0; font: 16px/1.5 sans-serif; }}
pre {{ margin: 12px 24px; padding: 8px; background: #eee; }}
{head}</style>
<script src="{service}/embed.js" defer></script></head>
<body>{body}</body></html>"""
    csp = (f"default-src 'none'; script-src {service}; connect-src {service}; "
           f"frame-src {service}; style-src 'unsafe-inline'")
    host.pages[path] = (html, csp)
    return host.origin + path


FILLER = "<p>Text.</p>" * 12


@pytest.fixture(scope="module")
def host():
    site = HostSite(free_port())
    yield site
    site.close()


@pytest.fixture(scope="module")
def stranger():
    site = HostSite(free_port())
    yield site
    site.close()


@pytest.fixture(scope="module")
def service(tmp_path_factory, host):
    srv = start_server(tmp_path_factory.mktemp("fit"), uid_min=UIDS, uid_max=UIDS + 19,
                       embed=f'host_origins = ["{host.origin}"]\nstatus_max_age = 0\n')
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def screens(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("screenshots")


def new_page(browser, **options):
    context = browser.new_context(ignore_https_errors=True, **options)
    page = context.new_page()
    page.problems = []
    page.on("pageerror", lambda e: page.problems.append(f"pageerror: {e}"))
    page.on("console", lambda m: m.type == "error" and page.problems.append(m.text))
    return page


@pytest.fixture
def page(browser):
    page = new_page(browser, viewport={"width": 1100, "height": 900})
    yield page
    page.context.close()


def launch(page):
    """Press the first launch button and wait for the console's prompt."""
    page.get_by_role("button", name=LAUNCH).first.click()
    console = page.frame_locator("iframe")
    expect(console.locator(".xterm-rows")).to_contain_text("In [1]:", timeout=20_000)
    return console


def top_element_id(page, x: float, y: float) -> str:
    """The id (or tag) of what the visitor sees at viewport point (x, y)."""
    return page.evaluate("([x, y]) => { const e = document.elementFromPoint(x, y);"
                         " return e ? (e.id || e.tagName.toLowerCase()) : ''; }", [x, y])


def test_in_flow_under_sticky_header_and_modal(page, host, service, screens):
    """The console takes the sample's place and width, pushes the text below down,
    scrolls under a sticky header, stays under a modal, and Close gives the space back."""
    url = styled(host, "/sticky", service.base_url,
                 "header { position: sticky; top: 0; z-index: 10; height: 60px;"
                 " background: #246; }"
                 "#modal { position: fixed; z-index: 100; left: 100px; top: 100px;"
                 " width: 300px; height: 200px; background: #fff; display: none; }"
                 "#modal.open { display: block; }",
                 '<header id="header">Docs</header><div id="modal">Dialog</div>'
                 f'{FILLER}<pre data-shellserver id="sample">print(1)</pre>'
                 f'<p id="after">After.</p>{FILLER * 3}')
    page.goto(url)
    sample = page.locator("#sample")
    after = page.locator("#after")
    expect(page.get_by_role("button", name=LAUNCH)).to_have_count(1, timeout=10_000)
    sx, sy, swidth, _ = box(sample)
    after_y = box(after)[1]
    launch(page)
    frame = page.locator("iframe")
    x, y, width, height = box(frame)
    assert (x, y, width) == (sx, sy, swidth)
    assert height >= 360
    expect(sample).to_be_hidden()
    # In flow: the text below moved down (its 16px margin collapses with the 12px).
    assert box(after)[1] == y + height + 16
    page.screenshot(path=str(screens / "sticky-open.png"), full_page=True)
    # Scrolled so that the frame's top is under the header: the header wins.
    page.evaluate(f"window.scrollTo(0, {y - 30})")
    wait_until(lambda: box(frame)[1] == 30, timeout=5)
    assert top_element_id(page, x + 50, 45) == "header"
    assert top_element_id(page, x + 50, 75) == "iframe"
    page.screenshot(path=str(screens / "sticky-scrolled.png"))
    # The host's own modal draws over the console.
    page.evaluate("document.getElementById('modal').className = 'open'")
    assert top_element_id(page, 200, 200) == "modal"
    page.evaluate("document.getElementById('modal').className = ''")
    page.get_by_role("button", name="Close").click()
    expect(frame).to_have_count(0)
    expect(sample).to_be_visible()
    page.evaluate("window.scrollTo(0, 0)")
    wait_until(lambda: box(after)[1] == after_y, timeout=5)
    assert box(after)[1] == after_y
    assert box(sample)[:3] == (sx, sy, swidth)
    assert own_problems(page) == []


def test_scrolls_with_its_box(page, host, service, screens):
    """In an overflow:auto box the console scrolls with the box and is clipped by it."""
    url = styled(host, "/scrollbox", service.base_url,
                 "#box { overflow: auto; height: 300px; margin: 20px; border: 2px solid; }",
                 '<div id="box"><p>Intro.</p>'
                 f'<pre data-shellserver id="sample">print(2)</pre>{FILLER * 2}</div>'
                 '<p id="below">Below the box.</p>')
    page.goto(url)
    expect(page.get_by_role("button", name=LAUNCH)).to_have_count(1, timeout=10_000)
    launch(page)
    frame = page.locator("iframe")
    x, y, _, _ = box(frame)
    page.evaluate("document.getElementById('box').scrollTop = 100")
    wait_until(lambda: box(frame)[1] == y - 100, timeout=5)
    assert box(frame)[1] == y - 100
    below = box(page.locator("#below"))
    assert top_element_id(page, x + 20, below[1] + 5) == "below"
    page.screenshot(path=str(screens / "scrollbox.png"))
    assert own_problems(page) == []


def test_zoom_200_and_rtl(browser, host, service, screens):
    """At 200% zoom (half the CSS viewport, twice the pixels) on a right-to-left
    page, the console has the sample's box and the page does not overflow."""
    url = styled(host, "/rtl", service.base_url,
                 "pre { margin-inline-start: 60px; }",
                 f'<p>مرحبا</p><pre data-shellserver id="sample">print(3)</pre>{FILLER}',
                 html_attributes='dir="rtl"')
    page = new_page(browser, viewport={"width": 550, "height": 450},
                    device_scale_factor=2)
    try:
        page.goto(url)
        expect(page.get_by_role("button", name=LAUNCH)).to_have_count(1, timeout=10_000)
        sample_box = box(page.locator("#sample"))
        launch(page)
        x, y, width, _ = box(page.locator("iframe"))
        assert (x, y, width) == sample_box[:3]
        assert sample_box[0] == 24  # RTL: the 60px inline-start margin is on the right
        assert page.evaluate("document.documentElement.scrollWidth") <= 550
        page.screenshot(path=str(screens / "zoom-rtl.png"))
        assert own_problems(page) == []
    finally:
        page.context.close()


def active(page) -> str:
    """What has keyboard focus on the host page: a button's text or a tag."""
    return page.evaluate("(() => { const e = document.activeElement;"
                         " return e.tagName === 'BUTTON' || e.tagName === 'A'"
                         " ? e.textContent.trim() : e.tagName.toLowerCase(); })()")


def test_keyboard_only_from_launch_to_close(page, host, service):
    """With the keyboard alone: Tab to the button, Enter, type, Tab completes in
    IPython, Escape then Tab reaches the console's own buttons and Tab leaves the
    frame, Escape then Shift-Tab reaches Close, Enter closes and focus is back on
    the launch button."""
    url = styled(host, "/keys", service.base_url, "",
                 '<a href="#top">Top</a><pre data-shellserver id="sample">x</pre>'
                 '<a href="#next">Next</a>')
    page.goto(url)
    expect(page.get_by_role("button", name=LAUNCH)).to_have_count(1, timeout=10_000)
    for _ in range(5):
        page.keyboard.press("Tab")
        if active(page) == LAUNCH:
            break
    assert active(page) == LAUNCH
    page.keyboard.press("Enter")
    console = page.frame_locator("iframe")
    rows = console.locator(".xterm-rows")
    expect(rows).to_contain_text("In [1]:", timeout=20_000)
    expect(console.locator("#keys-hint")).to_have_text("Esc then Tab leaves the console")
    page.keyboard.type("impor")
    page.keyboard.press("Tab")  # IPython completes: Tab alone stays in the terminal
    expect(rows).to_contain_text("In [1]: import", timeout=10_000)
    assert active(page) == "iframe"
    page.keyboard.press("Escape")
    page.keyboard.press("Tab")
    expect(console.locator("#screen-reader")).to_be_focused()
    page.keyboard.press("Tab")  # the last thing in the frame: on to the host page
    wait_until(lambda: active(page) == "Next", timeout=5)
    assert active(page) == "Next"
    # Back in with the mouse-free path: Shift-Tab into the frame, then out backwards.
    page.keyboard.press("Shift+Tab")
    expect(console.locator("#screen-reader")).to_be_focused()
    console.locator(".xterm-helper-textarea").focus()
    page.keyboard.press("Escape")
    page.keyboard.press("Shift+Tab")
    wait_until(lambda: active(page) == "Close", timeout=5)
    assert active(page) == "Close"
    page.keyboard.press("Enter")
    expect(page.locator("iframe")).to_have_count(0)
    assert active(page) == LAUNCH
    assert own_problems(page) == []


def test_buttons_appear_after_service_resumes(page, host, service):
    """A page loaded while consoles are paused gets its buttons once the kill
    switch is off again, without a reload."""
    url = styled(host, "/resume", service.base_url, "",
                 '<pre data-shellserver id="sample">print(4)</pre>')
    switch = service.state_dir / "kill-switch"
    switch.write_text("")
    try:
        assert wait_until(lambda: b"switched-off" in service.get("/status").read(),
                          timeout=10)
        with page.expect_response(lambda r: r.url.endswith("/status")) as status:
            page.goto(url)
        assert status.value.json()["accepting"] is False
        with page.expect_response(lambda r: r.url.endswith("/status"), timeout=10_000):
            pass  # it asks again by itself
        expect(page.get_by_role("button", name=LAUNCH)).to_have_count(0)
    finally:
        switch.unlink()
    expect(page.get_by_role("button", name=LAUNCH)).to_have_count(1, timeout=30_000)
    assert own_problems(page) == []


def test_refused_origin_warns_the_site_owner(page, stranger, service):
    """A page whose origin is not in embed.host_origins gets no button and a
    console warning naming the setting."""
    url = styled(stranger, "/stranger", service.base_url, "",
                 '<pre data-shellserver id="sample">print(5)</pre>')
    with page.expect_console_message(lambda m: "embed.host_origins" in m.text,
                                     timeout=10_000) as message:
        page.goto(url)
    assert message.value.type == "warning"
    assert stranger.origin in message.value.text
    expect(page.get_by_role("button", name=LAUNCH)).to_have_count(0)


def test_new_console_while_service_is_down(page, tmp_path):
    """"New console" while the service is down explains in the status line
    instead of replacing the page with the browser's error page."""
    server = start_server(tmp_path, uid_min=UIDS + 40, uid_max=UIDS + 59)
    try:
        page.goto(server.base_url + "/console/")
        expect(page.locator("body")).to_have_attribute("data-state", "ready",
                                                       timeout=20_000)
    finally:
        server.stop()
    expect(page.locator("#new-console")).to_be_visible(timeout=20_000)
    page.click("#new-console")
    expect(page.locator("#status-text")).to_contain_text("cannot be reached",
                                                         timeout=10_000)
    assert page.url == server.base_url + "/console/"
    expect(page.locator("#new-console")).to_be_enabled()


AXE = REPO / "web" / "node_modules" / "axe-core" / "axe.min.js"


def serious_violations(frame) -> list[str]:
    """axe-core's serious and critical findings on a page or frame.

    axe is evaluated through the DevTools protocol, which the pages' strict
    CSPs do not govern, so no page needs to allow it."""
    frame.evaluate(AXE.read_text())
    found = frame.evaluate("axe.run(document).then(r => r.violations.map(v =>"
                           " [v.impact, v.id, v.nodes.map(n => n.target.join(' '))"
                           ".join(', ')]))")
    return [f"{impact} {rule}: {nodes}" for impact, rule, nodes in found
            if impact in ("serious", "critical")]


def test_axe_demo_console_refused_and_host_pages(page, host, service):
    """axe-core finds nothing serious or critical on the demo page, the console
    (alone and embedded), the refused page and a host page."""
    page.goto(service.base_url + "/")
    assert serious_violations(page) == []
    page.goto(service.base_url + "/console/")
    expect(page.locator("body")).to_have_attribute("data-state", "ready", timeout=20_000)
    assert serious_violations(page) == []
    url = styled(host, "/axe", service.base_url, "",
                 '<main><h1>Docs</h1><pre data-shellserver id="sample">print(7)</pre></main>')
    page.goto(url)
    expect(page.get_by_role("button", name=LAUNCH)).to_have_count(1, timeout=10_000)
    assert serious_violations(page) == []
    launch(page)
    assert serious_violations(page) == []
    embedded = page.frames[1]
    assert serious_violations(embedded) == []
    switch = service.state_dir / "kill-switch"
    switch.write_text("")
    try:
        assert wait_until(lambda: b"switched-off" in service.get("/status").read(),
                          timeout=10)
        response = page.goto(service.base_url + "/console/")
        assert response.status == 503
        assert serious_violations(page) == []
    finally:
        switch.unlink()
        assert wait_until(lambda: b'"accepting":true' in service.get("/status").read(),
                          timeout=10)


def test_screen_reader_mode_toggle_is_remembered(page, service):
    """The Screen reader button turns xterm.js's screen-reader mode on (output
    reaches the accessibility tree) and a new console remembers the choice."""
    page.goto(service.base_url + "/console/")
    expect(page.locator("body")).to_have_attribute("data-state", "ready", timeout=20_000)
    expect(page.locator("#key-bar")).to_be_hidden()  # a mouse, not a finger
    toggle = page.get_by_role("button", name="Screen reader")
    expect(toggle).to_have_attribute("aria-pressed", "false")
    expect(page.locator(".xterm-accessibility-tree")).to_have_count(0)
    toggle.click()
    expect(toggle).to_have_attribute("aria-pressed", "true")
    page.locator(".xterm-helper-textarea").focus()
    page.keyboard.type("print(6*7)")
    page.keyboard.press("Enter")
    expect(page.locator(".xterm-accessibility-tree")).to_contain_text("42", timeout=20_000)
    page.goto(service.base_url + "/console/")
    expect(page.locator("body")).to_have_attribute("data-state", "ready", timeout=20_000)
    expect(toggle).to_have_attribute("aria-pressed", "true")
    expect(page.locator(".xterm-accessibility-tree")).to_have_count(1)


def test_touch_key_bar_sends_tab_and_ctrl_c(browser, service):
    """On a 390x844 touch screen the key bar sends Tab (IPython completes) and
    Ctrl-C (interrupts a running command), and the status line is not cut off."""
    page = new_page(browser, viewport={"width": 390, "height": 844}, has_touch=True,
                    is_mobile=True, device_scale_factor=3)
    try:
        page.goto(service.base_url + "/console/")
        expect(page.locator("body")).to_have_attribute("data-state", "ready",
                                                       timeout=20_000)
        bar = page.get_by_role("toolbar", name="Terminal keys")
        expect(bar).to_be_visible()
        rows = page.locator(".xterm-rows")
        expect(rows).to_contain_text("In [1]:", timeout=20_000)
        status = page.locator("#status-text")
        assert page.evaluate("(e => e.scrollWidth <= e.clientWidth)"
                             "(document.getElementById('status-text'))")
        x, _, width, _ = box(status)
        assert 0 <= x and x + width <= 390
        page.keyboard.type("impor")
        bar.get_by_role("button", name="Tab").tap()
        expect(rows).to_contain_text("In [1]: import", timeout=10_000)
        page.keyboard.type(" time; time.sleep(60)")
        page.keyboard.press("Enter")
        expect(rows).not_to_contain_text("In [2]:", timeout=2_000)
        bar.get_by_role("button", name="Control C").tap()
        expect(rows).to_contain_text("KeyboardInterrupt", timeout=10_000)
        expect(rows).to_contain_text("In [2]:", timeout=10_000)
        assert own_problems(page) == []
    finally:
        page.context.close()


def test_run_the_sample(page, host, service):
    """With data-run-sample, the sample's input lines (prompts stripped) are
    pasted at the first prompt, not run until Enter."""
    url = styled(host, "/run", service.base_url, "",
                 '<pre data-shellserver data-run-sample id="sample">'
                 '&gt;&gt;&gt; x = 6 * 7\n&gt;&gt;&gt; print(x + 0)\n42</pre>'
                 '<pre data-shellserver id="plain">print("plain")</pre>')
    page.goto(url)
    expect(page.get_by_role("button", name=LAUNCH)).to_have_count(2, timeout=10_000)
    console = launch(page)
    rows = console.locator(".xterm-rows")
    expect(rows).to_contain_text("print(x + 0)", timeout=10_000)
    assert "In [2]:" not in rows.inner_text()  # pasted, not run
    page.keyboard.press("Enter")
    expect(rows).to_contain_text("In [2]:", timeout=20_000)
    lines = [line.strip() for line in rows.inner_text().splitlines()]
    assert "42" in lines
    page.get_by_role("button", name="Close").click()
    # A sample without the attribute starts an empty console.
    page.get_by_role("button", name=LAUNCH).nth(1).click()
    rows = page.frame_locator("iframe").locator(".xterm-rows")
    expect(rows).to_contain_text("In [1]:", timeout=20_000)
    page.keyboard.type("1+1")  # what the visitor types comes first and alone
    page.keyboard.press("Enter")
    expect(rows).to_contain_text("Out[1]: 2", timeout=20_000)
    assert "plain" not in rows.inner_text()


def test_light_theme_font_size_and_links(page, host, service):
    """data-theme="light" and data-font-size reach the console (readable: no axe
    violation), and a URL in the output opens in a new tab when clicked."""
    linked = host.add("/linked", "<!doctype html><title>Linked</title><p>here</p>",
                      service.base_url)
    html = (f'<!doctype html><html lang="en"><head><title>Look</title>'
            f'<script src="{service.base_url}/embed.js" data-theme="light"'
            f' data-font-size="18" defer></script></head>'
            f'<body><pre data-shellserver>print(1)</pre></body></html>')
    url = host.add("/look", html, service.base_url)
    page.goto(url)
    expect(page.get_by_role("button", name=LAUNCH)).to_have_count(1, timeout=10_000)
    console = launch(page)
    expect(console.locator("body")).to_have_attribute("data-theme", "light")
    rows = console.locator(".xterm-rows")
    assert rows.evaluate("e => getComputedStyle(e).fontSize") == "18px"
    background = console.locator(".xterm-viewport").evaluate(
        "e => getComputedStyle(e).backgroundColor")
    assert background == "rgb(251, 251, 253)"
    page.keyboard.type(f"print({linked!r})")
    page.keyboard.press("Enter")
    expect(rows).to_contain_text("In [2]:", timeout=20_000)
    assert serious_violations(page.frames[1]) == []
    line = rows.locator("div").filter(has_text=linked).last
    x, y, _, height = box(line)
    page.mouse.move(x + 40, y + height / 2)
    with page.expect_popup(timeout=10_000) as popup:
        page.mouse.click(x + 40, y + height / 2)
    popup.value.wait_for_url(linked, timeout=10_000)  # opened blank, then sent there
    assert popup.value.url == linked


def test_theme_follows_prefers_color_scheme(browser, service):
    """Without a host choice, the console follows the visitor's colour scheme."""
    for scheme in ("light", "dark"):
        page = new_page(browser, color_scheme=scheme)
        try:
            page.goto(service.base_url + "/console/")
            expect(page.locator("body")).to_have_attribute("data-theme", scheme)
        finally:
            page.context.close()
