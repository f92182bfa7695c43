"""
Writes to a connection that leave in the same call when nothing waits.

A Twisted stream transport buffers every write and sends it on the
reactor's next turn, when the socket is reported writable: for a keystroke's
echo that is one more epoll round (two epoll_ctl calls, an epoll_wait and
the reactor's dispatch) between the console's output and the client.
L{write_through} sends a write at once when the transport has nothing
buffered, and leaves the rest (what the socket did not take, and every
write behind buffered data) to the transport's own buffering, so order,
producers and flow control stay the transport's.
"""

from twisted.internet.abstract import FileDescriptor
from twisted.protocols.policies import ProtocolWrapper


def socket_transport(transport: object) -> FileDescriptor | None:
    """
    The file descriptor (TCP, UNIX) that C{transport}'s writes go to
    unchanged, looking through protocol wrappers that pass writes on as
    they are (L{ProtocolWrapper}'s own C{write}); None for other transports
    (TLS, HTTP/2 streams, wrappers that act on writes) and for a
    connection being closed at any layer.
    """
    while isinstance(transport, ProtocolWrapper):
        if type(transport).write is not ProtocolWrapper.write or transport.disconnecting:
            return None
        transport = transport.transport
    if isinstance(transport, FileDescriptor) and transport.connected and not (
            transport.disconnecting
            # FileDescriptor's own state of a half-close, which no interface
            # exposes
            or transport._writeDisconnecting or transport._writeDisconnected):
        return transport
    return None


def write_through(transport: object, data: bytes) -> int:
    """
    Write C{data} to C{transport}: straight to its socket if that is a file
    descriptor (L{socket_transport}) with nothing buffered, the rest through
    C{transport.write}.

    @return: how many bytes left in this call (0 when all was buffered).
    """
    descriptor = socket_transport(transport)
    # dataBuffer, and the writes not yet joined into it (FileDescriptor's
    # private list: no interface tells whether a transport holds data)
    if descriptor is not None and not descriptor.dataBuffer and not descriptor._tempDataLen:
        written = descriptor.writeSomeData(data)
        # writeSomeData returns an exception when the connection is lost:
        # then everything goes to write(), whose doWrite ends the connection
        # the usual way.
        if isinstance(written, int) and written > 0:
            if written < len(data):
                transport.write(data[written:])  # type: ignore[attr-defined]
            return written
    transport.write(data)  # type: ignore[attr-defined]
    return 0
