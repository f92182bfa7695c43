"""The admin page: live charts of the last hour and the operator's controls.

It has a listener of its own (``--admin ENDPOINT``, off unless given; keep it
on loopback or an internal network) and one secret: a token generated into
the state directory (``admin-token``, mode 0600). Every request for data or
an action carries it as ``Authorization: Bearer``; the page asks for it once
and keeps it in the tab's sessionStorage. There is no cookie, so no other
site can make a browser act with it (no CSRF); actions are POSTs that must
also come from the page's own origin. Wrong tokens are refused (401) and
counted per address: past a few a minute, that address is refused (429).

What is shown and what the buttons do goes through two small interfaces,
L{IAdminNodes} (the nodes to show) and L{IAdminControls} (the controls).
L{LocalNode} implements both for this server alone;
shellserver.cluster.admin's L{ClusterNodes} over every live node of a
cluster (docs/operations.md, "Admin page"). Their answers may be Deferreds.
"""

from __future__ import annotations

import hmac
import json
import os
import secrets
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
from attrs import define, field, frozen
from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from zope.interface import Attribute, Interface, implementer

from shellserver.metrics import REFUSAL_REASONS, START_SOURCES

if TYPE_CHECKING:
    from shellserver.admission import Admission, KillSwitch
    from shellserver.console import ConsoleFactory
    from shellserver.metrics import Metrics

log = Logger()

TOKEN_FILE = "admin-token"
TOKEN_BYTES = 32
# A sample every few seconds, an hour of them.
SAMPLE_INTERVAL = 5.0
SAMPLES_KEPT = 720
# Wrong tokens an address may present per minute before it is refused for
# the rest of that minute; how many addresses are tracked at once (past it,
# all others share one count, so a flood cannot grow the table).
FAILURES_PER_MINUTE = 5
FAILURE_WINDOW = 60.0
MAX_TRACKED = 10000
MAX_BODY = 4096

# Only the page's own files: no inline script or style, no other origin,
# never framed (a framed admin page could be clicked on by another site).
ADMIN_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
ADMIN_STATIC = {
    b"admin.js": ("static", "admin.js"),
    b"admin.css": ("static", "admin.css"),
}


class AdminTokenError(Exception):
    """The admin token file cannot be used."""


class ControlUnavailable(Exception):
    """A control cannot act now (the cluster's Redis is down): the page
    shows the message (503)."""


def load_or_create_token(path: str) -> str:
    """The admin token in ``path``, created (random, mode 0600) if absent.

    @raise AdminTokenError: the file is readable by group or others, is
        empty, or cannot be read or written.
    """
    try:
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                                 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(descriptor, "w") as file:
                file.write(secrets.token_urlsafe(TOKEN_BYTES) + "\n")
            log.info("admin page: created its token in {path}", path=path)
        mode = os.stat(path).st_mode
        if mode & 0o077:
            raise AdminTokenError(
                f"{path}: the admin token must be readable by its owner only "
                f"(mode 0600), not {mode & 0o777:04o}")
        with open(path) as file:
            token = file.read().strip()
    except OSError as e:
        raise AdminTokenError(f"{path}: {e.strerror or e}") from e
    if not token:
        raise AdminTokenError(f"{path}: the admin token file is empty (remove it to make "
                              "a new one)")
    return token


# -- samples -----------------------------------------------------------------


@frozen
class Readings:
    """The server's counters and the host's usage at one moment (cumulative
    counters; the ring turns them into rates)."""

    time: float
    active: int
    capacity: int
    started: float
    start_seconds: float  # the start-time histogram's sum
    refused: dict[str, float]
    memory_used: int  # bytes
    memory_total: int
    cpu_busy: int  # /proc/stat jiffies, all cores
    cpu_total: int
    cpu_cores: int
    # What the consoles may hold at most: capacity x the per-console limit.
    memory_for_capacity: int = 0


def memory_from_meminfo(text: str) -> tuple[int, int]:
    """(used, total) bytes from /proc/meminfo: used is MemTotal - MemAvailable."""
    values = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name in ("MemTotal", "MemAvailable"):
            values[name] = int(rest.split()[0]) * 1024
    total = values.get("MemTotal", 0)
    return total - values.get("MemAvailable", total), total


