"""The fleet's store: Redis, through redis-py's asyncio client (imported here only, so only a
daemon with a store ever loads it).

Layout, all under ``debounce:``; a key's own data sits under its shard's hash tag, ``{sX}``
with ``X`` the first hex digit of ``T``, a digest of the key (16 shards), beside the shard's
index of pending keys, so that a step on a key and the index stay in one slot of a Redis
Cluster; the fleet's own keys sit under ``{fleet}``::

    debounce:{sX}:T:state      the key's state (JSON, see ``state.KeyState``)
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

A step on a key is one round trip: the rules run here, in Python, on the key's state as this
host last wrote or read it (``Store.cache``), at the store's clock as this host reckons it
(its monotonic clock plus the offset measured from the store's ``TIME`` at every answer);
one script (``STEP``, by EVALSHA) then checks that the state is still the one the step was
computed from (its SHA-1) and that the step's time is within ``SLACK_BEHIND``/``SLACK_AHEAD``
of the store's ``TIME``, and writes the state, appends the events, sets the key in the index
and (on one Redis) the history, all at once. When the check fails the script answers the
state as it is and its ``TIME``, and the step is computed again on them: the rules are never
written twice, and a host whose view is stale pays one more round trip. Steps that fall in
one turn of the event loop go out in one pipeline.

Each step's last event id is published on the key's channel (``debounce:ev:T``); the one
reader subscribes to the channels of the keys it follows and reads a key's stream only when
told it grew, so its cost follows the events, not the keys followed. The same works on a
Redis Cluster (whose nodes pass every publication on to each other). There the history,
in the ``{fleet}`` slot, is written just after the step.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import time
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisClusterException, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from debounce_cli.daemon.fleet.state import Event, KeyState
from debounce_cli.daemon.fleet.url import display

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
#: Connections for calls to the store, at most (the reader of events has its own two).
POOL_SIZE = 32
#: Attempts of one step on a key that others keep changing, at most.
MAX_TRIES = 200
#: How far behind the store's ``TIME`` a step's time may be (it was computed that long before
#: it reached the store; a host frozen longer computes it again) and how far ahead (this
#: host's reckoning of the store's clock may run a little fast between two measurements).
SLACK_BEHIND = 0.5
SLACK_AHEAD = 0.05
#: Keys' states this host keeps to compute steps on, at most (the oldest are forgotten: a
#: step on one of those costs a second round trip; each holds its job's environment).
CACHE_KEYS = 20_000
#: Steps sent in one pipeline, at most.
BATCH = 256
#: A host silent this long leaves the table of heartbeats (its runs were long given up).
FORGET_HOST = 24 * 3600
#: An idle key's state (its last run) is kept this long after its last change.
IDLE_TTL = 7 * 24 * 3600

T = TypeVar("T")

#: What a call to the store may fail with: redis-py's errors, a Redis Cluster's (which are
#: not RedisErrors: a cluster still settling its slots raises SlotNotCoveredError), the
#: network's.
_FAILED = (RedisError, RedisClusterException, OSError)


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


class _Call(NamedTuple):
    """One step's script call, waiting for the next pipeline."""

    keys: list[str]
    args: list[Any]
    answer: asyncio.Future[Any]


