"""Unit tests of the daemon's core and request handlers, with no sockets, processes or sleeping.

Time is a FakeClock that moves only when a test moves it; the event loop is a fake whose
callbacks run only when the test says so (``run_soon`` ends the current turn, ``advance_to``
fires timers in time order); runs are recorded instead of spawned, and a test ends one with
``core.run_exited``. A fake client keeps every message it was sent, decoded from the wire
format, so each test checks what a user of ``debounce`` would see, at exact times.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from debounce_cli import protocol, states
from debounce_cli.clock import FakeClock
from debounce_cli.daemon import handlers, records
from debounce_cli.daemon.config import Config
from debounce_cli.daemon.core import (
    COMMIT_DELAY,
    COMMIT_SIBLINGS,
    DUE_PER_TURN,
    NOTE_AFTER,
    Core,
)
from debounce_cli.daemon.handlers import Context
from debounce_cli.daemon.jobs import RunSpec
from debounce_cli.journal import JournalError
from debounce_cli.protocol import Accepted, Cancelled, Done, Error, Finished, Pending, Started
from debounce_cli.scheduler import Invocation, Run, Scheduler

WALL = 1_800_000_000.0  # FakeClock's wall offset: wall time is WALL + monotonic time


class FakeHandle:
    def __init__(self, when: float | None, callback: Callable[[], None]) -> None:
        self._when, self.callback, self.cancelled = when, callback, False

    def cancel(self) -> None:
        self.cancelled = True

    def when(self) -> float:
        return self._when or 0.0  # only call_at handles are asked


class FakeLoop:
    """``call_soon``/``call_at`` that run only when the test says so."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.soon: list[FakeHandle] = []
        self.timers: list[FakeHandle] = []  # call_at handles not fired yet

    def call_soon(self, callback: Callable[[], None]) -> FakeHandle:
        self.soon.append(handle := FakeHandle(None, callback))
        return handle

    def call_at(self, when: float, callback: Callable[[], None]) -> FakeHandle:
        self.timers.append(handle := FakeHandle(when, callback))
        return handle

    def live_timers(self) -> list[float]:
        return sorted(h.when() for h in self.timers if not h.cancelled)

    def run_soon(self) -> None:
        """End the turn: run call_soon callbacks until none are left."""
        while self.soon:
            handle = self.soon.pop(0)
            if not handle.cancelled:
                handle.callback()

    def advance_to(self, t: float) -> None:
        """Move the clock to ``t`` timer by timer, ending the turn after each."""
        self.run_soon()
        while True:
            due = [h for h in self.timers if not h.cancelled and h.when() <= t]
            if not due:
                break
            handle = min(due, key=FakeHandle.when)
            self.timers.remove(handle)
            self.clock.set(max(self.clock.now, handle.when()))
            handle.callback()
            self.run_soon()
        self.clock.set(t)
        self.run_soon()


class FakeRuns:
    """Records starts (as the scheduler's runs they stand for), stops and signals; tells the
    run's audience it started, as ``runs.Runs.start`` does."""

    def __init__(self) -> None:
        self.scheduler: Scheduler | None = None  # where a started spec's run is looked up
        self.started: list[Run] = []
        self.signals: list[tuple[int, str]] = []
        self.stops: list[tuple[int, str]] = []
        self.retained = 0
        self.spawn = True  # False: runs wait for their process (no pid), as behind the spawner

    def start(self, spec: RunSpec) -> None:
        assert self.scheduler is not None
        self.started.append(self.scheduler.runs[spec.id])
        if self.spawn:
            spec.job.pid = 10_000 + spec.id  # as runs.Runs sets it
        spec.audience.started(None)

    def stop(self, run_id: int, why: str) -> None:
        self.stops.append((run_id, why))

    def signal(self, run_id: int, name: str) -> None:
        self.signals.append((run_id, name))

    def output_so_far(self, run_id: int, path: str | None) -> list[tuple[int, bytes]]:
        return []

    def log_of(self, run_id: int) -> str | None:
        return None

    def retain(self) -> None:
        self.retained += 1

    def stop_spawning(self) -> None:
        self.spawning = False  # nothing more is spawned

    async def wait_all(self) -> None:
        pass


