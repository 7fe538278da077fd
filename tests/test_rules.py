"""The rule corners an independent model of the SPEC found (issue 22), pinned on fake time.

Each test drives the local scheduler (which calls :mod:`debounce_cli.rules`; the fleet's keys
call the same functions, and ``test_differential.py`` holds the two to the same runs). Items 1
to 3 failed before the rulebook; each test of item 4 fails when the rule it names is broken
(the mutation it guards against is in its docstring).
"""

from __future__ import annotations

from typing import Any

from test_scheduler import Sim

from debounce_cli import rules, states
from debounce_cli.scheduler import (
    CANCELLED,
    PENDING,
    RUNNING,
    Cancelled,
    Options,
    RunFinished,
    StartRun,
)


def told(sim: Sim) -> dict[Any, tuple[Any, ...]]:
    """What every waiter was told: ("run", run id, outcome) or ("cancelled",)."""
    out: dict[Any, tuple[Any, ...]] = {}
    for _, effect in sim.log:
        if isinstance(effect, RunFinished):
            for waiter in effect.waiters:
                out[waiter] = ("run", effect.run.id, effect.run.outcome)
        elif isinstance(effect, Cancelled):
            for waiter in effect.waiters:
                out[waiter] = ("cancelled",)
    return out


class InstantSim(Sim):
    """Runs take no time: every run exits as it starts (as ``test_lodash`` has them)."""

    def _record(self, effects: list[Any]) -> list[Any]:
        super()._record(effects)
        for effect in effects:
            if isinstance(effect, StartRun) and effect.run.id in self.sched.runs:
                self._record(self.sched.run_exited(effect.run.id, 0))
        return effects


# ------------------------------------------------------------------ 1. throttle
def test_throttle_never_starts_twice_within_its_period() -> None:
    """--throttle 1s, calls at 0, 0.125 and 1.125: starts at 0, 1.0 and 2.0 (lodash, and the
    scheduler before, started the third at 1.125, 0.125 s after the second)."""
    opts = Options(leading=True, delay=1.0, max_wait=1.0)
    sim = InstantSim()
    for at, payload in ((0.0, "a"), (0.125, "b"), (1.125, "c")):
        sim.submit("k", at=at, payload=payload, options=opts)
    sim.advance(10.0)
    assert sim.starts() == [(0.0, "a"), (1.0, "b"), (2.0, "c")]


def test_throttle_spacing_holds_when_the_key_was_idle_meanwhile() -> None:
    """The key is forgotten once idle only after its next leading run may start: a call after
    a quiet gap still waits out the period since the last start."""
    opts = Options(leading=True, delay=1.0, max_wait=1.0)
    sim = InstantSim()
    sim.submit("k", at=0.0, payload="a", options=opts)
    sim.submit("k", at=0.5, payload="b", options=opts)  # trailing, at 1.0
    sim.advance(1.5)  # quiet since 0.5 + 1: the burst is over
    sim.submit("k", at=1.5, payload="c", options=opts)
    sim.advance(10.0)
    assert sim.starts() == [(0.0, "a"), (1.0, "b"), (2.0, "c")]


# ------------------------------------------------------------------ 2. max-wait after an early run
def test_max_wait_bound_holds_after_a_flushed_run() -> None:
    """delay 1, max-wait 1; calls at 0 and 0.5, flush at 0.625, a call at 1.25: it runs at
    1.625 (max-wait after the flushed run's start), not at 2.25 (lodash's flush gives 1.625)."""
    opts = Options(delay=1.0, max_wait=1.0)
    sim = InstantSim()
    sim.submit("k", at=0.0, payload="a", options=opts)
    sim.submit("k", at=0.5, payload="b", options=opts)
    sim.flush("k", at=0.625)
    sim.submit("k", at=1.25, payload="c", options=opts)
    sim.advance(10.0)
    assert sim.starts() == [(0.625, "b"), (1.625, "c")]


