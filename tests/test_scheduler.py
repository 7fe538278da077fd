"""Exact-time tests of the debounce state machine (SPEC "Semantics (the seed, made exact)").

The scheduler never reads a real clock: every test drives it with :class:`FakeClock`, whose time
only moves when the test moves it, and :meth:`Sim.advance` jumps from one ``next_deadline()`` to
the next, calling ``tick()`` there, so nothing sleeps and every time asserted is exact. All the
times used are sums of binary fractions (0.25, 0.5, ...), so float equality is safe.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from debounce_cli.keys import compute_key
from debounce_cli.scheduler import (
    CANCELLED,
    FINISHED,
    PENDING,
    QUEUED,
    RUNNING,
    SUPERSEDED,
    Cancelled,
    Invocation,
    Joined,
    Options,
    Run,
    RunFinished,
    Scheduler,
    SignalRun,
    StartRun,
)

# ---------------------------------------------------------------------------------- harness


class FakeClock:
    """A monotonic clock that stands still until the test moves it (like trio's MockClock)."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def set(self, when: float) -> None:
        assert when >= self.now, f"the clock cannot go back from {self.now} to {when}"
        self.now = when


DEFAULT_OPTIONS = Options()


class Sim:
    """A Scheduler on a FakeClock that records every effect with the time it happened."""

    def __init__(self, jobs: int | None = None, due_per_step: int | None = None) -> None:
        self.clock = FakeClock()
        self.sched = Scheduler(self.clock, jobs=jobs)
        self.sched.due_per_step = due_per_step
        self.log: list[tuple[float, Any]] = []

    def _record(self, effects: list[Any]) -> list[Any]:
        for effect in effects:
            self.log.append((self.clock.now, effect))
        return effects

    def advance(self, until: float) -> list[tuple[float, Any]]:
        """Move the clock to each next_deadline() up to ``until``, ticking there; then to ``until``.

        Returns the (time, effect) pairs produced on the way. Fails if a tick does nothing yet
        leaves a deadline that is already due (the daemon would spin on it).
        """
        start = len(self.log)
        while True:
            deadline = self.sched.next_deadline()
            if deadline is None or deadline > until:
                break
            self.clock.set(max(self.clock.now, deadline))
            heap = len(self.sched._due)
            effects = self._record(self.sched.tick())
            after = self.sched.next_deadline()
            # (In steps, a step may decide only invocations that wait for their key: no
            # effect, but fewer left to decide.)
            assert effects or after is None or after > self.clock.now or (
                len(self.sched._due) < heap), (
                f"tick() at {self.clock.now} did nothing and left deadline {after} due: "
                "the daemon would spin"
            )
        self.clock.set(until)
        return self.log[start:]

    def submit(
        self,
        key: str,
        at: float,
        payload: Any = None,
        waiter: Any = None,
        options: Options = DEFAULT_OPTIONS,
    ) -> Invocation:
        self.advance(at)
        inv, effects = self.sched.submit(key, options, payload=payload, waiter=waiter)
        self._record(effects)
        return inv

    def exit(self, run: Run, at: float, code: int = 0) -> list[Any]:
        self.advance(at)
        return self._record(self.sched.run_exited(run.id, code))

    def flush(self, key: str, at: float) -> tuple[bool, list[Any]]:
        self.advance(at)
        found, effects = self.sched.flush(key)
        return found, self._record(effects)

    def cancel(self, key: str, at: float) -> tuple[bool, list[Any]]:
        self.advance(at)
        found, effects = self.sched.cancel(key)
        return found, self._record(effects)

    # Views of the log.
    def runs(self) -> list[Run]:
        return [e.run for _, e in self.log if isinstance(e, StartRun)]

    def starts(self) -> list[tuple[float, Any]]:
        """(time, payload of the invocation that won) of every run started."""
        return [(t, e.run.invocation.payload) for t, e in self.log if isinstance(e, StartRun)]

    def signals(self) -> list[tuple[float, int, str]]:
        return [(t, e.run.id, e.signal) for t, e in self.log if isinstance(e, SignalRun)]

    def finished(self) -> list[tuple[float, int, list[Any]]]:
        return [(t, e.run.id, e.waiters) for t, e in self.log if isinstance(e, RunFinished)]

    def last_run(self) -> Run:
        return self.runs()[-1]


def new_effects(sim: Sim, before: int) -> list[Any]:
    return [e for _, e in sim.log[before:]]


# ---------------------------------------------------------------------------- 1-2. defer


def test_each_invocation_restarts_the_quiet_period_and_the_last_one_runs():
    """Calls at 0, 0.75 and 1.5 with a 1s delay give one run at 2.5 of the last call's command."""
    sim = Sim()
    sim.submit("k", at=0.0, payload="first")
    assert sim.sched.next_deadline() == 1.0
    sim.submit("k", at=0.75, payload="second")
    assert sim.sched.next_deadline() == 1.75
    sim.submit("k", at=1.5, payload="third")
    assert sim.sched.next_deadline() == 2.5

    sim.advance(2.49)
    assert sim.starts() == []
    sim.advance(10.0)
    assert sim.starts() == [(2.5, "third")]


def test_each_invocation_uses_its_own_delay_for_the_new_quiet_period():
    """The latest invocation's --delay decides the new due time (its options win)."""
    sim = Sim()
    sim.submit("k", at=0.0, payload="slow", options=Options(delay=5.0))
    sim.submit("k", at=1.0, payload="fast", options=Options(delay=0.5))
    sim.advance(10.0)
    assert sim.starts() == [(1.5, "fast")]


def test_chain_of_three_replacements_ends_on_one_run_with_all_waiters():
    """Three callers a, b, c coalesced: all three block on one run of c, which reports 3."""
    sim = Sim()
    a = sim.submit("k", at=0.0, payload="a", waiter="caller-a")
    b = sim.submit("k", at=0.5, payload="b", waiter="caller-b")
    c = sim.submit("k", at=1.0, payload="c", waiter="caller-c")

    assert a.state == SUPERSEDED and b.state == SUPERSEDED and c.state == PENDING
    assert a.replaced_by is b and b.replaced_by is c
    assert a.head() is c and b.head() is c and c.head() is c
    assert a.waiters == [] and b.waiters == []
    assert sorted(c.waiters) == ["caller-a", "caller-b", "caller-c"]
    assert c.coalesced == 3

    sim.advance(2.0)
    (run,) = sim.runs()
    assert sim.starts() == [(2.0, "c")]
    assert run.invocation is c and a.head().run is run
    assert run.coalesced == 3
    assert sorted(run.waiters) == ["caller-a", "caller-b", "caller-c"]

    effects = sim.exit(run, at=3.0, code=7)
    finished = [e for e in effects if isinstance(e, RunFinished)]
    assert len(finished) == 1
    assert finished[0].run is run
    assert sorted(finished[0].waiters) == ["caller-a", "caller-b", "caller-c"]
    assert run.exit_code == 7 and run.outcome == "exited" and run.finished_at == 3.0
    assert c.state == FINISHED


# ---------------------------------------------------------------------------------- 3. keys


def test_different_keys_do_not_coalesce_but_the_same_key_does():
    """Two calls of key x coalesce into one run; a call of key y in between runs on its own."""
    sim = Sim()
    sim.submit("x", at=0.0, payload="x1")
    sim.submit("y", at=0.25, payload="y1")
    sim.submit("x", at=0.5, payload="x2")
    sim.advance(10.0)
    assert sim.starts() == [(1.25, "y1"), (1.5, "x2")]
    assert [r.coalesced for r in sim.runs()] == [1, 2]


@pytest.mark.parametrize(
    ("template", "expected_starts"),
    [
        # Default key: the whole invocation; the two commands differ, so both run.
        (None, [(1.0, ("deploy", "alice", "prod")), (1.5, ("deploy", "alice", "prod", "-f"))]),
        # The seed's key function: user and dataset only; they coalesce into the latest.
        ("#{1}:#{2}", [(1.5, ("deploy", "alice", "prod", "-f"))]),
    ],
)
def test_key_template_decides_what_coalesces(template, expected_starts):
    """`deploy alice prod`, then with `-f`: two runs by default, one with --key '#{1}:#{2}'."""
    sim = Sim()
    for at, argv in [(0.0, ("deploy", "alice", "prod")), (0.5, ("deploy", "alice", "prod", "-f"))]:
        key = compute_key(template, argv, "/srv/app", {})
        sim.submit(key, at=at, payload=argv)
    sim.advance(10.0)
    assert sim.starts() == expected_starts


def test_no_defer_keeps_the_delay_but_runs_every_invocation():
    """--no-defer: two identical calls 0.5s apart each run, 1s after their own call."""
    sim = Sim()
    opts = Options(defer=False)
    first = sim.submit("k", at=0.0, payload="p1", waiter="w1", options=opts)
    second = sim.submit("k", at=0.5, payload="p2", waiter="w2", options=opts)
    assert first.state == PENDING and second.state == PENDING
    assert first.replaced_by is None

    sim.advance(1.25)
    assert sim.starts() == [(1.0, "p1")]
    sim.advance(10.0)
    assert sim.starts() == [(1.0, "p1"), (1.5, "p2")]
    r1, r2 = sim.runs()
    assert (r1.coalesced, r2.coalesced) == (1, 1)

    sim.exit(r2, at=11.0)
    sim.exit(r1, at=12.0)
    assert sim.finished() == [(11.0, r2.id, ["w2"]), (12.0, r1.id, ["w1"])]


# ------------------------------------------------------------------------------ 6. max-wait


def test_max_wait_caps_a_burst_and_the_next_burst_counts_from_its_own_first_call():
    """Calls every 0.5s, delay 1s, max-wait 3s: runs at 3.0 and 6.0, not only after the stream."""
    sim = Sim()
    opts = Options(delay=1.0, max_wait=3.0)
    for i in range(12):  # 0.0, 0.5, ..., 5.5
        at = i * 0.5
        sim.submit("k", at=at, payload=at, options=opts)
        if at == 3.0:
            # The first burst's run started at 3.0, just before this call; let it end at 3.5.
            assert sim.starts() == [(3.0, 2.5)]
        if at == 3.5:
            sim.exit(sim.last_run(), at=3.5)
    sim.advance(20.0)
    # Burst one: 0.0..2.5, capped at 0+3. Burst two: 3.0..5.5, capped at 3+3, not at 0+3.
    assert sim.starts() == [(3.0, 2.5), (6.0, 5.5)]
    assert [r.coalesced for r in sim.runs()] == [6, 6]
    sim.exit(sim.last_run(), at=20.0)

    # A later short burst is not capped by any earlier max-wait: plain delay after its last call.
    sim.submit("k", at=30.0, payload=30.0, options=opts)
    sim.submit("k", at=30.5, payload=30.5, options=opts)
    sim.advance(40.0)
    assert sim.starts()[-1] == (31.5, 30.5)


# ------------------------------------------------------------------------- 7. leading edge


def test_leading_starts_the_first_call_at_once_and_gives_one_trailing_run():
    """--leading: calls at 0, 0.5, 1.0 run at 0 (first) and at 2.0 (last), nothing else."""
    sim = Sim()
    opts = Options(leading=True)
    before = len(sim.log)
    sim.submit("k", at=0.0, payload="p0", options=opts)
    assert any(isinstance(e, StartRun) for e in new_effects(sim, before))  # at once
    sim.exit(sim.last_run(), at=0.25)
    sim.submit("k", at=0.5, payload="p1", options=opts)
    sim.submit("k", at=1.0, payload="p2", options=opts)
    sim.advance(10.0)
    assert sim.starts() == [(0.0, "p0"), (2.0, "p2")]
    assert [r.coalesced for r in sim.runs()] == [1, 2]


def test_leading_single_call_runs_once():
    """--leading with one call: it runs at once and no trailing run follows."""
    sim = Sim()
    sim.submit("k", at=0.0, payload="only", options=Options(leading=True))
    sim.exit(sim.last_run(), at=0.25)
    sim.advance(10.0)
    assert sim.starts() == [(0.0, "only")]
    assert sim.sched.is_idle() and sim.sched.next_deadline() is None


def test_leading_again_after_a_full_quiet_delay():
    """--leading: once a full delay passes without calls, the next call runs at once again."""
    sim = Sim()
    opts = Options(leading=True)
    sim.submit("k", at=0.0, payload="lead-1", options=opts)
    sim.exit(sim.last_run(), at=0.25)
    sim.submit("k", at=0.5, payload="trail-1", options=opts)  # burst lasts until 1.5
    sim.advance(1.75)
    assert sim.starts() == [(0.0, "lead-1"), (1.5, "trail-1")]
    sim.exit(sim.last_run(), at=1.75)

    sim.submit("k", at=2.5, payload="lead-2", options=opts)  # 2s after the last call
    sim.exit(sim.last_run(), at=2.75)
    sim.submit("k", at=3.0, payload="trail-2", options=opts)  # within the new burst
    sim.advance(10.0)
    assert sim.starts() == [(0.0, "lead-1"), (1.5, "trail-1"), (2.5, "lead-2"), (4.0, "trail-2")]


def test_leading_exactly_one_delay_after_a_lone_call_is_a_new_leading_run():
    """--leading: a call exactly one delay after the previous one leads a new burst."""
    sim = Sim()
    opts = Options(leading=True)
    sim.submit("k", at=0.0, payload="a", options=opts)
    sim.exit(sim.last_run(), at=0.5)
    sim.submit("k", at=1.0, payload="b", options=opts)
    sim.exit(sim.last_run(), at=1.25)
    sim.advance(10.0)
    assert sim.starts() == [(0.0, "a"), (1.0, "b")]


def test_no_trailing_later_calls_get_the_leading_runs_result():
    """--leading --no-trailing: later calls start nothing and exit with the leading run's code."""
    sim = Sim()
    opts = Options(leading=True, trailing=False)
    sim.submit("k", at=0.0, payload="p0", waiter="w0", options=opts)
    (run,) = sim.runs()
    assert sim.starts() == [(0.0, "p0")]

    # While the leading run executes: the caller joins it.
    _, effects = sim.sched.submit("k", opts, payload="p1", waiter="w1")
    assert effects == [Joined(run, ["w1"])]
    assert run.coalesced == 2

    effects = sim.exit(run, at=0.75, code=3)
    assert RunFinished(run, ["w0", "w1"]) in effects

    # After it ended, still within the burst (last call at 0, burst until 1.0): told at once.
    sim.advance(0.9)
    late, effects = sim.sched.submit("k", opts, payload="p2", waiter="w2")
    assert effects == [RunFinished(run, ["w2"], joined=True)]  # owed its output too
    assert late.run is run and late.state == FINISHED
    assert run.coalesced == 3 and run.exit_code == 3

    sim.advance(10.0)
    assert sim.starts() == [(0.0, "p0")]
    assert sim.sched.is_idle() and sim.sched.next_deadline() is None


def test_no_trailing_without_leading_is_a_usage_error():
    """`--no-trailing` alone is refused with a message that says to add --leading."""
    problems = Options(trailing=False).problems()
    assert len(problems) == 1
    assert "--no-trailing" in problems[0] and "--leading" in problems[0]
    assert Options(leading=True, trailing=False).problems() == []
    assert Options().problems() == []


# ------------------------------------------------------------------------- 5. busy: queue


def test_queue_pending_call_starts_at_its_due_time_when_the_run_ended_first():
    """--on-busy queue: a call made during a run that ends before its due time runs when due."""
    sim = Sim()
    sim.submit("k", at=0.0, payload="p1")
    sim.advance(1.0)
    (run1,) = sim.runs()
    pending = sim.submit("k", at=1.5, payload="p2")
    assert pending.state == PENDING and sim.sched.next_deadline() == 2.5
    sim.exit(run1, at=2.0)
    sim.advance(10.0)
    assert sim.starts() == [(1.0, "p1"), (2.5, "p2")]


def test_queue_pending_call_due_during_a_run_starts_exactly_when_the_run_ends():
    """--on-busy queue: a call that falls due while its key runs starts the moment the run ends."""
    sim = Sim()
    sim.submit("k", at=0.0, payload="p1")
    sim.advance(1.0)
    (run1,) = sim.runs()
    sim.submit("k", at=1.25, payload="p2")
    pending = sim.submit("k", at=1.5, payload="p3")  # supersedes p2, due 2.5
    sim.advance(3.5)
    assert sim.starts() == [(1.0, "p1")]  # never two runs of one key at once
    assert pending.state == PENDING and pending.coalesced == 2
    assert sim.sched.next_deadline() is None  # waits for run_exited, no polling

    effects = sim.exit(run1, at=3.75)
    assert any(isinstance(e, StartRun) for e in effects)
    assert sim.starts() == [(1.0, "p1"), (3.75, "p3")]


def test_queue_call_during_a_run_restarts_the_quiet_period_as_usual():
    """--on-busy queue: a call during a run, after the pending one fell due, pushes it back."""
    sim = Sim()
    sim.submit("k", at=0.0, payload="p1")
    sim.advance(1.0)
    (run1,) = sim.runs()
    sim.submit("k", at=1.5, payload="p2")  # due 2.5, passes while run1 runs
    sim.submit("k", at=2.75, payload="p3")  # due 3.75
    sim.exit(run1, at=3.0)
    sim.advance(10.0)
    assert sim.starts() == [(1.0, "p1"), (3.75, "p3")]


# ----------------------------------------------------------------------- 5. busy: restart


def test_restart_stops_the_running_command_and_the_new_run_takes_its_callers():
    """--on-busy restart: the run is stopped when the new call is due (TERM, and the KILL
    stop-timeout later that ``daemon.runs`` sends), then the new run starts."""
    sim = Sim()
    opts = Options(on_busy="restart", stop_timeout=2.0)
    sim.submit("k", at=0.0, payload="old", waiter="w-old", options=opts)
    sim.advance(1.0)
    (run1,) = sim.runs()
    sim.submit("k", at=1.5, payload="new", waiter="w-new", options=opts)

    sim.advance(4.5)
    assert sim.signals() == [(2.5, run1.id, "TERM")]
    assert [e.stop for _, e in sim.log if isinstance(e, SignalRun)] == [True]
    assert run1.stop_reason == "restart"
    sim.advance(4.75)
    assert sim.starts() == [(1.0, "old")]  # not before the old one has exited

    effects = sim.exit(run1, at=4.75, code=137)
    assert run1.outcome == "restarted" and run1.exit_code == 137
    assert RunFinished(run1, []) in effects  # its callers moved on to the new run
    assert sim.starts() == [(1.0, "old"), (4.75, "new")]
    run2 = sim.last_run()
    assert run2.waiters == ["w-old", "w-new"]

    sim.exit(run2, at=6.0, code=0)
    assert sim.finished()[-1] == (6.0, run2.id, ["w-old", "w-new"])
    assert run2.outcome == "exited"
    assert sim.sched.is_idle() and sim.sched.next_deadline() is None


def test_restart_sends_no_kill_when_the_run_exits_after_term():
    """--on-busy restart: a command that exits on TERM gets no KILL; the new run starts then."""
    sim = Sim()
    opts = Options(on_busy="restart", stop_timeout=2.0)
    sim.submit("k", at=0.0, payload="old", options=opts)
    sim.advance(1.0)
    (run1,) = sim.runs()
    sim.submit("k", at=1.5, payload="new", options=opts)
    sim.exit(run1, at=3.0, code=143)
    sim.advance(10.0)
    assert sim.signals() == [(2.5, run1.id, "TERM")]
    assert sim.starts() == [(1.0, "old"), (3.0, "new")]


def test_restart_sends_nothing_when_the_run_ended_before_the_new_call_was_due():
    """--on-busy restart: if the command finished on its own, the next call just runs when due."""
    sim = Sim()
    opts = Options(on_busy="restart")
    sim.submit("k", at=0.0, payload="old", options=opts)
    sim.advance(1.0)
    sim.submit("k", at=1.5, payload="new", options=opts)
    sim.exit(sim.last_run(), at=2.0)
    sim.advance(10.0)
    assert sim.signals() == []
    assert sim.starts() == [(1.0, "old"), (2.5, "new")]
    assert sim.runs()[0].outcome == "exited"


# ------------------------------------------------------------------------ 5. busy: ignore


def test_ignore_calls_during_a_run_join_it_and_no_second_run_starts():
    """--on-busy ignore: calls made while the command runs exit with that run's code."""
    sim = Sim()
    opts = Options(on_busy="ignore")
    sim.submit("k", at=0.0, payload="p0", waiter="w0", options=opts)
    sim.advance(1.0)
    (run,) = sim.runs()

    sim.advance(1.5)
    joined1, effects = sim.sched.submit("k", opts, payload="p1", waiter="w1")
    assert effects == [Joined(run, ["w1"])] and run.coalesced == 2
    sim.advance(2.0)
    joined2, effects = sim.sched.submit("k", opts, payload="p2", waiter="w2")
    assert effects == [Joined(run, ["w2"])] and run.coalesced == 3
    assert joined1.run is run and joined2.run is run and joined2.state == RUNNING

    effects = sim.exit(run, at=3.0, code=5)
    assert RunFinished(run, ["w0", "w1", "w2"]) in effects
    sim.advance(10.0)
    assert sim.starts() == [(1.0, "p0")]
    assert sim.sched.is_idle()


# ------------------------------------------------------------------------ 4. job slots


def test_job_slots_queue_due_calls_in_order_and_a_replacement_keeps_its_place():
    """--jobs 1: due calls wait in FIFO order; a newer call of a queued key takes its place."""
    sim = Sim(jobs=1)
    sim.submit("k1", at=0.0, payload="k1")
    k2 = sim.submit("k2", at=0.25, payload="k2")
    k3 = sim.submit("k3", at=0.5, payload="k3")
    sim.advance(1.75)
    assert sim.starts() == [(1.0, "k1")]
    assert k2.state == QUEUED and k3.state == QUEUED

    k2b = sim.submit("k2", at=2.0, payload="k2b", waiter="w2b")
    assert k2b.state == QUEUED  # no new quiet period
    assert k2.head() is k2b and k2b.coalesced == 2

    sim.exit(sim.last_run(), at=2.25)  # before k2b's own delay (3.0) would end
    assert sim.starts() == [(1.0, "k1"), (2.25, "k2b")]  # k2 kept its place ahead of k3
    sim.exit(sim.last_run(), at=2.5)
    assert sim.starts() == [(1.0, "k1"), (2.25, "k2b"), (2.5, "k3")]
    sim.exit(sim.last_run(), at=2.75)
    sim.advance(10.0)
    assert len(sim.starts()) == 3
    assert sim.sched.is_idle() and sim.sched.next_deadline() is None


def test_job_slots_never_exceed_the_limit():
    """--jobs 2: a third due key waits until one of the two runs ends."""
    sim = Sim(jobs=2)
    for i, key in enumerate(["a", "b", "c"]):
        sim.submit(key, at=i * 0.25, payload=key)
    sim.advance(2.0)
    assert sim.starts() == [(1.0, "a"), (1.25, "b")]
    sim.exit(sim.runs()[1], at=3.0)
    assert sim.starts()[-1] == (3.0, "c")


# ------------------------------------------------------------------------------ 8. timeout


# The timer, the TERM and the KILL are ``daemon.runs``' (tests/test_runs_stop.py); the
# scheduler hears of it and gives the run its outcome.


def test_a_run_that_timed_out_reports_timeout_and_is_not_stopped_again():
    sim = Sim()
    sim.submit("k", at=0.0, payload="slow", waiter="w", options=Options(timeout=2.0))
    sim.advance(1.0)
    (run,) = sim.runs()
    assert sim.sched.next_deadline() is None  # the scheduler keeps no timer for it
    sim.sched.timed_out(run.id)
    assert run.stop_reason == "timeout"
    sim._record(sim.sched.kill(run.id))  # already being stopped: no second stop
    assert sim.signals() == []
    effects = sim.exit(run, at=8.0, code=137)
    assert run.outcome == "timeout" and run.exit_code == 137
    assert RunFinished(run, ["w"]) in effects


def test_a_run_stopping_for_another_reason_keeps_it_when_its_timeout_passes():
    sim = Sim()
    sim.submit("k", at=0.0, options=Options(timeout=2.0))
    sim.advance(1.0)
    run = sim.last_run()
    sim._record(sim.sched.kill(run.id))
    sim.sched.timed_out(run.id)
    sim.exit(run, at=2.5, code=143)
    assert run.outcome == "killed"


# ------------------------------------------------------------------------- flush / cancel


def test_flush_runs_the_pending_call_now():
    """`debounce flush KEY` starts what is pending at once instead of at its due time."""
    sim = Sim()
    sim.submit("k", at=0.0, payload="p", waiter="w", options=Options(delay=5.0))
    found, _ = sim.flush("k", at=1.0)
    assert found
    assert sim.starts() == [(1.0, "p")]
    sim.exit(sim.last_run(), at=2.0)
    sim.advance(20.0)
    assert sim.starts() == [(1.0, "p")]  # the old due time fires nothing
    assert sim.sched.is_idle() and sim.sched.next_deadline() is None
    assert sim.sched.flush("k") == (False, [])


def test_cancel_drops_the_pending_call_and_tells_every_waiter():
    """`debounce cancel KEY`: all coalesced callers are told "cancelled" and nothing runs."""
    sim = Sim()
    a = sim.submit("k", at=0.0, payload="a", waiter="wa")
    b = sim.submit("k", at=0.5, payload="b", waiter="wb")
    found, effects = sim.cancel("k", at=0.75)
    assert found
    assert effects == [Cancelled(b, ["wa", "wb"])]
    assert b.state == CANCELLED and a.head() is b
    assert sim.sched.is_idle() and sim.sched.next_deadline() is None
    sim.advance(20.0)
    assert sim.starts() == []
    assert sim.sched.cancel("k") == (False, [])


def test_cancel_of_a_queued_call_frees_its_place():
    """--jobs 1: cancelling a key waiting for a slot removes it from the queue."""
    sim = Sim(jobs=1)
    sim.submit("a", at=0.0, payload="a")
    sim.submit("b", at=0.25, payload="b")
    sim.submit("c", at=0.5, payload="c")
    sim.advance(2.0)
    sim.cancel("b", at=2.0)
    sim.exit(sim.last_run(), at=3.0)
    assert sim.starts() == [(1.0, "a"), (3.0, "c")]


def test_nothing_timed_means_no_deadline():
    """An idle daemon sleeps: next_deadline() is None before and after a run."""
    sim = Sim()
    assert sim.sched.is_idle() and sim.sched.next_deadline() is None
    sim.submit("k", at=0.0)
    assert not sim.sched.is_idle() and sim.sched.next_deadline() == 1.0
    sim.advance(1.0)
    assert not sim.sched.is_idle() and sim.sched.next_deadline() is None  # running, untimed
    sim.exit(sim.last_run(), at=2.0)
    assert sim.sched.is_idle() and sim.sched.next_deadline() is None


def test_leading_trailing_run_waits_for_the_leading_run_to_end():
    """--leading: a trailing run due while the leading run still runs starts when it ends."""
    sim = Sim()
    opts = Options(leading=True)
    sim.submit("k", at=0.0, payload="lead", options=opts)
    sim.submit("k", at=0.5, payload="trail", options=opts)
    sim.advance(3.0)
    assert sim.starts() == [(0.0, "lead")]
    sim.exit(sim.runs()[0], at=3.0)
    assert sim.starts() == [(0.0, "lead"), (3.0, "trail")]


# -------------------------------------------------------------------------- daemon shutdown


@pytest.mark.parametrize("jobs", [None, 1])
def test_shutdown_keeps_pending_calls_pending_while_stopped_runs_exit(jobs):
    """On SIGTERM the daemon stops its runs; what was pending stays pending, nothing new starts."""
    sim = Sim(jobs=jobs)
    sim.submit("k", at=0.0, payload="running")
    sim.advance(1.0)
    (run,) = sim.runs()
    # With no job limit: the same key falls due while busy. With --jobs 1: another key queues.
    waiting = sim.submit("k" if jobs is None else "other", at=1.5, payload="waiting")
    sim.advance(3.0)
    assert waiting.state in (PENDING, QUEUED)

    sim._record(sim.sched.stop_all())
    assert sim.signals() == [(3.0, run.id, "TERM")]
    effects = sim.exit(run, at=3.5, code=143)
    assert run.outcome == "stopped"
    assert not any(isinstance(e, StartRun) for e in effects)
    assert waiting.state in (PENDING, QUEUED)


# ---------------------------------------------------------------------- property tests

KEYS = ("a", "b", "c")
GAPS = st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0])
DELAYS = st.sampled_from([0.0, 0.25, 0.5, 1.0, 2.0])
SUBMISSIONS = st.lists(st.tuples(st.sampled_from(KEYS), GAPS, DELAYS), min_size=1, max_size=25)


