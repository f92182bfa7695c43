"""The cluster's shared state in Redis: each operation one atomic Lua script
or one command (docs/cluster.md lists the keys and their expiries).

L{IClusterStore} is what the node needs of Redis; L{RedisClusterStore} does
it over a L{RedisLink}, and shellserver.testing's FakeClusterStore in memory.
Every operation fails with L{RedisUnavailable} when Redis cannot answer in
time; callers then decide locally.
"""

from __future__ import annotations

import json
import math
import secrets

from attrs import define, frozen
from twisted.internet import defer
from zope.interface import Attribute, Interface, implementer

from shellserver.cluster.redis import RedisLink, RedisUnavailable

__all__ = ["IClusterStore", "NodeInfo", "RedisClusterStore", "RedisUnavailable", "View"]

SWITCH_STATES = ("pause", "terminate")


@frozen
class NodeInfo:
    """One node as it announces itself (the JSON of ``<prefix>node:<name>``)."""

    name: str
    url: str
    accepting: bool
    active: int
    capacity: int
    draining: bool
    started_at: float

    def to_json(self) -> str:
        return json.dumps({
            "name": self.name, "url": self.url, "accepting": self.accepting,
            "active": self.active, "capacity": self.capacity, "draining": self.draining,
            "started_at": self.started_at,
        }, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str, *, drained: bool = False) -> NodeInfo | None:
        """The node, or None for JSON that is not a node (skipped, never fatal)."""
        try:
            data = json.loads(text)
            node = cls(name=str(data["name"]), url=str(data["url"]),
                       accepting=bool(data["accepting"]), active=int(data["active"]),
                       capacity=int(data["capacity"]), draining=bool(data["draining"]),
                       started_at=float(data["started_at"]))
        except (ValueError, TypeError, KeyError):
            return None
        if drained and not node.draining:
            # The operator's drain key counts at once, before the node's next beat.
            node = NodeInfo(node.name, node.url, False, node.active, node.capacity, True,
                            node.started_at)
        return node

    @property
    def load(self) -> float:
        return self.active / self.capacity if self.capacity > 0 else math.inf

    def public_json(self) -> dict:
        """The node as /status shows it."""
        return {"name": self.name, "url": self.url, "accepting": self.accepting,
                "active": self.active, "capacity": self.capacity, "draining": self.draining}


@frozen
class View:
    """What a heartbeat learnt: the live nodes, the cluster switch, and
    whether the operator drains this node."""

    nodes: tuple[NodeInfo, ...]
    switch: str | None
    drained: bool


class IClusterStore(Interface):
    up = Attribute("Whether Redis is reachable now (calls fail at once when not).")

    def heartbeat(node: NodeInfo, ttl: float, active: dict) -> defer.Deferred:
        """Announce ``node`` for ``ttl`` seconds with its consoles per address
        (``active``), and read back the cluster: a L{View}."""

    def leave(name: str) -> defer.Deferred:
        """Remove node ``name`` and its consoles at once (a clean stop)."""

    def read_view(name: str) -> defer.Deferred:
        """The L{View} without announcing anything (the operator's CLI)."""

    def take_page(address: str, limit: int, window: float) -> defer.Deferred:
        """Count one console page for ``address``: None, or past ``limit``
        within ``window`` seconds, count nothing and give the seconds to wait."""

    def admit(node: str, address: str, live: list, per_address: int, per_minute: int,
              window: float, ttl: float) -> defer.Deferred:
        """Take a console for ``address`` on ``node`` within the per-address
        limits summed over the ``live`` nodes: (None, None) or (reason, retry_after)."""

    def release(node: str, address: str) -> defer.Deferred:
        """One console of ``address`` on ``node`` ended."""

    def check_address(address: str, live: list, per_address: int, per_minute: int,
                      window: float) -> defer.Deferred:
        """What L{admit} would decide for ``address`` now, changing nothing:
        (None, None) or (reason, retry_after)."""

    def spend_token(nonce: str, ttl: float) -> defer.Deferred:
        """Record a redeemed token's nonce for ``ttl`` seconds: True the first
        time anywhere in the cluster, False after."""

    def set_switch(state: str | None) -> defer.Deferred:
        """The cluster kill switch: "pause", "terminate", or None (on)."""

    def set_drain(node: str, draining: bool) -> defer.Deferred:
        """Drain ``node`` (it takes no new consoles), or stop draining it."""

    def publish_sample(node: str, sample: str, keep: int, ttl: float) -> defer.Deferred:
        """Add the admin page's newest ``sample`` (JSON) to ``node``'s list,
        keeping the ``keep`` newest; the list expires ``ttl`` seconds after."""

    def read_samples(names: list, keep: int) -> defer.Deferred:
        """The samples of each node of ``names`` (at most ``keep`` each,
        newest first): a dict of name to a list of JSON texts."""