def test_max_wait_bound_holds_after_a_queued_run_started_early() -> None:
    """daemon --jobs 1, another key holds the slot from 0 to 2; key a (delay 1, max-wait 1)
    called at 0, 1.5, 1.75 and 2.5: the queued invocation starts at 2.0 when the slot frees,
    and the call at 2.5 runs at 3.0 (max-wait after that start), not at 3.5."""
    opts = Options(delay=1.0, max_wait=1.0)
    sim = Sim(jobs=1)
    sim.submit("other", at=0.0, payload="hog", options=Options(delay=0.0))
    hog = sim.last_run()
    for at, payload in ((0.0, "a1"), (1.5, "a2"), (1.75, "a3")):
        sim.submit("a", at=at, payload=payload, options=opts)
    sim.exit(hog, at=2.0)
    assert sim.starts()[-1] == (2.0, "a3")
    sim.exit(sim.last_run(), at=2.0)
    sim.submit("a", at=2.5, payload="a4", options=opts)
    sim.advance(10.0)
    assert sim.starts()[-1] == (3.0, "a4")


# ------------------------------------------------------------------ 3. collect
def test_a_collect_batch_keeps_callers_that_did_not_say_collect() -> None:
    """Calls a (--collect), b (without), c (--collect): the run stands for all three, and
    every last argument is in its batch (b's was lost before)."""
    sim = Sim()
    sim.submit("k", at=0.0, payload="a", options=Options(collect=True))
    sim.submit("k", at=0.25, payload="b", options=Options())
    sim.submit("k", at=0.5, payload="c", options=Options(collect=True))
    sim.advance(10.0)
    run = sim.last_run()
    assert (run.coalesced, list(run.invocation.batch)) == (3, ["a", "b", "c"])


# ------------------------------------------------------------------ 4. rules the suite left loose
def test_on_busy_signal_signals_when_due_and_joins_the_run() -> None:
    """--on-busy signal is pending as usual, and when it falls due sends --signal to the run
    and joins it; the key has nothing pending then and the run counts both (mutations: join
    at submission; never send the signal; stay pending; lose the count)."""
    opts = Options(delay=0.5, on_busy="signal", signal="USR1")
    sim = Sim()
    sim.submit("k", at=0.0, payload="server", waiter="w1", options=Options(delay=0.0))
    server = sim.last_run()
    inv = sim.submit("k", at=1.0, payload="reload", waiter="w2", options=opts)
    assert inv.state == PENDING and sim.signals() == []
    sim.advance(1.5)
    assert sim.signals() == [(1.5, server.id, "USR1")]
    assert sim.sched.keys["k"].pending is None and inv.run is server
    assert server.coalesced == 2 and server.stop_reason is None
    sim.exit(server, at=3.0)
    assert told(sim) == {"w1": ("run", server.id, states.EXITED),
                         "w2": ("run", server.id, states.EXITED)}
    assert len(sim.runs()) == 1


def test_no_trailing_leader_cancelled_lets_the_next_call_lead() -> None:
    """--leading --no-trailing, delay 1, the only slot held by another key until 0.75: the
    queued leader is cancelled; the next call of the burst, at 0.5, leads afresh and starts
    when the slot frees (mutation: it waits for a trailing edge at 1.5 that --no-trailing
    does not have)."""
    opts = Options(delay=1.0, leading=True, trailing=False)
    sim = Sim(jobs=1)
    sim.submit("other", at=0.0, options=Options(delay=0.0))
    hog = sim.last_run()
    sim.submit("k", at=0.0, payload="a", waiter="wa", options=opts)
    sim.cancel("k", at=0.25)
    sim.submit("k", at=0.5, payload="b", waiter="wb", options=opts)
    sim.exit(hog, at=0.75)
    sim.advance(10.0)
    assert sim.starts()[-1] == (0.75, "b")
    assert told(sim)["wa"] == ("cancelled",)


def test_restart_waiters_keep_the_stopped_runs_result_across_a_replacement() -> None:
    """--on-busy restart: run 1 is asked to stop; it ends after its replacement B was itself
    replaced by C; then D replaces C and D is cancelled. The callers of run 1 are told run
    1's result (restarted), never "cancelled" (mutation: the stopped run's callers are
    dropped when the pending invocation is superseded)."""
    opts = Options(delay=0.5, on_busy="restart")
    sim = Sim()
    sim.submit("k", at=0.0, payload="A", waiter="wa", options=Options(delay=0.0))
    first = sim.last_run()
    sim.submit("k", at=1.0, payload="B", waiter="wb", options=opts)
    sim.advance(1.5)
    assert (1.5, first.id, "TERM") in sim.signals()
    sim.submit("k", at=1.75, payload="C", waiter="wc", options=opts)
    sim.exit(first, at=1.875, code=143)
    sim.submit("k", at=2.0, payload="D", waiter="wd", options=Options(delay=5.0))
    sim.cancel("k", at=2.25)
    assert told(sim) == {"wa": ("run", first.id, states.RESTARTED),
                         "wb": ("cancelled",), "wc": ("cancelled",), "wd": ("cancelled",)}