def _expected_runs(
    submissions: list[tuple[str, float, float]],
) -> list[tuple[float, str, int, int]]:
    """An independent model for runs that end at once: (start, key, winning index, coalesced).

    A call joins its key's burst when it comes before the burst's due time (previous call's
    time + that call's delay); otherwise the burst has already run and it starts a new one.
    """
    open_bursts: dict[str, tuple[float, int, int]] = {}  # key -> (due, last index, count)
    runs = []
    for index, (key, at, delay) in enumerate(submissions):
        burst = open_bursts.get(key)
        if burst is not None and at >= burst[0]:
            runs.append((burst[0], key, burst[1], burst[2]))
            burst = None
        count = 1 if burst is None else burst[2] + 1
        open_bursts[key] = (at + delay, index, count)
    runs.extend((due, key, last, count) for key, (due, last, count) in open_bursts.items())
    return sorted(runs, key=lambda r: (r[0], r[2]))


def test_what_falls_due_at_once_is_decided_in_steps_in_the_order_it_fell_due():
    """``due_per_step``: the daemon decides a burst a step at a time (each step committed
    before its runs start); the rest stays due, so the next deadline is now."""
    sim = Sim(due_per_step=2)
    for i, key in enumerate("edcba"):  # due at 1.0 .. 1.4, in this order
        sim.submit(key, at=0.0, payload=key, options=Options(delay=1.0 + i / 10))
    sim.clock.set(2.0)  # all five are overdue at once
    steps = []
    while (deadline := sim.sched.next_deadline()) is not None:
        assert deadline <= 2.0  # the rest is due at once, not at some later time
        steps.append([e.run.invocation.payload for e in sim._record(sim.sched.tick())
                      if isinstance(e, StartRun)])
    assert steps == [["e", "d"], ["c", "b"], ["a"]]
    assert {run.started_at for run in sim.runs()} == {2.0}


