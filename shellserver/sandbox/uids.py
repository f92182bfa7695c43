"""The pool of per-session uids: every console runs as a uid of its own.

RLIMIT_NPROC counts processes per uid across the whole host, and file
ownership and signals are per uid, so two consoles must never share one.
A uid goes back to the pool only after its sandbox's cgroups are gone, and
the least recently used uid is handed out first.
"""

from __future__ import annotations

import os
from collections import deque

from attrs import define, field


class UidsExhausted(Exception):
    """Every uid in the configured range is in use."""

    def __str__(self) -> str:
        return "no free sandbox uid: every uid in the configured range is in use"


@define
class UidPool:
    """Hands out uids from ``[first, last]``, least recently used first."""

    first: int
    last: int
    _free: deque[int] = field(init=False)
    _used: set[int] = field(init=False, factory=set)

    def __attrs_post_init__(self) -> None:
        if self.first > self.last:
            raise ValueError(f"empty uid range {self.first}-{self.last}")
        self._free = deque(range(self.first, self.last + 1))

    def allocate(self) -> int:
        if not self._free:
            raise UidsExhausted()
        uid = self._free.popleft()
        self._used.add(uid)
        return uid

    def release(self, uid: int) -> None:
        if uid not in self._used:
            raise ValueError(f"uid {uid} was not allocated")
        self._used.remove(uid)
        self._free.append(uid)

    def exclude(self, uids) -> None:
        """Never hand out these uids (processes of a previous run still use them)."""
        for uid in uids:
            if uid in self._free:
                self._free.remove(uid)

    def quarantine(self, uid: int) -> None:
        """Keep a uid out of circulation (its processes could not be killed)."""
        self._used.discard(uid)

    @property
    def in_use(self) -> int:
        return len(self._used)

    @property
    def available(self) -> int:
        return len(self._free)


def uids_in_use(first: int, last: int, proc: str = "/proc") -> set[int]:
    """The uids in [first, last] that own a running process (start-up only)."""
    found = set()
    for entry in os.listdir(proc):
        if entry.isdigit():
            try:
                uid = os.stat(os.path.join(proc, entry)).st_uid
            except FileNotFoundError:
                continue
            if first <= uid <= last:
                found.add(uid)
    return found
