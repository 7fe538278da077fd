"""The local keys: heaps, waiters and job slots around the rules, on an injected clock; no
I/O and no asyncio.

Every per-key decision is :mod:`debounce_cli.rules`' (the fleet's keys call the same
functions); this module keeps what only a local key has: the heap of due times,
the waiters that follow replacements to runs, the daemon's job slots and their queue, and the
effects the daemon carries out. The daemon feeds it events (``submit``, ``tick``,
``run_exited``, ``flush``, ``cancel``, ``kill``) and carries out the effects each call
returns (start a process, send a signal, tell waiters a run finished). It asks
:meth:`Scheduler.next_deadline` when to call ``tick`` next, so nothing polls.

Waiters are opaque tokens owned by the caller (a client connection, the stdin source). They sit
on the invocation they wait for; when that invocation is superseded they move to its
replacement, and when it starts they move to its run, so every waiter follows the chain of
replacements to the run that finally stands for it.

Every change of an invocation's or run's state goes through :meth:`Scheduler._transition`, the
one place a journal hooks into (``observer``).

What is decided here, in the SPEC's terms:

- ``--on-busy restart``: the callers of the stopped run follow its replacement once the
  stopped run has ended. If the replacement is cancelled, they get the stopped run's own
  result (outcome ``stopped``), never "cancelled".
- A job slot that frees goes to the queue in arrival order: a key whose pending invocation
  falls due as its own run ends queues behind keys already waiting.
- Why a run is stopped (``kill``, restart, shutdown) is decided here; the stop itself (TERM,
  KILL after ``--stop-timeout``) and ``--timeout`` belong to ``daemon.runs``, the one stop
  path of local and fleet runs, which tells :meth:`Scheduler.timed_out` when it stops one.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from debounce_cli import rules, states
from debounce_cli.rules import Options, arrive
from debounce_cli.states import CANCELLED, FINISHED, PENDING, QUEUED, RUNNING, SUPERSEDED

__all__ = [
    "CANCELLED", "FINISHED", "PENDING", "QUEUED", "RUNNING", "SUPERSEDED",
    "Cancelled", "Effect", "Invocation", "Joined", "KeyState", "Options", "Run", "RunFinished",
    "Scheduler", "SignalRun", "StartRun", "Updated", "arrive",
]


@dataclass(eq=False, slots=True)
class Invocation:
    """One submission. ``payload`` (argv, cwd, environment) is opaque to the scheduler."""

    id: int
    key: str
    options: Options
    received_at: float
    payload: Any = None
    state: str = PENDING
    due: float = 0.0
    first_at: float = 0.0  # where max-wait counts from: its burst's start or the last run start
    coalesced: int = 1  # invocations this one stands for, itself included
    leading_edge: bool = False  # first of a --leading burst: due at once
    replaced_by: Invocation | None = None
    replaced: Invocation | None = None  # the pending one this replaced (for withdraw)
    joined: Invocation | Run | None = None  # the leader or run it joined without replacing
    run: Run | None = None
    waiters: list[Any] = field(default_factory=list)
    #: Waiters of a run stopped for --on-busy restart that now follow this invocation, with
    #: that run: if this one is cancelled they get that run's result instead.
    adopted: Sequence[tuple[Any, Run]] = ()  # (an empty tuple is shared: memory per pending)
    #: With --collect, the payloads of every invocation this one stands for, oldest first.
    batch: Sequence[Any] = ()
    #: The ids of the invocations this one stands for, oldest first, once it stands for more
    #: than itself (empty: just its own id); see :class:`Covered`.
    covered: Covered | tuple[()] = ()

    @property
    def lead(self) -> bool:
        return self.leading_edge

    @lead.setter
    def lead(self, value: bool) -> None:
        self.leading_edge = value

    @property
    def queued(self) -> bool:
        return self.state == QUEUED

    def head(self) -> Invocation:
        """Follow the chain of replacements to the invocation that stands for this one now."""
        inv = self
        while inv.replaced_by is not None:
            inv = inv.replaced_by
        return inv


@dataclass(eq=False, slots=True)
class Run:
    """One execution of the invocation that won."""

    id: int
    key: str
    invocation: Invocation
    coalesced: int
    started_at: float
    started_wall: float
    due_wall: float = 0.0  # when it was due; started_wall - due_wall is how late it started
    state: str = RUNNING
    waiters: list[Any] = field(default_factory=list)
    stop_reason: str | None = None  # states.STOP_* once a stop was asked
    exit_code: int | None = None
    finished_at: float | None = None
    finished_wall: float | None = None
    outcome: str | None = None  # states.EXITED, TIMED_OUT, RESTARTED or STOPPED
    #: The ids of the invocations it stands for, oldest first (see :class:`Covered`):
    #: `history --json`'s ``covered``.
    covered: Covered = field(default_factory=lambda: Covered())
    signalled: tuple[str, ...] = ()  # what `debounce kill --signal` sent it

    @property
    def stopping(self) -> str | None:
        return self.stop_reason

    @property
    def options(self) -> Options:
        return self.invocation.options


@dataclass(eq=False, slots=True)
class KeyState(rules.KeyRecord):
    """A local key: the rules' record, with its pending invocation and its run."""

    pending: Invocation | None = None
    running: Run | None = None