@settings(max_examples=300, deadline=None, database=None)
@given(steps=SUBMISSIONS, due_per_step=st.sampled_from([None, 1, 2]))
def test_property_every_caller_is_told_once_and_the_last_call_of_each_burst_runs(
        steps, due_per_step):
    """Random calls of three keys with random gaps and delays, every run ending at once;
    also with what falls due at once decided one or two a step, as the daemon does."""
    sim = Sim(due_per_step=due_per_step)
    submissions: list[tuple[str, float, float]] = []
    invocations: list[Invocation] = []
    at = 0.0
    handled = 0

    def finish_started_runs() -> None:
        nonlocal handled
        while handled < len(sim.log):
            _, effect = sim.log[handled]
            handled += 1
            if isinstance(effect, StartRun):
                sim._record(sim.sched.run_exited(effect.run.id, 0))

    for key, gap, delay in steps:
        at += gap
        # Move time in the harness's own steps so every run ends the moment it starts.
        while (deadline := sim.sched.next_deadline()) is not None and deadline <= at:
            sim.advance(deadline)
            finish_started_runs()
        sim.advance(at)
        index = len(submissions)
        submissions.append((key, at, delay))
        inv, effects = sim.sched.submit(
            key, Options(delay=delay), payload=index, waiter=f"w{index}"
        )
        sim._record(effects)
        invocations.append(inv)
        finish_started_runs()
    while (deadline := sim.sched.next_deadline()) is not None:
        sim.advance(deadline)
        finish_started_runs()

    assert sim.sched.is_idle() and sim.sched.next_deadline() is None

    # Every waiter is told exactly once, in a RunFinished of the run its invocation ended on.
    told: dict[str, list[Run]] = defaultdict(list)
    for _, effect in sim.log:
        assert not isinstance(effect, Cancelled)
        if isinstance(effect, RunFinished):
            for waiter in effect.waiters:
                told[waiter].append(effect.run)
    for index, inv in enumerate(invocations):
        runs = told[f"w{index}"]
        assert len(runs) == 1, f"waiter w{index} told {len(runs)} times"
        assert runs[0] is inv.head().run

    # No two runs of one key overlap.
    by_key: dict[str, list[Run]] = defaultdict(list)
    for run in sim.runs():
        by_key[run.key].append(run)
    for runs in by_key.values():
        for earlier, later in itertools.pairwise(runs):
            assert earlier.finished_at is not None and earlier.finished_at <= later.started_at

    # Each run is the last call of its burst, at exactly last call + its delay.
    actual = sorted(
        ((r.started_at, r.key, r.invocation.payload, r.coalesced) for r in sim.runs()),
        key=lambda r: (r[0], r[2]),
    )
    assert actual == _expected_runs(submissions)
    assert sum(r.coalesced for r in sim.runs()) == len(submissions)


@settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    steps=SUBMISSIONS,
    durations=st.lists(st.sampled_from([0.0, 0.25, 1.0, 2.5, 6.0]), min_size=1, max_size=8),
    on_busy=st.sampled_from(["queue", "restart", "ignore"]),
    jobs=st.sampled_from([None, 1, 2]),
    obeys_term=st.booleans(),
    due_per_step=st.sampled_from([None, 1, 2]),
)
def test_property_runs_that_take_time_never_overlap_and_lose_no_caller(
    steps, durations, on_busy, jobs, obeys_term, due_per_step
):
    """Random calls, run lengths, --on-busy modes and --jobs: no caller lost, no key run twice
    (also when what falls due at once is decided a few a step)."""
    sim = Sim(jobs=jobs, due_per_step=due_per_step)
    exits: dict[int, tuple[float, Run]] = {}  # run id -> (exit time, run)
    handled = 0
    started = 0

    def react() -> None:
        """Play the processes: each run lasts its duration; TERM or KILL ends it early."""
        nonlocal handled, started
        while handled < len(sim.log):
            now, effect = sim.log[handled]
            handled += 1
            if isinstance(effect, StartRun):
                length = durations[started % len(durations)]
                started += 1
                exits[effect.run.id] = (now + length, effect.run)
            elif (isinstance(effect, SignalRun) and effect.run.id in exits
                  and (effect.signal == "KILL" or obeys_term)):
                exits[effect.run.id] = (now, effect.run)

    def step_to(target: float | None) -> bool:
        """Do the next thing (a deadline or a process exit) no later than target."""
        react()
        deadline = sim.sched.next_deadline()
        exit_at = min(exits.values(), key=lambda e: e[0], default=None)
        candidates = [t for t in (deadline, exit_at[0] if exit_at else None) if t is not None]
        when = min(candidates, default=None)
        if when is None or (target is not None and when > target):
            return False
        if exit_at is not None and exit_at[0] == when:
            sim.advance(max(sim.clock.now, when))
            react()
            if exit_at[1].id in exits and exits[exit_at[1].id][0] <= sim.clock.now:
                del exits[exit_at[1].id]
                sim._record(sim.sched.run_exited(exit_at[1].id, 0))
        else:
            sim.advance(when)
        react()
        return True

    opts = {
        d: Options(delay=d, on_busy=on_busy, stop_timeout=1.0) for d in (0.0, 0.25, 0.5, 1.0, 2.0)
    }
    invocations: list[Invocation] = []
    at = 0.0
    for index, (key, gap, delay) in enumerate(steps):
        at += gap
        for _ in range(10_000):
            if not step_to(at):
                break
        sim.advance(at)
        inv, effects = sim.sched.submit(key, opts[delay], payload=index, waiter=f"w{index}")
        sim._record(effects)
        invocations.append(inv)
        react()
    for _ in range(10_000):
        if not step_to(None):
            break
    assert not exits
    assert sim.sched.is_idle() and sim.sched.next_deadline() is None

    # Every waiter is told exactly once.
    told: dict[str, int] = defaultdict(int)
    for _, effect in sim.log:
        if isinstance(effect, RunFinished):
            for waiter in effect.waiters:
                told[waiter] += 1
    assert {f"w{i}": 1 for i in range(len(invocations))} == dict(told)

    # No two runs of one key overlap, and at most `jobs` run at once.
    intervals = [(r.started_at, r.finished_at, r.key) for r in sim.runs()]
    for i, (s1, f1, k1) in enumerate(intervals):
        assert f1 is not None
        for s2, f2, k2 in intervals[i + 1 :]:
            if k1 == k2:
                assert f1 <= s2 or f2 <= s1, f"two runs of {k1} overlap"
        if jobs is not None:
            concurrent = sum(1 for s, f, _ in intervals if s <= s1 < f)
            assert concurrent <= jobs

    # Each run carries the latest invocation of the chain it stands for.
    chains: dict[int, list[Invocation]] = defaultdict(list)
    for inv in invocations:
        chains[id(inv.head())].append(inv)
    for run in sim.runs():
        chain = chains[id(run.invocation)]
        assert run.invocation is max(chain, key=lambda inv: inv.id)
    assert sum(r.coalesced for r in sim.runs()) == len(invocations)