class FakeClient:
    """A connection that keeps every message it was sent, as the client would decode it."""

    def __init__(self) -> None:
        self.got: list[protocol.Message] = []
        self.owed_wait: bool | None = None  # owe(wait=...) was called with this
        self.waiting_acked: bool | None = None
        self.run_id: int | None = None
        self.closed = 0

    def owe(self, wait: bool) -> None:
        self.owed_wait = wait

    def wait_for_runs(self, acked: bool) -> None:
        self.waiting_acked = acked

    def send(self, msg: protocol.Message) -> None:
        self.raw(protocol.encode(msg))

    answered = finish = send  # the submission's answer; a run's Finished or Cancelled

    def accepted(self, inv: Invocation, now: float) -> None:
        self.raw(records.accepted_line(inv, now))  # the bytes a connection sends

    def close(self) -> None:
        self.closed += 1

    def raw(self, line: bytes) -> None:
        self.got.append(protocol.decode(line, protocol.REPLIES))

    def follows(self, run_id: int) -> bool:
        return self.run_id == run_id

    def start(self, run_id: int, line: bytes, log: str | None) -> None:
        self.run_id = run_id
        self.raw(line)

    def replay(self, so_far: Callable[[], Any]) -> None:
        for fd, data in so_far():
            self.output(fd, data, records.output_line(fd, data), None)

    def output(self, fd: int, data: bytes, line: bytes, end: int | None) -> None:
        self.raw(line)

    def kinds(self) -> list[type[protocol.Message]]:
        return [type(m) for m in self.got]

    def last(self) -> Any:  # Any: tests read the fields of whichever message came last
        return self.got[-1]


class StubJournal:
    """A journal whose commit fails while ``failing`` is set."""

    def __init__(self, failing: bool = False) -> None:
        self.failing = failing

    def observe(self, *args: Any) -> None:
        pass

    note_run = close = forget_unwritten = observe

    def commit(self, scheduler: Scheduler, wall_offset: float) -> None:
        if self.failing:
            raise JournalError("disk full")

    def finished_run(self, **where: Any) -> None:
        return None

    refusal = finished_run

    def history(self, key: str | None, limit: int) -> list[protocol.RunRecord]:
        return []


@dataclass
class Daemon:
    clock: FakeClock
    loop: FakeLoop
    core: Core
    runs: FakeRuns
    ctx: Context
    shutdowns: list[int]  # one entry per ctx.shutdown() call

    def run(self, argv: list[str] | None = None, key: str = "k", wait: bool = True,
            **options: Any) -> tuple[FakeClient, Any]:
        """A RunRequest from a new client (delay 1 unless told); the turn is not ended."""
        client = FakeClient()
        req = protocol.RunRequest(argv=argv or ["make"], cwd="/", env={}, key=key,
                                  options=options or {"delay": 1.0}, wait=wait)
        return client, handlers.handle_run(self.ctx, client, req)

    def ask(self, request: protocol.Message, client: FakeClient | None = None) -> Any:
        """The handler's reply to ``request`` (through the daemon's table of handlers)."""
        return handlers.HANDLERS[type(request)](self.ctx, client or FakeClient(), request)

    def status(self) -> list[protocol.KeyStatus]:
        reply = self.ask(protocol.StatusRequest())
        assert isinstance(reply, protocol.StatusReply)
        return reply.keys


def make_daemon(journal: Any = None, ledger: str | None = None) -> Daemon:
    clock = FakeClock(now=0.0, wall_offset=WALL)
    loop, runs, shutdowns = FakeLoop(clock), FakeRuns(), []
    runs.scheduler = Scheduler(clock.monotonic, wall=clock.wall)
    core = Core(Config(socket="/nonexistent/daemon.sock"), clock, loop, runs.scheduler,
                journal, runs=runs, ledger=ledger)
    ctx = Context(core=core, jobs=None, shutdown=lambda: shutdowns.append(1))
    return Daemon(clock, loop, core, runs, ctx, shutdowns)


@pytest.fixture
def d() -> Daemon:
    return make_daemon()


def is_error(reply: Any, code: str) -> bool:
    return isinstance(reply, Error) and reply.code == code


