"""
The SockJS test server: the services the SockJS protocol test suite
(sockjs-protocol.py) expects, on 127.0.0.1 at the port given on the
command line.  Prints "listening PORT" once it accepts connections.

    python tests/integration/sockjs_echo_app.py 8081

The suite itself is ported to Python 3 outside this repository and run
against it as docs/sockjs.md describes ("Conformance").
"""

import sys

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import react
from twisted.logger import globalLogBeginner, textFileLogObserver
from twisted.web.resource import Resource
from twisted.web.server import Site

from shellserver.sockjs import SockJSConnection, SockJSOptions, SockJSResource


class Echo:
    """
    Sends every message back.
    """

    def __init__(self, connection: SockJSConnection) -> None:
        self._connection = connection

    def message_received(self, text: str) -> None:
        self._connection.send(text)

    def closed(self) -> None:
        pass


class CloseAtOnce:
    """
    Closes the session as soon as it opens.
    """

    def message_received(self, text: str) -> None:
        pass

    def closed(self) -> None:
        pass


def open_close_session(connection: SockJSConnection) -> CloseAtOnce:
    connection.close(3000, "Go away!")
    return CloseAtOnce()


def build_root(reactor) -> Resource:
    root = Resource()
    # the suite's tests expect the small streaming limit
    echo_options = SockJSOptions(response_limit=4096)
    root.putChild(b"echo", SockJSResource(Echo, clock=reactor, options=echo_options))
    root.putChild(
        b"close",
        SockJSResource(open_close_session, clock=reactor, options=echo_options),
    )
    root.putChild(
        b"disabled_websocket_echo",
        SockJSResource(
            Echo,
            clock=reactor,
            options=SockJSOptions(response_limit=4096, websocket=False),
        ),
    )
    root.putChild(
        b"cookie_needed_echo",
        SockJSResource(
            Echo,
            clock=reactor,
            options=SockJSOptions(response_limit=4096, cookie_needed=True),
        ),
    )
    return root


async def main(reactor, port_text: str) -> None:
    port = reactor.listenTCP(int(port_text), Site(build_root(reactor)), interface="127.0.0.1")
    print(f"listening {port.getHost().port}", flush=True)
    # serve until killed
    await Deferred()


if __name__ == "__main__":
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)
    react(lambda reactor: ensureDeferred(main(reactor, sys.argv[1])))