def cpu_from_stat(text: str) -> tuple[int, int, int]:
    """(busy, total) jiffies of all cores, and the number of cores, from /proc/stat."""
    busy = total = cores = 0
    for line in text.splitlines():
        fields = line.split()
        if not fields:
            continue
        if fields[0] == "cpu":
            counts = [int(value) for value in fields[1:]]
            total = sum(counts[:8])  # guest time is already in user time
            idle = counts[3] + (counts[4] if len(counts) > 4 else 0)  # idle + iowait
            busy = total - idle
        elif fields[0].startswith("cpu"):
            cores += 1
    return busy, total, max(cores, 1)


def read_proc(name: str) -> str:
    with open(f"/proc/{name}") as file:
        return file.read()


def local_readings(clock: IReactorTime, metrics: Metrics, admission: Admission,
                   read: Callable[[str], str] = read_proc, *,
                   memory_per_console: int = 0) -> Readings:
    """What this server's metrics and the host's /proc say now;
    ``memory_per_console`` is sandbox.memory_mb in bytes."""
    memory_used, memory_total = memory_from_meminfo(read("meminfo"))
    cpu_busy, cpu_total, cores = cpu_from_stat(read("stat"))
    started = sum(metrics.value("shellserver_consoles_started_total", source=source)
                  for source in START_SOURCES)
    start_seconds = sum(metrics.value("shellserver_console_start_seconds_sum", source=source)
                        for source in START_SOURCES)
    refused = {reason: metrics.value("shellserver_consoles_refused_total", reason=reason)
               for reason in REFUSAL_REASONS}
    return Readings(time=clock.seconds(), active=admission.active,
                    capacity=admission.capacity, started=started,
                    start_seconds=start_seconds, refused=refused,
                    memory_used=memory_used, memory_total=memory_total,
                    cpu_busy=cpu_busy, cpu_total=cpu_total, cpu_cores=cores,
                    memory_for_capacity=admission.capacity * memory_per_console)


@frozen
class Sample:
    """One point of the charts."""

    time: float
    active: int
    capacity: int
    starts_per_minute: float | None  # None: no previous readings to compare
    refused_per_minute: dict[str, float | None]
    start_latency: float | None  # mean seconds of the starts since the last sample
    memory_used_mb: float
    memory_total_mb: float
    cpu_used: float | None  # cores busy on average since the last sample
    cpu_cores: int
    memory_for_capacity_mb: float = 0.0


def _per_minute(before: float, after: float, seconds: float) -> float:
    # A counter that went down (a new registry) counts from zero.
    return max(0.0, after - before) * 60.0 / seconds


def sample_between(previous: Readings | None, now: Readings) -> Sample:
    """The chart point for ``now`` (pure): rates since ``previous``."""
    starts = latency = cpu = None
    refused: dict[str, float | None] = dict.fromkeys(now.refused)
    if previous is not None and now.time > previous.time:
        seconds = now.time - previous.time
        starts = _per_minute(previous.started, now.started, seconds)
        refused = {reason: _per_minute(previous.refused.get(reason, 0.0), count, seconds)
                   for reason, count in now.refused.items()}
        new_starts = now.started - previous.started
        if new_starts > 0:
            latency = (now.start_seconds - previous.start_seconds) / new_starts
        jiffies = now.cpu_total - previous.cpu_total
        if jiffies > 0:
            cpu = now.cpu_cores * (now.cpu_busy - previous.cpu_busy) / jiffies
    return Sample(time=now.time, active=now.active, capacity=now.capacity,
                  starts_per_minute=starts, refused_per_minute=refused,
                  start_latency=latency, memory_used_mb=now.memory_used / 2**20,
                  memory_total_mb=now.memory_total / 2**20, cpu_used=cpu,
                  cpu_cores=now.cpu_cores,
                  memory_for_capacity_mb=now.memory_for_capacity / 2**20)