def finished(run_id: int, inv: int, argv: list[str], code: int, coalesced: int, start: float,
             end: float) -> Finished:
    """What a waiter of key "k" is told at the end (times on the fake clock)."""
    return Finished(run_id=run_id, invocation=inv, key="k", argv=argv, exit_code=code,
                    coalesced=coalesced, started_at=WALL + start, finished_at=WALL + end,
                    outcome=states.EXITED)


def test_waiting_run_is_accepted_after_the_turn_then_runs_at_its_due_time(d: Daemon) -> None:
    client, reply = d.run(["make", "all"])
    assert reply is None and client.owed_wait is True
    assert client.got == []  # the answer waits for the end of the turn (the commit)
    d.loop.run_soon()
    assert client.got[0] == Accepted(id=1, key="k", state=states.PENDING, due_in=1.0,
                                     coalesced=1)
    assert d.loop.live_timers() == [1.0]
    d.loop.advance_to(0.999)
    assert d.runs.started == []
    d.loop.advance_to(1.0)
    assert [(r.key, r.started_at) for r in d.runs.started] == [("k", 1.0)]
    assert d.loop.live_timers() == []  # nothing else is timed
    d.loop.advance_to(3.5)
    d.core.run_exited(1, 3)
    d.loop.run_soon()
    assert client.kinds()[-2:] == [Started, Finished]
    assert client.last() == finished(1, 1, ["make", "all"], 3, 1, 1.0, 3.5)
    assert len(d.runs.started) == 1 and d.runs.retained == 1 and not d.core.busy()


def test_three_waiters_of_one_key_share_one_run_with_the_last_argv(d: Daemon) -> None:
    clients = []
    for t, n in ((0.0, 1), (0.5, 2), (0.9, 3)):
        d.loop.advance_to(t)
        client, _ = d.run(["echo", str(n)])
        d.loop.run_soon()
        acc = client.got[0]
        assert (type(acc), acc.id, acc.state, acc.coalesced) == (Accepted, n, states.PENDING, n)
        assert acc.due_in == pytest.approx(1.0)  # (0.9 + 1.0) - 0.9 is not exactly 1.0
        assert d.loop.live_timers() == [t + 1.0]
        clients.append(client)
    d.loop.advance_to(1.89)
    assert d.runs.started == []
    d.loop.advance_to(1.9)
    [run] = d.runs.started
    assert (run.started_at, run.started_wall, run.coalesced) == (1.9, WALL + 1.9, 3)
    d.loop.advance_to(4.0)
    d.core.run_exited(run.id, 0)
    d.loop.run_soon()
    for client in clients:
        assert client.last() == finished(1, 3, ["echo", "3"], 0, 3, 1.9, 4.0)
        assert client.kinds().count(Started) == client.kinds().count(Finished) == 1
    assert len(d.runs.started) == 1


@pytest.mark.parametrize("options", [{"delay": -1}, {"bogus": 1}, {"on_busy": "never"}])
def test_bad_options_are_a_bad_request_and_nothing_is_pending(d: Daemon, options: dict) -> None:
    client, reply = d.run(**options)
    assert is_error(reply, states.BAD_REQUEST) and client.owed_wait is None
    d.loop.run_soon()
    assert d.status() == [] and d.loop.live_timers() == [] and client.got == []


def test_a_bool_delay_is_refused_even_after_an_equal_number(d: Daemon) -> None:
    d.run(key="a", wait=False, delay=1)
    assert is_error(d.run(key="b", wait=False, delay=True)[1], states.BAD_REQUEST)


def test_failed_commit_refuses_and_the_previous_invocation_is_pending_again() -> None:
    journal = StubJournal(failing=True)
    d = make_daemon(journal)
    lone, _ = d.run(key="lone", wait=False)  # refused with nothing before it: nothing left
    d.loop.run_soon()
    assert [(type(m), m.code) for m in lone.got] == [(Error, states.REFUSED)]
    assert d.status() == [] and d.loop.live_timers() == [] and not d.core.busy()
    journal.failing = False
    first, _ = d.run(["echo", "first"])
    d.loop.run_soon()
    d.loop.advance_to(0.5)
    journal.failing = True
    second, reply = d.run(["echo", "second"])
    assert reply is None
    d.loop.run_soon()
    assert is_error(second.got[0], states.REFUSED) and "disk full" in second.got[0].message
    [row] = d.status()
    assert row.pending == protocol.PendingRow(id=2, argv=["echo", "first"], cwd="/",
                                              state=states.PENDING, due_in=0.5, coalesced=1)
    assert d.loop.live_timers() == [1.0]
    journal.failing = False
    d.loop.advance_to(1.0)
    [run] = d.runs.started
    assert (records.job_of(run.invocation).argv, run.coalesced) == (["echo", "first"], 1)
    d.core.run_exited(run.id, 0)
    d.loop.run_soon()
    assert first.last() == finished(1, 2, ["echo", "first"], 0, 1, 1.0, 1.0)
    assert Finished not in second.kinds() and Started not in second.kinds()


