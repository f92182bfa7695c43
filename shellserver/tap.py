"""`twistd shellserver`: options, and the one place that wires everything.

The composition root: ``Options`` reads the configuration and runs the
start-up checks and preparations (shellserver.startup); ``makeService``
builds the service tree from what they return, starting nothing itself.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping

from attrs import evolve
from twisted.application import strports
from twisted.application.service import MultiService
from twisted.logger import Logger
from twisted.python import usage

import shellserver
from shellserver import startup
from shellserver.config import Config, ConfigError, load_config, load_config_file
from shellserver.startup import (
    EXIT_CONFIG_INVALID,
    ConnectionPlan,
    HostRefusal,
    PreparedState,
    exit_refused,
)

log = Logger()

DEFAULT_PORT = 8443
DEFAULT_WEB_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(shellserver.__file__))), "web"
)


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
        ["admin", None, None,
         "A Twisted endpoint serving the admin page (charts, pause, drain, end a "
         "console), e.g. tcp:9200:interface=127.0.0.1 (off unless given; keep it on "
         "loopback or an internal network). Its token is in STATE_DIR/admin-token."],
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
            raise startup.check_config(self["check-config"], sys.stdout, sys.stderr)
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
        self._check_endpoint("admin")
        try:
            startup.check_host(config)
            self["connections"] = startup.plan_connections(config)
            self["prepared"] = startup.prepare_state(config, need_tls=not self["listen"])
            if self["admin"]:
                self["admin-token"] = startup.admin_token(config)
        except HostRefusal as refusal:
            raise exit_refused(refusal, sys.stderr) from None

    def _choose_log_format(self, config: Config) -> None:
        """server.log_format and server.log_level: twistd's log becomes text or
        JSON lines filtered by level, through its own --logger hook (an
        explicit --logger or --syslog wins)."""
        from shellserver.logs import log_to, set_log_level

        set_log_level(config.server.log_level)
        twistd = getattr(self, "parent", None)
        if twistd is None or twistd.get("logger") or twistd.get("syslog"):
            return
        twistd["logger"] = log_to(config.server.log_format, twistd.get("logfile"),
                                  nodaemon=bool(twistd.get("nodaemon")))

    def _check_metrics(self) -> None:
        self._check_endpoint("metrics")

    def _check_endpoint(self, option: str) -> None:
        from twisted.internet import endpoints, reactor

        description = self[option]
        if description is not None:
            try:
                endpoints.serverFromString(reactor, description)
            except (ValueError, TypeError, KeyError, OSError) as e:
                raise usage.UsageError(f"--{option} {description!r}: {e}") from e

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



def makeService(options: Options, *, reactor=None,
                environ: MutableMapping[str, str] | None = None,
                pid: int | None = None) -> MultiService:
    """The server's service tree, built from parsed ``options`` and not started.

    twistd passes only the options: the global reactor, this process's
    environment (systemd's variables) and pid are used then.
    """
    from shellserver.admission import Admission, IAdmission, KillSwitch
    from shellserver.auth import TokenAuthority
    from shellserver.console import ConsoleFactory, ConsoleSettings
    from shellserver.limits import ConnectionGuard, ConnectionLimits
    from shellserver.listeners import listener_service
    from shellserver.metrics import Metrics, metrics_site
    from shellserver.proxies import TrustedProxies
    from shellserver.reload import reload_service
    from shellserver.sandbox.budget import CpuBudgetWatcher
    from shellserver.sandbox.lifecycle import FLUSH_DELAY, SandboxService
    from shellserver.sandbox.output import TerminalHandoffs
    from shellserver.sandbox.pool import SandboxPool
    from shellserver.sandbox.service import SandboxStarter
    from shellserver.sandbox.spec import SandboxLimits
    from shellserver.sandbox.uids import UidPool
    from shellserver.sockjs import SockJSOptions, SockJSResource
    from shellserver.systemd import systemd_services
    from shellserver.tls import endpoint_description
    from shellserver.users import UnregisteredUsers
    from shellserver.web import ShellSite, build_resource, under_base_path

    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    config: Config = options["configuration"]
    prepared: PreparedState = options["prepared"]
    connections: ConnectionPlan = options["connections"]
    for notice in (*prepared.notices, *connections.notices):
        log.warn("start-up: {notice}", notice=notice)
    node_name = config.node_name()
    tokens = TokenAuthority(
        prepared.secret,
        node=node_name,
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
        outputs=TerminalHandoffs(reactor, prepared.pipes),
        system_python=config.sandbox.system_python,
    )
    fork_server = None
    if config.sandbox.fork_server:
        from shellserver.sandbox.forked import ForkServer

        fork_server = ForkServer(
            reactor, os.path.join(runtime, "bin", "python"),
            os.path.join(os.path.dirname(prepared.pipes), "forkserver.sock"))
        starter.fork_server = fork_server
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
    # The web and console layers see only IAdmission: this node's, or a cluster's.
    decisions: IAdmission = admission
    cluster = None
    if config.cluster.enabled:
        from shellserver.cluster.node import cluster_node

        decisions, cluster = cluster_node(
            reactor, config.cluster, admission=admission,
            end_all=lambda message: consoles.end_all_by_kill_switch(message),
            idle=lambda: not consoles.sessions,
            most_wait=config.console.shutdown_grace + FLUSH_DELAY + 5, metrics=metrics)
    consoles = ConsoleFactory(
        reactor,
        tokens,
        pool or starter,
        ConsoleSettings.from_config(config),
        decisions,
        users,
        metrics=metrics,
    )
    switch = KillSwitch(reactor, admission, config.kill_switch_path,
                        consoles.end_all_by_kill_switch)
    limits = evolve(ConnectionLimits.from_config(config.server),
                    max_connections=connections.max_connections)
    sockjs = SockJSResource(consoles, clock=reactor,
                            options=SockJSOptions(**config.console.input_budget()),
                            input_dropped=metrics.input_dropped.inc)
    tree = build_resource(
        web_dir=options["web-dir"], tokens=tokens, clock=reactor, sockjs=sockjs,
        admission=decisions, users=users,
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
        assert prepared.tls is not None, "prepared when there is no --listen"
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
                               packages=config.sandbox.packages)
    if fork_server is not None:
        from shellserver.sandbox.forked import ForkServerService

        ForkServerService(fork_server).setServiceParent(top)
    sandboxes.setServiceParent(top)
    # After the sandboxes, so that it stops before they drain.
    budget_checks = budget.service()
    if budget_checks is not None:
        budget_checks.setServiceParent(top)
    switch.service().setServiceParent(top)
    if cluster is not None:
        cluster.setServiceParent(top)
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
    if options["admin"] or cluster is not None:
        from shellserver.admin import add_admin

        # Its own listener with its own token (shellserver.admin); in a
        # cluster every node samples for the others' admin pages.
        add_admin(top, reactor, options["admin"], token=options.get("admin-token"),
                  web_dir=options["web-dir"], node_name=node_name,
                  metrics=metrics, admission=admission, switch=switch, consoles=consoles,
                  memory_per_console=config.sandbox.memory_mb * 2**20, cluster=cluster)
    for under_systemd in systemd_services(sandboxes.when_runtime_ready, reactor,
                                          os.environ if environ is None else environ,
                                          os.getpid() if pid is None else pid):
        under_systemd.setServiceParent(top)
    reload_service(reactor, options["config"], config, admission=admission, metrics=metrics,
                   switch=switch, consoles=consoles, pool=pool,
                   resource=tree, sockjs=sockjs).setServiceParent(top)
    return top
