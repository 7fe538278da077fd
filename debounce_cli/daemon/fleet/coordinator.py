"""One daemon's part in the fleet: submissions to the store, the runs this host starts, and
the events of fleet keys delivered to this host's waiters.

- A ``--fleet`` submission is one transaction on the key's state (``state.submit``); the
  client is answered once the store holds it, or refused (116) when the store is down.
- The host of the latest invocation starts the run when it falls due, by its own timer (due
  times are on the store's clock; the timer converts them with the offset measured at every
  transaction, so a host whose clock is off still fires on time). If that host is gone (no
  heartbeat for a lease), whichever live daemon scans first takes the run over; the claim is
  one transaction, so exactly one does.
- A run this host starts executes here like a local run (``daemon.runs.Runs``), its output
  and its end go into the key's stream, in order, and are retried until the store takes them.
- Every host with a waiter, a pending invocation or a run of a key follows that key's stream,
  and hands events to its waiters: Pending, Started, Output, Finished or Cancelled, the same
  messages a local key sends.
- Every lease/4 each daemon beats its heart and scans the keys due: a run whose host went
  silent is recorded ``lost`` (it may have run: it is never started twice), a pending
  invocation whose host went silent is taken over.
"""

from __future__ import annotations

import asyncio
import binascii
import os
import secrets
import sys
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from debounce_cli import protocol, states
from debounce_cli.clock import Clock
from debounce_cli.daemon import records
from debounce_cli.daemon.config import Config
from debounce_cli.daemon.fleet import messages
from debounce_cli.daemon.fleet import state as fs
from debounce_cli.daemon.fleet.store import FORGET_HOST, Beat, Store, StoreDown, event_id
from debounce_cli.daemon.fleet.waiting import Follower, KeyWaiters, deliver, resync
from debounce_cli.daemon.jobs import Job
from debounce_cli.daemon.runs import Runs
from debounce_cli.daemon.waiters import Submitter, Waiter
from debounce_cli.logfile import LogWriter
from debounce_cli.scheduler import Invocation, Options, Run, Scheduler

#: How long a read of a key's stream blocks (a follower with nobody left ends after it).
READ_BLOCK_MS = 1000
#: Output queued for the store, at most; past it a run's output is dropped (and said so).
OUTBOX_LIMIT = 64 * 1024 * 1024
#: Seconds between attempts while the store is down.
RETRY = 0.5
#: Logs of fleet runs written here for `debounce logs`, at most.
FLEET_LOGS = 100
#: Why a run here was stopped when this host could not renew its lease: it is reported lost.
STOP_LEASE = "lease"


@dataclass(eq=False)
class Mine:
    """This host's latest invocation of a key while it waits in ``slot``: what this host
    submits again should the store lose it."""

    inv: int
    options: Options
    job: Job
    slot: int


@dataclass(eq=False)
class LocalRun:
    """A fleet run executing on this host."""

    key: str
    running: fs.Running
    run: Run
    why: str | None = None  # states.STOP_*: why it was asked to stop (or STOP_LEASE)
    killed: bool = False  # SIGKILL sent (its lease ran out)
    chunks: int = 0  # output chunks published (each event carries its number)
    kill: asyncio.TimerHandle | None = None
    deadline: asyncio.TimerHandle | None = None


class _Publisher:
    """Stands in a fleet run's waiter list: its output goes into the key's stream."""

    def __init__(self, fleet: Fleet, key: str, run_id: int) -> None:
        self.fleet, self.key, self.run_id = fleet, key, run_id

    def follows(self, run_id: int) -> bool:
        return True

    def start(self, run_id: int, line: bytes, log: str | None) -> None:
        pass

    def raw(self, line: bytes) -> None:
        pass

    def replay(self, so_far: Any) -> None:
        pass

    def output(self, fd: int, data: bytes, line: bytes, end: int | None) -> None:
        self.fleet.publish_output(self.key, self.run_id, fd, data)

    def finish(self, msg: protocol.Message) -> None:
        pass


