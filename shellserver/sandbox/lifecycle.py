"""The sandboxes' part of the service tree: the runtime built at start (when
it is missing), the warm pool filled, and the consoles drained at shutdown."""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from shellserver.console import describe_duration

log = Logger()

FLUSH_DELAY = 0.5  # seconds for the goodbye messages to leave at shutdown


class SandboxService(Service):
    """Owns the sandboxes: builds the runtime if needed, drains at shutdown.

    Shutting down refuses new consoles, tells every user, gives them
    ``grace`` seconds, then ends the consoles and cleans up after them.
    """

    name = "sandboxes"

    def __init__(self, reactor, starter, runtime: str, build: bool, *, pool=None,
                 consoles=None, admission=None, grace: float = 0.0,
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