def test_failed_commit_sends_no_progress_about_the_withdrawn_invocation() -> None:
    journal = StubJournal()
    d = make_daemon(journal)
    first, _ = d.run(["echo", "first"])
    d.loop.run_soon()
    before = list(first.got)
    journal.failing = True
    d.run(["echo", "second"])
    d.loop.run_soon()
    assert first.got == before  # not "state cancelled, coalesced 2" about the other one


def test_status_rows_follow_the_clock_and_the_runs(d: Daemon) -> None:
    d.run(["make"], key="b", wait=False)
    d.run(["make", "a"], key="a", wait=False, delay=2.0)
    d.loop.advance_to(0.25)
    rows = d.status()  # sorted by key; KeyStatus records, not dicts
    assert [(type(r).__name__, r.key) for r in rows] == [("KeyStatus", "a"), ("KeyStatus", "b")]
    assert rows[0].pending == protocol.PendingRow(id=2, argv=["make", "a"], cwd="/",
                                                  state=states.PENDING, due_in=1.75, coalesced=1)
    assert rows[1].pending is not None and rows[1].pending.due_in == 0.75
    assert rows[1].running is None and rows[1].last is None
    d.loop.advance_to(1.0)
    [row] = [r for r in d.status() if r.key == "b"]
    assert row.pending is None and row.last is None
    assert row.running == protocol.RunningRow(run_id=1, argv=["make"], started_at=WALL + 1.0,
                                              coalesced=1, stopping=None)
    d.loop.advance_to(1.5)
    d.run(["make", "again"], key="b", wait=False)  # pending again while run 1 goes on
    d.loop.run_soon()
    d.core.run_exited(1, 7)
    d.loop.run_soon()
    [row] = [r for r in d.status() if r.key == "b"]
    assert row.running is None and row.pending is not None and row.pending.due_in == 1.0
    assert row.last == protocol.LastRun(run_id=1, exit_code=7, finished_at=WALL + 1.5)


def test_wait_follows_a_pending_key_to_the_end(d: Daemon) -> None:
    d.run(["make"], wait=False)
    d.loop.advance_to(0.4)
    waiter = FakeClient()
    assert d.ask(protocol.WaitRequest(target="k"), waiter) is None
    assert waiter.waiting_acked is True
    assert waiter.got == [Pending(key="k", state=states.PENDING, due_in=0.6, coalesced=1)]
    d.loop.advance_to(1.0)
    assert waiter.kinds() == [Pending, Started]
    late = FakeClient()  # joins the run while it executes: Started (replayed), then the end
    assert d.ask(protocol.WaitRequest(target="k"), late) is None
    d.loop.advance_to(2.0)
    d.core.run_exited(1, 0)
    d.loop.run_soon()
    assert waiter.last() == late.last() == finished(1, 1, ["make"], 0, 1, 1.0, 2.0)
    assert late.kinds() == [Started, Finished]


def test_wait_on_a_finished_run_answers_in_the_same_turn_else_not_found(d: Daemon) -> None:
    d.run(["make"], wait=False)
    d.loop.advance_to(1.0)
    d.loop.advance_to(2.0)
    d.core.run_exited(1, 4)
    d.loop.run_soon()
    for target in ("1", "k"):
        waiter = FakeClient()
        assert d.ask(protocol.WaitRequest(target=target), waiter) is None
        d.loop.run_soon()  # no clock movement: delivered at the end of this turn
        assert waiter.got == [finished(1, 1, ["make"], 4, 1, 1.0, 2.0)]
    assert len(d.runs.started) == 1
    for target in ("nope", "42"):  # neither a key nor a run id known
        assert is_error(d.ask(protocol.WaitRequest(target=target)), states.NOT_FOUND)


