"""The fleet's store: Redis, through redis-py's asyncio client (imported here only, so only a
daemon with a store ever loads it).

Layout, all under ``debounce:``; every key's own data sits under one hash tag, ``{T}`` with
``T`` a digest of the key, and the fleet's own keys under ``{fleet}``::

    debounce:{T}:state         the key's state (JSON, see ``state.KeyState``)
    debounce:{T}:events        its stream of events (pending, started, output, finished...),
                               capped at EVENTS_MAXLEN entries; both expire a week after
                               the key fell idle
    debounce:{fleet}:index     sorted set: T -> when something of the key next needs doing
    debounce:{fleet}:hosts     hash: host -> its last heartbeat (the store's time)
    debounce:{fleet}:runs      counter of fleet run ids
    debounce:{fleet}:history   list of finished runs, newest first (JSON records)
    debounce:{fleet}:run:N     the key of fleet run N (for --run N), kept a week
    debounce:{fleet}:epoch     a token set by the first daemon: when it is gone (or the run
                               counter went back) the store has lost data, and each daemon
                               submits its own pending invocations again

A step on a key is one optimistic transaction (WATCH the state, read it and the store's
``TIME``, compute, MULTI/EXEC), retried when another host changed the key meanwhile. On one
Redis the index and the history are written in the same transaction. A Redis Cluster is
recognised when it first answers: there each step stays in its key's slot (TIME comes from
that key's node), the index and history follow in a transaction of the ``{fleet}`` slot, and
the reader polls each key's stream (a blocking read may not span slots).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError, ResponseError, WatchError
from redis.exceptions import TimeoutError as RedisTimeoutError

from debounce_cli.daemon.fleet.state import Event, KeyState
from debounce_cli.daemon.fleet.url import display

#: Events kept per key: a waiter further behind than this misses output (and is told so).
EVENTS_MAXLEN = 10000
PREFIX = "debounce:"
#: The fleet's own keys share one hash tag, so that they sit in one slot of a Redis Cluster.
FLEET = PREFIX + "{fleet}:"
INDEX = FLEET + "index"
HOSTS = FLEET + "hosts"
RUNS = FLEET + "runs"
HISTORY = FLEET + "history"
EPOCH = FLEET + "epoch"
#: Connections for steps on keys, at most (the reader of events has one of its own).
POOL_SIZE = 32
#: How often a cluster's reader looks for events (it cannot block on several slots at once).
POLL = 0.05
#: Attempts of one step on a key that others keep changing, at most.
MAX_TRIES = 200
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


class StoreDown(Exception):
    """The store cannot be reached or failed; ``str()`` names it and says what failed."""


def tag_of(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:24]


def state_key(tag: str) -> str:
    return f"{PREFIX}{{{tag}}}:state"


def events_key(tag: str) -> str:
    return f"{PREFIX}{{{tag}}}:events"


def event_id(raw: bytes | str) -> tuple[int, int]:
    """A stream id as a tuple that compares in stream order."""
    text = raw.decode() if isinstance(raw, bytes) else raw
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


Step = Callable[[KeyState, float], tuple[T, list[Event]]]


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
        self.reader_id: int | None = None
        #: A Redis Cluster? Known once the store has first answered (see _ready).
        self.cluster: bool | None = None
        self.poked = asyncio.Event()  # a cluster's reader polls: this wakes it early

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
        self.cluster = bool(info.get("cluster_enabled"))

    async def _time(self, key: str) -> Any:
        """TIME from the node that holds ``key`` (in a cluster every node has its own)."""
        if self.cluster:
            return await self.redis.time(target_nodes=self.redis.get_node_from_key(key))
        return await self.redis.time()

    def down(self, exc: BaseException) -> StoreDown:
        return StoreDown(f"the fleet store {self.name} cannot be reached ({_why(exc)})")

    async def close(self) -> None:
        for client in {id(c): c for c in (self.reader, self.redis)}.values():
            try:
                await client.aclose()
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
        return float(sec + usec / 1e6)

    async def heartbeat(self, host: str) -> Beat:
        """Say ``host`` is alive; return the store's time, every host's last heartbeat, the
        store's epoch token and its run counter."""
        try:
            await self._ready()
            now = await self.now()
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hset(HOSTS, host, repr(now))
                pipe.hgetall(HOSTS)
                pipe.get(EPOCH)
                pipe.get(RUNS)
                _, beats, epoch, runs = await pipe.execute()
        except _FAILED as exc:
            raise self.down(exc) from None
        hosts = {k.decode(errors="replace"): float(v) for k, v in beats.items()}
        return Beat(now, hosts, epoch, int(runs or 0))

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
        """Apply ``step`` to ``key``'s state in one transaction; return its result, the id of
        the key's latest event after it (a reader from there misses nothing that came after
        the step), and the state as written. With ``history``, a run the step finished
        (``state.last`` changed) goes into the history, which keeps that many."""
        tag = tag_of(key)
        skey, ekey = state_key(tag), events_key(tag)
        try:
            await self._ready()
            async with self.redis.pipeline(transaction=True) as pipe:
                for _ in range(MAX_TRIES):
                    try:
                        await pipe.watch(skey)
                        raw = await pipe.get(skey)
                        sec, usec = (await self._time(skey) if self.cluster
                                     else await pipe.time())
                        st = KeyState.loads(key, raw)
                        before = st.dumps()
                        last_before = st.last
                        result, events = step(st, sec + usec / 1e6)
                        after = st.dumps()
                        if after == before and not events:
                            latest = await pipe.xrevrange(ekey, count=1)
                            await pipe.unwatch()
                            return result, _first_id(latest), st
                        pipe.multi()
                        pipe.set(skey, after, ex=None if not st.idle() else IDLE_TTL)
                        if st.idle():  # the stream goes with the state it belongs to
                            pipe.expire(ekey, IDLE_TTL)
                        else:
                            pipe.persist(ekey)
                        for event in events:
                            pipe.xadd(ekey, {"e": json.dumps(event, separators=(",", ":"))},
                                      maxlen=EVENTS_MAXLEN, approximate=True)
                        finished = (st.last.record(key) if history and st.last is not None
                                    and st.last is not last_before else None)
                        fleet = pipe if not self.cluster else None
                        if fleet is not None:  # one Redis: all in the same transaction
                            self._index(fleet, tag, st, finished, history)
                        pipe.xrevrange(ekey, count=1)
                        replies = await pipe.execute()
                        if self.cluster:  # the fleet's keys are in another slot: apart
                            async with self.redis.pipeline(transaction=True) as apart:
                                self._index(apart, tag, st, finished, history)
                                await apart.execute()
                        return result, _first_id(replies[-1]), st
                    except WatchError:
                        # Another host changed the key, or the answer to EXEC was lost (then
                        # the step, run again, finds its own work done: steps are idempotent).
                        continue
        except _FAILED as exc:
            raise self.down(exc) from None
        raise StoreDown(f"the fleet store {self.name}: key {key!r} changed under {MAX_TRIES} "
                        "attempts in a row; try again")

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

    @staticmethod
    def _index(pipe: Any, tag: str, st: KeyState, finished: dict[str, Any] | None,
               history: int) -> None:
        """The fleet's index of keys (and its history, when a run ``finished``) after a
        step on one key."""
        score = st.index_score()
        if score is None:
            pipe.zrem(INDEX, tag)
        else:
            pipe.zadd(INDEX, {tag: score})
        if finished is not None:
            pipe.lpush(HISTORY, json.dumps(finished))
            pipe.ltrim(HISTORY, 0, history - 1)

    async def load(self, tag: str) -> KeyState | None:
        try:
            await self._ready()
            raw = await self.redis.get(state_key(tag))
        except _FAILED as exc:
            raise self.down(exc) from None
        if raw is None:
            return None
        return KeyState.loads(json.loads(raw)["key"], raw)

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
            found = await self.redis.zrangebyscore(INDEX, "-inf",
                                                   "+inf" if upto is None else repr(upto))
        except _FAILED as exc:
            raise self.down(exc) from None
        return [t.decode() if isinstance(t, bytes) else str(t) for t in found]

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
                for key, event in batch:
                    pipe.xadd(events_key(tag_of(key)),
                              {"e": json.dumps(event, separators=(",", ":"))},
                              maxlen=EVENTS_MAXLEN, approximate=True)
                await pipe.execute()
        except _FAILED as exc:
            raise self.down(exc) from None

    async def read(self, followed: dict[str, bytes], block_ms: int
                   ) -> list[tuple[str, bytes, Event]]:
        """Events of the ``followed`` keys after their ids, waiting up to ``block_ms`` for the
        first (or until :meth:`unblock_reader`)."""
        names = {events_key(tag_of(key)): key for key in followed}
        try:
            await self._ready()
            if self.cluster:
                reply = await self._poll(followed, block_ms)
            else:
                if self.reader_id is None:
                    self.reader_id = int(await self.reader.client_id())
                reply = await self.reader.xread(
                    {events_key(tag_of(key)): last for key, last in followed.items()},
                    count=1000, block=block_ms)
        except _FAILED as exc:
            self.reader_id = None
            raise self.down(exc) from None
        out: list[tuple[str, bytes, Event]] = []
        for stream, entries in reply or []:
            key = names[stream.decode() if isinstance(stream, bytes) else stream]
            for entry_id, fields in entries:
                out.append((key, entry_id, json.loads(fields[b"e"])))
        return out

    async def _poll(self, followed: dict[str, bytes], block_ms: int) -> Any:
        """A cluster's read: a blocking XREAD may not name streams of several slots, so every
        key is read without blocking (one pipeline a node), every POLL seconds until events
        come, ``block_ms`` pass, or a key is added."""
        deadline = asyncio.get_running_loop().time() + block_ms / 1000
        while True:
            self.poked.clear()
            async with self.redis.pipeline(transaction=False) as pipe:
                for key, last in followed.items():
                    pipe.xread({events_key(tag_of(key)): last}, count=1000)
                replies = await pipe.execute()
            found = [stream for reply in replies for stream in (reply or [])]
            left = deadline - asyncio.get_running_loop().time()
            if found or left <= 0:
                return found
            try:
                await asyncio.wait_for(self.poked.wait(), min(POLL, left))
                return []
            except TimeoutError:
                pass

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
        """Wake the reader's blocking read (a key was added to what it follows)."""
        if self.cluster:
            self.poked.set()
            return
        if self.reader_id is None:
            return
        try:
            await self._ready()
            await self.redis.client_unblock(self.reader_id)
        except _FAILED:
            pass

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