# ---------------------------------------------------------------- withdraw (journal failure)


def test_withdraw_puts_back_what_the_refused_invocation_replaced():
    """A submission the daemon could not store leaves the acknowledged one pending, unchanged."""
    sim = Sim()
    a = sim.submit("k", at=0.0, payload="a", waiter="wa")
    b = sim.submit("k", at=0.5, payload="b", waiter="wb")
    assert sim.sched.withdraw(b, "wb")
    assert b.state == CANCELLED and a.state == PENDING and a.replaced_by is None
    assert a.head() is a and a.waiters == ["wa"] and a.coalesced == 1
    sim.advance(5.0)
    assert sim.starts() == [(1.0, "a")]  # a's own due time; b never runs
    sim.exit(sim.last_run(), at=5.0)
    assert sim.finished()[-1][2] == ["wa"]


def test_withdraw_of_a_first_invocation_leaves_nothing_pending():
    sim = Sim()
    a = sim.submit("k", at=0.0, payload="a", waiter="wa")
    assert sim.sched.withdraw(a, "wa")
    assert sim.sched.is_idle() and sim.sched.next_deadline() is None
    sim.advance(5.0)
    assert sim.starts() == []


def test_withdraw_keeps_a_queued_place_and_undoes_a_join():
    """A refused replacement of a queued call gives the place back; a refused join is uncounted."""
    sim = Sim(jobs=1)
    sim.submit("busy", at=0.0, payload="busy", options=Options(on_busy="ignore"))
    q = sim.submit("q", at=0.25, payload="q")
    sim.advance(1.5)
    assert q.state == QUEUED
    q2 = sim.submit("q", at=1.5, payload="q2", waiter="w")
    assert sim.sched.withdraw(q2, "w")
    assert q.state == QUEUED and list(sim.sched.queue) == ["q"]
    run = sim.last_run()
    joined = sim.submit("busy", at=1.75, payload="late", waiter="wj",
                        options=Options(on_busy="ignore"))
    assert run.coalesced == 2
    assert sim.sched.withdraw(joined, "wj")
    assert run.coalesced == 1 and "wj" not in run.waiters
    sim.exit(run, at=2.0)
    assert sim.starts()[-1] == (2.0, "q")