@define
class SampleRing:
    """The last ``size`` samples, one taken at each L{take} (a TimerService
    calls it every SAMPLE_INTERVAL seconds): bounded, in memory."""

    _read: Callable[[], Readings]
    size: int = SAMPLES_KEPT
    _samples: deque[Sample] = field(init=False)
    _previous: Readings | None = field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        self._samples = deque(maxlen=self.size)

    def take(self) -> None:
        try:
            now = self._read()
        except (OSError, ValueError, IndexError) as e:
            log.warn("admin page: no sample this time ({error})", error=str(e))
            return
        self._samples.append(sample_between(self._previous, now))
        self._previous = now

    def __len__(self) -> int:
        return len(self._samples)

    def latest(self) -> Sample | None:
        return self._samples[-1] if self._samples else None

    def columns(self) -> dict:
        """The samples as columns (L{sample_columns})."""
        return sample_columns(list(self._samples))


def _rounded(value: Any) -> Any:
    # Four decimals are more than a chart shows, and halve what a node's
    # hour of samples weighs in Redis.
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {key: _rounded(item) for key, item in value.items()}
    return value


def sample_to_json(sample: Sample) -> str:
    """A sample as a node publishes it for the others (floats to 4 decimals)."""
    return json.dumps(_rounded(attrs.asdict(sample)), separators=(",", ":"))


def _number(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"not a number: {value!r}")
    return float(value)


def sample_from_json(text: str) -> Sample | None:
    """A sample another node published, or None for text that is not one
    (skipped: a node of another version must not break the page)."""
    try:
        data = json.loads(text)
        refused = data["refused_per_minute"]
        if not isinstance(refused, dict):
            raise TypeError("refused_per_minute is not an object")
        return Sample(time=float(data["time"]), active=int(data["active"]),
                      capacity=int(data["capacity"]),
                      starts_per_minute=_number(data["starts_per_minute"]),
                      refused_per_minute={str(reason): _number(rate)
                                          for reason, rate in refused.items()},
                      start_latency=_number(data["start_latency"]),
                      memory_used_mb=float(data["memory_used_mb"]),
                      memory_total_mb=float(data["memory_total_mb"]),
                      cpu_used=_number(data["cpu_used"]), cpu_cores=int(data["cpu_cores"]),
                      memory_for_capacity_mb=float(data.get("memory_for_capacity_mb", 0.0)))
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


def sample_columns(samples: list[Sample]) -> dict:
    """The samples (oldest first) as columns (what uPlot draws): a list per
    series, ``refused`` a list per reason; None where there is no value."""
    reasons = samples[-1].refused_per_minute if samples else dict.fromkeys(REFUSAL_REASONS)
    return {
        "time": [s.time for s in samples],
        "active": [s.active for s in samples],
        "capacity": [s.capacity for s in samples],
        "starts_per_minute": [s.starts_per_minute for s in samples],
        "refused_per_minute": {reason: [s.refused_per_minute.get(reason)
                                        for s in samples] for reason in reasons},
        "start_latency": [s.start_latency for s in samples],
        "memory_used_mb": [round(s.memory_used_mb, 1) for s in samples],
        "memory_total_mb": [round(s.memory_total_mb, 1) for s in samples],
        "memory_for_capacity_mb": [round(s.memory_for_capacity_mb, 1) for s in samples],
        "cpu_used": [None if s.cpu_used is None else round(s.cpu_used, 3)
                     for s in samples],
        "cpu_cores": [s.cpu_cores for s in samples],
    }


# -- what the page shows and what it controls ---------------------------------


@frozen
class ConsoleView:
    """A running console as the admin page lists it (never its token)."""

    console: str
    age: float  # seconds since its token was redeemed
    client: str
    transport: str


@frozen
class NodeView:
    """One node as the admin page shows it."""

    name: str
    state: str  # "accepting", "paused" (the kill switch), "draining"
    active: int
    capacity: int
    samples: dict
    consoles: tuple[ConsoleView, ...]
    url: str = ""  # its public URL, in a cluster
    # Whether this server runs it: only this node's consoles can be ended here.
    local: bool = True

    def to_json(self) -> dict:
        return {**attrs.asdict(self, recurse=False),
                "consoles": [attrs.asdict(c) for c in self.consoles]}


class IAdminNodes(Interface):
    """The nodes the admin page shows: this server alone, or a cluster's."""

    notice = Attribute("A line for the page about what it shows (such as "
                       "'Redis is down: this node only'), or None.")

    def nodes() -> list[NodeView] | Deferred:
        """Every node to show, with its samples and running consoles (or a
        Deferred of them); L{notice} is about this answer."""