def test_a_collect_batch_is_every_argument_oldest_first() -> None:
    """Five --collect calls: the batch is all five, oldest first (mutations: keep only the
    last two; newest first)."""
    sim = Sim()
    for i, payload in enumerate("abcde"):
        sim.submit("k", at=i * 0.25, payload=payload, options=Options(collect=True))
    sim.advance(10.0)
    assert list(sim.last_run().invocation.batch) == list("abcde")


def test_replacing_a_leader_not_started_keeps_it_due_at_once() -> None:
    """--leading, delay 1: a run executes from 0 to 3; a call at 2 begins a new burst and
    leads (due at once, waiting for the key); a call at 2.5 replaces it and is still due at
    once: it starts at 3.0 when the key frees, not at 3.5 (mutation: the replacement waits a
    full delay)."""
    opts = Options(delay=1.0, leading=True)
    sim = Sim()
    sim.submit("k", at=0.0, payload="a", options=opts)
    first = sim.last_run()
    sim.submit("k", at=2.0, payload="b", options=opts)
    sim.submit("k", at=2.5, payload="c", options=opts)
    sim.exit(first, at=3.0)
    assert sim.starts() == [(0.0, "a"), (3.0, "c")]


def test_the_latest_invocations_on_busy_decides_not_the_running_runs() -> None:
    """The run executing was submitted with --on-busy queue; a later call says restart: the
    run is stopped when that call falls due (mutation: the running run's mode decides)."""
    sim = Sim()
    sim.submit("k", at=0.0, payload="a", options=Options(delay=0.0))
    first = sim.last_run()
    sim.submit("k", at=1.0, payload="b", options=Options(delay=0.5, on_busy="restart"))
    sim.advance(2.0)
    assert sim.signals() == [(1.5, first.id, "TERM")]
    assert first.stop_reason == states.STOP_RESTART


def test_a_second_stop_request_sends_nothing_more() -> None:
    """`debounce kill` twice: one stop, one TERM (mutation: TERM again); the KILL a stop
    timeout after the first request is ``daemon.runs``' (tests/test_runs_stop.py)."""
    sim = Sim()
    sim.submit("k", at=0.0, options=Options(delay=0.0, stop_timeout=2.0))
    run = sim.last_run()
    sim.advance(1.0)
    sim._record(sim.sched.kill(run.id))
    sim.advance(1.5)
    sim._record(sim.sched.kill(run.id))
    sim.advance(10.0)
    assert sim.signals() == [(1.0, run.id, "TERM")]


def test_kill_with_a_signal_sends_it_once_and_does_not_stop_the_run() -> None:
    """`debounce kill --signal USR1`: USR1 once, no TERM, no KILL later, and the run is not
    taken as stopped (mutation: it stops the run)."""
    sim = Sim()
    sim.submit("k", at=0.0, options=Options(delay=0.0, stop_timeout=1.0))
    run = sim.last_run()
    sim.advance(1.0)
    sim._record(sim.sched.kill(run.id, "USR1"))
    sim.advance(20.0)
    assert sim.signals() == [(1.0, run.id, "USR1")]
    assert run.stop_reason is None and run.state == RUNNING
    sim.exit(run, at=21.0)
    assert run.outcome == states.EXITED


def test_a_restored_invocation_keeps_where_max_wait_counts_from() -> None:
    """A pending invocation put back from the journal (its burst began at 1, max-wait 4,
    delay 3, last call at 2.5, due at 5): a call at 4 after the restart is capped at 5 (1 +
    max-wait), as it would have been without the restart (mutation: max-wait counts from
    0, and the call runs at once)."""
    opts = Options(delay=3.0, max_wait=4.0)
    sim = Sim()
    sim.sched.restore(1, "k", opts, "restored", received_at=2.5, due=5.0, first_at=1.0,
                      coalesced=2, leading_edge=False)
    sim.submit("k", at=4.0, payload="after", options=opts)
    sim.advance(10.0)
    assert sim.starts() == [(5.0, "after")]


