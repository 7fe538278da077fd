"""This host's waiters of fleet keys, and how the keys' events reach them.

A waiter (a client connection, the stdin source) waits in a *slot* of a key (its quiet period)
until the slot becomes a run, then on the run. Each is marked with the last event it had
accounted for when it was filed there, so nothing reaches it twice.
"""

from __future__ import annotations

import binascii
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from debounce_cli import protocol, states
from debounce_cli.daemon.fleet import messages
from debounce_cli.daemon.fleet import state as fs
from debounce_cli.daemon.fleet.layout import event_id
from debounce_cli.daemon.waiters import unique

#: Events of a key remembered after they were handed out, for a waiter that registers late
#: (at most this many, and this many bytes of output).
RECENT_EVENTS = 2000
RECENT_BYTES = 4 * 1024 * 1024


@dataclass(eq=False)
class KeyWaiters:
    """This host's waiters of one fleet key: in a slot (pending) or on a run."""

    slots: dict[int, list[Any]] = field(default_factory=dict)
    runs: dict[int, list[Any]] = field(default_factory=dict)
    #: Waiters whose slot the store forgot (it lost data): they take the next slot of the key.
    orphans: list[Any] = field(default_factory=list)
    #: (waiter, "slot" or "run", number) -> the latest event it had accounted for when it
    #: was filed there: events up to it are not its (it had them, or they were before it).
    since: dict[tuple[Any, str, int], tuple[int, int]] = field(default_factory=dict)
    #: Waiters of a run stopped for --on-busy restart, now in the slot of its replacement:
    #: the end of that run, which they are told should the replacement be cancelled (a run
    #: that started is never reported cancelled: SPEC rule 5).
    adopted: dict[Any, dict[str, Any]] = field(default_factory=dict)

    def forget(self, waiter: Any) -> None:
        for mark in [mark for mark in self.since if mark[0] is waiter]:
            del self.since[mark]
        self.adopted.pop(waiter, None)

    def move(self, waiter: Any, src: tuple[str, int], dst: tuple[str, int]) -> None:
        """It follows ``dst`` now (a slot became a run, a stopped run its replacement)."""
        mark = self.since.pop((waiter, *src), None)
        if mark is not None:
            self.since[(waiter, *dst)] = mark

    def empty(self) -> bool:
        return not self.slots and not self.runs and not self.orphans


@dataclass(eq=False)
class Follower:
    """This host reads ``key``'s events: it read them up to ``last``, starting after
    ``start``, and remembers the ``recent`` ones it handed out (a waiter filed late gets
    them)."""

    key: str
    last: bytes
    start: bytes = b"0-0"
    recent: deque[tuple[tuple[int, int], dict[str, Any]]] = field(default_factory=deque)
    recent_bytes: int = 0

    def remember(self, eid: bytes, event: dict[str, Any]) -> None:
        self.recent.append((event_id(eid), event))
        self.recent_bytes += len(event.get("data", ""))
        while len(self.recent) > RECENT_EVENTS or self.recent_bytes > RECENT_BYTES:
            _, old = self.recent.popleft()
            self.recent_bytes -= len(old.get("data", ""))