def test_a_burst_due_at_once_starts_its_first_runs_before_the_rest_is_decided() -> None:
    """A thousand keys falling due together were decided, committed and handed over whole
    before the first could start (35-50 ms on the bench's machine): now a step of
    DUE_PER_TURN at a time, each committed before its runs are handed over, all at the due
    time and in the order they fell due."""
    decided_at_commit: list[int] = []
    decided_at_start: list[int] = []

    class Recording(StubJournal):
        def commit(self, scheduler: Scheduler, wall_offset: float) -> None:
            decided_at_commit.append(len(scheduler.runs))

    d = make_daemon(Recording())
    count = 2 * DUE_PER_TURN + 10
    for i in range(count):
        d.run(key=f"k{i:04}", wait=False, delay=1.0)
    d.loop.run_soon()
    start = d.runs.start

    def recording_start(spec: RunSpec) -> None:
        decided_at_start.append(len(d.core.scheduler.runs))
        start(spec)

    d.runs.start = recording_start  # type: ignore[method-assign]
    d.loop.advance_to(2.0)
    assert [run.key for run in d.runs.started] == [f"k{i:04}" for i in range(count)]
    assert {run.started_at for run in d.runs.started} == {1.0}
    # The first run is handed over when only the first step is decided, and committed.
    assert decided_at_start[0] == DUE_PER_TURN
    assert DUE_PER_TURN in decided_at_commit
    assert decided_at_commit[-1] == count


def test_among_many_runs_ends_share_a_commit_unless_something_is_in_a_hurry() -> None:
    """Group commit: with COMMIT_SIBLINGS runs or more executing, the commit that records an
    end waits COMMIT_DELAY for more ends; a submission (or a run to start) meanwhile has it
    done at once. Nobody hears of an end before a commit holds it."""
    commits: list[float] = []

    class Recording(StubJournal):
        def commit(self, scheduler: Scheduler, wall_offset: float) -> None:
            commits.append(d.clock.now)

    d = make_daemon(Recording())
    clients = [d.run(key=f"k{i}")[0] for i in range(COMMIT_SIBLINGS + 4)]
    d.loop.advance_to(1.0)  # all of them start
    ids = [run.id for run in d.runs.started]
    commits.clear()
    d.core.run_exited(ids[0], 0)
    d.loop.run_soon()
    d.loop.advance_to(1.0 + COMMIT_DELAY / 2)
    d.core.run_exited(ids[1], 0)
    d.loop.run_soon()
    assert commits == [] and Finished not in clients[0].kinds()  # not recorded, not told
    d.loop.advance_to(1.0 + COMMIT_DELAY)
    assert commits == [1.0 + COMMIT_DELAY]  # one commit for both
    assert Finished in clients[0].kinds() and Finished in clients[1].kinds()

    d.core.run_exited(ids[2], 0)  # waits again...
    d.loop.run_soon()
    assert len(commits) == 1
    d.run(key="new")  # ...until a submission wants its answer
    d.loop.run_soon()
    assert commits == [1.0 + COMMIT_DELAY, 1.0 + COMMIT_DELAY]
    assert Finished in clients[2].kinds()

    for run_id in ids[3:]:  # few runs left executing: each end is committed at once
        d.core.run_exited(run_id, 0)
    d.loop.run_soon()
    assert all(Finished in client.kinds() for client in clients)
    assert d.loop.live_timers() == [2.0 + COMMIT_DELAY]  # only the "new" key's due time


@pytest.mark.parametrize("ledger", [None, "/nonexistent/started"])
def test_a_runs_pid_is_noted_at_once_without_a_ledger_and_after_a_while_with_one(
        ledger: str | None) -> None:
    """Without a started ledger the pid is the only evidence of a start: committed at once.
    With one, only a run still executing NOTE_AFTER later is noted (its pid and log, for the
    history of a run lost in a crash); a short one is written once, at its end."""
    noted: list[tuple[float, int]] = []

    class Recording(StubJournal):
        def note_run(self, run: Run) -> None:
            noted.append((d.clock.now, run.id))

    d = make_daemon(Recording(), ledger=ledger)
    start = d.runs.start

    def starting(spec: RunSpec) -> None:
        start(spec)
        d.core.run_started(spec)  # as runs.Runs reports it once the process exists

    d.runs.start = starting  # type: ignore[method-assign]
    d.run(key="long", wait=False)
    d.run(key="short", wait=False)
    d.loop.advance_to(1.0)
    long_run, short_run = (run.id for run in d.runs.started)
    d.loop.advance_to(1.0 + NOTE_AFTER / 2)
    d.core.run_exited(short_run, 0)
    d.loop.advance_to(2.0)
    if ledger is None:
        assert noted == [(1.0, long_run), (1.0, short_run)]
    else:
        assert noted == [(1.0 + NOTE_AFTER, long_run)]