def test_rules_ended_outcomes() -> None:
    """How a run ended, as callers are told it: a restart-stopped run whose replacement was
    cancelled was simply stopped; a lost run stays lost; a run stopped for a timeout timed
    out whatever its host saw."""
    assert rules.ended(None, states.EXITED, False) == (states.EXITED, False)
    assert rules.ended(states.STOP_RESTART, states.EXITED, True) == (states.RESTARTED, True)
    assert rules.ended(states.STOP_RESTART, states.EXITED, False) == (states.STOPPED, False)
    assert rules.ended(states.STOP_TIMEOUT, states.EXITED, False) == (states.TIMED_OUT, False)
    assert rules.ended(None, states.TIMED_OUT, False) == (states.TIMED_OUT, False)
    assert rules.ended(states.STOP_KILL, states.LOST, False) == (states.LOST, False)


def test_cancel_tells_pending_waiters_cancelled() -> None:
    sim = Sim()
    inv = sim.submit("k", at=0.0, waiter="w")
    sim.cancel("k", at=0.5)
    assert inv.state == CANCELLED and told(sim) == {"w": ("cancelled",)}


def test_a_collect_burst_costs_time_linear_in_its_size() -> None:
    """Issue 23, item 8: each --collect submission copied the whole batch (100,000
    invocations of one key took minutes). Timed as a ratio in one run: four times the
    invocations take about four times as long (quadratic would be sixteen). CPU time, the
    best of three rounds: other work on a shared machine does not count."""
    import time

    def burst(n: int) -> float:
        sim = Sim()
        opts = Options(collect=True, delay=1.0)
        began = time.process_time()
        for i in range(n):
            sim.sched.submit("k", opts, payload=i)
        took = time.process_time() - began
        assert len(sim.sched.keys["k"].pending.batch) == n  # type: ignore[union-attr]
        return took

    small = min(burst(5_000) for _ in range(3))
    large = min(burst(20_000) for _ in range(3))
    assert large / small < 10, (small, large)


# ------------------------------------------------------------------ which run covered me
def test_a_run_lists_every_invocation_it_stands_for() -> None:
    """Issue 20: a run knows the invocations it covered, oldest first: those it replaced,
    those that joined it while it ran (--on-busy ignore) and those a --no-trailing leader
    shared its result with; a restart's replacement covers the stopped run's too."""
    sim = Sim()
    a = sim.submit("k", at=0.0, payload="a")
    b = sim.submit("k", at=0.25, payload="b")
    sim.advance(1.25)
    run = sim.last_run()
    assert run.covered == [a.id, b.id] and run.coalesced == 2
    joined = sim.submit("k", at=1.5, payload="c", options=Options(on_busy="ignore"))
    assert run.covered == [a.id, b.id, joined.id] and run.coalesced == 3

    lead = Options(delay=1.0, leading=True, trailing=False)
    sim2 = InstantSim()
    first = sim2.submit("n", at=0.0, options=lead)
    second = sim2.submit("n", at=0.5, options=lead)
    assert sim2.last_run().covered == [first.id, second.id]

    restart = Options(delay=0.5, on_busy="restart")
    sim3 = Sim()
    old = sim3.submit("r", at=0.0, options=Options(delay=0.0))
    stopped = sim3.last_run()
    new = sim3.submit("r", at=1.0, options=restart)
    sim3.exit(stopped, at=1.75, code=143)
    sim3.advance(5.0)
    assert sim3.last_run().covered == [old.id, new.id]


def test_the_covered_list_is_bounded_but_the_count_is_not() -> None:
    from debounce_cli.scheduler import COVERED_MAX

    sim = Sim()
    for i in range(2 * COVERED_MAX + 50):  # past twice the bound: the oldest are let go
        sim.sched.submit("k", Options(), payload=i)
    sim.advance(5.0)
    run = sim.last_run()
    assert run.coalesced == 2 * COVERED_MAX + 50
    assert run.covered.shown() == 2 * COVERED_MAX + 50  # the count, once the ids are too many
    kept = run.covered.kept()  # the newest are the ones kept: a fresh id can be looked up
    assert len(kept) == COVERED_MAX and kept[-1] == sim.sched.keys["k"].running.invocation.id