class IAdminControls(Interface):
    """What the admin page's buttons do."""

    def set_paused(paused: bool) -> Deferred | None:
        """Pause (or resume) the whole service: the kill switch, which refuses
        new consoles; running ones go on. (Or a Deferred; failing with
        L{ControlUnavailable} when it cannot be done now.)"""

    def set_draining(node: str, draining: bool) -> bool | Deferred:
        """Stop (or resume) admitting new consoles on ``node``; running ones
        go on. False when there is no such node. (Or a Deferred of it.)"""

    def end_console(node: str, console: str) -> bool | Deferred:
        """End one running console; False when there is no such console.
        (Or a Deferred of it.)"""


def write_switch(path: str, paused: bool) -> None:
    """Create the kill-switch file (pause) or remove it (resume)."""
    if paused:
        with open(path, "w") as file:
            file.write("paused from the admin page\n")
    else:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


@implementer(IAdminNodes, IAdminControls)
@define
class LocalNode:
    """This server as the admin page's only node.

    Pausing writes the kill-switch file (so it is the same state as an
    operator's ``touch``, and survives a restart) and checks it at once.
    """

    name: str
    _clock: IReactorTime
    _admission: Admission
    _switch: KillSwitch
    _consoles: ConsoleFactory
    _ring: SampleRing
    _write_switch: Callable[[str, bool], None] = write_switch
    notice: str | None = field(default=None, init=False)

    def nodes(self) -> list[NodeView]:
        if self._admission.draining:
            state = "draining"
        elif self._admission.switched_off:
            state = "paused"
        else:
            state = "accepting"
        now = self._clock.seconds()
        running = [summary for summary in (s.summary() for s in self._consoles.sessions)
                   if summary is not None]
        consoles = tuple(sorted(
            (ConsoleView(console=s.console, age=round(now - s.started, 1), client=s.client,
                         transport=s.transport) for s in running),
            key=lambda view: -view.age))
        return [NodeView(name=self.name, state=state, active=self._admission.active,
                         capacity=self._admission.capacity, samples=self._ring.columns(),
                         consoles=consoles)]

    def set_paused(self, paused: bool) -> None:
        self._write_switch(self._switch.path, paused)
        self._switch.check()
        log.warn("admin page: service {state}", state="paused" if paused else "resumed")

    def set_draining(self, node: str, draining: bool) -> bool:
        if node != self.name:
            return False
        self._admission.draining = draining
        log.warn("admin page: node {node} {state}", node=node,
                 state="draining" if draining else "admitting again")
        return True

    def end_console(self, node: str, console: str) -> bool:
        if node != self.name:
            return False
        for session in list(self._consoles.sessions):
            summary = session.summary()
            if summary is not None and summary.console == console:
                log.warn("admin page: ending console {console}", console=console)
                session.end("The operator ended this console.", reason="operator")
                return True
        return False


# -- authentication ------------------------------------------------------------


@define
class AdminAuth:
    """Checks the bearer token; counts wrong ones per address on the clock."""

    _token: str
    _clock: IReactorTime
    per_minute: int = FAILURES_PER_MINUTE
    max_tracked: int = MAX_TRACKED
    _failures: dict[str, deque[float]] = field(factory=dict, init=False)

    def retry_after(self, address: str) -> int | None:
        """Seconds until ``address`` may try again, or None if it may now."""
        now = self._clock.seconds()
        failures = self._failures.get(address)
        if failures is None:
            return None
        while failures and failures[0] <= now - FAILURE_WINDOW:
            failures.popleft()
        if not failures:
            del self._failures[address]
            return None
        if len(failures) < self.per_minute:
            return None
        return max(1, int(failures[0] + FAILURE_WINDOW - now + 0.999))

    def check(self, address: str, authorization: bytes | None) -> bool:
        """Whether ``authorization`` (the header's value) carries the token;
        a wrong or missing one counts against ``address``."""
        scheme, _, presented = (authorization or b"").decode("latin-1").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(
                presented.strip().encode("latin-1"), self._token.encode("ascii")):
            return True
        if address not in self._failures and len(self._failures) >= self.max_tracked:
            address = "other addresses"
        self._failures.setdefault(address, deque()).append(self._clock.seconds())
        return False


# -- the web side -------------------------------------------------------------