class Store:
    def __init__(self, url: str) -> None:
        self.name = display(url)
        # A pooled connection that went stale (the store restarted) is replaced at once, and
        # a failover gets a moment; past that the store counts as down.
        settings: dict[str, Any] = {
            "socket_timeout": 5.0, "socket_connect_timeout": 3.0, "health_check_interval": 30,
            "retry": Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),
            "retry_on_error": [RedisConnectionError, RedisTimeoutError]}
        # Steps share a bounded pool (a burst of submissions waits for a connection rather
        # than opening one each); the one blocking reader of events has its own.
        self.url = url
        self.settings = settings
        self.redis: Any = aioredis.Redis(
            connection_pool=aioredis.BlockingConnectionPool.from_url(
                url, max_connections=POOL_SIZE, timeout=10.0, **settings))
        self.reader: Any = aioredis.Redis.from_url(url, max_connections=1, **settings)
        #: A Redis Cluster? Known once the store has first answered (see _ready).
        self.cluster: bool | None = None
        #: key -> its state as this host last wrote or read it (``None``: it had none), to
        #: compute the next step on; the store checks it is still current.
        self.cache: dict[str, bytes | None] = {}
        #: The store's TIME minus our monotonic clock, as last measured.
        self.offset: float | None = None
        self.calls: list[_Call] = []  # steps waiting for the pipeline in flight
        self.sending = False
        self.sender: asyncio.Future[None] | None = None
        # The reader: which keys it follows (from after which event id), and its
        # subscriptions to their channels.
        self.positions: dict[str, bytes] = {}
        self.channels: dict[bytes, str] = {}  # channel -> key
        self.dirty: set[str] = set()  # keys whose streams have news for us
        self.subscribe: set[str] = set()  # keys to subscribe to (or again)
        #: Events this host's own steps added to keys it follows, for the reader (which
        #: then need not read them back).
        self.own: list[tuple[str, bytes, Event]] = []
        #: Keys with a step of ours in flight, and the notices heard for them meanwhile (most
        #: are of that very step's events, which it hands over itself: see _stepped).
        self.stepping: dict[str, int] = {}
        self.deferred: dict[str, bytes] = {}
        self.waiting = False  # the reader waits for a notice
        #: This store's own channel, on which a notice that was held back wakes its reader.
        self.wake_channel = f"{PREFIX}ev:-{secrets.token_hex(8)}"
        self.unsubscribe: set[str] = set()
        self.pubsub: Any = None
        self.listener: Any = None  # the connection the pubsub is on
        self.listening = asyncio.Lock()  # one change of the subscriptions at a time
        self.background: set[asyncio.Future[None]] = set()  # (closing old listeners, waking)

    async def _ready(self) -> None:
        """Learn once whether the store is a Redis Cluster, and if so talk to it as one: the
        keys of one fleet key share a hash tag, and so do the fleet's own keys; each step
        stays in one slot, and what crosses slots is written apart."""
        if self.cluster is not None:
            return
        info = await self.redis.info("cluster")
        if info.get("cluster_enabled"):
            from redis.asyncio.cluster import RedisCluster

            cluster = RedisCluster.from_url(self.url, socket_timeout=5.0,
                                            socket_connect_timeout=3.0)
            try:
                # Learn the slots now: which node holds a key is asked before the first
                # command (_time), and a client that has not asked yet answers
                # SlotNotCoveredError. A cluster still settling: asked again next time.
                await cluster.initialize()
            except BaseException:
                await cluster.aclose()
                raise
            plain = (self.redis, self.reader)
            self.redis = self.reader = cluster
            for client in plain:
                await client.aclose()
                await client.connection_pool.disconnect()
        self.cluster = bool(info.get("cluster_enabled"))
        try:
            await self.redis.script_load(STEP)  # (on every primary of a cluster)
        except _FAILED:
            pass  # the first step loads it

    async def _time(self, key: str) -> Any:
        """TIME from the node that holds ``key`` (in a cluster every node has its own)."""
        if self.cluster:
            return await self.redis.time(target_nodes=self.redis.get_node_from_key(key))
        return await self.redis.time()

    def down(self, exc: BaseException, maybe_applied: bool = False) -> StoreDown:
        return StoreDown(f"the fleet store {self.name} cannot be reached ({_why(exc)})",
                         maybe_applied)

    async def close(self) -> None:
        if self.sender is not None:
            self.sender.cancel()
        if self.pubsub is not None:
            try:
                await self.pubsub.aclose()
            except _FAILED:
                pass
        clients = (self.reader, self.redis, self.listener)
        for client in {id(c): c for c in clients if c is not None}.values():
            try:
                await client.aclose()
                pool = getattr(client, "connection_pool", None)
                if pool is not None:  # (a pool it was given is not closed with it)
                    await pool.disconnect()
            except _FAILED:
                pass

    # ------------------------------------------------------------------ time and hosts
    async def now(self) -> float:
        """The store's clock, seconds since the epoch (every due time is on it)."""
        try:
            await self._ready()
            sec, usec = await self._time(HOSTS)
        except _FAILED as exc:
            raise self.down(exc) from None
        return self._measured(sec, usec)

    def _measured(self, sec: Any, usec: Any) -> float:
        """The store's TIME as it answered it; the offset of our clock follows it."""
        now = int(sec) + int(usec) / 1e6
        self.offset = now - time.monotonic()
        return now

    def _reckoned(self) -> float:
        """The store's clock as this host reckons it (measured at every answer)."""
        assert self.offset is not None
        return time.monotonic() + self.offset

    async def heartbeat(self, host: str, lease: float = 0.0) -> Beat:
        """Say ``host`` is alive (and its lease); return the store's time, every host's last
        heartbeat and lease, the store's epoch token and its run counter."""
        try:
            await self._ready()
            now = await self.now()
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hset(HOSTS, host, repr(now))
                if lease:
                    pipe.hset(LEASES, host, repr(lease))
                pipe.hgetall(HOSTS)
                pipe.hgetall(LEASES)
                pipe.get(EPOCH)
                pipe.get(RUNS)
                *_, beats, leases, epoch, runs = await pipe.execute()
        except _FAILED as exc:
            raise self.down(exc) from None
        hosts = {k.decode(errors="replace"): float(v) for k, v in beats.items()}
        held = {k.decode(errors="replace"): float(v) for k, v in leases.items()}
        return Beat(now, hosts, epoch, int(runs or 0), held)

    async def claim_epoch(self, at_least_runs: int) -> bytes:
        """The store's epoch token, set now if it has none; the run counter is raised to
        ``at_least_runs`` so that run ids are never given twice."""
        import secrets

        try:
            await self._ready()
            await self.redis.set(EPOCH, secrets.token_hex(8), nx=True)
            current = int(await self.redis.get(RUNS) or 0)
            if current < at_least_runs:
                await self.redis.incrby(RUNS, at_least_runs - current)
            epoch = await self.redis.get(EPOCH)
            return epoch if isinstance(epoch, bytes) else str(epoch or "").encode()
        except _FAILED as exc:
            raise self.down(exc) from None

    async def forget_hosts(self, hosts: list[str]) -> None:
        try:
            await self._ready()
            await self.redis.hdel(HOSTS, *hosts)
            await self.redis.hdel(LEASES, *hosts)
        except _FAILED:
            pass

    async def leave(self, host: str) -> None:
        """``host`` stops: the others may take over what it was to run at once."""
        try:
            await self._ready()
            await self.redis.hdel(HOSTS, host)
        except _FAILED:
            pass

    async def next_run_id(self) -> int:
        try:
            await self._ready()
            return int(await self.redis.incr(RUNS))
        except _FAILED as exc:
            raise self.down(exc) from None

    # ------------------------------------------------------------------ keys
    async def update(self, key: str, step: Step[T], history: int = 0
                     ) -> tuple[T, bytes, KeyState]:
        """Apply ``step`` to ``key``'s state at once; return its result, the id of the key's
        latest event after it (a reader from there misses nothing that came after the step),
        and the state as written. With ``history``, a run the step finished (``state.last``
        changed) goes into the history, which keeps that many.

        The step is computed on the state this host last saw, at the store's time as this
        host reckons it; when the store finds either out of date it answers the state and
        time as they are, and the step is computed again (see ``STEP``)."""
        tag = tag_of(key)
        skey, ekey = state_key(tag), events_key(tag)
        try:
            await self._ready()
            keys = [skey, ekey, index_key(tag)] + ([] if self.cluster else [HISTORY])
            if self.offset is None:
                await self.now()
            now = self._reckoned()
            for _ in range(MAX_TRIES):
                raw = self.cache.get(key)
                st = KeyState.loads(key, raw)
                # (the state as stored: a step that changes nothing writes nothing)
                before = st.dumps() if raw is None else raw.decode()
                last_before = st.last
                result, events = step(st, now)
                after = st.dumps()
                write = after != before or bool(events)
                finished = (st.last.record(key) if history and st.last is not None
                            and st.last is not last_before else None)
                score = st.index_score()
                args: list[Any] = [
                    "" if raw is None else hashlib.sha1(raw).hexdigest(), repr(now),
                    SLACK_BEHIND, SLACK_AHEAD, "1" if write else "0", after if write else "",
                    IDLE_TTL if st.idle() else 0, tag, "" if score is None else repr(score),
                    channel(tag), json.dumps(finished) if finished is not None else "",
                    history, EVENTS_MAXLEN,
                    *(json.dumps(event, separators=(",", ":")) for event in events)]
                if write:  # steps after this one (in the same pipeline, say) build on it
                    self._remember(key, after.encode())
                self.stepping[key] = self.stepping.get(key, 0) + 1
                try:
                    try:
                        done, _, _, payload, *added = await self._call(keys, args)
                    except _FAILED as exc:
                        self.cache.pop(key, None)  # written or not: unknown
                        raise self.down(exc, maybe_applied=write and not _unsent(exc)) from None
                    except BaseException:
                        self.cache.pop(key, None)
                        raise
                    if done and write and events:
                        self._own(key, added[0], added[1:], events)
                finally:
                    self._stepped(key)
                now = self._reckoned()  # (measured as the answer came: see _send)
                if done:
                    if finished is not None and self.cluster:  # in another slot: apart
                        async with self.redis.pipeline(transaction=True) as apart:
                            apart.lpush(HISTORY, json.dumps(finished))
                            apart.ltrim(HISTORY, 0, history - 1)
                            await apart.execute()
                    if not write:
                        self._remember(key, raw)
                    return result, bytes(payload), st
                # Another host changed the key meanwhile (or this host never saw it, or the
                # step's time was too old): again, on the state and time the store answered.
                self._remember(key, None if payload is None else bytes(payload))
        except _FAILED as exc:
            raise self.down(exc) from None
        raise StoreDown(f"the fleet store {self.name}: key {key!r} changed under {MAX_TRIES} "
                        "attempts in a row; try again")

    def _remember(self, key: str, raw: bytes | None) -> None:
        cache = self.cache
        cache.pop(key, None)
        cache[key] = raw  # (the newest last: the oldest go first when there are too many)
        if len(cache) > CACHE_KEYS:
            del cache[next(iter(cache))]

    def _call(self, keys: list[str], args: list[Any]) -> asyncio.Future[Any]:
        """The step's script call, in the next pipeline (one at a time is in flight; the
        steps that come meanwhile go together in the next)."""
        answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.calls.append(_Call(keys, args, answer))
        if not self.sending:
            self.sending = True
            self.sender = asyncio.ensure_future(self._send())
        return answer

    async def _send(self) -> None:
        calls: list[_Call] = []
        try:
            while self.calls:
                calls, self.calls = self.calls[:BATCH], self.calls[BATCH:]
                try:
                    replies = await self._pipeline(calls, sha=True)
                    again = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
                    if again:  # a store that restarted has forgotten the script
                        redone = await self._pipeline([calls[i] for i in again], sha=False)
                        for i, reply in zip(again, redone, strict=True):
                            replies[i] = reply
                except Exception as exc:  # noqa: BLE001 - each step hears it
                    for call in calls:
                        if not call.answer.done():
                            call.answer.set_exception(exc)
                    continue
                for call, reply in zip(calls, replies, strict=True):
                    if call.answer.done():
                        continue
                    if isinstance(reply, Exception):
                        call.answer.set_exception(reply)
                    else:
                        self._measured(reply[1], reply[2])
                        call.answer.set_result(reply)
                calls = []
        finally:
            self.sending = False
            for call in calls + self.calls:  # cancelled (the daemon stops)
                call.answer.cancel()
            self.calls = []

    async def _pipeline(self, calls: list[_Call], sha: bool) -> list[Any]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for call in calls:
                if sha:
                    pipe.evalsha(STEP_SHA, len(call.keys), *call.keys, *call.args)
                else:
                    pipe.eval(STEP, len(call.keys), *call.keys, *call.args)
            return list(await pipe.execute(raise_on_error=False))

    async def name_run(self, run: int, key: str) -> None:
        """Which key fleet run ``run`` belongs to (``--run N`` from any host)."""
        try:
            await self._ready()
            await self.redis.set(f"{FLEET}run:{run}", key.encode("utf-8", "surrogateescape"),
                                 ex=IDLE_TTL)
        except _FAILED:
            pass  # only --run N on this run is the poorer for it

    async def key_of_run(self, run: int) -> str | None:
        try:
            await self._ready()
            key = await self.redis.get(f"{FLEET}run:{run}")
        except _FAILED as exc:
            raise self.down(exc) from None
        if key is None:
            return None
        return key.decode("utf-8", "surrogateescape") if isinstance(key, bytes) else str(key)

    async def snapshot(self, key: str) -> tuple[KeyState, bytes]:
        """The key's state and the id of its latest event, read together."""
        tag = tag_of(key)
        try:
            await self._ready()
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.get(state_key(tag))
                pipe.xrevrange(events_key(tag), count=1)
                raw, latest = await pipe.execute()
        except _FAILED as exc:
            raise self.down(exc) from None
        return KeyState.loads(key, raw), _first_id(latest)

    async def indexed(self, upto: float | None = None) -> list[str]:
        """Tags in the index (those whose next thing is due by ``upto``)."""
        try:
            await self._ready()
            async with self.redis.pipeline(transaction=False) as pipe:
                for index in INDEXES:
                    pipe.zrangebyscore(index, "-inf", "+inf" if upto is None else repr(upto))
                found = await pipe.execute()
        except _FAILED as exc:
            raise self.down(exc) from None
        return [t.decode() if isinstance(t, bytes) else str(t) for part in found for t in part]

    async def states(self, tags: list[str]) -> list[KeyState]:
        if not tags:
            return []
        try:
            await self._ready()
            names = [state_key(t) for t in tags]
            raws = await (self.redis.mget_nonatomic(names) if self.cluster
                          else self.redis.mget(names))
        except _FAILED as exc:
            raise self.down(exc) from None
        return [KeyState.loads(json.loads(raw)["key"], raw) for raw in raws if raw]

    async def history(self, key: str | None, limit: int) -> list[dict[str, Any]]:
        try:
            await self._ready()
            raws = await self.redis.lrange(HISTORY, 0, -1 if key is not None else limit - 1)
        except _FAILED as exc:
            raise self.down(exc) from None
        rows = [json.loads(raw) for raw in raws]
        if key is not None:
            rows = [row for row in rows if row.get("key") == key]
        return rows[:limit]

    # ------------------------------------------------------------------ events
    async def publish(self, batch: list[tuple[str, Event]]) -> None:
        """Add events (output of runs executing here) to their keys' streams, in order."""
        try:
            await self._ready()
            async with self.redis.pipeline(transaction=False) as pipe:
                last: dict[str, int] = {}
                for key, event in batch:
                    last[key] = len(pipe)
                    pipe.xadd(events_key(tag_of(key)),
                              {"e": json.dumps(event, separators=(",", ":"))},
                              maxlen=EVENTS_MAXLEN, approximate=True)
                ids = await pipe.execute()
                if self.cluster:  # (a cluster's pipeline refuses PUBLISH)
                    await asyncio.gather(*(self.redis.publish(channel(tag_of(key)), ids[at])
                                           for key, at in last.items()))
                else:
                    for key, at in last.items():
                        pipe.publish(channel(tag_of(key)), ids[at])
                    await pipe.execute()
        except _FAILED as exc:
            raise self.down(exc) from None

    def _stepped(self, key: str) -> None:
        """A step of ours on ``key`` is answered: a notice of the key heard meanwhile is for
        the reader now, unless it named only events the step handed over already."""
        left = self.stepping[key] - 1
        if left:
            self.stepping[key] = left
            return
        del self.stepping[key]
        notice = self.deferred.pop(key, None)
        position = self.positions.get(key)
        if notice is not None and position is not None and (
                event_id(notice) > event_id(position)):
            self.dirty.add(key)
            if self.waiting:  # the reader waits for a notice: give it one
                self.waiting = False
                task = asyncio.ensure_future(self._wake())
                self.background.add(task)
                task.add_done_callback(self.background.discard)

    async def _wake(self) -> None:
        try:
            await self.redis.publish(self.wake_channel, b"")
        except _FAILED:
            pass  # (the reader finds the key at its next notice, or within a second)

    def _own(self, key: str, before: bytes, ids: list[bytes], events: list[Event]) -> None:
        """A step of ours added ``events`` to a key the reader follows: when the reader has
        read everything before them, they go to it from here, and its place moves on."""
        if self.positions.get(key) != before:
            return  # (not followed, or the reader is behind or ahead: it reads them)
        self.own.extend(zip((key,) * len(ids), ids, events, strict=True))
        self.positions[key] = ids[-1]

    def follow(self, key: str, since: bytes) -> None:
        """The reader reads ``key``'s events after ``since`` from now on (again from there,
        if it followed it already)."""
        if key not in self.positions:
            self.channels[channel(tag_of(key)).encode()] = key
        elif self.own:
            self.own = [entry for entry in self.own if entry[0] != key]  # read from ``since``
        self.positions[key] = since
        self.unsubscribe.discard(key)
        self.subscribe.add(key)  # once subscribed, its stream is read from ``since``

    def unfollow(self, key: str) -> None:
        if self.positions.pop(key, None) is None:
            return
        self.dirty.discard(key)
        if key in self.subscribe:
            self.subscribe.discard(key)
            self.channels.pop(channel(tag_of(key)).encode(), None)
        else:
            self.unsubscribe.add(key)

    async def _listen(self) -> Any:
        """The reader's subscriptions, brought up to date (a connection of their own: on a
        cluster, to one node, which hears what every node publishes)."""
        async with self.listening:
            return await self._subscriptions()

    async def _subscriptions(self) -> Any:
        if self.pubsub is None:
            # (no health check: a PING would race the reader on its own connection)
            settings = {k: v for k, v in self.settings.items() if k != "health_check_interval"}
            if self.cluster:
                node = self.redis.get_default_node()
                self.listener = aioredis.Redis(host=node.host, port=node.port, **settings)
            else:
                self.listener = aioredis.Redis.from_url(self.url, max_connections=1,
                                                        **settings)
            self.pubsub = self.listener.pubsub()
            # Subscribed to something from the start, so that reading never finds the
            # connection idle; after a reconnection every key is read again.
            await self.pubsub.subscribe(self.wake_channel)
            self.subscribe |= self.positions.keys()
        if self.unsubscribe:
            gone, self.unsubscribe = self.unsubscribe, set()
            names = [channel(tag_of(key)) for key in gone if key not in self.positions]
            for name in names:
                self.channels.pop(name.encode(), None)
            if names:
                await self.pubsub.unsubscribe(*names)
        if self.subscribe:
            new, self.subscribe = self.subscribe, set()
            names = [channel(tag_of(key)) for key in new if key in self.positions]
            if names:
                await self.pubsub.subscribe(*names)
        return self.pubsub

    async def read(self, block_ms: int) -> list[tuple[str, bytes, Event]]:
        """New events of the followed keys, waiting up to ``block_ms`` for the first.

        The reader hears of a key's new events on its channel, and reads its stream then;
        a key just followed is read once its subscription stands (so nothing falls between
        the two)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + block_ms / 1000
        try:
            await self._ready()
            pubsub = await self._listen()
            while True:
                while not self.dirty and not self.own:
                    left = deadline - loop.time()
                    if left <= 0:
                        return []
                    self.waiting = True
                    try:
                        message = await pubsub.get_message(timeout=left)
                    finally:
                        self.waiting = False
                    while message is not None:
                        self._heard(message)
                        message = await pubsub.get_message(timeout=0)
                    await self._listen()
                found = await self._read_dirty() if self.dirty else []
                if self.own:  # (before what was read: they are older)
                    found, self.own = self.own + found, []
                if found:
                    return found
        except _FAILED as exc:
            self._lost_listener()
            raise self.down(exc) from None

    def _lost_listener(self) -> None:
        """The reader's connection failed: a new one subscribes to every key again (and so
        reads them all again: what was said meanwhile was not heard)."""
        if self.pubsub is not None:
            pubsub, listener = self.pubsub, self.listener
            self.pubsub = self.listener = None

            async def close() -> None:
                try:
                    await pubsub.aclose()
                    await listener.aclose()
                except _FAILED:
                    pass

            task = asyncio.ensure_future(close())
            self.background.add(task)
            task.add_done_callback(self.background.discard)

    def _heard(self, message: dict[str, Any]) -> None:
        key = self.channels.get(message.get("channel") or b"")
        if key is None or key not in self.positions:
            return
        if message["type"] == "subscribe":
            self.dirty.add(key)  # (subscribed: what came before, its stream has)
        elif message["type"] == "message":
            if key in self.stepping:  # (most likely that step's own events)
                held = self.deferred.get(key)
                if held is None or event_id(message["data"]) > event_id(held):
                    self.deferred[key] = message["data"]
            elif event_id(message["data"]) > event_id(self.positions[key]):
                self.dirty.add(key)

    async def _read_dirty(self) -> list[tuple[str, bytes, Event]]:
        keys = list(self.dirty)[:1000]
        self.dirty.difference_update(keys)
        names = {events_key(tag_of(key)): key for key in keys}
        streams = {events_key(tag_of(key)): self.positions[key] for key in keys}
        try:
            if self.cluster:  # (a read may not name streams of several slots)
                async with self.redis.pipeline(transaction=False) as pipe:
                    for name, last in streams.items():
                        pipe.xread({name: last}, count=1000)
                    reply = [stream for part in await pipe.execute() for stream in part or []]
            else:
                reply = await self.reader.xread(streams, count=1000)
        except BaseException:
            self.dirty.update(keys)  # read again next time
            raise
        out: list[tuple[str, bytes, Event]] = []
        for stream, entries in reply or []:
            key = names[stream.decode() if isinstance(stream, bytes) else stream]
            if key not in self.positions:
                continue
            more = len(entries) >= 1000
            after = event_id(self.positions[key])  # (our own steps' may be in hand already)
            entries = [entry for entry in entries if event_id(entry[0]) > after]
            if more:
                self.dirty.add(key)  # more to come
            if not entries:
                continue
            for entry_id, fields in entries:
                out.append((key, entry_id, json.loads(fields[b"e"])))
            self.positions[key] = entries[-1][0]
        return out

    async def events(self, key: str, upto: bytes | None = None
                     ) -> list[tuple[bytes, Event]]:
        """The key's events still kept, oldest first (up to ``upto``, included)."""
        try:
            await self._ready()
            entries: Any = await self.redis.xrange(events_key(tag_of(key)), "-",
                                                   upto if upto is not None else "+")
        except _FAILED as exc:
            raise self.down(exc) from None
        return [(entry_id, json.loads(fields[b"e"])) for entry_id, fields in entries]

    async def unblock_reader(self) -> None:
        """The reader follows new keys: subscribe to them now (the answers wake it)."""
        if self.pubsub is None:
            return
        try:
            await self._listen()
        except _FAILED:
            self._lost_listener()

    async def trimmed_after(self, key: str, last: bytes) -> bool:
        """Has the key's stream dropped events after ``last`` (a reader there missed them)?
        Redis 7 says which id it deleted last; an older one cannot tell (False)."""
        try:
            await self._ready()
            info: Any = await self.redis.xinfo_stream(events_key(tag_of(key)))
        except ResponseError:
            return False  # no such stream (yet): nothing was trimmed
        except _FAILED as exc:
            raise self.down(exc) from None
        deleted = info.get("max-deleted-entry-id")
        if not deleted:
            return False
        return event_id(deleted) > event_id(last) and event_id(last) != (0, 0)


def _unsent(exc: BaseException) -> bool:
    """The request never reached the store: no connection could be made (redis-py says
    "connecting to" for a refused or timed-out connect), so nothing was applied."""
    return isinstance(exc, ConnectionRefusedError) or "connecting to" in str(exc).lower()


def _why(exc: BaseException) -> str:
    """What failed, in a few words: the system's reason when there is one."""
    if isinstance(exc, (RedisTimeoutError, TimeoutError)):
        return "timed out"
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror.lower()
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


def _first_id(entries: Any) -> bytes:
    """The id of the first of some stream entries (``0-0`` when there are none)."""
    return bytes(entries[0][0]) if entries else b"0-0"
