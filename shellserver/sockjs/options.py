"""
Configuration of one SockJS endpoint, as a frozen value.
"""

from attrs import field, frozen, validators


def _positive(instance: object, attribute: object, value: float) -> None:
    if value <= 0:
        raise ValueError(f"{attribute.name} must be positive, not {value!r}")  # type: ignore[attr-defined]


def _watermarks_ordered(instance: "SockJSOptions", attribute: object, value: int) -> None:
    if not 0 <= value < instance.high_watermark:
        raise ValueError(
            f"low_watermark ({value}) must be from 0 to below high_watermark "
            f"({instance.high_watermark})"
        )


@frozen
class SockJSOptions:
    """
    Settings of a L{shellserver.sockjs.SockJSResource}.

    @ivar heartbeat_interval: seconds between C{h} frames sent to an
        attached receiver.
    @ivar disconnect_delay: seconds a session without any receiver survives
        before it is closed and forgotten.
    @ivar response_limit: bytes an xhr-streaming response carries before the
        server ends it so the client reconnects (and frees the memory the
        browser keeps for the response).
    @ivar max_message_bytes: largest payload the client may send in one go
        (one websocket message, one C{xhr_send} body, one C{jsonp_send}
        payload once form-decoded); anything larger closes the session with
        code 1009.
    @ivar websocket: whether the websocket transports are offered.
    @ivar cookie_needed: whether session transports set a C{JSESSIONID}
        cookie (for load balancers with cookie-based stickiness).
    @ivar client_url: where the iframe page loads sockjs-client from.
    @ivar high_watermark: pending output above which a registered producer
        is paused.
    @ivar low_watermark: pending output below which a paused producer is
        resumed.
    @ivar websocket_ping_interval: seconds between websocket pings (the
        transport-level liveness check of both websocket transports).
    @ivar websocket_ping_timeout: seconds to wait for the pong before the
        websocket connection is dropped.
    @ivar max_sessions_per_address: sessions (of every transport, counted
        until they are forgotten) one client IP address may hold at once;
        beyond it a new session is refused with close code 1013.  The
        address is C{client_address}'s: the visitor's behind a trusted
        proxy or on a PROXY protocol listener.
    @ivar max_client_pings_per_minute: websocket pings a client may send in
        a minute (browsers send none); past it the connection is closed
        with code 1008, so a ping flood costs the server little.
    @ivar input_messages_per_second: messages a session hands to the
        application per second, on average; past it (and past
        C{input_burst_messages}) the session's input is slowed: the server
        stops reading the client's socket, or holds its C{xhr_send}
        answer, until the budget has refilled.  Nothing is dropped.
    @ivar input_bytes_per_second: the same for the bytes of those messages.
    @ivar input_burst_messages: messages a session may send at once after a
        quiet spell.
    @ivar input_burst_bytes: bytes a session may send at once after a quiet
        spell (a paste).
    """

    heartbeat_interval: float = field(default=25.0, validator=_positive)
    disconnect_delay: float = field(default=5.0, validator=_positive)
    response_limit: int = field(default=128 * 1024, validator=_positive)
    max_message_bytes: int = field(default=64 * 1024, validator=_positive)
    websocket: bool = field(default=True, validator=validators.instance_of(bool))
    cookie_needed: bool = field(default=False, validator=validators.instance_of(bool))
    client_url: str = field(
        default="../static/vendor/sockjs.min.js", validator=validators.instance_of(str)
    )
    high_watermark: int = field(default=256 * 1024, validator=_positive)
    low_watermark: int = field(default=64 * 1024, validator=_watermarks_ordered)
    websocket_ping_interval: float = field(default=20.0, validator=_positive)
    websocket_ping_timeout: float = field(default=10.0, validator=_positive)
    max_sessions_per_address: int = field(default=50, validator=_positive)
    max_client_pings_per_minute: int = field(default=120, validator=_positive)
    input_messages_per_second: float = field(default=5000.0, validator=_positive)
    input_bytes_per_second: float = field(default=262144.0, validator=_positive)
    input_burst_messages: float = field(default=10000.0, validator=_positive)
    input_burst_bytes: float = field(default=1048576.0, validator=_positive)
