"""Live reload: SIGHUP re-reads the configuration file.

The parts that own reloadable settings (admission limits, the kill-switch
path, console timeouts for new consoles, the warm pool's size, the embedding
origins) subscribe with a callable that takes the new L{Config}. Running
consoles keep the settings they started with. A file that cannot be used is
refused with the key named, and the old settings stay. Settings that only a
restart can change (listeners, state directory, uid range, TLS files, the
runtime, ...) are named in the log and otherwise ignored.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from types import FrameType
from typing import Any

import attrs
from attrs import define, field
from twisted.application.service import Service
from twisted.logger import Logger

from shellserver.config import Config, ConfigError, load_config_file

log = Logger()

# "section.key" that a reload applies; every other key needs a restart.
RELOADABLE = frozenset({
    "admission.capacity",
    "admission.per_address",
    "admission.per_address_per_minute",
    "admission.pages_per_address_per_minute",
    "admission.kill_switch_file",
    "server.auth_failures_per_minute",
    "console.idle_timeout",
    "console.max_age",
    "console.auth_timeout",
    "console.output_high_water",
    "console.output_low_water",
    "embed.host_origins",
    "server.public_origins",
    "sandbox.pool_size",
    "server.log_level",
    "console.input_messages_per_second",
    "console.input_bytes_per_second",
    "console.input_burst_messages",
    "console.input_burst_bytes",
})


def changed_keys(old: Config, new: Config) -> list[str]:
    """Every ``section.key`` whose value differs between ``old`` and ``new``."""
    changed = []
    for section in attrs.fields(Config):
        before, after = getattr(old, section.name), getattr(new, section.name)
        for key in attrs.fields(type(before)):
            if getattr(before, key.name) != getattr(after, key.name):
                changed.append(f"{section.name}.{key.name}")
    return changed


def needing_restart(old: Config, new: Config) -> list[str]:
    """The changed keys that a reload cannot apply."""
    return [key for key in changed_keys(old, new) if key not in RELOADABLE]


@define
class ConfigReloader:
    """Holds the current configuration and hands a new one to subscribers."""

    path: str | None  # None: started without --config, nothing to re-read
    current: Config
    _load: Callable[[str], Config] = load_config_file
    _subscribers: list[Callable[[Config], None]] = field(factory=list)

    def subscribe(self, apply: Callable[[Config], None]) -> None:
        """Call ``apply(config)`` with every configuration a reload accepts."""
        self._subscribers.append(apply)

    def reload(self) -> bool:
        """Re-read the file and apply what can change live; whether it was
        accepted (a refused file changes nothing)."""
        if self.path is None:
            log.warn("configuration not reloaded: the server was started without "
                     "--config, so there is no file to re-read")
            return False
        try:
            new = self._load(self.path)
        except ConfigError as e:
            log.error("configuration not reloaded: {key}: {problem}; the old settings "
                      "stay", key=e.key or self.path, problem=e.message)
            return False
        # --state-dir beats the file, at start and at every reload.
        new = new.with_state_dir(self.current.server.state_dir)
        restart = needing_restart(self.current, new)
        if restart:
            log.warn("configuration: {keys} changed but needs a restart; the rest "
                     "applies now", keys=", ".join(restart))
        applied = [key for key in changed_keys(self.current, new) if key in RELOADABLE]
        for apply in self._subscribers:
            apply(new)
        self.current = new
        log.info("configuration reloaded from {path}: {changed}", path=self.path,
                 changed=", ".join(applied) or "nothing changed")
        return True


class ReloadOnHangup(Service):
    """Installs a SIGHUP handler that reloads the configuration.

    twistd itself uses SIGUSR1 (not SIGHUP) to reopen its --logfile, and the
    reactor handles only INT, TERM and CHLD, so SIGHUP is free. The signal
    handler only schedules the reload on the reactor thread.
    """

    name = "reload"

    def __init__(self, reloader: ConfigReloader, reactor) -> None:
        self._reloader = reloader
        self._reactor = reactor
        self._previous: Callable[[int, FrameType | None], Any] | int | None = None

    def startService(self) -> None:
        super().startService()
        self._previous = signal.signal(signal.SIGHUP, self._hangup)

    def _hangup(self, signum, frame) -> None:
        self._reactor.callFromThread(self._reloader.reload)

    def stopService(self):
        super().stopService()
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
            self._previous = None


def reload_service(reactor, path: str | None, config: Config, *, admission, metrics, switch,
                   consoles, pool, resource, sockjs=None) -> ReloadOnHangup:
    """The service by which SIGHUP re-reads ``path`` and hands what can change
    live to its owners (docs/operations.md, "Reload")."""
    from shellserver.console import ConsoleSettings
    from shellserver.logs import set_log_level
    from shellserver.startup import admission_capacity, fit_host_pools_to
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
        consoles.use_settings(ConsoleSettings.from_config(new))

    def pool_size(new: Config) -> None:
        if pool is not None:
            pool.resize(new.sandbox.pool_size)
        elif new.sandbox.pool_size:
            # Without a pool at start there is none to resize.
            log.warn("configuration: sandbox.pool_size needs a restart to turn the "
                     "warm pool on")

    def origins(new: Config) -> None:
        set_host_origins(resource, new.embed.host_origins + new.server.public_origins)

    def log_level(new: Config) -> None:
        set_log_level(new.server.log_level)

    def input_budget(new: Config) -> None:
        if sockjs is not None:
            sockjs.use_input_budget(new.console.input_budget())

    for apply in (limits, kill_switch, console_settings, pool_size, origins, log_level,
                  input_budget):
        reloader.subscribe(apply)
    return ReloadOnHangup(reloader, reactor)
