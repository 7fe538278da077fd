"""Following fleet keys' events and handing them to this host's waiters.

One reader reads the streams of every key this host follows (a waiter, a pending invocation
or a run of it here): the store tells it which keys have news, and it reads those; each event
goes to the waiters (``waiting.deliver``) and then to the rest of this daemon (``on_event``:
our own pending invocation and runs). The events of this host's own steps come from the
store as soon as each step is done (``take``), not through the reader. ``wait``, ``wait
--run`` and ``logs`` on fleet keys are here too.
"""

from __future__ import annotations

import asyncio
import binascii
import os
import sys
from collections.abc import Callable
from typing import Any

from debounce_cli import protocol, states
from debounce_cli.daemon import records
from debounce_cli.daemon.fleet import covering, messages
from debounce_cli.daemon.fleet import state as fs
from debounce_cli.daemon.fleet.layout import StoreDown, event_id
from debounce_cli.daemon.fleet.link import RETRY, Link
from debounce_cli.daemon.fleet.waiting import Follower, KeyWaiters, deliver, resync
from debounce_cli.daemon.waiters import Waiter
from debounce_cli.logfile import LogWriter

#: How long a read of the keys' streams blocks (a follower with nobody left ends after it).
READ_BLOCK_MS = 1000
#: How often keys followed for nobody any more are let go (seconds).
SWEEP = 1.0
#: Logs of fleet runs written here for `debounce logs`, at most.
FLEET_LOGS = 100