# Effects the daemon carries out.
@dataclass(frozen=True, slots=True)
class StartRun:
    run: Run


@dataclass(frozen=True, slots=True)
class SignalRun:
    run: Run
    signal: str  # a name without SIG: "TERM", "KILL", or --signal's for --on-busy signal
    #: The run is to stop (``run.stop_reason`` says why): TERM, then KILL after its stop
    #: timeout, which ``daemon.runs`` sees to.
    stop: bool = False


@dataclass(frozen=True, slots=True)
class RunFinished:
    """``waiters`` are told the run's result; with ``joined`` they joined it after it had
    ended (``--no-trailing``) and are owed its output first, as any joiner is."""

    run: Run
    waiters: list[Any]
    joined: bool = False


@dataclass(frozen=True, slots=True)
class Joined:
    """``waiters`` joined a run that is executing: they get its output so far, then the rest."""

    run: Run
    waiters: list[Any]


@dataclass(frozen=True, slots=True)
class Updated:
    """The pending invocation of a key changed (superseded, new due time, queued)."""

    invocation: Invocation


@dataclass(frozen=True, slots=True)
class Cancelled:
    invocation: Invocation
    waiters: list[Any]


Effect = StartRun | SignalRun | RunFinished | Joined | Updated | Cancelled


#: Invocation ids a run lists (``covered``): past this many it keeps the newest, and
#: ``history --json`` shows their number instead of the list.
COVERED_MAX = 1000


class Covered(list[int]):
    """Invocation ids, oldest first, of which only the newest COVERED_MAX are sure to be kept;
    ``dropped`` counts the older ones let go (so the number stays exact)."""

    __slots__ = ("dropped",)

    def __init__(self, ids: Iterable[int] = ()) -> None:
        super().__init__(ids)
        self.dropped = 0

    def total(self) -> int:
        return len(self) + self.dropped

    def shown(self) -> list[int] | int:
        """``covered`` as history shows it: the ids while they are all known, else the
        number of them."""
        if self.dropped or len(self) > COVERED_MAX:
            return self.total()
        return list(self)

    def kept(self) -> list[int]:
        """The newest COVERED_MAX ids: what a journal stores and a look-up can find."""
        return self[-COVERED_MAX:]

    def then(self, more: Sequence[int]) -> Covered:
        """A new list: these ids, then ``more``."""
        covered = Covered(self)
        covered.dropped = self.dropped
        _cover(covered, more)
        return covered


def _cover(ids: Covered, more: Sequence[int]) -> None:
    """``ids`` stands for ``more`` too. Past twice COVERED_MAX the oldest are let go (in one
    cut, so a burst of N costs N, not N times COVERED_MAX)."""
    ids.extend(more)
    if isinstance(more, Covered):
        ids.dropped += more.dropped
    excess = len(ids) - COVERED_MAX
    if excess > COVERED_MAX:
        del ids[:excess]
        ids.dropped += excess


def _ids_of(inv: Invocation) -> Covered:
    """The invocation's ``covered`` as a list of its own (which it keeps from now on)."""
    if not inv.covered:
        inv.covered = Covered((inv.id,))
    assert isinstance(inv.covered, Covered)
    return inv.covered


