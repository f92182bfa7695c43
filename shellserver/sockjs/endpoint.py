"""
What the transports of one SockJS endpoint share, and the shape of an entry
in the session transport registry.
"""

from collections.abc import Callable

from attrs import frozen
from twisted.internet.interfaces import IReactorTime
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource

from .options import SockJSOptions
from .session import SessionRegistry


@frozen
class Endpoint:
    """
    One mounted L{SockJSResource}: its sessions, settings and clock, and
    the autobahn resources that speak websocket for it.
    """

    registry: SessionRegistry
    options: SockJSOptions
    clock: IReactorTime
    framed_websocket: IResource
    raw_websocket: IResource


@frozen
class SessionTransport:
    """
    A transport at C{<prefix>/<server>/<session>/<name>}.

    @ivar methods: the HTTP methods it answers (C{OPTIONS} aside).
    @ivar render: renders a request for a session id; returns the body or
        C{NOT_DONE_YET}.
    @ivar preflight: whether it answers CORS preflight C{OPTIONS} requests.
    @ivar needs_websocket: whether C{SockJSOptions.websocket} switches it
        off.
    """

    methods: tuple[bytes, ...]
    render: Callable[[Endpoint, IRequest, str], bytes | int]
    preflight: bool = True
    needs_websocket: bool = False
