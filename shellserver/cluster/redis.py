"""The node's one connection to Redis: txredisapi's protocol over our own
Twisted endpoint, on the injected clock.

txredisapi speaks RESP and runs Lua scripts; its own connection helpers use
the global reactor, so the connection itself is ours: a ClientService that
reconnects with backoff, every call bounded by ``timeout`` on the injected
clock, and an up/down state with one log line per transition. A call made
while Redis is down fails at once with L{RedisUnavailable}: callers fall back
to their local bookkeeping and nothing ever waits on Redis.
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import parse_qs, unquote, urlsplit

import txredisapi
from attrs import define, field, frozen
from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger

log = Logger()

DEFAULT_PORT = 6379
CONNECT_TIMEOUT = 2.0  # seconds for one connection attempt
# Reconnection backoff: soon after a blip, at most every few seconds after that.
RETRY_INITIAL = 0.2
RETRY_MAX = 5.0


class RedisAddressError(ValueError):
    """A Redis URL that cannot be used; str() says why."""


class RedisUnavailable(Exception):
    """Redis could not answer this call (down, slow, or refused it)."""


@frozen
class RedisAddress:
    """Where Redis is and how to log in; ``transport`` is tcp, tls or unix."""

    transport: str
    host: str = ""
    port: int = DEFAULT_PORT
    path: str = ""
    db: int | None = None
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)

    def describe(self) -> str:
        """The address for logs, never the password."""
        if self.transport == "unix":
            where = f"unix://{self.path}"
        else:
            host = f"[{self.host}]" if ":" in self.host else self.host
            where = f"{'rediss' if self.transport == 'tls' else 'redis'}://{host}:{self.port}"
        return where if self.db is None else f"{where} db {self.db}"


def _db(text: str) -> int:
    if not text.isdigit() or int(text) > 1_000_000:
        raise RedisAddressError(f"the database must be a number, got {text[:20]!r}")
    return int(text)


def parse_redis_url(url: str) -> RedisAddress:
    """``redis://[[user]:password@]host[:port][/db]``, ``rediss://...`` (TLS) or
    ``unix:///path/redis.sock[?db=N&password=P]``. Raises L{RedisAddressError}."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise RedisAddressError(f"{url[:80]!r} is not a URL: {e}") from None
    if parts.fragment:
        raise RedisAddressError("a Redis URL has no #fragment")
    if parts.scheme == "unix":
        if parts.netloc or not parts.path.startswith("/"):
            raise RedisAddressError("write a socket as unix:///absolute/path/redis.sock")
        query = parse_qs(parts.query, keep_blank_values=True)
        unknown = set(query) - {"db", "password", "username"}
        if unknown:
            raise RedisAddressError(f"unknown unix:// parameter {sorted(unknown)[0]!r} "
                                    "(known: db, password, username)")
        db = _db(query["db"][-1]) if "db" in query else None
        return RedisAddress("unix", path=parts.path, db=db,
                            username=query.get("username", [None])[-1],
                            password=query.get("password", [None])[-1])
    if parts.scheme not in ("redis", "rediss"):
        raise RedisAddressError(
            f"the scheme must be redis, rediss or unix, got {parts.scheme or 'none'!r}")
    if not parts.hostname:
        raise RedisAddressError("it has no host")
    if parts.query:
        raise RedisAddressError("a redis:// URL takes no ?parameters")
    path = parts.path.strip("/")
    db = _db(path) if path else None
    return RedisAddress(
        "tls" if parts.scheme == "rediss" else "tcp",
        host=parts.hostname, port=port or DEFAULT_PORT, db=db,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
    )


