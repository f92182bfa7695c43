"""Interfaces for annotations: what the server's transports and reactor offer.

Twisted types ``Protocol.transport`` as ``ITransport | None``, while every
connection the server serves (TCP, or TLS over TCP, or the PROXY-protocol
wrapper around them) can also be aborted and is a producer and a consumer;
protocols annotate ``transport: IConnectionTransport`` to say so. Nothing
declares that it implements these: they only name, for mypy, what Twisted's
objects already provide.
"""

from twisted.internet.interfaces import (
    IConsumer,
    IProcessTransport,
    IPushProducer,
    IReactorProcess,
    IReactorTime,
    ITCPTransport,
)


class IConnectionTransport(ITCPTransport, IPushProducer, IConsumer):
    """A connected stream's transport: abortable, a push producer, a consumer."""

    # What every stream transport sets (twisted.internet.abstract.FileDescriptor,
    # TLSMemoryBIOProtocol, ProtocolWrapper), though no interface declares it.
    disconnecting: bool


class IPTYProcessTransport(IProcessTransport, IConsumer):
    """A process spawned with ``usePTY=True``: its terminal is one descriptor."""

    def fileno() -> int:
        """The PTY master's file descriptor."""


class IProcessReactor(IReactorProcess, IReactorTime):
    """A reactor that spawns processes and keeps time (the global one does)."""
