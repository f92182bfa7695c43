"""Prometheus metrics of one server (docs/operations.md lists them).

Every metric lives in a registry of the service's own, not the process-wide
default one, so each test makes its own `Metrics` and reads it back. Labels
take only the values listed here: anything else is counted as ``other``, so
no client can make the series grow (no per-visitor or per-console labels).
"""

from __future__ import annotations

from collections.abc import Callable

from attrs import define, field
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder
from twisted.web.resource import Resource
from twisted.web.server import Site

PREFIX = "shellserver"
OTHER = "other"

START_SOURCES = ("cold", "pool")
END_REASONS = ("exit", "idle", "max_age", "budget", "kill_switch", "shutdown", "error",
               "client_left", "operator")
REFUSAL_REASONS = ("full", "rate_limited", "switched_off", "shutting_down", "token",
                   "auth_rate_limited", "unavailable")
SANDBOX_FAILURES = ("unavailable", "setup", "pool_died")
PAUSE_PARTIES = ("transport", "client")
TRANSPORTS = ("websocket", "websocket_raw", "xhr_polling", "xhr_streaming", "eventsource",
              "htmlfile", "jsonp_polling")
REQUEST_LIMITS = ("max_connections", "per_address", "slow_request", "body_too_large",
                  "line_too_long", "headers_too_large", "too_many_headers")
TOKEN_FAILURES = ("malformed", "forged", "wrong_node", "expired", "no_origin",
                  "wrong_origin", "wrong_client", "replayed")
# Seconds from a redeemed token to the console's first output: microseconds
# from the pool, a few hundred milliseconds cold, seconds under load.
START_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def bounded(value: str | None, allowed: tuple[str, ...]) -> str:
    """``value`` as a label (``"wrong node"`` -> ``wrong_node``) if it is one
    of ``allowed``, else ``other``."""
    label = (value or "").replace(" ", "_").replace("-", "_")
    return label if label in allowed else OTHER


def _labelled(metric, allowed: tuple[str, ...]):
    # Every allowed series exists from the start, at zero: a scrape shows
    # what can happen, and rate() has a baseline.
    for value in (*allowed, OTHER):
        metric.labels(value)
    return metric


@define(slots=False)  # the metrics are made in __attrs_post_init__
class Metrics:
    """The metrics the parts of the server count into."""

    registry: CollectorRegistry = field(factory=CollectorRegistry)

    def __attrs_post_init__(self) -> None:
        registry = self.registry
        self.consoles_active = Gauge(
            f"{PREFIX}_consoles_active", "Consoles holding an admission slot now.",
            registry=registry)
        self.capacity = Gauge(
            f"{PREFIX}_capacity", "Consoles this node admits at most (admission.capacity).",
            registry=registry)
        self.consoles_started = _labelled(Counter(
            f"{PREFIX}_consoles_started", "Consoles started, cold or from the warm pool.",
            ["source"], registry=registry), START_SOURCES)
        self.consoles_ended = _labelled(Counter(
            f"{PREFIX}_consoles_ended", "Consoles ended, by reason.",
            ["reason"], registry=registry), END_REASONS)
        self.consoles_refused = _labelled(Counter(
            f"{PREFIX}_consoles_refused", "Console requests refused, by reason.",
            ["reason"], registry=registry), REFUSAL_REASONS)
        self.start_seconds = _labelled(Histogram(
            f"{PREFIX}_console_start_seconds",
            "Seconds from a redeemed token to the console's first output.",
            ["source"], buckets=START_BUCKETS, registry=registry), START_SOURCES)
        self.pool_waiting = Gauge(
            f"{PREFIX}_pool_waiting", "Pre-started sandboxes waiting in the warm pool.",
            registry=registry)
        self.pool_refills = Counter(
            f"{PREFIX}_pool_refills", "Sandboxes started to refill the warm pool.",
            registry=registry)
        self.sandbox_failures = _labelled(Counter(
            f"{PREFIX}_sandbox_failures", "Sandboxes that could not start or be built.",
            ["stage"], registry=registry), SANDBOX_FAILURES)
        self.output_bytes = Counter(
            f"{PREFIX}_output_bytes", "Bytes of console output read from sandboxes.",
            registry=registry)
        self.flow_pauses = _labelled(Counter(
            f"{PREFIX}_flow_control_pauses",
            "Times a console's output was paused, by who asked.",
            ["party"], registry=registry), PAUSE_PARTIES)
        self.input_dropped = Counter(
            f"{PREFIX}_input_dropped",
            "Client messages held over the input budget and dropped when the session ended.",
            registry=registry)
        self.connections = _labelled(Counter(
            f"{PREFIX}_connections", "SockJS connections opened, by transport.",
            ["transport"], registry=registry), TRANSPORTS)
        self.requests_rejected = _labelled(Counter(
            f"{PREFIX}_requests_rejected", "Connections and requests refused, by limit.",
            ["limit"], registry=registry), REQUEST_LIMITS)
        self.token_failures = _labelled(Counter(
            f"{PREFIX}_token_failures", "Console tokens refused, by reason.",
            ["reason"], registry=registry), TOKEN_FAILURES)

    # -- what the parts call --------------------------------------------------

    def watch_active(self, count: Callable[[], int]) -> None:
        self.consoles_active.set_function(count)

    def watch_pool(self, count: Callable[[], int]) -> None:
        self.pool_waiting.set_function(count)

    def console_started(self, source: str, seconds: float) -> None:
        source = bounded(source, START_SOURCES)
        self.consoles_started.labels(source).inc()
        self.start_seconds.labels(source).observe(seconds)

    def console_ended(self, reason: str | None) -> None:
        self.consoles_ended.labels(bounded(reason, END_REASONS)).inc()

    def console_refused(self, reason: str | None) -> None:
        self.consoles_refused.labels(bounded(reason, REFUSAL_REASONS)).inc()

    def token_failed(self, reason: str) -> None:
        self.token_failures.labels(bounded(reason, TOKEN_FAILURES)).inc()

    def sandbox_failed(self, stage: str) -> None:
        self.sandbox_failures.labels(bounded(stage, SANDBOX_FAILURES)).inc()

    def output_read(self, size: int) -> None:
        self.output_bytes.inc(size)

    def output_paused(self, party: str) -> None:
        self.flow_pauses.labels(bounded(party, PAUSE_PARTIES)).inc()

    def connection_opened(self, transport: str) -> None:
        self.connections.labels(bounded(transport, TRANSPORTS)).inc()

    def request_rejected(self, limit: str) -> None:
        self.requests_rejected.labels(bounded(limit, REQUEST_LIMITS)).inc()

    def value(self, name: str, **labels: str) -> float:
        """One sample's value (0 when absent), for tests and the status page."""
        found = self.registry.get_sample_value(name, labels)
        return 0.0 if found is None else found


class MetricsPage(Resource):
    """``/metrics`` in Prometheus' text format (or OpenMetrics when asked).

    Rendered in the reactor thread: prometheus_client.twisted.MetricsResource
    is a WSGI app run in the global reactor's thread pool, which would read
    the gauges' callbacks (admission, the pool) from another thread.
    """

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request) -> bytes:
        accept = (request.getHeader(b"accept") or b"").decode("latin-1")
        encoder, content_type = choose_encoder(accept)
        request.setHeader(b"content-type", content_type.encode("ascii"))
        return encoder(self.registry)


def metrics_site(metrics: Metrics) -> Site:
    """A twisted.web Site serving ``/metrics`` from ``metrics``' registry only."""
    root = Resource()
    root.putChild(b"metrics", MetricsPage(metrics.registry))
    return Site(root)
