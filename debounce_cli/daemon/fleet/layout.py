"""Where the fleet keeps its data in Redis, and the one script a step on a key runs there;
the store's interface types (no redis import here: the rest of the daemon names them freely).

Layout, all under ``debounce:``; a key's own data sits under its shard's hash tag, ``{sX}``
with ``X`` the first hex digit of ``T``, a digest of the key (16 shards), beside the shard's
index of pending keys, so that a step on a key and the index stay in one slot of a Redis
Cluster; the fleet's own keys sit under ``{fleet}``::

    debounce:{sX}:T:state      the key's state (JSON, see ``record.KeyState``)
    debounce:{sX}:T:events     its stream of events (pending, started, output, finished...),
                               capped at EVENTS_MAXLEN entries; both expire a week after
                               the key fell idle
    debounce:{sX}:index        sorted set: T -> when something of the key next needs doing
    debounce:{fleet}:hosts     hash: host -> its last heartbeat (the store's time)
    debounce:{fleet}:runs      counter of fleet run ids
    debounce:{fleet}:history   list of finished runs, newest first (JSON records)
    debounce:{fleet}:run:N     the key of fleet run N (for --run N), kept a week
    debounce:{fleet}:epoch     a token set by the first daemon: when it is gone (or the run
                               counter went back) the store has lost data, and each daemon
                               submits its own pending invocations again
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import NamedTuple, TypeVar

from debounce_cli.daemon.fleet.record import Event, KeyState

T = TypeVar("T")

#: Events kept per key: a waiter further behind than this misses output (and is told so).
EVENTS_MAXLEN = 10000
PREFIX = "debounce:"
#: The fleet's own keys share one hash tag, so that they sit in one slot of a Redis Cluster.
FLEET = PREFIX + "{fleet}:"
HOSTS = FLEET + "hosts"
LEASES = FLEET + "leases"  # each host's --lease: a host is judged silent by the longer one
RUNS = FLEET + "runs"
HISTORY = FLEET + "history"
EPOCH = FLEET + "epoch"
#: A host silent this long leaves the table of heartbeats (its runs were long given up).
FORGET_HOST = 24 * 3600
#: An idle key's state (its last run) is kept this long after its last change.
IDLE_TTL = 7 * 24 * 3600

class Beat(NamedTuple):
    now: float
    hosts: dict[str, float]
    epoch: bytes | None
    runs: int
    #: Each host's own lease, as it said in its heartbeat (a mapping never changed).
    leases: Mapping[str, float] = MappingProxyType({})


class StoreDown(Exception):
    """The store cannot be reached or failed; ``str()`` names it and says what failed.

    ``maybe_applied``: a write went out and its answer did not come back, so the store may
    have applied it (a step retried with the same token finds its own work done)."""

    def __init__(self, message: str, maybe_applied: bool = False) -> None:
        super().__init__(message)
        self.maybe_applied = maybe_applied


def tag_of(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:24]


def shard_of(tag: str) -> str:
    """The hash tag a key's data and its index share (one of 16)."""
    return f"{PREFIX}{{s{tag[0]}}}:"


def state_key(tag: str) -> str:
    return f"{shard_of(tag)}{tag}:state"


def events_key(tag: str) -> str:
    return f"{shard_of(tag)}{tag}:events"


def index_key(tag: str) -> str:
    return f"{shard_of(tag)}index"


def channel(tag: str) -> str:
    """Where a key's new events are announced (the id of the latest)."""
    return f"{PREFIX}ev:{tag}"


#: Every shard's index (tags ``0``..``f`` stand for their shards).
INDEXES = [index_key(digit) for digit in "0123456789abcdef"]


def event_id(raw: bytes | str) -> tuple[int, int]:
    """A stream id as a tuple that compares in stream order."""
    text = raw.decode() if isinstance(raw, bytes) else raw
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


Step = Callable[[KeyState, float], tuple[T, list[Event]]]

#: One step on a key, checked and written at once. KEYS: state, events, index, history (on
#: one Redis; a cluster's history is in another slot). ARGV: the SHA-1 of the state the step
#: was computed from ("" if none), the step's time, the slack behind and ahead, "1" to write,
#: the new state, its time to live ("0": for ever), the key's tag, its index score ("": out
#: of the index), its channel, a finished run's record for the history ("": none), the
#: history's length, the most events a stream keeps, then the events.
#: Answers {1, sec, usec, the key's latest event id, its latest before the step, the ids of
#: the events added}, or, when the state is not the one the step was computed from or its
#: time is too far from TIME, {0, sec, usec, the state}.
STEP = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local cur = redis.call('GET', KEYS[1])
local sha = ''
if cur then sha = redis.sha1hex(cur) end
local asked = tonumber(ARGV[2])
if sha ~= ARGV[1] or asked < now - tonumber(ARGV[3]) or asked > now + tonumber(ARGV[4]) then
  return {0, t[1], t[2], cur}
end
local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
local before = '0-0'
if last[1] then before = last[1][1] end
local reply = {1, t[1], t[2], before, before}
if ARGV[5] == '1' then
  local ttl = tonumber(ARGV[7])
  if ttl > 0 then
    redis.call('SET', KEYS[1], ARGV[6], 'EX', ttl)
  else
    redis.call('SET', KEYS[1], ARGV[6])
  end
  for i = 14, #ARGV do
    reply[#reply + 1] = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[13], '*', 'e',
                                   ARGV[i])
  end
  if ttl > 0 then
    redis.call('EXPIRE', KEYS[2], ttl)
  else
    redis.call('PERSIST', KEYS[2])
  end
  if ARGV[9] == '' then
    redis.call('ZREM', KEYS[3], ARGV[8])
  else
    redis.call('ZADD', KEYS[3], ARGV[9], ARGV[8])
  end
  if ARGV[11] ~= '' and KEYS[4] then
    redis.call('LPUSH', KEYS[4], ARGV[11])
    redis.call('LTRIM', KEYS[4], 0, tonumber(ARGV[12]) - 1)
  end
end
if #reply > 5 then
  reply[4] = reply[#reply]
  redis.call('PUBLISH', ARGV[10], reply[4])
end
return reply
"""
STEP_SHA = hashlib.sha1(STEP.encode()).hexdigest()