def _own_origin(request) -> str:
    scheme = "https" if request.isSecure() else "http"
    host = (request.getHeader(b"host") or b"").decode("latin-1")
    return f"{scheme}://{host}"


def _set_common_headers(request) -> None:
    request.setHeader(b"cache-control", b"no-store")
    request.setHeader(b"x-content-type-options", b"nosniff")
    request.setHeader(b"referrer-policy", b"no-referrer")
    request.setHeader(b"x-frame-options", b"DENY")


def _json(request, code: int, body: dict) -> bytes:
    request.setResponseCode(code)
    _set_common_headers(request)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(body).encode()


class AdminPage(Resource):
    """``GET /``: the page (it holds no data; its script fetches the API)."""

    isLeaf = True

    def __init__(self, page: bytes) -> None:
        super().__init__()
        self._page = page

    def render_GET(self, request) -> bytes:
        if request.postpath not in ([], [b""]):
            request.setResponseCode(404)
            return b"Not found"
        _set_common_headers(request)
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"content-security-policy", ADMIN_CSP.encode())
        return self._page


class NoIcon(Resource):
    """``/favicon.ico``: none (204), rather than a 404 in every page's console."""

    isLeaf = True

    def render_GET(self, request) -> bytes:
        request.setResponseCode(204)
        return b""


ACTIONS = ("pause", "resume", "drain", "undrain", "end")


class AdminAPI(Resource):
    """``/api/overview`` (GET) and ``/api/ACTION`` (POST, a JSON body)."""

    isLeaf = True

    def __init__(self, auth: AdminAuth, nodes: IAdminNodes, controls: IAdminControls) -> None:
        super().__init__()
        self._auth = auth
        self._nodes = nodes
        self._controls = controls

    def _refusal(self, request) -> bytes | None:
        # A unix: listener's peers have no address: they share one budget.
        address = getattr(request.getClientAddress(), "host", "local")
        wait = self._auth.retry_after(address)
        if wait is not None:
            request.setHeader(b"retry-after", str(wait).encode())
            return _json(request, 429, {"error": "too many wrong tokens from this address; "
                                                 f"try again in {wait} s"})
        if not self._auth.check(address, request.getHeader(b"authorization")):
            log.warn("admin page: wrong or missing token from {client}", client=address)
            request.setHeader(b"www-authenticate", b'Bearer realm="shellserver admin"')
            return _json(request, 401, {"error": "wrong or missing admin token"})
        return None

    def render_GET(self, request) -> bytes:
        refusal = self._refusal(request)
        if refusal is not None:
            return refusal
        if request.postpath != [b"overview"]:
            return _json(request, 404, {"error": "no such page"})
        return self._answer(request, self._nodes.nodes(), lambda nodes: (200, {
            "nodes": [n.to_json() for n in nodes], "notice": self._nodes.notice}))

    def _answer(self, request, result: Any, respond: Callable[[Any], tuple[int, dict]]):
        """The response for ``result`` (a value, or a Deferred of one, as
        the providers answer): ``respond`` turns it into a code and a body."""
        if not isinstance(result, Deferred):
            code, body = respond(result)
            return _json(request, code, body)
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def failed(failure) -> tuple[int, dict]:
            if failure.check(ControlUnavailable):
                return 503, {"error": str(failure.value)}
            log.failure("admin page: an answer failed", failure)
            return 500, {"error": "the server failed to answer; see its log"}

        def send(outcome: tuple[int, dict]) -> None:
            if not gone:
                request.write(_json(request, *outcome))
                request.finish()

        result.addCallback(respond).addErrback(failed).addCallback(send)
        return NOT_DONE_YET

    def render_POST(self, request) -> bytes:
        refusal = self._refusal(request)
        if refusal is not None:
            return refusal
        origin = request.getHeader(b"origin")
        # Bearer tokens are never sent by a browser on its own, so other
        # sites cannot forge an action; refusing foreign origins anyway
        # keeps it so if a cookie is ever added.
        if origin is not None and origin.decode("latin-1") != _own_origin(request):
            return _json(request, 403, {"error": "actions come from the admin page's own "
                                                 "origin only"})
        content_type = (request.getHeader(b"content-type") or b"").split(b";")[0].strip()
        if content_type != b"application/json":
            return _json(request, 415, {"error": "send the action as application/json"})
        action = b"/".join(request.postpath).decode("latin-1")
        if action not in ACTIONS:
            return _json(request, 404, {"error": f"no such action {action!r}; one of "
                                                 f"{', '.join(ACTIONS)}"})
        try:
            body = json.loads(request.content.read(MAX_BODY + 1)[:MAX_BODY] or b"{}")
        except ValueError:
            return _json(request, 400, {"error": "the body is not JSON"})
        if not isinstance(body, dict):
            return _json(request, 400, {"error": "the body must be a JSON object"})
        return self._act(request, action, body)

    def _act(self, request, action: str, body: dict) -> bytes:
        if action in ("pause", "resume"):
            try:
                result = self._controls.set_paused(action == "pause")
            except OSError as e:
                log.error("admin page: cannot {action}: {error}", action=action,
                          error=str(e))
                where = e.filename or "the kill-switch file"
                return _json(request, 500, {"error": f"cannot {action}: {where}: "
                                                     f"{e.strerror or e}"})
            return self._answer(request, result, lambda _: (200, {"done": action}))
        node = body.get("node")
        if not isinstance(node, str):
            return _json(request, 400, {"error": "name the node: {\"node\": NAME}"})
        if action in ("drain", "undrain"):
            return self._answer(
                request, self._controls.set_draining(node, action == "drain"),
                lambda found: (200, {"done": action, "node": node}) if found
                else (404, {"error": f"no node {node!r}"}))
        console = body.get("console")
        if not isinstance(console, str):
            return _json(request, 400, {"error": "name the console: {\"console\": ID}"})
        return self._answer(
            request, self._controls.end_console(node, console),
            lambda found: (200, {"done": action, "node": node, "console": console}) if found
            else (404, {"error": f"no console {console!r} running on {node!r}"}))


