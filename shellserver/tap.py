"""`twistd shellserver`: options, and the one place that wires everything."""

from __future__ import annotations

import hashlib
import os
import resource
import socket
import sys
from typing import TYPE_CHECKING

from attrs import evolve, frozen
from twisted.application import strports
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python import usage

import shellserver
from shellserver.config import Config, ConfigError, load_config, load_config_file
from shellserver.console import describe_duration
from shellserver.sandbox.cgroups import CgroupLayout
from shellserver.startup import EXIT_HOST_REFUSED, HostRefusal, exit_refused

if TYPE_CHECKING:
    from shellserver.auth import UsedTokenFile

log = Logger()

DEFAULT_PORT = 8443
DEFAULT_WEB_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(shellserver.__file__))), "web"
)
NAMESPACES = ("mnt", "pid", "net", "ipc", "uts", "cgroup")
FLUSH_DELAY = 0.5  # seconds for the goodbye messages to leave at shutdown
# Open files the server holds for each console besides its connection (the
# launcher's PTY, the output pipe, one spare), and for everything else
# (listeners, the log, the state directory, the reactor's own).
FILES_PER_CONSOLE = 3
FILES_RESERVED = 256
FEWEST_CONNECTIONS = 16
# --check-config's exit status for a file that cannot be used: EX_CONFIG, as
# for the host's refusals (systemd's ExecStartPre= fails with it, unrestarted).
EXIT_CONFIG_INVALID = EXIT_HOST_REFUSED


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
        ["metrics", None, None,
         "A Twisted endpoint serving Prometheus metrics at /metrics, e.g. "
         "tcp:9100:interface=127.0.0.1 (off unless given; keep it on loopback or "
         "an internal network: it has no authentication)."],
        ["check-config", None, None,
         "Check this TOML configuration file and exit: 0 and \"ok\", or "
         f"{EXIT_CONFIG_INVALID} and the key at fault. Starts nothing."],
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
        if self["check-config"] is not None:
            raise check_config(self["check-config"], sys.stdout, sys.stderr)
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
        self._choose_log_format(config)
        self._check_listen()
        self._check_metrics()
        try:
            check_host(config)
            self["connections"] = plan_connections(config)
            self["prepared"] = prepare_state(config, need_tls=not self["listen"])
        except HostRefusal as refusal:
            raise exit_refused(refusal, sys.stderr) from None

    def _choose_log_format(self, config: Config) -> None:
        """server.log_format = "json": twistd's log becomes JSON lines, through
        its own --logger hook (an explicit --logger or --syslog wins)."""
        from shellserver.logs import json_log_to

        twistd = getattr(self, "parent", None)
        if config.server.log_format != "json" or twistd is None:
            return
        if twistd.get("logger") or twistd.get("syslog"):
            return
        twistd["logger"] = json_log_to(twistd.get("logfile"),
                                       nodaemon=bool(twistd.get("nodaemon")))

    def _check_metrics(self) -> None:
        from twisted.internet import endpoints, reactor

        description = self["metrics"]
        if description is None:
            return
        try:
            endpoints.serverFromString(reactor, description)
        except (ValueError, TypeError, KeyError, OSError) as e:
            raise usage.UsageError(f"--metrics {description!r}: {e}") from e

    def _check_listen(self) -> None:
        from twisted.internet import endpoints, reactor

        for description in self["listen"]:
            try:
                endpoints.serverFromString(reactor, description)
            except (ValueError, TypeError, KeyError) as e:
                raise usage.UsageError(f"--listen {description!r}: {e}") from e
            except OSError as e:
                # ssl: reads its key and certificate here; without
                # privateKey= it looks for server.pem in the current directory.
                raise usage.UsageError(
                    f"--listen {description!r}: cannot read {e.filename or 'a file'}: "
                    f"{e.strerror or e}. An ssl: endpoint needs privateKey=KEY.pem and "
                    "certKey=CERT.pem (absolute paths of PEM files)"
                ) from e