# KEYS none (one Redis, not Redis Cluster: the prefix is an argument).
# ARGV: prefix, name, node JSON, ttl ms, then address, count pairs.
_HEARTBEAT = """
local p, name, ttl = ARGV[1], ARGV[2], tonumber(ARGV[4])
redis.call('SET', p .. 'node:' .. name, ARGV[3], 'PX', ttl)
redis.call('SADD', p .. 'nodes', name)
local active = p .. 'active:' .. name
redis.call('DEL', active)
for i = 5, #ARGV, 2 do redis.call('HSET', active, ARGV[i], ARGV[i + 1]) end
if #ARGV >= 5 then redis.call('PEXPIRE', active, ttl) end
""" + """
local nodes = {}
for _, member in ipairs(redis.call('SMEMBERS', p .. 'nodes')) do
  local value = redis.call('GET', p .. 'node:' .. member)
  if value then
    table.insert(nodes, value)
    table.insert(nodes, tostring(redis.call('EXISTS', p .. 'drain:' .. member)))
  else
    redis.call('SREM', p .. 'nodes', member)
  end
end
return {redis.call('GET', p .. 'switch') or '', nodes,
        tostring(redis.call('EXISTS', p .. 'drain:' .. name))}
"""

# The read half of the heartbeat, announcing nothing (ARGV: prefix, name).
_READ_VIEW = """
local p, name = ARGV[1], ARGV[2]
local nodes = {}
for _, member in ipairs(redis.call('SMEMBERS', p .. 'nodes')) do
  local value = redis.call('GET', p .. 'node:' .. member)
  if value then
    table.insert(nodes, value)
    table.insert(nodes, tostring(redis.call('EXISTS', p .. 'drain:' .. member)))
  end
end
return {redis.call('GET', p .. 'switch') or '', nodes,
        tostring(redis.call('EXISTS', p .. 'drain:' .. name))}
"""

# ARGV: key, limit, window ms, unique member. Returns 0, or seconds to wait.
_SLIDING_WINDOW = """
local key, limit, window = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
if redis.call('ZCARD', key) >= limit then
  local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  return math.max(1, math.ceil((tonumber(oldest[2]) + window - now) / 1000))
end
redis.call('ZADD', key, now, ARGV[4])
redis.call('PEXPIRE', key, window)
return 0
"""

# ARGV: prefix, node, address, per_address, per_minute, window ms, ttl ms,
# unique member, then the live nodes. Returns {reason, retry_after}.
_ADMIT = """
local p, node, address = ARGV[1], ARGV[2], ARGV[3]
local per_address, per_minute = tonumber(ARGV[4]), tonumber(ARGV[5])
local window, ttl = tonumber(ARGV[6]), tonumber(ARGV[7])
local active = 0
for i = 9, #ARGV do
  active = active + tonumber(redis.call('HGET', p .. 'active:' .. ARGV[i], address) or '0')
end
if active >= per_address then return {'rate-limited', 15} end
local starts = p .. 'starts:' .. address
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', starts, '-inf', now - window)
if redis.call('ZCARD', starts) >= per_minute then
  local oldest = redis.call('ZRANGE', starts, 0, 0, 'WITHSCORES')
  return {'rate-limited', math.max(1, math.ceil((tonumber(oldest[2]) + window - now) / 1000))}
end
redis.call('ZADD', starts, now, ARGV[8])
redis.call('PEXPIRE', starts, window)
redis.call('HINCRBY', p .. 'active:' .. node, address, 1)
redis.call('PEXPIRE', p .. 'active:' .. node, ttl)
return {'', 0}
"""

# The checks of _ADMIT, changing nothing (ARGV: prefix, address, per_address,
# per_minute, window ms, then the live nodes).
_CHECK_ADDRESS = """
local p, address = ARGV[1], ARGV[2]
local per_address, per_minute, window = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local active = 0
for i = 6, #ARGV do
  active = active + tonumber(redis.call('HGET', p .. 'active:' .. ARGV[i], address) or '0')
end
if active >= per_address then return {'rate-limited', 15} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local recent = redis.call('ZRANGEBYSCORE', p .. 'starts:' .. address, now - window + 1, '+inf',
                          'WITHSCORES', 'LIMIT', 0, per_minute)
if #recent / 2 >= per_minute then
  return {'rate-limited', math.max(1, math.ceil((tonumber(recent[2]) + window - now) / 1000))}
end
return {'', 0}
"""

# ARGV: active hash key, address.
_RELEASE = """
if redis.call('HINCRBY', ARGV[1], ARGV[2], -1) <= 0 then redis.call('HDEL', ARGV[1], ARGV[2]) end
return 0
"""


