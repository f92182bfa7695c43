"""
A SockJS server (protocol 0.3.3) on twisted.web and autobahn.

Mount a L{SockJSResource} in a twisted.web tree; it calls
C{open_session(connection)} for every new session, whatever the transport
(websocket framed and raw, xhr polling and streaming, eventsource, htmlfile,
jsonp), and the application talks to the client through that
L{SockJSConnection}.  docs/sockjs.md describes the transports, limits and
safety measures.
"""

from .options import SockJSOptions
from .resource import SESSION_TRANSPORTS, SockJSResource
from .session import SockJSConnection, SockJSHandler

__all__ = [
    "SESSION_TRANSPORTS",
    "SockJSConnection",
    "SockJSHandler",
    "SockJSOptions",
    "SockJSResource",
]