class Scheduler:
    """All pending invocations and running runs of one daemon.

    Args:
        clock: monotonic seconds; deadlines are in this time base.
        wall: wall-clock seconds for the timestamps users see; defaults to ``clock``.
        jobs: how many runs may execute at once (``None``: no limit).
        observer: called as ``observer(kind, obj)`` after every state change, for the journal.
    """

    def __init__(
        self,
        clock: Callable[[], float],
        *,
        wall: Callable[[], float] | None = None,
        jobs: int | None = None,
        observer: Callable[[str, Any], None] | None = None,
        first_id: int = 1,
        first_run_id: int = 1,
    ) -> None:
        self.clock = clock
        self.wall = wall or clock
        self.jobs = jobs
        self.observer = observer
        self.keys: dict[str, KeyState] = {}
        self.runs: dict[int, Run] = {}  # executing runs by id
        self.queue: deque[str] = deque()  # keys whose pending invocation waits for a slot
        self._due: list[tuple[float, int, Invocation]] = []  # heap, stale entries skipped
        self._bursts: list[tuple[float, int, str]] = []  # ends of --leading bursts, heap
        self.pending_count = 0  # keys with a pending invocation
        self.borrowed = 0  # job slots held by runs of the fleet (see borrow)
        self.draining = False  # shutting down: runs are stopped and nothing new starts
        #: At most this many due invocations are decided per event (None: all): the daemon
        #: decides a burst of thousands in steps, so the first runs start (after a commit of
        #: their own) while the rest wait their step; :meth:`next_deadline` says when the next
        #: one is (at once, while some are overdue).
        self.due_per_step: int | None = None
        self._seq = itertools.count()
        self._ids = itertools.count(first_id)
        self._run_ids = itertools.count(first_run_id)

    # ----------------------------------------------------------------- events
    def new_id(self) -> int:
        return next(self._ids)

    def submit(
        self,
        key: str,
        options: Options,
        payload: Any = None,
        waiter: Any = None,
        invocation_id: int | None = None,
    ) -> tuple[Invocation, list[Effect]]:
        """Accept one invocation; return it and the effects of accepting it.

        The returned invocation may already be superseded-into, attached to a run, or finished
        (``--no-trailing`` within a burst whose leading run has ended); follow ``head()`` and
        ``run`` to see where it landed.
        """
        now = self.clock()
        inv = Invocation(
            id=invocation_id if invocation_id is not None else self.new_id(),
            key=key,
            options=options,
            received_at=now,
            payload=payload,
            first_at=now,
        )
        if not options.defer:
            inv.key = key = states.no_defer_key(key, str(inv.id))
        if waiter is not None:
            inv.waiters = [waiter]  # sized 1 (append would make room for 4: 24 bytes each)
        effects: list[Effect] = []
        ks = self.keys.get(key)
        if ks is None:
            ks = self.keys[key] = KeyState(key)
        prev = ks.pending
        landing = rules.land(ks, options, now, pending=prev, running=ks.running,
                             burst=ks.burst_run)
        inv.first_at = ks.max_from
        kind = landing.kind
        if kind == rules.JOIN_RUN:
            assert ks.running is not None
            self._join_run(inv, ks.running, effects)
            return inv, effects
        if kind == rules.JOIN_BURST:
            self._join_run(inv, ks.burst_run, effects)
            return inv, effects
        if kind == rules.JOIN_LEADER:
            assert prev is not None
            _cover(_ids_of(prev), [inv.id])
            prev.waiters.extend(inv.waiters)
            inv.waiters = []
            inv.replaced_by = prev
            inv.joined = prev
            self._transition(inv, SUPERSEDED)
            self._transition(prev, prev.state)
            effects.append(Updated(prev))
            return inv, effects

        inv.leading_edge = landing.lead
        inv.coalesced = landing.coalesced
        inv.due = landing.due
        if prev is not None:
            inv.waiters = prev.waiters + inv.waiters
            prev.waiters = []
            inv.adopted, prev.adopted = prev.adopted, ()
            if landing.collect:
                # The batch moves to the replacement and grows in place: a copy per
                # invocation would make a burst of N cost N squared.
                batch = prev.batch if prev.batch else [prev.payload]
                assert isinstance(batch, list)
                batch.append(inv.payload)
                inv.batch, prev.batch = batch, ()
            covered = _ids_of(prev)  # moves to the replacement, growing in place too
            _cover(covered, [inv.id])
            inv.covered, prev.covered = covered, ()
            prev.replaced_by = inv
            inv.replaced = prev
            self._transition(prev, SUPERSEDED)
        self._set_pending(ks, inv)
        if landing.keeps_place:
            # Deferring in the backlog: take the queued one's place, no new quiet period.
            self._transition(inv, QUEUED)
            effects.append(Updated(inv))
            return inv, effects
        self._transition(inv, PENDING)
        heapq.heappush(self._due, (inv.due, next(self._seq), inv))
        effects.append(Updated(inv))
        self._advance(now, effects)
        return inv, effects

    def restore(
        self,
        invocation_id: int,
        key: str,
        options: Options,
        payload: Any,
        *,
        received_at: float,
        due: float,
        first_at: float,
        coalesced: int,
        leading_edge: bool,
        batch: list[Any] | None = None,
        covered: Covered | None = None,
    ) -> Invocation:
        """Put back a pending invocation from the journal, due when it was due before.

        An overdue one starts at the next :meth:`tick`. The journal holds one row per key.
        """
        inv = Invocation(
            id=invocation_id, key=key, options=options, received_at=received_at,
            payload=payload, due=due, first_at=first_at, coalesced=coalesced,
            leading_edge=leading_edge, batch=batch or (), covered=covered or (),
        )
        ks = self.keys.get(key)
        if ks is None:
            ks = self.keys[key] = KeyState(key)
        rules.restore(ks, options, received_at=received_at, due=due, first_at=first_at,
                      lead=leading_edge)
        self._set_pending(ks, inv)
        self._transition(inv, PENDING)
        heapq.heappush(self._due, (inv.due, next(self._seq), inv))
        return inv

    def tick(self) -> list[Effect]:
        """Do whatever has fallen due by now; call at :meth:`next_deadline`."""
        effects: list[Effect] = []
        self._advance(self.clock(), effects)
        return effects

    def run_exited(self, run_id: int, exit_code: int) -> list[Effect]:
        """The process of a run has ended with ``exit_code`` (already mapped: 128+N for signals)."""
        run = self.runs.pop(run_id)
        now = self.clock()
        run.exit_code = exit_code
        run.finished_at = now
        run.finished_wall = self.wall()
        ks = self.keys[run.key]
        ks.running = None
        replacement = ks.pending
        run.outcome, follow = rules.ended(run.stop_reason, states.EXITED,
                                          replacement is not None, exit_code, run.signalled)
        waiters, run.waiters = run.waiters, []
        if follow:
            assert replacement is not None
            # Its waiters follow the run that replaces it; should that one be cancelled
            # before it starts, they are told this run's real result, never "cancelled".
            replacement.waiters[:0] = waiters
            replacement.adopted = [*replacement.adopted,
                                   *((waiter, run) for waiter in waiters)]
            # The run that replaces it stands for what it stood for, too.
            replacement.covered = run.covered.then(replacement.covered or [replacement.id])
            waiters = []
        run.invocation.state = FINISHED
        self._transition(run, FINISHED)
        effects: list[Effect] = [RunFinished(run, waiters)]
        if ks.pending is not None and ks.pending.state == PENDING and ks.pending.due <= now:
            self._ready(ks, now, effects)  # it fell due while the key was busy
        self._advance(now, effects)
        self._forget_if_idle(ks, now)
        return effects

    def flush(self, key: str) -> tuple[bool, list[Effect]]:
        """Make what is pending for ``key`` due now. Returns whether anything was pending."""
        ks = self.keys.get(key)
        effects: list[Effect] = []
        if ks is None or ks.pending is None:
            return False, effects
        inv = ks.pending
        now = self.clock()
        if inv.state == PENDING and rules.flushed(inv, now):
            self._transition(inv, PENDING)
            heapq.heappush(self._due, (now, next(self._seq), inv))
            effects.append(Updated(inv))
        self._advance(now, effects)
        return True, effects

    def cancel(self, key: str) -> tuple[bool, list[Effect]]:
        """Drop what is pending for ``key``; its waiters are told so. Runs go on."""
        ks = self.keys.get(key)
        effects: list[Effect] = []
        if ks is None or ks.pending is None:
            return False, effects
        inv = ks.pending
        self._set_pending(ks, None)
        rules.cancelled(ks)
        if inv.state == QUEUED:
            self.queue.remove(key)
        waiters, inv.waiters = inv.waiters, []
        self._transition(inv, CANCELLED)
        adopted = dict(inv.adopted)  # waiters of a run it was to replace: their run's result
        inv.adopted = ()
        cancelled = [w for w in waiters if w not in adopted]
        if cancelled or not adopted:
            effects.append(Cancelled(inv, cancelled))
        for waiter, run in adopted.items():
            effects.append(RunFinished(run, [waiter]))
        self._forget_if_idle(ks, self.clock())
        return True, effects

    def unstart(self, run: Run) -> None:
        """Take back a run decided in this turn whose process was never started (its record
        could not be stored): its invocation is pending again, due now, with its waiters,
        so that :meth:`withdraw` can take it back too. The run is forgotten; no observer
        hears of it, as if it had never been."""
        ks = self.keys[run.key]
        inv = run.invocation
        self.runs.pop(run.id, None)
        ks.running = None
        run.state = CANCELLED  # its timers are skipped from now on
        inv.run = None
        inv.waiters, run.waiters = run.waiters + inv.waiters, []
        if ks.burst_run is run:
            ks.burst_run = None
            ks.leader = True
        self._set_pending(ks, inv)
        self._transition(inv, PENDING)
        heapq.heappush(self._due, (inv.due, next(self._seq), inv))

    def withdraw(self, inv: Invocation, waiter: Any = None) -> bool:
        """Take back an invocation the daemon could not store, as if it had never come.

        What it replaced is pending again, as it was (same due time, same waiters but
        ``waiter``); what it joined counts one invocation fewer. Returns False, and changes
        nothing, when it can no longer be taken back: its run has already started.
        """
        ks = self.keys.get(inv.key)
        if inv.joined is not None:
            inv.joined.coalesced -= 1
            if waiter is not None and waiter in inv.joined.waiters:
                inv.joined.waiters.remove(waiter)
            self._transition(inv.joined, inv.joined.state)
            return True
        if ks is None or ks.pending is not inv:
            return False
        others = [w for w in inv.waiters if w is not waiter]
        inv.waiters = []  # nobody waits for it any more: no news of it goes out
        prev = inv.replaced
        was_queued = inv.state == QUEUED
        if was_queued and prev is None:
            self.queue.remove(inv.key)
        self._transition(inv, CANCELLED)
        if prev is None:
            self._set_pending(ks, None)
            ks.leader = False
            self._forget_if_idle(ks, self.clock())
            return True
        prev.replaced_by = None
        prev.waiters = others
        prev.adopted, inv.adopted = inv.adopted, ()
        if inv.batch:
            batch = inv.batch
            assert isinstance(batch, list)
            batch.pop()  # its own payload: the batch grew in place
            prev.batch, inv.batch = (batch if len(batch) > 1 else ()), ()
        if inv.covered:
            covered = inv.covered
            assert isinstance(covered, Covered)
            if covered and covered[-1] == inv.id:
                covered.pop()
            prev.covered, inv.covered = (covered if len(covered) > 1 else ()), ()
        self._set_pending(ks, prev)
        ks.leader = ks.leader and prev.leading_edge
        if was_queued:
            self._transition(prev, QUEUED)  # it keeps the place in the queue
        else:
            self._transition(prev, PENDING)
            heapq.heappush(self._due, (prev.due, next(self._seq), prev))
        return True

    def stop_all(self) -> list[Effect]:
        """Stop every run as ``--on-busy restart`` would (shutdown); pending ones stay pending.

        From here on nothing starts, so what is pending at shutdown is still pending afterwards
        for the journal to keep.
        """
        self.draining = True
        effects: list[Effect] = []
        for run in list(self.runs.values()):
            self._stop(run, states.STOP_SHUTDOWN, effects)
        return effects

    def kill(self, run_id: int, signal: str | None = None) -> list[Effect]:
        """``debounce kill``: stop a running run (TERM, then KILL after its stop timeout), or
        send it ``signal`` once. Its waiters get its real status when it ends."""
        run = self.runs.get(run_id)
        if run is None:
            return []
        effects: list[Effect] = []
        if signal is not None:
            if signal not in run.signalled:
                run.signalled += (signal,)
            effects.append(SignalRun(run, signal))
        else:
            self._stop(run, states.STOP_KILL, effects)
        return effects

    def timed_out(self, run_id: int) -> None:
        """``daemon.runs`` is stopping the run, its ``--timeout`` passed: its outcome will be
        "timeout", and as a run being stopped nothing joins it (unless it was stopping
        already, for another reason, which then stands)."""
        run = self.runs.get(run_id)
        if run is not None and run.stop_reason is None:
            run.stop_reason = states.STOP_TIMEOUT

    def attach(self, target: Invocation | Run, waiter: Any) -> list[Effect]:
        """Add a waiter to an invocation (following replacements) or a run."""
        if isinstance(target, Invocation):
            head = target.head()
            if head.run is None:
                head.waiters.append(waiter)
                return []
            target = head.run
        if target.state == RUNNING:
            target.waiters.append(waiter)
            return [Joined(target, [waiter])]
        return [RunFinished(target, [waiter])]

    def detach(self, waiter: Any) -> None:
        """Forget a waiter that went away (Ctrl-C on a client); what it waited for goes on."""
        for ks in self.keys.values():
            for holder in (ks.pending, ks.running):
                if holder is not None and waiter in holder.waiters:
                    holder.waiters.remove(waiter)
                    return

    # ----------------------------------------------------------------- queries
    def standing_for(self, inv_id: int) -> Invocation | Run | None:
        """What stands for invocation ``inv_id`` now: the pending invocation it was coalesced
        into, else the run executing for it (``None``: neither, it has ended or is unknown)."""
        for ks in self.keys.values():
            pending = ks.pending
            if pending is not None and (pending.id == inv_id or inv_id in pending.covered):
                return pending
        for run in self.runs.values():
            if run.invocation.id == inv_id or inv_id in run.covered:
                return run
        return None

    def next_deadline(self) -> float | None:
        """When :meth:`tick` must run next, or ``None`` when nothing is timed."""
        self._prune()
        # The ends of bursts only let idle keys be forgotten: they wake nobody up, and are
        # seen to at the next event.
        return self._due[0][0] if self._due else None

    def is_idle(self) -> bool:
        """Nothing pending and nothing running."""
        return not self.runs and not self.pending_count

    def _set_pending(self, ks: KeyState, inv: Invocation | None) -> None:
        """The one place a key's pending invocation changes, so the count stays true."""
        self.pending_count += (inv is not None) - (ks.pending is not None)
        ks.pending = inv


    # ----------------------------------------------------------------- internals
    def _transition(self, obj: Invocation | Run, state: str) -> None:
        obj.state = state
        if self.observer is not None:
            self.observer(state, obj)

    def _join_run(self, inv: Invocation, run: Run, effects: list[Effect]) -> None:
        """``inv`` joins ``run`` (the rules counted it there already)."""
        _cover(run.covered, inv.covered or [inv.id])
        inv.covered = ()
        inv.joined = run
        self._transition(run, run.state)
        inv.run = run
        waiters, inv.waiters = inv.waiters, []
        if run.state == RUNNING:
            self._transition(inv, RUNNING)
            run.waiters.extend(waiters)
            if waiters:
                effects.append(Joined(run, waiters))
        else:
            self._transition(inv, FINISHED)
            effects.append(RunFinished(run, waiters, joined=True))

    def _advance(self, now: float, effects: list[Effect]) -> None:
        # Pending invocations whose quiet period has passed, in the order they fell due.
        left = self.due_per_step
        while self._due and self._due[0][0] <= now:
            due, _, inv = self._due[0]
            if inv.state == PENDING and inv.due == due:
                if left is not None:
                    if left <= 0:
                        break  # the next step decides the rest (see due_per_step)
                    left -= 1
                heapq.heappop(self._due)
                self._ready(self.keys[inv.key], now, effects)
            else:  # superseded, rescheduled or gone since this entry was pushed
                heapq.heappop(self._due)
        while self._bursts and self._bursts[0][0] <= now:
            _, _, key = heapq.heappop(self._bursts)
            ks = self.keys.get(key)
            if ks is not None:
                self._forget_if_idle(ks, now)
        self._fill_slots(now, effects)

    def _ready(self, ks: KeyState, now: float, effects: list[Effect]) -> None:
        """The pending invocation of ``ks`` is due: start it, queue it, or wait for its key."""
        inv = ks.pending
        assert inv is not None
        slot_free = self._slot_free() and not self.queue and not self.draining
        decision = rules.fall_due(ks, inv, ks.running, slot_free)
        if decision == rules.START:
            self._start(ks, now, effects)
        elif decision == rules.QUEUE:
            self._transition(inv, QUEUED)
            self.queue.append(ks.key)
            effects.append(Updated(inv))
        elif decision == rules.RESTART:
            # Its waiters follow the run that replaces it, once it has ended (run_exited).
            assert ks.running is not None
            self._stop(ks.running, states.STOP_RESTART, effects)
            effects.append(Updated(inv))
        elif decision == rules.SIGNAL:
            # A server that reloads on a signal: tell it, and this invocation is that run.
            running = ks.running
            assert running is not None
            effects.append(SignalRun(running, inv.options.signal))
            self._set_pending(ks, None)
            self._join_run(inv, running, effects)
        # WAIT: it starts when the running one has ended (run_exited calls back here)

    def _slot_free(self) -> bool:
        return self.jobs is None or len(self.runs) + self.borrowed < self.jobs

    def borrow(self) -> bool:
        """Take a job slot for a run this scheduler does not manage (a fleet run starting on
        this host), if one is free and no local invocation queues for it."""
        if self.draining or self.queue or not self._slot_free():
            return False
        if self.jobs is not None:
            self.borrowed += 1
        return True

    def give_back(self) -> list[Effect]:
        """A borrowed slot is free again: the queue's first invocation may start."""
        effects: list[Effect] = []
        if self.jobs is not None and self.borrowed:
            self.borrowed -= 1
            self._fill_slots(self.clock(), effects)
        return effects

    def _fill_slots(self, now: float, effects: list[Effect]) -> None:
        while self.queue and self._slot_free() and not self.draining:
            ks = self.keys[self.queue.popleft()]
            self._start(ks, now, effects)

    def _start(self, ks: KeyState, now: float, effects: list[Effect]) -> None:
        inv = ks.pending
        assert inv is not None and ks.running is None
        self._set_pending(ks, None)
        run = Run(
            id=next(self._run_ids),
            key=ks.key,
            invocation=inv,
            coalesced=inv.coalesced,
            started_at=now,
            started_wall=self.wall(),
            due_wall=self.wall() - (now - inv.due),
            waiters=inv.waiters,
            covered=_ids_of(inv),
        )
        inv.covered = ()
        inv.waiters = []
        inv.adopted = ()  # they follow this run now
        inv.run = run
        rules.started(ks, inv, now)
        ks.burst_run = run
        ks.running = run
        self.runs[run.id] = run
        self._transition(inv, RUNNING)
        self._transition(run, RUNNING)
        effects.append(StartRun(run))

    def _stop(self, run: Run, reason: str, effects: list[Effect]) -> None:
        if run.stop_reason is not None:
            return
        run.stop_reason = reason
        effects.append(SignalRun(run, "TERM", stop=True))

    def _forget_if_idle(self, ks: KeyState, now: float) -> None:
        """Drop an idle key, once the rules need nothing of it (until then it remembers when
        its burst ends, where max-wait counts from and when a leading run may start); an
        idle key that must be remembered is looked at again then."""
        if ks.pending is not None or ks.running is not None or self.keys.get(ks.key) is not ks:
            return
        until = rules.remembered_until(ks)
        if now >= until:
            del self.keys[ks.key]
        else:
            heapq.heappush(self._bursts, (until, next(self._seq), ks.key))

    def _prune(self) -> None:
        """Drop stale heap tops so next_deadline never wakes the daemon for nothing."""
        while self._due and (
            self._due[0][2].state != PENDING or self._due[0][2].due != self._due[0][0]
        ):
            heapq.heappop(self._due)
        while self._bursts:
            when, _, key = self._bursts[0]
            ks = self.keys.get(key)
            if (ks is not None and rules.remembered_until(ks) == when and ks.pending is None
                    and ks.running is None):
                break
            heapq.heappop(self._bursts)