def check_config(path: str, out, err) -> SystemExit:
    """``--check-config``: read and validate ``path`` only (no state
    directory, cgroup, listener or sandbox is touched); say "ok" on ``out``
    or the problem, naming the key, on ``err``; the SystemExit to raise."""
    try:
        load_config_file(path)
    except ConfigError as e:
        err.write(f"shellserver: {path}: {e}\n")
        return SystemExit(EXIT_CONFIG_INVALID)
    out.write(f"ok: {path}\n")
    return SystemExit(0)


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
        layout = read_layout()
    except (CgroupError, OSError) as e:
        raise HostRefusal(f"cgroups: {e}") from e
    move_to_delegated_scope(layout, config)
    python = config.sandbox.system_python
    if not os.access(python, os.X_OK):
        raise usage.UsageError(
            f"sandbox.system_python: {python} is missing (install python3 and python3-venv)"
        )


def move_to_delegated_scope(layout: CgroupLayout, config: Config) -> None:
    """Started by hand where the server's cgroup lacks controllers, on a
    systemd host: re-execute in a delegated scope (see shellserver.scope).
    Returns when it stays (then prepare_parents refuses if it must)."""
    from shellserver import scope

    available: list[str] = []
    if layout.v2_controllers and layout.own:
        try:
            with open(os.path.join(layout.own, "cgroup.controllers")) as f:
                available = f.read().split()
        except OSError:
            return  # prepare_parents names the file and the error
    reason = scope.move_reason(v2_controllers=layout.v2_controllers, own_cgroup=layout.own,
                               available=available, environ=os.environ,
                               systemd_running=os.path.isdir("/run/systemd/system"))
    if reason is None:
        return
    why_not = scope.reexec_in_scope(reason, instance_name(config.server.state_dir))
    if why_not:
        sys.stderr.write(f"shellserver: not moving into a delegated scope: {why_not}\n")


@frozen
class PreparedState:
    """What start-up made ready in the state directory and the cgroup tree."""

    secret: bytes
    layout: CgroupLayout
    sandbox_root: str
    pipes: str
    runtime: str
    build_runtime: bool
    tls: tuple[str, str] | None
    busy_uids: frozenset[int]
    notices: tuple[str, ...]
    used_tokens: UsedTokenFile | None = None  # single use across restarts


def instance_name(state_dir: str) -> str:
    """A cgroup directory name for the server that owns ``state_dir``."""
    return "i" + hashlib.sha256(os.fsencode(state_dir)).hexdigest()[:12]


def prepare_state(config: Config, *, need_tls: bool) -> PreparedState:
    """Make the state directory and the cgroup tree ready, or say clearly why not.

    Also sweeps what a previous run of this server left (it was SIGKILLed):
    session cgroups are killed and removed, and uids still owning processes
    are never handed out.
    """
    from shellserver.auth import (
        SecretFileError,
        UsedTokenFile,
        UsedTokenFileError,
        load_or_create_secret,
    )
    from shellserver.sandbox.cgroups import CgroupError, prepare_parents, read_layout, sweep
    from shellserver.sandbox.output import prepare_directory as prepare_pipes
    from shellserver.sandbox.runtime import (
        RuntimeProblem,
        check_overlay_path,
        check_prebuilt,
        runtime_is_ready,
    )
    from shellserver.sandbox.uids import uids_in_use
    from shellserver.tls import ensure_self_signed

    state_dir = config.server.state_dir
    notices = []
    # Checked first: a start that fails here leaves nothing behind.
    try:
        check_overlay_path("sandbox.runtime", config.sandbox.runtime or config.runtime_dir)
        check_overlay_path("server.state_dir", state_dir)  # holds the sandbox root
    except RuntimeProblem as e:
        raise usage.UsageError(str(e)) from e
    if config.sandbox.runtime:
        runtime, build = config.sandbox.runtime, False
        try:
            check_prebuilt(runtime, config.sandbox.packages)
        except (RuntimeProblem, OSError) as e:
            raise usage.UsageError(str(e)) from e
    else:
        runtime = config.runtime_dir
        # Rebuilt when sandbox.packages (or what a build installs) changed.
        build = not runtime_is_ready(runtime, config.sandbox.packages)
    try:
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        os.chmod(state_dir, 0o700)
        secret = load_or_create_secret(config.secret_path)
        used_tokens = UsedTokenFile.open(os.path.join(state_dir, "used-tokens"))
        sandbox_root = os.path.join(state_dir, "sandbox-root")
        os.makedirs(sandbox_root, mode=0o755, exist_ok=True)
        pipes = os.path.join(state_dir, "pipes")
        stale_pipes = prepare_pipes(pipes)
        tls = None
        if need_tls:
            if config.tls.certificate:
                tls = (config.tls.certificate, config.tls.private_key)
            else:
                tls = ensure_self_signed(config.tls_dir)
        layout = read_layout().for_instance(instance_name(state_dir))
        notices += prepare_parents(layout)
    except (SecretFileError, UsedTokenFileError) as e:
        raise usage.UsageError(str(e)) from e
    except CgroupError as e:
        raise HostRefusal(f"cgroups: {e}") from e
    except OSError as e:
        where = e.filename or state_dir
        raise usage.UsageError(
            f"server.state_dir {state_dir}: cannot prepare {where}: {e.strerror or e}"
        ) from e

    if stale_pipes:
        notices.append(f"removed {stale_pipes} output pipes a previous run left behind")
    removed, remaining = sweep(layout)
    if removed:
        notices.append(f"removed {len(removed)} cgroups a previous run left behind")
    if remaining:
        raise usage.UsageError(
            "cgroups of a previous run cannot be removed (processes in them do not "
            "die): " + ", ".join(remaining)
        )
    busy = frozenset(uids_in_use(config.sandbox.uid_min, config.sandbox.uid_max))
    if busy:
        notices.append(f"uids still in use by other processes, never handed out: "
                       f"{sorted(busy)}")

    return PreparedState(secret=secret, layout=layout, sandbox_root=sandbox_root, pipes=pipes,
                         runtime=runtime, build_runtime=build, tls=tls, busy_uids=busy,
                         notices=tuple(notices), used_tokens=used_tokens)


