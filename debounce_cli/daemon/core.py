"""The daemon's core: the scheduler, the journal, group commit, and carrying out effects.

Durability follows one rule: change the scheduler, commit the journal, then act. Effects
(starting a process, answering a client) wait in an outbox until the end of the loop's turn,
when one commit covers every change made in that turn (group commit). A submitter is told its
invocation was accepted only after the commit that holds it, and a process starts only after
the commit that records its run, so after a crash the journal never promises less than the
clients were told and never forgets a run that started.

After each turn the one timer is set to the scheduler's next deadline, so an idle daemon
sleeps in ``epoll_wait`` with nothing to do.

The core reads time only from its injected clock and schedules callbacks only through the
``loop`` it is given (asyncio's loop, or a fake one in tests), so every rule here can be
tested without sockets, processes or sleeping.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from debounce_cli import protocol
from debounce_cli.clock import Clock
from debounce_cli.daemon import records
from debounce_cli.daemon.config import Config
from debounce_cli.daemon.jobs import Job, RunSpec, Shared
from debounce_cli.daemon.metrics import Metrics
from debounce_cli.daemon.recent import RecentRuns
from debounce_cli.daemon.waiters import RunWaiters, Submitter, Waiter, unique
from debounce_cli.journal import Journal, JournalError
from debounce_cli.logfile import make_empty
from debounce_cli.protocol import RunRecord
from debounce_cli.scheduler import (
    Cancelled,
    Effect,
    Invocation,
    Joined,
    Options,
    Run,
    RunFinished,
    Scheduler,
    SignalRun,
    StartRun,
    Updated,
)
from debounce_cli.states import REFUSED, RUNNING

#: Seconds between attempts to commit after a failed commit (a full disk).
RETRY = 1.0
#: Due invocations decided per step (``Scheduler.due_per_step``). A burst of a thousand keys
#: falling due at once used to be decided, committed and handed to the runs' room whole before
#: its first run could start (31-47 ms after the due time in a burst of 1,000; 8-12 ms in steps
#: of this many): the first runs start after a commit of their own while the next step waits
#: for the following turn of the loop.
DUE_PER_TURN = 64
#: Seconds after its start that a run still executing has its pid noted in the journal, when
#: a started ledger speaks for its start (see Core.run_started).
NOTE_AFTER = 0.1
#: Group commit: with at least this many runs executing, the commit that records a run's end
#: waits up to COMMIT_DELAY seconds for more ends to hold (see Core.apply). Their waiters hear
#: of the end that much later; a burst of a thousand short runs commits a fraction as often.
COMMIT_SIBLINGS = 16
COMMIT_DELAY = 0.003


class Handle(Protocol):
    def cancel(self) -> None: ...


class TimerHandle(Handle, Protocol):
    def when(self) -> float: ...


class Loop(Protocol):
    """The part of asyncio's event loop the core uses (its time base is ``clock.monotonic``)."""

    def call_soon(self, callback: Callable[[], None]) -> Handle: ...

    def call_at(self, when: float, callback: Callable[[], None]) -> TimerHandle: ...


class RunsPort(Protocol):
    """What the core asks of the runs' room (``daemon.runs.Runs``)."""

    def start(self, spec: RunSpec) -> None: ...

    def stop(self, run_id: int, why: str) -> None: ...

    def signal(self, run_id: int, name: str) -> None: ...

    def output_so_far(self, run_id: int, path: str | None) -> Iterable[tuple[int, bytes]]: ...

    def log_of(self, run_id: int) -> str | None: ...

    def retain(self) -> None: ...

    def stop_spawning(self) -> None: ...

    async def wait_all(self) -> None: ...


@dataclass(eq=False, slots=True)
class Ack:
    """An answer owed to a submitter once the turn's commit is done."""

    invocation: Invocation
    submitter: Submitter | None
    waiter: Any  # taken off what the invocation joined if the commit fails


