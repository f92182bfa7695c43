"""Unregistered users: the throwaway identities behind consoles.

Each console page load creates one. It lives until its token expires unused,
or, once a console claimed it, until that console ends; nothing about it
outlives the console.
"""

from __future__ import annotations

from attrs import define, field
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from shellserver.auth import UnregisteredUser


@define
class UnregisteredUsers:
    """The live unregistered users of this node, with their expiry."""

    _clock: IReactorTime
    _unclaimed_ttl: float
    _users: dict[str, UnregisteredUser] = field(factory=dict)
    _expiries: dict[str, IDelayedCall] = field(factory=dict)

    def __len__(self) -> int:
        return len(self._users)

    def get(self, user_id: str) -> UnregisteredUser | None:
        return self._users.get(user_id)

    def add(self, user: UnregisteredUser) -> None:
        """Keep ``user`` until its token could no longer be redeemed."""
        self._users[user.user_id] = user
        self._expiries[user.user_id] = self._clock.callLater(
            self._unclaimed_ttl, self.forget, user.user_id
        )

    def claim(self, user_id: str) -> UnregisteredUser | None:
        """A console started for ``user_id``: keep it until ``forget``."""
        call = self._expiries.pop(user_id, None)
        if call is not None and call.active():
            call.cancel()
        return self._users.get(user_id)

    def forget(self, user_id: str) -> None:
        call = self._expiries.pop(user_id, None)
        if call is not None and call.active():
            call.cancel()
        self._users.pop(user_id, None)