class SandboxService(Service):
    """Owns the sandboxes: builds the runtime if needed, drains at shutdown.

    Shutting down refuses new consoles, tells every user, gives them
    ``grace`` seconds, then ends the consoles and cleans up after them.
    """

    name = "sandboxes"

    def __init__(self, reactor, starter, runtime: str, build: bool, *, pool=None,
                 consoles=None, admission=None, grace: float = 0.0, budget=None,
                 packages: tuple[str, ...] = ()) -> None:
        self._reactor = reactor
        self.starter = starter
        self._runtime = runtime
        self._build = build
        self._packages = packages
        self._runtime_waiters: list[Deferred] = []
        self.pool = pool
        self._consoles = consoles
        self._admission = admission
        self._grace = grace
        self._budget = budget

    def startService(self) -> None:
        super().startService()
        if self._budget is not None:
            self._budget.start()
        if self.pool is not None:
            self.pool.start_filling()
        if self._build:
            from shellserver.sandbox.runtime import build_runtime

            self.starter.set_unavailable(
                "the console runtime is still being built; try again in a minute"
            )
            d = build_runtime(self._reactor, self._runtime,
                              self.starter.system_python, self._packages)
            d.addCallback(lambda _: self._runtime_ready())

            def failed(failure):
                log.failure("the console runtime could not be built", failure)
                self.starter.set_unavailable("the console runtime could not be built")

            d.addErrback(failed)

    def when_runtime_ready(self) -> Deferred:
        """A Deferred that fires once the console runtime is ready (at once
        when it was built before start)."""
        if not self._build:
            return succeed(None)
        d: Deferred = Deferred()
        self._runtime_waiters.append(d)
        return d

    def _runtime_ready(self) -> None:
        self._build = False
        waiters, self._runtime_waiters = self._runtime_waiters, []
        for d in waiters:
            d.callback(None)
        self.starter.set_available()
        if self.pool is not None:
            self.pool.retry_now()

    def stopService(self):
        from twisted.internet.task import deferLater

        super().stopService()
        if self._budget is not None:
            self._budget.stop()
        if self._admission is not None:
            self._admission.draining = True
        if self.pool is not None:
            self.pool.stop()
        grace = 0.0
        if self._consoles is not None and self._consoles.sessions and self._grace > 0:
            grace = self._grace
            self._consoles.notify_all(
                "The server is shutting down: this console ends in "
                f"{describe_duration(grace)}. Save anything you need now."
            )
            self._consoles.warn_all("shutdown", grace)
        log.info("draining {count} consoles for {grace}s", count=len(self.starter.running),
                 grace=grace)
        d = deferLater(self._reactor, grace, lambda: None)
        if self._consoles is not None:
            d.addCallback(lambda _: self._consoles.end_all("The server has shut down."))
        d.addCallback(lambda _: self.starter.stop_all())
        if grace:
            # The reactor stops right after this; give the last messages and
            # close frames a moment to leave.
            d.addCallback(lambda _: deferLater(self._reactor, FLUSH_DELAY, lambda: None))
        if self.starter.cgroup_layout is not None:
            d.addCallback(lambda _: self.starter.reaper.remove_parents(self.starter.cgroup_layout))
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


