"""
The server's configuration: frozen attrs values loaded from TOML.

Every value is checked when it is built, so a bad file fails at start-up with
one clear message naming the key (``console.idle_timeout: must be a positive
number of seconds, got -3``) instead of misbehaving later.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import socket
import tomllib
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, TypedDict
from urllib.parse import urlsplit

import attrs
from attrs import field, frozen


@attrs.define(auto_exc=True, kw_only=True)
class ConfigError(Exception):
    """
    The configuration cannot be used.

    ``key`` is ``"section.key"`` (or a section name) when one value is at
    fault, None for a file that cannot be read or parsed; ``line`` is the line
    of a TOML syntax error.
    """

    message: str
    key: str | None = None
    source: str | None = None
    line: int | None = None

    def __str__(self) -> str:
        if self.key is not None:
            return f"{self.key}: {self.message}"
        if self.line is not None:
            return f"{self.source}, line {self.line}: {self.message}"
        return self.message


def _describe(value: object) -> str:
    """Show a value the way the user wrote it in TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | str):
        return repr(value)
    if isinstance(value, list | tuple):
        return f"an array {list(value)!r}"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__} ({value})"


def _fail(instance: object, attribute: attrs.Attribute, message: str) -> ConfigError:
    return ConfigError(key=f"{instance.section}.{attribute.name}", message=message)  # type: ignore[attr-defined]


Validator = Callable[[Any, "attrs.Attribute[Any]", Any], None]


def _is_number(value: object) -> bool:
    # TOML true/false arrive as bool, a subclass of int: they are not numbers.
    return isinstance(value, int | float) and not isinstance(value, bool)