class Following:
    """The keys this host follows and its waiters on them. ``interested`` says whether the
    rest of the daemon still needs a key's events (our pending invocation or a run here);
    ``on_event`` hears every event after the waiters have."""

    def __init__(self, link: Link, log_dir: str, interested: Callable[[str], bool],
                 on_event: Callable[[str, dict[str, Any], tuple[int, int]], None]) -> None:
        self.link = link
        self.log_dir = log_dir  # `debounce logs` of fleet runs are written here
        self.interested = interested
        self.on_event = on_event
        self.waiting: dict[str, KeyWaiters] = {}
        self.followers: dict[str, Follower] = {}
        self.follow_changed = asyncio.Event()
        self.reading = False
        self.store_out = False  # the store stopped answering; its waiters were told so
        #: (key, run) -> the last output chunk handed out: a chunk published twice (its
        #: pipeline retried after a lost answer) is handed out once.
        self.out_seen: dict[tuple[str, int], int] = {}
        self.heard: set[str] = set()  # keys with news since the last sweep
        hand_own = getattr(link.store, "hand_own", None)
        if hand_own is not None:  # (a store that reads our own events back has none)
            hand_own(self.take)

    def busy(self) -> bool:
        return any(not kw.empty() for kw in self.waiting.values())

    def _tell_slots(self, message: Callable[[str], protocol.Message | None]) -> None:
        """Give every waiter still in a slot (pending) ``message(key)``, if there is one."""
        for key, kw in self.waiting.items():
            msg = message(key) if kw.slots else None
            if msg is None:
                continue
            line = protocol.encode(msg)
            for waiters in kw.slots.values():
                for waiter in waiters:
                    waiter.raw(line)

    async def _store_back(self) -> None:
        """The store answers again: the waiters told it did not are told where their key
        stands now."""
        pending: dict[str, protocol.Message] = {}
        for key, kw in list(self.waiting.items()):
            if not kw.slots:
                continue
            try:
                st, _ = await self.link.store.snapshot(key)
            except StoreDown:
                return
            p = st.pending
            if p is not None:
                pending[key] = protocol.Pending(
                    key=key, state=states.QUEUED if p.queued else states.PENDING,
                    due_in=max(0.0, p.due - self.link.store_now()), coalesced=p.coalesced)
        self._tell_slots(pending.get)

    def adopt_orphans(self, key: str, slot: int) -> None:
        """Our invocation was submitted again (the store lost data): the waiters whose slot
        was forgotten wait in its new slot."""
        kw = self.waiting.get(key)
        if kw is not None and kw.orphans:
            kw.slots.setdefault(slot, []).extend(kw.orphans)
            kw.orphans = []

    def orphan_all(self, emptied: bool) -> None:
        """The store lost data: waiters in slots take the next slot of their key, and the
        streams are read again (from their start, when the store was emptied)."""
        for kw in self.waiting.values():
            for waiters in kw.slots.values():
                kw.orphans.extend(waiters)
            kw.slots.clear()
            kw.since = {mark: at for mark, at in kw.since.items() if mark[1] != "slot"}
        for follower in self.followers.values():
            follower.recent.clear()
            follower.recent_bytes = 0
            if emptied:
                follower.last = follower.start = b"0-0"  # a new stream: read it all
                self._from(follower.key, follower.last)

    async def attach(self, key: str, waiter: Waiter, landed: fs.InSlot | fs.InRun | fs.Done,
                     st: fs.KeyState, since: bytes) -> None:
        """Hand ``waiter`` what it is owed now and file it where the key's events find it.

        A waiter that joins a run (executing, or already ended) gets its output so far first,
        from the key's stream up to ``since``; what came after, the follower's memory or the
        live events give it, in order."""
        mark = event_id(since)
        if isinstance(landed, fs.InSlot):
            gap = await self._gap(key, mark)
            kw = self.waiting.setdefault(key, KeyWaiters())
            kw.since[(waiter, "slot", landed.slot)] = mark
            kw.slots.setdefault(landed.slot, []).append(waiter)
        else:
            if isinstance(landed, fs.InRun):
                assert st.running is not None
                started = messages.started(key, fs.started_event(st.running))
            else:
                started = messages.started(key, {"run": landed.last.run, "argv": landed.last.argv,
                                         "coalesced": landed.last.coalesced,
                                         "started_at": landed.last.started_at,
                                         "inv": landed.last.inv})
            waiter.start(started.run_id, protocol.encode(started), None)
            for fd, data in await self._output(key, started.run_id, since):
                waiter.output(fd, data, records.output_line(fd, data), None)
            if isinstance(landed, fs.Done):
                waiter.finish(messages.finished(key, landed.last.record(key)))
                return
            gap = await self._gap(key, mark)
            # Taken again after the waits: the reader may have dropped the key's table.
            kw = self.waiting.setdefault(key, KeyWaiters())
            kw.since[(waiter, "run", landed.run)] = mark
            kw.runs.setdefault(landed.run, []).append(waiter)
        # No wait from here on: filed, the waiter gets, in order, what came after ``since``
        # before the reader hands it anything newer.
        for eid, event in gap:
            self.dispatch(key, event, eid, only=waiter)
        follower = self.followers.get(key)
        if follower is not None:
            # Events the follower handed out before this waiter was filed: its share now.
            for eid, event in list(follower.recent):
                if eid > mark:
                    self.dispatch(key, event, eid, only=waiter)

    async def _gap(self, key: str, mark: tuple[int, int]
                   ) -> list[tuple[tuple[int, int], dict[str, Any]]]:
        """The events after ``mark`` that this host's follower of ``key`` started after, so
        never read: a run claimed here may start following the key a moment before the
        submission that its waiter came with is filed (with an older ``since``). Read from
        the store (retried while it does not answer), oldest first."""
        while not self.link.closing:
            follower = self.followers.get(key)
            if follower is None or event_id(follower.start) <= mark:
                return []
            try:
                events = await self.link.store.events(key, follower.start)
            except StoreDown as exc:
                self.link.say_down(exc)
                await asyncio.sleep(RETRY)
                continue
            if self.followers.get(key) is follower:
                return [(event_id(eid), event) for eid, event in events
                        if event_id(eid) > mark]
        return []

    async def _output(self, key: str, run: int, upto: bytes | None
                      ) -> list[tuple[int, bytes]]:
        """Run ``run``'s output as the key's stream still holds it (up to ``upto``)."""
        try:
            events = await self.link.store.events(key, upto)
        except StoreDown as exc:
            self.link.say_down(exc)
            return []
        out: list[tuple[int, bytes]] = []
        last = -1
        for _, event in events:
            if event.get("t") == "out" and event.get("run") == run:
                n = event.get("n", last + 1)
                if n > last:  # a chunk published twice is shown once
                    last = n
                    out.append((event["fd"], binascii.a2b_base64(event["data"])))
        return out

    async def logs(self, key: str | None, run_id: int | None = None) -> protocol.Message:
        """``debounce logs`` on a fleet key (its latest run) or fleet run: the output as the
        key's stream holds it, as a log file here for the client to read."""
        if key is None:
            assert run_id is not None
            key = await self.link.store.key_of_run(run_id)
            if key is None:
                return messages.no_run(run_id)
            run = run_id
        else:
            st, _ = await self.link.store.snapshot(key)
            source = st.running or st.last
            if source is None:
                return protocol.Error(message=f"no run of fleet key {key!r} is known",
                                      code=states.NOT_FOUND)
            run = source.run
        chunks = await self._output(key, run, None)
        directory = self._logs_dir()
        path = os.path.join(directory, f"{run}.log")
        try:
            log = LogWriter(path)
            for fd, data in chunks:
                log.write(fd, data)
            log.close()
        except OSError as exc:
            return protocol.Error(message=f"cannot write {path}: {exc.strerror}",
                                  code=states.REFUSED)
        _keep_newest(directory, FLEET_LOGS)
        return protocol.LogsReply(run_id=run, key=key, log_path=path, running=False)

    def _logs_dir(self) -> str:
        if not self.log_dir:
            import tempfile

            self.log_dir = tempfile.mkdtemp(prefix="debounce-fleet-logs-")
        os.makedirs(self.log_dir, mode=0o700, exist_ok=True)
        return self.log_dir

    async def wait(self, key: str, waiter: Waiter) -> protocol.Message | None:
        """``debounce wait`` on a fleet key: ``None`` once the waiter is filed, else the
        answer (the last run's result, or "not found")."""
        st, latest = await self.link.store.snapshot(key)
        self.link.measured(await self.link.store.now())
        if st.pending is not None:
            p = st.pending
            waiter.raw(protocol.encode(protocol.Pending(
                key=key, state=states.PENDING, due_in=max(0.0, p.due - self.link.store_now()),
                coalesced=p.coalesced)))
            await self.attach(key, waiter, fs.InSlot(p.slot, p.due, p.coalesced), st, latest)
        elif st.running is not None:
            await self.attach(key, waiter, fs.InRun(st.running.run, st.running.coalesced),
                               st, latest)
        elif st.last is not None:
            return messages.finished(key, st.last.record(key))
        else:
            return protocol.Error(message=f"no fleet key {key!r} pending, running or finished",
                                  code=states.NOT_FOUND)
        self.follow(key, latest)
        return None

    async def wait_run(self, run_id: int, waiter: Waiter) -> protocol.Message | None:
        """``debounce wait --run N`` on a fleet run: ``None`` once the waiter follows it, else
        its result (or "not found")."""
        key = await self.link.store.key_of_run(run_id)
        if key is None:
            return messages.no_run(run_id)
        st, latest = await self.link.store.snapshot(key)
        if st.running is not None and st.running.run == run_id:
            await self.attach(key, waiter, fs.InRun(run_id, st.running.coalesced), st, latest)
            self.follow(key, latest)
            return None
        if st.last is not None and st.last.run == run_id:
            return messages.finished(key, st.last.record(key))
        for row in await self.link.store.history(key, 10_000):
            if row.get("run_id") == run_id:
                return messages.finished(key, row)
        return messages.no_run(run_id)

    async def covering(self, inv_id: int, key: str | None
                       ) -> tuple[str, str, fs.KeyState | None, bytes, dict[str, Any] | None]:
        """Where this host's fleet invocation ``inv_id`` stands: (what stands for it:
        "pending", "running", "finished", "cancelled" or "" for nothing known; its key; the
        key's state and latest event id; the finished run's history row). ``key``, when this
        daemon still remembers it, spares looking through every key."""
        store = self.link.store
        invocation = covering.mark(self.link.host, inv_id)

        def where(st: fs.KeyState) -> str:
            if covering.covers(st.pending, invocation):
                return "pending"
            if covering.covers(st.running, invocation):
                return "running"
            if covering.covers(st.last, invocation):
                return "finished"
            return "cancelled" if invocation in st.cancelled else ""

        keys = [key] if key is not None else [
            st.key for st in await store.states(await store.indexed()) if where(st)]
        for name in keys:
            st, latest = await store.snapshot(name)
            kind = where(st)
            if kind:
                row = st.last.record(name) if kind == "finished" and st.last else None
                return kind, name, st, latest, row
        for row in await store.history(key, 10_000):  # newest first
            if invocation in (row.get("covered") or ()):
                return "finished", row.get("key") or key or "", None, b"", row
        return "", key or "", None, b"", None

    async def wait_invocation(self, inv_id: int, key: str | None, waiter: Waiter
                              ) -> protocol.Message | None:
        """``wait --invocation N`` on this host's fleet invocation N: ``None`` once the
        waiter follows what stands for it, else the answer."""
        kind, name, st, latest, row = await self.covering(inv_id, key)
        if kind == "finished":
            assert row is not None
            return messages.finished(name, row)
        if kind == "cancelled":
            return protocol.Cancelled(key=name)
        if not kind:
            return protocol.Error(
                message=f"no invocation {inv_id} pending, running or in the history, here or "
                "in the fleet (ids are per daemon)", code=states.NOT_FOUND)
        assert st is not None
        if kind == "pending":
            assert st.pending is not None
            p = st.pending
            waiter.raw(protocol.encode(protocol.Pending(
                key=name, state=states.PENDING, due_in=max(0.0, p.due - self.link.store_now()),
                coalesced=p.coalesced)))
            await self.attach(name, waiter, fs.InSlot(p.slot, p.due, p.coalesced), st, latest)
        else:
            assert st.running is not None
            await self.attach(name, waiter, fs.InRun(st.running.run, st.running.coalesced),
                              st, latest)
        self.follow(name, latest)
        return None

    def detach(self, waiter: Any) -> None:
        for kw in self.waiting.values():
            kw.forget(waiter)
            if waiter in kw.orphans:
                kw.orphans.remove(waiter)
            for table in (kw.slots, kw.runs):
                for number, waiters in list(table.items()):
                    if waiter in waiters:
                        waiters.remove(waiter)
                        if not waiters:
                            del table[number]

    def _interested(self, key: str) -> bool:
        kw = self.waiting.get(key)
        return bool((kw is not None and not kw.empty()) or self.interested(key))

    def follow(self, key: str, since: bytes) -> None:
        """Read ``key``'s events from after ``since`` on (the one reader reads them all)."""
        if key in self.followers:
            return
        self.followers[key] = Follower(key, since, since)
        self._from(key, since)

    def _from(self, key: str, since: bytes) -> None:
        """The store's reader reads ``key`` from after ``since``."""
        self.link.store.follow(key, since)
        self.follow_changed.set()
        if self.reading:
            self.link.spawn(self.link.store.unblock_reader())  # it reads the new key from now on

    async def read(self) -> None:
        """The one reader of every followed key's stream: the store's reader hears which
        keys have news and reads only those, so a read costs what it finds, not how many
        keys are followed. Keys nobody here needs any more are let go once a SWEEP."""
        swept = self.link.clock.monotonic()
        while not self.link.closing:
            if not self.followers:
                await self.follow_changed.wait()
            self.follow_changed.clear()
            self.reading = True
            try:
                batch = await self.link.store.read(READ_BLOCK_MS)
            except StoreDown as exc:
                self.link.say_down(exc)
                if not self.store_out:
                    self.store_out = True
                    self._tell_slots(lambda key: protocol.Pending(
                        key=key, state=protocol.STORE_UNREACHABLE, due_in=None, coalesced=1))
                await asyncio.sleep(RETRY)
                continue
            finally:
                self.reading = False
            if self.store_out:
                self.store_out = False
                await self._store_back()
            self.take(batch)
            now = self.link.clock.monotonic()
            if now - swept >= SWEEP:
                self._sweep(self.heard)
                self.heard = set()
                swept = now

    def take(self, batch: list[tuple[str, bytes, dict[str, Any]]]) -> None:
        """Events of followed keys, in the order of their streams (what the reader read, or
        what this host's own steps added), to the waiters and the rest of the daemon."""
        for key, eid, event in batch:
            follower = self.followers.get(key)
            if follower is None:
                continue
            self.heard.add(key)
            follower.last = eid
            if event.get("t") == "out" and "n" in event:
                chunk = (key, event["run"])
                if event["n"] <= self.out_seen.get(chunk, 0):
                    continue  # published twice (a retried pipeline): handed out once
                self.out_seen[chunk] = event["n"]
            follower.remember(eid, event)
            self.dispatch(key, event, event_id(eid))
        if batch:
            self.link.changed()  # the last waiter may be done: the server's idle check

    def _sweep(self, heard: set[str]) -> None:
        """Let go of the keys nobody here needs any more (and that had no news lately)."""
        for key in list(self.followers):
            if key not in heard and not self._interested(key):
                self.followers.pop(key, None)
                self.link.store.unfollow(key)
                kw = self.waiting.get(key)
                if kw is not None and kw.empty():
                    del self.waiting[key]

    def dispatch(self, key: str, event: dict[str, Any], eid: tuple[int, int],
                  only: Any = None) -> None:
        """One event of ``key`` to this host's waiters (or to ``only``, filed late); then
        what it means for our own pending invocation and runs."""
        kind = event.get("t")
        kw = self.waiting.get(key)
        if kw is not None:
            deliver(key, kw, event, eid, only, self.link.store_now())
        if only is not None:
            return
        if kind == "finished":
            self.out_seen.pop((key, event["run_id"]), None)
        self.on_event(key, event, eid)

    async def resync_trimmed(self) -> None:
        """A key's stream keeps its latest EVENTS_MAXLEN events: a host that fell further
        behind (cut off from the store while a run elsewhere wrote a lot) has missed some.
        Its waiters then get what the key's state says instead of hanging."""
        for key, follower in list(self.followers.items()):
            kw = self.waiting.get(key)
            if kw is None or (not kw.slots and not kw.runs):
                continue
            trimmed = await self.link.store.trimmed_after(key, follower.last)
            if not trimmed:
                continue
            st, latest = await self.link.store.snapshot(key)
            print(f"debounce: fleet key {key!r}: this host missed events (its stream was "
                  "trimmed); its waiters take the key's state as it is now", file=sys.stderr,
                  flush=True)
            follower.last = follower.start = latest
            self._from(key, latest)
            follower.recent.clear()
            follower.recent_bytes = 0
            resync(key, kw, st)


def _keep_newest(directory: str, count: int) -> None:
    """Remove all but the ``count`` newest files of ``directory``."""
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.stat().st_mtime, reverse=True)
    except OSError:
        return
    for entry in entries[count:]:
        try:
            os.unlink(entry.path)
        except OSError:
            pass
