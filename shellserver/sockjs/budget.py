"""
The input budget of one SockJS session: a token bucket of messages and of
bytes, refilled on the injected clock.

A message is let through while the message bucket holds a whole message and
the byte bucket holds anything, and is then charged in full: a single large
message (a paste) may take the byte bucket below zero, and the next one waits
until it has refilled above zero.  Over time a session gets no more than the
rates, plus one burst.
"""

from __future__ import annotations

from attrs import define, field
from twisted.internet.interfaces import IReactorTime


@define
class InputBudget:
    """
    Messages and bytes per second, each with a burst: what a session may
    hand to the application.
    """

    _clock: IReactorTime
    _messages_per_second: float
    _bytes_per_second: float
    _burst_messages: float
    _burst_bytes: float
    _messages: float = field(init=False)
    _bytes: float = field(init=False)
    _refilled_at: float = field(init=False)

    def __attrs_post_init__(self) -> None:
        self._messages = self._burst_messages
        self._bytes = self._burst_bytes
        self._refilled_at = self._clock.seconds()

    def _refill(self) -> None:
        now = self._clock.seconds()
        elapsed = max(0.0, now - self._refilled_at)
        self._refilled_at = now
        self._messages = min(self._burst_messages,
                             self._messages + elapsed * self._messages_per_second)
        self._bytes = min(self._burst_bytes, self._bytes + elapsed * self._bytes_per_second)

    def allows(self) -> bool:
        """
        Whether one more message may go through now.
        """
        self._refill()
        return self._messages >= 1 and self._bytes > 0

    def charge(self, size: int) -> None:
        """
        Count one message of C{size} bytes.
        """
        self._refill()
        self._messages -= 1
        self._bytes -= size

    def is_full(self) -> bool:
        """
        Whether both buckets have refilled to their bursts: the session has
        been within its budget for a while.
        """
        self._refill()
        return self._messages >= self._burst_messages and self._bytes >= self._burst_bytes

    def seconds_until_allowed(self) -> float:
        """
        How long until L{allows} holds again (0 if it holds now).
        """
        if self.allows():
            return 0.0
        wait = max(
            (1 - self._messages) / self._messages_per_second,
            -self._bytes / self._bytes_per_second,
        )
        # a hair more, so that the buckets are past the mark when the timer
        # fires (never 0: a timer that finds nothing refilled would spin)
        return max(wait, 0.0) + 1e-3