class AdminSite(Site):
    """The admin listener's site: its requests are not in the access log
    (an open page polls every few seconds; the actions log themselves)."""

    displayTracebacks = False

    def log(self, request) -> None:
        pass


def build_admin_resource(*, web_dir: str, auth: AdminAuth, nodes: IAdminNodes,
                         controls: IAdminControls) -> Resource:
    """The admin listener's tree: the page, its files, uPlot, the API."""
    from shellserver.web import StaticFiles, vendor_resource

    with open(os.path.join(web_dir, "admin.html"), "rb") as file:
        page = file.read()
    root = Resource()
    root.putChild(b"", AdminPage(page))
    static = Resource()
    for name, parts in ADMIN_STATIC.items():
        static.putChild(name, StaticFiles(os.path.join(web_dir, *parts)))
    static.putChild(b"vendor", vendor_resource(os.path.join(web_dir, "node_modules")))
    root.putChild(b"static", static)
    root.putChild(b"api", AdminAPI(auth, nodes, controls))
    root.putChild(b"favicon.ico", NoIcon())
    return root


def add_admin(top: MultiService, reactor, description: str | None, *, token: str | None,
              web_dir: str, node_name: str, metrics, admission, switch,
              consoles, memory_per_console: int = 0, cluster=None) -> None:
    """The admin page's listener and its sampler, as children of ``top``;
    ``token`` is the one L{load_or_create_token} read at start. In a
    ``cluster`` (its ClusterService) the page shows every node, and the
    sampler publishes to Redis even without a listener of its own
    (``description`` None), so that other nodes' pages show this one."""
    from twisted.application import strports

    ring = SampleRing(lambda: local_readings(reactor, metrics, admission,
                                             memory_per_console=memory_per_console))
    node = LocalNode(node_name, reactor, admission, switch, consoles, ring)
    shown: Any = node
    take: Callable[[], None] = ring.take
    if cluster is not None:
        from shellserver.cluster.admin import ClusterNodes

        shown = ClusterNodes(node, cluster.store, cluster.membership, ring, reactor)
        take = shown.take_and_publish
    sampler = TimerService(SAMPLE_INTERVAL, take)
    sampler.clock = reactor
    sampler.setName("admin-sampler")
    sampler.setServiceParent(top)
    if description is None or token is None:
        return
    tree = build_admin_resource(web_dir=web_dir, auth=AdminAuth(token, reactor),
                                nodes=shown, controls=shown)
    listener = strports.service(description, AdminSite(tree))
    listener.setName("admin")
    listener.setServiceParent(top)