# ARGV: the list's key, the sample, how many to keep, ttl ms.
_PUBLISH_SAMPLE = """
redis.call('LPUSH', ARGV[1], ARGV[2])
redis.call('LTRIM', ARGV[1], 0, tonumber(ARGV[3]) - 1)
redis.call('PEXPIRE', ARGV[1], ARGV[4])
return 0
"""

# ARGV: prefix, how many per node, then the node names: a list per name.
_READ_SAMPLES = """
local lists = {}
for i = 3, #ARGV do
  table.insert(lists, redis.call('LRANGE', ARGV[1] .. 'samples:' .. ARGV[i], 0,
                                 tonumber(ARGV[2]) - 1))
end
return lists
"""


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def _view(reply) -> View:
    switch, pairs, drained = reply
    nodes = []
    for index in range(0, len(pairs), 2):
        node = NodeInfo.from_json(pairs[index], drained=pairs[index + 1] == "1")
        if node is not None:
            nodes.append(node)
    return View(nodes=tuple(sorted(nodes, key=lambda n: n.name)),
                switch=switch if switch in SWITCH_STATES else None,
                drained=drained == "1")


@implementer(IClusterStore)
@define
class RedisClusterStore:
    """L{IClusterStore} in Redis under ``prefix``."""

    _link: RedisLink
    prefix: str

    @property
    def up(self) -> bool:
        return self._link.up

    def heartbeat(self, node: NodeInfo, ttl: float, active: dict) -> defer.Deferred:
        args = [self.prefix, node.name, node.to_json(), _ms(ttl)]
        for address, count in active.items():
            args += [address, count]
        return self._link.eval(_HEARTBEAT, [], args).addCallback(_view)

    def read_view(self, name: str) -> defer.Deferred:
        return self._link.eval(_READ_VIEW, [], [self.prefix, name]).addCallback(_view)

    def leave(self, name: str) -> defer.Deferred:
        return defer.gatherResults([
            self._link.execute("DEL", f"{self.prefix}node:{name}", f"{self.prefix}active:{name}"),
            self._link.execute("SREM", f"{self.prefix}nodes", name),
        ], consumeErrors=True)

    def take_page(self, address: str, limit: int, window: float) -> defer.Deferred:
        d = self._link.eval(_SLIDING_WINDOW, [], [
            f"{self.prefix}pages:{address}", limit, _ms(window), secrets.token_hex(8)])
        return d.addCallback(lambda wait: int(wait) or None)

    def admit(self, node: str, address: str, live: list, per_address: int, per_minute: int,
              window: float, ttl: float) -> defer.Deferred:
        d = self._link.eval(_ADMIT, [], [
            self.prefix, node, address, per_address, per_minute, _ms(window), _ms(ttl),
            f"{node}:{secrets.token_hex(8)}", *live])
        return d.addCallback(lambda reply: (reply[0] or None, int(reply[1]) or None))

    def check_address(self, address: str, live: list, per_address: int, per_minute: int,
                      window: float) -> defer.Deferred:
        d = self._link.eval(_CHECK_ADDRESS, [], [
            self.prefix, address, per_address, per_minute, _ms(window), *live])
        return d.addCallback(lambda reply: (reply[0] or None, int(reply[1]) or None))

    def release(self, node: str, address: str) -> defer.Deferred:
        return self._link.eval(_RELEASE, [], [f"{self.prefix}active:{node}", address])

    def spend_token(self, nonce: str, ttl: float) -> defer.Deferred:
        d = self._link.execute("SET", f"{self.prefix}token:{nonce}", "1", "NX", "PX", _ms(ttl))
        return d.addCallback(lambda reply: reply == "OK")

    def set_switch(self, state: str | None) -> defer.Deferred:
        if state is None:
            return self._link.execute("DEL", f"{self.prefix}switch")
        if state not in SWITCH_STATES:
            raise ValueError(f"the switch is pause or terminate, got {state!r}")
        return self._link.execute("SET", f"{self.prefix}switch", state)

    def set_drain(self, node: str, draining: bool) -> defer.Deferred:
        if draining:
            return self._link.execute("SET", f"{self.prefix}drain:{node}", "1")
        return self._link.execute("DEL", f"{self.prefix}drain:{node}")

    def publish_sample(self, node: str, sample: str, keep: int, ttl: float) -> defer.Deferred:
        return self._link.eval(_PUBLISH_SAMPLE, [], [
            f"{self.prefix}samples:{node}", sample, keep, _ms(ttl)])

    def read_samples(self, names: list, keep: int) -> defer.Deferred:
        if not names:
            return defer.succeed({})
        d = self._link.eval(_READ_SAMPLES, [], [self.prefix, keep, *names])
        return d.addCallback(lambda lists: dict(zip(names, lists, strict=True)))