class Fleet:
    """This daemon in the fleet. ``slots`` is the local scheduler: its counter numbers our
    invocations, and fleet runs starting here take its job slots (``daemon --jobs``).

    Every time and timer comes from ``clock`` and ``loop`` (the daemon's), so the tests run a
    fleet on fake time. ``store`` is the Redis store unless another with the same steps is
    given (``memory.MemoryStore``), ``runs`` makes what executes runs (``daemon.runs.Runs``
    unless given), ``apply`` carries out the local scheduler's effects (a job slot given back
    lets a local run start) and ``changed`` is the server's idle check."""

    def __init__(self, config: Config, clock: Clock, loop: asyncio.AbstractEventLoop,
                 slots: Scheduler, log_dir: str, *,
                 apply: Callable[[list[Any]], None] = lambda effects: None,
                 changed: Callable[[], None] = lambda: None,
                 store: Any = None,
                 runs: Callable[[Fleet], Any] | None = None) -> None:
        self.log_dir = log_dir  # `debounce logs` of fleet runs are written here
        assert config.store is not None
        self.config = config
        self.clock = clock
        self.loop = loop
        self.slots = slots
        self.new_id = slots.new_id
        #: Called with the effects of a slot given back (the local queue's next run starts).
        self.apply = apply
        #: Our due pending invocations waiting for a job slot here, in arrival order.
        self.slot_queue: deque[str] = deque()
        self.host = config.host_id
        self.lease = config.lease
        self.store: Store = store if store is not None else Store(config.store)
        self.runs: Runs = (runs(self) if runs is not None
                           else Runs(config, loop, None, "", None, events=self, clock=clock))
        self.offset: float | None = None  # the store's clock minus our monotonic clock
        self.beat_at = float("-inf")  # our monotonic time of the last heartbeat
        #: Our monotonic time when the last heartbeat the store took was sent: the store
        #: saw us alive no earlier than this, so nobody takes over what runs here before a
        #: lease after it (see _guard).
        self.renewed = float("-inf")
        self.connected_since: float | None = None  # in touch with the store since then
        self.beats: Beat | None = None  # the last heartbeat's view of the fleet
        self.waiting: dict[str, KeyWaiters] = {}
        #: key -> (slot, event id of our submission): our invocation is the latest there.
        self.owned: dict[str, tuple[int, tuple[int, int]]] = {}
        self.instance = secrets.token_hex(6)  # names this daemon's submissions in the store
        self.submitting = 0  # submissions not yet in the store
        self.reclaim: set[str] = set()  # keys to claim again once the claim in flight is done
        #: (key, run) -> the last output chunk handed out: a chunk published twice (its
        #: pipeline retried after a lost answer) is handed out once.
        self.out_seen: dict[tuple[str, int], int] = {}
        self.mine: dict[str, Mine] = {}
        self.epoch: bytes | None = None  # the store's epoch token, as first seen
        self.seen_runs = 0  # the highest run id the store gave us
        self.timers: dict[str, asyncio.TimerHandle] = {}
        self.claiming: set[str] = set()
        self.local: dict[int, LocalRun] = {}
        self.reporting: set[int] = set()  # runs ended here whose end the store has not had
        self.followers: dict[str, Follower] = {}
        self.follow_changed = asyncio.Event()
        self.reading = False
        self.outbox: deque[tuple[str, Any]] = deque()
        self.outbox_bytes = 0
        self.outbox_ready = asyncio.Event()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.closing = False
        self.down_since: float | None = None
        self.changed = changed  # the server's idle check

    # ------------------------------------------------------------------ life
    def start(self) -> None:
        self.spawn(self._forever("heartbeat", self._beat))
        self.spawn(self._forever("scan", self._scan))
        self.spawn(self._forever("publisher", self._publish))
        self.spawn(self._forever("reader", self._read))
        self.spawn(self._forever("guard", self._guard))

    async def _forever(self, name: str, loop: Callable[[], Any]) -> None:
        """Run one of the fleet's loops for the daemon's life: an exception it did not
        expect is said once and the loop starts again (a dead heartbeat would get this
        host's runs taken for lost; a dead reader would leave every waiter hanging)."""
        while not self.closing:
            try:
                await loop()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the loop must go on
                import traceback

                print(f"debounce: fleet {name}: {type(exc).__name__}: {exc}", file=sys.stderr,
                      flush=True)
                traceback.print_exc()
                await asyncio.sleep(RETRY)

    def busy(self) -> bool:
        """Something here still needs this daemon: a waiter, a run, our pending invocation,
        a submission on its way, or output not yet in the store."""
        return bool(self.local or self.owned or self.outbox or self.claiming
                    or self.submitting
                    or any(not kw.empty() for kw in self.waiting.values()))

    def stop_runs(self) -> None:
        for local in list(self.local.values()):
            self._stop(local, states.STOP_SHUTDOWN)

    async def close(self) -> None:
        """After the runs have ended: report them (a few seconds at most), leave the fleet."""
        await self.runs.wait_all()
        deadline = self.loop.time() + 5.0
        while self.outbox and self.loop.time() < deadline:
            self.outbox_ready.set()
            await asyncio.sleep(0.05)
        self.closing = True
        for timer in self.timers.values():
            timer.cancel()
        for task in list(self.tasks):
            task.cancel()
        await self.store.leave(self.host)
        await self.store.close()

    def spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            print(f"debounce: fleet: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        self.changed()

    def _store_now(self) -> float:
        """The store's clock, as our monotonic clock and the last measured offset put it."""
        if self.offset is None:
            return self.clock.wall()
        return self.clock.monotonic() + self.offset

    def _measured(self, store_now: float) -> None:
        self.offset = store_now - self.clock.monotonic()

    def _say_down(self, exc: StoreDown) -> None:
        now = self.clock.monotonic()
        if self.down_since is None or now - self.down_since > 10:
            print(f"debounce: {exc}; fleet keys wait for it", file=sys.stderr, flush=True)
            self.down_since = now

    # ------------------------------------------------------------------ submissions
    def submit(self, key: str, options: Options, job: Job, waiter: Waiter | None,
               submitter: Submitter | None) -> tuple[str, int]:
        """A ``--fleet`` invocation; the submitter is answered once the store holds it.
        Returns the key it is filed under and its invocation id."""
        inv = self.new_id()
        if not options.defer:
            key = f"{key}#{self.host}-{inv}"
        self.submitting += 1
        self.spawn(self._submitted(inv, key, options, job, waiter, submitter))
        return key, inv

    async def _submitted(self, inv: int, key: str, options: Options, job: Job,
                         waiter: Waiter | None, submitter: Submitter | None) -> None:
        try:
            await self._submit(inv, key, options, job, waiter, submitter)
        except Exception as exc:
            if submitter is not None:  # never leave a client without its answer
                submitter.answered(protocol.Error(
                    message=f"fleet: {type(exc).__name__}: {exc}", code=states.REFUSED))
            raise
        finally:
            self.submitting -= 1
            self.changed()

    async def _submit(self, inv: int, key: str, options: Options, job: Job,
                      waiter: Waiter | None, submitter: Submitter | None) -> None:
        token = f"{self.instance}:{inv}"
        payload = {"argv": job.argv, "cwd": job.cwd, "env": job.env}
        seen: list[float] = []

        def step(st: fs.KeyState, now: float) -> tuple[fs.Landed, list[fs.Event]]:
            seen.append(now)
            return fs.submit(st, inv=inv, host=self.host, job=payload,
                             options=options, now=now, token=token)

        while True:
            try:
                landed, latest, st = await self.store.update(key, step)
                break
            except StoreDown as exc:
                if submitter is not None or self.closing:
                    if submitter is not None:
                        submitter.answered(protocol.Error(
                            message=f"{exc}; fleet keys are refused until it is back (local "
                            "keys are not affected)", code=states.REFUSED))
                    return
                # Submitted again after the store lost it: accepted once, so never dropped.
                self._say_down(exc)
                await asyncio.sleep(RETRY)
        now = seen[-1]
        self._measured(now)
        if isinstance(landed, fs.InSlot):
            accepted = protocol.Accepted(id=inv, key=key, state=landed.state,
                                         due_in=max(0.0, landed.due - now),
                                         coalesced=landed.coalesced)
            self.mine[key] = Mine(inv, options, job, landed.slot)
            if st.pending is not None and st.pending.host == self.host:
                self._own(key, landed.slot, landed.due, event_id(latest))
        elif isinstance(landed, fs.InRun):
            accepted = protocol.Accepted(id=inv, key=key, state=states.RUNNING, due_in=None,
                                         coalesced=landed.coalesced)
        else:
            accepted = protocol.Accepted(id=inv, key=key, state=states.FINISHED, due_in=None,
                                         coalesced=landed.last.coalesced)
        if submitter is not None:
            submitter.answered(accepted)
        kw = self.waiting.get(key)
        if kw is not None and kw.orphans and isinstance(landed, fs.InSlot):
            kw.slots.setdefault(landed.slot, []).extend(kw.orphans)  # submitted again
            kw.orphans = []
        if waiter is not None:
            await self._attach(key, waiter, landed, st, latest)
        self._follow(key, latest)

    async def _attach(self, key: str, waiter: Waiter, landed: fs.Landed, st: fs.KeyState,
                      since: bytes) -> None:
        """Hand ``waiter`` what it is owed now and file it where the key's events find it.

        A waiter that joins a run (executing, or already ended) gets its output so far first,
        from the key's stream up to ``since``; what came after, the follower's memory or the
        live events give it, in order."""
        mark = event_id(since)
        if isinstance(landed, fs.InSlot):
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
            # Taken again after the wait: the reader may have dropped the key's table.
            kw = self.waiting.setdefault(key, KeyWaiters())
            kw.since[(waiter, "run", landed.run)] = mark
            kw.runs.setdefault(landed.run, []).append(waiter)
        follower = self.followers.get(key)
        if follower is not None:
            # Events the follower handed out before this waiter was filed: its share now.
            after = event_id(since)
            for eid, event in list(follower.recent):
                if eid > after:
                    self._dispatch(key, event, eid, only=waiter)

    async def _output(self, key: str, run: int, upto: bytes | None
                      ) -> list[tuple[int, bytes]]:
        """Run ``run``'s output as the key's stream still holds it (up to ``upto``)."""
        try:
            events = await self.store.events(key, upto)
        except StoreDown as exc:
            self._say_down(exc)
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
            key = await self.store.key_of_run(run_id)
            if key is None:
                return messages.no_run(run_id)
            run = run_id
        else:
            st, _ = await self.store.snapshot(key)
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

    # ------------------------------------------------------------------ requests
    async def wait(self, key: str, waiter: Waiter) -> protocol.Message | None:
        """``debounce wait`` on a fleet key: ``None`` once the waiter is filed, else the
        answer (the last run's result, or "not found")."""
        st, latest = await self.store.snapshot(key)
        self._measured(await self.store.now())
        if st.pending is not None:
            p = st.pending
            waiter.raw(protocol.encode(protocol.Pending(
                key=key, state=states.PENDING, due_in=max(0.0, p.due - self._store_now()),
                coalesced=p.coalesced)))
            await self._attach(key, waiter, fs.InSlot(p.slot, p.due, p.coalesced), st, latest)
        elif st.running is not None:
            await self._attach(key, waiter, fs.InRun(st.running.run, st.running.coalesced),
                               st, latest)
        elif st.last is not None:
            return messages.finished(key, st.last.record(key))
        else:
            return protocol.Error(message=f"no fleet key {key!r} pending, running or finished",
                                  code=states.NOT_FOUND)
        self._follow(key, latest)
        return None

    async def wait_run(self, run_id: int, waiter: Waiter) -> protocol.Message | None:
        """``debounce wait --run N`` on a fleet run: ``None`` once the waiter follows it, else
        its result (or "not found")."""
        key = await self.store.key_of_run(run_id)
        if key is None:
            return messages.no_run(run_id)
        st, latest = await self.store.snapshot(key)
        if st.running is not None and st.running.run == run_id:
            await self._attach(key, waiter, fs.InRun(run_id, st.running.coalesced), st, latest)
            self._follow(key, latest)
            return None
        if st.last is not None and st.last.run == run_id:
            return messages.finished(key, st.last.record(key))
        for row in await self.store.history(key, 10_000):
            if row.get("run_id") == run_id:
                return messages.finished(key, row)
        return messages.no_run(run_id)

    async def status(self) -> list[protocol.KeyStatus]:
        tags = await self.store.indexed()
        now = await self.store.now()
        rows = [messages.key_status(st, now) for st in await self.store.states(tags)]
        rows.sort(key=lambda row: row.key)
        return rows

    async def history(self, key: str | None, limit: int) -> list[protocol.RunRecord]:
        rows = await self.store.history(key, limit)
        out = []
        for row in rows:
            try:
                out.append(protocol.RunRecord.from_dict(row, "history"))
            except protocol.ProtocolError:
                continue  # a row of another version: left out, not fatal
        return [r for r in out if isinstance(r, protocol.RunRecord)]

    async def flush(self, key: str) -> bool:
        found, _, _ = await self.store.update(key, lambda st, now: fs.flush(st, now=now))
        return found

    async def cancel(self, key: str) -> bool:
        found, _, _ = await self.store.update(key, lambda st, now: fs.cancel(st))
        return found

    async def kill(self, key: str | None, signal: str | None, run_id: int | None = None
                   ) -> fs.Running | None:
        """Stop (or signal) what runs for a fleet key, or fleet run ``run_id``."""
        if key is None:
            assert run_id is not None
            key = await self.store.key_of_run(run_id)
            if key is None:
                return None
        running, _, _ = await self.store.update(
            key, lambda st, now: fs.kill(st, signal=signal, run=run_id))
        return running

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

    # ------------------------------------------------------------------ our pending ones
    def _own(self, key: str, slot: int, due: float, since: tuple[int, int]) -> None:
        self.owned[key] = (slot, since)
        self._arm(key, due)

    def _disown(self, key: str) -> None:
        self.owned.pop(key, None)
        timer = self.timers.pop(key, None)
        if timer is not None:
            timer.cancel()

    def _arm(self, key: str, due: float) -> None:
        timer = self.timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        at = self.loop.time() + max(0.0, due - self._store_now())
        self.timers[key] = self.loop.call_at(at, lambda: self._claim_soon(key, False))

    def _claim_soon(self, key: str, take_over: bool) -> None:
        self.timers.pop(key, None)
        if not self.lease_fresh():
            # A host whose lease is stale starts nothing: again once a heartbeat got through.
            self.timers[key] = self.loop.call_later(
                self.lease / 8, lambda: self._claim_soon(key, take_over))
            return
        if key in self.claiming:
            self.reclaim.add(key)  # something changed meanwhile: look again after this one
            return
        self.claiming.add(key)
        self.spawn(self._claim(key, take_over))

    async def _claim(self, key: str, take_over: bool, slot_held: bool = False) -> None:
        # The fence: a host frozen (or cut off) for half a lease between here and the start
        # of the run may already be taken for gone, its claim given up as lost.
        asked_at = self.clock.monotonic()
        slot = slot_held or self.slots.borrow()
        started = False
        try:
            try:
                run_id = 0  # without a job slot here, the claim never starts a run
                if slot:
                    run_id = await self.store.next_run_id()
                    self.seen_runs = max(self.seen_runs, run_id)
                seen: list[float] = []

                def step(st: fs.KeyState, now: float) -> tuple[fs.Claim, list[fs.Event]]:
                    seen.append(now)
                    return fs.claim(st, host=self.host, now=now, run_id=run_id,
                                    may_take_over=take_over, slot_free=slot,
                                    silent=self.lease)

                result, latest, st = await self.store.update(key, step)
            except StoreDown as exc:
                self._say_down(exc)
                if key in self.owned:  # ours to start: again soon (the scan also looks)
                    self.timers[key] = self.loop.call_later(
                        RETRY, lambda: self._claim_soon(key, take_over))
                return
            self._measured(seen[-1])
            if isinstance(result, fs.Queued):
                if key not in self.slot_queue:
                    self.slot_queue.append(key)  # a slot freed here claims it again
            elif isinstance(result, fs.Later):
                if key in self.owned:
                    self._arm(key, result.due)
            elif isinstance(result, fs.Start):
                owned = self.owned.get(key)
                if owned is not None and owned[0] == result.running.slot:
                    self._disown(key)
                started = self._execute(key, result.running, asked_at, latest)
                self.spawn(self.store.name_run(result.running.run, key))
            elif isinstance(result, fs.Nothing) and st.pending is None:
                self._disown(key)
        finally:
            if slot and not started:
                self._give_back()
            self.claiming.discard(key)
            if key in self.reclaim:
                self.reclaim.discard(key)
                self._claim_soon(key, take_over)

    def _give_back(self) -> None:
        self.apply(self.slots.give_back())
        self.slot_freed()

    def slot_freed(self) -> None:
        """A job slot here may be free: our first queued fleet key takes it (local
        invocations queued for one go first)."""
        while self.slot_queue:
            if not self.slots.borrow():
                return
            key = self.slot_queue.popleft()
            if key in self.claiming:
                self.reclaim.add(key)
                self.apply(self.slots.give_back())
                continue
            self.claiming.add(key)
            self.spawn(self._claim(key, False, slot_held=True))

    # ------------------------------------------------------------------ runs executing here
    def _execute(self, key: str, running: fs.Running, asked_at: float,
                 since: bytes) -> bool:
        """Start a run claimed here, in the job slot taken for it (its end gives it back)."""
        options = running.options
        job = Job(list(running.job["argv"]), running.job["cwd"],
                  {**running.job["env"], "DEBOUNCE_HOST": self.host})
        inv = Invocation(id=running.inv, key=key, options=options,
                         received_at=self.clock.monotonic(), payload=job,
                         coalesced=running.coalesced)
        if running.batch:  # --collect: every coalesced invocation's command line
            inv.batch = [Job(list(argv), job.cwd, job.env) for argv in running.batch]
        run = Run(id=running.run, key=key, invocation=inv, coalesced=running.coalesced,
                  started_at=self.clock.monotonic(), started_wall=running.started_at,
                  due_wall=running.due)
        inv.run = run
        run.waiters.append(_Publisher(self, key, running.run))
        local = self.local[running.run] = LocalRun(key, running, run)
        self._follow(key, since)  # for a stop or a signal from any host
        if self.clock.monotonic() - asked_at > self.lease / 2 or not self.lease_fresh():
            # The claim took long (a slow or paused store, or this host was frozen), or our
            # lease is stale: another host may be about to give this run up. It does not
            # start here; the claim is given back and the invocation is pending again.
            del self.local[running.run]
            self.reporting.add(running.run)  # (not taken for a leftover of a restart)
            self.outbox.append(("unclaim", (key, running)))
            self.outbox_ready.set()
            return False
        if options.timeout is not None:
            local.deadline = self.loop.call_later(
                options.timeout, lambda: self._stop(local, states.STOP_TIMEOUT))
        self.runs.start(run)
        return True

    def run_started(self, run: Run) -> None:
        pass  # the store learnt of it when it was claimed

    def run_exited(self, run_id: int, code: int, outcome: str | None = None) -> None:
        local = self.local.pop(run_id, None)
        if local is None:
            return
        for handle in (local.kill, local.deadline):
            if handle is not None:
                handle.cancel()
        if outcome is None:
            outcome = (states.LOST if local.why == STOP_LEASE
                       else states.OUTCOME_OF_STOP.get(local.why, states.EXITED))
        self.reporting.add(run_id)
        self.outbox.append(("finish", (local.key, local.running, code, outcome)))
        self._give_back()
        self.outbox_ready.set()

    def _stop(self, local: LocalRun, why: str) -> None:
        """Stop a run executing here: TERM, then KILL after its stop timeout."""
        if local.why is not None:
            return
        local.why = why
        local.run.stop_reason = why
        self.runs.signal(local.run.id, "TERM")
        timeout = local.run.invocation.options.stop_timeout
        local.kill = self.loop.call_later(
            timeout, lambda: self.runs.signal(local.run.id, "KILL"))

    def publish_output(self, key: str, run_id: int, fd: int, data: bytes) -> None:
        local = self.local.get(run_id)
        if self.outbox_bytes > OUTBOX_LIMIT or local is None:
            return
        self.outbox_bytes += len(data)
        local.chunks += 1
        event = {"t": "out", "run": run_id, "fd": fd, "n": local.chunks,
                 "data": binascii.b2a_base64(data, newline=False).decode()}
        self.outbox.append(("out", (key, event)))
        self.outbox_ready.set()

    async def _publish(self) -> None:
        """Output and ends of the runs here, into the store, in order; retried while it is
        down, so runs in flight report once it is back."""
        while not self.closing:
            await self.outbox_ready.wait()
            self.outbox_ready.clear()
            while self.outbox:
                kind, item = self.outbox[0]
                try:
                    if kind == "out":
                        batch: list[tuple[str, fs.Event]] = []
                        for kind2, item2 in self.outbox:
                            if kind2 != "out" or len(batch) >= 500:
                                break
                            batch.append(item2)
                        await self.store.publish(batch)
                        for _ in batch:
                            _, (_, event) = self.outbox.popleft()
                            self.outbox_bytes -= len(event["data"]) * 3 // 4
                        continue
                    if kind == "unclaim":
                        key, running = item
                        back, latest, st = await self.store.update(
                            key, _unclaiming(running))
                        self.outbox.popleft()
                        self.reporting.discard(running.run)
                        if back and st.pending is not None and st.pending.host == self.host:
                            self._own(key, st.pending.slot, st.pending.due, event_id(latest))
                        continue
                    await self.store.update(item[0], _finishing(*item[1:]),
                                            history=self.config.keep_history)
                    self.outbox.popleft()
                    self.reporting.discard(item[1].run)
                except StoreDown as exc:
                    self._say_down(exc)
                    await asyncio.sleep(RETRY)
            self.outbox_bytes = max(0, self.outbox_bytes) if self.outbox else 0
            self.changed()

    # ------------------------------------------------------------------ following keys
    def _interested(self, key: str) -> bool:
        kw = self.waiting.get(key)
        return bool((kw is not None and not kw.empty()) or key in self.owned
                    or key in self.mine
                    or any(local.key == key for local in self.local.values()))

    def _follow(self, key: str, since: bytes) -> None:
        """Read ``key``'s events from after ``since`` on (the one reader reads them all)."""
        if key in self.followers:
            return
        self.followers[key] = Follower(key, since)
        self.follow_changed.set()
        if self.reading:
            self.spawn(self.store.unblock_reader())  # it reads the new key from now on

    async def _read(self) -> None:
        """The one reader of every followed key's stream: a single blocking read on all of
        them, woken early when a key is added."""
        while not self.closing:
            if not self.followers:
                await self.follow_changed.wait()
            self.follow_changed.clear()
            followed = {key: f.last for key, f in self.followers.items()}
            self.reading = True
            try:
                batch = await self.store.read(followed, READ_BLOCK_MS)
            except StoreDown as exc:
                self._say_down(exc)
                await asyncio.sleep(RETRY)
                continue
            finally:
                self.reading = False
            heard = set()
            for key, eid, event in batch:
                follower = self.followers.get(key)
                if follower is None:
                    continue
                heard.add(key)
                follower.last = eid
                if event.get("t") == "out" and "n" in event:
                    chunk = (key, event["run"])
                    if event["n"] <= self.out_seen.get(chunk, 0):
                        continue  # published twice (a retried pipeline): handed out once
                    self.out_seen[chunk] = event["n"]
                follower.remember(eid, event)
                self._dispatch(key, event, event_id(eid))
            for key in followed:
                if key not in heard and not self._interested(key):
                    self.followers.pop(key, None)
                    kw = self.waiting.get(key)
                    if kw is not None and kw.empty():
                        del self.waiting[key]
            if batch:
                self.changed()  # the last waiter may be done: the server's idle check

    def _dispatch(self, key: str, event: dict[str, Any], eid: tuple[int, int],
                  only: Any = None) -> None:
        """One event of ``key`` to this host's waiters (or to ``only``, filed late); then
        what it means for our own pending invocation and runs."""
        kind = event.get("t")
        kw = self.waiting.get(key)
        if kw is not None:
            deliver(key, kw, event, eid, only, self._store_now())
        if only is not None:
            return
        owned = self.owned.get(key)
        if kind == "pending":
            if event["host"] != self.host:
                if owned is not None and eid > owned[1]:
                    self._disown(key)  # a later invocation from elsewhere won
            elif owned is not None and owned[0] == event["slot"]:
                self._arm(key, event["due"])
        elif kind in ("started", "moved", "cancelled"):
            if owned is not None and owned[0] == event["slot"]:
                self._disown(key)
            mine = self.mine.get(key)
            if mine is not None and mine.slot == event["slot"]:
                del self.mine[key]
        elif kind == "finished":
            self.out_seen.pop((key, event["run_id"]), None)
            if owned is not None:
                self._claim_soon(key, False)  # ours may have fallen due meanwhile
        elif kind in ("stop", "signal"):
            local = self.local.get(event["run"])
            if local is not None and local.running.fence == event.get("fence"):
                if kind == "stop":
                    self._stop(local, event["why"])
                else:
                    self.runs.signal(local.run.id, event["sig"])

    async def _recover(self, emptied: bool) -> None:
        """The store lost data (restarted without persistence, or rolled back to an older
        snapshot): submit this host's own pending invocations again, and let the waiters
        here follow whatever is pending for their keys next."""
        print(f"debounce: the fleet store {self.store.name} lost data (restarted without "
              "its append-only file?); submitting this host's pending invocations again",
              file=sys.stderr, flush=True)
        for kw in self.waiting.values():
            for waiters in kw.slots.values():
                kw.orphans.extend(waiters)
            kw.slots.clear()
            kw.since = {mark: at for mark, at in kw.since.items() if mark[1] != "slot"}
        for key in list(self.owned):
            self._disown(key)
        for follower in self.followers.values():
            follower.recent.clear()
            follower.recent_bytes = 0
            if emptied:
                follower.last = b"0-0"  # a new stream: read it from its start
        mine, self.mine = self.mine, {}
        for key, own in mine.items():
            self.spawn(self._submit(own.inv, key, own.options, own.job, None, None))

    # ------------------------------------------------------------------ heartbeat and scan
    async def _beat(self) -> None:
        """Every quarter lease: say this host is alive, learn the others' heartbeats, and
        notice a store that lost data. A loop of its own, so a long scan never delays it."""
        while not self.closing:
            seen_runs = self.seen_runs  # before asking: a claim meanwhile may raise it
            sent = self.clock.monotonic()
            try:
                beat = await self.store.heartbeat(self.host)
            except StoreDown as exc:
                self.connected_since = None
                self._say_down(exc)
                await asyncio.sleep(self.lease / 4)
                continue
            self.down_since = None
            self._measured(beat.now)
            self.beat_at = self.clock.monotonic()
            if sent - self.renewed > self.lease / 2:
                # Our own heartbeats did not get through for a while (the store paused, or
                # we did): the others' silence over that time says nothing. Judge again
                # only after a whole lease in touch.
                self.connected_since = self.beat_at
            self.renewed = sent
            if self.connected_since is None:
                self.connected_since = self.beat_at
            self.beats = beat
            if self.epoch is None or beat.epoch is None:
                first = self.epoch is None
                self.epoch = await self.store.claim_epoch(seen_runs)
                if not first:
                    await self._recover(emptied=True)
            elif beat.epoch != self.epoch or beat.runs < seen_runs:
                emptied = beat.epoch != self.epoch
                self.epoch = beat.epoch if emptied else self.epoch
                await self.store.claim_epoch(seen_runs)
                await self._recover(emptied=emptied)
            forgotten = [host for host, at in beat.hosts.items()
                         if at < beat.now - max(FORGET_HOST, 100 * self.lease)]
            if forgotten:
                await self.store.forget_hosts(forgotten)
            await asyncio.sleep(self.lease / 4)

    def lease_fresh(self) -> bool:
        """Whether this host may start a run: the store took a heartbeat of ours less than
        half a lease ago."""
        return self.clock.monotonic() - self.renewed < self.lease / 2

    async def _guard(self) -> None:
        """Safety first: a host that cannot renew its lease (cut off from the store, or the
        store paused) stops its own runs before any other host may take their keys over.
        Others need a lease of silence after our last heartbeat (the store's clock) and our
        run to be a lease old; we stop at half a lease after sending that heartbeat (ours),
        and kill what is left at three quarters: a quarter lease of margin without any
        synchronised clock. The runs so stopped are reported lost, which they are."""
        while not self.closing:
            await asyncio.sleep(self.lease / 16)
            if not self.local:
                continue
            silent = self.clock.monotonic() - self.renewed
            if silent < self.lease / 2:
                continue
            for local in list(self.local.values()):
                if local.why != STOP_LEASE:
                    print(f"debounce: fleet run {local.run.id} of {local.key!r}: stopped, this "
                          f"host could not renew its lease for {silent:.1f}s (the fleet may "
                          "run the key elsewhere)", file=sys.stderr, flush=True)
                    local.why = STOP_LEASE
                    local.run.stop_reason = STOP_LEASE
                    self.runs.signal(local.run.id, "TERM")
                elif silent >= self.lease * 3 / 4 and not local.killed:
                    local.killed = True
                    self.runs.signal(local.run.id, "KILL")

    async def _scan(self) -> None:
        """Every quarter lease: the keys due, for runs whose host went silent (lost) and
        pending invocations whose host went silent (taken over); and the keys whose stream
        was trimmed past what this host had read (resynced)."""
        while not self.closing:
            await asyncio.sleep(self.lease / 4)
            if self.beats is None or self.connected_since is None:
                continue
            try:
                await self._scan_once(self.beats)
                await self._resync_trimmed()
            except StoreDown as exc:
                self._say_down(exc)

    async def _scan_once(self, beat: Beat) -> None:
        now, beats = self._store_now(), beat.hosts
        assert self.connected_since is not None
        # Another host's silence means it is gone only once we have been in touch with the
        # store for a whole lease ourselves: after the store was down, every host gets a
        # lease to beat again before anything of its is taken over.
        judging = self.beat_at - self.connected_since >= self.lease

        def gone(host: str) -> bool:
            return (judging and host != self.host
                    and beats.get(host, float("-inf")) < beat.now - self.lease)

        for st in await self.store.states(await self.store.indexed(upto=now)):
            key = st.key
            if key in self.claiming:
                continue
            r, p = st.running, st.pending
            ours_gone = (r is not None and r.host == self.host and r.run not in self.local
                         and r.run not in self.reporting)
            if r is not None and (gone(r.host) or ours_gone):
                # Its host went silent (or it is ours from before a restart): lost, if the
                # store agrees that it started over a lease ago (a host that joined after
                # the heartbeats were read is not silent).
                lost, _, _ = await self.store.update(
                    key, _losing(r, 0.0 if ours_gone else self.lease),
                    history=self.config.keep_history)
                if lost is not None:
                    heard = beats.get(r.host)
                    why = ("this host's daemon restarted" if r.host == self.host
                           else f"{r.host} has not been heard from" if heard is None
                           else f"{r.host} has been silent for {beat.now - heard:.1f}s")
                    print(f"debounce: fleet run {r.run} of {key!r}: lost ({why})",
                          file=sys.stderr, flush=True)
                if p is not None:
                    self._claim_soon(key, gone(p.host))
                continue
            if p is not None and p.due <= now and (p.host == self.host or gone(p.host)):
                if p.host == self.host and (key in self.timers or key in self.slot_queue):
                    continue  # our own timer (or a free job slot) will see to it
                self._claim_soon(key, p.host != self.host)

    async def _resync_trimmed(self) -> None:
        """A key's stream keeps its latest EVENTS_MAXLEN events: a host that fell further
        behind (cut off from the store while a run elsewhere wrote a lot) has missed some.
        Its waiters then get what the key's state says instead of hanging."""
        for key, follower in list(self.followers.items()):
            kw = self.waiting.get(key)
            if kw is None or (not kw.slots and not kw.runs):
                continue
            trimmed = await self.store.trimmed_after(key, follower.last)
            if not trimmed:
                continue
            st, latest = await self.store.snapshot(key)
            print(f"debounce: fleet key {key!r}: this host missed events (its stream was "
                  "trimmed); its waiters take the key's state as it is now", file=sys.stderr,
                  flush=True)
            follower.last = latest
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


def _unclaiming(run: fs.Running
                ) -> Callable[[fs.KeyState, float], tuple[bool, list[fs.Event]]]:
    """The step that gives back a claim whose run did not start here."""
    def step(st: fs.KeyState, now: float) -> tuple[bool, list[fs.Event]]:
        return fs.unclaim(st, run=run, now=now)
    return step


def _losing(run: fs.Running, silent: float
            ) -> Callable[[fs.KeyState, float], tuple[fs.Last | None, list[fs.Event]]]:
    """The step that records ``run`` lost, if its host has been silent long enough."""
    def step(st: fs.KeyState, now: float) -> tuple[fs.Last | None, list[fs.Event]]:
        return fs.lose(st, run=run, now=now, silent=silent)
    return step


def _finishing(run: fs.Running, code: int | None, outcome: str
               ) -> Callable[[fs.KeyState, float], tuple[fs.Last | None, list[fs.Event]]]:
    """The step that records the end of ``run``."""
    def step(st: fs.KeyState, now: float) -> tuple[fs.Last | None, list[fs.Event]]:
        return fs.finish(st, run=run, exit_code=code, outcome=outcome, now=now)
    return step