def test_withdraw_refuses_once_the_run_has_started():
    sim = Sim()
    a = sim.submit("k", at=0.0, payload="a", options=Options(delay=0))
    assert a.state == RUNNING
    assert not sim.sched.withdraw(a)


# ------------------------------------------------------------- issue 10: exact max-wait and more


def _instant(sim: Sim, until: float) -> None:
    """Advance to ``until``, ending every run at the instant it starts (runs take no time)."""
    while True:
        open_runs = [r for r in sim.runs() if r.state == RUNNING]
        for run in open_runs:
            sim.exit(run, at=sim.clock.now)
        deadline = sim.sched.next_deadline()
        if deadline is None or deadline > until:
            break
        sim.advance(deadline)
    sim.advance(until)


def test_leading_max_wait_counts_from_the_leading_call():
    """Delay 0.5, max-wait 0.5, --leading, calls at 0 and 0.25: runs at 0 and 0.5 (lodash)."""
    sim = Sim()
    opts = Options(delay=0.5, max_wait=0.5, leading=True)
    sim.submit("k", at=0.0, payload=0, options=opts)
    _instant(sim, 0.25)
    sim.submit("k", at=0.25, payload=1, options=opts)
    _instant(sim, 5.0)
    assert sim.starts() == [(0.0, 0), (0.5, 1)]