def redis_endpoint(reactor, address: RedisAddress, ca_file: str = "") -> IStreamClientEndpoint:
    """A client endpoint for ``address``; for TLS, verifying Redis's
    certificate for its host name against ``ca_file`` (or the system CAs)."""
    if address.transport == "unix":
        return UNIXClientEndpoint(reactor, address.path, timeout=CONNECT_TIMEOUT)
    tcp = HostnameEndpoint(reactor, address.host, address.port, timeout=CONNECT_TIMEOUT)
    if address.transport != "tls":
        return tcp
    from twisted.internet.ssl import Certificate, optionsForClientTLS, platformTrust

    if ca_file:
        with open(ca_file, "rb") as f:
            trust = Certificate.loadPEM(f.read())
    else:
        trust = platformTrust()
    return wrapClientTLS(optionsForClientTLS(address.host, trustRoot=trust), tcp)


class _Protocol(txredisapi.RedisProtocol):
    """txredisapi's protocol, on the link's clock instead of the global reactor."""

    def __init__(self, clock: IReactorTime, address: RedisAddress, login_timeout: float) -> None:
        super().__init__(charset="utf-8", password=address.password, dbid=address.db,
                         convertNumbers=False, username=address.username)
        self.callLater = clock.callLater
        self._login_timeout = login_timeout

    def connectionMade(self):
        # AUTH and SELECT must be answered in time, or the connection goes.
        login = self.callLater(self._login_timeout, self.transport.abortConnection)

        def cancel_login(_) -> None:
            if login.active():
                login.cancel()

        self.whenConnected().addCallback(cancel_login)
        self.whenDisconnected().addCallback(cancel_login)
        return super().connectionMade()


@define(eq=False)
class _LinkFactory(Factory):
    """Builds protocols and takes txredisapi's calls back to its factory."""

    _link: RedisLink
    noisy = False
    isLazy = False  # txredisapi asks, after a refused login

    def buildProtocol(self, addr):
        link = self._link
        protocol = _Protocol(link._clock, link.address, link.timeout * 4 + CONNECT_TIMEOUT)
        protocol.factory = self
        protocol.whenConnected().addCallback(link._ready)
        return protocol

    def stopTrying(self) -> None:
        # A refused AUTH or SELECT: keep trying with backoff, Redis's side may
        # be fixed without restarting us; connectionError says why meanwhile.
        pass

    def connectionError(self, message: str) -> None:
        self._link._refused(message)