class Core:
    """One daemon's state and the rule that ties the scheduler, the journal and effects."""

    def __init__(
        self,
        config: Config,
        clock: Clock,
        loop: Loop,
        scheduler: Scheduler,
        journal: Journal | None,
        runs: RunsPort | None = None,
        log_dir: str = "",
        ledger: str | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.loop = loop
        self.scheduler = scheduler
        self.journal = journal
        self.ledger = ledger
        scheduler.due_per_step = DUE_PER_TURN
        if journal is not None:
            scheduler.observer = journal.observe
        if runs is None:
            from debounce_cli.daemon.runs import Runs

            runs = Runs(config, loop, journal, log_dir, ledger, events=self, clock=clock)
        self.runs = runs
        self.recent = RecentRuns()
        self.metrics = Metrics()  # `debounce metrics`: bumped below as things happen
        self.shared = Shared()
        self.outbox: list[Effect] = []
        self.acks: list[Ack] = []
        self.flush_handle: Handle | None = None
        self.flush_later = False  # flush_handle is a lazy commit's timer (see apply)
        self.timer: TimerHandle | None = None
        self.retention_due = False
        #: Runs decided but not yet recorded (the commit failed): they start once one succeeds.
        self.held: list[StartRun] = []
        self.retry: TimerHandle | None = None
        #: Runs started whose pid is not noted in the journal yet (see run_started).
        self.unnoted: list[Run] = []
        self.note_timer: TimerHandle | None = None
        #: Called after every turn's effects, for the server's idle check.
        self.settled: Callable[[], None] = lambda: None
        #: Called when a local run ends: a fleet run waiting for a job slot may take it.
        self.slot_freed: Callable[[], None] = lambda: None
        #: Told of every waiter that went away (the fleet keeps waiters of its own).
        self.detached: list[Callable[[Waiter], None]] = []

    # ------------------------------------------------------------------ submissions
    def refusal(self) -> str | None:
        """Why new submissions cannot be accepted now, if they cannot."""
        if self.journal is None:
            return None
        why = self.journal.refusal()
        return None if why is None else f"cannot store new invocations: {why}"

    def submit(self, key: str, options: Options, job: Job, waiter: Any,
               submitter: Submitter | None) -> Invocation:
        """Hand an invocation to the scheduler; its answer goes out after the commit."""
        inv, effects = self.scheduler.submit(key, options, job, waiter)
        self.metrics.invocation(key, inv.replaced is not None or inv.joined is not None)
        self.acks.append(Ack(inv, submitter, waiter))
        self.apply(effects)
        return inv

    def flush(self, key: str) -> bool:
        found, effects = self.scheduler.flush(key)
        self.apply(effects)
        return found

    def cancel(self, key: str) -> bool:
        ks = self.scheduler.keys.get(key)
        inv = ks.pending if ks is not None else None
        ids = list(inv.covered or [inv.id]) if inv is not None else []
        found, effects = self.scheduler.cancel(key)
        if found:
            self.recent.cancel(key, ids)
            if self.journal is not None:
                self.journal.cancelled(key, ids)
        self.apply(effects)
        return found

    def kill(self, run_id: int, signal: str | None) -> None:
        self.apply(self.scheduler.kill(run_id, signal))

    def attach(self, target: Invocation | Run, waiter: Waiter) -> None:
        self.apply(self.scheduler.attach(target, waiter))

    def detach(self, waiter: Waiter) -> None:
        self.scheduler.detach(waiter)
        for forget in self.detached:
            forget(waiter)

    def stop_runs(self) -> None:
        """Shutdown: stop every run; what is pending stays pending (and in the journal).

        Nothing starts after the stop was asked for: runs decided in this very turn are
        taken back (pending again, as if never decided), and runs recorded but not yet
        spawned stay recorded and unspawned, which the next daemon puts back as pending
        (``startup``: a run without its line in the started ledger never started)."""
        kept = []
        for effect in self.outbox:
            if isinstance(effect, StartRun) and effect.run.state == RUNNING:
                self.scheduler.unstart(effect.run)
                if self.journal is not None:
                    self.journal.forget_unwritten(effect.run)
            else:
                kept.append(effect)
        self.outbox = kept
        self.runs.stop_spawning()
        self.apply(self.scheduler.stop_all())

    def busy(self) -> bool:
        return bool(self.outbox or self.acks or not self.scheduler.is_idle())

    # ------------------------------------------------------------------ queries
    def find_key(self, key: str) -> Invocation | Run | None:
        """What ``debounce wait --key KEY`` follows: pending, else running, else the last
        finished run this daemon remembers."""
        ks = self.scheduler.keys.get(key)
        if ks is not None and (ks.pending or ks.running):
            return ks.pending or ks.running
        ended = [run for run in self._ending() if run.key == key]
        return ended[-1] if ended else self.recent.last_by_key.get(key)

    def find_run(self, run_id: int) -> Run | None:
        found = self.scheduler.runs.get(run_id) or self.recent.by_id.get(run_id)
        return found or next((run for run in self._ending() if run.id == run_id), None)

    def _ending(self) -> list[Run]:
        """Runs that have ended in this turn, whose end the next commit records: the
        scheduler has let them go and the memory of finished runs has them only once that
        commit is done (a ``wait`` read in between found nothing, and exited 117)."""
        return [effect.run for effect in self.outbox if isinstance(effect, RunFinished)
                and not effect.joined]

    def find_invocation(self, inv_id: int) -> Invocation | Run | RunRecord | str | None:
        """What stands for invocation ``inv_id``: the pending invocation it was coalesced
        into, else the run executing for it, else the latest finished run that covered it
        (in memory or in the journal), else the key it was cancelled from (a ``str``)."""
        found = self.scheduler.standing_for(inv_id) or self.recent.covering(inv_id) or next(
            (run for run in self._ending()
             if run.invocation.id == inv_id or inv_id in run.covered), None)
        if found is not None:
            return found
        if self.journal is not None:
            record = self.journal.covering(inv_id)
            if record is not None:
                return record
        key = self.recent.cancelled.get(inv_id)
        if key is None and self.journal is not None:
            key = self.journal.was_cancelled(inv_id)
        return key

    def stored_run(self, key: str | None = None, run_id: int | None = None) -> RunRecord | None:
        """The journal's latest finished run of ``key``, or its run ``run_id``."""
        if self.journal is None:
            return None
        if key is not None:
            return self.journal.finished_run(key=key)
        return self.journal.finished_run(run_id=run_id)

    def knows_key(self, key: str) -> bool:
        return self.find_key(key) is not None or self.stored_run(key=key) is not None

    def knows_run(self, run_id: int) -> bool:
        return self.find_run(run_id) is not None or self.stored_run(run_id=run_id) is not None

    def status(self) -> list[protocol.KeyStatus]:
        now = self.clock.monotonic()
        rows = [
            records.key_status(ks, self.recent.last_by_key.get(ks.key), now)
            for ks in self.scheduler.keys.values()
            if ks.pending is not None or ks.running is not None
        ]
        rows.sort(key=lambda row: row.key)
        return rows

    def history(self, key: str | None, limit: int) -> list[RunRecord]:
        if self.journal is not None:
            return self.journal.history(key, limit)
        runs = [r for r in reversed(self.recent.by_id.values()) if key in (None, r.key)]
        return [records.run_record(r) for r in runs[:limit]]

    # ------------------------------------------------------------------ from the runs
    def run_started(self, spec: RunSpec) -> None:
        """Its process exists now: its pid and log go into the journal.

        Without a started ledger the pid is the next daemon's only evidence that the run
        started: it is committed at the end of this turn. With one, the ledger's line (written
        before the exec) is that evidence, and the next daemon finds what is left of the run
        by the marks in its processes' environments, not by pid: a run still executing
        ``NOTE_AFTER`` seconds from now is noted then (so the history of a run lost in a crash
        names its pid and log), and one that has ended by then is written once, at its end.
        In a burst of short runs that is one write of each run fewer."""
        run = self.scheduler.runs.get(spec.id)
        if self.journal is None or run is None:
            return
        if self.ledger is None:
            self.journal.note_run(run)
            self.apply([])
            return
        self.unnoted.append(run)
        if self.note_timer is None:
            self.note_timer = self.loop.call_at(self.clock.monotonic() + NOTE_AFTER,
                                                self._note_started)

    def _note_started(self) -> None:
        """Runs started since the last call and executing still: their pid and log are
        committed now."""
        self.note_timer = None
        executing = [run for run in self.unnoted if run.state == RUNNING]
        self.unnoted = []
        if executing and self.journal is not None:
            for run in executing:
                self.journal.note_run(run)
            self.apply([], lazy=True)

    def run_timed_out(self, run_id: int) -> None:
        self.scheduler.timed_out(run_id)  # (the runs' room stops it)

    def run_exited(self, run_id: int, code: int) -> None:
        self.retention_due = True  # after the commit that records this run
        effects = self.scheduler.run_exited(run_id, code)
        # Among many runs executing, the commit that records an end waits a moment for the
        # next ends (group commit, as PostgreSQL's commit_delay with commit_siblings), unless
        # a run is to start with it.
        self.apply(effects, lazy=len(self.scheduler.runs) >= COMMIT_SIBLINGS and not any(
            type(effect) is StartRun for effect in effects))
        self.slot_freed()

    # ------------------------------------------------------------------ effects and commits
    def apply(self, effects: list[Effect], lazy: bool = False) -> None:
        """Queue effects until the end of this turn of the loop, when the commit is done.

        ``lazy``: nothing in them is in a hurry (the ends of runs among many that execute):
        with a journal, the commit may wait ``COMMIT_DELAY`` for more to hold, unless
        something that is in a hurry comes meanwhile."""
        self.outbox.extend(effects)
        handle = self.flush_handle
        if handle is None:
            if lazy and self.journal is not None:
                self.flush_handle = self.loop.call_at(self.clock.monotonic() + COMMIT_DELAY,
                                                      self._flush)
                self.flush_later = True
            else:
                self.flush_handle = self.loop.call_soon(
                    self._flush if self.journal is None else self._gather)
        elif self.flush_later and not lazy:
            handle.cancel()
            self.flush_later = False
            self.flush_handle = self.loop.call_soon(self._gather)

    def _gather(self) -> None:
        """With a journal, the commit waits one more pass of the loop: the requests that
        arrived meanwhile (asyncio polls again before running this) are read first, and one
        commit holds them all. Eight clients submitting in turn get one commit per round
        rather than one per two or three of them; a commit costs as much as the few
        submissions it holds (bench: "CPU per submission")."""
        self.flush_handle = self.loop.call_soon(self._flush)

    def flush_now(self) -> None:
        """Do at once what waits for the end of the turn (shutdown)."""
        if self.flush_handle is not None:
            self.flush_handle.cancel()
            self._flush()

    def _flush(self) -> None:
        """Commit what changed in this turn, then answer submitters and carry out effects.

        Only what a commit covers is acted on. When the commit fails (a full disk), the
        submissions of the turn that can be taken back are, and refused; those that cannot
        (their run is already decided) wait for their answer, and runs wait to start, until
        a commit covers them: it is retried every ``RETRY`` seconds.
        """
        self.flush_handle = None
        self.flush_later = False
        failure = None
        if self.journal is not None:
            began = time.perf_counter()  # real time taken, whatever the injected clock says
            try:
                self.journal.commit(self.scheduler,
                                    self.clock.wall() - self.clock.monotonic())
            except JournalError as exc:
                failure = str(exc)
            self.metrics.committed(time.perf_counter() - began, failure is None)
        # Answering a client may read its next request, whose effects wait for the next commit.
        acks, self.acks = self.acks, []
        effects, self.outbox = self.outbox, []
        now = self.clock.monotonic()
        if failure is None:
            if self.held and not self.scheduler.draining:
                effects = [*self.held, *effects]  # recorded now: they may start
                self.held = []
            for ack in acks:
                self._answer(ack, None, now)
            if self.retention_due:
                self.retention_due = False
                self.runs.retain()
        else:
            # A run that a refused submission started in this very turn is taken back first,
            # so that the submission can be (a process never starts unrecorded).
            submitted = {id(ack.invocation) for ack in acks}
            for effect in effects:
                if isinstance(effect, StartRun) and id(effect.run.invocation) in submitted:
                    self.scheduler.unstart(effect.run)
                    if self.journal is not None:
                        self.journal.forget_unwritten(effect.run)
            effects = [e for e in effects
                       if not (isinstance(e, StartRun) and e.run.state != RUNNING)]
            refused = set()
            for ack in reversed(acks):  # newest first, so each one's predecessor is back
                if self.scheduler.withdraw(ack.invocation, ack.waiter):
                    refused.add(id(ack))
            for ack in acks:
                if id(ack) in refused:
                    self._answer(ack, failure, now)
                else:
                    self.acks.append(ack)  # answered once a commit holds it
            self.held.extend(e for e in effects if isinstance(e, StartRun))
            effects = [e for e in effects if not isinstance(e, StartRun)]
            if (self.acks or self.held) and self.retry is None:
                self.retry = self.loop.call_at(now + RETRY, self._retry)
        for effect in effects:
            self._carry_out(effect)
        self._set_timer()
        self.settled()

    def _retry(self) -> None:
        self.retry = None
        self.apply([])

    def _answer(self, ack: Ack, failure: str | None, now: float) -> None:
        """Tell a submitter: accepted (a commit holds it), or refused (``failure``) and
        already taken back."""
        inv = ack.invocation
        inv.replaced = inv.joined = None  # only needed to take it back; let the chain go
        if ack.submitter is None:
            return
        if failure is None:
            ack.submitter.accepted(inv, now)
        else:
            ack.submitter.answered(protocol.Error(
                message=f"cannot store the invocation: {failure}", code=REFUSED))

    def _carry_out(self, effect: Effect) -> None:
        if type(effect) is Updated:  # first: every submission makes one
            if effect.invocation.waiters:  # --no-wait submissions have nobody to tell
                pending = records.pending_msg(effect.invocation, self.clock.monotonic())
                line = protocol.encode(pending)
                for waiter in unique(effect.invocation.waiters):
                    waiter.raw(line)
        elif isinstance(effect, StartRun):
            run, inv = effect.run, effect.run.invocation
            self.metrics.run_started(run.key, self.clock.wall() - run.due_wall)
            self.runs.start(RunSpec(run.id, run.key, records.job_of(inv), inv.options,
                                    RunWaiters(run), run.coalesced, inv.batch))
        elif isinstance(effect, SignalRun) and effect.stop and effect.run.stop_reason:
            self.runs.stop(effect.run.id, effect.run.stop_reason)  # TERM, KILL later
        elif isinstance(effect, SignalRun):
            self.runs.signal(effect.run.id, effect.signal)
        elif isinstance(effect, RunFinished):
            run = effect.run
            self.recent.remember(run)
            self.metrics.run_finished(
                run.key, run.outcome or "unknown",
                None if run.finished_at is None else run.finished_at - run.started_at,
                failed=run.exit_code != 0)
            waiters = unique(effect.waiters)
            if not waiters:
                return  # (--no-wait runs have nobody to tell: no message to build)
            msg = records.finished_msg(run)
            if effect.joined:  # they joined it after it ended: its output first, from its log
                started = protocol.encode(records.started_msg(run))
                log = records.job_of(run.invocation).log_path
                if log is not None:
                    make_empty(log)  # a run that wrote nothing left no file (daemon.runs)
                for waiter in waiters:
                    waiter.start(run.id, started, log)
                    waiter.replay(lambda: self.runs.output_so_far(run.id, log))
            for waiter in waiters:
                waiter.finish(msg)
        elif isinstance(effect, Joined):
            # Output that came between joining and now was not sent live (the waiter did not
            # follow the run yet): the replay from the log covers it, once.
            run = effect.run
            joining = [w for w in unique(effect.waiters) if not w.follows(run.id)]
            if joining:
                started = protocol.encode(records.started_msg(run))
                log = self.runs.log_of(run.id)
                path = records.job_of(run.invocation).log_path
                for waiter in joining:
                    waiter.start(run.id, started, log)
                    waiter.replay(lambda: self.runs.output_so_far(run.id, path))
        elif isinstance(effect, Cancelled):
            cancelled = protocol.Cancelled(key=effect.invocation.key)
            for waiter in unique(effect.waiters):
                waiter.finish(cancelled)

    def _set_timer(self) -> None:
        """Set the one timer for the scheduler's next deadline."""
        deadline = self.scheduler.next_deadline()
        timer = self.timer
        if timer is not None and deadline is not None and timer.when() == deadline:
            return  # most submissions leave the earliest deadline where it was
        if timer is not None:
            timer.cancel()
            self.timer = None
        if deadline is not None:
            self.timer = self.loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        self.apply(self.scheduler.tick())

    def close(self) -> None:
        for handle in (self.timer, self.retry, self.note_timer):
            if handle is not None:
                handle.cancel()
        self.timer = self.retry = self.note_timer = None
        if self.journal is not None:
            try:  # the intake folded into its table: what an older daemon would read too
                self.journal.commit(self.scheduler, self.clock.wall() - self.clock.monotonic(),
                                    fold=True)
            except JournalError:
                pass  # (the next daemon reads the intake as it is)
            self.journal.close()


def run_id_of(target: str) -> int | None:
    """``target`` as a run id, if it can be one (digits, and small enough to be stored)."""
    if target.isascii() and target.isdigit() and len(target) <= 18:
        return int(target)
    return None