def test_under_a_steady_stream_max_wait_counts_from_the_previous_run():
    """Delay 2, max-wait 3, calls at 0, 0.5, 2, 3.5, 4.25: runs at 3 and 6 (lodash)."""
    sim = Sim()
    opts = Options(delay=2.0, max_wait=3.0)
    for i, at in enumerate([0.0, 0.5, 2.0, 3.5, 4.25]):
        _instant(sim, at)
        sim.submit("k", at=at, payload=i, options=opts)
    _instant(sim, 20.0)
    assert sim.starts() == [(3.0, 2), (6.0, 4)]


def test_a_max_wait_shorter_than_the_delay_counts_as_the_delay():
    sim = Sim()
    opts = Options(delay=1.0, max_wait=0.25)
    for i in range(12):  # a call every 0.25 s for 3 s
        _instant(sim, i * 0.25)
        sim.submit("k", at=i * 0.25, payload=i, options=opts)
    _instant(sim, 10.0)
    assert sim.starts() == [(1.0, 3), (2.0, 7), (3.0, 11)]  # not every 0.25 s


def test_leading_only_with_max_wait_is_a_throttle_without_trailing_edge():
    """--leading --no-trailing --max-wait 1: the first call 1 s after the last start runs."""
    sim = Sim()
    opts = Options(delay=0.5, max_wait=1.0, leading=True, trailing=False)
    for i, at in enumerate([0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.25]):
        _instant(sim, at)
        sim.submit("k", at=at, payload=i, options=opts, waiter=f"w{i}")
    _instant(sim, 10.0)
    assert sim.starts() == [(0.0, 0), (1.0, 4), (2.25, 7)]
    # Everyone else shared the run of the burst they came in.
    finished = {w: run_id for _, run_id, ws in sim.finished() for w in ws}
    runs = [r.id for r in sim.runs()]
    assert [finished[f"w{i}"] for i in range(8)] == [runs[0]] * 4 + [runs[1]] * 3 + [runs[2]]


