"""Submitting to fleet keys and claiming their runs: this host's own invocations.

- A ``--fleet`` submission is one step on the key's state (``state.submit``); the client is
  answered once the store holds it, or refused (116) when the store is down.
- The host of the latest invocation claims the run when it falls due, by its own timer (due
  times are on the store's clock; the timer converts them with the offset measured at every
  step, so a host whose clock is off still fires on time), in a job slot of this daemon's
  (``daemon --jobs``); the claim is one step, so exactly one host starts the run.
"""

from __future__ import annotations

import asyncio
import secrets
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from debounce_cli import protocol, states
from debounce_cli.daemon.fleet import state as fs
from debounce_cli.daemon.fleet.following import Following
from debounce_cli.daemon.fleet.layout import StoreDown, event_id
from debounce_cli.daemon.fleet.link import RETRY, Link
from debounce_cli.daemon.jobs import Job
from debounce_cli.daemon.waiters import Submitter, Waiter
from debounce_cli.scheduler import Options, Scheduler

#: Fleet invocations whose key this daemon remembers for `wait --invocation` (older ones are
#: looked for through the fleet's keys and history).
SUBMITTED_KEPT = 10_000
#: Seconds a submission whose answer was lost is retried before its client is told the
#: outcome is unknown (118): well within the 30 s a client waits for its first answer.
ANSWER_WITHIN = 20.0

@dataclass(eq=False)
class Mine:
    """This host's latest invocation of a key while it waits in ``slot``: what this host
    submits again should the store lose it."""

    inv: int
    options: Options
    job: Job
    slot: int