def deliver(key: str, kw: KeyWaiters, event: dict[str, Any], eid: tuple[int, int],
            only: Any, store_now: float) -> None:
    """Hand one event of ``key`` to this host's waiters of it (or to ``only``, filed late):
    Pending, Started, Output, Finished or Cancelled, the messages a local key sends; waiters
    move from a slot to its run, and from a stopped run to its replacement."""
    kind = event.get("t")
    def take(table: dict[int, list[Any]], what: str, number: int,
             remove: bool) -> list[Any]:
        """The waiters of slot or run ``number`` this event is for (not those filed
        after it: they had it, or it was before them); with ``remove``, off the table."""
        present = table.get(number)
        if not present:
            return []
        chosen = [w for w in present if (only is None or w is only)
                  and kw.since.get((w, what, number), (0, 0)) < eid]
        if remove and chosen:
            rest = [w for w in present if not any(w is c for c in chosen)]
            if rest:
                table[number] = rest
            else:
                del table[number]
        return unique(chosen)

    if kind == "pending":
        if kw.orphans and only is None:
            kw.slots.setdefault(event["slot"], []).extend(kw.orphans)
            kw.orphans = []
        waiters = take(kw.slots, "slot", event["slot"], False)
        if waiters:
            line = protocol.encode(protocol.Pending(
                key=key, state=states.QUEUED if event.get("queued") else states.PENDING,
                due_in=max(0.0, event["due"] - store_now),
                coalesced=event["coalesced"]))
            for waiter in waiters:
                waiter.raw(line)
    elif kind in ("started", "moved"):
        slot, run = event["slot"], event["run"]
        waiters = take(kw.slots, "slot", slot, True)
        if waiters:
            kw.runs.setdefault(run, []).extend(waiters)
            if kind == "started":
                line = protocol.encode(messages.started(key, event))
            else:
                line = protocol.encode(protocol.Started(run_id=run, key=key))
            for waiter in waiters:
                kw.adopted.pop(waiter, None)
                kw.move(waiter, ("slot", slot), ("run", run))
                waiter.start(run, line, None)
    elif kind == "out":
        waiters = take(kw.runs, "run", event["run"], False)
        if waiters:
            data = binascii.a2b_base64(event["data"])
            line = protocol.encode(protocol.Output(fd=event["fd"], data=event["data"]))
            for waiter in waiters:
                if waiter.follows(event["run"]):
                    waiter.output(event["fd"], data, line, None)
    elif kind == "finished":
        run = event["run_id"]
        waiters = take(kw.runs, "run", run, True)
        then = event.get("then")
        if then is not None:  # --on-busy restart: they follow the run that replaces it
            kw.slots.setdefault(then, []).extend(waiters)
            for waiter in waiters:
                kw.adopted[waiter] = event
                kw.move(waiter, ("run", run), ("slot", then))
        else:
            msg = messages.finished(key, event)
            for waiter in waiters:
                kw.since.pop((waiter, "run", run), None)
                waiter.finish(msg)
    elif kind == "returned":  # a claim given back: they wait in the slot again
        run, slot = event["run"], event["slot"]
        waiters = take(kw.runs, "run", run, True)
        kw.slots.setdefault(slot, []).extend(waiters)
        for waiter in waiters:
            kw.move(waiter, ("run", run), ("slot", slot))
    elif kind == "cancelled":
        cancelled = protocol.Cancelled(key=key)
        for waiter in take(kw.slots, "slot", event["slot"], True):
            kw.since.pop((waiter, "slot", event["slot"]), None)
            stopped = kw.adopted.pop(waiter, None)
            waiter.finish(cancelled if stopped is None else messages.finished(key, stopped))


def resync(key: str, kw: KeyWaiters, st: fs.KeyState) -> None:
    """This host missed events of ``key``: its waiters take the key's state as it is now
    (the run they wait for ended, or their slot became a run, or was dropped)."""
    last = st.last
    for run, waiters in list(kw.runs.items()):
        if st.running is not None and st.running.run == run:
            continue
        del kw.runs[run]
        msg = (messages.finished(key, last.record(key)) if last is not None and last.run == run
               else messages.finished(key, {"run_id": run, "outcome": states.LOST}))
        for waiter in unique(waiters):
            kw.since.pop((waiter, "run", run), None)
            waiter.finish(msg)
    for slot, waiters in list(kw.slots.items()):
        if st.pending is not None and st.pending.slot == slot:
            continue
        del kw.slots[slot]
        running = st.running
        if running is not None and running.slot == slot:
            kw.runs.setdefault(running.run, []).extend(waiters)
            line = protocol.encode(messages.started(key, fs.started_event(running)))
            for waiter in unique(waiters):
                kw.move(waiter, ("slot", slot), ("run", running.run))
                waiter.start(running.run, line, None)
            continue
        for waiter in unique(waiters):
            kw.since.pop((waiter, "slot", slot), None)
            if last is not None and last.slot == slot:
                waiter.finish(messages.finished(key, last.record(key)))
            else:
                waiter.finish(protocol.Cancelled(key=key))