def _seconds(*, zero_means_never: bool) -> Validator:
    """A duration in seconds: positive, or also 0 when 0 means "never"."""

    def check(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if not _is_number(value) or not math.isfinite(value):
            raise _fail(
                instance,
                attribute,
                f"must be a number of seconds, got {_describe(value)}",
            )
        if value < 0 or (value == 0 and not zero_means_never):
            raise _fail(
                instance,
                attribute,
                f"must be a positive number of seconds, got {_describe(value)}",
            )

    return check


def _integer(*, minimum: int = 1, maximum: int | None = None) -> Validator:
    """An integer in [minimum, maximum]; never a bool or a float."""

    def check(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if not isinstance(value, int) or isinstance(value, bool):
            raise _fail(
                instance, attribute, f"must be an integer, got {_describe(value)}"
            )
        if value < minimum or (maximum is not None and value > maximum):
            if minimum == 1 and maximum is None:
                wanted = "a positive integer"
            elif maximum is None:
                wanted = f"an integer >= {minimum}"
            else:
                wanted = f"an integer from {minimum} to {maximum}"
            raise _fail(
                instance, attribute, f"must be {wanted}, got {_describe(value)}"
            )

    return check


def _one_of(*choices: str) -> Validator:
    """One of a few fixed words."""

    def check(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value not in choices:
            raise _fail(
                instance, attribute,
                f"must be one of {', '.join(repr(c) for c in choices)}, "
                f"got {_describe(value)}",
            )

    return check


def _path(*, optional: bool) -> Validator:
    """An absolute path; "" too when ``optional`` (meaning "the default")."""

    def check(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if isinstance(value, str) and value == "" and optional:
            return
        if not isinstance(value, str) or not os.path.isabs(value) or "\0" in value:
            hint = ' (or "" for the default)' if optional else ""
            raise _fail(
                instance,
                attribute,
                f"must be an absolute path{hint}, got {_describe(value)}",
            )

    return check


def _check_boolean(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, bool):
        raise _fail(instance, attribute, f"must be true or false, got {_describe(value)}")


_NODE_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,252})")


def _check_node(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, str) or not (value == "" or _NODE_NAME.fullmatch(value)):
        raise _fail(
            instance,
            attribute,
            "must be a node name (letters, digits, '.', '_', '-'; at most 253) "
            f'or "" for the host name, got {_describe(value)}',
        )


_HOST_NAME = re.compile(r"[A-Za-z0-9._-]+")


def _origin_problem(origin: str) -> str | None:
    """Why ``origin`` is not a canonical web origin, or None if it is one."""
    try:
        parts = urlsplit(origin)
        port = parts.port
    except ValueError as error:
        return str(error)
    if parts.scheme not in ("http", "https"):
        return "the scheme must be http or https"
    if not parts.hostname:
        return "it has no host"
    if not (_HOST_NAME.fullmatch(parts.hostname) or parts.netloc.startswith("[")):
        return "the host name has characters a host name cannot have"
    if parts.username is not None or parts.password is not None:
        return "it must not contain a user name or password"
    if parts.path or parts.query or parts.fragment or origin.endswith(("?", "#")):
        return "it must not have a path (not even a trailing /), query or fragment"
    default_port = {"http": 80, "https": 443}[parts.scheme]
    canonical = f"{parts.scheme}://{parts.netloc.lower()}"
    if port == default_port:
        canonical = canonical.rsplit(":", 1)[0]
    if origin != canonical:
        # Browsers send origins in this form, and origins are compared as text.
        return f"write it as {canonical!r}, the form browsers send"
    return None


def _to_tuple(value: Any) -> Any:
    """TOML arrays arrive as lists; frozen values hold tuples."""
    return tuple(value) if isinstance(value, list) else value


def _check_origins(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, tuple):
        raise _fail(
            instance,
            attribute,
            "must be an array of origins (scheme://host[:port]), "
            f"got {_describe(value)}",
        )
    for origin in value:
        if not isinstance(origin, str):
            raise _fail(
                instance,
                attribute,
                f"must contain origin strings, got {_describe(origin)}",
            )
        problem = _origin_problem(origin)
        if problem is not None:
            raise _fail(
                instance,
                attribute,
                f"{origin!r} is not an origin scheme://host[:port]: {problem}",
            )


def _check_trusted_proxies(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    from shellserver.proxies import parse_networks

    if not isinstance(value, tuple):
        raise _fail(instance, attribute,
                    f"must be an array of IP addresses or networks, got {_describe(value)}")
    try:
        parse_networks(value)
    except ValueError as e:
        raise _fail(instance, attribute, str(e)) from None


def _check_proxy_header(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    from shellserver.proxies import PROXY_HEADERS

    if value not in PROXY_HEADERS:
        raise _fail(instance, attribute,
                    f"must be one of {', '.join(map(repr, PROXY_HEADERS))}, "
                    f"got {_describe(value)}")


@frozen(kw_only=True)
class ServerConfig:
    """The ``[server]`` section."""

    section: ClassVar[str] = "server"

    state_dir: str = field(
        default="/var/lib/shellserver", validator=_path(optional=False)
    )
    node: str = field(default="", validator=_check_node)
    public_origins: tuple[str, ...] = field(
        default=(), converter=_to_tuple, validator=_check_origins
    )
    # What one client may cost (shellserver.limits, docs/security.md).
    max_connections: int = field(default=4096, validator=_integer())
    max_connections_per_address: int = field(default=64, validator=_integer())
    tls_handshake_timeout: float = field(default=10.0, validator=_seconds(zero_means_never=False))
    request_timeout: float = field(default=15.0, validator=_seconds(zero_means_never=False))
    idle_connection_timeout: float = field(
        default=60.0, validator=_seconds(zero_means_never=False)
    )
    max_request_header_bytes: int = field(default=16384, validator=_integer(minimum=4096))
    max_request_headers: int = field(default=100, validator=_integer(minimum=16))
    max_request_body_bytes: int = field(default=262144, validator=_integer(minimum=4096))
    auth_failures_per_minute: int = field(default=20, validator=_integer())
    # Strict-Transport-Security max-age on TLS responses, in seconds (0: none).
    hsts_max_age: int = field(default=31536000, validator=_integer(minimum=0))
    # Reverse proxies whose forwarding header names the visitor (shellserver.proxies).
    trusted_proxies: tuple[str, ...] = field(
        default=(), converter=_to_tuple, validator=_check_trusted_proxies
    )
    proxy_header: str = field(default="X-Forwarded-For", validator=_check_proxy_header)
    # "json": one JSON event per line (docs/operations.md), for log shippers.
    log_format: str = field(default="text", validator=_one_of("text", "json"))
    # The least severe log events written (twisted.logger levels); SIGHUP applies it.
    log_level: str = field(default="info",
                           validator=_one_of("debug", "info", "warn", "error", "critical"))
    # Behind a reverse proxy that passes /prefix/... through: the site lives there.
    base_path: str = field(default="", validator=lambda i, a, v: _check_base_path(i, a, v))

    def node_name(self) -> str:
        """The node name put in tokens: ``node``, or else the host name."""
        return self.node or socket.gethostname()


def _check_tls_pair(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    other = "private_key" if attribute.name == "certificate" else "certificate"
    if value == "" and getattr(instance, other) != "":
        raise _fail(
            instance,
            attribute,
            f"must be set too when tls.{other} is set (give both, or neither "
            "for a self-signed certificate)",
        )


@frozen(kw_only=True)
class TLSConfig:
    """The ``[tls]`` section: both files, or neither for a self-signed certificate."""

    section: ClassVar[str] = "tls"

    certificate: str = field(
        default="", validator=[_path(optional=True), _check_tls_pair]
    )
    private_key: str = field(
        default="", validator=[_path(optional=True), _check_tls_pair]
    )

    @property
    def self_signed(self) -> bool:
        """True when no certificate is configured."""
        return self.certificate == ""


class InputBudgetSettings(TypedDict):
    """One SockJS session's input budget: SockJSOptions' C{input_*} keywords."""

    input_messages_per_second: int
    input_bytes_per_second: int
    input_burst_messages: int
    input_burst_bytes: int


@frozen(kw_only=True)
class ConsoleConfig:
    """The ``[console]`` section: time limits (seconds) and output flow control."""

    section: ClassVar[str] = "console"

    auth_timeout: float = field(default=5.0, validator=_seconds(zero_means_never=False))
    token_ttl: float = field(default=60.0, validator=_seconds(zero_means_never=False))
    idle_timeout: float = field(
        default=600.0, validator=_seconds(zero_means_never=True)
    )
    max_age: float = field(default=1800.0, validator=_seconds(zero_means_never=True))
    shutdown_grace: float = field(default=10.0, validator=_seconds(zero_means_never=True))
    output_high_water: int = field(default=262144, validator=_integer(minimum=1024))
    output_low_water: int = field(default=65536, validator=_integer(minimum=0))
    # Whether a token may open a console on a connection that sent no Origin.
    allow_originless: bool = field(default=False, validator=_check_boolean)

    @output_low_water.validator
    def _check_low_water(self, attribute: attrs.Attribute, value: int) -> None:
        if value >= self.output_high_water:
            raise _fail(self, attribute, "must be below console.output_high_water, got "
                        f"{value} >= {self.output_high_water}")

    # The input budget of one connection (docs/protocol.md, "Input budget").
    input_messages_per_second: int = field(default=5000, validator=_integer())
    input_bytes_per_second: int = field(default=262144, validator=_integer(minimum=1024))
    input_burst_messages: int = field(default=10000, validator=_integer())
    input_burst_bytes: int = field(default=1048576, validator=_integer(minimum=1024))
    # How long a console whose connection went away waits for a reattach
    # (docs/protocol.md, "Reattach"); 0: it ends with its connection. A grace
    # longer than max_age is cut to it.
    reattach_grace: float = field(default=60.0, validator=_seconds(zero_means_never=True))

    def input_budget(self) -> InputBudgetSettings:
        """The SockJS input budget of new sessions (SockJSOptions' keywords)."""
        return {
            "input_messages_per_second": self.input_messages_per_second,
            "input_bytes_per_second": self.input_bytes_per_second,
            "input_burst_messages": self.input_burst_messages,
            "input_burst_bytes": self.input_burst_bytes,
        }


_NOBODY = 65534
_UID_LIMIT = 2**31 - 1


def _check_uid_max(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    # Runs after every field is set, and after uid_min's own validator.
    uid_min = instance.uid_min
    if value < uid_min:
        raise _fail(
            instance,
            attribute,
            f"must be >= sandbox.uid_min ({uid_min}), got {_describe(value)}",
        )
    if value >= _UID_LIMIT:
        raise _fail(
            instance, attribute, f"must be < {_UID_LIMIT}, got {_describe(value)}"
        )
    if uid_min <= _NOBODY <= value:
        raise _fail(
            instance,
            attribute,
            f"the uid range [{uid_min}, {value}] must not include {_NOBODY} "
            "(nobody, which other programs use)",
        )


def _check_cpu_quota(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    cpus = os.cpu_count() or 1
    if not _is_number(value) or not math.isfinite(value):
        raise _fail(instance, attribute, f"must be a number, got {_describe(value)}")
    if not 0 < value <= cpus:
        raise _fail(
            instance,
            attribute,
            f"must be more than 0 and at most {cpus} (the number of CPUs; "
            f"1 is one whole CPU), got {_describe(value)}",
        )


def _check_packages(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    """Each entry must be a PEP 508 requirement ("name", "name==1.0",
    "name @ file:///path/to/name.whl"): pip gets exactly what the operator wrote."""
    from packaging.requirements import InvalidRequirement, Requirement

    if not isinstance(value, tuple):
        raise _fail(instance, attribute,
                    f"must be an array of requirement strings, got {_describe(value)}")
    for entry in value:
        if not isinstance(entry, str) or not entry.strip():
            raise _fail(instance, attribute,
                        "each entry must be a non-empty requirement string, "
                        f"got {_describe(entry)}")
        if entry.lstrip().startswith("-"):
            raise _fail(instance, attribute,
                        f"{entry!r} is a pip option, not a requirement")
        try:
            Requirement(entry)
        except InvalidRequirement as e:
            raise _fail(instance, attribute,
                        f"{entry!r} is not a valid requirement (such as \"name\", "
                        f"\"name==1.0\" or \"name @ file:///path/name.whl\"): {e}") from None


@frozen(kw_only=True)
class SandboxConfig:
    """The ``[sandbox]`` section: where consoles run and what they may use."""

    section: ClassVar[str] = "sandbox"

    runtime: str = field(default="", validator=_path(optional=True))
    system_python: str = field(
        default="/usr/bin/python3", validator=_path(optional=False)
    )
    uid_min: int = field(default=200000, validator=_integer(minimum=1000))
    uid_max: int = field(default=200999, validator=[_integer(), _check_uid_max])
    memory_mb: int = field(default=256, validator=_integer())
    pids_max: int = field(default=64, validator=_integer())
    # cgroup v1 accepts cpu.shares from 2 to 262144.
    cpu_shares: int = field(default=256, validator=_integer(minimum=2, maximum=262144))
    cpu_quota: float = field(default=0.5, validator=_check_cpu_quota)
    tmp_mb: int = field(default=64, validator=_integer())
    home_mb: int = field(default=32, validator=_integer())
    max_open_files: int = field(default=256, validator=_integer())
    max_file_mb: int = field(default=32, validator=_integer())
    max_processes: int = field(default=64, validator=_integer())
    pool_size: int = field(default=2, validator=_integer(minimum=0, maximum=1000))
    cpu_budget: float = field(default=300.0, validator=_seconds(zero_means_never=True))
    tarpit_quota: float = field(default=0.05)
    tarpit_seconds: float = field(default=60.0, validator=_seconds(zero_means_never=True))
    # PTYs one console may have (its devpts max=); all consoles draw on the
    # host's kernel.pty.max less kernel.pty.reserve (shellserver.sandbox.hostpools).
    max_ptys: int = field(default=8, validator=_integer(minimum=1, maximum=1024))
    # Consoles forked from a template that has imported IPython once
    # (shellserver/sandbox/forkserver.py), not each started afresh.
    fork_server: bool = field(default=True, validator=_check_boolean)
    # Extra pip requirements installed into the console runtime when it is
    # built; the runtime is rebuilt when this list changes.
    packages: tuple[str, ...] = field(
        default=(), converter=_to_tuple, validator=_check_packages
    )

    @tarpit_quota.validator
    def _check_tarpit_quota(self, attribute: attrs.Attribute, value: Any) -> None:
        if not _is_number(value) or not 0.01 <= value <= 1:
            raise _fail(self, attribute,
                        f"must be a fraction of one CPU from 0.01 to 1, got {_describe(value)}")


def _check_selector(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, str) or not value.strip():
        raise _fail(instance, attribute, f"must be a CSS selector, got {_describe(value)}")
    if any(c in value for c in "<>{}\\\n"):
        raise _fail(instance, attribute, f"{value!r} has characters a selector cannot have")


@frozen(kw_only=True)
class EmbedConfig:
    """The ``[embed]`` section: which host pages may show consoles."""

    section: ClassVar[str] = "embed"

    host_origins: tuple[str, ...] = field(
        default=(), converter=_to_tuple, validator=_check_origins
    )
    selector: str = field(default="[data-shellserver]", validator=_check_selector)
    status_max_age: int = field(default=5, validator=_integer(minimum=0, maximum=300))


@frozen(kw_only=True)
class AdmissionConfig:
    """The ``[admission]`` section: capacity, per-address limits, kill switch."""

    section: ClassVar[str] = "admission"

    capacity: int = field(default=0, validator=_integer(minimum=0))
    per_address: int = field(default=3, validator=_integer(minimum=1))
    per_address_per_minute: int = field(default=10, validator=_integer(minimum=1))
    kill_switch_file: str = field(default="", validator=_path(optional=True))
    pages_per_address_per_minute: int = field(default=30, validator=_integer(minimum=0))


_CLUSTER_NODE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_KEY_PREFIX = re.compile(r"[\x21-\x7e]{0,64}")


def _check_redis_url(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    from shellserver.cluster.redis import RedisAddressError, parse_redis_url

    if not isinstance(value, str):
        raise _fail(instance, attribute, f"must be a Redis URL or \"\", got {_describe(value)}")
    if value == "":
        return
    try:
        parse_redis_url(value)
    except RedisAddressError as e:
        raise _fail(instance, attribute, str(e)) from None


def _check_public_url(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    problem = None
    if not isinstance(value, str):
        problem = f"got {_describe(value)}"
    elif value:
        parts = urlsplit(value)
        origin = f"{parts.scheme}://{parts.netloc}"
        path = parts.path
        problem = _origin_problem(origin)
        if problem is None and parts.scheme != "https":
            problem = "the scheme must be https"
        if problem is None and (parts.query or parts.fragment or value.endswith(("?", "#"))):
            problem = "it must not have a query or fragment"
        if problem is None and path and not (_BASE_PATH.fullmatch(path) and not any(
                part in (".", "..") for part in path.split("/"))):
            problem = "its path must look like /base (no trailing slash)"
        if problem is not None:
            problem = f"{value!r}: {problem}"
    if problem is not None:
        raise _fail(instance, attribute,
                    f"must be \"\" or https://host[:port][/base] where browsers reach this "
                    f"node, {problem}")


def _check_cluster_node(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, str) or not (value == "" or _CLUSTER_NODE.fullmatch(value)):
        raise _fail(instance, attribute,
                    "must be 1 to 64 letters, digits, '_', '.' or '-' (or \"\" without "
                    f"cluster.redis_url), got {_describe(value)}")


def _check_key_prefix(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, str) or not _KEY_PREFIX.fullmatch(value):
        raise _fail(instance, attribute,
                    "must be at most 64 printable ASCII characters without spaces, "
                    f"got {_describe(value)}")


def _ca_file_problem(path: str) -> str | None:
    """Why ``path`` is not a readable PEM certificate, or None."""
    from OpenSSL import crypto

    try:
        with open(path, "rb") as file:
            crypto.load_certificate(crypto.FILETYPE_PEM, file.read())
    except OSError as error:
        return f"cannot read {path}: {error.strerror or error}"
    except crypto.Error:
        return f"{path} holds no PEM certificate"
    return None


@frozen(kw_only=True)
class ClusterConfig:
    """The ``[cluster]`` section: several nodes as one service, through Redis
    (docs/cluster.md). Without ``redis_url`` the server is one node."""

    section: ClassVar[str] = "cluster"

    redis_url: str = field(default="", validator=_check_redis_url)
    redis_ca_file: str = field(default="", validator=_path(optional=True))
    node_name: str = field(default="", validator=_check_cluster_node)
    public_url: str = field(default="", validator=_check_public_url)
    secret_file: str = field(default="", validator=_path(optional=True))
    heartbeat_interval: float = field(default=1.0, validator=_seconds(zero_means_never=False))
    node_ttl: float = field(default=5.0, validator=_seconds(zero_means_never=False))
    redis_timeout: float = field(default=0.5, validator=_seconds(zero_means_never=False))
    key_prefix: str = field(default="shellserver:", validator=_check_key_prefix)

    def __attrs_post_init__(self) -> None:
        # Checks across keys, once every key is valid on its own.
        if self.node_ttl <= 2 * self.heartbeat_interval:
            raise ConfigError(
                key="cluster.node_ttl",
                message=f"must be more than twice cluster.heartbeat_interval "
                        f"({self.heartbeat_interval!r}), got {self.node_ttl!r}")
        if not self.redis_url:
            return
        for name in ("node_name", "public_url"):
            if not getattr(self, name):
                raise ConfigError(key=f"cluster.{name}",
                                  message="must be set when cluster.redis_url is set")
        if self.redis_ca_file:
            problem = _ca_file_problem(self.redis_ca_file)
            if problem is not None:
                raise ConfigError(key="cluster.redis_ca_file", message=problem)

    @property
    def enabled(self) -> bool:
        return bool(self.redis_url)

    @property
    def public_origin(self) -> str:
        """scheme://host[:port] of ``public_url``."""
        parts = urlsplit(self.public_url)
        return f"{parts.scheme}://{parts.netloc}"


_SECTIONS: Mapping[str, type] = {
    "server": ServerConfig,
    "tls": TLSConfig,
    "console": ConsoleConfig,
    "sandbox": SandboxConfig,
    "embed": EmbedConfig,
    "admission": AdmissionConfig,
    "cluster": ClusterConfig,
}


@frozen(kw_only=True)
class Config:
    """The whole configuration, one attribute per TOML section."""

    server: ServerConfig = field(factory=ServerConfig)
    tls: TLSConfig = field(factory=TLSConfig)
    console: ConsoleConfig = field(factory=ConsoleConfig)
    sandbox: SandboxConfig = field(factory=SandboxConfig)
    embed: EmbedConfig = field(factory=EmbedConfig)
    admission: AdmissionConfig = field(factory=AdmissionConfig)
    cluster: ClusterConfig = field(factory=lambda: ClusterConfig())

    @classmethod
    def defaults(cls) -> Config:
        """The configuration used when no file is given."""
        return cls()

    def with_state_dir(self, path: str | os.PathLike[str]) -> Config:
        """
        A copy with another ``server.state_dir`` (``--state-dir`` beats the
        file). The path must be absolute; make it so before calling.
        """
        return attrs.evolve(
            self, server=attrs.evolve(self.server, state_dir=os.fspath(path))
        )

    def node_name(self) -> str:
        """This node's name in tokens, logs and the admin page: the cluster's
        ``node_name`` when clustered, else ``server.node`` or the host name."""
        return self.cluster.node_name or self.server.node_name()

    @property
    def tls_dir(self) -> str:
        """Where the self-signed certificate and its key are kept."""
        return os.path.join(self.server.state_dir, "tls")

    @property
    def secret_path(self) -> str:
        """The HMAC secret that signs console tokens (``cluster.secret_file``
        when set: every node of a cluster signs with the same one)."""
        return self.cluster.secret_file or os.path.join(self.server.state_dir, "secret")

    @property
    def kill_switch_path(self) -> str:
        """The file whose presence stops new consoles."""
        return self.admission.kill_switch_file or os.path.join(
            self.server.state_dir, "kill-switch"
        )

    @property
    def runtime_dir(self) -> str:
        """The console runtime venv: ``sandbox.runtime``, or state_dir/runtime."""
        return self.sandbox.runtime or os.path.join(self.server.state_dir, "runtime")


def _unknown(name: str, known: list[str], key: str, what: str) -> ConfigError:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(
        key=key, message=f"unknown {what}{hint}; known: {', '.join(known)}"
    )


def _build_section(name: str, table: object) -> Any:
    cls = _SECTIONS[name]
    if not isinstance(table, dict):
        raise ConfigError(
            key=name, message=f"must be a table [{name}], got {_describe(table)}"
        )
    known = [a.name for a in attrs.fields(cls)]
    for key in table:
        if key not in known:
            raise _unknown(key, known, f"{name}.{key}", "key")
    return cls(**table)


def _syntax_error(reason: str, text: str, source: str) -> ConfigError:
    # Python 3.11's TOMLDecodeError has no line attribute, only a suffix:
    # "(at line N, column M)" or "(at end of document)".
    found = re.search(r"\s*\(at (?:line (\d+), column \d+|end of document)\)$", reason)
    if found is None:
        return ConfigError(message=f"invalid TOML: {reason}", source=source)
    line = (
        int(found.group(1)) if found.group(1) else len(text.rstrip().splitlines()) or 1
    )
    return ConfigError(
        message=f"invalid TOML: {reason[: found.start()]}", source=source, line=line
    )


def load_config(text: str | None, *, source: str = "<config>") -> Config:
    """
    Parse and check TOML configuration text; None gives the defaults.

    Missing sections and keys take their defaults. Raises L{ConfigError}.
    """
    if text is None:
        return Config.defaults()
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise _syntax_error(str(error), text, source) from None
    sections = {}
    for name, table in document.items():
        if name not in _SECTIONS:
            raise _unknown(name, list(_SECTIONS), name, "section")
        sections[name] = _build_section(name, table)
    return Config(**sections)


def load_config_file(path: str | os.PathLike[str]) -> Config:
    """Read, parse and check a TOML configuration file. Raises L{ConfigError}."""
    name = os.fspath(path)
    try:
        with open(name, "rb") as file:
            data = file.read()
    except OSError as error:
        raise ConfigError(
            message=f"cannot read config file {name}: {error.strerror or error}",
            source=name,
        ) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(
            message=f"config file {name} is not UTF-8: {error}", source=name
        ) from None
    return load_config(text, source=name)


_BASE_PATH = re.compile(r"(/[A-Za-z0-9._~-]+)+")


def _check_base_path(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value == "" or (isinstance(value, str) and _BASE_PATH.fullmatch(value)
                       and not any(part in (".", "..") for part in value.split("/"))):
        return
    raise _fail(instance, attribute,
                '"" or a path like "/console-svc" (segments of letters, digits, '
                f"'.', '_', '~', '-'; no trailing slash), got {_describe(value)}")
