"""``shellserver-ctl``: the operator's commands for a cluster, through the
Redis of a configuration file's ``[cluster]`` (docs/cluster.md).

    shellserver-ctl --config FILE status|pause|resume|terminate|drain NODE|undrain NODE

Prints what it did; exits 0, or 2 with a clear message.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Generator, Sequence
from typing import Any

from twisted.internet import defer, task

from shellserver.cluster.redis import RedisLink, RedisUnavailable, redis_endpoint
from shellserver.cluster.store import RedisClusterStore, View
from shellserver.config import ConfigError, load_config_file

EXIT_FAILED = 2
CONNECT_WAIT = 5.0  # seconds to reach Redis before giving up


class CtlError(Exception):
    """A command that cannot be done; str() says why."""


def parse_arguments(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="shellserver-ctl",
        description="Operate a shellserver cluster through its Redis.")
    parser.add_argument("--config", "-c", required=True, help="the nodes' TOML configuration")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("status", help="the live nodes and the kill switch")
    commands.add_parser("pause", help="no new consoles anywhere (running ones go on)")
    commands.add_parser("resume", help="take new consoles again (switch the kill switch off)")
    commands.add_parser("terminate", help="end every console on every node, take no new ones")
    for name, what in (("drain", "NODE takes no new consoles while its own finish"),
                       ("undrain", "NODE takes new consoles again")):
        command = commands.add_parser(name, help=what)
        command.add_argument("node", metavar="NODE")
    return parser.parse_args(argv)


def describe_view(view: View) -> list[str]:
    """The lines ``status`` prints."""
    lines = [f"kill switch: {view.switch or 'on (consoles are admitted)'}"]
    if not view.nodes:
        lines.append("no live nodes")
    for node in view.nodes:
        state = "draining" if node.draining else (
            "accepting" if node.accepting else "not accepting")
        lines.append(f"{node.name}  {node.url}  {node.active}/{node.capacity} consoles  {state}")
    return lines


@defer.inlineCallbacks
def run(reactor, arguments: argparse.Namespace,
        out) -> Generator[defer.Deferred[Any], Any, None]:
    """Do the command; raises CtlError."""
    try:
        config = load_config_file(arguments.config)
    except ConfigError as e:
        raise CtlError(str(e)) from None
    cluster = config.cluster
    if not cluster.enabled:
        raise CtlError(f"{arguments.config} configures no cluster (cluster.redis_url is empty)")
    from shellserver.cluster.redis import parse_redis_url

    address = parse_redis_url(cluster.redis_url)
    try:
        endpoint = redis_endpoint(reactor, address, cluster.redis_ca_file)
    except OSError as e:
        raise CtlError(f"cluster.redis_ca_file: {e}") from None
    link = RedisLink(reactor, endpoint, address, max(cluster.redis_timeout, 2.0))
    up: defer.Deferred[None] = defer.Deferred()

    def came_up() -> None:
        if not up.called:
            up.callback(None)

    link.when_up(came_up)
    link.start()
    try:
        try:
            yield up.addTimeout(CONNECT_WAIT, reactor)
        except defer.TimeoutError:
            why = f" ({link.refusal})" if link.refusal else ""
            raise CtlError(f"Redis unreachable at {address.describe()}{why}") from None
        store = RedisClusterStore(link, cluster.key_prefix)
        try:
            yield _command(store, arguments, out)
        except RedisUnavailable as e:
            raise CtlError(f"Redis at {address.describe()} failed: {e}") from None
    finally:
        yield link.stop()


@defer.inlineCallbacks
def _command(store: RedisClusterStore, arguments: argparse.Namespace,
             out) -> Generator[defer.Deferred[Any], Any, None]:
    command = arguments.command
    if command == "status":
        view = yield store.read_view("")
        for line in describe_view(view):
            out.write(line + "\n")
    elif command in ("pause", "terminate"):
        yield store.set_switch(command)
        out.write(f"kill switch set to {command} for the whole cluster\n")
    elif command == "resume":
        yield store.set_switch(None)
        out.write("kill switch off: the cluster admits consoles again\n")
    else:
        view = yield store.read_view("")
        if arguments.node not in {node.name for node in view.nodes}:
            sys.stderr.write(f"shellserver-ctl: warning: no live node is named "
                             f"{arguments.node!r} (done anyway: it applies when it joins)\n")
        yield store.set_drain(arguments.node, command == "drain")
        out.write(f"node {arguments.node} {'drains' if command == 'drain' else 'no longer drains'}"
                  "\n")


def main(argv: Sequence[str] | None = None) -> None:
    arguments = parse_arguments(sys.argv[1:] if argv is None else argv)

    def react(reactor):
        d = run(reactor, arguments, sys.stdout)

        def failed(failure):
            failure.trap(CtlError)
            sys.stderr.write(f"shellserver-ctl: {failure.value}\n")
            raise SystemExit(EXIT_FAILED)

        return d.addErrback(failed)

    task.react(react)


if __name__ == "__main__":
    main()