@frozen
class ConnectionPlan:
    """How many consoles and connections this server takes, once the
    open-files limit is known; ``notices`` say what was lowered."""

    capacity: int
    max_connections: int
    notices: tuple[str, ...]


def plan_connections(config: Config) -> ConnectionPlan:
    """The admission capacity, and ``server.max_connections`` within what the
    process may open.

    Raises the open-files limit to its hard limit first (a root shell
    starts with 1024).
    """
    open_files = raise_open_files_limit()
    try:
        capacity, pool_notices = fit_host_pools_to(config, admission_capacity(config))
        cap, notices = connection_budget(config.server.max_connections, capacity, open_files)
    except ValueError as e:
        raise usage.UsageError(str(e)) from e
    return ConnectionPlan(capacity=capacity, max_connections=cap,
                          notices=(*pool_notices, *notices))


def fit_host_pools_to(config: Config, capacity: int) -> tuple[int, list[str]]:
    """Size the host-wide kernel pools (PTYs, pids, files) for ``capacity``
    consoles, or lower it (shellserver.sandbox.hostpools)."""
    from shellserver.sandbox import hostpools
    from shellserver.sandbox.spec import SandboxLimits

    with open("/proc/meminfo") as f:
        memory_kib = hostpools.memory_kib(f.read())
    pools = hostpools.host_pools(SandboxLimits.from_config(config.sandbox), memory_kib,
                                 hostpools.read_proc_sysctl)
    return hostpools.fit_host_pools(capacity, pools, hostpools.write_proc_sysctl)


def raise_open_files_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard one; the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def connection_budget(max_connections: int, capacity: int,
                      open_files: int) -> tuple[int, list[str]]:
    """How many connections fit in ``open_files`` beside ``capacity`` consoles
    (pure): ``max_connections`` when they fit, else fewer with a notice.
    ValueError when not even FEWEST_CONNECTIONS fit."""
    room = open_files - FILES_RESERVED - FILES_PER_CONSOLE * capacity
    if room >= max_connections:
        return max_connections, []
    advice = ("raise the limit (LimitNOFILE= in the systemd unit, ulimit -n in a shell) "
              "or lower admission.capacity")
    if room < FEWEST_CONNECTIONS:
        raise ValueError(
            f"the process may open only {open_files} files: too few for {capacity} "
            f"consoles ({FILES_PER_CONSOLE} files each) and {FEWEST_CONNECTIONS} "
            f"connections; {advice}")
    return room, [
        f"server.max_connections lowered from {max_connections} to {room}: the process "
        f"may open only {open_files} files, and {capacity} consoles need "
        f"{FILES_PER_CONSOLE} each; {advice}"]


def admission_capacity(config: Config) -> int:
    """``admission.capacity``, or else derived from the machine's memory."""
    from shellserver.admission import derived_capacity

    if config.admission.capacity:
        return config.admission.capacity
    with open("/proc/meminfo") as f:
        return derived_capacity(config.sandbox.memory_mb, f.read())


def console_settings_of(config: Config):
    """What each new console takes from the configuration (at start and on reload)."""
    from shellserver.console import ConsoleSettings

    return ConsoleSettings(
        auth_timeout=config.console.auth_timeout,
        idle_timeout=config.console.idle_timeout,
        max_age=config.console.max_age,
        output_high_water=config.console.output_high_water,
        output_low_water=config.console.output_low_water,
        node=config.server.node_name(),
        reattach_grace=(min(config.console.reattach_grace, config.console.max_age)
                        if config.console.max_age else config.console.reattach_grace),
    )


