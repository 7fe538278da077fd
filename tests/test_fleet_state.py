"""A fleet key's steps with made-up store times, no store: the timing rules against lodash's
(the same reference the local scheduler is held to), and claims, takeovers, fencing and the
busy-key rules across hosts."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import HealthCheck, given, settings
from test_lodash import EDGES, MAX_WAITS, WAITS, agrees_with_lodash, call_times, lodash_model

from debounce_cli import states
from debounce_cli.daemon.fleet import state as fs
from debounce_cli.scheduler import Options

JOB = {"argv": ["make"], "cwd": "/src", "env": {}}


def submit(st: fs.KeyState, now: float, host: str = "a", inv: int = 1,
           **options: object) -> fs.Landed:
    opts = Options(**options)  # type: ignore[arg-type]
    landed, _ = fs.submit(st, inv=inv, host=host, job=JOB, options=opts, now=now)
    return landed


def fleet_runs(wait: float, max_wait: float | None, leading: bool, trailing: bool,
               calls: list[float]) -> list[tuple[float, int]]:
    """The calls through the fleet's steps on one host: (start time, winning call) of every
    run, each claimed exactly when due and ending at once (as ``test_lodash.ours`` does)."""
    opts = Options(delay=wait, max_wait=max_wait, leading=leading, trailing=trailing)
    st = fs.KeyState("k")
    out: list[tuple[float, int]] = []
    runs = iter(range(1, 10_000))

    def advance(until: float) -> None:
        while st.pending is not None and st.pending.due <= until:
            now = st.pending.due
            result, events = fs.claim(st, host="a", now=now, run_id=next(runs),
                                      may_take_over=False)
            assert isinstance(result, fs.Start), result
            assert events[0]["t"] == "started"
            out.append((now, result.running.inv))
            last, _ = fs.finish(st, run=result.running, exit_code=0, outcome=states.EXITED,
                                now=now)
            assert last is not None

    for i, t in enumerate(calls):
        advance(t)
        fs.submit(st, inv=i, host="a", job=JOB, options=opts, now=t)
        advance(t)  # a leading edge is due at once
    advance(calls[-1] + 100.0)
    return out


@pytest.mark.timeout(600)
@settings(max_examples=1500, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(wait=WAITS, max_wait=MAX_WAITS, edges=EDGES, calls=call_times())
def test_a_fleet_key_debounces_as_lodash_does(
    wait: float, max_wait: float | None, edges: tuple[bool, bool], calls: list[float]
) -> None:
    leading, trailing = edges
    agrees_with_lodash(fleet_runs(wait, max_wait, leading, trailing, calls),
                       lodash_model(wait, max_wait, leading, trailing, calls),
                       wait, max_wait, leading, trailing, calls)


def test_the_latest_invocation_wins_with_its_host_in_one_slot() -> None:
    st = fs.KeyState("k")
    first = submit(st, 100.0, host="a", inv=1, delay=2.0)
    second = submit(st, 101.0, host="b", inv=7, delay=2.0)
    assert isinstance(first, fs.InSlot) and isinstance(second, fs.InSlot)
    assert first.slot == second.slot
    assert (second.due, second.coalesced) == (103.0, 2)
    assert st.pending is not None and (st.pending.host, st.pending.inv) == ("b", 7)


def test_only_the_latest_host_claims_unless_it_went_silent() -> None:
    st = fs.KeyState("k")
    submit(st, 100.0, host="a", delay=1.0)
    assert isinstance(fs.claim(st, host="b", now=102.0, run_id=1, may_take_over=False)[0],
                      fs.Nothing)
    assert fs.claim(st, host="a", now=100.5, run_id=1, may_take_over=False)[0] == fs.Later(101.0)
    result, _ = fs.claim(st, host="b", now=102.0, run_id=1, may_take_over=True)
    assert isinstance(result, fs.Start) and result.running.host == "b"
    # Host a comes back: nothing is left for it to start.
    assert isinstance(fs.claim(st, host="a", now=102.1, run_id=2, may_take_over=False)[0],
                      fs.Nothing)


def test_a_stale_fencing_token_changes_nothing() -> None:
    st = fs.KeyState("k")
    submit(st, 100.0, host="a", delay=0.0)
    result, _ = fs.claim(st, host="a", now=100.0, run_id=1, may_take_over=False)
    assert isinstance(result, fs.Start)
    old = result.running
    lost, events = fs.lose(st, run=old, now=111.0, silent=10.0)  # host a went silent
    assert lost is not None and lost.outcome == states.LOST and events[0]["t"] == "finished"
    before = st.dumps()
    # Host a comes back and reports its end: fenced off, the record stays "lost".
    assert fs.finish(st, run=old, exit_code=0, outcome=states.EXITED,
                     now=112.0) == (None, [])
    assert st.dumps() == before


def test_on_busy_restart_stops_the_run_wherever_it_runs_and_its_waiters_follow() -> None:
    st = fs.KeyState("k")
    submit(st, 100.0, host="a", delay=0.0, on_busy="restart")
    run1 = fs.claim(st, host="a", now=100.0, run_id=1, may_take_over=False)[0]
    assert isinstance(run1, fs.Start)
    submit(st, 101.0, host="b", inv=2, delay=0.0, on_busy="restart")
    result, events = fs.claim(st, host="b", now=101.0, run_id=2, may_take_over=False)
    assert isinstance(result, fs.Busy)
    assert events == [{"t": "stop", "run": 1, "fence": run1.running.fence,
                       "why": states.STOP_RESTART}]
    last, events = fs.finish(st, run=run1.running, exit_code=143, outcome=states.EXITED,
                             now=101.2)
    assert last is not None and last.outcome == states.RESTARTED
    assert st.pending is not None and events[0]["then"] == st.pending.slot
    assert isinstance(fs.claim(st, host="b", now=101.2, run_id=3, may_take_over=False)[0],
                      fs.Start)


def test_on_busy_signal_joins_the_running_run() -> None:
    st = fs.KeyState("k")
    submit(st, 100.0, host="a", delay=0.0, on_busy="signal", signal="USR1")
    run1 = fs.claim(st, host="a", now=100.0, run_id=1, may_take_over=False)[0]
    assert isinstance(run1, fs.Start)
    submit(st, 101.0, host="b", inv=2, delay=0.0, on_busy="signal", signal="USR1")
    result, events = fs.claim(st, host="b", now=101.0, run_id=2, may_take_over=False)
    assert isinstance(result, fs.Busy)
    assert [e["t"] for e in events] == ["signal", "moved"]
    assert events[0]["sig"] == "USR1"
    assert st.pending is None and st.running is not None and st.running.coalesced == 2


def test_on_busy_ignore_joins_and_queue_waits() -> None:
    st = fs.KeyState("k")
    submit(st, 100.0, delay=0.0)
    assert isinstance(fs.claim(st, host="a", now=100.0, run_id=1, may_take_over=False)[0],
                      fs.Start)
    assert submit(st, 100.5, delay=0.0, on_busy="ignore") == fs.InRun(1, 2)
    submit(st, 100.6, delay=0.0)  # queue: one more run after this one
    assert isinstance(fs.claim(st, host="a", now=100.6, run_id=2, may_take_over=False)[0],
                      fs.Busy)


def test_no_trailing_invocations_share_a_finished_leading_run() -> None:
    st = fs.KeyState("k")
    submit(st, 100.0, delay=5.0, leading=True, trailing=False)
    run = fs.claim(st, host="a", now=100.0, run_id=1, may_take_over=False)[0]
    assert isinstance(run, fs.Start)
    fs.finish(st, run=run.running, exit_code=4, outcome=states.EXITED, now=100.1)
    landed = submit(st, 101.0, delay=5.0, leading=True, trailing=False)
    assert isinstance(landed, fs.Done) and landed.last.exit_code == 4


def test_the_state_survives_storage_with_fields_of_a_newer_version() -> None:
    st = fs.KeyState("k")
    submit(st, 100.0, delay=1.0, max_wait=5.0)
    raw = st.dumps().replace('{"key"', '{"future":[1,2],"key"', 1)
    again = fs.KeyState.loads("k", raw)
    assert again.dumps().replace('"future":[1,2],', "") == st.dumps()
    assert again.extra == {"future": [1, 2]}
    assert fs.KeyState.loads("new", None).quiet_at == float("-inf")


def test_a_leader_replaced_before_it_was_claimed_stays_due_at_once() -> None:
    st = fs.KeyState("k")
    first = submit(st, 100.0, host="a", delay=5.0, leading=True)
    # Host b's call comes before host a has claimed the leading run: it takes the leader's
    # place and is still due at once (the local scheduler does the same).
    second = submit(st, 100.01, host="b", inv=2, delay=5.0, leading=True)
    assert isinstance(first, fs.InSlot) and isinstance(second, fs.InSlot)
    assert (first.due, second.due, second.slot) == (100.0, 100.01, first.slot)
    result, _ = fs.claim(st, host="b", now=100.02, run_id=1, may_take_over=False)
    assert isinstance(result, fs.Start) and result.running.inv == 2
    assert st.burst_run == 1


def test_a_run_the_store_forgot_is_still_reported_once() -> None:
    st = fs.KeyState("k")
    submit(st, 100.0, host="a", delay=0.0)
    result, _ = fs.claim(st, host="a", now=100.0, run_id=9, may_take_over=False)
    assert isinstance(result, fs.Start)
    forgotten = fs.KeyState("k")  # the store restarted empty while the run went on
    last, events = fs.finish(forgotten, run=result.running, exit_code=3,
                             outcome=states.EXITED, now=104.0)
    assert last is not None and last.exit_code == 3
    assert events[0]["t"] == "finished" and events[0]["run_id"] == 9
    assert forgotten.seq == result.running.fence  # later tokens stay above it
    assert fs.finish(forgotten, run=result.running, exit_code=3, outcome=states.EXITED,
                     now=105.0) == (None, [])


def test_a_retried_submission_or_claim_finds_its_own_work_done() -> None:
    # redis-py turns a lost answer to EXEC into a WatchError: the step runs again on the
    # state it already changed, and must change nothing more.
    st = fs.KeyState("k")
    opts = Options(delay=1.0)
    first, events = fs.submit(st, inv=1, host="a", job=JOB,
                              options=opts, now=100.0, token="i1:1")
    again, events_again = fs.submit(st, inv=1, host="a", job=JOB,
                                    options=opts, now=100.2, token="i1:1")
    assert again == first and events and events_again == []
    assert st.pending is not None and st.pending.coalesced == 1 and st.pending.due == 101.0
    started, _ = fs.claim(st, host="a", now=101.0, run_id=5, may_take_over=False)
    retried, events = fs.claim(st, host="a", now=101.1, run_id=5, may_take_over=False)
    assert isinstance(started, fs.Start) and retried == started and events == []


def test_a_state_written_by_a_newer_version_still_loads() -> None:
    st = fs.KeyState("k")
    submit(st, 100.0, delay=1.0)
    raw = st.dumps().replace('"slot":', '"priority":3,"slot":', 1)
    again = fs.KeyState.loads("k", raw)
    assert again.pending is not None and again.pending.slot == st.pending.slot  # type: ignore[union-attr]


def test_a_queued_invocation_keeps_its_place_when_replaced() -> None:
    st = fs.KeyState("k")
    submit(st, 100.0, host="a", delay=1.0)
    early, _ = fs.claim(st, host="a", now=100.5, run_id=0, may_take_over=False,
                        slot_free=False)
    assert early == fs.Later(101.0)  # not due yet
    queued, events = fs.claim(st, host="a", now=101.0, run_id=0, may_take_over=False,
                              slot_free=False)
    assert queued == fs.Queued() and events[0]["queued"] is True
    landed = submit(st, 102.0, host="a", inv=2, delay=30.0)
    assert isinstance(landed, fs.InSlot)
    assert (landed.due, landed.state, landed.coalesced) == (101.0, "queued", 2)


def test_fleet_runs_borrow_the_local_schedulers_job_slots() -> None:
    from debounce_cli.clock import FakeClock
    from debounce_cli.scheduler import Scheduler, StartRun

    clock = FakeClock()
    sched = Scheduler(clock.monotonic, jobs=1)
    assert sched.borrow()  # a fleet run takes the only slot
    _, effects = sched.submit("local", Options(delay=0.0))
    assert not [e for e in effects if isinstance(e, StartRun)]  # it queues behind it
    assert not sched.borrow()  # and a second fleet run waits too
    assert [type(e) for e in sched.give_back()].count(StartRun) == 1
    assert not sched.borrow()


class FakeWaiter:
    """A waiter that keeps what it was handed, by message type."""

    def __init__(self) -> None:
        self.got: list[str] = []
        self.run: int | None = None

    def raw(self, line: bytes) -> None:
        self.got.append(json.loads(line)["type"])

    def follows(self, run_id: int) -> bool:
        return self.run == run_id

    def start(self, run_id: int, line: bytes, log: str | None) -> None:
        self.run = run_id
        self.got.append("started")

    def output(self, fd: int, data: bytes, line: bytes, end: int | None) -> None:
        self.got.append(data.decode())

    def replay(self, so_far: object) -> None:
        pass

    def finish(self, msg: object) -> None:
        self.got.append(type(msg).__name__.lower())


def test_events_reach_each_waiter_once_from_its_slot_to_its_run() -> None:
    from debounce_cli.daemon.fleet.waiting import KeyWaiters, deliver

    kw = KeyWaiters()
    early, late = FakeWaiter(), FakeWaiter()
    kw.slots[1] = [early, late]
    kw.since[(late, "slot", 1)] = (5, 0)  # filed after event 5: it had that one
    events = [
        ((4, 0), {"t": "pending", "slot": 1, "due": 1.0, "coalesced": 2, "host": "a"}),
        ((6, 0), {"t": "started", "slot": 1, "run": 9, "host": "a", "argv": ["x"]}),
        ((7, 0), {"t": "out", "run": 9, "fd": 1, "n": 1, "data": "aGkK"}),
        ((8, 0), {"t": "finished", "run_id": 9, "exit_code": 0, "outcome": "exited"}),
    ]
    for eid, event in events:
        deliver("k", kw, event, eid, None, 0.0)
    assert early.got == ["pending", "started", "hi\n", "finished"]
    assert late.got == ["started", "hi\n", "finished"]
    assert kw.empty() and not kw.since


def test_a_view_of_the_heartbeats_older_than_the_run_never_records_it_lost() -> None:
    """Found by fleet_chaos.py: a host that saw c silent, then froze, thawed and judged c's
    newer run with that view. The silence must cover a lease after the run's start in the
    view used (``seen``, the store's time of that heartbeat), not only by the store's time
    of the step."""
    st = fs.KeyState("k")
    submit(st, 100.0, host="c", delay=0.0)
    result, _ = fs.claim(st, host="c", now=100.0, run_id=1, may_take_over=False)
    assert isinstance(result, fs.Start)
    # Seen at 99 (before the run), judged at 115: the run is not lost.
    assert fs.lose(st, run=result.running, now=115.0, silent=10.0, seen=99.0) == (None, [])
    assert fs.lose(st, run=result.running, now=115.0, silent=10.0, seen=109.9) == (None, [])
    lost, _ = fs.lose(st, run=result.running, now=115.0, silent=10.0, seen=110.0)
    assert lost is not None and lost.outcome == states.LOST


def test_a_run_younger_than_a_lease_is_never_recorded_lost() -> None:
    """Issue 18, item 1: a peer whose view of the heartbeats predates a joining host takes
    it for silent; the step that records the loss checks, on the store's clock, that the run
    started a lease ago or more. A pending invocation received less than a lease ago is not
    taken over either: its host was alive then."""
    st = fs.KeyState("k")
    submit(st, 100.0, host="c", delay=0.0)
    result, _ = fs.claim(st, host="c", now=100.0, run_id=1, may_take_over=False)
    assert isinstance(result, fs.Start)
    assert fs.lose(st, run=result.running, now=109.9, silent=10.0) == (None, [])
    assert st.running is not None
    lost, _ = fs.lose(st, run=result.running, now=110.0, silent=10.0)
    assert lost is not None and lost.outcome == states.LOST
    submit(st, 120.0, host="c", inv=2, delay=0.0)
    taken, _ = fs.claim(st, host="b", now=125.0, run_id=2, may_take_over=True, silent=10.0)
    assert isinstance(taken, fs.Nothing)
    taken, _ = fs.claim(st, host="b", now=130.0, run_id=2, may_take_over=True, silent=10.0)
    assert isinstance(taken, fs.Start) and taken.running.host == "b"


def test_a_copy_of_a_state_steps_as_the_stored_form_does_and_leaves_it_unchanged() -> None:
    """The store steps on copies of the states it keeps as objects: every kind of step on a
    copy gives what it gives on the state parsed from its stored form, and the state copied
    is never changed (a copy that shared a list, a slot or a run with it would fail this)."""
    rng = random.Random(5)
    st = fs.KeyState("k")
    now = 1000.0

    def a_step(st: fs.KeyState, n: int) -> tuple[object, list[fs.Event]]:
        kind = rng.choice(["submit"] * 5 + ["collect"] * 2 + ["claim"] * 4 + [
            "finish", "unclaim", "kill", "signal", "cancel", "flush", "lose"])
        r = st.running
        if kind in ("submit", "collect"):
            opts = Options(delay=rng.choice([0.0, 0.5, 2.0]), collect=kind == "collect",
                           on_busy=rng.choice(["queue", "restart", "signal", "ignore"]))
            job = {"argv": ["make", str(rng.random())], "cwd": "/", "env": {"A": "1"}}
            return fs.submit(st, inv=n, host=rng.choice("ab"), job=job,
                             options=opts, now=now,  # (now and then a retry of an earlier one)
                             token=f"t:{n if rng.random() < 0.9 else rng.randrange(1, n + 1)}")
        if kind == "claim":
            p = st.pending
            host = p.host if p is not None and rng.random() < 0.8 else "b"
            return fs.claim(st, host=host, now=now, run_id=n,
                            may_take_over=rng.random() < 0.5, slot_free=rng.random() < 0.6)
        if r is None:
            return fs.flush(st, now=now) if kind == "flush" else fs.cancel(st)
        if kind == "finish":
            return fs.finish(st, run=r, exit_code=0, outcome=states.EXITED, now=now)
        if kind == "unclaim":
            return fs.unclaim(st, run=r, now=now)
        if kind == "lose":
            return fs.lose(st, run=r, now=now)
        if kind in ("kill", "signal"):
            return fs.kill(st, signal="USR1" if kind == "signal" else None)
        return fs.cancel(st) if kind == "cancel" else fs.flush(st, now=now)

    kinds_seen: set[str] = set()
    for n in range(1, 3001):
        now += rng.choice([0.0, 0.1, 1.0, 3.0])
        stored = st.dumps()
        state = rng.getstate()
        on_parsed = fs.KeyState.loads("k", stored)
        result_parsed, events_parsed = a_step(on_parsed, n)
        rng.setstate(state)  # (the same step again, on a copy)
        copy = st.copy()
        result_copy, events_copy = a_step(copy, n)
        assert st.dumps() == stored  # the state copied is as it was
        assert copy.dumps() == on_parsed.dumps()
        assert events_copy == events_parsed and repr(result_copy) == repr(result_parsed)
        kinds_seen.add(type(result_copy).__name__)
        st = copy
    assert {"InSlot", "InRun", "Start", "Queued", "Busy", "Last", "Running"} <= kinds_seen
