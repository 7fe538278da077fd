"""The fleet's store in memory: the same steps as :class:`store.Store`, for tests on fake time.

One :class:`Memory` holds what a Redis would (keys' states and event streams, the index,
heartbeats, history, the run counter, the epoch) and its clock; each host gets a
:class:`MemoryStore` on it, whose faults a test sets: ``down`` (every call fails at once,
as a refused connection does), ``paused`` (calls wait until it is lifted: a frozen store or
a partition that drops packets) and ``lose_replies`` (a step is applied, then its answer is
lost). Each step is applied atomically, as a Redis transaction is: the event loop runs one
callback at a time and a step never awaits in the middle.

The Redis store stays covered by the tests against a real redis-server (transactions,
streams, cluster, restarts); these are for the fleet's own logic (takeover, lost runs,
fencing, outages, clock skew) in milliseconds.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from debounce_cli.daemon.fleet.layout import EVENTS_MAXLEN, Beat, Step, StoreDown
from debounce_cli.daemon.fleet.record import Event, KeyState

T = TypeVar("T")


@dataclass
class Memory:
    """What a store holds, and its clock (seconds since the epoch)."""

    clock: Callable[[], float]
    states: dict[str, str] = field(default_factory=dict)
    streams: dict[str, list[tuple[tuple[int, int], Event]]] = field(default_factory=dict)
    hosts: dict[str, float] = field(default_factory=dict)
    leases: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    runs: int = 0
    epoch: bytes | None = None
    run_keys: dict[int, str] = field(default_factory=dict)
    changed: asyncio.Event | None = None  # set on every new event (wakes readers)
    seq: int = 0

    def now(self) -> float:
        return self.clock()

    def _id(self) -> tuple[int, int]:
        self.seq += 1
        return (int(self.now() * 1000), self.seq)

    def add(self, key: str, event: Event) -> None:
        stream = self.streams.setdefault(key, [])
        stream.append((self._id(), json.loads(json.dumps(event))))
        del stream[:-EVENTS_MAXLEN]
        if self.changed is not None:
            self.changed.set()

    def latest(self, key: str) -> bytes:
        stream = self.streams.get(key)
        return _raw(stream[-1][0]) if stream else b"0-0"

    def wipe(self) -> None:
        """Restarted empty (no persistence): everything is gone but the clock."""
        self.states.clear()
        self.streams.clear()
        self.hosts.clear()
        self.leases.clear()
        self.history.clear()
        self.run_keys.clear()
        self.runs = 0
        self.epoch = None


def _raw(eid: tuple[int, int]) -> bytes:
    return f"{eid[0]}-{eid[1]}".encode()


def _parse(raw: bytes | str) -> tuple[int, int]:
    text = raw.decode() if isinstance(raw, bytes) else raw
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


class MemoryStore:
    """One host's connection to a :class:`Memory`, with the faults a test sets on it."""

    def __init__(self, memory: Memory, name: str = "memory://") -> None:
        self.memory = memory
        self.name = name
        self.down = False
        self.paused: asyncio.Event = asyncio.Event()
        self.paused.set()  # set: not paused
        self.lose_replies = False
        self.positions: dict[str, bytes] = {}  # the keys the reader follows, and from where
        #: Where this host's own events go once their step is done (as the Redis store's
        #: ``hand_own``), and those on their way there.
        self.sink: Callable[[list[tuple[str, bytes, Event]]], None] | None = None
        self.own: list[tuple[str, bytes, Event]] = []
        if memory.changed is None:
            memory.changed = asyncio.Event()

    def pause(self) -> None:
        self.paused.clear()

    def resume(self) -> None:
        self.paused.set()

    async def _gate(self) -> None:
        """A call reaches the store: at once, after a pause, or not at all."""
        await self.paused.wait()
        await asyncio.sleep(0)  # a round trip lets other tasks run, as the network does
        if self.down:
            raise StoreDown(f"the fleet store {self.name} cannot be reached (connection "
                            "refused)")

    def _reply(self, applied: bool = False) -> None:
        if self.lose_replies:
            raise StoreDown(f"the fleet store {self.name} cannot be reached (timed out)",
                            maybe_applied=applied)

    async def close(self) -> None:
        pass

    async def ready(self) -> None:
        """What the Redis store learns at its first answer (one Redis, or a cluster): here,
        nothing to learn; a store that is down says so."""
        await self._gate()

    # ------------------------------------------------------------------ time and hosts
    async def now(self) -> float:
        await self._gate()
        return self.memory.now()

    async def heartbeat(self, host: str, lease: float = 0.0) -> Beat:
        await self._gate()
        m = self.memory
        now = m.now()
        m.hosts[host] = now
        if lease:
            m.leases[host] = lease
        self._reply()
        return Beat(now, dict(m.hosts), m.epoch, m.runs, dict(m.leases))

    async def claim_epoch(self, at_least_runs: int) -> bytes:
        await self._gate()
        m = self.memory
        if m.epoch is None:
            import secrets

            m.epoch = secrets.token_hex(8).encode()
        m.runs = max(m.runs, at_least_runs)
        return m.epoch

    async def forget_hosts(self, hosts: list[str]) -> None:
        await self._gate()
        for host in hosts:
            self.memory.hosts.pop(host, None)

    async def leave(self, host: str) -> None:
        try:
            await self._gate()
        except StoreDown:
            return
        self.memory.hosts.pop(host, None)

    async def next_run_id(self) -> int:
        await self._gate()
        self.memory.runs += 1
        self._reply()
        return self.memory.runs

    # ------------------------------------------------------------------ keys
    async def update(self, key: str, step: Step[T], history: int = 0
                     ) -> tuple[T, bytes, KeyState]:
        await self._gate()
        m = self.memory
        st = KeyState.loads(key, m.states.get(key))
        before = st.dumps()
        last_before = st.last
        result, events = step(st, m.now())
        after = st.dumps()
        latest = m.latest(key)
        if after != before or events:
            m.states[key] = after
            for event in events:
                m.add(key, event)
            if history and st.last is not None and st.last is not last_before:
                m.history.insert(0, st.last.record(key))
                del m.history[history:]
        self._reply(applied=after != before or bool(events))
        if events and self.sink is not None and self.positions.get(key) == latest:
            # The reader had read all before them: they go to the sink, and it moves on.
            added = [_raw(eid) for eid, _ in m.streams[key][-len(events):]]
            if not self.own:
                asyncio.get_running_loop().call_soon(self._drain)
            self.own += [(key, eid, event) for eid, event in zip(added, events, strict=True)]
            self.positions[key] = added[-1]
        return result, m.latest(key), st

    def hand_own(self, sink: Callable[[list[tuple[str, bytes, Event]]], None]) -> None:
        self.sink = sink

    def _drain(self) -> None:
        own, self.own = self.own, []
        if own and self.sink is not None:
            self.sink(own)

    async def name_run(self, run: int, key: str) -> None:
        try:
            await self._gate()
        except StoreDown:
            return
        self.memory.run_keys[run] = key

    async def key_of_run(self, run: int) -> str | None:
        await self._gate()
        return self.memory.run_keys.get(run)

    async def snapshot(self, key: str) -> tuple[KeyState, bytes]:
        await self._gate()
        return KeyState.loads(key, self.memory.states.get(key)), self.memory.latest(key)

    async def indexed(self, upto: float | None = None) -> list[str]:
        await self._gate()
        out = []
        for key, raw in self.memory.states.items():
            score = KeyState.loads(key, raw).index_score()
            if score is not None and (upto is None or score <= upto):
                out.append(key)
        return out

    async def states(self, tags: list[str]) -> list[KeyState]:
        await self._gate()
        return [KeyState.loads(key, self.memory.states[key]) for key in tags
                if key in self.memory.states]

    async def history(self, key: str | None, limit: int) -> list[dict[str, Any]]:
        await self._gate()
        rows = [r for r in self.memory.history if key is None or r.get("key") == key]
        return rows[:limit]

    # ------------------------------------------------------------------ events
    async def publish(self, batch: list[tuple[str, Event]]) -> None:
        await self._gate()
        for key, event in batch:
            self.memory.add(key, event)
        self._reply()

    def follow(self, key: str, since: bytes) -> None:
        self.positions[key] = since
        self.own = [entry for entry in self.own if entry[0] != key]  # read from ``since``

    def unfollow(self, key: str) -> None:
        self.positions.pop(key, None)

    async def read(self, block_ms: int) -> list[tuple[str, bytes, Event]]:
        await self._gate()
        m = self.memory
        assert m.changed is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + block_ms / 1000
        while True:
            out = [(key, _raw(eid), event) for key, last in self.positions.items()
                   for eid, event in m.streams.get(key, []) if eid > _parse(last)]
            left = deadline - loop.time()
            if out or self.own or left <= 1e-6:  # (a timer that close fires at once)
                for key, eid, _ in out:
                    if key in self.positions:
                        self.positions[key] = eid
                if self.own:  # (before what was read: they are older)
                    out, self.own = self.own + out, []
                return out
            m.changed.clear()
            try:
                await asyncio.wait_for(m.changed.wait(), left)
            except TimeoutError:
                pass
            await self._gate()

    async def events(self, key: str, upto: bytes | None = None
                     ) -> list[tuple[bytes, Event]]:
        await self._gate()
        limit = _parse(upto) if upto is not None else None
        return [(_raw(eid), event) for eid, event in self.memory.streams.get(key, [])
                if limit is None or eid <= limit]

    async def unblock_reader(self) -> None:
        if self.memory.changed is not None:
            self.memory.changed.set()

    async def trimmed_after(self, key: str, last: bytes) -> bool:
        """Streams here keep every event a test makes: nothing is ever trimmed."""
        await self._gate()
        return False
