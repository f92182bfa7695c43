"""
Tests for shellserver.sockjs.sending: writes that leave in the same call
when the transport holds nothing, over a fake socket descriptor.
"""

from twisted.internet import main
from twisted.internet.abstract import FileDescriptor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.protocols.policies import ProtocolWrapper, TimeoutProtocol, WrappingFactory
from twisted.trial.unittest import SynchronousTestCase

from shellserver.sockjs.sending import socket_transport, write_through


class FakeSocket(FileDescriptor):
    """
    A descriptor whose socket takes C{room} bytes per call (what it took is
    in C{sent}), or reports the connection lost.
    """

    def __init__(self, room: int = 1 << 20) -> None:
        super().__init__(MemoryReactor())
        self.connected = 1
        self.room = room
        self.lost = False
        self.sent: list[bytes] = []

    def writeSomeData(self, data: bytes):
        if self.lost:
            return main.CONNECTION_LOST
        taken = bytes(data[: self.room])
        if taken:
            self.sent.append(taken)
        return len(taken)

    def buffered(self) -> bytes:
        return self.dataBuffer[self.offset:] + b"".join(self._tempDataBuffer)


def wrapped(transport) -> ProtocolWrapper:
    """A ProtocolWrapper over C{transport}, as ConnectionGuard puts on."""
    wrapper = ProtocolWrapper(WrappingFactory(Factory.forProtocol(Protocol)), Protocol())
    wrapper.makeConnection(transport)
    return wrapper


class WriteThroughTests(SynchronousTestCase):
    def test_sent_in_the_call(self) -> None:
        """With nothing buffered, the data reaches the socket in the call and nothing waits."""
        socket = FakeSocket()
        self.assertEqual(write_through(socket, b"a"), 1)
        self.assertEqual((socket.sent, socket.buffered()), ([b"a"], b""))
        self.assertNotIn(socket, socket.reactor.getWriters())

    def test_rest_buffered_in_order(self) -> None:
        """What the socket does not take is buffered, and later writes queue behind it."""
        socket = FakeSocket(room=2)
        self.assertEqual(write_through(socket, b"abcd"), 2)
        self.assertEqual(write_through(socket, b"ef"), 0)
        self.assertEqual((socket.sent, socket.buffered()), ([b"ab"], b"cdef"))
        self.assertIn(socket, socket.reactor.getWriters())
        socket.room = 100
        socket.doWrite()
        self.assertEqual(b"".join(socket.sent), b"abcdef")

    def test_full_socket_buffers(self) -> None:
        """A socket that takes nothing leaves all of it to the transport's buffer."""
        socket = FakeSocket(room=0)
        self.assertEqual(write_through(socket, b"xy"), 0)
        self.assertEqual(socket.buffered(), b"xy")

    def test_lost_connection_buffers(self) -> None:
        """A lost connection hands the data to write(), whose doWrite ends the connection."""
        socket = FakeSocket()
        socket.lost = True
        write_through(socket, b"xy")
        self.assertEqual(socket.buffered(), b"xy")

    def test_through_plain_wrappers(self) -> None:
        """Wrappers that pass writes on unchanged are looked through."""
        socket = FakeSocket()
        self.assertEqual(write_through(wrapped(wrapped(socket)), b"k"), 1)
        self.assertEqual(socket.sent, [b"k"])

    def test_wrappers_acting_on_writes_are_not_bypassed(self) -> None:
        """A wrapper with its own write (a timeout reset) gets every write."""
        socket = FakeSocket()
        wrapper = TimeoutProtocol(WrappingFactory(Factory.forProtocol(Protocol)),
                                  Protocol(), None)
        wrapper.makeConnection(socket)
        self.assertIsNone(socket_transport(wrapper))
        write_through(wrapper, b"k")
        self.assertEqual((socket.sent, socket.buffered()), ([], b"k"))

    def test_closing_connections_buffer(self) -> None:
        """A connection being closed, at any layer, keeps Twisted's path."""
        for close in ("socket", "wrapper"):
            socket = FakeSocket()
            wrapper = wrapped(socket)
            (socket if close == "socket" else wrapper).disconnecting = True
            self.assertIsNone(socket_transport(wrapper), close)

    def test_other_transports_write(self) -> None:
        """Transports that are no file descriptor (TLS, test transports) get write()."""
        transport = StringTransport()
        self.assertEqual(write_through(transport, b"z"), 0)
        self.assertEqual(transport.value(), b"z")