def test_wait_read_between_a_runs_end_and_its_commit_finds_the_run(d: Daemon) -> None:
    """The run has ended and the scheduler let it go, but the turn's commit (after which the
    daemon remembers finished runs) has not run yet: a ``wait`` read then, by key, run id or
    invocation, still gets the run's end, once that commit is done (it exited 117, "no key
    pending, running or finished", in CI)."""
    d.run(["make"], wait=False)
    d.loop.advance_to(1.0)
    d.loop.advance_to(2.0)
    d.core.run_exited(1, 4)  # the turn is not ended: its commit is still to come
    waiters = []
    for target, by in (("k", "key"), ("1", "run"), ("1", "invocation")):
        waiter = FakeClient()
        assert d.ask(protocol.WaitRequest(target=target, by=by), waiter) is None, (target, by)
        assert waiter.got == []  # nothing before the commit
        waiters.append(waiter)
    d.loop.run_soon()
    for waiter in waiters:
        assert waiter.got[-1] == finished(1, 1, ["make"], 4, 1, 1.0, 2.0)


def test_flush_starts_the_pending_run_at_once(d: Daemon) -> None:
    client, _ = d.run(["make"])
    d.loop.advance_to(0.3)
    assert d.ask(protocol.FlushRequest(key="k")) == Done(ok=True, message="flushed k")
    d.loop.run_soon()
    [run] = d.runs.started
    assert (run.started_at, run.started_wall) == (0.3, WALL + 0.3)
    assert d.loop.live_timers() == [] and client.last().type == "started"
    assert is_error(d.ask(protocol.FlushRequest(key="other")), states.NOT_FOUND)


def test_cancel_tells_every_waiter_and_nothing_runs(d: Daemon) -> None:
    one, _ = d.run(["make"])
    two, _ = d.run(["make"])
    d.loop.run_soon()
    assert d.ask(protocol.CancelRequest(key="k")) == Done(ok=True, message="cancelled k")
    d.loop.run_soon()
    assert one.last() == two.last() == Cancelled(key="k")
    assert d.status() == [] and d.loop.live_timers() == []
    d.loop.advance_to(5.0)
    assert d.runs.started == []
    assert is_error(d.ask(protocol.CancelRequest(key="k")), states.NOT_FOUND)


def test_stop_answers_closes_and_shuts_down_once(d: Daemon) -> None:
    client = FakeClient()
    assert d.ask(protocol.StopRequest(), client) is None
    assert client.got == [Done(ok=True, message="stopping")]
    assert client.closed == 1 and d.shutdowns == [1]


def test_history_without_a_journal_is_newest_first(d: Daemon) -> None:
    for i, key in enumerate(("a", "b", "a")):
        d.loop.advance_to(10.0 * i)
        d.run(["job", str(i)], key=key, wait=False)
        d.loop.advance_to(10.0 * i + 2.0)
        d.core.run_exited(i + 1, i)
        d.loop.run_soon()
    runs = d.ask(protocol.HistoryRequest(key=None, limit=2)).runs
    assert [r.run_id for r in runs] == [3, 2]
    assert runs[0] == protocol.RunRecord(
        run_id=3, key="a", argv=["job", "2"], cwd="/", exit_code=2, coalesced=1,
        started_at=WALL + 21.0, finished_at=WALL + 22.0, outcome=states.EXITED,
        due_at=WALL + 21.0, invocation=3, log_path=None, covered=[3])
    assert [r.run_id for r in d.ask(protocol.HistoryRequest(key="a")).runs] == [3, 1]
    assert d.ask(protocol.HistoryRequest(key=None, limit=0)).runs == []
    assert d.ask(protocol.HistoryRequest(key="zzz")).runs == []


