"""`twistd shellserver`: options, and the one place that wires everything."""

from __future__ import annotations

import os
import socket

from twisted.application import strports
from twisted.application.service import MultiService, Service
from twisted.logger import Logger
from twisted.python import usage

import shellserver
from shellserver.config import Config, ConfigError, load_config, load_config_file

log = Logger()

DEFAULT_PORT = 8443
DEFAULT_WEB_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(shellserver.__file__))), "web"
)
NAMESPACES = ("mnt", "pid", "net", "ipc", "uts", "cgroup")


class Options(usage.Options):
    synopsis = "[--listen ENDPOINT ...] [--config FILE] [--state-dir DIR]"
    longdesc = (
        "Serve sandboxed IPython consoles to browsers. Without --listen, serves "
        f"TLS on port {DEFAULT_PORT} with the configured certificate, or a "
        "self-signed one generated into the state directory."
    )
    optParameters = [
        ["config", "c", None, "TOML configuration file (see etc/shellserver.toml)."],
        ["state-dir", None, None, "State directory (overrides server.state_dir)."],
        ["web-dir", None, DEFAULT_WEB_DIR, "Browser files (web/ with node_modules)."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []

    def opt_listen(self, description: str) -> None:
        """A Twisted endpoint to serve on, e.g. ssl:8443:privateKey=k.pem
        (repeatable)."""
        self["listen"].append(description)

    opt_l = opt_listen

    def postOptions(self) -> None:
        try:
            if self["config"]:
                config = load_config_file(self["config"])
            else:
                config = load_config(None)
        except ConfigError as e:
            raise usage.UsageError(f"configuration: {e}") from e
        if self["state-dir"]:
            if not os.path.isabs(self["state-dir"]):
                self["state-dir"] = os.path.abspath(self["state-dir"])
            config = config.with_state_dir(self["state-dir"])
        self["configuration"] = config
        self._check_listen()
        check_host(config)

    def _check_listen(self) -> None:
        from twisted.internet import endpoints, reactor

        for description in self["listen"]:
            try:
                endpoints.serverFromString(reactor, description)
            except (ValueError, TypeError, KeyError) as e:
                raise usage.UsageError(f"--listen {description!r}: {e}") from e


def check_host(config: Config) -> None:
    """Refuse to start where consoles could not be sandboxed."""
    from shellserver.sandbox.cgroups import CgroupError, read_layout

    if os.geteuid() != 0:
        raise usage.UsageError(
            "shellserver must run as root: it builds a sandbox (namespaces, "
            "cgroups, a private uid) for every console and will not run "
            "consoles unsandboxed."
        )
    missing = [ns for ns in NAMESPACES if not os.path.exists(f"/proc/self/ns/{ns}")]
    if missing:
        raise usage.UsageError(
            "this kernel lacks the namespaces the sandbox needs: " + ", ".join(missing)
        )
    try:
        read_layout()
    except (CgroupError, OSError) as e:
        raise usage.UsageError(f"cgroups: {e}") from e
    python = config.sandbox.system_python
    if not os.access(python, os.X_OK):
        raise usage.UsageError(
            f"sandbox.system_python: {python} is missing (install python3 and python3-venv)"
        )


class SandboxService(Service):
    """Owns the sandboxes: builds the runtime if needed, ends all at shutdown."""

    name = "sandboxes"

    def __init__(self, reactor, starter, runtime: str, build: bool, pool=None) -> None:
        self._reactor = reactor
        self.starter = starter
        self._runtime = runtime
        self._build = build
        self.pool = pool

    def startService(self) -> None:
        super().startService()
        if self.pool is not None:
            self.pool.start_filling()
        if self._build:
            from shellserver.sandbox.runtime import build_runtime

            self.starter.set_unavailable(
                "the console runtime is still being built; try again in a minute"
            )
            d = build_runtime(self._reactor, self._runtime,
                              self.starter.system_python)
            d.addCallback(lambda _: self._runtime_ready())

            def failed(failure):
                log.failure("the console runtime could not be built", failure)
                self.starter.set_unavailable("the console runtime could not be built")

            d.addErrback(failed)

    def _runtime_ready(self) -> None:
        self.starter.set_available()
        if self.pool is not None:
            self.pool.retry_now()

    def stopService(self):
        from shellserver.sandbox.cgroups import remove_parents

        super().stopService()
        if self.pool is not None:
            self.pool.stop()
        log.info("ending {count} consoles", count=len(self.starter.running))
        d = self.starter.stop_all()
        if self.starter.cgroup_layout is not None:
            d.addCallback(lambda _: remove_parents(self.starter.cgroup_layout))
        return d


class KillSwitchService(Service):
    """Watches the kill-switch file while the server runs."""

    name = "kill-switch"

    def __init__(self, switch) -> None:
        self.switch = switch

    def startService(self) -> None:
        super().startService()
        self.switch.start()

    def stopService(self):
        super().stopService()
        self.switch.stop()


def admission_capacity(config: Config) -> int:
    """``admission.capacity``, or else derived from the machine's memory."""
    from shellserver.admission import derived_capacity

    if config.admission.capacity:
        return config.admission.capacity
    with open("/proc/meminfo") as f:
        return derived_capacity(config.sandbox.memory_mb, f.read())


def makeService(options: Options) -> MultiService:
    from twisted.internet import reactor

    from shellserver.admission import Admission, KillSwitch
    from shellserver.auth import SecretFileError, TokenAuthority, load_or_create_secret
    from shellserver.console import ConsoleFactory, ConsoleSettings
    from shellserver.sandbox.cgroups import prepare_parents, read_layout
    from shellserver.sandbox.pool import SandboxPool
    from shellserver.sandbox.runtime import check_prebuilt, runtime_is_ready
    from shellserver.sandbox.service import SandboxStarter
    from shellserver.sandbox.spec import SandboxLimits
    from shellserver.sandbox.uids import UidPool
    from shellserver.sockjs import SockJSOptions, SockJSResource
    from shellserver.tls import endpoint_description, ensure_self_signed
    from shellserver.users import UnregisteredUsers
    from shellserver.web import ShellSite, build_resource

    config: Config = options["configuration"]
    state_dir = config.server.state_dir
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    os.chmod(state_dir, 0o700)

    try:
        secret = load_or_create_secret(os.path.join(state_dir, "secret"))
    except SecretFileError as e:
        raise usage.UsageError(str(e)) from e
    tokens = TokenAuthority(
        secret,
        node=config.server.node or socket.gethostname(),
        clock=reactor,
        ttl=config.console.token_ttl,
    )

    layout = read_layout()
    prepare_parents(layout)
    sandbox_root = os.path.join(state_dir, "sandbox-root")
    os.makedirs(sandbox_root, mode=0o755, exist_ok=True)

    if config.sandbox.runtime:
        runtime = config.sandbox.runtime
        try:
            check_prebuilt(runtime)
        except Exception as e:
            raise usage.UsageError(str(e)) from e
        build = False
    else:
        runtime = os.path.join(state_dir, "runtime")
        build = not runtime_is_ready(runtime)

    starter = SandboxStarter(
        reactor=reactor,
        limits=SandboxLimits.from_config(config.sandbox),
        runtime=runtime,
        root=sandbox_root,
        cgroup_layout=layout,
        uids=UidPool(config.sandbox.uid_min, config.sandbox.uid_max),
        system_python=config.sandbox.system_python,
    )
    admission = Admission(
        reactor,
        capacity=admission_capacity(config),
        per_address=config.admission.per_address,
        per_address_per_minute=config.admission.per_address_per_minute,
    )
    users = UnregisteredUsers(reactor, config.console.token_ttl)
    pool = None
    if config.sandbox.pool_size:
        pool = SandboxPool(starter, reactor, config.sandbox.pool_size, room=admission.room)
    consoles = ConsoleFactory(
        reactor,
        tokens,
        pool or starter,
        ConsoleSettings(
            auth_timeout=config.console.auth_timeout,
            idle_timeout=config.console.idle_timeout,
            max_age=config.console.max_age,
            output_high_water=config.console.output_high_water,
            output_low_water=config.console.output_low_water,
        ),
        admission,
        users,
    )
    switch = KillSwitch(reactor, admission, config.kill_switch_path, consoles.end_all)
    sockjs = SockJSResource(consoles, clock=reactor, options=SockJSOptions())
    site = ShellSite(
        build_resource(
            web_dir=options["web-dir"], tokens=tokens, clock=reactor, sockjs=sockjs,
            admission=admission, users=users,
            host_origins=config.embed.host_origins + config.server.public_origins,
            selector=config.embed.selector, status_max_age=config.embed.status_max_age,
        )
    )

    listen = list(options["listen"])
    if not listen:
        if config.tls.certificate:
            cert, key = config.tls.certificate, config.tls.private_key
        else:
            cert, key = ensure_self_signed(os.path.join(state_dir, "tls"))
        listen.append(endpoint_description(DEFAULT_PORT, cert, key))

    top = MultiService()
    SandboxService(reactor, starter, runtime, build, pool).setServiceParent(top)
    KillSwitchService(switch).setServiceParent(top)
    for index, description in enumerate(listen):
        listener = strports.service(description, site)
        listener.setName(f"listen-{index}")
        listener.setServiceParent(top)
    return top
