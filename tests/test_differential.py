"""Differential test: a local key and a fleet key driven by the same calls give the same runs.

Both call :mod:`debounce_cli.rules`; what each keeps of its own (the local scheduler's heaps,
waiters and job queue; the fleet's slots, fencing tokens and events) must not change a single
decision. Each generated history has calls with mixed options (every ``--on-busy`` mode,
leading/no-trailing, max-wait, throttle, collect), runs that last across later calls,
``flush``, ``cancel`` and ``kill`` at odd moments, and sometimes another command holding the
only job slot (``daemon --jobs 1``) at first. Compared: every run (when it started, which call
won, its batch, its outcome) and what every caller was told (which run and its status, or
cancelled).

The fleet side plays one host the way ``daemon/fleet/coordinator.py`` does: it claims the
key's pending invocation when it is due (telling the claim whether a job slot is free: the
rules queue it if not), claims again when a slot frees or the key's run ends, stops its run
on a ``stop`` event, and tells its callers through the fleet's own ``waiting.deliver``.

Runs end by themselves after their drawn duration, or at once on SIGTERM (exit 143). Two
things happening at one instant go in this order, on both sides: runs ending, then timers,
then the call or control command.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from debounce_cli import protocol, states
from debounce_cli.daemon.fleet import state as fs
from debounce_cli.daemon.fleet.covering import covered_ids
from debounce_cli.daemon.fleet.waiting import KeyWaiters, deliver
from debounce_cli.rules import Options
from debounce_cli.scheduler import (
    Cancelled,
    Joined,
    RunFinished,
    Scheduler,
    SignalRun,
    StartRun,
    Updated,
)

INF = float("inf")


@dataclass(frozen=True)
class Op:
    at: float
    kind: str  # "call", "flush", "cancel", "kill"
    options: Options | None = None


@dataclass
class History:
    """What a user can see: runs (start, winning call, batch of calls, outcome, exit) and
    what each caller was told (run index and exit, or "cancelled")."""

    runs: list[tuple[float, int, tuple[int, ...], str | None, int | None]] = field(
        default_factory=list)
    told: dict[int, tuple[Any, ...]] = field(default_factory=dict)
    #: Which calls each finished run stood for (``history --json``'s ``covered``), by run.
    covered: dict[int, tuple[int, ...]] = field(default_factory=dict)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# ----------------------------------------------------------------------------- local side
class Local:
    def __init__(self, hog: float, durations: list[float]) -> None:
        self.clock = Clock()
        self.sched = Scheduler(self.clock, jobs=1)
        self.durations = durations
        self.ends: dict[int, float] = {}  # run id -> when it ends by itself
        self.index: dict[int, int] = {}  # run id -> index in history.runs
        self.h = History()
        self.call_of: dict[int, int] = {}  # invocation id -> call
        self.hog: int | None = None
        if hog > 0:
            _, effects = self.sched.submit("hog", Options(delay=0.0), payload=-1)
            for effect in effects:
                if isinstance(effect, StartRun):
                    self.hog = effect.run.id
                    self.ends[effect.run.id] = hog

    def next_time(self) -> float:
        times = [*self.ends.values(), self.sched.next_deadline() or INF]
        return min(times)

    def carry(self, effects: list[Any]) -> None:
        todo = list(effects)
        while todo:
            effect = todo.pop(0)
            if isinstance(effect, StartRun):
                run = effect.run
                if run.key == "hog":
                    continue
                self.index[run.id] = len(self.h.runs)
                inv = run.invocation
                batch = tuple(inv.batch) if inv.batch else ()
                self.h.runs.append((self.clock.now, inv.payload, batch, None, None))
                self.ends[run.id] = self.clock.now + self.durations[
                    len(self.h.runs) % len(self.durations)]
            elif isinstance(effect, SignalRun):
                if effect.signal in ("TERM", "KILL") and effect.run.id in self.ends:
                    del self.ends[effect.run.id]
                    todo.extend(self.sched.run_exited(effect.run.id, 143))
            elif isinstance(effect, RunFinished):
                run = effect.run
                if run.key == "hog":
                    continue
                i = self.index[run.id]
                start, payload, batch, _, _ = self.h.runs[i]
                self.h.runs[i] = (start, payload, batch, run.outcome, run.exit_code)
                self.h.covered[i] = tuple(self.call_of[inv] for inv in run.covered)
                for waiter in effect.waiters:
                    self.h.told[waiter] = ("run", i, run.exit_code, run.outcome)
            elif isinstance(effect, Cancelled):
                for waiter in effect.waiters:
                    self.h.told[waiter] = ("cancelled",)
            else:
                assert isinstance(effect, Joined | Updated)

    def advance(self, until: float) -> None:
        while True:
            t = self.next_time()
            if t > until:
                break
            self.clock.now = max(self.clock.now, t)
            ended = [rid for rid, end in self.ends.items() if end <= t]
            if ended:
                for rid in ended:
                    del self.ends[rid]
                    self.carry(self.sched.run_exited(rid, 0))
                continue
            self.carry(self.sched.tick())
        self.clock.now = until

    def do(self, op: Op, call: int) -> None:
        self.advance(op.at)
        if op.kind == "call":
            assert op.options is not None
            inv, effects = self.sched.submit("k", op.options, payload=call, waiter=call)
            self.call_of[inv.id] = call
            self.carry(effects)
        elif op.kind == "flush":
            self.carry(self.sched.flush("k")[1])
        elif op.kind == "cancel":
            self.carry(self.sched.cancel("k")[1])
        elif op.kind == "kill":
            ks = self.sched.keys.get("k")
            if ks is not None and ks.running is not None:
                self.carry(self.sched.kill(ks.running.id))


# ----------------------------------------------------------------------------- fleet side
class Caller:
    """A fleet caller as ``waiting.deliver`` sees a waiter: it records what it is told."""

    def __init__(self, number: int, fleet: Fleet) -> None:
        self.number, self.fleet = number, fleet

    def raw(self, line: bytes) -> None:
        pass

    def start(self, run_id: int, line: bytes, log: str | None) -> None:
        pass

    def finish(self, msg: protocol.Message) -> None:
        if isinstance(msg, protocol.Finished):
            told: tuple[Any, ...] = ("run", self.fleet.index[msg.run_id], msg.exit_code,
                                     msg.outcome)
        else:
            assert isinstance(msg, protocol.Cancelled), msg
            told = ("cancelled",)
        self.fleet.h.told[self.number] = told


class Fleet:
    """One host on one fleet key, as the coordinator drives ``fs``; the other command
    holding the job slot at first is ``hog`` seconds long."""

    def __init__(self, hog: float, durations: list[float]) -> None:
        self.now = 0.0
        self.st = fs.KeyState("k")
        self.durations = durations
        self.hog_until = hog
        self.run_ids = iter(range(1, 100_000))
        self.ends: dict[int, float] = {}
        self.running: dict[int, fs.Running] = {}
        self.why: dict[int, str] = {}
        self.index: dict[int, int] = {}
        self.h = History()
        self.kw = KeyWaiters()
        self.eid = 0
        self.busy = False  # the claim found the key busy: claim again when its run ends

    def slot_free(self) -> bool:
        return self.now >= self.hog_until and not self.running

    def next_time(self) -> float:
        times = list(self.ends.values())
        if self.hog_until > self.now:
            times.append(self.hog_until)
        p = self.st.pending
        if p is not None and not p.queued and not self.busy:
            times.append(max(p.due, self.now))  # this host's timer for its invocation
        return min(times, default=INF)

    def events(self, events: list[dict[str, Any]]) -> None:
        for event in events:
            kind = event["t"]
            if kind == "finished":
                i = self.index[event["run_id"]]
                start, payload, batch, _, _ = self.h.runs[i]
                self.h.runs[i] = (start, payload, batch, event["outcome"],
                                  event["exit_code"])
                self.h.covered[i] = tuple(int(m.split(":")[1]) for m in event["covered"])
            self.eid += 1
            deliver("k", self.kw, event, (self.eid, 0), None, self.now)
            if kind == "stop" and event["run"] in self.ends:
                self.why[event["run"]] = event["why"]
                del self.ends[event["run"]]
                self.finish(event["run"], 143)

    def finish(self, run_id: int, code: int) -> None:
        self.busy = False
        running = self.running.pop(run_id)
        outcome = states.OUTCOME_OF_STOP.get(self.why.get(run_id), states.EXITED)
        _, events = fs.finish(self.st, run=running, exit_code=code, outcome=outcome,
                              now=self.now)
        self.events(events)
        self.claim()  # the coordinator claims again when the key's run finished

    def claim(self) -> None:
        p = self.st.pending
        if p is None or p.due > self.now:
            return
        result, events = fs.claim(self.st, host="a", now=self.now, run_id=next(self.run_ids),
                                  may_take_over=False, slot_free=self.slot_free())
        self.busy = isinstance(result, fs.Busy)
        if isinstance(result, fs.Start):
            run = result.running
            self.index[run.run] = len(self.h.runs)
            batch = tuple(result.running.batch or ())
            self.h.runs.append((self.now, run.inv, batch, None, None))
            self.running[run.run] = run
            self.ends[run.run] = self.now + self.durations[
                len(self.h.runs) % len(self.durations)]
        self.events(events)

    def advance(self, until: float) -> None:
        while True:
            t = self.next_time()
            if t > until:
                break
            self.now = max(self.now, t)
            ended = [rid for rid, end in self.ends.items() if end <= t]
            if ended:
                for rid in ended:
                    del self.ends[rid]
                    self.finish(rid, 0)
                continue
            if self.hog_until == t:
                self.hog_until = -1.0
            self.claim()
        self.now = until

    def do(self, op: Op, call: int) -> None:
        self.advance(op.at)
        if op.kind == "call":
            assert op.options is not None
            landed, events = fs.submit(self.st, inv=call, host="a",
                                       job={"argv": ["cmd", str(call)], "cwd": "/", "env": {}},
                                       options=op.options, now=self.now)
            caller = Caller(call, self)
            if isinstance(landed, fs.InSlot):
                self.busy = False  # a new due time: the timer is armed again
                self.kw.slots.setdefault(landed.slot, []).append(caller)
            elif isinstance(landed, fs.InRun):
                self.kw.runs.setdefault(landed.run, []).append(caller)
            else:
                last = landed.last
                self.h.told[call] = ("run", self.index[last.run], last.exit_code, last.outcome)
                self.h.covered[self.index[last.run]] = tuple(
                    int(m.split(":")[1]) for m in covered_ids(last))
            self.events(events)
            self.claim()  # a leading edge is due at once
        elif op.kind == "flush":
            self.events(fs.flush(self.st, now=self.now)[1])
            self.claim()
        elif op.kind == "cancel":
            self.events(fs.cancel(self.st)[1])
        elif op.kind == "kill":
            running, events = fs.kill(self.st, signal=None)
            if running is not None:
                self.why[running.run] = states.STOP_KILL
            self.events(events)


def fleet_batch(batch: tuple[Any, ...]) -> tuple[int, ...]:
    return tuple(int(argv[1]) for argv in batch)


def play(ops: list[Op], hog: float, durations: list[float]) -> tuple[History, History]:
    local, fleet = Local(hog, durations), Fleet(hog, durations)
    for call, op in enumerate(ops):
        local.do(op, call)
        fleet.do(op, call)
    end = ops[-1].at + 100.0
    local.advance(end)
    fleet.advance(end)
    fleet.h.runs = [(t, w, fleet_batch(b), o, c) for t, w, b, o, c in fleet.h.runs]
    return local.h, fleet.h


# ----------------------------------------------------------------------------- strategies
@st.composite
def options(draw: st.DrawFn) -> Options:
    delay = draw(st.sampled_from([0.0, 0.25, 0.5, 1.0]))
    leading, trailing = draw(st.sampled_from([(False, True), (True, True), (True, False)]))
    return Options(
        delay=delay,
        max_wait=draw(st.sampled_from([None, 0.5, 1.0, 2.0])),
        leading=leading, trailing=trailing,
        on_busy=draw(st.sampled_from(["queue", "restart", "ignore", "signal"])),
        collect=draw(st.booleans()),
    )


@st.composite
def histories(draw: st.DrawFn) -> tuple[list[Op], float, list[float]]:
    base = draw(options())
    ticks = 0
    ops: list[Op] = []
    for _ in range(draw(st.integers(1, 14))):
        ticks += draw(st.one_of(st.integers(0, 6), st.integers(7, 40)))
        kind = draw(st.sampled_from(["call"] * 6 + ["flush", "cancel", "kill"]))
        opts = None
        if kind == "call":
            opts = base if draw(st.booleans()) else draw(options())
        ops.append(Op(ticks / 8, kind, opts))
    if not any(op.kind == "call" for op in ops):
        ops.append(Op(ticks / 8, "call", base))
    hog = draw(st.sampled_from([0.0, 0.0, 0.75, 2.5]))
    durations = draw(st.lists(st.sampled_from([0.0, 0.375, 1.5, 4.0]), min_size=1,
                              max_size=4))
    return ops, hog, durations


#: More examples for a long hunt: DEBOUNCE_DIFF_EXAMPLES=100000 pytest tests/test_differential.py
EXAMPLES = int(os.environ.get("DEBOUNCE_DIFF_EXAMPLES", "2000"))


@pytest.mark.timeout(300 + EXAMPLES // 50)
@settings(max_examples=EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(histories())
def test_a_local_key_and_a_fleet_key_make_the_same_runs(
    history: tuple[list[Op], float, list[float]],
) -> None:
    ops, hog, durations = history
    local, fleet = play(ops, hog, durations)
    detail = f"ops={ops} hog={hog} durations={durations}"
    assert local.runs == fleet.runs, detail
    assert local.told == fleet.told, detail
    assert local.covered == fleet.covered, detail


def test_leading_no_trailing_joins_the_leader_queued_behind_a_full_slot() -> None:
    """The divergence the rulebook issue names: --leading --no-trailing, delay 1, the only job
    slot taken by another command; calls at 0, 2 and 2.5. Call 2 begins a new burst and leads
    it (it replaces call 1, queued, and keeps its place); call 3 shares its result (SPEC rule
    7), on a local key and a fleet key alike."""
    opts = Options(delay=1.0, leading=True, trailing=False)
    ops = [Op(0.0, "call", opts), Op(2.0, "call", opts), Op(2.5, "call", opts)]
    local, fleet = play(ops, hog=3.0, durations=[0.0])
    assert local.runs == fleet.runs
    assert [(start, winner) for start, winner, *_ in local.runs] == [(3.0, 1)]
    assert local.told == fleet.told == {
        0: ("run", 0, 0, "exited"), 1: ("run", 0, 0, "exited"), 2: ("run", 0, 0, "exited")}


def test_a_key_whose_edge_is_still_armed_is_remembered_while_idle() -> None:
    """Found by the generated test: a run started before its burst's trailing edge keeps the
    edge armed for max-wait; the key's run then ends with nothing pending, and the local
    scheduler forgot the idle key (and the armed edge) while the fleet's state kept it. A call
    at 1.5 runs at once on both (max-wait after the run at 1.125 has passed)."""
    queue = Options(delay=0.0)
    capped = Options(delay=0.25, max_wait=0.5)
    ops = [Op(0.0, "call", queue), Op(0.0, "call", queue), Op(0.5, "call", Options(delay=0.5)),
           Op(0.875, "call", capped),
           Op(0.875, "call", Options(delay=0.5, leading=True, trailing=False)),
           Op(1.5, "call", capped)]
    local, fleet = play(ops, hog=0.75, durations=[0.375])
    assert local.runs == fleet.runs
    assert [start for start, *_ in local.runs] == [0.75, 1.125, 1.5]
