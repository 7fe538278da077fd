"""The fleet's store: Redis, through redis-py's asyncio client (imported here only, so only a
daemon with a store ever loads it). Its layout and the step's script are in ``layout``; its
reader of events is in ``notices``.

A step on a key is one round trip: the rules run here, in Python, on the key's state as this
host last wrote or read it (``Store.cache``), at the store's clock as this host reckons it
(its monotonic clock plus the offset measured from the store's ``TIME`` at every answer);
one script (``STEP``, by EVALSHA) then checks that the state is still the one the step was
computed from (its SHA-1) and that the step's time is within ``SLACK_BEHIND``/``SLACK_AHEAD``
of the store's ``TIME``, and writes the state, appends the events, sets the key in the index
and (on one Redis) the history, all at once. When the check fails the script answers the
state as it is and its ``TIME``, and the step is computed again on them: the rules are never
written twice, and a host whose view is stale pays one more round trip. Steps that come while
others are in flight go out together next, on a connection of their own (``wire.Wire``: the
hot path without redis-py's layers; redis-py on a Redis Cluster or over TLS).

Each step's last event id is published on the key's channel (``debounce:ev:T``); the one
reader subscribes to the channels of the keys it follows and reads a key's stream only when
told it grew, so its cost follows the events, not the keys followed. The same works on a
Redis Cluster (whose nodes pass every publication on to each other). There the history,
in the ``{fleet}`` slot, is written just after the step.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from debounce_cli.daemon.fleet.layout import (
    EPOCH,
    EVENTS_MAXLEN,
    FLEET,
    HISTORY,
    HOSTS,
    IDLE_TTL,
    INDEXES,
    LEASES,
    RUNS,
    STEP,
    Beat,
    Step,
    StoreDown,
    T,
    channel,
    events_key,
    index_key,
    state_key,
    tag_of,
)
from debounce_cli.daemon.fleet.notices import FAILED as _FAILED
from debounce_cli.daemon.fleet.notices import Notices
from debounce_cli.daemon.fleet.pipeline import Pipeline
from debounce_cli.daemon.fleet.record import Event, KeyState
from debounce_cli.daemon.fleet.url import display

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
#: Of those, the busiest kept as objects too: a step on one starts from a copy, not a parse
#: of the stored form (a tenth of a submission's CPU). Few: an object is ~5x its stored form.
OBJECT_KEYS = 256


class Store(Pipeline):
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
        #: key -> (its stored form in ``cache``, as an object), the OBJECT_KEYS last stepped on
        self.objects: dict[str, tuple[bytes, KeyState]] = {}
        #: The store's TIME minus our monotonic clock, as last measured.
        self.offset: float | None = None
        super().__init__()
        self.notices = Notices(self)  # the reader of the followed keys' events

    async def ready(self) -> None:
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
        self._wire_for(self.url, self.name, self.cluster)
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
        if self.wire is not None:
            self.wire.close()
        listener = await self.notices.close()
        clients = (self.reader, self.redis, listener)
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
            await self.ready()
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
            await self.ready()
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

        try:
            await self.ready()
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
            await self.ready()
            await self.redis.hdel(HOSTS, *hosts)
            await self.redis.hdel(LEASES, *hosts)
        except _FAILED:
            pass

    async def leave(self, host: str) -> None:
        """``host`` stops: the others may take over what it was to run at once."""
        try:
            await self.ready()
            await self.redis.hdel(HOSTS, host)
        except _FAILED:
            pass

    async def next_run_id(self) -> int:
        try:
            await self.ready()
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
            await self.ready()
            keys = [skey, ekey, index_key(tag)] + ([] if self.cluster else [HISTORY])
            if self.offset is None:
                await self.now()
            now = self._reckoned()
            for _ in range(MAX_TRIES):
                raw = self.cache.get(key)
                held = self.objects.get(key)
                st = (held[1].copy() if held is not None and held[0] is raw
                      else KeyState.loads(key, raw))
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
                    stored = after.encode()
                    self._remember(key, stored)
                    self._hold(key, stored, st)
                self.notices.stepping[key] = self.notices.stepping.get(key, 0) + 1
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
                        self.notices.own_events(key, added[0], added[1:], events)
                finally:
                    self.notices.stepped(key)
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

    def _hold(self, key: str, raw: bytes, st: KeyState) -> None:
        """``st`` is ``raw`` (what ``cache`` holds for ``key``) as an object, never changed:
        the next step on the key starts from a copy of it."""
        objects = self.objects
        objects.pop(key, None)
        objects[key] = (raw, st)
        if len(objects) > OBJECT_KEYS:
            del objects[next(iter(objects))]

    def _remember(self, key: str, raw: bytes | None) -> None:
        cache = self.cache
        cache.pop(key, None)
        cache[key] = raw  # (the newest last: the oldest go first when there are too many)
        if len(cache) > CACHE_KEYS:
            del cache[next(iter(cache))]

    async def name_run(self, run: int, key: str) -> None:
        """Which key fleet run ``run`` belongs to (``--run N`` from any host)."""
        try:
            await self.ready()
            await self.redis.set(f"{FLEET}run:{run}", key.encode("utf-8", "surrogateescape"),
                                 ex=IDLE_TTL)
        except _FAILED:
            pass  # only --run N on this run is the poorer for it

    async def key_of_run(self, run: int) -> str | None:
        try:
            await self.ready()
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
            await self.ready()
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
            await self.ready()
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
            await self.ready()
            names = [state_key(t) for t in tags]
            raws = await (self.redis.mget_nonatomic(names) if self.cluster
                          else self.redis.mget(names))
        except _FAILED as exc:
            raise self.down(exc) from None
        return [KeyState.loads(json.loads(raw)["key"], raw) for raw in raws if raw]

    async def history(self, key: str | None, limit: int) -> list[dict[str, Any]]:
        try:
            await self.ready()
            raws = await self.redis.lrange(HISTORY, 0, -1 if key is not None else limit - 1)
        except _FAILED as exc:
            raise self.down(exc) from None
        rows = [json.loads(raw) for raw in raws]
        if key is not None:
            rows = [row for row in rows if row.get("key") == key]
        return rows[:limit]

    # ------------------------------------------------------------------ events
    async def publish(self, batch: list[tuple[str, Event]]) -> None:
        await self.notices.publish(batch)

    def follow(self, key: str, since: bytes) -> None:
        self.notices.follow(key, since)

    def unfollow(self, key: str) -> None:
        self.notices.unfollow(key)

    def hand_own(self, sink: Callable[[list[tuple[str, bytes, Event]]], None]) -> None:
        self.notices.hand_own(sink)  # (our own steps' events go there, not through read)

    async def read(self, block_ms: int) -> list[tuple[str, bytes, Event]]:
        return await self.notices.read(block_ms)

    async def events(self, key: str, upto: bytes | None = None
                     ) -> list[tuple[bytes, Event]]:
        return await self.notices.events(key, upto)

    async def unblock_reader(self) -> None:
        await self.notices.unblock_reader()

    async def trimmed_after(self, key: str, last: bytes) -> bool:
        return await self.notices.trimmed_after(key, last)

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