class Claims:
    """This host's invocations of fleet keys and the claims of their runs. ``slots`` is the
    local scheduler: its counter numbers our invocations, and a fleet run starting here takes
    one of its job slots; ``apply`` carries out what giving a slot back does there (a local
    run may start). ``execute`` starts a run this host claimed (``Execution.execute``)."""

    def __init__(self, link: Link, slots: Scheduler, apply: Callable[[list[Any]], None],
                 following: Following,
                 execute: Callable[[str, fs.Running, float, bytes], bool]) -> None:
        self.link = link
        self.slots = slots
        self.new_id = slots.new_id
        self.apply = apply
        self.following = following
        self.execute = execute
        #: Our due pending invocations waiting for a job slot here, in arrival order.
        self.slot_queue: deque[str] = deque()
        #: key -> (slot, event id of our submission): our invocation is the latest there.
        self.owned: dict[str, tuple[int, tuple[int, int]]] = {}
        self.instance = secrets.token_hex(6)  # names this daemon's submissions in the store
        self.submitting = 0  # submissions not yet in the store
        self.reclaim: set[str] = set()  # keys to claim again once the claim in flight is done
        self.mine: dict[str, Mine] = {}
        self.submitted: dict[int, str] = {}  # invocation id -> key, the newest SUBMITTED_KEPT
        self.seen_runs = 0  # the highest run id the store gave us
        self.timers: dict[str, asyncio.TimerHandle] = {}
        self.armed: dict[str, float] = {}  # key -> when (loop time) its timer claims it
        self.claiming: set[str] = set()

    def busy(self) -> bool:
        return bool(self.owned or self.claiming or self.submitting)

    def interested(self, key: str) -> bool:
        return key in self.owned or key in self.mine

    def on_event(self, key: str, event: dict[str, Any], eid: tuple[int, int]) -> None:
        """What an event of ``key`` means for our own pending invocation."""
        kind = event.get("t")
        owned = self.owned.get(key)
        if kind == "pending":
            if event["host"] != self.link.host:
                if owned is not None and eid > owned[1]:
                    self.disown(key)  # a later invocation from elsewhere won
            elif owned is not None and owned[0] == event["slot"]:
                self.arm(key, event["due"])
        elif kind in ("started", "moved", "cancelled"):
            if owned is not None and owned[0] == event["slot"]:
                self.disown(key)
            mine = self.mine.get(key)
            if mine is not None and mine.slot == event["slot"]:
                del self.mine[key]
        elif kind == "finished" and owned is not None:
            self.claim_soon(key, False)  # ours may have fallen due meanwhile

    def resubmit_all(self) -> None:
        """The store lost data: our pending invocations are submitted again."""
        for key in list(self.owned):
            self.disown(key)
        mine, self.mine = self.mine, {}
        for key, own in mine.items():
            self.link.spawn(self.send(own.inv, key, own.options, own.job, None, None))

    def cancel_timers(self) -> None:
        for timer in self.timers.values():
            timer.cancel()

    def submit(self, key: str, options: Options, job: Job, waiter: Waiter | None,
               submitter: Submitter | None) -> tuple[str, int]:
        """A ``--fleet`` invocation; the submitter is answered once the store holds it.
        Returns the key it is filed under and its invocation id."""
        inv = self.new_id()
        if not options.defer:
            key = states.no_defer_key(key, f"{self.link.host}-{inv}")
        self.submitted[inv] = key  # for `wait --invocation`, without a look through the fleet
        if len(self.submitted) > SUBMITTED_KEPT:
            del self.submitted[next(iter(self.submitted))]
        self.submitting += 1
        self.link.spawn(self._submitted(inv, key, options, job, waiter, submitter))
        return key, inv

    async def _submitted(self, inv: int, key: str, options: Options, job: Job,
                         waiter: Waiter | None, submitter: Submitter | None) -> None:
        try:
            await self.send(inv, key, options, job, waiter, submitter)
        except Exception as exc:
            if submitter is not None:  # never leave a client without its answer
                submitter.answered(protocol.Error(
                    message=f"fleet: {type(exc).__name__}: {exc}", code=states.REFUSED))
            raise
        finally:
            self.submitting -= 1
            self.link.changed()

    async def send(self, inv: int, key: str, options: Options, job: Job,
                      waiter: Waiter | None, submitter: Submitter | None) -> None:
        token = f"{self.instance}:{inv}"
        payload = {"argv": job.argv, "cwd": job.cwd, "env": job.env}
        seen: list[float] = []

        def step(st: fs.KeyState, now: float) -> tuple[fs.Landed, list[fs.Event]]:
            seen.append(now)
            return fs.submit(st, inv=inv, host=self.link.host, job=payload,
                             options=options, now=now, token=token)

        began = self.link.loop.time()
        unsure = False  # an attempt may have been applied: its client is never told "refused"
        while True:
            # A client waits for its answer: one attempt in flight past the budget counts as
            # one whose answer was lost (it went out, or may yet).
            budget = (None if submitter is None
                      else max(0.0, began + ANSWER_WITHIN - self.link.loop.time()))
            try:
                async with asyncio.timeout(budget):
                    landed, latest, st = await self.link.store.update(key, step)
                break
            except (StoreDown, TimeoutError) as exc:
                if isinstance(exc, TimeoutError):
                    exc = StoreDown(f"the fleet store {self.link.store.name} did not answer",
                                    maybe_applied=True)
                unsure = unsure or exc.maybe_applied
                late = self.link.loop.time() - began >= ANSWER_WITHIN or self.link.closing
                if submitter is not None and (not unsure or late):
                    submitter.answered(_unknown(exc, inv, key) if unsure else protocol.Error(
                        message=f"{exc}; fleet keys are refused until it is back (local "
                        "keys are not affected)", code=states.REFUSED))
                    if not unsure:
                        return
                    # The store may hold it: retried with its token until it answers (then
                    # `debounce wait --invocation` finds it), never dropped, never twice.
                    submitter = waiter = None
                if self.link.closing:
                    return
                # Retried with the same token (the store recognises a step it has applied);
                # submitted again after the store lost it: accepted once, so never dropped.
                self.link.say_down(exc)
                await asyncio.sleep(RETRY)
        now = seen[-1]
        self.link.measured(now)
        if isinstance(landed, fs.InSlot):
            accepted = protocol.Accepted(id=inv, key=key, state=landed.state,
                                         due_in=max(0.0, landed.due - now),
                                         coalesced=landed.coalesced)
            self.mine[key] = Mine(inv, options, job, landed.slot)
            if st.pending is not None and st.pending.host == self.link.host:
                self.own(key, landed.slot, landed.due, event_id(latest))
        elif isinstance(landed, fs.InRun):
            accepted = protocol.Accepted(id=inv, key=key, state=states.RUNNING, due_in=None,
                                         coalesced=landed.coalesced)
        elif isinstance(landed, fs.Gone):  # taken before its answer was lost, cancelled since
            if submitter is not None:
                submitter.answered(protocol.Accepted(id=inv, key=key, state=states.CANCELLED,
                                                     due_in=None, coalesced=1))
            if waiter is not None:
                waiter.finish(protocol.Cancelled(key=key))
            return
        else:
            accepted = protocol.Accepted(id=inv, key=key, state=states.FINISHED, due_in=None,
                                         coalesced=landed.last.coalesced)
        if submitter is not None:
            submitter.answered(accepted)
        if isinstance(landed, fs.InSlot):
            self.following.adopt_orphans(key, landed.slot)  # submitted again
        if waiter is not None:
            await self.following.attach(key, waiter, landed, st, latest)
        self.following.follow(key, latest)

    def own(self, key: str, slot: int, due: float, since: tuple[int, int]) -> None:
        self.owned[key] = (slot, since)
        self.arm(key, due)

    def disown(self, key: str) -> None:
        self.owned.pop(key, None)
        self.armed.pop(key, None)
        timer = self.timers.pop(key, None)
        if timer is not None:
            timer.cancel()

    def arm(self, key: str, due: float) -> None:
        """Claim ``key`` at ``due`` (the store's clock). A later due time, as every
        submission that defers the key gives, keeps the timer: it fires at the earlier time
        and sets itself again (a timer cancelled and made anew at every submission cost
        more than the rest of the submission's bookkeeping here)."""
        loop = self.link.loop
        at = loop.time() + max(0.0, due - self.link.store_now())
        timer = self.timers.get(key)
        if timer is not None and key in self.armed and timer.when() <= at:
            self.armed[key] = at
            return
        if timer is not None:
            timer.cancel()
        self.armed[key] = at
        self.timers[key] = loop.call_at(at, lambda: self._due(key))

    def _due(self, key: str) -> None:
        at = self.armed.pop(key, None)
        if at is not None and at > self.link.loop.time():  # deferred since it was set
            self.armed[key] = at
            self.timers[key] = self.link.loop.call_at(at, lambda: self._due(key))
            return
        self.claim_soon(key, False)

    def claim_soon(self, key: str, take_over: bool) -> None:
        self.timers.pop(key, None)
        self.armed.pop(key, None)
        if not self.link.lease_fresh():
            # A host whose lease is stale starts nothing: again once a heartbeat got through.
            self.timers[key] = self.link.loop.call_later(
                self.link.lease / 8, lambda: self.claim_soon(key, take_over))
            return
        if key in self.claiming:
            self.reclaim.add(key)  # something changed meanwhile: look again after this one
            return
        self.claiming.add(key)
        self.link.spawn(self._claim(key, take_over))

    async def _claim(self, key: str, take_over: bool, slot_held: bool = False) -> None:
        # The fence: a host frozen (or cut off) for half a lease between here and the start
        # of the run may already be taken for gone, its claim given up as lost.
        asked_at = self.link.clock.monotonic()
        slot = slot_held or self.slots.borrow()
        started = False
        try:
            try:
                run_id = 0  # without a job slot here, the claim never starts a run
                if slot:
                    run_id = await self.link.store.next_run_id()
                    self.seen_runs = max(self.seen_runs, run_id)
                seen: list[float] = []

                def step(st: fs.KeyState, now: float) -> tuple[fs.Claim, list[fs.Event]]:
                    seen.append(now)
                    return fs.claim(st, host=self.link.host, now=now, run_id=run_id,
                                    may_take_over=take_over, slot_free=slot,
                                    silent=self.link.lease)

                result, latest, st = await self.link.store.update(key, step)
            except StoreDown as exc:
                self.link.say_down(exc)
                if key in self.owned:  # ours to start: again soon (the scan also looks)
                    self.timers[key] = self.link.loop.call_later(
                        RETRY, lambda: self.claim_soon(key, take_over))
                return
            self.link.measured(seen[-1])
            if isinstance(result, fs.Queued):
                if key not in self.slot_queue:
                    self.slot_queue.append(key)  # a slot freed here claims it again
            elif isinstance(result, fs.Later):
                if key in self.owned:
                    self.arm(key, result.due)
            elif isinstance(result, fs.Start):
                owned = self.owned.get(key)
                if owned is not None and owned[0] == result.running.slot:
                    self.disown(key)
                started = self.execute(key, result.running, asked_at, latest)
                self.link.spawn(self.link.store.name_run(result.running.run, key))
            elif isinstance(result, fs.Nothing) and st.pending is None:
                self.disown(key)
        finally:
            if slot and not started:
                self.give_back()
            self.claiming.discard(key)
            if key in self.reclaim:
                self.reclaim.discard(key)
                self.claim_soon(key, take_over)

    def give_back(self) -> None:
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
            self.link.spawn(self._claim(key, False, slot_held=True))


def _unknown(exc: StoreDown, inv: int, key: str) -> protocol.Error:
    """The answer to a submission the store may have taken without saying so in time."""
    return protocol.Error(
        message=f"outcome unknown: invocation {inv} of fleet key {protocol.shown(key)} was not "
        f"confirmed within {ANSWER_WITHIN:g}s ({exc}); the store may have taken it, so it may "
        f"still run: debounce wait --invocation {inv} tells its outcome", code=states.UNKNOWN)