def makeService(options: Options) -> MultiService:
    from twisted.internet import reactor

    from shellserver.admission import Admission, KillSwitch
    from shellserver.auth import TokenAuthority
    from shellserver.console import ConsoleFactory
    from shellserver.limits import ConnectionGuard, ConnectionLimits
    from shellserver.listeners import listener_service
    from shellserver.metrics import Metrics, metrics_site
    from shellserver.proxies import TrustedProxies
    from shellserver.sandbox.budget import CpuBudgetWatcher
    from shellserver.sandbox.output import FifoPipes
    from shellserver.sandbox.pool import SandboxPool
    from shellserver.sandbox.service import SandboxStarter
    from shellserver.sandbox.spec import SandboxLimits
    from shellserver.sandbox.uids import UidPool
    from shellserver.sockjs import SockJSOptions, SockJSResource
    from shellserver.tls import endpoint_description
    from shellserver.users import UnregisteredUsers
    from shellserver.web import ShellSite, build_resource, under_base_path

    config: Config = options["configuration"]
    prepared: PreparedState = options["prepared"]
    connections: ConnectionPlan = options["connections"]
    for notice in (*prepared.notices, *connections.notices):
        log.warn("start-up: {notice}", notice=notice)
    tokens = TokenAuthority(
        prepared.secret,
        node=config.server.node or socket.gethostname(),
        clock=reactor,
        ttl=config.console.token_ttl,
        allow_originless=config.console.allow_originless,
        used=prepared.used_tokens,
    )
    uids = UidPool(config.sandbox.uid_min, config.sandbox.uid_max)
    uids.exclude(prepared.busy_uids)
    runtime, build = prepared.runtime, prepared.build_runtime

    starter = SandboxStarter(
        reactor=reactor,
        limits=SandboxLimits.from_config(config.sandbox),
        runtime=runtime,
        root=prepared.sandbox_root,
        cgroup_layout=prepared.layout,
        uids=uids,
        outputs=FifoPipes(reactor, prepared.pipes),
        system_python=config.sandbox.system_python,
    )
    admission = Admission(
        reactor,
        capacity=connections.capacity,
        per_address=config.admission.per_address,
        per_address_per_minute=config.admission.per_address_per_minute,
        auth_failures_per_minute=config.server.auth_failures_per_minute,
        pages_per_address_per_minute=config.admission.pages_per_address_per_minute,
    )
    users = UnregisteredUsers(reactor, config.console.token_ttl)
    metrics = Metrics()
    metrics.capacity.set(connections.capacity)
    metrics.watch_active(lambda: admission.active)
    pool = None
    if config.sandbox.pool_size:
        pool = SandboxPool(starter, reactor, config.sandbox.pool_size, room=admission.room,
                           metrics=metrics)
    consoles = ConsoleFactory(
        reactor,
        tokens,
        pool or starter,
        console_settings_of(config),
        admission,
        users,
        metrics=metrics,
    )
    switch = KillSwitch(reactor, admission, config.kill_switch_path,
                        consoles.end_all_by_kill_switch)
    limits = evolve(ConnectionLimits.from_config(config.server),
                    max_connections=connections.max_connections)
    sockjs = SockJSResource(consoles, clock=reactor, options=SockJSOptions(
        input_messages_per_second=config.console.input_messages_per_second,
        input_bytes_per_second=config.console.input_bytes_per_second,
        input_burst_messages=config.console.input_burst_messages,
        input_burst_bytes=config.console.input_burst_bytes,
    ), input_dropped=metrics.input_dropped.inc)
    tree = build_resource(
        web_dir=options["web-dir"], tokens=tokens, clock=reactor, sockjs=sockjs,
        admission=admission, users=users,
        host_origins=config.embed.host_origins + config.server.public_origins,
        selector=config.embed.selector, status_max_age=config.embed.status_max_age,
    )
    site = ShellSite(
        under_base_path(tree, config.server.base_path),
        limits=limits, reactor=reactor, hsts_max_age=config.server.hsts_max_age,
        trusted_proxies=TrustedProxies.from_strings(config.server.trusted_proxies,
                                                    config.server.proxy_header),
    )
    site.metrics = metrics  # LimitedHTTPChannel counts its refusals there
    # Every listener serves the site through the per-connection limits.
    guarded = ConnectionGuard(site, limits, reactor)
    guarded.metrics = metrics

    listen = list(options["listen"])
    if not listen:
        cert, key = prepared.tls
        listen.append(endpoint_description(DEFAULT_PORT, cert, key))

    top = MultiService()
    budget = CpuBudgetWatcher(
        reactor, lambda: list(starter.running.values()), budget=config.sandbox.cpu_budget,
        tarpit_quota=config.sandbox.tarpit_quota, grace=config.sandbox.tarpit_seconds,
        interval=min(2.0, max(0.25, config.sandbox.cpu_budget / 4)),
    )
    sandboxes = SandboxService(reactor, starter, runtime, build, pool=pool, consoles=consoles,
                               admission=admission, grace=config.console.shutdown_grace,
                               budget=budget, packages=config.sandbox.packages)
    sandboxes.setServiceParent(top)
    KillSwitchService(switch).setServiceParent(top)
    for index, description in enumerate(listen):
        listener = listener_service(reactor, description, guarded)
        listener.setName(f"listen-{index}")
        listener.setServiceParent(top)
    if options["metrics"]:
        # Its own listener, outside the site's limits and origin checks: an
        # operator's scraper, on loopback or an internal network.
        scrape = strports.service(options["metrics"], metrics_site(metrics))
        scrape.setName("metrics")
        scrape.setServiceParent(top)
    add_systemd_services(top, sandboxes, reactor, os.environ, os.getpid())
    add_reload_service(top, reactor, options["config"], config, admission=admission,
                       metrics=metrics, switch=switch, consoles=consoles, pool=pool,
                       resource=tree)
    return top