@define(eq=False)
class RedisLink:
    """One reconnecting connection to Redis, every call bounded by ``timeout``."""

    _clock: IReactorTime
    _endpoint: IStreamClientEndpoint
    address: RedisAddress
    timeout: float
    _service: ClientService | None = None
    _protocol: _Protocol | None = None
    up: bool = False
    _warned: bool = False
    _last_refusal: str | None = None
    _last_call_error: str | None = None
    # Connections in a row that never became usable (a refused login): they
    # count as failed attempts for the backoff, which ClientService resets
    # on every TCP connection.
    _unusable: int = 0
    _up_observers: list[Callable[[], object]] = field(factory=list)
    _state_observers: list[Callable[[bool], None]] = field(factory=list)
    _pending: set[defer.Deferred] = field(factory=set)

    @property
    def refusal(self) -> str | None:
        """Why Redis refused our last login (AUTH, SELECT), if it did."""
        return self._last_refusal

    def when_up(self, observer: Callable[[], object]) -> None:
        """Call ``observer`` every time the link comes up (a rejoin); what
        it returns is ignored."""
        self._up_observers.append(observer)

    def observe_state(self, observer: Callable[[bool], None]) -> None:
        """Call ``observer(up)`` on every transition."""
        self._state_observers.append(observer)

    def start(self) -> None:
        retry = backoffPolicy(initialDelay=RETRY_INITIAL, maxDelay=RETRY_MAX)

        def retry_policy(attempt: int) -> float:
            # Each failed attempt comes here first: the first one says so.
            self._went_down()
            return retry(max(attempt, self._unusable))

        def connected(proxy) -> None:
            # Unusable until its login is done (_ready resets the count).
            if not getattr(proxy, "_protocol", proxy)._ready:
                self._unusable += 1

        self._service = ClientService(self._endpoint, _LinkFactory(self),
                                      retryPolicy=retry_policy, clock=self._clock,
                                      prepareConnection=connected)
        self._service.startService()

    def stop(self) -> defer.Deferred:
        """Let the calls under way finish (each is bounded), then disconnect."""
        waiting = defer.DeferredList(list(self._pending), consumeErrors=True)

        def disconnect(_):
            self._protocol = None
            self.up = False
            if self._service is not None:
                return self._service.stopService()
            return None

        return waiting.addCallback(disconnect)

    def _ready(self, protocol: _Protocol) -> None:
        self._unusable = 0
        self._protocol = protocol
        protocol.whenDisconnected().addCallback(self._lost)
        self._came_up()

    def _lost(self, protocol: _Protocol) -> None:
        if self._protocol is protocol:
            self._protocol = None
            self._went_down()

    def _refused(self, message: str) -> None:
        if message != self._last_refusal:
            self._last_refusal = message
            log.warn("Redis {redis}: {message}", redis=self.address.describe(),
                     message=message)

    def _came_up(self) -> None:
        self._last_refusal = None
        if not self.up:
            self.up = True
            log.info("Redis reachable at {redis}: cluster admission",
                     redis=self.address.describe())
            for observer in list(self._state_observers):
                observer(True)
            for up_observer in list(self._up_observers):
                up_observer()

    def _went_down(self) -> None:
        was_up, self.up = self.up, False
        if was_up or not self._warned:
            self._warned = True
            log.warn("Redis unreachable at {redis}: local admission only",
                     redis=self.address.describe())
        if was_up:
            for observer in list(self._state_observers):
                observer(False)

    def execute(self, *args) -> defer.Deferred:
        """Run one command; fails with L{RedisUnavailable} when Redis is down
        or does not answer within ``timeout`` (then the link counts as down
        and reconnects)."""
        return self._bounded(lambda protocol: protocol.execute_command(*args))

    def eval(self, script: str, keys: list[str], args: list) -> defer.Deferred:
        """Run a Lua script (by its hash once Redis knows it)."""
        return self._bounded(lambda protocol: protocol.eval(script, keys, args))

    def _bounded(self, call) -> defer.Deferred:
        protocol = self._protocol
        if protocol is None or not self.up:
            return defer.fail(RedisUnavailable("Redis is down"))
        try:
            d = call(protocol)
        except Exception as e:  # txredisapi's ConnectionError when just closed
            return defer.fail(RedisUnavailable(str(e)))
        d.addTimeout(self.timeout, self._clock)
        self._pending.add(d)

        def done(result):
            self._pending.discard(d)
            return result

        def failed(failure):
            if failure.check(defer.TimeoutError):
                # Slow counts as down: drop the connection, reconnect afresh.
                if self._protocol is protocol:
                    self._protocol = None
                    self._went_down()
                    protocol.transport.abortConnection()
                raise RedisUnavailable(f"no answer within {self.timeout}s")
            if failure.check(txredisapi.ResponseError):
                # Redis refused this call (out of memory, read-only replica,
                # a script error): decided locally like any other failure,
                # and said (once per kind of answer), since it is not a blip.
                error = failure.getErrorMessage()
                if error != self._last_call_error:
                    self._last_call_error = error
                    log.error("Redis {redis} refused a call: {error}",
                              redis=self.address.describe(), error=error)
            raise RedisUnavailable(failure.getErrorMessage())

        return d.addBoth(done).addErrback(failed)


class RedisLinkService(Service):
    """Keeps the link connected while the server runs."""

    name = "redis"

    def __init__(self, link: RedisLink) -> None:
        self.link = link

    def startService(self) -> None:
        super().startService()
        self.link.start()

    def stopService(self):
        super().stopService()
        return self.link.stop()
