"""The one reader of the events of the fleet keys this host follows, and the notices it
hears of them.

Each step publishes its key's latest event id on the key's channel (``layout.channel``); the
reader subscribes to the channels of the keys it follows and reads a key's stream only when
told it grew, so its cost follows the events, not the keys followed (on a Redis Cluster
too: its nodes pass every publication on to each other). A host's own steps hand their
events to it directly (``own_events``): it need not read them back, and when the daemon has
said where they go (``hand_own``), they go there as soon as the step is done, without the
reader. On the lean connection (``wire.Subscriber``) notices are heard as they come in, and
the reader is woken only for news: the notice of a step of this host's own costs no wake.
Output of runs executing here goes into the streams through ``publish``.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
from redis.exceptions import RedisClusterException, RedisError, ResponseError

from debounce_cli.daemon.fleet.layout import (
    EVENTS_MAXLEN,
    PREFIX,
    channel,
    event_id,
    events_key,
    tag_of,
)
from debounce_cli.daemon.fleet.record import Event
from debounce_cli.daemon.fleet.wire import Subscriber

if TYPE_CHECKING:
    from debounce_cli.daemon.fleet.store import Store

#: What a call to the store may fail with: redis-py's errors, a Redis Cluster's (which are
#: not RedisErrors: a cluster still settling its slots raises SlotNotCoveredError), the
#: network's.
FAILED = (RedisError, RedisClusterException, OSError)
_FAILED = FAILED  # (the name the methods use)


class Notices:
    """Which keys the reader follows (from after which event id), its subscriptions to their
    channels, and what it has heard."""

    def __init__(self, store: Store) -> None:
        self.store = store
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
        #: Where this host's own events go once their step is done (see ``hand_own``).
        self.sink: Callable[[list[tuple[str, bytes, Event]]], None] | None = None
        self.draining = False  # a hand-over of our own events is on its way

    async def close(self) -> Any:
        """Unsubscribe; returns the connection the subscriptions were on, for the store to
        close with its own."""
        if self.pubsub is not None:
            try:
                await self.pubsub.aclose()
            except _FAILED:
                pass
        return self.listener

    async def publish(self, batch: list[tuple[str, Event]]) -> None:
        """Add events (output of runs executing here) to their keys' streams, in order."""
        try:
            await self.store.ready()
            async with self.store.redis.pipeline(transaction=False) as pipe:
                last: dict[str, int] = {}
                for key, event in batch:
                    last[key] = len(pipe)
                    pipe.xadd(events_key(tag_of(key)),
                              {"e": json.dumps(event, separators=(",", ":"))},
                              maxlen=EVENTS_MAXLEN, approximate=True)
                ids = await pipe.execute()
                if self.store.cluster:  # (a cluster's pipeline refuses PUBLISH)
                    await asyncio.gather(*(self.store.redis.publish(channel(tag_of(key)), ids[at])
                                           for key, at in last.items()))
                else:
                    for key, at in last.items():
                        pipe.publish(channel(tag_of(key)), ids[at])
                    await pipe.execute()
        except _FAILED as exc:
            raise self.store.down(exc) from None

    def stepped(self, key: str) -> None:
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
            if isinstance(self.pubsub, Subscriber):
                self.pubsub.wire.wake()
            elif self.waiting:  # the reader waits for a notice: give it one
                self.waiting = False
                task = asyncio.ensure_future(self._wake())
                self.background.add(task)
                task.add_done_callback(self.background.discard)

    async def _wake(self) -> None:
        try:
            await self.store.redis.publish(self.wake_channel, b"")
        except _FAILED:
            pass  # (the reader finds the key at its next notice, or within a second)

    def own_events(self, key: str, before: bytes, ids: list[bytes], events: list[Event]
                   ) -> None:
        """A step of ours added ``events`` to a key the reader follows: when the reader has
        read everything before them, they go to it from here, and its place moves on."""
        if self.positions.get(key) != before:
            return  # (not followed, or the reader is behind or ahead: it reads them)
        self.own.extend(zip((key,) * len(ids), ids, events, strict=True))
        self.positions[key] = ids[-1]
        if self.sink is not None:
            if not self.draining:  # (once the step's caller has taken its answer)
                self.draining = True
                asyncio.get_running_loop().call_soon(self._drain)
        elif isinstance(self.pubsub, Subscriber):
            self.pubsub.wire.wake()  # (its notice wakes nobody: see _pushed)

    def hand_own(self, sink: Callable[[list[tuple[str, bytes, Event]]], None]) -> None:
        """This host's own events go to ``sink`` as soon as their step is done (in order,
        and before anything newer the reader reads: both take them from ``own``)."""
        self.sink = sink

    def _drain(self) -> None:
        self.draining = False
        if self.own and self.sink is not None:
            own, self.own = self.own, []
            self.sink(own)

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
            settings = {k: v for k, v in self.store.settings.items()
                        if k != "health_check_interval"}
            wire = self.store.wire
            if wire is not None:  # (the lean connection, as the steps')
                self.pubsub = Subscriber(wire.address, wire.name, self._pushed)
            else:
                if self.store.cluster:
                    node = self.store.redis.get_default_node()
                    self.listener = aioredis.Redis(host=node.host, port=node.port, **settings)
                else:
                    self.listener = aioredis.Redis.from_url(self.store.url, max_connections=1,
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
            await self.store.ready()
            pubsub = self.pubsub
            if pubsub is None or self.subscribe or self.unsubscribe:
                pubsub = await self._listen()
            while True:
                while not self.dirty and not self.own:
                    left = deadline - loop.time()
                    if left <= 0:
                        return []
                    self.waiting = True
                    try:
                        if isinstance(pubsub, Subscriber):  # (heard as they come: _pushed)
                            await pubsub.wire.wait(left)
                        else:
                            message = await pubsub.get_message(timeout=left)
                            while message is not None:
                                self._heard(message["type"], message.get("channel"),
                                            message["data"])
                                message = await pubsub.get_message(timeout=0)
                    finally:
                        self.waiting = False
                    if self.subscribe or self.unsubscribe:
                        await self._listen()
                found = await self._read_dirty() if self.dirty else []
                if self.own:  # (before what was read: they are older)
                    found, self.own = self.own + found, []
                if found:
                    return found
        except _FAILED as exc:
            self._lost_listener()
            raise self.store.down(exc) from None

    def _lost_listener(self) -> None:
        """The reader's connection failed: a new one subscribes to every key again (and so
        reads them all again: what was said meanwhile was not heard)."""
        if self.pubsub is not None:
            pubsub, listener = self.pubsub, self.listener
            self.pubsub = self.listener = None

            async def close() -> None:
                try:
                    await pubsub.aclose()
                    if listener is not None:
                        await listener.aclose()
                except _FAILED:
                    pass

            task = asyncio.ensure_future(close())
            self.background.add(task)
            task.add_done_callback(self.background.discard)

    def _pushed(self, reply: Any) -> None:
        """A message on the lean subscriber connection, as it comes: the reader is woken
        only when a key has news for it."""
        if isinstance(reply, list) and len(reply) == 3:
            kind, name, data = reply
            if self._heard(kind.decode() if isinstance(kind, bytes) else str(kind), name, data):
                assert isinstance(self.pubsub, Subscriber)
                self.pubsub.wire.wake()

    def _heard(self, kind: str, name: Any, data: Any) -> bool:
        """A confirmation or notice on a key's channel; whether the key has news now."""
        key = self.channels.get(name or b"")
        if key is None or key not in self.positions:
            return False
        if kind == "subscribe":
            self.dirty.add(key)  # (subscribed: what came before, its stream has)
            return True
        if kind == "message":
            if key in self.stepping:  # (most likely that step's own events)
                held = self.deferred.get(key)
                if held is None or event_id(data) > event_id(held):
                    self.deferred[key] = data
            elif event_id(data) > event_id(self.positions[key]):
                self.dirty.add(key)
                return True
        return False

    async def _read_dirty(self) -> list[tuple[str, bytes, Event]]:
        keys = list(self.dirty)[:1000]
        self.dirty.difference_update(keys)
        names = {events_key(tag_of(key)): key for key in keys}
        streams = {events_key(tag_of(key)): self.positions[key] for key in keys}
        try:
            if self.store.cluster:  # (a read may not name streams of several slots)
                async with self.store.redis.pipeline(transaction=False) as pipe:
                    for name, last in streams.items():
                        pipe.xread({name: last}, count=1000)
                    reply = [stream for part in await pipe.execute() for stream in part or []]
            else:
                reply = await self.store.reader.xread(streams, count=1000)
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
            await self.store.ready()
            entries: Any = await self.store.redis.xrange(events_key(tag_of(key)), "-",
                                                   upto if upto is not None else "+")
        except _FAILED as exc:
            raise self.store.down(exc) from None
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
            await self.store.ready()
            info: Any = await self.store.redis.xinfo_stream(events_key(tag_of(key)))
        except ResponseError:
            return False  # no such stream (yet): nothing was trimmed
        except _FAILED as exc:
            raise self.store.down(exc) from None
        deleted = info.get("max-deleted-entry-id")
        if not deleted:
            return False
        return event_id(deleted) > event_id(last) and event_id(last) != (0, 0)