def test_a_detached_client_gets_nothing_more_and_the_run_still_happens(d: Daemon) -> None:
    gone, _ = d.run(["make", "1"])
    d.loop.run_soon()
    stays, _ = d.run(["make", "2"])
    d.loop.run_soon()
    seen = list(gone.got)
    d.core.detach(gone)
    d.loop.advance_to(1.0)
    [run] = d.runs.started
    assert run.coalesced == 2
    d.core.run_exited(run.id, 0)
    d.loop.run_soon()
    assert gone.got == seen
    assert stays.last() == finished(1, 2, ["make", "2"], 0, 2, 1.0, 1.0)


def test_a_run_due_while_commits_fail_waits_unstarted_until_one_succeeds() -> None:
    """A process never starts before the commit that records its run (issue 9, item 2)."""
    journal = StubJournal()
    d = make_daemon(journal)
    client, _ = d.run(key="k", wait=True, delay=0.5)
    d.loop.run_soon()
    assert isinstance(client.got[0], Accepted)
    journal.failing = True
    d.loop.advance_to(0.5)
    assert d.runs.started == [], "a run started that its journal could not record"
    d.loop.advance_to(2.4)
    assert d.runs.started == []
    journal.failing = False
    d.loop.advance_to(3.0)  # the next retry commits, and the run starts then
    assert len(d.runs.started) == 1
    d.core.run_exited(d.runs.started[0].id, 0)
    d.loop.run_soon()
    assert isinstance(client.got[-1], Finished) and client.got[-1].exit_code == 0


def test_a_zero_delay_submission_whose_commit_fails_is_refused_and_never_starts() -> None:
    journal = StubJournal()
    d = make_daemon(journal)
    d.run(key="k", wait=True, delay=5.0)
    d.loop.run_soon()
    journal.failing = True
    refused, _ = d.run(key="k", wait=True, delay=0.0)
    d.loop.run_soon()
    assert [(type(m), m.code) for m in refused.got if isinstance(m, Error)] == [
        (Error, states.REFUSED)]
    assert d.runs.started == []
    rows = d.status()
    assert rows[0].pending is not None and rows[0].pending.coalesced == 1  # the earlier one
    journal.failing = False
    d.loop.advance_to(5.0)
    assert len(d.runs.started) == 1 and d.runs.started[0].coalesced == 1


def test_a_bare_argument_that_is_both_a_key_and_a_run_id_is_refused() -> None:
    d = make_daemon()
    d.run(key="1", wait=False, delay=0.0)  # key "1", and its run gets id 1
    d.loop.run_soon()
    assert len(d.runs.started) == 1 and d.runs.started[0].id == 1
    d.core.run_exited(1, 0)
    d.loop.run_soon()
    reply = handlers.handle_flush(d.ctx, FakeClient(), protocol.FlushRequest(key="1"))
    assert isinstance(reply, Error) and reply.code == states.BAD_REQUEST
    assert "--key 1" in reply.message and "--run 1" in reply.message
    waiter = FakeClient()
    answer = handlers.handle_wait(d.ctx, waiter, protocol.WaitRequest(target="1", by="run"))
    d.loop.run_soon()
    assert answer is None and isinstance(waiter.got[-1], Finished)
    by_key = handlers.handle_cancel(d.ctx, FakeClient(), protocol.CancelRequest(key="1",
                                                                               by="key"))
    assert isinstance(by_key, Error) and by_key.code == states.NOT_FOUND  # nothing pending
    bad = handlers.handle_logs(d.ctx, FakeClient(), protocol.LogsRequest(target="x", by="run"))
    assert isinstance(bad, Error) and "number" in bad.message


def test_a_run_decided_in_the_turn_the_stop_arrives_in_never_starts(d: Daemon) -> None:
    """Issue 23, item 6: stop right as a key falls due; the run decided in that very turn
    is taken back and the invocation is still pending (for the journal to keep)."""
    d.run(["make"], delay=0.0, wait=False)
    assert d.core.outbox, "the run is decided, its start waits for the end of the turn"
    d.core.stop_runs()
    d.loop.run_soon()
    assert d.runs.started == []
    [row] = d.status()
    assert row.pending is not None and row.running is None