def add_reload_service(top: MultiService, reactor, path: str | None, config: Config, *,
                       admission, metrics, switch, consoles, pool, resource) -> None:
    """SIGHUP re-reads ``path`` and hands what can change live to its owners
    (shellserver.reload; docs/operations.md, "Reload")."""
    from shellserver.reload import ConfigReloader, ReloadOnHangup
    from shellserver.web import set_host_origins

    reloader = ConfigReloader(os.path.abspath(path) if path else None, config)

    def limits(new: Config) -> None:
        try:
            capacity, notices = fit_host_pools_to(new, admission_capacity(new))
        except (ValueError, OSError) as e:
            log.warn("reload: capacity unchanged ({error})", error=str(e))
            capacity, notices = admission.capacity, []
        for notice in notices:
            log.warn("reload: {notice}", notice=notice)
        admission.capacity = capacity
        metrics.capacity.set(capacity)
        admission.per_address = new.admission.per_address
        admission.per_address_per_minute = new.admission.per_address_per_minute
        admission.pages_per_address_per_minute = new.admission.pages_per_address_per_minute
        admission.auth_failures_per_minute = new.server.auth_failures_per_minute

    def kill_switch(new: Config) -> None:
        if switch.path != new.kill_switch_path:
            switch.path = new.kill_switch_path
            switch.check()

    def console_settings(new: Config) -> None:
        consoles.use_settings(console_settings_of(new))

    def pool_size(new: Config) -> None:
        if pool is not None:
            pool.resize(new.sandbox.pool_size)
        elif new.sandbox.pool_size:
            # Without a pool at start there is none to resize.
            log.warn("configuration: sandbox.pool_size needs a restart to turn the "
                     "warm pool on")

    def origins(new: Config) -> None:
        set_host_origins(resource, new.embed.host_origins + new.server.public_origins)

    for apply in (limits, kill_switch, console_settings, pool_size, origins):
        reloader.subscribe(apply)
    ReloadOnHangup(reloader, reactor).setServiceParent(top)


def add_systemd_services(top: MultiService, sandboxes: SandboxService, reactor,
                         environ, pid: int) -> None:
    """READY/STOPPING notifications and the watchdog, under systemd (after the
    listeners: see ReadinessService)."""
    from shellserver.systemd import (
        ReadinessService,
        notifier_from_environment,
        watchdog_interval,
        watchdog_service,
    )

    notifier = notifier_from_environment(environ)
    interval = watchdog_interval(environ, pid)
    if not notifier.active:
        return
    ReadinessService(notifier, sandboxes.when_runtime_ready).setServiceParent(top)
    if interval is not None:
        watchdog_service(notifier, interval, reactor).setServiceParent(top)