def test_cancelling_the_replacement_of_a_restarted_run_tells_its_callers_the_truth():
    """Its callers get the stopped run's real status, never "cancelled before it ran"."""
    sim = Sim()
    opts = Options(delay=0.5, on_busy="restart")
    sim.submit("k", at=0.0, payload="old", waiter="w-old", options=opts)
    sim.advance(0.5)
    run1 = sim.last_run()
    sim.submit("k", at=1.0, payload="new", waiter="w-new", options=opts)
    sim.advance(1.5)  # due: the old run is asked to stop
    assert sim.signals() == [(1.5, run1.id, "TERM")]
    _found, effects = sim.cancel("k", at=1.75)
    assert [(type(e), e.waiters) for e in effects] == [(Cancelled, ["w-new"])]
    effects = sim.exit(run1, at=2.0, code=143)
    assert [(type(e), e.waiters) for e in effects] == [(RunFinished, ["w-old"])]
    assert run1.outcome == "stopped" and run1.exit_code == 143


def test_cancel_after_the_restarted_run_ended_gives_its_callers_its_result():
    sim = Sim(jobs=1)
    opts = Options(delay=0.5, on_busy="restart")
    sim.submit("k", at=0.0, payload="old", waiter="w-old", options=opts)
    sim.submit("other", at=0.1, payload="x", options=Options(delay=0.5))
    sim.advance(0.6)
    run1 = sim.last_run()  # "other" waits for the one slot
    sim.submit("k", at=1.0, payload="new", waiter="w-new", options=opts)
    sim.advance(1.5)
    sim.exit(run1, at=1.75, code=143)  # the slot goes to "other": "new" is queued behind it
    _found, effects = sim.cancel("k", at=2.0)
    got = {(type(e).__name__, tuple(e.waiters)) for e in effects}
    assert got == {("Cancelled", ("w-new",)), ("RunFinished", ("w-old",))}
    assert [e.run for e in effects if isinstance(e, RunFinished)] == [run1]


def test_ignore_never_joins_a_run_that_is_being_stopped():
    sim = Sim()
    sim.submit("k", at=0.0, payload="a", options=Options(delay=0.0, timeout=1.0))
    sim.advance(1.0)
    run1 = sim.last_run()
    sim.sched.timed_out(run1.id)  # timed out: being stopped
    inv = sim.submit("k", at=1.25, payload="b", waiter="wb",
                     options=Options(delay=0.0, on_busy="ignore"))
    assert inv.run is None and wb_not_in(run1, "wb")
    sim.exit(run1, at=1.5, code=143)
    assert sim.starts()[-1] == (1.5, "b")


def wb_not_in(run: Run, waiter: str) -> bool:
    return waiter not in run.waiters


def test_a_freed_slot_goes_to_the_queue_in_arrival_order():
    """--jobs 1: a key that falls due as its own run ends waits behind keys already queued."""
    sim = Sim(jobs=1)
    sim.submit("a", at=0.0, payload="a1", options=Options(delay=0.0))
    run_a = sim.last_run()
    sim.submit("b", at=0.25, payload="b1", options=Options(delay=0.0))  # queued
    sim.submit("a", at=0.5, payload="a2", options=Options(delay=0.5))  # due at 1.0, a busy
    sim.advance(1.0)
    sim.exit(run_a, at=1.25)
    assert sim.starts() == [(0.0, "a1"), (1.25, "b1")]
    sim.exit(sim.last_run(), at=1.5)
    assert sim.starts()[-1] == (1.5, "a2")


def test_a_caller_joins_a_no_trailing_leader_that_is_still_queued():
    sim = Sim(jobs=1)
    sim.submit("busy", at=0.0, payload="x", options=Options(delay=0.0))
    blocker = sim.last_run()
    opts = Options(delay=1.0, leading=True, trailing=False)
    leader = sim.submit("k", at=0.25, payload="lead", waiter="w1", options=opts)
    assert leader.state == "queued"
    follower = sim.submit("k", at=0.5, payload="follow", waiter="w2", options=opts)
    assert follower.head() is leader and leader.coalesced == 2
    sim.exit(blocker, at=0.75)
    assert sim.starts() == [(0.0, "x"), (0.75, "lead")]
    assert sim.last_run().waiters == ["w1", "w2"]
